"""gc_bench.py — metadata bytes per live row and per deleted row after
insert/delete churn, before and after tombstone GC (issue 11), on Postgres
behind pgsync-server and on a SQLite device. Run by bench/gc_bench.sh
(`make bench`); loopback only.

Bytes are the clock rows' stored bytes: on Postgres pg_column_size of the
clock row (key, cl, ver, clock blob, tuple header), on SQLite the key, the
clock blob and three integers (8 bytes each). Per deleted row: bytes of
every tombstone divided by the number of deleted rows.
"""
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "test", "server"))
from harness import SCHEMA, Env, token  # noqa: E402

N = int(os.environ.get("PGS_GC_BENCH_ROWS", "20000"))


def pg_meta(env):
    clock = env.sql("SELECT clock::text FROM pgsync.tables WHERE name = 'items'", fetch=True)[0][0]
    r = env.sql("SELECT count(*) FILTER (WHERE cl % 2 = 1), count(*) FILTER (WHERE cl % 2 = 0), "
                "coalesce(sum(pg_column_size(c.*)) FILTER (WHERE cl % 2 = 1), 0), "
                "coalesce(sum(pg_column_size(c.*)) FILTER (WHERE cl % 2 = 0), 0) "
                f"FROM {clock} c", fetch=True)[0]
    return tuple(int(x) for x in r)


def sl_meta(c):
    return c.db.execute(
        "SELECT count(*) FILTER (WHERE cl % 2 = 1), count(*) FILTER (WHERE cl % 2 = 0), "
        "coalesce(sum(length(CAST(id AS BLOB)) + length(clk) + 24) FILTER (WHERE cl % 2 = 1), 0), "
        "coalesce(sum(length(CAST(id AS BLOB)) + length(clk) + 24) FILTER (WHERE cl % 2 = 0), 0) "
        "FROM items__sync_clock").fetchone()


def main():
    env = Env(schema=SCHEMA + "\nGRANT EXECUTE ON FUNCTION sync_gc(interval) TO authenticator;")
    try:
        env.sql(f"ALTER DATABASE {env.db} SET pgsync.record_interval = 0")  # acked at once
        s = env.server(gc_interval=0)
        a = env.client("a", "alice", s)
        b = env.client("b", "bob", s)
        rng = random.Random(11)
        keys = [f"{i:08d}-{rng.randrange(1 << 30):08x}" for i in range(N)]
        a.db.execute("BEGIN")
        a.db.executemany("INSERT INTO items VALUES (?, 'name', ?, 1.5)", [(k, i) for i, k in enumerate(keys)])
        a.db.execute("COMMIT")
        a.sync(), b.sync()
        # churn: three rounds of deleting a fifth of the live rows and
        # re-inserting half of what was deleted, with updates in between
        alive = set(keys)
        deleted = set()
        for _ in range(3):
            gone = rng.sample(sorted(alive), len(alive) // 5)
            back = gone[: len(gone) // 2]
            a.db.execute("BEGIN")
            a.db.executemany("DELETE FROM items WHERE id = ?", [(k,) for k in gone])
            a.db.execute("COMMIT")
            a.sync(), b.sync()
            a.db.execute("BEGIN")
            a.db.executemany("INSERT INTO items VALUES (?, 'again', 1, 2.5)", [(k,) for k in back])
            a.db.executemany("UPDATE items SET qty = qty + 1 WHERE id = ?",
                             [(k,) for k in rng.sample(sorted(alive - set(gone)), 100)])
            a.db.execute("COMMIT")
            alive = (alive - set(gone)) | set(back)
            deleted = (deleted | set(gone)) - set(back)
            a.sync(), b.sync()
        a.sync(), b.sync(), a.sync(), b.sync()
        before = {"postgres": pg_meta(env), "sqlite": sl_meta(b)}
        t0 = time.time()
        g = json.loads(env.sql("SELECT sync_gc('30 days')::text", fetch=True)[0][0])
        pg_ms = (time.time() - t0) * 1000
        t0 = time.time()
        d = json.loads(b.one("SELECT sync_gc()"))
        sl_ms = (time.time() - t0) * 1000
        a.one("SELECT sync_gc()")
        after = {"postgres": pg_meta(env), "sqlite": sl_meta(b)}
        ndel = len(deleted)
        print(f"tombstone GC after churn ({N} rows inserted, 3 rounds of deleting a fifth and "
              f"re-inserting half of it: {len(alive)} live, {ndel} deleted rows)")
        print(f"  collected: postgres {g['collected']} tombstones in {pg_ms:.0f} ms, "
              f"sqlite {d['collected']} in {sl_ms:.0f} ms")
        ok = True
        for eng in ("postgres", "sqlite"):
            lb, la = before[eng][2] / max(before[eng][0], 1), after[eng][2] / max(after[eng][0], 1)
            db_, da = before[eng][3] / max(ndel, 1), after[eng][3] / max(ndel, 1)
            live_ok = la <= lb + 0.5
            dead_ok = da == 0 and after[eng][1] == 0
            ok = ok and live_ok and dead_ok
            print(f"  {eng:<9} per live row:    {lb:6.1f} B before GC, {la:6.1f} B after   "
                  f"target: unchanged by GC (<= {lb + 0.5:.1f} B): {'met' if live_ok else 'missed'}")
            print(f"  {'':<9} per deleted row: {db_:6.1f} B before GC, {da:6.1f} B after   "
                  f"target: 0 B after GC (metadata bounded by the live rows): "
                  f"{'met' if dead_ok else 'missed'}")
        print("  targets:", "met" if ok else "missed")
        return 0 if ok else 1
    finally:
        env.close()


if __name__ == "__main__":
    sys.exit(main())
