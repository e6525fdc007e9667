#!/usr/bin/env bash
# Hard-kill rounds: starts the real gateway on one data dir, runs mixed load (REST JSON,
# REST SSE, gRPC; keys with and without quotas), `kill -9`s it mid-load, restarts it and
# checks the books, ROUNDS times; prints the calls finished at the client, the calls lost
# and the age of the oldest lost call against the flush interval. Fails on any double
# count, inconsistency or overdrawn quota.
#   ROUNDS=30 FLUSH_MS=500 scripts/crash.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export STEP3_CRASH_ROUNDS="${ROUNDS:-30}"
export STEP3_CRASH_FLUSH_MS="${FLUSH_MS:-500}"
log=$(mktemp)
cargo test --test it crash::kill_9_rounds -- --ignored --nocapture >"$log" 2>&1
status=$?
grep -E '^(round |CRASH FIGURES)|panicked|^test result' "$log"
[ "$status" -eq 0 ] || tail -n 40 "$log"
rm -f "$log"
exit "$status"
