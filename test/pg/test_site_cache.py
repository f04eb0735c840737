#!/usr/bin/python3
"""test_site_cache — what a backend keeps of pgsync.sites between calls.

A backend remembers this database's site id and the sites it has read
(pg_ext/pg_session.c pgsync_conn_init, pg_database.c "the backend's sites"),
so a push no longer reads them with statements of its own each time. What
it keeps must never outlive the rows it came from:
1. a site first recorded by a transaction that rolls back (whole, or to a
   savepoint) is recorded again, under a new index, by the next apply in
   the same backend, and every clock names a site that exists;
2. DROP EXTENSION and CREATE EXTENSION in the same backend give the
   database a new site id, which its payloads then carry;
3. sync_cleanup and sync_init in another backend are seen by the next apply
   of this backend (the payload name -> table lookup): a table synced no
   more holds the payload's changes (PS003), synced again takes them;
4. another backend drops and creates the extension while this backend's
   transaction is open (it has not read the invalidations yet): the next
   apply of that transaction uses the new extension's site id and sites,
   and records the payload's site there (found by review: the relid of
   pgsync.sites came from the syscache without a lock, so the old one);
5. the extension dropped without CASCADE (its triggers dropped by hand
   first, so nothing invalidates the synced table itself) and created
   again: the next apply holds the payload's changes, the table is no
   longer synced.
Every step runs on one connection (one backend) except where it says so.
"""
import threading
import time

from pglib import check, connect, drop_db, fresh_db, one, payload_of, rows

DDL = ["CREATE TABLE t (id text PRIMARY KEY, v int)", "SELECT sync_init('t')"]


def main():
    dbs = ["sc_a", "sc_b", "sc_d"]
    try:
        for d in dbs:
            fresh_db(d, DDL).close()
        pa, site_a = payload_of("sc_a", "a1", 1)
        pb, site_b = payload_of("sc_b", "b1", 1)
        d = connect("sc_d", autocommit=False)
        cur = d.cursor()

        def apply(p):
            """d applies p in a transaction of its own"""
            cur.execute("SELECT sync_apply_payload(%s)", (p,))
            d.commit()

        # 1. a site recorded by a transaction that rolls back
        cur.execute("SELECT sync_apply_payload(%s)", (pa,))
        cur.execute("SELECT sync_apply_payload(%s)", (pa,))  # reads the row back, same transaction
        idx_rolled = one(d, "SELECT idx FROM pgsync.sites WHERE site = %s", (site_a,))
        d.rollback()
        check(one(d, "SELECT count(*) FROM pgsync.sites WHERE site = %s", (site_a,)) == 0,
              "the rolled back apply left no site behind")
        cur.execute("SELECT sync_apply_payload(%s)", (pb,))
        cur.execute("SAVEPOINT s")
        cur.execute("SELECT sync_apply_payload(%s)", (pa,))
        cur.execute("ROLLBACK TO SAVEPOINT s")
        apply(pa)
        idx_a = one(d, "SELECT idx FROM pgsync.sites WHERE site = %s", (site_a,))
        check(idx_a is not None and idx_a != idx_rolled,
              f"the site is recorded again under a new index ({idx_rolled} rolled back, now {idx_a})")
        # the same backend, next transactions: the site is read from the table once,
        # then kept; every clock must name a recorded site
        pa2, _ = payload_of("sc_a", "a2", 2)
        apply(pa2)
        pd = bytes(one(d, "SELECT sync_payload(0)"))
        d.commit()
        check(rows(d, "SELECT id, v FROM t ORDER BY id") == [("a1", 1), ("a2", 2), ("b1", 1)],
              "every row applied")
        info_sites = one(d, "SELECT sync_payload_info(%s)", (pd,))
        check(str(site_a) in str(info_sites) and str(site_b) in str(info_sites),
              "the database's payload names both sites")
        # the payload goes back to A: every change is A's own or B's, nothing wins twice
        a = connect("sc_a")
        won = one(a, "SELECT sync_apply_payload(%s)", (pd,))
        check(rows(a, "SELECT id, v FROM t ORDER BY id") == [("a1", 1), ("a2", 2), ("b1", 1)],
              f"A converges with D (won {won})")
        a.close()

        # 2. the extension dropped and created again in the same backend
        old_site = one(d, "SELECT sync_site_id()")
        d.commit()
        cur.execute("SET client_min_messages = warning")
        cur.execute("DROP EXTENSION pgsync CASCADE")
        cur.execute("CREATE EXTENSION pgsync")
        d.commit()
        cur.execute("DROP TABLE t, t__sync_clock")
        for s in DDL:
            cur.execute(s)
        d.commit()
        new_site = one(d, "SELECT sync_site_id()")
        d.commit()
        check(new_site != old_site, "a new extension has a new site id")
        cur.execute("INSERT INTO t VALUES ('d1', 1)")
        d.commit()
        p = bytes(one(d, "SELECT sync_payload(0)"))
        d.commit()
        info = str(one(d, "SELECT sync_payload_info(%s)", (p,)))
        check(str(new_site) in info and str(old_site) not in info,
              "its payload carries the new site id, not the old one")
        apply(pa)  # sites of the old extension are gone
        check(one(d, "SELECT count(*) FROM pgsync.sites WHERE site = %s", (site_a,)) == 1,
              "a site is recorded again in the new extension's table")

        # 3. another backend stops syncing t, then syncs it again
        other = connect("sc_d")
        other.cursor().execute("SELECT sync_cleanup('t')")
        pa3, _ = payload_of("sc_a", "a3", 3)
        apply(pa3)
        check(one(d, "SELECT count(*) FROM t WHERE id = 'a3'") == 0 and
              one(d, "SELECT count(*) FROM pgsync.held WHERE code = 'PS003'") > 0,
              "a table synced no more (another backend's sync_cleanup) holds the payload's changes")
        other.cursor().execute("SELECT sync_init('t')")
        other.close()
        apply(pa3)
        check(one(d, "SELECT v FROM t WHERE id = 'a3'") == 3, "synced again, it takes the payload")

        # 4. the extension recreated by another backend during d's transaction
        for _ in range(2):      # a recorded, then read back committed: kept by the backend
            apply(pa)
        # d's statement waits on an advisory lock o holds (a running statement
        # reads no invalidations; an idle backend would, on the catch-up
        # signal that so much DDL sends), then applies
        o = connect("sc_d")
        oc = o.cursor()
        oc.execute("SET client_min_messages = warning")
        oc.execute("SELECT pg_advisory_lock(4711)")
        pa4, _ = payload_of("sc_a", "a4", 4)
        box = {}

        def apply_after_lock():
            try:
                cur.execute("SELECT pg_advisory_xact_lock(4711), sync_apply_payload(%s), "
                            "sync_site_id()", (pa4,))
                box["seen"] = cur.fetchone()[2]
                d.commit()
            except Exception as e:  # noqa: BLE001
                box["error"] = f"{type(e).__name__}: {e}"
        th = threading.Thread(target=apply_after_lock)
        th.start()
        deadline = time.monotonic() + 30
        while one(o, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted") == 0:
            check(time.monotonic() < deadline, "d never waited for the advisory lock")
            time.sleep(0.02)
        oc.execute("DROP EXTENSION pgsync CASCADE")
        oc.execute("DROP TABLE t__sync_clock")
        oc.execute("CREATE EXTENSION pgsync")
        oc.execute("SELECT sync_init('t')")
        oc.execute("SELECT sync_apply_payload(%s)", (pb,))   # b takes the first index there
        oc.execute("SELECT pg_advisory_unlock(4711)")
        th.join(60)
        check("error" not in box and "seen" in box, f"the waiting apply ran: {box}")
        seen = box["seen"]
        now = one(o, "SELECT site FROM pgsync.sites WHERE idx = 0")
        check(seen == now, f"the apply in the open transaction used the new site id ({seen} vs {now})")
        check(one(o, "SELECT count(*) FROM pgsync.sites WHERE site = %s", (site_a,)) == 1,
              "... and recorded the payload's site in the new extension's table")
        info = one(o, "SELECT sync_payload_info(%s)", (bytes(one(o, "SELECT sync_payload(0)")),))
        a4 = [r for r in info["rows"] if r["key"] == ["a4"]]
        check(a4 and all(c["site"] == str(site_a) for c in a4[0]["changes"]),
              f"... and its clocks name the site that wrote a4: {a4}")

        # 5. DROP EXTENSION without CASCADE once the triggers are gone
        pa5, _ = payload_of("sc_a", "a5", 5)
        apply(pa5)
        oc.execute("DROP TRIGGER pgsync_capture ON t")
        oc.execute("DROP TRIGGER pgsync_truncate ON t")
        pa6, _ = payload_of("sc_a", "a6", 6)
        apply(pa6)   # the table's entry read again
        oc.execute("DROP EXTENSION pgsync")
        oc.execute("CREATE EXTENSION pgsync")
        pa7, _ = payload_of("sc_a", "a7", 7)
        apply(pa7)
        check(one(d, "SELECT count(*) FROM t WHERE id = 'a7'") == 0 and
              one(d, "SELECT count(*) FROM pgsync.held WHERE code = 'PS003'") > 0,
              "a new extension that does not sync t holds the payload's changes")
        o.close()
        d.close()
    finally:
        for x in dbs:
            drop_db(x)


if __name__ == "__main__":
    main()
