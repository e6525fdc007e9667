#!/usr/bin/env bash
# Instructions per call, counted by valgrind's callgrind (stable on a noisy machine, unlike
# timings): the gateway (or, with TARGET=bare, examples/bare_proxy) runs under callgrind in
# front of the simulator; `bench calls` makes N sequential calls of KIND on one connection
# between `callgrind_control -z` and `-d`, so start-up and the admin calls are not counted.
#
#   scripts/callgrind.sh json 1000          # or sse, grpc-unary, grpc-stream
#   TARGET=bare scripts/callgrind.sh json 1000
#   DURABILITY=flush_interval scripts/callgrind.sh json 1000   # store.durability (default:
#                                                              # reservations)
#
# Prints the per-call figure and the profile's path (read it with callgrind_annotate).
set -euo pipefail
cd "$(dirname "$0")/.."
KIND=${1:-json}
N=${2:-1000}
TARGET=${TARGET:-gateway}
DURABILITY=${DURABILITY:-reservations}
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
cargo build --release --bins --examples
BIN=$PWD/target/release/step3-gateway
BENCH=$PWD/target/release/examples/bench
D=$(mktemp -d)
SIM_PORT=$((20000 + RANDOM % 20000))
PORT=$((SIM_PORT + 1))
"$BIN" simulate --listen "127.0.0.1:$SIM_PORT" --token-latency-ms 0 >/dev/null 2>&1 &
SIM=$!
# --fair-sched: without it a thread spinning in sled's lazy start-up starves the others.
VG=(valgrind --tool=callgrind --fair-sched=yes --callgrind-out-file="$D/cg.out")
if [ "$TARGET" = bare ]; then
    "${VG[@]}" "$PWD/target/release/examples/bare_proxy" "127.0.0.1:$PORT" "http://127.0.0.1:$SIM_PORT" \
        >/dev/null 2>"$D/vg.err" &
else
    cat >"$D/gw.toml" <<EOT
[server]
listen = "127.0.0.1:$PORT"
[upstream]
url = "http://127.0.0.1:$SIM_PORT"
[store]
path = "$D/data"
durability = "$DURABILITY"
[admin]
token = "callgrind-admin-token-0123456789"
[log]
level = "warn"
EOT
    "${VG[@]}" "$BIN" serve --config "$D/gw.toml" >/dev/null 2>"$D/vg.err" &
fi
TGT=$!
trap 'kill $TGT $SIM 2>/dev/null || true' EXIT
URL="http://127.0.0.1:$PORT"
for _ in $(seq 900); do curl -sf "$URL/health" >/dev/null && break; sleep 0.2; done
KEY=unused
if [ "$TARGET" != bare ]; then
    # A key with every limit and quota on, set high enough never to refuse.
    A="authorization: Bearer callgrind-admin-token-0123456789"
    USER_ID=$(curl -sf -H "$A" -H 'content-type: application/json' \
        -d '{"name":"cg","rpm_limit":100000000,"max_concurrent":100000}' "$URL/admin/v1/users" |
        python3 -c 'import sys,json;print(json.load(sys.stdin)["id"])')
    KEY=$(curl -sf -H "$A" -H 'content-type: application/json' \
        -d "{\"user_id\":\"$USER_ID\",\"rpm_limit\":100000000,\"tpm_limit\":100000000000,\"max_concurrent\":100000,\"request_quota\":1000000000000,\"token_quota\":1000000000000000,\"image_quota\":1000000}" \
        "$URL/admin/v1/keys" | python3 -c 'import sys,json;print(json.load(sys.stdin)["secret"])')
fi
"$BENCH" calls "$KIND" "$URL" "$KEY" 50 # warm-up
callgrind_control -z "$TGT" >/dev/null
"$BENCH" calls "$KIND" "$URL" "$KEY" "$N"
callgrind_control -d "$TGT" >/dev/null
sleep 1
FILE=$(ls -t "$D"/cg.out.* | head -1)
TOTAL=$(callgrind_annotate "$FILE" 2>/dev/null | grep -m1 'PROGRAM TOTALS' | awk '{gsub(",","",$1); print $1}')
[ "$TARGET" = bare ] || TARGET="gateway ($DURABILITY)"
echo "$TARGET $KIND: $((TOTAL / N)) instructions per call ($N calls; profile: $FILE)"
