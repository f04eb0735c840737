#!/usr/bin/env bash
# bench/bg_bench.sh [samples] — background sync: device-to-device latency
# with 2 and 100 devices, idle syncer CPU (see bench/bg_bench.py). Loopback
# only; builds what it needs, stops everything it started.
set -uo pipefail
cd "$(dirname "$0")/.."
. test/server/cleanup.sh
work_setup bgbench
test/server/build.sh "$WORK" >/dev/null || exit 1
. "$WORK/env.sh"
run_bg_wait /usr/bin/python3 bench/bg_bench.py "$@"
