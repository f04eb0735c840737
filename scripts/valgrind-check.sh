#!/usr/bin/env bash
# scripts/valgrind-check.sh — memcheck on the real extension (sqlite3 shell
# running a sync scenario) and on the core unit tests built without ASan.
# Prints PASS/FAIL per check.
set -u
cd "$(dirname "$0")/.."
VG="valgrind --quiet --leak-check=full --show-leak-kinds=definite,indirect --errors-for-leak-kinds=definite,indirect --error-exitcode=99"
D=$(mktemp -d /tmp/pgsync-vg-XXXXXX)
trap 'rm -rf "$D"' EXIT
EXT="$PWD/build/sqlitesync"

check() {  # check NAME CMD...
  local name=$1; shift
  if "$@" >"$D/$name.log" 2>&1; then echo "PASS valgrind $name"; else echo "FAIL valgrind $name"; tail -40 "$D/$name.log"; fi
}

cat >"$D/a.sql" <<SQL
.load $EXT
CREATE TABLE t(id TEXT PRIMARY KEY NOT NULL, a TEXT, b INTEGER, c REAL, d BLOB);
CREATE TABLE g(k BLOB PRIMARY KEY, v TEXT) WITHOUT ROWID;
SELECT sync_init('t'); SELECT sync_init('g', 'gset');
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 500)
INSERT INTO t SELECT sync_uuid(), 'row ' || i, i, i * 0.5, randomblob(i % 40) FROM n;
INSERT INTO g VALUES (x'01', 'one'), (x'02', 'two');
UPDATE t SET a = a || '!' WHERE b % 3 = 0;
DELETE FROM t WHERE b % 7 = 0;
INSERT OR REPLACE INTO t(id, a, b) SELECT id, 'replaced', -b FROM t WHERE b % 11 = 0;
SELECT writefile('$D/a.bin', sync_payload(0));
SELECT length(sync_payload_info(sync_payload(0))) > 0;
-- tombstone GC (sl_gc.c): collect, then re-insert collected keys above the floor
SELECT json_extract(sync_gc(sync_db_version()), '$.collected') > 0;
INSERT INTO t(id, a, b) VALUES ('gc-1', 'x', 1);
DELETE FROM t WHERE id = 'gc-1';
SELECT sync_gc(sync_db_version());
INSERT INTO t(id, a, b) VALUES ('gc-1', 'again', 2);
SELECT cl > 2 FROM t__sync_clock WHERE id = 'gc-1';
SQL
cat >"$D/b.sql" <<SQL
.load $EXT
CREATE TABLE t(id TEXT PRIMARY KEY NOT NULL, a TEXT, b INTEGER, c REAL, d BLOB);
CREATE TABLE g(k BLOB PRIMARY KEY, v TEXT) WITHOUT ROWID;
SELECT sync_init('t'); SELECT sync_init('g', 'gset');
SELECT sync_apply_payload(readfile('$D/a.bin'));
SELECT sync_apply_payload(readfile('$D/a.bin'));
UPDATE t SET b = b + 1;
SELECT length(sync_payload(0, '00000000-0000-7000-8000-000000000000')) > 0;
SELECT sync_apply_payload(x'00');
SELECT sync_apply_payload(substr(readfile('$D/a.bin'), 1, 100));
SQL
check sqlite-scenario-a $VG sqlite3 -bail "$D/a.db" ".read $D/a.sql"
# b.sql ends with an intentional error (truncated payload): expect exit 1 from
# sqlite3 but no valgrind error (exit 99)
vg_b() { $VG sqlite3 "$D/b.db" ".read $D/b.sql"; [ $? -ne 99 ]; }
check sqlite-scenario-b vg_b

for src in test/test_*.c; do
  [ -f "$src" ] || continue
  name=$(basename "$src" .c)
  bin="build/plain/$name"
  if make -s "$bin" >"$D/build-$name.log" 2>&1; then
    check "$name" env PGS_ITER=20 $VG "$bin"
  else
    echo "FAIL valgrind build $name"; tail -20 "$D/build-$name.log"
  fi
done
