#!/usr/bin/env bash
# Runs the soak test (examples/soak.rs): builds in release, then drives the gateway (with the
# simulated model server behind it) at a steady open-loop rate of mixed traffic and prints a
# row of RSS / fds / threads / outcomes / latency every 15 s, then a verdict and the books.
# Arguments: seconds (default 600), calls per second (default 200).
# SOAK_PIN=1 pins the servers to CPU 0 and the load generator to CPU 1, as scripts/bench.sh
# does; on a shared machine leaving the scheduler free is usually fairer.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins --examples
if [[ "${SOAK_PIN:-0}" == 1 ]] && command -v taskset >/dev/null; then
  SOAK_SERVER_CPU=0 exec taskset -c 1 ./target/release/examples/soak "${1:-600}" "${2:-200}"
fi
exec ./target/release/examples/soak "${1:-600}" "${2:-200}"
