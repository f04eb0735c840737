#!/usr/bin/env bash
# bench/server_bench.sh [seconds_per_phase] [phase...] — pgsync-server
# throughput, latency and memory (see bench/server_bench.py). Loopback only;
# builds what it needs, stops everything it started.
#
# With the pushraw phase (the default runs every phase), the 50-client
# pushes are also measured on the baseline build (bench/baseline.sh: the last
# main with the global apply lock), once before and once after this build's
# bench; the target line compares this build's figure with the better of
# the two (PGSYNC_BENCH_BASELINE=0 skips it).
set -uo pipefail
cd "$(dirname "$0")/.."
. test/server/cleanup.sh
work_setup bench
test/server/build.sh "$WORK" >/dev/null || exit 1
. "$WORK/env.sh"
make -s build/pushload >/dev/null || exit 1 # pushraw's client, the same for both builds

# the last main with the global apply lock: "today's" of issue 11.4
BASE=3535751
phases=("${@:2}")
baseline=0
if [ "${PGSYNC_BENCH_BASELINE:-1}" != 0 ] &&
  { [ ${#phases[@]} = 0 ] || printf '%s\n' "${phases[@]}" | grep -qx pushraw; }; then
  mkdir -p "$WORK/baseline"
  if BENV=$(bash bench/baseline.sh "$WORK/baseline" "$BASE"); then
    baseline=1
  else
    echo "baseline build unavailable: the 50-client target is reported against serialized applies only" >&2
  fi
fi

run_baseline() { # one pushraw run of the baseline build, in a subshell with its paths
  (
    . "$BENV"
    export PGSYNC_BENCH_BASELINE=1 PGSYNC_BENCH_RESULT="$WORK/baseline.result"
    run_bg_wait /usr/bin/python3 bench/server_bench.py "${1:-5}" pushraw
  )
}

[ $baseline = 1 ] && { run_baseline "${1:-5}" || exit 1; }
PGSYNC_BENCH_RESULT="$WORK/this.result" run_bg_wait /usr/bin/python3 bench/server_bench.py "$@" || exit 1
if [ $baseline = 1 ]; then
  run_baseline "${1:-5}" || exit 1
  /usr/bin/python3 - "$WORK/baseline.result" "$WORK/this.result" "$BASE" <<'PY'
import sys
base = [float(l.split()[1]) for l in open(sys.argv[1]) if l.startswith("pushraw50")]
this = [float(l.split()[1]) for l in open(sys.argv[2]) if l.startswith("pushraw50")]
commit = sys.argv[3]
b, t = max(base), max(this)
r = t / b
print(f"\npushes/s with 50 clients (pushraw): this build {t:,.0f} /s, baseline build {commit} "
      f"(global apply lock) {b:,.0f} /s (best of its runs before and after: "
      f"{', '.join(f'{x:,.0f}' for x in base)}): {r:.2f}x; target >= 3x: {'met' if r >= 3 else 'MISSED'}")
PY
fi
