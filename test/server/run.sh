#!/usr/bin/env bash
# test/server/run.sh — end-to-end tests of pgsync-server and the SQLite
# network client (docs/PROTOCOL.md): builds what it needs (build.sh), runs
# test_server.py and test_background.py (background sync, docs/CLIENT.md;
# its tests are named bg_*) against a throwaway PostgreSQL on loopback,
# prints "PASS name" / "FAIL name" per test, and always cleans up.
#
#   test/server/run.sh                    every test
#   test/server/run.sh rls_push_and_pull bg_kill9_loses_nothing   some tests
#   SANITIZE=1 test/server/run.sh         server and extension under ASan+UBSan
set -uo pipefail
cd "$(dirname "$0")/../.."
. test/server/cleanup.sh
work_setup run
test/server/build.sh "$WORK" || exit 1
. "$WORK/env.sh"
if [ "${SANITIZE:-0}" = 1 ]; then
  export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
  export ASAN_OPTIONS=detect_leaks=0
fi
plain=() bg=()
for t in "$@"; do
  case $t in bg_*) bg+=("$t") ;; *) plain+=("$t") ;; esac
done
rc=0
if [ $# -eq 0 ] || [ ${#plain[@]} -gt 0 ]; then
  run_bg_wait /usr/bin/python3 test/server/test_server.py "${plain[@]}"
  rc=$?
fi
if [ $# -eq 0 ] || [ ${#bg[@]} -gt 0 ]; then
  run_bg_wait /usr/bin/python3 test/server/test_background.py "${bg[@]}"
  r=$?
  [ "$r" -gt "$rc" ] && rc=$r
fi
# 0: all passed, 1: some failed (reported), anything else: the runner died
if [ "$rc" -gt 1 ]; then echo "FAIL test-runner (exit status $rc)"; fi
exit $rc
