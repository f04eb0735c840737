# test/server/cleanup.sh — sourced by run.sh, bench and demo: `work_setup`
# makes WORK and installs a trap that, whatever happens, stops what was
# started under it (server pids recorded in WORK/pids, Postgres clusters in
# WORK/*/pgdata) and removes it.
RUNNER=
work_cleanup() {
  if [ -n "$RUNNER" ]; then kill "$RUNNER" 2>/dev/null; wait "$RUNNER" 2>/dev/null; fi
  # WORK/baseline is the bench's second build (bench/baseline.sh)
  for f in "$WORK/pids" "$WORK/baseline/pids"; do
    [ -f "$f" ] || continue
    while read -r pid; do kill -9 "$pid" 2>/dev/null; done < "$f"
  done
  for d in "$WORK"/*/pgdata "$WORK"/baseline/*/pgdata; do
    [ -f "$d/postmaster.pid" ] &&
      runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_ctl -D "$d" -m immediate stop >/dev/null 2>&1
  done
  rm -rf "$WORK"
}
work_setup() {
  WORK=$(mktemp -d "/tmp/pgsync-$1-XXXXXX")
  chmod 755 "$WORK"
  trap work_cleanup EXIT
  trap 'exit 130' INT TERM
}
# run_bg_wait CMD...: run CMD in the background (so the trap can stop it) and wait
run_bg_wait() {
  "$@" &
  RUNNER=$!
  wait "$RUNNER"
  local rc=$?
  RUNNER=
  return $rc
}
