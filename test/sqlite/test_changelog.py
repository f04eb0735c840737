"""The change log of the SQLite extension (sqlite_ext/sl_log.c): incremental
pulls read a partial index on the clock table's ver (rows of small
transactions, and everything sync_apply_payload writes) and bulk markers
(rows of transactions that captured more than 256 rows of a table).

The oracle of every test: a pull since S carries exactly the rows whose clock
row has ver > S, each once (what the scan of the clock table used to read),
and replicas that pull incrementally converge. Savepoint rollbacks, two
connections, marker coalescing, the fallback to a scan and the migration of a
clock table made before the change log are covered.
"""
import random
import sqlite3

import pytest

import payload_codec
import synclib

BULK = 256  # SL_LOG_ROWS in sl_internal.h


def qi(name):
    return synclib.qi(name)


def pulled_keys(r, since, table="t", max_rows=None):
    """the keys of table in a pull since (duplicates kept), decoded with the
    independent reader of payload_codec.py: sorted, or, for a chunked pull
    (max_rows), in the order the chunks carried them."""
    keys = []
    cursor = None
    while True:
        if max_rows is None:
            p = r.one("SELECT sync_payload(?)", since)
        else:
            p = r.one("SELECT sync_payload(?, NULL, ?, ?)", since, max_rows, cursor)
        if p is None:
            break
        _, body = payload_codec.decode(p)
        keys += [tuple(v for _, v in g.pk) for g in body.rows
                 if body.tables[g.table].name == table]
        if max_rows is None:
            break
        cursor = r.one("SELECT sync_payload_cursor(?)", p)
        if cursor is None:
            break
    return keys if max_rows is not None else sorted(keys, key=repr)


def expected_keys(r, since, table="t", ordered=False):
    """the keys of the clock rows with ver > since: sorted, or in the clock
    table's key order."""
    cols = [c[1] for c in sorted(r.q(f"PRAGMA table_info({qi(table)})"), key=lambda c: c[5])
            if c[5]]
    sel = ", ".join(qi(c) for c in cols)
    keys = [tuple(x) for x in r.q(
        f"SELECT {sel} FROM {qi(table + '__sync_clock')} WHERE ver > ? ORDER BY {sel}", since)]
    return keys if ordered else sorted(keys, key=repr)


def check_pulls(r, versions, table="t"):
    """every since in versions: the log-based pull reads what a scan would."""
    for s in versions:
        assert pulled_keys(r, s, table) == expected_keys(r, s, table), f"since {s}"


def indexed(r, table="t"):
    return r.one(f"SELECT count(*) FROM {qi(table + '__sync_clock')} "
                 f"INDEXED BY {qi(table + '__sync_clock_ver')} WHERE ver > 0 AND ver <> bulkver")


def markers(r, table="t"):
    return r.q(f"SELECT * FROM {qi(table + '__sync_bulk')} ORDER BY ver")


@pytest.fixture
def a(replica):
    r = replica("a")
    r.xs("CREATE TABLE t(id TEXT PRIMARY KEY NOT NULL, v INTEGER, w TEXT)")
    r.init("t")
    return r


def insert(r, keys, v=0):
    r.conn.executemany("INSERT INTO t VALUES(?, ?, 'w')", ((k, v) for k in keys))


def test_layout(a):
    objs = dict(a.q("SELECT name, sql FROM sqlite_schema WHERE name LIKE 't__sync%'"))
    assert "bulkver INTEGER NOT NULL DEFAULT 0" in objs["t__sync_clock"]
    assert "COLLATE" not in objs["t__sync_clock"]  # BINARY is left implicit
    assert objs["t__sync_clock_ver"].endswith("(ver) WHERE ver <> bulkver")
    assert "t__sync_bulk" in objs
    assert a.one("SELECT count(*) FROM pragma_table_info('sync_state') WHERE name = 'seq'") == 1


def test_small_transactions_are_indexed(a):
    insert(a, [f"k{i}" for i in range(10)])
    v = a.version()
    a.x("UPDATE t SET v = 1 WHERE id = 'k3'")
    a.x("DELETE FROM t WHERE id = 'k4'")
    assert indexed(a) == 10 and markers(a) == []
    assert pulled_keys(a, v) == [("k3",), ("k4",)]
    check_pulls(a, range(a.version() + 1))


def test_bulk_transaction_ascending_keys(a):
    a.x("BEGIN")
    insert(a, [f"k{i:05d}" for i in range(1000)])
    a.x("COMMIT")
    v = a.version()
    assert indexed(a) == BULK
    assert markers(a) == [(v, f"k{BULK:05d}")]
    assert a.one("SELECT count(*) FROM t__sync_clock WHERE ver = bulkver") == 1000 - BULK
    a.x("UPDATE t SET v = 7 WHERE id = 'k00500'")  # small transaction: indexed again
    assert pulled_keys(a, v) == [("k00500",)]
    check_pulls(a, range(a.version() + 1))


def test_bulk_transaction_descending_keys_covers_every_key(a):
    a.x("BEGIN")
    insert(a, [f"k{i:05d}" for i in reversed(range(1000))])
    a.x("COMMIT")
    (m,) = markers(a)
    assert m[1] is None  # widened too often: the marker covers every key
    check_pulls(a, range(a.version() + 1))


def test_bulk_transaction_random_keys_and_updates(a):
    rnd = random.Random(7)
    keys = [f"{rnd.getrandbits(64):016x}" for _ in range(2000)]
    a.x("BEGIN")
    insert(a, keys)
    a.x("COMMIT")
    a.x("BEGIN")
    a.x("UPDATE t SET v = v + 1")  # every row: bulk mode again
    a.x("COMMIT")
    a.x("BEGIN")
    a.x("DELETE FROM t WHERE id < '8'")
    a.x("COMMIT")
    check_pulls(a, range(a.version() + 1))


def test_incremental_pulls_match_a_scan_and_converge(replica):
    """random mixes of small and bulk transactions, inserts, updates, deletes
    and re-inserts on two tables (one with a composite NOCASE key); a second
    replica pulls incrementally after each transaction."""
    a, b = replica("a"), replica("b")
    for r in (a, b):
        r.xs("CREATE TABLE t(id TEXT PRIMARY KEY NOT NULL, v INTEGER, w TEXT);"
             "CREATE TABLE u(g TEXT COLLATE NOCASE NOT NULL, n INTEGER NOT NULL, x,"
             " PRIMARY KEY(g, n));")
        r.init("t")
        r.init("u")
    rnd = random.Random(20261201)
    versions = [0]
    for step in range(30):
        n = rnd.choice([1, 3, 20, 300, 700])
        a.x("BEGIN")
        for _ in range(n):
            k = f"k{rnd.randrange(3000):04d}"
            op = rnd.random()
            if op < 0.6:
                a.x("INSERT INTO t VALUES(?, ?, 'w') ON CONFLICT DO UPDATE SET v = excluded.v",
                    k, rnd.randrange(100))
            elif op < 0.8:
                a.x("DELETE FROM t WHERE id = ?", k)
            else:
                a.x("INSERT OR REPLACE INTO u VALUES(?, ?, ?)",
                    rnd.choice(["a", "B", "c", "D"]) * rnd.randrange(1, 4), rnd.randrange(50),
                    rnd.random())
        a.x("COMMIT")
        versions.append(a.version())
        synclib.sync(a, b)
        assert synclib.table_rows(a, "t") == synclib.table_rows(b, "t")
        assert synclib.table_rows(a, "u") == synclib.table_rows(b, "u")
    for table in ("t", "u"):
        check_pulls(a, versions, table)
        for s in versions[::5]:
            assert pulled_keys(a, s, table, max_rows=97) == expected_keys(a, s, table, True)
    assert synclib.integrity(a) == ["ok"]


def test_savepoint_rollback_of_a_marker(a):
    a.x("BEGIN")
    insert(a, [f"m{i:04d}" for i in range(BULK)])  # indexed
    a.x("SAVEPOINT s")
    insert(a, [f"n{i:04d}" for i in range(100)])  # bulk: the marker is written
    a.x("ROLLBACK TO s")
    a.x("RELEASE s")
    # capture saw that something it wrote was undone: it counts again, so the
    # next rows are indexed, and once past the limit it writes a new marker
    insert(a, [f"o{i:04d}" for i in range(BULK + 100)])
    a.x("COMMIT")
    assert markers(a) == [(a.version(), f"o{BULK:04d}")]
    assert a.one("SELECT count(*) FROM t__sync_clock WHERE ver = bulkver") == 100
    check_pulls(a, range(a.version() + 1))
    assert a.one("SELECT count(*) FROM t") == 2 * BULK + 100


def test_savepoint_rollback_of_a_widening(a):
    a.x("BEGIN")
    insert(a, [f"m{i:04d}" for i in range(BULK + 10)])  # marker lo = m0256
    a.x("SAVEPOINT s")
    insert(a, ["a0001"])  # widens lo to a0001 ...
    a.x("ROLLBACK TO s")  # ... undone
    a.x("RELEASE s")
    insert(a, ["a0002", "b0000"])  # must widen again
    a.x("COMMIT")
    check_pulls(a, range(a.version() + 1))
    assert ("a0002",) in pulled_keys(a, a.version() - 1)


def test_savepoint_rollback_of_the_version_bump(a):
    insert(a, ["x"])
    a.x("BEGIN")
    a.x("SAVEPOINT s")
    insert(a, [f"k{i:04d}" for i in range(BULK + 50)])
    a.x("ROLLBACK TO s")
    a.x("RELEASE s")
    insert(a, [f"j{i:04d}" for i in range(BULK + 50)])
    a.x("COMMIT")
    v = a.version()
    assert a.one("SELECT count(*) FROM t__sync_clock WHERE ver = ?", v) == BULK + 50
    check_pulls(a, range(v + 1))


def test_two_connections(replica, tmp_path):
    a, b = replica("a"), replica("b")
    for r in (a, b):
        r.xs("CREATE TABLE t(id TEXT PRIMARY KEY NOT NULL, v INTEGER, w TEXT)")
        r.init("t")
    a2 = synclib.Replica(a.path, "a2")
    try:
        versions = [0]
        for i in range(6):
            for k, (r, n) in enumerate(((a, 5), (a2, 400), (a2, 2), (a, 300))):
                r.x("BEGIN IMMEDIATE")
                insert(r, [f"{i}-{k}-{j:04d}" for j in range(n)], v=i)
                r.x("UPDATE t SET v = v + 1 WHERE id LIKE ?", f"{i}-%-000%")
                r.x("COMMIT")
                versions.append(a.version())
            synclib.sync(a, b)
        assert synclib.table_rows(a, "t") == synclib.table_rows(b, "t")
        assert a.one("SELECT count(*) FROM t") == 6 * 707
        check_pulls(a, versions)
        check_pulls(a2, versions)
    finally:
        a2.close()


def test_markers_are_coalesced(a):
    for i in range(80):
        a.x("BEGIN")
        insert(a, [f"{i:03d}-{j:04d}" for j in range(BULK + 5)])
        a.x("COMMIT")
    assert len(markers(a)) <= 65  # SL_LOG_MARKS + the newest
    check_pulls(a, range(0, a.version() + 1, 7))


def test_many_indexed_changes_pull_by_scan(replica):
    """sync_apply_payload indexes every row it writes; above 20,000 indexed
    changes a pull scans the clock table instead (the same rows)."""
    a, b = replica("a"), replica("b")
    for r in (a, b):
        r.xs("CREATE TABLE t(id TEXT PRIMARY KEY NOT NULL, v INTEGER, w TEXT)")
        r.init("t")
    a.x("BEGIN")
    insert(a, [f"k{i:05d}" for i in range(25000)])
    a.x("COMMIT")
    insert(b, ["b-row"])
    v = b.version()
    synclib.sync(a, b)
    assert indexed(b) == 25001
    assert pulled_keys(b, v) == expected_keys(b, v)
    b.x("UPDATE t SET v = 3 WHERE id = 'k00007'")
    assert pulled_keys(b, b.version() - 1) == [("k00007",)]


def test_wide_table_update_uses_masks(replica):
    a, b = replica("a"), replica("b")
    cols = ", ".join(f"c{i} INTEGER" for i in range(70))
    for r in (a, b):
        r.xs(f"CREATE TABLE w(id TEXT PRIMARY KEY NOT NULL, {cols})")
        r.init("w")
    trig = a.one("SELECT sql FROM sqlite_schema WHERE name = 'w__sync_upd'")
    assert "sqlitesync_capture(1, 7," in trig  # masks: 70 pairs exceed 127 arguments
    a.x("INSERT INTO w(id) VALUES('r')")
    synclib.sync(a, b)
    v = a.version()
    a.x("UPDATE w SET c65 = 5, c1 = 2 WHERE id = 'r'")
    p = a.payload(v)
    assert sorted(ch["column"] for ch in a.info(p)["rows"][0]["changes"]) == ["c1", "c65"]
    synclib.sync(a, b)
    assert synclib.table_rows(a, "w") == synclib.table_rows(b, "w")


def test_missing_clock_row_is_recreated(a):
    insert(a, ["k1", "k2"])
    a.x("DELETE FROM t__sync_clock WHERE id IN ('k1', 'k2')")
    a.x("UPDATE t SET v = 4 WHERE id = 'k1'")  # no clock row: a new life
    a.x("DELETE FROM t WHERE id = 'k2'")  # no clock row: a tombstone
    assert a.q("SELECT id, cl FROM t__sync_clock ORDER BY id") == [("k1", 1), ("k2", 2)]
    check_pulls(a, range(a.version() + 1))


LEGACY = [
    # the layout of the clock table and triggers before the change log
    'DROP TRIGGER t__sync_ins', 'DROP TRIGGER t__sync_upd', 'DROP TRIGGER t__sync_del',
    'DROP TABLE t__sync_bulk', 'DROP INDEX t__sync_clock_ver',
    'CREATE TABLE old("id" TEXT COLLATE BINARY NOT NULL, cl INTEGER NOT NULL, ver INTEGER NOT '
    'NULL, clk BLOB NOT NULL, PRIMARY KEY("id")) WITHOUT ROWID',
    'INSERT INTO old SELECT id, cl, ver, clk FROM t__sync_clock',
    'DROP TABLE t__sync_clock', 'ALTER TABLE old RENAME TO t__sync_clock',
    'ALTER TABLE sync_state DROP COLUMN seq',
    'CREATE TRIGGER "t__sync_ins" AFTER INSERT ON "t" BEGIN SELECT sqlitesync_capture(1, 1, 2, '
    'NEW."id"); END',
    'CREATE TRIGGER "t__sync_del" AFTER DELETE ON "t" BEGIN SELECT sqlitesync_capture(1, 3, 2, '
    'OLD."id"); END',
    'CREATE TRIGGER "t__sync_upd" AFTER UPDATE ON "t" BEGIN SELECT sqlitesync_capture(1, 2, 2, '
    '(OLD."id" IS NOT NEW."id" COLLATE BINARY OR typeof(OLD."id") <> typeof(NEW."id")), OLD."id",'
    ' NEW."id", 0 | (((OLD."v" IS NOT NEW."v" COLLATE BINARY OR typeof(OLD."v") <> '
    'typeof(NEW."v"))) << 0) | (((OLD."w" IS NOT NEW."w" COLLATE BINARY OR typeof(OLD."w") <> '
    'typeof(NEW."w"))) << 1)); END',
]


def test_legacy_layout_keeps_working_and_is_migrated(replica):
    a, b = replica("a"), replica("b")
    for r in (a, b):
        r.xs("CREATE TABLE t(id TEXT PRIMARY KEY NOT NULL, v INTEGER, w TEXT)")
        r.init("t")
    insert(a, [f"k{i}" for i in range(20)])
    a.x("BEGIN")
    for sql in LEGACY:
        a.x(sql)
    a.x("COMMIT")
    a.close()
    a = replica("a")  # a new connection: the database as the previous version left it
    v = a.version()
    a.x("UPDATE t SET v = 9 WHERE id = 'k3'")
    insert(a, ["new"])
    assert pulled_keys(a, v) == [("k3",), ("new",)]  # scans the legacy clock table
    synclib.sync(a, b)
    assert a.init("t") == 1  # migrates
    test_layout(a)
    assert a.q("SELECT id, cl, ver FROM t__sync_clock WHERE id IN ('k3', 'new') ORDER BY id") == \
        [("k3", 1, v + 1), ("new", 1, v + 2)]
    v2 = a.version()
    a.x("UPDATE t SET w = 'x' WHERE id = 'k5'")
    assert pulled_keys(a, v2) == [("k5",)]
    check_pulls(a, range(a.version() + 1))
    synclib.sync(a, b)
    assert synclib.table_rows(a, "t") == synclib.table_rows(b, "t")
    assert synclib.integrity(a) == ["ok"]


def test_blob_and_integer_keys_in_bulk(replica):
    a, b = replica("a"), replica("b")
    for r in (a, b):
        r.xs("CREATE TABLE k(id BLOB PRIMARY KEY NOT NULL, v);"
             "CREATE TABLE n(id INT NOT NULL PRIMARY KEY, v) WITHOUT ROWID;")
        r.init("k")
        r.init("n")
    rnd = random.Random(3)
    versions = [0]
    for _ in range(4):
        a.x("BEGIN")
        a.conn.executemany("INSERT OR REPLACE INTO k VALUES(?, ?)",
                           ((rnd.randbytes(rnd.randrange(0, 9)), i) for i in range(400)))
        a.conn.executemany("INSERT OR REPLACE INTO n VALUES(?, ?)",
                           ((rnd.randrange(-10**12, 10**12), i) for i in range(400)))
        a.x("COMMIT")
        versions.append(a.version())
        synclib.sync(a, b)
    for table in ("k", "n"):
        check_pulls(a, versions, table)
        assert synclib.table_rows(a, table) == synclib.table_rows(b, table)


CRASH = """
import os, sys
sys.path.insert(0, {here!r})
import synclib
r = synclib.Replica({path!r})
r.x("BEGIN")
r.conn.executemany("INSERT INTO t VALUES(?, 0, 'w')", ((f"c{{i:04d}}",) for i in range(600)))
if {commit}:
    r.x("COMMIT")
    r.x("BEGIN")
    r.conn.executemany("INSERT INTO t VALUES(?, 0, 'w')", ((f"d{{i:04d}}",) for i in range(600)))
os._exit(3)  # no commit, no close: what a crash leaves
"""


@pytest.mark.parametrize("commit", [False, True])
def test_crash_mid_transaction(a, commit):
    import os
    import subprocess
    import sys

    insert(a, ["before"])
    v = a.version()
    code = CRASH.format(here=os.path.dirname(__file__), path=str(a.path), commit=commit)
    assert subprocess.run([sys.executable, "-c", code]).returncode == 3
    a.close()
    a = synclib.Replica(a.path, "a")
    try:
        assert a.one("SELECT count(*) FROM t") == 1 + (600 if commit else 0)
        assert [m[0] for m in markers(a)] == ([v + 1] if commit else [])
        assert synclib.integrity(a) == ["ok"]
        check_pulls(a, range(a.version() + 1))
        insert(a, ["after"])
        assert pulled_keys(a, a.version() - 1) == [("after",)]
    finally:
        a.close()
