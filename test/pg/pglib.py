"""pglib — helpers for the PostgreSQL tests of pgsync (test/pg/test_*.py).

The tests run against the cluster started by test/pg/cluster.sh (PGHOST,
PGPORT, PGUSER from the environment); each creates its own databases.
"""
import os
import pathlib
import time

import psycopg2

ROOT = pathlib.Path(os.environ.get("PGSYNC_ROOT", pathlib.Path(__file__).resolve().parents[2]))


def connect(db, autocommit=True):
    c = psycopg2.connect(dbname=db)
    c.autocommit = autocommit
    return c


def fresh_db(name, ddl=()):
    """fresh_db (re)creates database name with pgsync and runs ddl there."""
    admin = connect(os.environ.get("PGDATABASE", "postgres"))
    cur = admin.cursor()
    cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    cur.execute(f"CREATE DATABASE {name}")
    admin.close()
    c = connect(name)
    cur = c.cursor()
    cur.execute("SET client_min_messages = warning")
    cur.execute("CREATE EXTENSION pgsync")
    for stmt in ddl:
        cur.execute(stmt)
    return c


def drop_db(name):
    admin = connect(os.environ.get("PGDATABASE", "postgres"))
    admin.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()


def one(conn, sql, args=None):
    cur = conn.cursor()
    cur.execute(sql, args)
    row = cur.fetchone()
    return row[0] if row else None


def rows(conn, sql, args=None):
    cur = conn.cursor()
    cur.execute(sql, args)
    return cur.fetchall()


def pull(src, since, exclude=None):
    """pull returns (payload or None, new since) from src."""
    p = one(src, "SELECT sync_payload(%s, %s)", (since, exclude))
    if p is None:
        return None, since
    return bytes(p), one(src, "SELECT sync_payload_until(%s)", (p,))


def payload_of(db, key, v):
    """Writes row (key, v) of table t (id text PRIMARY KEY, v int) in db and
    returns (db's whole payload, db's site id)."""
    c = connect(db)
    c.cursor().execute("INSERT INTO t VALUES (%s, %s) ON CONFLICT (id) DO UPDATE SET v = %s",
                       (key, v, v))
    p = bytes(one(c, "SELECT sync_payload(0)"))
    site = one(c, "SELECT sync_site_id()")
    c.close()
    return p, site


def wait_safe(conn, xid, timeout=30):
    """Waits until sync_db_version() has passed xid: every transaction
    older than it ended (any session's, an autoanalyze's), so a pull from
    xid - 1 carries what xid wrote and a pull's until is at least xid."""
    end = time.monotonic() + timeout
    while one(conn, "SELECT sync_db_version()") < xid:
        if time.monotonic() > end:
            raise AssertionError(f"sync_db_version() still below {xid} after {timeout} s")
        time.sleep(0.01)


def settle(conn):
    """Waits until every transaction that began before now has ended: a
    pull then reaches past everything written so far."""
    wait_safe(conn, int(one(conn, "SELECT pg_current_xact_id()::text")))


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok -", what)
