#!/usr/bin/python3
"""test_ordering — the pull-ordering trap (docs/PG.md).

T1 writes first (older version) but commits last; T2 writes and commits; a
client pulls in between and records how far it got; after T1 commits, the
next pull from that point must still bring T1's change.
"""
import sys
import time

import psycopg2

from pglib import check, connect, fresh_db, one, pull, rows, drop_db

DDL = ["CREATE TABLE t (id int PRIMARY KEY, v text)", "SELECT sync_init('t')",
       "INSERT INTO t VALUES (0, 'before')"]


def keys(conn, payload):
    if payload is None:
        return set()
    return {r[0] for r in rows(conn, """SELECT (r->'key'->>0)::int FROM
        jsonb_array_elements(sync_payload_info(%s)->'rows') r""", (payload,))}


def scenario(commit_t1):
    hub = fresh_db("pgsync_t_order", DDL)
    mirror = fresh_db("pgsync_t_order_m", DDL)
    s1 = connect("pgsync_t_order", autocommit=False)
    s2 = connect("pgsync_t_order", autocommit=False)

    s1.cursor().execute("INSERT INTO t VALUES (1, 'from T1')")
    v1 = one(s1, "SELECT pg_current_xact_id()::text::bigint")
    s2.cursor().execute("INSERT INTO t VALUES (2, 'from T2')")
    v2 = one(s2, "SELECT pg_current_xact_id()::text::bigint")
    check(v1 < v2, "T1 got the older version")
    s2.commit()

    p1, since = pull(hub, 0)
    first = keys(hub, p1)
    # T2's committed change may already travel (the core sends every committed
    # stamp above since), but the recorded point must stay below T1
    check(1 not in first, f"a pull while T1 runs cannot see T1's change (got {first})")
    check(since < v1, f"the recorded point ({since}) stays below T1's version ({v1})")
    check(one(hub, "SELECT sync_db_version()") < v1, "sync_db_version stays below T1")
    # db_version_safe reads the active snapshot in C: the same as SQL says
    same = rows(hub, "SELECT sync_db_version(), pg_snapshot_xmin(pg_current_snapshot())::text::bigint - 1")
    check(same[0][0] == same[0][1], f"sync_db_version is the snapshot's xmin - 1 ({same[0]})")
    if p1:
        one(mirror, "SELECT sync_apply_payload(%s)", (p1,))

    if commit_t1:
        s1.commit()
    else:
        s1.rollback()
    # (another session, e.g. autovacuum's ANALYZE, may hold the safe point
    # back for a moment: pull until it has moved past T2)
    got, since2 = set(), since
    for _ in range(100):
        p2, since2 = pull(hub, since2)
        got |= keys(hub, p2)
        if p2:
            one(mirror, "SELECT sync_apply_payload(%s)", (p2,))
        if since2 >= v2:
            break
        time.sleep(0.1)
    want = {1, 2} if commit_t1 else {2}
    check(want <= got and got <= {0, 1, 2},
          f"after T1 ends, the next pulls from the recorded point bring T1's change ({got})")
    check(since2 >= v2, "and the recorded point moves past T2")
    want = rows(hub, "SELECT * FROM t ORDER BY id")
    check(rows(mirror, "SELECT * FROM t ORDER BY id") == want, "the mirror equals the hub")
    p3, _ = pull(hub, since2)
    check(p3 is None, "nothing left to pull")
    for c in (s1, s2, hub, mirror):
        c.close()


def in_transaction_pull():
    """A pull inside a transaction that wrote does not see its own changes yet."""
    hub = fresh_db("pgsync_t_order", DDL)
    s = connect("pgsync_t_order", autocommit=False)
    s.cursor().execute("INSERT INTO t VALUES (5, 'x')")
    try:
        one(s, "SELECT sync_payload(0)")
        check(False, "a pull in a transaction that wrote synced rows is refused")
    except psycopg2.Error as e:
        check(e.pgcode == "25000", "a pull in a transaction that wrote synced rows is refused")
    s.rollback()
    s.cursor().execute("INSERT INTO t VALUES (5, 'x')")
    s.commit()
    check(one(hub, "SELECT sync_payload(0)") is not None, "after commit it is")
    s.close()
    hub.close()


def main():
    scenario(commit_t1=True)
    scenario(commit_t1=False)
    in_transaction_pull()
    drop_db("pgsync_t_order")
    drop_db("pgsync_t_order_m")
    return 0


if __name__ == "__main__":
    sys.exit(main())
