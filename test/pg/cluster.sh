#!/usr/bin/env bash
# test/pg/cluster.sh — the PostgreSQL side of the test suite.
#
#   bash test/pg/cluster.sh          build + install pg_ext, start a throwaway
#                                    cluster, run pg_regress and the python
#                                    tests, stop the cluster (even on failure)
#   bash test/pg/cluster.sh bench    same cluster, run bench/pg_bench.py,
#                                    bench/pg_bench_apply.py and
#                                    bench/pg_bench_pull.py (bench-pull: only that)
#   bash test/pg/cluster.sh shell    start a cluster and open psql on it
#   bash test/pg/cluster.sh run CMD  start a cluster, run CMD with PGHOST, PGPORT,
#                                    PGUSER set, stop it; exit with CMD's status
#
# The server is a private copy of /usr/lib/postgresql/15 (scripts/pg-tree.sh);
# SYS_PG_CONFIG=/usr/lib/postgresql/N/bin/pg_config copies another installed
# major version instead, PG_CONFIG=... uses an installation as it is
# (scripts/test-pg-matrix.sh runs the suite against 15 to 18).
#
# The cluster runs as the postgres user (Postgres refuses root) on a socket in
# a private /tmp directory, no TCP. Prints "PASS name" / "FAIL name" per test
# and a closing "N passed, N failed"; exits non-zero when anything failed.
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
MODE=${1:-test}
# a private copy of PostgreSQL with this checkout's extension (scripts/pg-tree.sh),
# unless PG_CONFIG names another installation
if [ -z "${PG_CONFIG:-}" ]; then
	PG_CONFIG=$(PG_TREE_NO_INSTALL=1 bash "$ROOT/scripts/pg-tree.sh") || exit 1
fi
PGBIN=$($PG_CONFIG --bindir)
PY=${PYTHON:-/usr/bin/python3}
PORT=${PGSYNC_TEST_PORT:-$((55000 + RANDOM % 2000))}
DIR=$(mktemp -d /tmp/pgsync-pg.XXXXXX)
chmod 755 "$DIR"
passed=0
failed=0

as_pg() {
	if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

result() {					# result NAME STATUS
	if [ "$2" = 0 ]; then
		echo "PASS $1"; passed=$((passed + 1))
	else
		echo "FAIL $1"; failed=$((failed + 1))
	fi
}

stop() {
	as_pg "$PGBIN/pg_ctl" -D "$DIR/data" -m immediate -w stop >/dev/null 2>&1
	if [ "$failed" != 0 ] && [ -f "$DIR/server.log" ]; then
		echo "--- last lines of the server log ---"
		tail -n 30 "$DIR/server.log" | cut -c1-300
	fi
	rm -rf "$DIR"
}
trap stop EXIT

[ "$(id -u)" = 0 ] && chown postgres "$DIR"

# build and install the extension
if ! make -s -C "$ROOT/pg_ext" PG_CONFIG="$PG_CONFIG" >"$DIR/build.log" 2>&1 ||
   ! make -s -C "$ROOT/pg_ext" PG_CONFIG="$PG_CONFIG" install >>"$DIR/build.log" 2>&1; then
	cat "$DIR/build.log"
	result build 1
	echo "$passed passed, $failed failed"
	exit 1
fi
result build 0

if ! as_pg "$PGBIN/initdb" -D "$DIR/data" -A trust -U postgres -E UTF8 --locale=C.UTF-8 \
		--no-sync >"$DIR/initdb.log" 2>&1; then
	cat "$DIR/initdb.log"; result initdb 1; echo "$passed passed, $failed failed"; exit 1
fi
cat >>"$DIR/data/postgresql.conf" <<EOF
port = $PORT
listen_addresses = ''
unix_socket_directories = '$DIR'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 40
shared_buffers = 256MB
max_wal_size = 2GB
deadlock_timeout = 200ms
log_min_messages = warning
log_min_error_statement = panic
log_checkpoints = off
EOF
if ! as_pg "$PGBIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w start >/dev/null 2>&1; then
	cat "$DIR/server.log"; result start 1; echo "$passed passed, $failed failed"; exit 1
fi

export PGHOST="$DIR" PGPORT="$PORT" PGUSER=postgres PGDATABASE=postgres
echo "server: $("$PGBIN/postgres" --version)"
export PGSYNC_ROOT="$ROOT" PGSYNC_PGBIN="$PGBIN"

case "$MODE" in
run)
	shift
	"$@"
	exit $?
	;;
shell)
	echo "cluster: PGHOST=$PGHOST PGPORT=$PGPORT (exit psql to stop it)"
	"$PGBIN/psql"
	exit 0
	;;
bench | bench-pull)
	rc=0
	if [ "$MODE" = bench ]; then
		"$PY" "$ROOT/bench/pg_bench.py" || rc=$?
		result bench $rc
		echo
		"$PY" "$ROOT/bench/pg_bench_apply.py" || rc=$?
		result bench-apply $rc
		echo
	fi
	"$PY" "$ROOT/bench/pg_bench_pull.py" || rc=$?
	result bench-pull $rc
	echo "$passed passed, $failed failed"
	exit $rc
	;;
esac

# pg_regress: one line per test. Its expected output holds pulls and GC runs
# whose until is the snapshot's xmin - 1, which any transaction holding an
# older xid holds back: no autovacuum (an autoanalyze takes one) meanwhile
"$PGBIN/psql" -qAt -c "ALTER SYSTEM SET autovacuum = off" -c "SELECT pg_reload_conf()" >/dev/null
make -C "$ROOT/pg_ext" PG_CONFIG="$PG_CONFIG" installcheck >"$DIR/regress.log" 2>&1
rc=$?
while read -r line; do
	name=$(echo "$line" | sed -nE 's/^(ok|not ok)[^-]*- ([a-z_0-9]+).*/\2/p; s/^test ([a-z_0-9]+) +\.\.\. (ok|FAILED|failed).*/\1/p')
	[ -z "$name" ] && continue
	if echo "$line" | grep -qE '^ok|\.\.\. ok'; then result "regress/$name" 0; else result "regress/$name" 1; fi
done < <(grep -E '^(ok|not ok)|^test .* \.\.\. ' "$DIR/regress.log")
if [ $rc != 0 ]; then
	result regress 1
	[ -f "$ROOT/pg_ext/regression.diffs" ] && head -n 80 "$ROOT/pg_ext/regression.diffs"
fi

"$PGBIN/psql" -qAt -c "ALTER SYSTEM RESET autovacuum" -c "SELECT pg_reload_conf()" >/dev/null

# python tests (Debian's python3 has psycopg2 and sqlite3 with extension loading)
for t in "$ROOT"/test/pg/test_*.py; do
	name=$(basename "$t" .py)
	if timeout 600 "$PY" "$t" >"$DIR/$name.log" 2>&1; then
		result "$name" 0
		grep -E '^SKIP' "$DIR/$name.log"	# a test that could not run all its parts says so
	else
		result "$name" 1
		tail -n 40 "$DIR/$name.log"
	fi
done

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
