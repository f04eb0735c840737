#!/usr/bin/env bash
# test/server/run.sh — end-to-end tests of pgsync-server and the SQLite
# network client (docs/PROTOCOL.md): builds what it needs (build.sh), runs
# test_server.py against a throwaway PostgreSQL on loopback, prints
# "PASS name" / "FAIL name" per test, and always cleans up. The files:
# test_server.py (protocol, server, client), test_rls.py (issue 7: every
# device holds exactly its user's view), test_fate.py (issue 8: every row
# has its own fate), test_schema.py (issue 9: app versions side by side),
# test_types.py (issue 9.6: one form of every value on every replica),
# test_background.py (issue 10: background sync, docs/CLIENT.md),
# test_gc.py (issue 11: tombstone GC with a horizon).
#
#   test/server/run.sh                    every test of every file
#   test/server/run.sh rls_push_and_pull  some tests (by name, in any file)
#   SANITIZE=1 test/server/run.sh         server and extension under ASan+UBSan
#   VALGRIND=1 test/server/run.sh NAME... the server under valgrind memcheck
#                                         (slow: name the tests)
#   PGS_SCHEDULES=1000 test/server/run.sh oracle_views   the long oracle (test_rls.py)
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
FILES="test_server.py test_rls.py test_fate.py test_schema.py test_types.py test_background.py test_gc.py"
# names given: each file runs the ones it defines; a name no file defines is an error
for name in "$@"; do
  grep -q "^def $name(" $(printf 'test/server/%s ' $FILES) ||
    { echo "unknown test: $name"; echo "FAIL test-runner (unknown test $name)"; exit 2; }
done
rc=0
for f in $FILES; do
  names=()
  for name in "$@"; do grep -q "^def $name(" "test/server/$f" && names+=("$name"); done
  if [ $# -gt 0 ] && [ ${#names[@]} -eq 0 ]; then continue; fi
  run_bg_wait /usr/bin/python3 "test/server/$f" "${names[@]}"
  r=$?
  # 0: all passed, 1: some failed (reported), anything else: the runner died
  if [ "$r" -gt 1 ]; then echo "FAIL test-runner ($f: exit status $r)"; fi
  if [ "$r" -gt "$rc" ]; then rc=$r; fi
done
if [ "${VALGRIND:-0}" = 1 ]; then
  bad=$(find "$WORK/valgrind" -name 'server.*.log' -size +0 2>/dev/null)
  if [ -n "$bad" ]; then echo "FAIL valgrind-server"; cat $bad | head -80; rc=1
  else echo "PASS valgrind-server ($(ls "$WORK/valgrind" | wc -l) server processes)"; fi
fi
exit $rc
