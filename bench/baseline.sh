#!/usr/bin/env bash
# bench/baseline.sh WORKDIR COMMIT — build the pushes' baseline for `make
# bench`: the checkout of COMMIT, which server_bench.sh names (3535751, the
# last main with the global apply lock: issue 11.4 asks for ">= 3x today's
# pushes/s with 50 clients, same machine, same run", and that commit is
# "today's" push path, lock, round trips and all). Its own
# test/server/build.sh builds its pg_ext into its own PostgreSQL tree, its
# server and its SQLite extension, and writes WORKDIR/env.sh, which this
# script prints. The source comes from this repository's history (git
# archive) into build/baseline-COMMIT, kept between runs. Exits non-zero
# (and prints why on stderr) when the history or the build is not there;
# the bench then reports the target against serialized applies only.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:?usage: baseline.sh WORKDIR COMMIT}
BASE=${2:?usage: baseline.sh WORKDIR COMMIT}
SRC=$PWD/build/baseline-$BASE
if ! git cat-file -e "$BASE^{commit}" 2>/dev/null; then
  echo "baseline: commit $BASE is not in this checkout's history" >&2
  exit 1
fi
if [ ! -f "$SRC/test/server/build.sh" ]; then
  rm -rf "$SRC"
  mkdir -p "$SRC"
  git archive "$BASE" | tar -x -C "$SRC"
fi
if ! bash "$SRC/test/server/build.sh" "$WORK" >/dev/null 2>"$WORK/baseline-build.err"; then
  echo "baseline: building $BASE failed:" >&2
  tail -n 20 "$WORK/baseline-build.err" >&2
  exit 1
fi
echo "$WORK/env.sh"
