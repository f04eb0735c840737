#!/usr/bin/python3
"""test_rls_plan — how a first pull under row-level security reads its rows
(docs/DESIGN.md, "Cost per pull"; bench/pg_bench_pull.py measures it).

A device's first pull of a table under RLS is a snapshot: every chunk reads
the caller's rows in key order, from after the previous chunk's last key.
With the plans captured by auto_explain, in chunks of sync_pull as the
server makes them (REPEATABLE READ, sync_device, SET LOCAL ROLE, claims):

  - with an index on the policy's column followed by the key, (owner, id),
    every chunk's base read is an index scan of it whose index condition is
    the policy's (owner = the claim) and the resume point (id > the last
    key): it reads the visible rows only, nothing filtered out. Also in a
    second pull, whose chunk reads run a generic cached plan: left to its
    costs, the planner took the key walk for most chunks (it costs the
    index's heap access by the owner column's correlation, none);
    pg_changes.c, "the key order of an rls snapshot", steers it;
  - with a policy that does not pin owner to one value (= ANY), the index
    cannot give key order and is not forced: the chunks walk an index;
  - without it, the chunks walk the key index from the resume point (an
    index condition, not a filter): the whole pull reads every row once,
    not once per chunk;
  - either way the device gets exactly the rows the role may SELECT.
"""
import json
import os
import re
import sys
import uuid

import psycopg2

from pglib import check, connect, drop_db, fresh_db, one

DB = "pgsync_t_rls_plan"
N = 24000         # rows; one in six is u0's: 4,000, in 4 chunks and an end
CHUNK = 1000
POLICY = "owner = (SELECT current_setting('request.jwt.claims', true)::json->>'sub')"
DDL = ["DROP ROLE IF EXISTS pgsync_plan_user", "CREATE ROLE pgsync_plan_user NOLOGIN",
       "GRANT USAGE ON SCHEMA public TO pgsync_plan_user",
       "CREATE TABLE docs (id text PRIMARY KEY, owner text NOT NULL, body text)",
       "SELECT sync_init('docs')",
       f"INSERT INTO docs SELECT sync_uuid()::text, 'u' || (g % 6), 'body ' || g "
       f"FROM generate_series(1, {N}) g",
       "ALTER TABLE docs ENABLE ROW LEVEL SECURITY",
       f"CREATE POLICY mine ON docs USING ({POLICY})",
       "GRANT SELECT ON docs TO pgsync_plan_user",
       "VACUUM ANALYZE docs", "VACUUM ANALYZE docs__sync_clock"]


def base_reads(notices):
    """The plans of the chunk's reads of docs as the caller (auto_explain)."""
    return [n for n in notices if "Query Text:" in n and re.search(r"FROM public\.docs b\b", n)]


def pull(conn, sub, chunk=CHUNK, table="docs"):
    """A first pull in chunks; returns (keys pulled, base read plans per chunk)."""
    cur = conn.cursor()
    device = str(uuid.uuid4())
    cursor = None
    keys, plans = [], []
    while True:
        cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        cur.execute("SELECT sync_device(%s::uuid, %s)", (device, sub))
        cur.execute("SET LOCAL ROLE pgsync_plan_user")
        cur.execute("SELECT set_config('request.jwt.claims', %s, true)", (json.dumps({"sub": sub}),))
        del conn.notices[:]
        cur.execute("SELECT payload, next_cursor FROM sync_pull(0, %s, %s, 0)", (chunk, cursor))
        payload, cursor = cur.fetchone()
        plans.append(base_reads(list(conn.notices)))
        cur.execute("COMMIT")
        if payload is not None:
            info = one(conn, "SELECT sync_payload_info(%s)", (payload,))
            keys += [tuple(r["key"]) if len(r["key"]) > 1 else r["key"][0]
                     for r in info["rows"] if r["table"] == table]
        if cursor is None:
            return keys, plans


def visible(conn, sub, sql="SELECT id FROM docs"):
    cur = conn.cursor()
    cur.execute("BEGIN")
    cur.execute("SET LOCAL ROLE pgsync_plan_user")
    cur.execute("SELECT set_config('request.jwt.claims', %s, true)", (json.dumps({"sub": sub}),))
    cur.execute(sql)
    ids = {r[0] if len(r) == 1 else tuple(r) for r in cur.fetchall()}
    cur.execute("COMMIT")
    return ids


def node(plan):
    """The lines of the plan node that scans docs b (its index, conditions, counts)."""
    lines = plan.split("\n")
    for i, line in enumerate(lines):
        if re.search(r"Scan(?: Backward)? using \S+ on docs b\b", line):
            out = [line]
            for nxt in lines[i + 1:]:
                # the next node: "->", or an InitPlan's header (from PostgreSQL 17 a
                # condition names "(InitPlan 1).col1" itself)
                if "->" in nxt or nxt.lstrip().startswith("InitPlan") or not nxt.startswith(" "):
                    break
                out.append(nxt)
            return out
    return None


def read_count(lines):
    """Rows the scan produced plus the rows its filter removed."""
    m = re.search(r"actual (?:time=\S+ )?rows=(\d+)", lines[0])
    removed = sum(int(x) for x in re.findall(r"Rows Removed by Filter: (\d+)", "\n".join(lines)))
    return int(m.group(1)) + removed


def main():
    conn = fresh_db(DB, DDL)
    cur = conn.cursor()
    try:
        cur.execute("LOAD 'auto_explain'")
    except psycopg2.Error as e:
        print("SKIP test_rls_plan: auto_explain is not installed:", e.pgerror)
        conn.close()
        cleanup()
        return 0
    for k, v in (("log_min_duration", "0"), ("log_analyze", "on"), ("log_timing", "off"),
                 ("log_nested_statements", "on"), ("log_level", "warning")):
        cur.execute(f"SET auto_explain.{k} = '{v}'")
    conn.notices = []
    want = visible(conn, "u0")
    check(len(want) == N // 6, f"u0 may see {N // 6} rows")

    # with the (owner, id) index; the second pull runs the cached plan of a
    # chunk read the sixth time and later: a generic plan
    cur.execute("CREATE INDEX docs_owner_id ON docs (owner, id)")
    for n in (1, 2):
        keys, plans = pull(conn, "u0")
        if os.environ.get("DEBUG"):
            print(plans)
        check(len(keys) == len(set(keys)) and set(keys) == want,
              f"indexed, pull {n}: the pull brings exactly the rows the role may see, once each")
        check(all(len(p) == 1 for p in plans), f"indexed, pull {n}: one base read per chunk")
        scans = [node(p[0]) for p in plans]
        check(all(s and "using docs_owner_id" in s[0] for s in scans),
              f"indexed, pull {n}: every chunk reads docs through the (owner, id) index")
        # the claim's InitPlan shows as $1 up to PostgreSQL 16, (InitPlan 1).col1 from 17
        check(all(re.search(r"Index Cond: \(\(owner = (\$\d+|\(InitPlan \d+\)\.col\d+)\) "
                            r"AND \(id > ", "\n".join(s))
                  for s in scans[1:]),
              f"indexed, pull {n}: later chunks start at the last key in the index condition")
        check(all("Rows Removed by Filter" not in "\n".join(s) for s in scans),
              f"indexed, pull {n}: no row is read to be filtered out")

    # a policy that does not pin owner to one value: the index cannot give
    # key order, and the chunks walk the key index as without it
    cur.execute("ALTER POLICY mine ON docs USING (owner = ANY (ARRAY['u0', "
                "(SELECT current_setting('request.jwt.claims', true)::json->>'sub')]))")
    keys, plans = pull(conn, "u0")
    check(len(keys) == len(set(keys)) and set(keys) == want,
          "unpinned: the pull brings exactly the rows the role may see, once each")
    scans = [node(p[0]) for p in plans]
    check(all(s and ("using docs_pkey" in s[0] or "using docs_owner_id" in s[0]) for s in scans),
          "unpinned: every chunk reads through an index (no sort of the table per chunk)")
    cur.execute(f"ALTER POLICY mine ON docs USING ({POLICY})")

    # without it
    cur.execute("DROP INDEX docs_owner_id")
    keys, plans = pull(conn, "u0")
    check(len(keys) == len(set(keys)) and set(keys) == want,
          "key walk: the pull brings exactly the rows the role may see, once each")
    scans = [node(p[0]) for p in plans]
    check(all(s and "using docs_pkey" in s[0] for s in scans),
          "key walk: every chunk walks the key index")
    check(all(re.search(r"Index Cond: \(id > ", "\n".join(s)) for s in scans[1:]),
          "key walk: later chunks start at the last key (an index condition)")
    read = sum(read_count(s) for s in scans)
    check(read <= N * 1.1,
          f"key walk: the pull reads each row about once ({read} reads for {N} rows "
          f"in {len(scans)} chunks), not once per chunk")
    # keys whose collation orders them unlike the clock's "C" (the clock rows
    # of a batch are read in the clock key index's order), and a key of two
    # columns; small chunks, many batches
    cur.execute("REVOKE SELECT ON docs FROM pgsync_plan_user")
    coll = ""
    for c in ('"en_US"', '"en-US-x-icu"', '"und-x-icu"'):
        try:
            cur.execute(f"CREATE TEMP TABLE coll_probe (k text COLLATE {c})")
            cur.execute("DROP TABLE coll_probe")
            coll = f" COLLATE {c}"
            break
        except psycopg2.Error:
            pass
    cur.execute(f"CREATE TABLE notes (id text{coll} PRIMARY KEY, owner text NOT NULL, body text)")
    cur.execute("CREATE TABLE pairs (a text, b int, owner text NOT NULL, PRIMARY KEY (a, b))")
    for t in ("notes", "pairs"):
        cur.execute(f"SELECT sync_init('{t}')")
    cur.execute("INSERT INTO notes SELECT chr(65 + (g % 2) * 32 + g % 26) || g, 'u' || (g % 3), 'n' "
                "FROM generate_series(1, 3000) g")
    cur.execute("INSERT INTO pairs SELECT chr(65 + (g % 2) * 32 + g % 26), g, 'u' || (g % 3) "
                "FROM generate_series(1, 3000) g")
    for t in ("notes", "pairs"):
        cur.execute(f"ALTER TABLE {t} ENABLE ROW LEVEL SECURITY")
        cur.execute(f"CREATE POLICY mine ON {t} USING ({POLICY})")
        cur.execute(f"GRANT SELECT ON {t} TO pgsync_plan_user")
        cur.execute(f"ANALYZE {t}")
    cur.execute("CREATE INDEX ON pairs (owner, a, b)")
    cur.execute("GRANT SELECT ON notes TO pgsync_plan_user")
    cur.execute("REVOKE SELECT ON pairs FROM pgsync_plan_user")
    keys, _ = pull(conn, "u1", chunk=70, table="notes")
    check(len(keys) == len(set(keys)) and set(keys) == visible(conn, "u1", "SELECT id FROM notes"),
          f"collated keys{coll or ' (no collation here)'}: exactly the visible rows, once each")
    cur.execute("REVOKE SELECT ON notes FROM pgsync_plan_user")
    cur.execute("GRANT SELECT ON pairs TO pgsync_plan_user")
    keys, _ = pull(conn, "u2", chunk=70, table="pairs")
    check(len(keys) == len(set(keys)) and
          set(keys) == visible(conn, "u2", "SELECT a, b FROM pairs"),
          "a key of two columns, through (owner, a, b): exactly the visible rows, once each")
    conn.close()
    cleanup()
    return 0


def cleanup():
    drop_db(DB)
    admin = connect(os.environ.get("PGDATABASE", "postgres"))
    admin.cursor().execute("DROP ROLE IF EXISTS pgsync_plan_user")
    admin.close()


if __name__ == "__main__":
    sys.exit(main())
