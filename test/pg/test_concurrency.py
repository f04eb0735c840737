#!/usr/bin/python3
"""test_concurrency — many writers and concurrent applies on one hub.

Writers (single-row transactions: insert/upsert, update, delete, key change)
hammer a hub and a peer; meanwhile one thread pulls hub -> peer, one peer ->
hub, and one pulls the hub incrementally into a mirror (so a pull racing
with commits must never skip a change). No deadlock or other error may
occur; at the end, after a last exchange, hub, peer and mirror are equal.
"""
import os
import random
import sys
import threading
import time

import psycopg2

from pglib import check, connect, drop_db, fresh_db, one, pull, rows

DDL = ["CREATE TABLE items (id text PRIMARY KEY, n int, x float8, note text)",
       "SELECT sync_init('items')"]
SECONDS = 6
WRITERS = 6
KEYS = 300
errors = []
stop = threading.Event()
counts = {"writes": 0, "applies": 0, "pulls": 0}
sinces = {}
lock = threading.Lock()


def writer(db, seed, prefix):
    rnd = random.Random(seed)
    c = connect(db, autocommit=False)
    cur = c.cursor()
    while not stop.is_set():
        k = f"{rnd.choice([prefix, 's'])}-{rnd.randrange(KEYS)}"
        op = rnd.random()
        try:
            if op < 0.45:
                cur.execute("""INSERT INTO items VALUES (%s, %s, %s, %s)
                               ON CONFLICT (id) DO UPDATE SET n = EXCLUDED.n, note = EXCLUDED.note""",
                            (k, rnd.randrange(1000), rnd.random(), f"w{seed}"))
            elif op < 0.8:
                cur.execute("UPDATE items SET n = n + 1, x = %s WHERE id = %s", (rnd.random(), k))
            elif op < 0.95:
                cur.execute("DELETE FROM items WHERE id = %s", (k,))
            else:
                cur.execute("""UPDATE items SET id = %s WHERE id = %s
                               AND NOT EXISTS (SELECT 1 FROM items WHERE id = %s)""",
                            (k + "m", k, k + "m"))
            c.commit()
            with lock:
                counts["writes"] += 1
        except psycopg2.errors.UniqueViolation:
            c.rollback()		# a key change racing with an insert of the same key
        except Exception as e:  # noqa: BLE001
            c.rollback()
            errors.append(f"writer {seed}: {type(e).__name__}: {e}")
            return
    c.close()


def syncer(src_db, dst_db, exclude_dst):
    src, dst = connect(src_db), connect(dst_db)
    since = 0
    dst_site = one(dst, "SELECT sync_site_id()") if exclude_dst else None
    while not stop.is_set():
        try:
            p, since = pull(src, since, dst_site)
            sinces[(src_db, dst_db)] = since
            with lock:
                counts["pulls"] += 1
            if p:
                one(dst, "SELECT sync_apply_payload(%s)", (p,))
                with lock:
                    counts["applies"] += 1
        except Exception as e:  # noqa: BLE001
            errors.append(f"sync {src_db}->{dst_db}: {type(e).__name__}: {e}")
            return
        time.sleep(0.01)
    return since


def main():
    hub = fresh_db("pgsync_t_conc_hub", DDL)
    peer = fresh_db("pgsync_t_conc_peer", DDL)
    mirror = fresh_db("pgsync_t_conc_mirror", DDL)
    threads = [threading.Thread(target=writer, args=("pgsync_t_conc_hub", i, "h"))
               for i in range(WRITERS)]
    threads += [threading.Thread(target=writer, args=("pgsync_t_conc_peer", 100 + i, "p"))
                for i in range(2)]
    threads += [threading.Thread(target=syncer, args=("pgsync_t_conc_hub", "pgsync_t_conc_peer", True)),
                threading.Thread(target=syncer, args=("pgsync_t_conc_peer", "pgsync_t_conc_hub", True)),
                threading.Thread(target=syncer, args=("pgsync_t_conc_hub", "pgsync_t_conc_mirror", False))]
    for t in threads:
        t.start()
    time.sleep(SECONDS)
    stop.set()
    for t in threads:
        t.join()
    print("counts:", counts)
    check(not errors, "no deadlock or error in writers and appliers: " + "; ".join(errors[:5]))
    check(counts["writes"] > 500 and counts["applies"] > 10, "the run did real work")

    # final exchange until quiet; the mirror only pulls incrementally from the hub
    since_hp = sinces.get(("pgsync_t_conc_hub", "pgsync_t_conc_peer"), 0)
    since_ph = sinces.get(("pgsync_t_conc_peer", "pgsync_t_conc_hub"), 0)
    for _ in range(3):
        p, since_hp = pull(hub, since_hp, one(peer, "SELECT sync_site_id()"))
        if p:
            one(peer, "SELECT sync_apply_payload(%s)", (p,))
        p, since_ph = pull(peer, since_ph, one(hub, "SELECT sync_site_id()"))
        if p:
            one(hub, "SELECT sync_apply_payload(%s)", (p,))
    # the mirror continues from the point its syncer recorded: a change that
    # committed late with an older version must not have been skipped
    p, _ = pull(hub, sinces.get(("pgsync_t_conc_hub", "pgsync_t_conc_mirror"), 0))
    if p:
        one(mirror, "SELECT sync_apply_payload(%s)", (p,))
    q = "SELECT id, n, x, note FROM items ORDER BY id"
    h, pe, m = rows(hub, q), rows(peer, q), rows(mirror, q)
    if h != pe:
        dh, dp = dict((r[0], r) for r in h), dict((r[0], r) for r in pe)
        for k in sorted(set(dh) | set(dp)):
            if dh.get(k) != dp.get(k):
                print("DIFF", k, dh.get(k), dp.get(k),
                      rows(hub, "SELECT cl, ver, encode(clk,'hex') FROM items__sync_clock WHERE id=%s", (k,)),
                      rows(peer, "SELECT cl, ver, encode(clk,'hex') FROM items__sync_clock WHERE id=%s", (k,)))
    if h != pe and os.environ.get("DEBUG_FULL"):
        p, _ = pull(hub, 0)
        one(peer, "SELECT sync_apply_payload(%s)", (p,))
        p, _ = pull(peer, 0)
        one(hub, "SELECT sync_apply_payload(%s)", (p,))
        print("after full exchange equal:", rows(hub, q) == rows(peer, q))

    check(h == pe, f"hub and peer converge ({len(h)} rows)")
    check(h == m, "the mirror, pulling incrementally while writers committed, equals the hub")
    clocks = "SELECT id, cl FROM items__sync_clock ORDER BY id"
    check(rows(hub, clocks) == rows(peer, clocks), "and so do their clocks")
    for c in (hub, peer, mirror):
        c.close()
    for d in ("pgsync_t_conc_hub", "pgsync_t_conc_peer", "pgsync_t_conc_mirror"):
        drop_db(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
