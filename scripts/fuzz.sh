#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ (cargo-fuzz, nightly) for a fixed time, one after another,
# one process each, and prints per target the executions, exec/s, coverage, features, corpus
# and findings. Not run in CI. Needs `rustup toolchain install nightly` and
# `cargo install cargo-fuzz`.
#
#   scripts/fuzz.sh [seconds-per-target] [target...]     (default 300 s, every target)
#
# New corpus entries go to fuzz/corpus/<target>/ (not committed; the committed seeds are in
# fuzz/seeds/<target>/), crashes to fuzz/artifacts/<target>/ and logs to fuzz/logs/.
# Replay one with `cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>`.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-300}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
declare -A dict=(
    [chat_request]=json.dict [sse_stream]=json.dict [grpc_chunk]=json.dict
    [image_data_url]=image.dict [config]=config.dict
)
# -a: debug assertions and overflow checks on, as in `cargo test`.
cargo +nightly fuzz build -a
mkdir -p logs
printf '%-16s %12s %8s %7s %7s %8s %s\n' target execs exec/s cov ft corpus findings
status=0
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target" "seeds/$target"
    args=(-max_total_time="$seconds" -print_final_stats=1 -timeout=10 -rss_limit_mb=4096)
    if [ -n "${dict[$target]:-}" ]; then
        args+=(-dict="dicts/${dict[$target]}")
    fi
    log="logs/$target.log"
    if cargo +nightly fuzz run -a "$target" "corpus/$target" "seeds/$target" -- "${args[@]}" \
        >"$log" 2>&1; then
        findings=none
    else
        findings="CRASH: $(grep -ho 'artifacts/[^ ]*' "$log" | tail -1)"
        status=1
    fi
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
    rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
    last=$(grep -E '^#[0-9]+' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' <<<"$last" | grep -o '[0-9]*' || true)
    ft=$(grep -o 'ft: [0-9]*' <<<"$last" | grep -o '[0-9]*' || true)
    # Entries this run kept (the corpus directory also holds earlier runs' entries).
    corpus=$(grep -o 'corp: [0-9]*' <<<"$last" | grep -o '[0-9]*' || true)
    printf '%-16s %12s %8s %7s %7s %8s %s\n' "$target" "${execs:-?}" "${rate:-?}" \
        "${cov:-?}" "${ft:-?}" "${corpus:-?}" "$findings"
done
exit "$status"
