#!/usr/bin/python3
"""bench/pg_bench_apply.py — concurrent applies on PostgreSQL.

Run through `bash test/pg/cluster.sh bench` (throwaway cluster; needs
build/sqlitesync.so for the payloads), or against any server with pgsync
(PGHOST, PGPORT, PGUSER; it creates and drops pgsync_bench_apply).

Every connection applies one-row payloads of its own devices, each in a
transaction shaped like the server's push (BEGIN; sync_apply_payload;
SELECT sync_db_version(); COMMIT), with 1 and with 8 connections (the
server's default pool):

  disjoint  each payload inserts a new row (keys never shared)
  hot       each payload updates one of 10 rows that every device shares

Applies used to run one at a time (one advisory lock until commit); they now
run in parallel and queue only for the rows they share (docs/PG.md,
"Concurrency"). 8 connections run once more with the old lock
(pgsync.serialize_applies = on) for comparison. Prints applies/s and, for disjoint keys, the speed-up of 8
connections over one (target >= 3x on a machine with the cores for it; a
2-core machine running clients and server measures much less).
"""
import os
import random
import sqlite3
import sys
import threading
import time

import psycopg2

ROOT = os.environ.get("PGSYNC_ROOT", os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
EXT = os.environ.get("SQLITESYNC_EXT", os.path.join(ROOT, "build", "sqlitesync.so"))
SECONDS = float(os.environ.get("PGSYNC_BENCH_SECONDS", "1.5"))
# payloads per connection: enough for 1 connection alone at ~3,500/s, then 8
# twice (concurrent, serialized)
# at ~12,000/s in all (a payload takes ~1 ms to make)
SCALE = float(os.environ.get("PGSYNC_BENCH_SCALE", "1"))
DB = "pgsync_bench_apply"
DDL = "CREATE TABLE items (id TEXT PRIMARY KEY, title TEXT, n INTEGER)"
HOT = 10


def device(seed_payload=None):
    c = sqlite3.connect(":memory:", isolation_level=None)
    c.enable_load_extension(True)
    c.load_extension(EXT)
    c.enable_load_extension(False)
    c.execute(DDL)
    c.execute("SELECT sync_init('items')")
    if seed_payload:
        c.execute("SELECT sync_apply_payload(?)", (seed_payload,))
    return c


def one_row_payloads(n, write, seed_payload=None):
    """n payloads of one local write each (write(c, i) makes it). A SQLite
    pull reads its whole clock table, so a fresh device every 250 writes."""
    out = []
    for i in range(n):
        if i % 250 == 0:
            c = device(seed_payload)
        since = c.execute("SELECT sync_db_version()").fetchone()[0]
        write(c, i)
        out.append(bytes(c.execute("SELECT sync_payload(?)", (since,)).fetchone()[0]))
    return out


def run(workers, payloads, serialized=False):
    """Applies payloads[w] from `workers` connections for SECONDS; applies/s.
    serialized: with the old global lock (pgsync.serialize_applies)."""
    conns = [psycopg2.connect(dbname=DB) for _ in range(workers)]
    for c in conns:
        c.cursor().execute(f"SET pgsync.serialize_applies = {'on' if serialized else 'off'}")
        c.commit()
    done = [0] * workers
    errors = []
    start = threading.Barrier(workers + 1)
    stop = [0.0]

    def loop(w):
        cur = conns[w].cursor()
        mine = payloads[w]
        start.wait()
        k = 0
        while time.perf_counter() < stop[0] and k < len(mine):
            try:
                cur.execute("SELECT sync_apply_payload(%s)", (mine[k],))
                cur.execute("SELECT sync_db_version()")
                conns[w].commit()
            except Exception as e:  # noqa: BLE001
                conns[w].rollback()
                errors.append(f"{type(e).__name__}: {e}")
            k += 1
            done[w] += 1

    ts = [threading.Thread(target=loop, args=(w,)) for w in range(workers)]
    for t in ts:
        t.start()
    stop[0] = time.perf_counter() + SECONDS
    t0 = time.perf_counter()
    start.wait()
    for t in ts:
        t.join()
    dt = time.perf_counter() - t0
    for c in conns:
        c.close()
    if errors:
        print(f"  {len(errors)} errors, e.g. {errors[0]}")
    if any(d == len(p) for d, p in zip(done, payloads)):
        print("  (a device ran out of payloads: raise PGSYNC_BENCH_SCALE)")
    return sum(done) / dt, len(errors), done


def main():
    if not os.path.exists(EXT):
        print(f"SKIP pg_bench_apply: {EXT} not built (make all)")
        return 0
    admin = psycopg2.connect(dbname=os.environ.get("PGDATABASE", "postgres"))
    admin.autocommit = True
    admin.cursor().execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    admin.cursor().execute(f"CREATE DATABASE {DB}")
    hub = psycopg2.connect(dbname=DB)
    hub.autocommit = True
    h = hub.cursor()
    h.execute("CREATE EXTENSION pgsync")
    h.execute(DDL)
    h.execute("SELECT sync_init('items')")
    h.execute("INSERT INTO items SELECT 'hot-' || g, 'hot', 0 FROM generate_series(1, %s) g", (HOT,))
    h.execute("SELECT sync_payload(0)")
    seed = bytes(h.fetchone()[0])
    counts = (1, 8)
    rnd = random.Random(11)
    t0 = time.perf_counter()
    disjoint, hot = [], []
    for w in range(max(counts)):
        per = int(SCALE * SECONDS * (7500 if w == 0 else 2200)) + 100
        disjoint.append(one_row_payloads(
            per, lambda c, i, w=w: c.execute("INSERT INTO items VALUES (?, 'new', ?)",
                                             (f"d{w}-{i}", i))))
        hot.append(one_row_payloads(
            per, lambda c, i, w=w: c.execute("UPDATE items SET n = ? WHERE id = ?",
                                             (w * 1000000 + i + 1, f"hot-{rnd.randrange(HOT) + 1}")),
            seed))
    print(f"pgsync concurrent applies ({os.cpu_count()} cores, {SECONDS:g} s per figure; "
          f"payloads made in {time.perf_counter() - t0:.1f} s)")
    res = {}
    for kind, pl in (("disjoint", disjoint), ("hot", hot)):
        # 8 connections with the old global lock too, right after 8 without
        for n, ser in [(n, False) for n in counts] + [(max(counts), True)]:
            rate, errs, done = run(n, pl, ser)
            res[(kind, n, ser)] = rate
            how = "serialized" if ser else "concurrent"
            print(f"  {kind:<8} {n:>2} connections, {how:<10}  {rate:>8,.0f} applies/s  {errs} errors")
            for w in range(n):  # the next run goes on with payloads not applied yet
                pl[w] = pl[w][done[w]:]
    up = res[("disjoint", 8, False)] / res[("disjoint", 1, False)]
    print(f"  disjoint keys, 8 connections over 1: {up:.1f}x (target >= 3x with >= 4 cores: "
          f"{'met' if up >= 3 else 'missed' if os.cpu_count() >= 4 else 'not measurable here'})")
    for kind in ("disjoint", "hot"):
        r = res[(kind, 8, False)] / res[(kind, 8, True)]
        print(f"  {kind} keys, 8 connections, concurrent over serialized: {r:.1f}x "
              f"(the 3x target is on pushes with 50 clients: server_bench)")
    hub.close()
    admin.cursor().execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    admin.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
