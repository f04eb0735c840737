#!/usr/bin/env bash
# scripts/demo_full.sh — pgsync end to end: a throwaway PostgreSQL, two
# pgsync-server processes, two SQLite devices editing offline, syncing,
# conflicting, woken in real time, converged (scripts/demo_full.py narrates).
# Loopback only; builds what it needs and always cleans up.
set -uo pipefail
cd "$(dirname "$0")/.."
. test/server/cleanup.sh
work_setup demo
test/server/build.sh "$WORK" || exit 1
. "$WORK/env.sh"
run_bg_wait /usr/bin/python3 scripts/demo_full.py
