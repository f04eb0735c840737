#!/usr/bin/env bash
# bench/gc_bench.sh — metadata bytes per live and per deleted row after
# churn, before and after tombstone GC (bench/gc_bench.py). Loopback only;
# builds what it needs, stops everything it started.
set -uo pipefail
cd "$(dirname "$0")/.."
. test/server/cleanup.sh
work_setup gcbench
test/server/build.sh "$WORK" >/dev/null || exit 1
. "$WORK/env.sh"
run_bg_wait /usr/bin/python3 bench/gc_bench.py "$@"
