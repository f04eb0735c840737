#!/usr/bin/env bash
# scripts/run-tests.sh — the whole suite (`make test`). Builds what it needs,
# runs every suite, and ends with one line "N passed, N failed".
# Suites: core unit tests (cmocka, ASan+UBSan), the SQLite extension through
# SQL (pytest; normal build and ASan+UBSan build), valgrind, the PostgreSQL
# extension (throwaway cluster), the SQL examples of README.md and docs/*.md,
# the sync server (end to end) and the Debian packages (built, installed on
# this machine, smoke-tested, purged).
set -u
cd "$(dirname "$0")/.."
PY=/usr/bin/python3
passed=0
failed=0
failures=()
log_dir=build/test-logs
mkdir -p "$log_dir"

note() { printf '\n=== %s\n' "$*"; }
count() {  # count NAME PASSED FAILED
  passed=$((passed + $2)); failed=$((failed + $3))
  [ "$3" -gt 0 ] && failures+=("$1 ($3 failed)")
  printf -- '--- %s: %d passed, %d failed\n' "$1" "$2" "$3"
}

# build: a failed build is one failure per target, and the suite goes on
build() {
  local what=$1; shift
  if ! make -s "$@" >"$log_dir/build-$what.log" 2>&1; then
    cat "$log_dir/build-$what.log"
    count "build $what" 0 1
    return 1
  fi
}

# cmocka binaries print "[  PASSED  ] N test(s)." and "[  FAILED  ] N test(s)"
run_cmocka() {
  local bin=$1 name out p f
  name=$(basename "$bin")
  out="$log_dir/$name.log"
  "$bin" >"$out" 2>&1
  local rc=$?
  cat "$out" | grep -E '^\[ +(FAILED|PASSED) +\]|ERROR|runtime error|Sanitizer' | head -40
  p=$(grep -oE '^\[  PASSED  \] [0-9]+' "$out" | awk '{s+=$4} END {print s+0}')
  f=$(grep -oE '^\[  FAILED  \] [0-9]+' "$out" | awk '{s+=$4} END {print s+0}')
  if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; tail -20 "$out"; fi
  count "$name" "$p" "$f"
}

# pytest -q ends with "N passed, M failed, ..." (any order, any subset)
run_pytest() {
  local name=$1; shift
  "$@" >"$log_dir/$name.log" 2>&1
  pytest_result "$name" $?
}
pytest_result() {  # pytest_result NAME RC: count what $log_dir/NAME.log says
  local name=$1 rc=$2
  local out="$log_dir/$name.log"
  local summary p f e
  summary=$(grep -E '(passed|failed|error)' "$out" | tail -1)
  p=$(grep -oE '[0-9]+ passed' <<<"$summary" | awk '{print $1}'); p=${p:-0}
  f=$(grep -oE '[0-9]+ failed' <<<"$summary" | awk '{print $1}'); f=${f:-0}
  e=$(grep -oE '[0-9]+ error' <<<"$summary" | awk '{print $1}'); e=${e:-0}
  f=$((f + e))
  if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; fi
  [ "$f" -gt 0 ] && tail -60 "$out"
  echo "$summary"
  count "$name" "$p" "$f"
}

# scripts that print "PASS name" / "FAIL name" lines
run_passfail() {
  local name=$1; shift
  local out="$log_dir/$name.log"
  "$@" >"$out" 2>&1
  local rc=$?
  local p f
  p=$(grep -cE '^PASS ' "$out"); f=$(grep -cE '^FAIL ' "$out")
  grep -E '^(PASS|FAIL) ' "$out"
  if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; tail -40 "$out"; fi
  [ "$f" -gt 0 ] && grep -B2 -A20 -E '^FAIL ' "$out" | head -80
  count "$name" "$p" "$f"
}

start=$(date +%s)

note "build"
build ext all
build asan-ext build/asan/sqlitesync.so
units=$(ls test/test_*.c 2>/dev/null | sed 's#test/\(.*\)\.c#build/\1#')
[ -n "$units" ] && build units $units

note "core unit tests (cmocka, ASan+UBSan)"
for b in $units; do [ -x "$b" ] && run_cmocka "$b"; done

if [ -d test/sqlite ]; then
  # the two runs side by side, one per core (each its own pytest temp
  # directory): the sanitized one is three times slower than the plain one
  note "SQLite extension through SQL (pytest), beside the same under ASan+UBSan"
  asan_preload="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
  rm -rf build/test-tmp && mkdir -p build/test-tmp
  env SQLITESYNC_EXT="$PWD/build/asan/sqlitesync.so" PGS_ASAN=1 \
    LD_PRELOAD="$asan_preload" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
    UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
    "$PY" -m pytest -q -p no:cacheprovider --basetemp=build/test-tmp/sqlite-asan test/sqlite \
    >"$log_dir/sqlite-asan.log" 2>&1 &
  asan_pid=$!
  run_pytest sqlite "$PY" -m pytest -q -p no:cacheprovider --basetemp=build/test-tmp/sqlite test/sqlite
  wait $asan_pid
  pytest_result sqlite-asan $?
  rm -rf build/test-tmp
fi

if [ -x scripts/valgrind-check.sh ]; then
  note "valgrind"
  run_passfail valgrind bash scripts/valgrind-check.sh
fi

if [ -x test/pg/cluster.sh ]; then
  note "PostgreSQL extension (throwaway cluster)"
  run_passfail pg bash test/pg/cluster.sh
fi

if [ -x test/docs/run.sh ]; then
  note "SQL examples of README.md and docs/*.md (test/docs)"
  run_passfail docs bash test/docs/run.sh
fi

if [ -x test/server/run.sh ]; then
  note "sync server end to end"
  run_passfail server bash test/server/run.sh
  # the server's own C under the sanitizers and memcheck, on the tests that
  # drive its threads hardest (WebSocket subscriptions, shared pulls, forged
  # cursors and site ids): the whole suite would double its time
  note "sync server under ASan+UBSan, then valgrind (a subset, ~1 min)"
  run_passfail server-asan env SANITIZE=1 bash test/server/run.sh websocket_subscriptions \
    websocket_notifications fanout_shared_pulls pull_group_exact attack_chunk_cursors \
    attack_exclude_tricks site_id_forgery gc_silent_device_resyncs websocket_subscribe_rate_limit \
    websocket_full_socket
  run_passfail server-valgrind env VALGRIND=1 bash test/server/run.sh websocket_subscriptions \
    fanout_shared_pulls
fi

if [ -x test/packages/run.sh ]; then
  note "Debian packages: build, lintian, install here, smoke test, purge (root only, ~40 s)"
  run_passfail packages bash test/packages/run.sh
fi

echo
echo "suite time: $(( $(date +%s) - start ))s"
if [ ${#failures[@]} -gt 0 ]; then
  echo "failed: ${failures[*]}"
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
