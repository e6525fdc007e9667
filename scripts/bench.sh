#!/usr/bin/env bash
# Runs the gateway benchmark (examples/bench.rs): builds in release, pins the servers
# (simulated upstream, gateway, nginx) to CPU 0 and the load generator to CPU 1, and prints
# the table that BENCHMARKS.md records. Arguments: seconds per point, rounds (default 5, 3).
# nginx is measured when installed (`apt-get install nginx`); nothing else is needed.
# `scripts/bench.sh durability [seconds] [rounds] [flush_interval|reservations_synced]`: the
# default store.durability beside another mode (two gateways, one simulator), medians over
# the rounds.
# `scripts/bench.sh full-load [seconds]`: REST JSON at 16 connections on the gateway alone
# for 300 s, a row of RSS, data dir, rate, latency and CPU every 15 s.
# `scripts/bench.sh tail [seconds]`: REST JSON at 16 connections on the gateway alone, and
# whether the calls at or over the p99 came one by one or all together.
# `scripts/bench.sh cache [seconds] [rounds]`: CPU per call of a response cache hit, the
# gateway's against nginx's `proxy_cache` serving the same answer in the same run.
# `scripts/bench.sh shared [seconds] [rounds]`: sled against the shared store, with a private
# Postgres and Redis started here (pinned to CPU 0 with the servers; as root, Postgres runs
# as the `postgres` user), then Redis's commands and CPU per call.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins --examples
if [ "${1:-}" = full-load ]; then
    BENCH_SERVER_CPU=0 exec taskset -c 1 ./target/release/examples/bench full-load "${2:-300}"
fi
if [ "${1:-}" = tail ]; then
    BENCH_SERVER_CPU=0 exec taskset -c 1 ./target/release/examples/bench tail "${2:-10}"
fi
if [ "${1:-}" = cache ]; then
    BENCH_SERVER_CPU=0 exec taskset -c 1 ./target/release/examples/bench cache "${2:-3}" "${3:-3}"
fi
if [ "${1:-}" = durability ]; then
    BENCH_SERVER_CPU=0 exec taskset -c 1 ./target/release/examples/bench durability "${2:-3}" "${3:-5}" "${4:-flush_interval}"
fi
if [ "${1:-}" = shared ]; then
    PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
    WORK=$(mktemp -d /tmp/step3gw-bench-XXXXXX)
    AS_PG=()
    if [ "$(id -u)" -eq 0 ]; then chown postgres "$WORK"; AS_PG=(runuser -u postgres --); fi
    PG_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    REDIS_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    "${AS_PG[@]}" "$PG_BIN/initdb" -D "$WORK/pg" -U postgres --auth=trust --no-sync >/dev/null
    # Postgres as it would run for real (fsync on), on the servers' CPU.
    "${AS_PG[@]}" taskset -c 0 "$PG_BIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pg.log" -w \
        -o "-p $PG_PORT -k $WORK -c listen_addresses=127.0.0.1" start >/dev/null
    taskset -c 0 redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' \
        --appendonly no --dir "$WORK" --daemonize yes --pidfile "$WORK/redis.pid" >/dev/null
    trap '"${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$WORK/pg" -m fast stop >/dev/null; kill "$(cat "$WORK/redis.pid")"; rm -rf "$WORK"' EXIT
    "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres books
    BENCH_POSTGRES_URL="postgres://postgres@127.0.0.1:$PG_PORT/books" \
        BENCH_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0" BENCH_SERVER_CPU=0 \
        taskset -c 1 ./target/release/examples/bench shared "${2:-3}" "${3:-5}"
    exit
fi
BENCH_SERVER_CPU=0 exec taskset -c 1 ./target/release/examples/bench "${1:-5}" "${2:-3}"
