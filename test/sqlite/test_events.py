"""Change events of applies (sqlite_ext/sl_events.c, docs/CLIENT.md "Change
events"): sync_network_changes(seq, tbl, pk, kind) and sync_network_counters.

The oracle: a replica's rows before and after each apply. A key whose row
appeared has an `insert` event, one that went a `delete`, one whose values
changed an `update`; nothing else has one, each key has one per apply, and
seq counts up by one per event across applies. A replica with a window of
changes_keep = k holds exactly the newest k events of a replica with an
unbounded window that received the same payloads, with the same seq numbers,
and the same counters (the events of an apply are kept in memory and only
those that stay in the window are written: this is what checks it).
"""
import json
import random

import synclib

FULL = 10 ** 9


def keep(r, k):
    r.xs("CREATE TABLE IF NOT EXISTS sync_network(key TEXT PRIMARY KEY, value) WITHOUT ROWID")
    r.x("INSERT OR REPLACE INTO sync_network(key, value) VALUES ('changes_keep', ?)", k)


def events(r):
    try:
        return r.q("SELECT seq, tbl, pk, kind FROM sync_network_changes ORDER BY seq")
    except Exception as e:  # the table is made by the first apply
        assert "no such table" in str(e), e
        return []


def counters(r):
    try:
        return r.q("SELECT tbl, changes, seq FROM sync_network_counters ORDER BY tbl")
    except Exception as e:
        assert "no such table" in str(e), e
        return []


def state(r):
    return {row[0]: row[1:] for row in r.q("SELECT id, v, w FROM t")}


def expected_kinds(before, after):
    out = {}
    for k in before.keys() | after.keys():
        if k not in after:
            out[k] = "delete"
        elif k not in before:
            out[k] = "insert"
        elif before[k] != after[k]:
            out[k] = "update"
    return out


def make(replica, name, k):
    r = replica(name)
    r.xs("CREATE TABLE t(id TEXT PRIMARY KEY NOT NULL, v INTEGER, w TEXT)")
    r.init("t")
    keep(r, k)
    return r


def test_window_is_the_newest_events_of_an_unbounded_one(replica):
    seed = random.randrange(1 << 30)
    rnd = random.Random(seed)
    src = make(replica, "src", FULL)
    windows = [1, 3, 64, 300]
    full = make(replica, "full", FULL)
    bounded = [make(replica, f"k{k}", k) for k in windows]
    n = 0
    since = 0
    total = 0
    for rnd_i in range(40):
        # the source writes: inserts, updates, deletes, re-inserts of gone keys
        src.x("BEGIN")
        for _ in range(rnd.choice([1, 5, 50, 400])):
            k = f"k{rnd.randrange(600)}"
            op = rnd.random()
            n += 1
            if op < 0.5:
                src.x("INSERT INTO t VALUES (?, ?, ?) ON CONFLICT(id) DO UPDATE SET v = excluded.v",
                      k, n, f"w{n}")
            elif op < 0.8:
                src.x("UPDATE t SET w = ? WHERE id = ?", f"u{n}", k)
            else:
                src.x("DELETE FROM t WHERE id = ?", k)
        src.x("COMMIT")
        p = src.payload(since)
        if p is None:
            continue
        since = synclib.until(src.conn, p)
        before = state(full)
        had = len(events(full))
        full.apply(p)
        after = state(full)
        new = events(full)[had:]
        want = expected_kinds(before, after)
        got = {json.loads(pk)["id"]: kind for _, tbl, pk, kind in new}
        assert len(got) == len(new), (seed, "a key has two events in one apply")
        assert got == want, (seed, rnd_i)
        assert all(tbl == "t" for _, tbl, _, _ in new)
        total += len(new)
        assert [e[0] for e in events(full)] == list(range(1, total + 1)), seed
        if rnd_i % 7 == 3:
            # an apply rolled back with its transaction leaves no events
            for r in bounded:
                r.x("BEGIN")
                r.apply(p)
                r.x("ROLLBACK")
        for r in bounded:
            r.apply(p)
        everything = events(full)
        for k, r in zip(windows, bounded):
            assert events(r) == everything[-k:], (seed, k, rnd_i)
            assert counters(r) == counters(full), (seed, k)
            assert state(r) == after
    assert counters(full) == [("t", total, total)]


def test_an_apply_larger_than_the_memory_ring(replica):
    """65,536 events are kept in memory (EV_RING); a window larger than that
    writes the oldest event that leaves the ring at once: every event is
    there, in order, once."""
    src = make(replica, "src", FULL)
    src.x("BEGIN")
    src.conn.executemany("INSERT INTO t VALUES (?, ?, ?)",
                         ((f"r{i:06d}", i, None) for i in range(70000)))
    src.x("COMMIT")
    p = src.payload(0)
    big = make(replica, "big", 100000)
    small = make(replica, "small", 1000)
    big.apply(p)
    small.apply(p)
    ev = events(big)
    assert [e[0] for e in ev] == list(range(1, 70001))
    assert {e[3] for e in ev} == {"insert"}
    assert sorted(json.loads(e[2])["id"] for e in ev) == [f"r{i:06d}" for i in range(70000)]
    assert events(small) == ev[-1000:]
    assert counters(small) == counters(big) == [("t", 70000, 70000)]
    # the next apply goes on numbering; the big window then trims from its start
    src.x("UPDATE t SET w = 'x' WHERE id IN ('r000001', 'r069999')")
    keep(big, 69000)
    p2 = src.payload(synclib.until(src.conn, p))
    big.apply(p2)
    small.apply(p2)
    ev2 = events(big)
    assert [e[0] for e in ev2] == list(range(1003, 70003))
    assert [e[3] for e in ev2[-2:]] == ["update", "update"]
    assert events(small) == ev2[-1000:]


def test_events_off_and_on(replica):
    src = make(replica, "src", FULL)
    dst = make(replica, "dst", 0)
    src.x("INSERT INTO t VALUES ('a', 1, NULL)")
    p = src.payload(0)
    dst.apply(p)
    assert events(dst) == [] and counters(dst) == []
    keep(dst, 10)
    src.x("INSERT INTO t VALUES ('b', 2, NULL)")
    dst.apply(src.payload(synclib.until(src.conn, p)))
    assert [(e[0], json.loads(e[2]), e[3]) for e in events(dst)] == [(1, {"id": "b"}, "insert")]
    # a losing (already known) change is no event; a local write is none either
    dst.apply(src.payload(0))
    dst.x("UPDATE t SET v = 9 WHERE id = 'a'")
    assert len(events(dst)) == 1
    assert counters(dst) == [("t", 1, 1)]


def parent_child(replica, suffix, k):
    """a source and a destination with tables p and c (c.pid references p), window k"""
    pair = replica(f"src{suffix}"), replica(f"dst{suffix}")
    for r in pair:
        keep(r, k)
        r.xs("CREATE TABLE p(id TEXT PRIMARY KEY NOT NULL);"
             "CREATE TABLE c(id TEXT PRIMARY KEY NOT NULL, pid TEXT REFERENCES p(id))")
        r.init("p")
        r.init("c")
    return pair


def test_rejected_rows_have_no_events(replica):
    """An apply that goes the careful way (a row whose parent is missing is
    rejected alone) records the events of the rows it applied, once."""
    src, dst = parent_child(replica, "", 100)
    src.xs("PRAGMA foreign_keys = OFF")
    src.xs("INSERT INTO p VALUES ('p1'); INSERT INTO c VALUES ('c1', 'p1'), ('c2', 'nobody'), "
           "('c3', 'p1')")
    dst.xs("PRAGMA foreign_keys = ON")
    dst.apply(src.payload(0))
    got = sorted((e[1], json.loads(e[2])["id"], e[3]) for e in events(dst))
    assert got == [("c", "c1", "insert"), ("c", "c3", "insert"), ("p", "p1", "insert")], got
    assert [e[0] for e in events(dst)] == [1, 2, 3]
    assert counters(dst) == [("c", 2, max(e[0] for e in events(dst) if e[1] == "c")),
                             ("p", 1, max(e[0] for e in events(dst) if e[1] == "p"))]


def test_the_app_drops_or_clears_the_event_tables(replica):
    """An app that drops the event tables (or empties them) does not break
    applies: the tables are made again and seq goes on from what is there."""
    src = make(replica, "src", FULL)
    dst = make(replica, "dst", 100)
    since = 0
    for i, act in enumerate(["", "DROP TABLE sync_network_changes", "DELETE FROM sync_network_changes",
                             "DROP TABLE sync_network_counters",
                             "DROP TABLE sync_network_changes; DROP TABLE sync_network_counters"]):
        if act:
            dst.xs(act)
        src.x("INSERT INTO t VALUES (?, ?, NULL)", f"a{i}", i)
        p = src.payload(since)
        since = synclib.until(src.conn, p)
        assert dst.apply(p) >= 1, act
        ev = events(dst)
        assert [json.loads(e[2])["id"] for e in ev][-1] == f"a{i}", (act, ev)
        assert ev[-1][0] == (1 if "sync_network_changes" in act else len(ev)), (act, ev)
    assert state(dst) == state(src)


def _bulk(src, prefix, n):
    src.x("BEGIN")
    src.conn.executemany("INSERT INTO t VALUES (?, ?, NULL)", ((f"{prefix}{i}", i) for i in range(n)))
    src.x("COMMIT")


def test_the_window_changes_on_an_open_connection(replica):
    """changes_keep read at each apply: smaller and larger than the last one's
    (the ring in memory follows it) on one connection, as a long-lived app's."""
    src = make(replica, "src", FULL)
    dst = make(replica, "dst", 10000)
    since = 0
    total = 0
    for n, k in [(200, 10000), (150, 100), (300, 250), (40, 100000), (5000, 3), (10, 7)]:
        keep(dst, k)
        _bulk(src, f"x{total}_", n)
        p = src.payload(since)
        since = synclib.until(src.conn, p)
        before = events(dst)
        dst.apply(p)
        total += n
        ev = events(dst)
        # as if every event were inserted and then those with seq <= total - k deleted
        want = [e for e in before if e[0] > total - k] + \
            [e for e in ev if e[0] > total - n]
        assert ev == want, (n, k, ev[:2], want[:2])
        assert [e[0] for e in ev if e[0] > total - n] == list(range(max(total - n, total - k) + 1,
                                                                    total + 1))
        assert counters(dst) == [("t", total, total)]


def test_careful_apply_makes_the_event_tables_again(replica):
    """The careful second pass of an apply (a row whose parent is missing)
    comes after a rollback that undid the event tables the first pass made:
    the app had dropped them, or had turned events on just now."""
    for how in ("dropped", "turned on"):
        src, dst = parent_child(replica, f" {how}", 0 if how == "turned on" else 100)
        if how == "dropped":
            src.x("INSERT INTO p VALUES ('p0')")
            dst.apply(src.payload(0))        # the tables exist now
            dst.xs("DROP TABLE sync_network_changes")
        else:
            keep(dst, 100)
        src.xs("PRAGMA foreign_keys = OFF")
        src.xs("INSERT INTO p VALUES ('p1'); INSERT INTO c VALUES ('c1', 'p1'), ('c2', 'nobody')")
        dst.xs("PRAGMA foreign_keys = ON")
        dst.apply(src.payload(0))
        got = sorted((e[1], json.loads(e[2])["id"], e[3]) for e in events(dst))
        assert got == [("c", "c1", "insert"), ("p", "p1", "insert")], (how, got)
