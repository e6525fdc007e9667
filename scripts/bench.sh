#!/usr/bin/env bash
# Runs the gateway benchmark (examples/bench.rs): builds in release, pins the servers
# (simulated upstream, gateway, nginx) to CPU 0 and the load generator to CPU 1, and prints
# the table that BENCHMARKS.md records. Arguments: seconds per point, rounds (default 5, 3).
# nginx is measured when installed (`apt-get install nginx`); nothing else is needed.
# `scripts/bench.sh durability [seconds] [rounds]`: the two store.durability modes side by
# side (two gateways, one simulator), medians over the rounds.
# `scripts/bench.sh full-load [seconds]`: REST JSON at 16 connections on the gateway alone
# for 300 s, a row of RSS, data dir, rate, latency and CPU every 15 s.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins --examples
if [ "${1:-}" = full-load ]; then
    BENCH_SERVER_CPU=0 exec taskset -c 1 ./target/release/examples/bench full-load "${2:-300}"
fi
if [ "${1:-}" = durability ]; then
    BENCH_SERVER_CPU=0 exec taskset -c 1 ./target/release/examples/bench durability "${2:-3}" "${3:-5}"
fi
BENCH_SERVER_CPU=0 exec taskset -c 1 ./target/release/examples/bench "${1:-5}" "${2:-3}"
