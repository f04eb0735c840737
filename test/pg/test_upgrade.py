#!/usr/bin/python3
"""test_upgrade — ALTER EXTENSION pgsync UPDATE from 0.1.0 gives what a
fresh install gives, and a table synced under 0.1.0 keeps syncing.

1. A database made with CREATE EXTENSION pgsync VERSION '0.1.0', then
   ALTER EXTENSION pgsync UPDATE; another
   database with the current version installed fresh. Both have the same
   extension members, the same functions (signature, result, volatility,
   strictness, security, comment, privileges in effect (an explicit grant
   equal to the default counts as the default), C symbol), the same columns,
   defaults, constraints and indexes in schema pgsync, and the same event
   triggers. Column order may differ (an upgrade adds columns at the end):
   columns are compared by name.
2. The upgraded database syncs: a table synced there goes to the fresh
   database in a payload and comes back changed; a type change of a synced
   column is checked by the upgraded event trigger.
Not covered: rows written under 0.1.0's own library. The installed library
is this build's (a package upgrade replaces the library before ALTER
EXTENSION runs, and this build's functions need the 0.2.0 schema), so the
0.1.0 objects are only installed, never called, before the update; testing
0.1.0-era data would need the 0.1.0 build (docs/PG.md, "Upgrades").
"""
from pglib import check, connect, drop_db, one, rows

MEMBERS = """
SELECT pg_catalog.pg_describe_object(d.classid, d.objid, d.objsubid)
FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid
WHERE d.refclassid = 'pg_catalog.pg_extension'::regclass AND d.deptype = 'e' AND e.extname = 'pgsync'
ORDER BY 1"""

FUNCTIONS = """
SELECT p.oid::regprocedure::text, pg_catalog.pg_get_function_result(p.oid), p.provolatile,
       p.proisstrict, p.prosecdef, p.proparallel, p.prosrc,
       pg_catalog.obj_description(p.oid, 'pg_proc'),
       (SELECT pg_catalog.string_agg(x::text, ',' ORDER BY x::text)
        FROM pg_catalog.unnest(coalesce(p.proacl, pg_catalog.acldefault('f', p.proowner))) x), p.proconfig::text
FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_depend d
  ON d.classid = 'pg_catalog.pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid AND e.extname = 'pgsync'
ORDER BY 1"""

COLUMNS = """
SELECT c.relname, c.relkind, a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod),
       a.attnotnull, pg_catalog.pg_get_expr(ad.adbin, ad.adrelid),
       (SELECT pg_catalog.string_agg(x::text, ',' ORDER BY x::text)
        FROM pg_catalog.unnest(coalesce(c.relacl, pg_catalog.acldefault('r', c.relowner))) x)
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid
LEFT JOIN pg_catalog.pg_attrdef ad ON ad.adrelid = c.oid AND ad.adnum = a.attnum
WHERE c.relnamespace = 'pgsync'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
  AND c.relkind IN ('r', 'v', 'S')
ORDER BY 1, 3"""

CONSTRAINTS = """
SELECT c.conrelid::regclass::text, c.conname, pg_catalog.pg_get_constraintdef(c.oid)
FROM pg_catalog.pg_constraint c
WHERE c.connamespace = 'pgsync'::regnamespace ORDER BY 1, 2"""

INDEXES = """
SELECT tablename, indexname, indexdef FROM pg_catalog.pg_indexes
WHERE schemaname = 'pgsync' ORDER BY 1, 2"""

EVENT_TRIGGERS = """
SELECT evtname, evtevent, evtfoid::regproc::text, evtenabled, evttags::text
FROM pg_catalog.pg_event_trigger ORDER BY 1"""


def made(name, version=None):
    admin = connect("postgres")
    cur = admin.cursor()
    cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    cur.execute(f"CREATE DATABASE {name}")
    admin.close()
    c = connect(name)
    c.cursor().execute("SET client_min_messages = warning")
    c.cursor().execute("CREATE EXTENSION pgsync" + (f" VERSION '{version}'" if version else ""))
    return c


def main():
    try:
        old = made("up_old", "0.1.0")
        check(one(old, "SELECT extversion FROM pg_extension WHERE extname = 'pgsync'") == "0.1.0",
              "0.1.0 installed")
        cur = old.cursor()
        cur.execute("CREATE TABLE t (id text PRIMARY KEY, title text, n int)")
        cur.execute("ALTER EXTENSION pgsync UPDATE")
        new = made("up_new")
        current = one(new, "SELECT extversion FROM pg_extension WHERE extname = 'pgsync'")
        check(one(old, "SELECT extversion FROM pg_extension WHERE extname = 'pgsync'") == current,
              f"upgraded to {current}")
        for what, q in (("members", MEMBERS), ("functions", FUNCTIONS), ("columns", COLUMNS),
                        ("constraints", CONSTRAINTS), ("indexes", INDEXES),
                        ("event triggers", EVENT_TRIGGERS)):
            got, want = rows(old, q), rows(new, q)
            only_old = [r for r in got if r not in want]
            only_new = [r for r in want if r not in got]
            check(not only_old and not only_new,
                  f"{what} differ after the upgrade:\n  only upgraded: {only_old}\n"
                  f"  only fresh:    {only_new}")
        print(f"PASS the upgrade from 0.1.0 to {current} matches a fresh install "
              f"({len(rows(new, FUNCTIONS))} functions)")

        # the upgraded extension syncs
        cur.execute("SELECT sync_init('t')")
        cur.execute("INSERT INTO t VALUES ('a', 'one', 1), ('b', 'two', 2), ('c', 'three', 3)")
        cur.execute("UPDATE t SET n = 20 WHERE id = 'b'")
        ncur = new.cursor()
        ncur.execute("CREATE TABLE t (id text PRIMARY KEY, title text, n int)")
        ncur.execute("SELECT sync_init('t')")
        p = one(old, "SELECT sync_payload(0)")
        ncur.execute("SELECT sync_apply_payload(%s)", (p,))
        want = [("a", "one", 1), ("b", "two", 20), ("c", "three", 3)]
        check(rows(new, "SELECT * FROM t ORDER BY id") == want, rows(new, "SELECT * FROM t ORDER BY id"))
        since = one(old, "SELECT sync_db_version()")
        ncur.execute("UPDATE t SET title = 'ONE' WHERE id = 'a'")
        ncur.execute("DELETE FROM t WHERE id = 'b'")
        back = one(new, "SELECT sync_payload(0)")
        cur.execute("SELECT sync_apply_payload(%s)", (back,))
        check(rows(old, "SELECT * FROM t ORDER BY id") == [("a", "ONE", 1), ("c", "three", 3)],
              rows(old, "SELECT * FROM t ORDER BY id"))
        check(one(old, "SELECT sync_payload(%s) IS NOT NULL", (since,)), "merged changes go on")
        try:
            cur.execute("ALTER TABLE t ALTER COLUMN title TYPE int USING 0")
            check(False, "a type change that changes the form passed the upgraded event trigger")
        except Exception as e:  # noqa: BLE001
            check("cannot change to integer" in str(e), str(e))
        cur.execute("ALTER TABLE t ALTER COLUMN n TYPE bigint")   # the same form: allowed
        print("PASS the upgraded extension syncs both ways")
        old.close()
        new.close()
    finally:
        for d in ("up_old", "up_new"):
            drop_db(d)


if __name__ == "__main__":
    main()
