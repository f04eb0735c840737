"""Chunked pulls (issue 4): sync_payload(since, exclude, max_rows, cursor) and
sync_payload_cursor(payload) on SQLite.

A chunked pull converges like an unchunked one, every chunk reports the same
(pinned) until, forged cursors are refused with a clear error, and changes
made between chunks are not lost: they come in a later chunk or in the next
pull from the pinned until.
"""
import sqlite3

import pytest

import synclib


def setup_pair(replica, n):
    a = replica("a")
    b = replica("b")
    for r in (a, b):
        r.xs("CREATE TABLE t(id INT NOT NULL PRIMARY KEY, name TEXT, v REAL);"
             "CREATE TABLE kv(k1 TEXT, k2 INTEGER, val BLOB, PRIMARY KEY(k1, k2));")
        r.init("t")
        r.init("kv")
    a.x("BEGIN")
    a.conn.executemany("INSERT INTO t VALUES(?, ?, ?)",
                       ((i, f"name {i}", i * 0.25) for i in range(n)))
    a.conn.executemany("INSERT INTO kv VALUES(?, ?, ?)",
                       ((f"k{i % 7}", i, bytes([i % 256])) for i in range(n // 10)))
    a.x("COMMIT")
    return a, b


def assert_same(a, b):
    for t in ("t", "kv"):
        assert synclib.table_rows(a.conn, t) == synclib.table_rows(b.conn, t), t


def chunked_pull(src, dst, since, max_rows, between=None):
    """pull (since, ..] from src into dst in chunks; each chunk's apply and
    the stored cursor would be one transaction in a real client. Returns
    (pinned until, number of chunks)."""
    cursor = None
    until = None
    n = 0
    while True:
        p = src.one("SELECT sync_payload(?, NULL, ?, ?)", since, max_rows, cursor)
        if p is None:
            assert cursor is None     # with a cursor there is always a payload
            return since, n
        n += 1
        u = src.one("SELECT sync_payload_until(?)", p)
        if until is not None:
            assert u == until, "until must be pinned by the first chunk"
        until = u
        dst.x("BEGIN")
        dst.one("SELECT sync_apply_payload(?)", p)
        dst.x("COMMIT")
        cursor = src.one("SELECT sync_payload_cursor(?)", p)
        info = src.info(p)
        assert info["more"] == (cursor is not None)
        if cursor is None:
            return until, n
        if between:
            between(n)


def test_chunked_first_sync_converges(replica):
    a, b = setup_pair(replica, 20000)
    until, n = chunked_pull(a, b, 0, 1000)
    assert until == a.version()
    assert n == 23          # 22 000 rows / 1000 (+ the empty last chunk)
    assert_same(a, b)
    # nothing new: no payload
    assert a.one("SELECT sync_payload(?, NULL, 1000, NULL)", until) is None


def test_chunk_sizes(replica):
    a, b0 = setup_pair(replica, 50)
    whole = a.one("SELECT sync_payload(0)")
    assert a.one("SELECT sync_payload_cursor(?)", whole) is None
    assert a.one("SELECT sync_payload(0, NULL, 0, NULL)") is not None
    for m in (1, 2, 3, 7, 55, 56, 1000):
        b = replica(f"b{m}")
        b.xs("CREATE TABLE t(id INT NOT NULL PRIMARY KEY, name TEXT, v REAL);"
             "CREATE TABLE kv(k1 TEXT, k2 INTEGER, val BLOB, PRIMARY KEY(k1, k2));")
        b.init("t")
        b.init("kv")
        _, n = chunked_pull(a, b, 0, m)
        assert n == -(-55 // m) + (1 if 55 % m == 0 else 0)
        assert synclib.table_rows(a.conn, "t") == synclib.table_rows(b.conn, "t")
        assert synclib.table_rows(a.conn, "kv") == synclib.table_rows(b.conn, "kv")


def test_changes_between_chunks_are_not_lost(replica):
    a, b = setup_pair(replica, 3000)

    def between(k):
        a.x("BEGIN")
        a.x("UPDATE t SET name = 'early ' || ? WHERE id = ?", k, k)          # already sent
        a.x("UPDATE t SET name = 'late ' || ? WHERE id = ?", k, 2999 - k)    # not yet sent
        a.x("DELETE FROM t WHERE id = ?", 100 + k)
        a.x("DELETE FROM t WHERE id = ?", 2500 + k)
        a.x("INSERT INTO t VALUES(?, 'head', 0)", -k)
        a.x("INSERT INTO t VALUES(?, 'tail', 0)", 10000 + k)
        a.x("INSERT OR REPLACE INTO kv VALUES('k0', ?, x'ff')", k * 1000)
        a.x("COMMIT")

    until, n = chunked_pull(a, b, 0, 250, between)
    assert n > 5
    until2, _ = chunked_pull(a, b, until, 250)
    assert until2 == a.version()
    assert_same(a, b)


def test_cursor_tampering(replica):
    a, _ = setup_pair(replica, 100)
    p = a.one("SELECT sync_payload(0, NULL, 10, NULL)")
    cur = a.one("SELECT sync_payload_cursor(?)", p)
    assert isinstance(cur, bytes) and cur
    # valid continuation
    assert a.one("SELECT sync_payload(0, NULL, 10, ?)", cur) is not None
    # a cursor for another since
    with pytest.raises(sqlite3.Error, match="since"):
        a.one("SELECT sync_payload(5, NULL, 10, ?)", cur)
    bad = [b"", b"\x09" + cur[1:], cur[:-1], cur + b"\x00", b"\x01\x00\x05\x63\x01\x01\x02",
           b"\x01" + b"\xff" * 20, cur[:4]]
    for c in bad:
        with pytest.raises(sqlite3.Error, match="continuation token"):
            a.one("SELECT sync_payload(0, NULL, 10, ?)", c)
    with pytest.raises(sqlite3.Error, match="cursor must be"):
        a.one("SELECT sync_payload(0, NULL, 10, 'abc')")
    with pytest.raises(sqlite3.Error, match="max_rows"):
        a.one("SELECT sync_payload(0, NULL, -1, NULL)")
    # a cursor from another replica's payload
    b = replica("other")
    b.xs("CREATE TABLE t(id INT NOT NULL PRIMARY KEY, name TEXT, v REAL);")
    b.init("t")
    with pytest.raises(sqlite3.Error, match="not built by this database"):
        b.one("SELECT sync_payload_cursor(?)", p)


def test_tables_change_between_chunks(replica):
    a, b = setup_pair(replica, 500)
    for r in (a, b):
        r.xs("CREATE TABLE aa(id TEXT NOT NULL PRIMARY KEY, x TEXT);")
    a.xs("INSERT INTO aa VALUES('one', 'x'), ('two', 'y');")
    b.init("aa")
    p = a.one("SELECT sync_payload(0, NULL, 100, NULL)")
    cur = a.one("SELECT sync_payload_cursor(?)", p)
    b.one("SELECT sync_apply_payload(?)", p)
    a.init("aa")            # a new synced table between two chunks
    since = 0
    while cur is not None:
        p = a.one("SELECT sync_payload(?, NULL, 100, ?)", since, cur)
        b.one("SELECT sync_apply_payload(?)", p)
        cur = a.one("SELECT sync_payload_cursor(?)", p)
    until = a.one("SELECT sync_payload_until(?)", p)
    chunked_pull(a, b, until, 100)
    assert_same(a, b)
    assert synclib.table_rows(a.conn, "aa") == synclib.table_rows(b.conn, "aa")
    # a cursor whose table is no longer synced is refused
    p = a.one("SELECT sync_payload(0, NULL, 10, NULL)")
    cur = a.one("SELECT sync_payload_cursor(?)", p)
    a.one("SELECT sync_cleanup('t')")
    with pytest.raises(sqlite3.Error, match="continuation token"):
        a.one("SELECT sync_payload(0, NULL, 10, ?)", cur)
