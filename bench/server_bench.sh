#!/usr/bin/env bash
# bench/server_bench.sh [seconds_per_phase] — pgsync-server throughput,
# latency and memory (see bench/server_bench.py). Loopback only; builds what
# it needs, stops everything it started.
set -uo pipefail
cd "$(dirname "$0")/.."
. test/server/cleanup.sh
work_setup bench
test/server/build.sh "$WORK" >/dev/null || exit 1
. "$WORK/env.sh"
run_bg_wait /usr/bin/python3 bench/server_bench.py "$@"
