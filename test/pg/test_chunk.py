#!/usr/bin/python3
"""test_chunk — chunked pulls on Postgres (issue 4):
sync_payload(since, exclude_site, max_rows, cursor) + sync_payload_cursor.

PG -> PG and PG -> SQLite chunked first syncs converge, every chunk has the
same until, changes made between chunks are not lost, forged cursors are
refused, text keys follow the clock table's "C" order.
"""
import sqlite3
import sys

import psycopg2

from pglib import ROOT, check, connect, drop_db, fresh_db, one, rows, settle

DDL = ["CREATE TABLE t (id int PRIMARY KEY, v text)", "SELECT sync_init('t')",
       "CREATE TABLE kv (k1 text COLLATE \"en_US\", k2 int, val bytea, PRIMARY KEY (k1, k2))",
       "SELECT sync_init('kv')"]
DDL_NOCOLL = [d.replace(' COLLATE "en_US"', "") for d in DDL]


def chunked_pull(src, dst, since, max_rows, between=None):
    cursor = None
    until = None
    n = 0
    while True:
        p = one(src, "SELECT sync_payload(%s, NULL, %s, %s)", (since, max_rows, cursor))
        if p is None:
            assert cursor is None
            return since, n
        p = bytes(p)
        n += 1
        u = one(src, "SELECT sync_payload_until(%s)", (p,))
        assert until is None or u == until, "until pinned"
        until = u
        one(dst, "SELECT sync_apply_payload(%s)", (p,))
        cursor = one(src, "SELECT sync_payload_cursor(%s)", (p,))
        if cursor is None:
            return until, n
        cursor = bytes(cursor)
        if between:
            between(n)


def table(conn, t):
    return rows(conn, f"SELECT * FROM {t} ORDER BY 1, 2")


def main():
    ddl = DDL
    try:
        a = fresh_db("pgsync_t_chunk_a", ddl)
    except psycopg2.Error:
        ddl = DDL_NOCOLL
        a = fresh_db("pgsync_t_chunk_a", ddl)
    b = fresh_db("pgsync_t_chunk_b", ddl)
    cur = a.cursor()
    cur.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 5000) g")
    cur.execute("INSERT INTO kv SELECT chr(65 + g % 3) || CASE WHEN g % 2 = 0 THEN 'a' ELSE 'B' END,"
                " g, '\\x01' FROM generate_series(1, 600) g")

    def between(k):
        c = a.cursor()
        c.execute("UPDATE t SET v = 'early' WHERE id = %s", (k,))
        c.execute("UPDATE t SET v = 'late' WHERE id = %s", (5000 - k,))
        c.execute("DELETE FROM t WHERE id = %s", (200 + k,))
        c.execute("INSERT INTO t VALUES (%s, 'head') ON CONFLICT (id) DO UPDATE SET v = 'again'",
                  (-k,))
        c.execute("INSERT INTO kv VALUES ('Aa', %s, '\\x02') ON CONFLICT DO NOTHING", (10000 + k,))

    until, n = chunked_pull(a, b, 0, 400, between)
    check(n >= 14, f"chunked first sync in {n} chunks")
    settle(a)   # an older xid still running (an autoanalyze) would pin until2 at until
    until2, _ = chunked_pull(a, b, until, 400)
    check(until2 > until, "the next pull from the pinned until moves on")
    check(table(a, "t") == table(b, "t") and table(a, "kv") == table(b, "kv"),
          "PG -> PG chunked pull with changes between chunks converges")
    # incremental chunked pulls: read by key (at most 10,000 changed rows a
    # table) and by walking the table in key order (more), both resumed by key
    cur.execute("UPDATE t SET v = v || '+' WHERE id % 3 = 0")
    cur.execute("UPDATE kv SET val = '\\x03' WHERE k2 % 2 = 0")
    cur.execute("DELETE FROM t WHERE id % 7 = 0")
    settle(a)
    until3, n3 = chunked_pull(a, b, until2, 400, between)
    until3, _ = chunked_pull(a, b, until3, 400)    # what changed between the chunks
    check(n3 >= 5 and table(a, "t") == table(b, "t") and table(a, "kv") == table(b, "kv"),
          f"incremental chunked pull of ~2,000 changed rows by key ({n3} chunks) converges")
    cur.execute("INSERT INTO t SELECT g, 'bulk' FROM generate_series(100001, 112000) g")
    cur.execute("UPDATE t SET v = 'x' || v WHERE id % 2 = 1")
    settle(a)
    until4, n4 = chunked_pull(a, b, until3, 3000, between)
    until4, _ = chunked_pull(a, b, until4, 3000)
    check(n4 >= 5 and table(a, "t") == table(b, "t") and table(a, "kv") == table(b, "kv"),
          f"incremental chunked pull of ~14,000 changed rows in key order ({n4} chunks) converges")
    until2 = until4

    # PG -> SQLite
    s = sqlite3.connect(":memory:", isolation_level=None)
    s.enable_load_extension(True)
    s.load_extension(str(ROOT / "build" / "sqlitesync.so"))
    s.execute("CREATE TABLE t (id INT NOT NULL PRIMARY KEY, v TEXT)")
    s.execute("CREATE TABLE kv (k1 TEXT NOT NULL, k2 INT NOT NULL, val BLOB, PRIMARY KEY (k1, k2))")
    s.execute("SELECT sync_init('t')")
    s.execute("SELECT sync_init('kv')")
    cursor = None
    chunks = 0
    while True:
        p = one(a, "SELECT sync_payload(0, NULL, 333, %s)", (cursor,))
        s.execute("SELECT sync_apply_payload(?)", (bytes(p),))
        chunks += 1
        cursor = one(a, "SELECT sync_payload_cursor(%s)", (p,))
        if cursor is None:
            break
        cursor = bytes(cursor)
    lite = s.execute("SELECT count(*), sum(length(v)) FROM t").fetchone()
    pg = rows(a, "SELECT count(*), sum(length(v)) FROM t")[0]
    check(tuple(lite) == tuple(pg), f"PG -> SQLite chunked ({chunks} chunks) converges")

    # forged cursors
    p = bytes(one(a, "SELECT sync_payload(0, NULL, 10, NULL)"))
    c = bytes(one(a, "SELECT sync_payload_cursor(%s)", (p,)))
    for bad in (b"", c[:-1], c + b"\x00", b"\x07" + c[1:], b"\x01\x00\x05\x63\x01\x01\x02"):
        try:
            one(a, "SELECT sync_payload(0, NULL, 10, %s)", (bad,))
            check(False, f"forged cursor {bad!r} refused")
        except psycopg2.Error as e:
            check("continuation token" in str(e), f"forged cursor {bad[:8]!r} refused: {e.pgerror.splitlines()[0]}")
    try:
        one(a, "SELECT sync_payload(5, NULL, 10, %s)", (c,))
        check(False, "cursor of another since refused")
    except psycopg2.Error:
        check(True, "cursor of another since refused")
    try:
        one(b, "SELECT sync_payload_cursor(%s)", (p,))
        check(False, "cursor of a payload built elsewhere refused")
    except psycopg2.Error:
        check(True, "cursor of a payload built elsewhere refused")
    # sync_payload reads as the caller (RLS applies): anybody may call it;
    # sync_device, which says which device a request acts for, is the server's
    check(one(a, "SELECT has_function_privilege('public', "
                 "'sync_payload(bigint, uuid, integer, bytea)', 'execute')") is True,
          "chunked sync_payload is open to PUBLIC (it reads as the caller)")
    check(one(a, "SELECT has_function_privilege('public', 'sync_device(uuid, text)', 'execute')")
          is False, "sync_device is revoked from PUBLIC")
    a.close()
    b.close()
    drop_db("pgsync_t_chunk_a")
    drop_db("pgsync_t_chunk_b")
    return 0


if __name__ == "__main__":
    sys.exit(main())
