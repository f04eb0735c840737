#!/usr/bin/python3
"""test_same_scenarios — the same local-edit scenarios on SQLite and Postgres.

test/scenarios/local_edits.json lists transactions of inserts, updates,
deletes and key changes with the outcome the local-edit rules (core/local.c)
decide: causal lengths, tombstones, which columns carry a stamp and the order
of those stamps. This runs every scenario on a real SQLite file
(build/sqlitesync.so) and on a real Postgres database (pgsync) and checks
both give exactly the expected outcome; test/test_same_scenarios.c runs the
same file on the core's mock. Same meaning on every engine, checked.
"""
import json
import os
import sqlite3
import sys
import tempfile

import psycopg2.extras

from pglib import ROOT, check, drop_db, fresh_db, one

EXT = os.environ.get("SQLITESYNC_EXT", str(ROOT / "build" / "sqlitesync.so"))
SCENARIOS = ROOT / "test" / "scenarios" / "local_edits.json"


def reduce_info(info):
    """What the rules decide, from a sync_payload_info JSON (see the file's about)."""
    out = []
    for r in info.get("rows", []):
        hlcs = sorted({c["hlc"] for c in r["changes"]})
        cols = {c["column"]: [c["value"], hlcs.index(c["hlc"])] for c in r["changes"]}
        out.append({"key": r["key"][0], "cl": r["cl"], "deleted": r["deleted"], "cols": cols})
    return sorted(out, key=lambda x: x["key"])


def edit_sql(op, param):
    """(sql, args) of one edit, with param the engine's placeholder."""
    kind = op[0]
    if kind == "insert":
        return f"INSERT INTO t (id, a, b) VALUES ({param}, {param}, {param})", (op[1], op[2], op[3])
    if kind == "update":
        sets = ", ".join(f"{c} = {param}" for c in op[2])
        return f"UPDATE t SET {sets} WHERE id = {param}", tuple(op[2].values()) + (op[1],)
    if kind == "delete":
        return f"DELETE FROM t WHERE id = {param}", (op[1],)
    if kind == "rekey":
        return f"UPDATE t SET id = {param} WHERE id = {param}", (op[2], op[1])
    raise ValueError(f"unknown edit {kind}")


def on_sqlite(tmp, sc):
    path = os.path.join(tmp, sc["name"] + ".db")
    c = sqlite3.connect(path, isolation_level=None)
    c.enable_load_extension(True)
    c.load_extension(EXT)
    c.execute("CREATE TABLE t (id TEXT PRIMARY KEY NOT NULL, a TEXT, b INTEGER)")
    c.execute("SELECT sync_init('t')")
    for txn in sc["txns"]:
        c.execute("BEGIN")
        for op in txn:
            c.execute(*edit_sql(op, "?"))
        c.execute("COMMIT")
    p = c.execute("SELECT sync_payload(0)").fetchone()[0]
    info = json.loads(c.execute("SELECT sync_payload_info(?)", (p,)).fetchone()[0]) if p else {}
    c.close()
    return reduce_info(info)


def on_postgres(conn, sc):
    cur = conn.cursor()
    cur.execute("DROP TABLE IF EXISTS t")
    cur.execute("CREATE TABLE t (id text PRIMARY KEY, a text, b integer)")
    cur.execute("SELECT sync_init('t')")
    conn.autocommit = False
    for txn in sc["txns"]:
        for op in txn:
            cur.execute(*edit_sql(op, "%s"))
        conn.commit()
    conn.autocommit = True
    p = one(conn, "SELECT sync_payload(0)")
    info = one(conn, "SELECT sync_payload_info(%s)", (p,)) if p is not None else {}
    if isinstance(info, str):
        info = json.loads(info)
    cur.execute("SELECT sync_cleanup('t')")
    cur.execute("DROP TABLE t")
    return reduce_info(info)


def main():
    if not os.path.exists(EXT):
        print(f"FAIL test_same_scenarios: {EXT} not built (run make at the top level)")
        return 1
    scenarios = json.load(open(SCENARIOS))["scenarios"]
    conn = fresh_db("pgsync_t_same")
    psycopg2.extras.register_default_json(conn)
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for sc in scenarios:
            for engine, got in (("sqlite", on_sqlite(tmp, sc)), ("postgres", on_postgres(conn, sc))):
                if got != sc["expect"]:
                    failed += 1
                    print(f"not ok - {sc['name']} on {engine}:\n  got    {json.dumps(got)}\n"
                          f"  expect {json.dumps(sc['expect'])}")
                else:
                    print(f"ok - {sc['name']} on {engine}")
    conn.close()
    drop_db("pgsync_t_same")
    check(failed == 0, f"{len(scenarios)} scenarios give the same outcome on SQLite and Postgres")
    return 0


if __name__ == "__main__":
    sys.exit(main())
