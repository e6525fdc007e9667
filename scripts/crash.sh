#!/usr/bin/env bash
# Hard-kill rounds: starts the real gateway on one data dir, runs mixed load (REST JSON,
# REST SSE, gRPC; keys with and without quotas), `kill -9`s it mid-load, restarts it and
# checks the books, ROUNDS times; prints the calls finished at the client, the calls lost
# and the age of the oldest lost call against the flush interval, the calls the model
# server received and those of them not on the books, and the calls settled at restart as
# interrupted. Fails on any double count, inconsistency or overdrawn quota, and in the
# durable mode (the default) on any call that reached the model server and is not on the
# books.
#   ROUNDS=30 FLUSH_MS=500 DURABILITY=reservations scripts/crash.sh
#   DURABILITY=flush_interval scripts/crash.sh     # the mode without a journal
set -uo pipefail
cd "$(dirname "$0")/.."
export STEP3_CRASH_ROUNDS="${ROUNDS:-30}"
export STEP3_CRASH_FLUSH_MS="${FLUSH_MS:-500}"
export STEP3_CRASH_DURABILITY="${DURABILITY:-reservations}"
log=$(mktemp)
cargo test --test it crash::kill_9_rounds -- --ignored --nocapture >"$log" 2>&1
status=$?
grep -E '^(round |CRASH FIGURES)|panicked|^test result' "$log"
[ "$status" -eq 0 ] || tail -n 40 "$log"
rm -f "$log"
exit "$status"
