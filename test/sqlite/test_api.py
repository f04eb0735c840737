"""test_api — every sync_* SQL function of sqlitesync, called the way users
call it: exact results, exact error messages (with their SQLite error code),
calls before sync_init, NULL and wrong-type arguments, awkward identifiers,
injection attempts through names, composite/BLOB/NOCASE keys, WITHOUT ROWID,
sync_cleanup, and ALTER TABLE ADD COLUMN followed by sync_init.
"""
import ctypes
import json
import os
import re
import sqlite3

import pytest

import payload_codec as pc
import synclib
from synclib import dump, sync, table_rows

UUID7 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
NOT_INIT = "{}: sync is not initialized in this database. Call sync_init('table') first."
NOT_BLOB = "{}: the payload must be a BLOB (got {}); pass the value returned by sync_payload"
BAD_SINCE = ("sync_payload: since must be a non-negative integer (0 for everything, "
             "or the value of sync_payload_until of the last payload)")
BAD_EXCLUDE = "sync_payload: exclude_site must be a site id as returned by sync_site_id()"


def error(conn, sql, *args):
    """error runs sql, which must fail, and returns (message, SQLite error name)."""
    conn = getattr(conn, "conn", conn)
    with pytest.raises(sqlite3.Error) as ei:
        conn.execute(sql, args).fetchall()
    return str(ei.value), ei.value.sqlite_errorname


def one(conn, sql, *args):
    conn = getattr(conn, "conn", conn)
    return conn.execute(sql, args).fetchone()[0]


@pytest.fixture
def db(replica):
    """db: one replica with table t(id TEXT PRIMARY KEY, a, b) synced."""
    r = replica("db")
    r.x("CREATE TABLE t(id TEXT PRIMARY KEY, a, b)")
    assert r.init("t") == 1
    return r


@pytest.fixture
def pair(replica):
    """pair(schema, *tables): two replicas with the same schema, tables synced."""
    def make(schema, *tables, algo=None):
        out = []
        for name in ("a", "b"):
            r = replica(name)
            r.xs(schema)
            for t in tables:
                assert r.init(t, algo) == 1
            out.append(r)
        return out
    return make


# ---- functions that need no sync_init --------------------------------------


def test_version_matches_core_header(conn):
    header = (synclib.REPO / "core" / "pgsync.h").read_text()
    want = re.search(r'#define PGS_VERSION "([^"]+)"', header).group(1)
    assert one(conn, "SELECT sync_version()") == want
    assert one(conn, "SELECT typeof(sync_version())") == "text"


def test_uuid_is_v7_unique_and_time_ordered(conn):
    ids = [r[0] for r in conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000) "
        "SELECT sync_uuid() FROM n")]
    assert all(UUID7.match(u) for u in ids), ids[:3]
    assert len(set(ids)) == len(ids)
    ms = [int(u.replace("-", "")[:12], 16) for u in ids]
    assert ms == sorted(ms)
    import time
    assert abs(ms[-1] - time.time() * 1000) < 60_000


def test_uuid_usable_as_column_default(replica):
    r = replica("r")
    r.x("CREATE TABLE t(id TEXT PRIMARY KEY DEFAULT (sync_uuid()), v)")
    r.init("t")
    r.x("INSERT INTO t(v) VALUES (1), (2), (3)")
    ids = [x[0] for x in r.q("SELECT id FROM t")]
    assert len(set(ids)) == 3 and all(UUID7.match(i) for i in ids)


@pytest.mark.parametrize("fn, sql", [
    ("sync_site_id", "SELECT sync_site_id()"),
    ("sync_db_version", "SELECT sync_db_version()"),
    ("sync_payload", "SELECT sync_payload(0)"),
    ("sync_payload", "SELECT sync_payload(0, NULL)"),
    ("sync_apply_payload", "SELECT sync_apply_payload(x'00')"),
    ("sync_cleanup", "SELECT sync_cleanup('t')"),
])
def test_needs_sync_init(conn, fn, sql):
    conn.execute("CREATE TABLE t(id TEXT PRIMARY KEY, a)")
    before = dump(conn)
    assert error(conn, sql) == (NOT_INIT.format(fn), "SQLITE_ERROR")
    assert dump(conn) == before     # the failed call created nothing


def test_pure_functions_work_before_sync_init(replica):
    src = replica("src")
    src.x("CREATE TABLE t(id TEXT PRIMARY KEY, a)")
    src.init("t")
    src.x("INSERT INTO t VALUES ('k', 1)")
    p = src.payload(0)
    fresh = replica("fresh")
    assert one(fresh, "SELECT sync_payload_until(?)", p) == 1
    assert json.loads(one(fresh, "SELECT sync_payload_info(?)", p))["rows"][0]["key"] == ["k"]
    assert one(fresh, "SELECT count(*) FROM sqlite_schema") == 0


def test_wrong_payload_type_is_checked_before_init(conn):
    assert error(conn, "SELECT sync_apply_payload('x')") == (
        NOT_BLOB.format("sync_apply_payload", "TEXT"), "SQLITE_ERROR")


# ---- sync_site_id, sync_db_version -------------------------------------------


def test_site_id_is_stable_and_per_database(replica, tmp_path):
    a, b = replica("a"), replica("b")
    for r in (a, b):
        r.x("CREATE TABLE t(id TEXT PRIMARY KEY, a)")
        r.init("t")
    sa = a.site()
    assert UUID7.match(sa) and sa != b.site()
    a.close()
    again = synclib.Replica(tmp_path / "a.db", "a2")
    assert again.site() == sa
    assert one(again, "SELECT sync_site_id() = sync_site_id()") == 1
    again.x("INSERT INTO t VALUES ('k', 1)")
    p = again.payload(0)
    assert pc.header(p).origin == pc.uuid_bytes(sa)
    again.close()


def test_db_version_counts_writing_transactions(db):
    assert db.version() == 0
    db.x("INSERT INTO t VALUES ('a', 1, 1)")
    assert db.version() == 1
    db.x("BEGIN")
    db.x("INSERT INTO t VALUES ('b', 1, 1)")
    db.x("UPDATE t SET a = 2")
    db.x("DELETE FROM t WHERE id = 'a'")
    db.x("COMMIT")
    assert db.version() == 2
    db.x("SELECT * FROM t")
    db.x("DELETE FROM t WHERE id = 'nope'")
    assert db.version() == 2
    db.x("UPDATE t SET a = a")          # no column changes: may take a version, sends nothing
    v = db.version()
    assert v in (2, 3) and db.payload(2) is None
    db.x("BEGIN")
    db.x("INSERT INTO t VALUES ('c', 1, 1)")
    db.x("ROLLBACK")
    db.x("INSERT INTO t VALUES ('d', 1, 1)")
    assert db.version() == v + 1
    assert db.one("SELECT typeof(sync_db_version())") == "integer"


def test_db_version_inside_transaction_sees_own_version(db):
    db.x("BEGIN")
    db.x("INSERT INTO t VALUES ('a', 1, 1)")
    assert db.version() == 1
    db.x("COMMIT")


# ---- sync_init -----------------------------------------------------------------


def test_init_creates_metadata_clock_and_triggers(db):
    names = {r[0] for r in db.q("SELECT name FROM sqlite_schema")}
    assert {"sync_state", "sync_sites", "sync_tables", "sync_columns", "t__sync_clock",
            "t__sync_ins", "t__sync_upd", "t__sync_del"} <= names
    assert db.q("SELECT name, algo FROM sync_tables") == [("t", "cls")]
    assert db.q("SELECT name, is_pk, idx FROM sync_columns ORDER BY is_pk DESC, idx") == [
        ("id", 1, 0), ("a", 0, 0), ("b", 0, 1)]
    assert db.q("SELECT db_version, format FROM sync_state") == [(0, 1)]


def test_init_twice_is_harmless(db):
    db.x("INSERT INTO t VALUES ('k', 1, 2)")
    before = dump(db)
    p = db.payload(0)
    assert db.init("t") == 1
    assert db.init("T") == 1            # names are case-insensitive, like SQLite's
    assert db.init("t", "cls") == 1
    assert dump(db) == before
    assert db.payload(0) == p
    db.x("UPDATE t SET a = 5")          # triggers still capture exactly once
    assert db.version() == 2
    assert db.info(db.payload(1))["change_count"] == 1


def test_init_backfills_existing_rows(replica):
    a, b = replica("a"), replica("b")
    a.x("CREATE TABLE t(id TEXT PRIMARY KEY, a, b)")
    a.x("INSERT INTO t VALUES ('x', 1, 'one'), ('y', 2.5, NULL), ('z', x'00', 3)")
    a.init("t")
    assert a.version() == 1
    assert [r[:2] for r in a.q("SELECT id, cl FROM t__sync_clock ORDER BY id")] == [
        ("x", 1), ("y", 1), ("z", 1)]
    b.x("CREATE TABLE t(id TEXT PRIMARY KEY, a, b)")
    b.init("t")
    assert sync(a, b) == 3 * 3           # per row: life + 2 columns
    assert table_rows(b, "t") == table_rows(a, "t")


def test_init_inside_transaction_rolls_back(replica):
    r = replica("r")
    r.x("CREATE TABLE t(id TEXT PRIMARY KEY, a)")
    r.x("BEGIN")
    r.init("t")
    r.x("INSERT INTO t VALUES ('k', 1)")
    r.x("ROLLBACK")
    assert one(r, "SELECT count(*) FROM sqlite_schema WHERE name LIKE 'sync%'") == 0
    assert error(r, "SELECT sync_payload(0)") == (NOT_INIT.format("sync_payload"), "SQLITE_ERROR")
    r.x("INSERT INTO t VALUES ('k', 1)")      # no triggers left behind
    assert r.init("t") == 1
    assert r.info(r.payload(0))["row_count"] == 1


@pytest.mark.parametrize("args, msg", [
    ("'nope'", 'table "nope" does not exist. Create the table first; sync_init takes the name '
               "of an existing table in the main database."),
    ("123", 'table "123" does not exist. Create the table first; sync_init takes the name '
            "of an existing table in the main database."),
    ("NULL", "sync_init: table name and algorithm must not be NULL"),
    ("'t', NULL", "sync_init: table name and algorithm must not be NULL"),
    ("'t', 'lww'", "unknown sync algorithm 'lww'. Use 'cls' (the default) or 'gset'."),
    ("'t', 'CLS'", "unknown sync algorithm 'CLS'. Use 'cls' (the default) or 'gset'."),
    ("'np'", 'table "np" has no primary key; synced tables need one (replicas name a row by its '
             "key, and rowids collide across devices). Add a primary key that is "
             "unique across devices, e.g. id TEXT PRIMARY KEY DEFAULT (sync_uuid())."),
    ("'r'", 'table "r" uses INTEGER PRIMARY KEY (the rowid alias); row ids collide across '
            "devices. Use a key that is unique across devices, e.g. id TEXT PRIMARY KEY DEFAULT "
            "(sync_uuid()), or a BLOB key."),
    ("'R'", 'table "r" uses INTEGER PRIMARY KEY (the rowid alias); row ids collide across '
            "devices. Use a key that is unique across devices, e.g. id TEXT PRIMARY KEY DEFAULT "
            "(sync_uuid()), or a BLOB key."),
    ("'sync_log'", 'table "sync_log" belongs to sqlitesync and cannot be synced'),
    ("'temp_t'", 'table "temp_t" does not exist. Create the table first; sync_init takes the '
                 "name of an existing table in the main database."),
])
def test_init_errors(conn, args, msg):
    conn.executescript("""
        CREATE TABLE t(id TEXT PRIMARY KEY, a);
        CREATE TABLE np(a, b);
        CREATE TABLE r(id INTEGER PRIMARY KEY, a);
        CREATE TABLE sync_log(id TEXT PRIMARY KEY, a);
        CREATE TEMP TABLE temp_t(id TEXT PRIMARY KEY, a);
    """)
    before = dump(conn)
    assert error(conn, f"SELECT sync_init({args})") == (msg, "SQLITE_ERROR")
    assert dump(conn) == before


def test_init_refuses_own_tables(db):
    db.x("INSERT INTO t VALUES ('k', 1, 1)")
    for name in ("sync_state", "sync_sites", "sync_tables", "sync_columns", "t__sync_clock"):
        assert error(db, "SELECT sync_init(?)", name) == (
            f'table "{name}" belongs to sqlitesync and cannot be synced', "SQLITE_ERROR")


def test_init_algo_cannot_change(db):
    assert error(db, "SELECT sync_init('t', 'gset')") == (
        "table \"t\" is already synced with algo 'cls'. Call sync_cleanup first to change a "
        "table's algorithm on every replica.", "SQLITE_ERROR")


@pytest.mark.parametrize("ddl", [
    "CREATE TABLE k(id INT PRIMARY KEY, a)",                      # INT is not the rowid alias
    "CREATE TABLE k(id INTEGER PRIMARY KEY, a) WITHOUT ROWID",
    "CREATE TABLE k(id INTEGER PRIMARY KEY DESC, a)",             # SQLite quirk: not an alias
    "CREATE TABLE k(id REAL PRIMARY KEY, a)",
    "CREATE TABLE k(id BLOB PRIMARY KEY, a)",
    "CREATE TABLE k(id PRIMARY KEY, a)",
    "CREATE TABLE k(id TEXT PRIMARY KEY, a ANY) STRICT",
])
def test_init_accepts_keys_that_are_not_the_rowid(pair, ddl):
    a, b = pair(ddl, "k")
    a.x("INSERT INTO k VALUES (7, 'seven')")
    sync(a, b)
    assert table_rows(b, "k") == table_rows(a, "k")


def test_key_only_table(pair):
    a, b = pair("CREATE TABLE k(x TEXT, y INTEGER, PRIMARY KEY(x, y)) WITHOUT ROWID", "k")
    a.x("INSERT INTO k VALUES ('a', 1), ('a', 2), ('b', 1)")
    assert sync(a, b) == 3
    a.x("DELETE FROM k WHERE y = 2")
    a.x("UPDATE k SET y = 9 WHERE x = 'b'")
    sync(a, b)
    assert table_rows(b, "k") == table_rows(a, "k") == [
        (("text", b"a"), ("int", 1)), (("text", b"b"), ("int", 9))]


def test_wide_table_masks_beyond_62_columns(pair):
    cols = ", ".join(f"c{i}" for i in range(130))
    a, b = pair(f"CREATE TABLE w(id TEXT PRIMARY KEY, {cols})", "w")
    a.x("INSERT INTO w(id, c0, c61, c62, c63, c129) VALUES ('k', 0, 61, 62, 63, 129)")
    sync(a, b)
    for c in (1, 61, 62, 63, 100, 123, 124, 129):
        a.x(f"UPDATE w SET c{c} = 'v{c}' WHERE id = 'k'")
        assert sync(a, b) == 1, c        # exactly the one changed column travels
    b.x("UPDATE w SET c64 = 'b', c125 = 'b2' WHERE id = 'k'")
    assert sync(b, a) == 2
    assert table_rows(b, "w") == table_rows(a, "w")


def test_generated_columns_are_not_synced_but_recomputed(pair):
    a, b = pair("CREATE TABLE g(id TEXT PRIMARY KEY, a INT, "
                "twice INT GENERATED ALWAYS AS (a * 2) VIRTUAL, "
                "thrice INT GENERATED ALWAYS AS (a * 3) STORED)", "g")
    assert a.q("SELECT name FROM sync_columns WHERE is_pk = 0") == [("a",)]
    a.x("INSERT INTO g(id, a) VALUES ('k', 5)")
    sync(a, b)
    assert b.q("SELECT * FROM g") == [("k", 5, 10, 15)]


# ---- identifiers and injection -------------------------------------------------

ODD_NAMES = ['my "odd" table', "tâble ü", "with space", "semi;colon", "x'quote", "日本語",
             "a]b[c", "Mixed_CASE"]


@pytest.mark.parametrize("name", ODD_NAMES)
def test_odd_table_and_column_names(pair, name):
    q = synclib.qi(name)
    col = name + " col"
    a, b = pair(f"CREATE TABLE {q}({synclib.qi('id ' + name)} TEXT PRIMARY KEY, "
                f"{synclib.qi(col)}, plain)", name)
    a.x(f"INSERT INTO {q} VALUES ('k1', 'v1', 1), ('k2', 'v2', 2)")
    a.x(f"UPDATE {q} SET {synclib.qi(col)} = 'v1b' WHERE plain = 1")
    a.x(f"DELETE FROM {q} WHERE plain = 2")
    sync(a, b)
    assert table_rows(b, name) == table_rows(a, name) == [
        (("text", b"k1"), ("text", b"v1b"), ("int", 1))]
    info = a.info(a.payload(0))
    assert [{k: v for k, v in t.items() if k != "fingerprint"} for t in info["tables"]] == [
        {"name": name, "key": ["id " + name], "columns": [col, "plain"]}]
    b.x(f"UPDATE {q} SET plain = 3")
    sync(b, a)
    assert table_rows(b, name) == table_rows(a, name)
    assert a.one("SELECT sync_cleanup(?)", name) == 1
    assert a.q("SELECT count(*) FROM sync_tables") == [(0,)]


def test_injection_through_table_and_column_names(pair):
    evil_t = 'x"); DROP TABLE victim; --'
    evil_c = "c'); DELETE FROM victim; --"
    schema = (f"CREATE TABLE victim(id TEXT PRIMARY KEY, v); INSERT INTO victim VALUES ('safe', 1);"
              f"CREATE TABLE {synclib.qi(evil_t)}(id TEXT PRIMARY KEY, {synclib.qi(evil_c)});")
    a, b = pair(schema, evil_t)
    a.x(f"INSERT INTO {synclib.qi(evil_t)} VALUES ('k', 'v')")
    a.x(f"UPDATE {synclib.qi(evil_t)} SET {synclib.qi(evil_c)} = 'w'")
    sync(a, b)
    assert table_rows(b, evil_t) == table_rows(a, evil_t) == [(("text", b"k"), ("text", b"w"))]
    for r in (a, b):
        assert r.q("SELECT * FROM victim") == [("safe", 1)]
    for name in ("victim); DROP TABLE victim; --", "victim' OR 1=1 --", "victim\"; --"):
        msg, _ = error(a, "SELECT sync_init(?)", name)
        assert msg.startswith(f'table "{name}" does not exist.')
        msg, _ = error(a, "SELECT sync_cleanup(?)", name)
        assert msg.startswith(f'table "{name}" is not synced.')
    assert a.q("SELECT * FROM victim") == [("safe", 1)]
    assert synclib.integrity(a) == ["ok"]


# ---- keys ------------------------------------------------------------------------


def test_composite_text_integer_key(pair):
    a, b = pair("CREATE TABLE c(org TEXT, n INTEGER, v, PRIMARY KEY(n, org))", "c")
    assert a.q("SELECT name FROM sync_columns WHERE is_pk = 1 ORDER BY idx") == [("n",), ("org",)]
    a.x("INSERT INTO c VALUES ('acme', 1, 'a1'), ('acme', 2, 'a2'), ('beta', 1, 'b1')")
    sync(a, b)
    b.x("UPDATE c SET v = 'B1' WHERE org = 'beta' AND n = 1")
    a.x("DELETE FROM c WHERE org = 'acme' AND n = 2")
    sync(a, b)
    sync(b, a)
    assert table_rows(a, "c") == table_rows(b, "c") == [
        (("text", b"acme"), ("int", 1), ("text", b"a1")),
        (("text", b"beta"), ("int", 1), ("text", b"B1"))]
    assert a.info(a.payload(0))["tables"][0]["key"] == ["n", "org"]


def test_blob_keys(pair):
    a, b = pair("CREATE TABLE bk(id BLOB PRIMARY KEY, v) WITHOUT ROWID", "bk")
    keys = [b"", b"\x00", b"\x00\x00", b"\xff" * 16, bytes(range(256))]
    for i, k in enumerate(keys):
        a.x("INSERT INTO bk VALUES (?, ?)", k, i)
    sync(a, b)
    a.x("UPDATE bk SET v = 'x' WHERE id = x'00'")
    a.x("DELETE FROM bk WHERE id = x''")
    sync(a, b)
    assert table_rows(b, "bk") == table_rows(a, "bk")
    assert len(table_rows(b, "bk")) == 4
    assert a.info(a.payload(0))["rows"][0]["key"][0] in [{"hex": k.hex()} for k in keys]


def test_mixed_type_key_values_stay_distinct(pair):
    a, b = pair("CREATE TABLE m(id PRIMARY KEY, v)", "m")    # no affinity: 1, '1', x'31', 1.5
    a.x("INSERT INTO m VALUES (1, 'int'), ('1', 'text'), (x'31', 'blob'), (1.5, 'real')")
    sync(a, b)
    assert table_rows(b, "m") == table_rows(a, "m")
    assert len(table_rows(b, "m")) == 4
    a.x("DELETE FROM m WHERE id = '1'")
    sync(a, b)
    assert table_rows(b, "m") == table_rows(a, "m")
    assert len(table_rows(b, "m")) == 3


def test_without_rowid_table(pair):
    a, b = pair("CREATE TABLE wr(k TEXT PRIMARY KEY, v INT NOT NULL, w) WITHOUT ROWID", "wr")
    a.x("INSERT INTO wr VALUES ('a', 1, NULL), ('b', 2, 'x')")
    sync(a, b)
    b.x("UPDATE wr SET v = 20 WHERE k = 'b'")
    sync(b, a)
    assert table_rows(a, "wr") == table_rows(b, "wr")


def test_collate_nocase_key(pair):
    a, b = pair("CREATE TABLE n(k TEXT COLLATE NOCASE PRIMARY KEY, v)", "n")
    assert "COLLATE NOCASE" in a.one("SELECT sql FROM sqlite_schema WHERE name = 'n__sync_clock'")
    a.x("INSERT INTO n VALUES ('Apple', 1)")
    sync(a, b)
    b.x("UPDATE n SET v = 2 WHERE k = 'APPLE'")    # same row for NOCASE
    sync(b, a)
    assert a.q("SELECT k, v FROM n") == [("Apple", 2)]
    a.x("DELETE FROM n WHERE k = 'apple'")
    sync(a, b)
    assert b.q("SELECT * FROM n") == []
    assert a.q("SELECT count(*) FROM n__sync_clock") == [(1,)]


def test_null_key_in_rowid_table_is_refused(db):
    before = dump(db)
    assert error(db, "INSERT INTO t VALUES (NULL, 1, 1)") == (
        'primary key column "id" of synced table "t" is NULL', "SQLITE_CONSTRAINT")
    assert dump(db) == before


# ---- sync_cleanup ------------------------------------------------------------------


def test_cleanup(db, replica):
    db.x("CREATE TABLE u(id TEXT PRIMARY KEY, x)")
    db.init("u")
    db.x("INSERT INTO t VALUES ('k', 1, 1)")
    db.x("INSERT INTO u VALUES ('k', 1)")
    assert db.one("SELECT sync_cleanup('T')") == 1
    names = {r[0] for r in db.q("SELECT name FROM sqlite_schema")}
    assert not {n for n in names if n.startswith("t__")}
    assert "u__sync_clock" in names
    assert db.q("SELECT name FROM sync_tables") == [("u",)]
    assert db.q("SELECT count(*) FROM sync_columns WHERE tbl NOT IN (SELECT id FROM sync_tables)") == [(0,)]
    v = db.version()
    db.x("INSERT INTO t VALUES ('k2', 2, 2)")    # not captured any more
    assert db.version() == v
    assert [t["name"] for t in db.info(db.payload(0))["tables"]] == ["u"]
    assert error(db, "SELECT sync_cleanup('t')") == (
        'table "t" is not synced. sync_cleanup takes the name of a table passed to sync_init.',
        "SQLITE_ERROR")
    assert error(db, "SELECT sync_cleanup(NULL)") == (
        "sync_cleanup: table name must not be NULL", "SQLITE_ERROR")
    assert db.init("t") == 1                      # again: backfills both rows
    peer = replica("peer")
    peer.xs("CREATE TABLE t(id TEXT PRIMARY KEY, a, b); CREATE TABLE u(id TEXT PRIMARY KEY, x)")
    peer.init("t")
    peer.init("u")
    sync(db, peer)
    assert table_rows(peer, "t") == table_rows(db, "t")
    assert db.one("SELECT sync_cleanup('t')") == 1
    assert db.one("SELECT sync_cleanup('u')") == 1
    assert db.payload(0) is None
    assert synclib.integrity(db) == ["ok"]


def test_cleanup_then_other_algo(db):
    db.x("INSERT INTO t VALUES ('k', 1, 1)")
    db.one("SELECT sync_cleanup('t')")
    assert db.init("t", "gset") == 1
    assert error(db, "UPDATE t SET a = 2")[0].startswith('cannot UPDATE grow-only table "t"')


# ---- schema changes ------------------------------------------------------------------


def test_add_column_then_init_then_sync_continues(pair):
    a, b = pair("CREATE TABLE t(id TEXT PRIMARY KEY, a)", "t")
    a.x("INSERT INTO t VALUES ('k', 1)")
    sync(a, b)
    for r in (a, b):
        r.x("ALTER TABLE t ADD COLUMN c TEXT DEFAULT 'dflt'")
        assert r.init("t") == 1
    assert a.q("SELECT name, idx FROM sync_columns WHERE is_pk = 0 ORDER BY idx") == [("a", 0), ("c", 1)]
    a.x("UPDATE t SET c = 'new' WHERE id = 'k'")
    a.x("INSERT INTO t VALUES ('m', 2, 'mm')")
    sync(a, b)
    assert table_rows(b, "t") == table_rows(a, "t") == [
        (("text", b"k"), ("int", 1), ("text", b"new")),
        (("text", b"m"), ("int", 2), ("text", b"mm"))]
    b.x("UPDATE t SET c = 'fromb', a = 3 WHERE id = 'm'")
    sync(b, a)
    assert table_rows(b, "t") == table_rows(a, "t")


def test_add_column_on_one_side_only(pair):
    """A payload with a column the receiver lacks applies what the receiver
    knows and keeps the rest aside (held, with its clock); once the receiver
    adds the column and calls sync_init, the held value fills in."""
    a, b = pair("CREATE TABLE t(id TEXT PRIMARY KEY, a)", "t")
    a.x("ALTER TABLE t ADD COLUMN c")
    a.init("t")
    a.x("INSERT INTO t VALUES ('k', 1, 'c')")
    p = a.payload(0)
    assert b.apply(p) == 2                         # the row and column a
    assert b.q("SELECT * FROM t") == [("k", 1)]
    assert b.q("SELECT tbl, code, message FROM sync_held") == [
        ("t", "PS003", 'the sender\'s table "t" has columns this replica\'s lacks (add them and call '
         'sync_init): "c"')]
    b.x("ALTER TABLE t ADD COLUMN c")
    b.init("t")
    assert b.q("SELECT count(*) FROM sync_held") == [(0,)]
    assert table_rows(b, "t") == table_rows(a, "t")


def test_column_order_may_differ_between_replicas(replica):
    a, b = replica("a"), replica("b")
    a.x("CREATE TABLE t(id TEXT PRIMARY KEY, x, y, z)")
    b.x("CREATE TABLE t(z, y, id TEXT PRIMARY KEY, x)")
    a.init("t")
    b.init("t")
    a.x("INSERT INTO t VALUES ('k', 1, 2, 3)")
    sync(a, b)
    assert b.q("SELECT id, x, y, z FROM t") == [("k", 1, 2, 3)]
    b.x("UPDATE t SET y = 20")
    sync(b, a)
    assert a.q("SELECT * FROM t") == [("k", 1, 20, 3)]


def test_drop_synced_column_is_refused_by_sqlite(db):
    # the update trigger names every synced column, so SQLite itself refuses
    assert error(db, "ALTER TABLE t DROP COLUMN b") == (
        "error in trigger t__sync_upd after drop column: no such column: OLD.b", "SQLITE_ERROR")


def test_rename_synced_column_is_recorded(db):
    """RENAME COLUMN is supported (docs/MIGRATIONS.md): the column travels under
    its new name with its former one beside it, its clocks unchanged."""
    db.x("INSERT INTO t VALUES ('k', 1, 2)")
    stamps = db.q("SELECT clk FROM t__sync_clock")
    db.x("ALTER TABLE t RENAME COLUMN a TO aa")
    assert db.one("SELECT sync_init('t')") == 1
    assert db.q("SELECT clk FROM t__sync_clock") == stamps
    info = db.info(db.payload(0))
    assert info["tables"][0]["columns"] == ["aa", "b"]
    assert info["tables"][0]["former_names"] == {"a": "aa"}
    assert db.q("SELECT name, now FROM sync_column_history") == [("a", "aa")]


@pytest.mark.parametrize("ddl, msg", [
    ("DROP TABLE t; CREATE TABLE t(id TEXT, a, b, PRIMARY KEY(id, a))",
     'primary key of table "t" changed since sync_init. A synced table\'s primary key cannot '
     "change; call sync_cleanup and sync_init on every replica."),
    ("DROP TABLE t; CREATE TABLE t(key TEXT PRIMARY KEY, a, b)",
     'key column "id" of synced table "t" was renamed or removed. Rename the key column back: '
     "payloads name key columns, and every replica must use one name (docs/MIGRATIONS.md)."),
])
def test_incompatible_schema_changes_are_refused(db, ddl, msg):
    db.x("INSERT INTO t VALUES ('k', 1, 2)")
    db.xs(ddl)
    before = dump(db)
    assert error(db, "SELECT sync_init('t')") == (msg, "SQLITE_ERROR")
    assert dump(db) == before


# ---- sync_payload ------------------------------------------------------------------


def test_payload_null_when_nothing_new(db):
    assert db.payload(0) is None
    db.x("INSERT INTO t VALUES ('k', 1, 1)")
    p = db.payload(0)
    assert isinstance(p, bytes) and p[:4] == b"PGSY"
    assert db.payload(1) is None
    assert db.payload(5) is None            # a since from the future: nothing
    assert db.one("SELECT sync_payload(NULL)") == p     # NULL means 0
    assert db.one("SELECT sync_payload(1, NULL)") is None


@pytest.mark.parametrize("arg", ["-1", "'0'", "1.5", "x'00'", "'abc'", "-9223372036854775808"])
def test_payload_bad_since(db, arg):
    assert error(db, f"SELECT sync_payload({arg})") == (BAD_SINCE, "SQLITE_ERROR")


@pytest.mark.parametrize("arg", ["'abc'", "''", "1", "2.5", "x'0011'", "zeroblob(15)", "zeroblob(17)",
                                 "'01234567-89ab-7def-8123-456789abcdeg'",
                                 "'0123456789ab7def8123456789abcdef'",
                                 "'{01234567-89ab-7def-8123-456789abcdef}'"])
def test_payload_bad_exclude_site(db, arg):
    db.x("INSERT INTO t VALUES ('k', 1, 1)")
    assert error(db, f"SELECT sync_payload(0, {arg})") == (BAD_EXCLUDE, "SQLITE_ERROR")


def test_payload_exclude_site_forms(db):
    db.x("INSERT INTO t VALUES ('k', 1, 1)")
    site = db.site()
    assert db.payload(0, site) is None                  # everything is ours
    assert db.payload(0, site.upper()) is None
    assert db.payload(0, "01234567-89ab-7def-8123-456789abcdef") == db.payload(0)


def test_payload_exclude_site_as_16_byte_blob(db):
    db.x("INSERT INTO t VALUES ('k', 1, 1)")
    assert db.one("SELECT sync_payload(0, ?)", pc.uuid_bytes(db.site())) is None
    assert db.one("SELECT sync_payload(0, zeroblob(16))") == db.payload(0)


def test_payload_header_fields(db):
    db.x("INSERT INTO t VALUES ('k', 1, 1)")
    db.x("INSERT INTO t VALUES ('m', 1, 1)")
    p = db.payload(1)
    h = pc.header(p)
    assert (h.magic, h.version, h.flags, h.reserved) == (b"PGSY", 2, 0, 0)
    assert (h.since, h.until) == (1, 2)
    assert h.origin == pc.uuid_bytes(db.site())
    assert h.stored_len == h.body_len == len(p) - 56
    assert pc.expected_header_error(p) is None
    body = pc.decode_body(pc.body(p), h.version)
    assert [g.pk for g in body.rows] == [[(pc.TEXT, "m")]]


def test_payload_compressed_when_smaller(db):
    db.x("INSERT INTO t VALUES ('k', ?, ?)", "x" * 5000, "y" * 5000)
    p = db.payload(0)
    h = pc.header(p)
    assert h.flags == 1 and h.stored_len < h.body_len and h.stored_len == len(p) - 56
    assert pc.expected_header_error(p) is None
    db.x("INSERT INTO t VALUES ('r', ?, 1)", os.urandom(3000))
    h = pc.header(db.payload(1))
    assert h.flags == 0                     # random bytes do not compress: stored as is


# ---- sync_payload_until, sync_payload_info -------------------------------------------


def test_payload_until(db):
    db.x("INSERT INTO t VALUES ('k', 1, 1)")
    db.x("INSERT INTO t VALUES ('m', 1, 1)")
    p = db.payload(0)
    assert db.one("SELECT sync_payload_until(?)", p) == 2
    assert db.one("SELECT sync_payload_until(NULL)") is None
    assert error(db, "SELECT sync_payload_until('x')") == (
        NOT_BLOB.format("sync_payload_until", "TEXT"), "SQLITE_ERROR")
    assert error(db, "SELECT sync_payload_until(42)") == (
        NOT_BLOB.format("sync_payload_until", "a number"), "SQLITE_ERROR")
    msg, code = error(db, "SELECT sync_payload_until(?)", p[:-1])
    assert msg == pc.expected_header_error(p[:-1]) and code in synclib.BAD_PAYLOAD_CODES


def test_payload_info_exact(conn):
    site = bytes.fromhex("0190a0b0c0d07e0f8a1b2c3d4e5f6071")
    other = bytes.fromhex("0190a0b0c0d07e0f8a1b2c3d4e5f6072")
    ms = 1_700_000_000_000
    b = pc.Body([site, other], [pc.Table("t", ["id"], ["a", "b", "c"]), pc.Table("u", ["k1", "k2"], [])], [
        pc.Group(0, [(pc.TEXT, "k")], 1, 0, [
            pc.Change(0, pc.INT, -5, pc.hlc_of_ms(ms, 1), 0),
            pc.Change(1, pc.REAL, float("-inf"), pc.hlc_of_ms(ms, 1), 0),
            pc.Change(2, pc.BLOB, b"\x00\xab", pc.hlc_of_ms(ms + 7), 1)]),
        pc.Group(0, [(pc.TEXT, "gone")], 2, 1, []),
        pc.Group(1, [(pc.BLOB, b"\x01"), (pc.REAL, 0.5)], 3, 1, []),
    ])
    p = pc.make(b, origin=site, since=4, until=9)
    info = json.loads(one(conn, "SELECT sync_payload_info(?)", p))
    assert one(conn, "SELECT json_valid(sync_payload_info(?))", p) == 1
    s1, s2 = "0190a0b0-c0d0-7e0f-8a1b-2c3d4e5f6071", "0190a0b0-c0d0-7e0f-8a1b-2c3d4e5f6072"
    assert info == {
        "format_version": 1, "compressed": False, "more": False, "origin": s1, "since": 4, "until": 9,
        "body_bytes": len(p) - 56, "stored_bytes": len(p) - 56, "sites": [s1, s2],
        "tables": [{"name": "t", "key": ["id"], "columns": ["a", "b", "c"]},
                   {"name": "u", "key": ["k1", "k2"], "columns": []}],
        "rows": [
            {"table": "t", "kind": "whole", "key": ["k"], "cl": 1, "deleted": False, "cl_site": s1, "changes": [
                {"column": "a", "value": -5, "hlc": pc.hlc_of_ms(ms, 1), "hlc_ms": ms, "site": s1},
                {"column": "b", "value": "-Infinity", "hlc": pc.hlc_of_ms(ms, 1), "hlc_ms": ms, "site": s1},
                {"column": "c", "value": {"hex": "00ab"}, "hlc": pc.hlc_of_ms(ms + 7), "hlc_ms": ms + 7,
                 "site": s2}]},
            {"table": "t", "kind": "changes", "key": ["gone"], "cl": 2, "deleted": True, "cl_site": s2,
             "changes": []},
            {"table": "u", "kind": "whole", "key": [{"hex": "01"}, 0.5], "cl": 3, "deleted": False,
             "cl_site": s2, "changes": []}],
        "row_count": 3, "change_count": 3}


def test_payload_info_values_are_exact(conn):
    big = 2 ** 63 - 1
    site = b"\x11" * 16
    vals = [(pc.INT, big), (pc.INT, -big - 1), (pc.REAL, 0.1), (pc.REAL, float("nan")),
            (pc.REAL, -0.0), (pc.TEXT, 'quo"te\n\u00e9'), (pc.NULL, None), (pc.REAL, 1e308)]
    cols = [f"c{i}" for i in range(len(vals))]
    b = pc.Body([site], [pc.Table("t", ["id"], cols)], [pc.Group(0, [(pc.INT, 1)], 1, 0, [
        pc.Change(i, t, v, pc.hlc_of_ms(1_700_000_000_000), 0) for i, (t, v) in enumerate(vals)])])
    text = one(conn, "SELECT sync_payload_info(?)", pc.make(b, origin=site))
    assert f'"value":{big}' in text and f'"value":{-big - 1}' in text   # exact, not via double
    got = [c["value"] for c in json.loads(text)["rows"][0]["changes"]]
    assert got == [big, -big - 1, 0.1, "NaN", -0.0, 'quo"te\n\u00e9', None, 1e308]


def test_payload_info_errors(conn):
    assert error(conn, "SELECT sync_payload_info(NULL)") == (
        NOT_BLOB.format("sync_payload_info", "NULL"), "SQLITE_ERROR")
    assert error(conn, "SELECT sync_payload_info('PGSY')") == (
        NOT_BLOB.format("sync_payload_info", "TEXT"), "SQLITE_ERROR")
    assert error(conn, "SELECT sync_payload_info(1.5)") == (
        NOT_BLOB.format("sync_payload_info", "a number"), "SQLITE_ERROR")
    msg, code = error(conn, "SELECT sync_payload_info(x'')")
    assert msg == pc.expected_header_error(b"") and code in synclib.BAD_PAYLOAD_CODES


# ---- sync_apply_payload ------------------------------------------------------------------


def test_apply_counts_and_is_idempotent(pair):
    a, b = pair("CREATE TABLE t(id TEXT PRIMARY KEY, a, b)", "t")
    a.x("INSERT INTO t VALUES ('x', 1, 2), ('y', 3, 4)")
    a.x("DELETE FROM t WHERE id = 'y'")
    a.x("INSERT INTO t VALUES ('z', 5, 6)")
    p = a.payload(0)
    assert b.apply(p) == 3 + 1 + 3          # x: life + 2 columns; y: delete; z: life + 2
    before = dump(b)
    assert b.apply(p) == 0
    assert dump(b) == before                # no new version, no clock change
    assert a.apply(p) == 0                  # own payload: nothing wins
    a.x("UPDATE t SET b = 7 WHERE id = 'x'")
    assert b.apply(a.payload(0)) == 1
    assert table_rows(a, "t") == table_rows(b, "t")


def test_apply_does_not_capture_but_relays(replica):
    a, b, c = (replica(n) for n in "abc")
    for r in (a, b, c):
        r.x("CREATE TABLE t(id TEXT PRIMARY KEY, a)")
        r.init("t")
    a.x("INSERT INTO t VALUES ('k', 1)")
    sync(a, b)
    assert b.version() == 1
    assert b.payload(0, a.site()) is None       # nothing of b's own
    sync(b, c)
    info = c.info(c.payload(0))
    assert info["origin"] == c.site()
    assert info["rows"][0]["changes"][0]["site"] == a.site()
    assert info["rows"][0]["cl_site"] == a.site()


def test_apply_wrong_types(db):
    for arg, got in (("NULL", "NULL"), ("'PGSY'", "TEXT"), ("1", "a number"), ("1.0", "a number")):
        assert error(db, f"SELECT sync_apply_payload({arg})") == (
            NOT_BLOB.format("sync_apply_payload", got), "SQLITE_ERROR")


def test_apply_into_strict_table_type_mismatch(pair):
    a, b = pair("CREATE TABLE s(id TEXT PRIMARY KEY, n ANY) STRICT", "s")
    b.x("DROP TABLE s")      # same shape, stricter column on b; no capture triggers needed
    b.x("CREATE TABLE s(id TEXT PRIMARY KEY, n INTEGER) STRICT")
    b.init("s")
    a.x("INSERT INTO s VALUES ('ok', 1)")
    a.x("INSERT INTO s VALUES ('bad', 'text')")
    # the row b cannot store is kept aside with the reason; the rest applies
    assert b.apply(a.payload(0)) == 2
    assert b.q("SELECT * FROM s") == [("ok", 1)]
    assert b.q("SELECT tbl, code, message, attempts FROM sync_held") == [
        ("s", "42804", "cannot store TEXT value in INTEGER column s.n", 1)]
    assert b.q("SELECT count(*) FROM s__sync_clock") == [(1,)]   # its clock untouched


def test_apply_inside_user_transaction(pair):
    a, b = pair("CREATE TABLE t(id TEXT PRIMARY KEY, a)", "t")
    a.x("INSERT INTO t VALUES ('k', 1)")
    p = a.payload(0)
    b.x("BEGIN")
    b.x("INSERT INTO t VALUES ('own', 1)")
    assert b.apply(p) == 2
    assert b.version() == 1                 # one version for the whole transaction
    b.x("ROLLBACK")
    assert b.q("SELECT * FROM t") == []
    assert b.apply(p) == 2
    assert b.q("SELECT * FROM t") == [("k", 1)]


CORRUPT_IN_TXN = ("bug: a bad payload is reported with SQLITE_CORRUPT; inside an open "
                  "transaction SQLite then marks the connection corrupt-read-only "
                  "(SQLITE_CorruptRdOnly) and every later write and the COMMIT fail with "
                  "'database disk image is malformed'")


@pytest.mark.parametrize("fn", ["sync_apply_payload", "sync_payload_info", "sync_payload_until"])
def test_bad_payload_inside_user_transaction_keeps_the_transaction(pair, fn):
    a, b = pair("CREATE TABLE t(id TEXT PRIMARY KEY, a)", "t")
    a.x("INSERT INTO t VALUES ('k', 1)")
    p = a.payload(0)
    b.x("BEGIN")
    b.x("INSERT INTO t VALUES ('own', 1)")
    assert error(b, f"SELECT {fn}(?)", p[:-1])[0] == pc.expected_header_error(p[:-1])
    assert b.conn.in_transaction
    b.x("INSERT INTO t VALUES ('own2', 2)")
    assert b.apply(p) == 2
    b.x("COMMIT")
    assert sorted(b.q("SELECT * FROM t")) == [("k", 1), ("own", 1), ("own2", 2)]


def test_functions_are_direct_only(db):
    db.x("INSERT INTO t VALUES ('k', 1, 1)")
    db.xs("CREATE VIEW vp AS SELECT sync_payload(0) AS p;"
          "CREATE TABLE log(p); CREATE TRIGGER tr AFTER INSERT ON log BEGIN "
          "SELECT sync_apply_payload(NEW.p); END;")
    assert error(db, "SELECT * FROM vp") == ("unsafe use of sync_payload()", "SQLITE_ERROR")
    assert error(db, "INSERT INTO log VALUES (x'00')") == ("unsafe use of sync_apply_payload()", "SQLITE_ERROR")


# ---- connections ------------------------------------------------------------------------


def test_connection_without_extension_cannot_write(db, tmp_path):
    db.x("INSERT INTO t VALUES ('k', 1, 1)")
    before = dump(db)
    plain = synclib.connect(tmp_path / "db.db", load=False)
    for sql in ("INSERT INTO t VALUES ('x', 1, 1)", "UPDATE t SET a = 9", "DELETE FROM t",
                "INSERT OR REPLACE INTO t VALUES ('k', 2, 2)"):
        with pytest.raises(sqlite3.OperationalError) as ei:
            plain.execute(sql)
        assert str(ei.value) == "no such function: sqlitesync_capture"
    assert plain.execute("SELECT * FROM t").fetchall() == [("k", 1, 1)]   # reading is fine
    plain.close()
    assert dump(db) == before


def test_plain_sqlite3_close_succeeds(tmp_path, ext):
    """sqlite3_close (not _v2) must return SQLITE_OK after the extension cached
    statements: its close hook finalizes them."""
    lib = ctypes.CDLL("libsqlite3.so.0")
    lib.sqlite3_open.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
    lib.sqlite3_close.argtypes = [ctypes.c_void_p]
    lib.sqlite3_enable_load_extension.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.sqlite3_load_extension.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p,
                                           ctypes.POINTER(ctypes.c_char_p)]
    lib.sqlite3_exec.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p,
                                 ctypes.POINTER(ctypes.c_char_p)]
    for work in ("", "SELECT sync_version();",
                 "CREATE TABLE t(id TEXT PRIMARY KEY, a); SELECT sync_init('t');"
                 "INSERT INTO t VALUES ('k', 1); UPDATE t SET a = 2; DELETE FROM t;"
                 "INSERT INTO t VALUES ('k', 3); SELECT sync_payload(0);"
                 "SELECT sync_apply_payload(sync_payload(0)); SELECT sync_site_id();"):
        db = ctypes.c_void_p()
        path = str(tmp_path / f"close{len(work)}.db").encode()
        assert lib.sqlite3_open(path, ctypes.byref(db)) == 0
        assert lib.sqlite3_enable_load_extension(db, 1) == 0
        errmsg = ctypes.c_char_p()
        assert lib.sqlite3_load_extension(db, ext.encode(), None, ctypes.byref(errmsg)) == 0, errmsg.value
        if work:
            assert lib.sqlite3_exec(db, work.encode(), None, None, ctypes.byref(errmsg)) == 0, errmsg.value
        assert lib.sqlite3_close(db) == 0       # SQLITE_OK, not SQLITE_BUSY


def test_integrity_check_is_literally_ok(db):
    db.x("INSERT INTO t VALUES ('k', 1, 1)")
    assert db.q("PRAGMA integrity_check") == [("ok",)]


def test_python_close_and_reopen(tmp_path):
    r = synclib.Replica(tmp_path / "c.db", "c")
    r.x("CREATE TABLE t(id TEXT PRIMARY KEY, a)")
    r.init("t")
    r.x("INSERT INTO t VALUES ('k', 1)")
    r.payload(0)
    r.close()
    r2 = synclib.Replica(tmp_path / "c.db", "c")
    assert synclib.integrity(r2) == ["ok"]
    r2.x("UPDATE t SET a = 2")
    assert r2.version() == 2
    r2.close()


def test_other_connection_sees_tables_inited_later(tmp_path):
    a = synclib.Replica(tmp_path / "s.db", "a")
    b = synclib.Replica(tmp_path / "s.db", "b")
    a.x("CREATE TABLE t(id TEXT PRIMARY KEY, a)")
    a.init("t")
    b.x("INSERT INTO t VALUES ('from-b', 1)")           # b loaded the extension before t existed
    a.x("CREATE TABLE u(id TEXT PRIMARY KEY, a)")
    a.init("u")
    b.x("INSERT INTO u VALUES ('from-b', 2)")
    info = b.info(b.payload(0))
    assert sorted(r["table"] for r in info["rows"]) == ["t", "u"]
    assert b.version() == 2
    a.close()
    b.close()


def test_payload_is_read_only(db, tmp_path):
    """sync_payload writes nothing, even with an exclude_site it never saw, so
    it works on a read-only connection."""
    db.x("INSERT INTO t VALUES ('k', 1, 1)")
    stranger = "01234567-89ab-7def-8123-456789abcdef"
    before = dump(db)
    p = db.payload(0, stranger)
    assert dump(db) == before
    ro = sqlite3.connect(f"file:{tmp_path / 'db.db'}?mode=ro", uri=True)
    ro.enable_load_extension(True)
    ro.load_extension(str(synclib.ext_path()))
    assert ro.execute("SELECT sync_payload(0, ?)", (stranger,)).fetchone()[0] == p
    assert ro.execute("SELECT sync_payload(0)").fetchone()[0] == db.payload(0)
    ro.close()


def test_payload_info_text_with_nul_and_invalid_utf8(db):
    db.x("INSERT INTO t VALUES ('nul', 'a' || char(0) || 'b', CAST(x'61ff62' AS TEXT))")
    db.conn.text_factory = bytes
    try:
        raw = db.one("SELECT sync_payload_info(sync_payload(0))")
    finally:
        db.conn.text_factory = str
    info = json.loads(raw.decode("utf-8"))             # must be valid UTF-8 JSON
    a, b = [c["value"] for c in info["rows"][0]["changes"]]
    assert a != "a"                                    # the NUL does not cut the value
    assert b is not None


def test_key_column_limit(conn):
    cols = ", ".join(f"k{i}" for i in range(65))
    conn.execute(f"CREATE TABLE wide(v, {cols}, PRIMARY KEY({cols}))")
    assert error(conn, "SELECT sync_init('wide')") == (
        'table "wide" has too many primary key columns to be synced (65; its triggers would '
        'need 135 function arguments, SQLite allows 127). Use a primary key with fewer columns '
        '(a single UUID key is best).', "SQLITE_ERROR")
    cols61 = ", ".join(f"k{i}" for i in range(61))
    conn.execute(f"CREATE TABLE ok61(v, {cols61}, PRIMARY KEY({cols61}))")
    assert one(conn, "SELECT sync_init('ok61')") == 1
    conn.execute(f"INSERT INTO ok61 VALUES ('v', {', '.join(str(i) for i in range(61))})")
    conn.execute("UPDATE ok61 SET v = 'w', k60 = 99")
    info = json.loads(one(conn, "SELECT sync_payload_info(sync_payload(0))"))
    assert sorted(r["cl"] for r in info["rows"]) == [1, 2]


@pytest.mark.parametrize("n", [62, 64])
def test_tables_accepted_by_init_stay_writable(conn, n):
    cols = ", ".join(f"k{i}" for i in range(n))
    conn.execute(f"CREATE TABLE w(v, {cols}, PRIMARY KEY({cols}))")
    try:
        conn.execute("SELECT sync_init('w')")
    except sqlite3.OperationalError as e:
        assert "primary key columns" in str(e)     # refusing is fine too
        return
    conn.execute(f"INSERT INTO w VALUES ('v', {', '.join(str(i) for i in range(n))})")
    conn.execute("UPDATE w SET v = 'x'")
    conn.execute("DELETE FROM w")


@pytest.mark.parametrize("ddl, table", [
    ('CREATE TABLE ""(id TEXT PRIMARY KEY, v)', ""),
    ('CREATE TABLE e(id TEXT PRIMARY KEY, "")', "e"),
    ('CREATE TABLE e(id TEXT PRIMARY KEY, "' + "c" * 70000 + '")', "e"),
])
def test_names_the_format_cannot_carry(pair, ddl, table):
    a, b = pair("CREATE TABLE ok(id TEXT PRIMARY KEY, v)", "ok")
    refused = []
    for r in (a, b):
        r.xs(ddl)
        try:
            r.init(table)
        except sqlite3.OperationalError as e:
            refused.append(str(e))
    if len(refused) == 2:
        return                                  # refusing at sync_init is a fine answer
    a.x(f"INSERT INTO {synclib.qi(table)} VALUES ('k', 1)")
    a.x("INSERT INTO ok VALUES ('k', 1)")
    sync(a, b)                                  # must not block the other tables
    assert table_rows(b, "ok") == table_rows(a, "ok")


def test_receiver_with_an_extra_column(replica):
    a, b = replica("a"), replica("b")
    a.x("CREATE TABLE t(id TEXT PRIMARY KEY, x)")
    b.x("CREATE TABLE t(id TEXT PRIMARY KEY, x, extra NOT NULL DEFAULT 'dflt')")
    a.init("t")
    b.init("t")
    a.x("INSERT INTO t VALUES ('k', 1), ('m', 2)")
    sync(a, b)
    assert b.q("SELECT * FROM t ORDER BY id") == [("k", 1, "dflt"), ("m", 2, "dflt")]
    b.x("UPDATE t SET extra = 'mine' WHERE id = 'k'")
    a.x("UPDATE t SET x = 10 WHERE id = 'k'")
    a.x("DELETE FROM t WHERE id = 'm'")
    a.x("INSERT INTO t VALUES ('m', 3)")        # a new life: extra back to its default
    sync(a, b)
    assert b.q("SELECT * FROM t ORDER BY id") == [("k", 10, "mine"), ("m", 3, "dflt")]
