#!/usr/bin/python3
"""bench/pg_bench.py — pgsync on PostgreSQL: capture and apply speed.

Run through `bash test/pg/cluster.sh bench` (throwaway cluster), or directly
against any server where the pgsync extension is installed (PGHOST, PGPORT,
PGUSER; it creates and drops the databases pgsync_bench_a/b).

  insert   100,000 rows (TEXT UUIDv7 key; short text, int, double, ~100-char
           text) in one transaction, into a plain table and into a synced
           one: INSERT .. SELECT, and one INSERT statement per row (plpgsql
           loop). Target: tracked <= 2.5x plain.
  apply    sync_apply_payload of the 400,000-column-change payload of those
           rows into an empty synced table (target >= 150,000 changes/s),
           then the same payload again (everything loses); a payload of
           jsonb, timestamptz, numeric(10,2) and uuid columns (the values
           Postgres converts back to check their form, docs/TYPES.md).
"""
import os
import statistics
import sys
import time

import psycopg2

ROWS = int(os.environ.get("PGSYNC_BENCH_ROWS", "100000"))
REPS = int(os.environ.get("PGSYNC_BENCH_REPS", "3"))
# the insert ratio moves by +-30 % from run to run on a shared 2-core VM (plain
# 0.24-0.45 s in one series): five rounds, plain and tracked taking turns,
# like the SQLite bench; the range is printed beside the median
INSERT_REPS = int(os.environ.get("PGSYNC_BENCH_INSERT_REPS", "5"))


def connect(db):
    c = psycopg2.connect(dbname=db)
    c.autocommit = True
    return c


def timed(cur, sql, args=None):
    t = time.perf_counter()
    cur.execute(sql, args)
    return time.perf_counter() - t


def main():
    admin = connect(os.environ.get("PGDATABASE", "postgres"))
    ac = admin.cursor()
    for db in ("pgsync_bench_a", "pgsync_bench_b"):
        ac.execute(f"DROP DATABASE IF EXISTS {db}")
        ac.execute(f"CREATE DATABASE {db}")
    a = connect("pgsync_bench_a").cursor()
    b = connect("pgsync_bench_b").cursor()
    for cur in (a, b):
        cur.execute("CREATE EXTENSION pgsync")
    a.execute(f"""CREATE TABLE src AS
        SELECT sync_uuid()::text AS id, 'title ' || g AS title, g AS n,
               g * 1.25::float8 AS x, repeat(md5(g::text), 4) || 'abcd' AS body
        FROM generate_series(1, {ROWS}) g""")
    a.execute("VACUUM ANALYZE src")
    ddl = "(id text PRIMARY KEY, title text, n int, x float8, body text)"

    def insert_run(tracked, per_row):
        a.execute("DROP TABLE IF EXISTS t")
        a.execute(f"CREATE TABLE t {ddl}")
        if tracked:
            a.execute("SELECT sync_init('t')")
        a.execute("CHECKPOINT")
        if per_row:
            sql = """DO $$ DECLARE r record; BEGIN
                       FOR r IN SELECT * FROM src LOOP
                         INSERT INTO t VALUES (r.id, r.title, r.n, r.x, r.body);
                       END LOOP; END $$"""
        else:
            sql = "INSERT INTO t SELECT * FROM src"
        return timed(a, "BEGIN; " + sql + "; COMMIT")

    results = []
    for per_row in (False, True):
        plain, tracked = [], []
        for _ in range(INSERT_REPS):
            plain.append(insert_run(False, per_row))
            tracked.append(insert_run(True, per_row))
        p, t = statistics.median(plain), statistics.median(tracked)
        label = "one INSERT per row" if per_row else "INSERT .. SELECT"
        results.append((label, p, t, [b / a for a, b in zip(plain, tracked)]))

    # payload of the last tracked table (ROWS rows x 4 columns)
    a.execute("SELECT count(*) FROM t")
    assert a.fetchone()[0] == ROWS
    t_build = timed(a, "SELECT sync_payload(0)")
    payload = a.fetchone()[0]
    a.execute("SELECT (sync_payload_info(%s)->>'change_count')::bigint", (payload,))
    changes = a.fetchone()[0]

    b.execute("CREATE TABLE pl (p bytea)")
    b.execute("INSERT INTO pl VALUES (%s)", (payload,))
    apply_empty, apply_lose = [], []
    for _ in range(REPS):
        b.execute("DROP TABLE IF EXISTS t")
        b.execute(f"CREATE TABLE t {ddl}")
        b.execute("SELECT sync_init('t')")
        b.execute("CHECKPOINT")
        apply_empty.append(timed(b, "SELECT sync_apply_payload(p) FROM pl"))
        won = b.fetchone()[0]
        apply_lose.append(timed(b, "SELECT sync_apply_payload(p) FROM pl"))
        lost_won = b.fetchone()[0]
    b.execute("SELECT count(*) FROM t")
    assert b.fetchone()[0] == ROWS
    assert lost_won == 0, lost_won
    e, l = statistics.median(apply_empty), statistics.median(apply_lose)

    # typed columns: each value costs Postgres an output conversion, the form
    # check (docs/TYPES.md, "One form on every replica")
    tddl = "(id text PRIMARY KEY, doc jsonb, at timestamptz, price numeric(10,2), ref uuid)"
    a.execute("CREATE TABLE src_ids AS SELECT id, n FROM t")
    a.execute("SELECT sync_cleanup('t')")
    a.execute("DROP TABLE t")
    a.execute(f"CREATE TABLE ty {tddl}")
    a.execute("SELECT sync_init('ty')")
    a.execute(f"""INSERT INTO ty SELECT id, jsonb_build_object('color', 'white', 'size', n, 'tags',
                    jsonb_build_array('a', 'b')), now() + n * interval '1 second', n * 1.25,
                    gen_random_uuid() FROM src_ids""")
    a.execute("SELECT sync_payload(0)")
    typed_payload = a.fetchone()[0]
    a.execute("SELECT (sync_payload_info(%s)->>'change_count')::bigint", (typed_payload,))
    typed_changes = a.fetchone()[0]
    b.execute("TRUNCATE pl")
    b.execute("INSERT INTO pl VALUES (%s)", (typed_payload,))
    apply_typed = []
    for _ in range(REPS):
        b.execute("DROP TABLE IF EXISTS ty")
        b.execute(f"CREATE TABLE ty {tddl}")
        b.execute("SELECT sync_init('ty')")
        b.execute("CHECKPOINT")
        apply_typed.append(timed(b, "SELECT sync_apply_payload(p) FROM pl"))
    ty = statistics.median(apply_typed)

    print(f"pgsync PostgreSQL bench: {ROWS} rows, median of {REPS} runs ({INSERT_REPS} for inserts)")
    print(f"{'case':<44} {'seconds':>9} {'rate':>16} {'ratio':>7}")
    ok = True
    for label, p, t, rounds in results:
        ratio = t / p
        ok &= ratio <= 2.5 or label != "INSERT .. SELECT"
        print(f"{'insert plain   (' + label + ')':<44} {p:9.3f} {ROWS / p:11,.0f} rows/s")
        print(f"{'insert tracked (' + label + ')':<44} {t:9.3f} {ROWS / t:11,.0f} rows/s {ratio:6.2f}x"
              f"  (rounds {min(rounds):.2f}-{max(rounds):.2f}x)")
    print(f"{'sync_payload(0) build':<44} {t_build:9.3f} {changes / t_build:8,.0f} changes/s"
          f"  ({len(payload):,} bytes)")
    print(f"{'apply into empty table':<44} {e:9.3f} {changes / e:8,.0f} changes/s  (won {won:,})")
    print(f"{'apply again (up to date, all lose)':<44} {l:9.3f} {changes / l:8,.0f} changes/s")
    print(f"{'apply, jsonb/timestamptz/numeric/uuid':<44} {ty:9.3f} {typed_changes / ty:8,.0f} changes/s")
    ok &= changes / e >= 150000
    print("targets: tracked <= 2.5x plain (INSERT .. SELECT), apply >= 150,000 changes/s:",
          "met" if ok else "NOT met")
    a.connection.close()
    b.connection.close()
    for db in ("pgsync_bench_a", "pgsync_bench_b"):
        ac.execute(f"DROP DATABASE IF EXISTS {db}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
