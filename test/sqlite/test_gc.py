"""test_gc.py — sync_gc on a device (docs/DESIGN.md, "Tombstone GC with a
horizon"): what it collects, what it keeps, the floor that makes re-inserts
of collected keys start above every life a peer may still hold, and its
errors. The network side (send_cursor, 410, PS005) is test/server/test_gc.py.
"""
import json

import pytest


def gc(r, *args):
    return json.loads(r.one("SELECT sync_gc(" + ", ".join("?" * len(args)) + ")", *args))


def clock(r, key):
    return r.q("SELECT cl FROM t__sync_clock WHERE id = ?", key)


@pytest.fixture
def a(replica):
    r = replica("a")
    r.xs("CREATE TABLE t(id TEXT PRIMARY KEY, v TEXT, n INTEGER)")
    r.init("t")
    return r


def test_nothing_acknowledged_nothing_collected(a):
    a.x("INSERT INTO t VALUES ('k', 'x', 1)")
    a.x("DELETE FROM t")
    # no server configured: nothing was acknowledged, sync_gc() keeps everything
    assert gc(a) == {"horizon": 0, "collected": 0, "tables": {"t": {"collected": 0, "floor": 0}}}
    assert clock(a, "k") == [(2,)]


def test_explicit_horizon_and_floor(a, replica):
    for k in ("k1", "k2", "k3"):
        a.x("INSERT INTO t VALUES (?, 'x', 1)", k)
    v1 = a.version()
    a.x("DELETE FROM t WHERE id IN ('k1', 'k2')")
    a.x("INSERT INTO t VALUES ('k2', 'again', 2)")      # k2: cl 3, alive
    a.x("DELETE FROM t WHERE id = 'k2'")                # k2: cl 4
    v2 = a.version()
    a.x("DELETE FROM t WHERE id = 'k3'")                # after the horizon below
    b = replica("b")                                    # a peer that holds every tombstone
    b.xs("CREATE TABLE t(id TEXT PRIMARY KEY, v TEXT, n INTEGER)")
    b.init("t")
    b.apply(a.payload(0))
    assert b.one("SELECT cl FROM t__sync_clock WHERE id = 'k2'") == 4
    v3 = a.version()
    # only tombstones at or below the horizon go; live rows never do
    r = gc(a, v2)
    assert r["collected"] == 2 and r["tables"]["t"]["floor"] == 4, r
    assert clock(a, "k1") == [] and clock(a, "k2") == [] and clock(a, "k3") == [(2,)]
    assert gc(a, v1)["collected"] == 0
    # a key without a clock row now starts its life above the floor: a peer
    # that still holds the tombstone of k2 (cl 4) takes the new life
    a.x("INSERT INTO t VALUES ('k2', 'third', 3)")
    assert clock(a, "k2") == [(5,)]
    a.x("INSERT INTO t VALUES ('fresh', 'new', 0)")     # any new key: above the floor
    assert clock(a, "fresh") == [(5,)]
    a.x("DELETE FROM t WHERE id = 'fresh'")
    b.apply(a.payload(v3))
    assert b.rows("t") == a.rows("t")
    assert b.q("SELECT v FROM t WHERE id = 'k2'") == [("third",)]
    # the floor survives a new connection
    a.close()
    a2 = replica("a")
    a2.x("INSERT INTO t VALUES ('k1', 'later', 4)")
    assert a2.one("SELECT cl FROM t__sync_clock WHERE id = 'k1'") == 5


def test_update_of_collected_row_and_key_change(a):
    a.x("INSERT INTO t VALUES ('k', 'x', 1)")
    a.x("DELETE FROM t")
    gc(a, a.version())
    # a row that reappears without a clock (written with the extension not
    # loaded elsewhere is impossible; a key change is the path): above the floor
    a.x("INSERT INTO t VALUES ('j', 'y', 2)")
    a.x("UPDATE t SET id = 'k' WHERE id = 'j'")
    assert clock(a, "k") == [(3,)] and clock(a, "j") == [(4,)]


def test_rejected_rows_keep_their_tombstone(a):
    a.x("INSERT INTO t VALUES ('k', 'x', 1)")
    a.x("DELETE FROM t")
    a.xs("CREATE TABLE IF NOT EXISTS sync_network_rejected(tbl TEXT NOT NULL, pk TEXT NOT NULL, "
         "origin TEXT NOT NULL DEFAULT 'server', code TEXT, message TEXT, first_attempt TEXT NOT "
         "NULL, last_attempt TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 1, PRIMARY KEY "
         "(tbl, pk, origin)) WITHOUT ROWID")
    a.x("INSERT INTO sync_network_rejected VALUES ('t', '{\"id\":\"k\"}', 'server', '42501', "
        "'refused', 'now', 'now', 1)")
    assert gc(a, a.version())["collected"] == 0
    assert clock(a, "k") == [(2,)]
    a.x("DELETE FROM sync_network_rejected")
    assert gc(a, a.version())["collected"] == 1


def test_errors(a, replica):
    with pytest.raises(Exception, match="horizon must be a local version"):
        a.one("SELECT sync_gc(-1)")
    with pytest.raises(Exception, match="horizon must be a local version"):
        a.one("SELECT sync_gc('x')")
    empty = replica("empty")
    with pytest.raises(Exception, match="call sync_init first"):
        empty.one("SELECT sync_gc()")
