"""test_rls.py — end-to-end tests of issue 7, "every device holds exactly
what its user may see" (docs/DESIGN.md, "Visibility"): real Postgres, real
pgsync-server processes, SQLite devices through Python's sqlite3.

    test/server/run.sh [names...]               (builds, then runs every file)
    /usr/bin/python3 test/server/test_rls.py [names...]   (after build.sh; see run.sh)
    PGS_SCHEDULES=1000 PGS_SEED=7 ... test_rls.py oracle_views    (long oracle mode)

Regressions (forged deletes, the pull race, move-in, move-out for every cause,
unsent edits, site ids, token times), attacks (all refused, Postgres
unchanged), wake-ups that must not leak, and an oracle property test: after
random schedules every device equals its role's SELECT * on Postgres.
"""
import json
import os
import random
import re
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import suite  # noqa: E402
from suite import Device, as_role, auth, check, eventually, http, info, jwt_hs256, run_bg, token  # noqa: E402
from tools import WebSocket  # noqa: E402

test = suite.Registry()

SUB = "(current_setting('request.jwt.claims', true)::json->>'sub')"
CLAIM_TEAM = "(current_setting('request.jwt.claims', true)::json->>'team')"

# Roles are cluster-wide: made once per run (setup), used by every test.
ROLES = """
CREATE ROLE viewer NOLOGIN;
CREATE ROLE readers NOLOGIN;
GRANT viewer TO authenticator;
"""

BASE = """
CREATE EXTENSION pgsync;
GRANT EXECUTE ON FUNCTION sync_device(uuid, text) TO authenticator;
CREATE TABLE docs(id text PRIMARY KEY, owner text NOT NULL, title text NOT NULL, body text NOT NULL DEFAULT '');
CREATE TABLE items(id text PRIMARY KEY, name text, qty integer);
SELECT sync_init('docs');
SELECT sync_init('items');
GRANT SELECT, INSERT, UPDATE, DELETE ON docs, items TO app_user;
ALTER TABLE docs ENABLE ROW LEVEL SECURITY;
"""

OWNER_POLICY = f"CREATE POLICY own ON docs USING (owner = {SUB}) WITH CHECK (owner = {SUB});"

READ_ALL_OWNER_WRITES = f"""
CREATE POLICY r ON docs FOR SELECT USING (true);
CREATE POLICY i ON docs FOR INSERT WITH CHECK (owner = {SUB});
CREATE POLICY u ON docs FOR UPDATE USING (owner = {SUB}) WITH CHECK (owner = {SUB});
CREATE POLICY d ON docs FOR DELETE USING (owner = {SUB});
"""

SHARES = f"""
CREATE TABLE shares(doc text, usr text, PRIMARY KEY (doc, usr));
GRANT SELECT ON shares TO app_user;
CREATE POLICY own_or_shared ON docs
  USING (owner = {SUB} OR EXISTS (SELECT 1 FROM shares s WHERE s.doc = docs.id AND s.usr = {SUB}))
  WITH CHECK (owner = {SUB} OR EXISTS (SELECT 1 FROM shares s WHERE s.doc = docs.id AND s.usr = {SUB}));
"""

DEVICE_SCHEMA = """
CREATE TABLE docs(id TEXT PRIMARY KEY, owner TEXT NOT NULL, title TEXT NOT NULL, body TEXT NOT NULL DEFAULT '');
CREATE TABLE items(id TEXT PRIMARY KEY, name TEXT, qty INTEGER);
"""


def setup(pg):
    pg.sql(ROLES, db="postgres")


def world(env, policy=OWNER_POLICY, extra=""):
    env.sql(BASE + policy + extra)


def dev(env, name, sub, server, role="app_user", **claims):
    return Device(env, name, token(sub, role=role, **claims), server, DEVICE_SCHEMA, ["docs", "items"])


def pg_docs(env):
    return [tuple(r) for r in env.sql("SELECT id, owner, title, body FROM docs ORDER BY id", fetch=True)]


def pg_clock(env, key):
    r = env.sql("SELECT cl FROM docs__sync_clock WHERE id = %s", (key,), fetch=True)
    return r[0][0] if r else None


def docs(d):
    return d.q("SELECT id, owner, title, body FROM docs ORDER BY id")


def view(env, sub, role="app_user", table="docs", **claims):
    """What role with these claims sees of table on Postgres."""
    cols = {"docs": "id, owner, title, body", "items": "id, name, qty"}[table]
    return as_role(env, role, dict({"sub": sub, "role": role}, **claims),
                   f"SELECT {cols} FROM {table} ORDER BY id")


def check_view(env, d, sub, role="app_user", **claims):
    want = view(env, sub, role, **claims)
    got = docs(d)
    check(got == want, f"{d.name} ({sub}) holds\n  {got}\nbut may see\n  {want}")


# ---- regressions: forged deletes ------------------------------------------------

@test
def forged_delete_owner_policy(env):
    """Alice inserts Bob's key locally, deletes it, syncs: refused; Postgres,
    Bob's devices and a new device of Bob keep the row."""
    world(env)
    s = env.server()
    b1, b2 = dev(env, "b1", "bob", s), dev(env, "b2", "bob", s)
    b1.q("INSERT INTO docs VALUES('n1', 'bob', 'plan', 'secret')")
    b1.sync()
    b2.sync()
    before = pg_docs(env)
    a = dev(env, "a", "alice", s)
    a.sync()
    # 1: insert and delete before syncing (a bare tombstone of bob's key)
    a.q("INSERT INTO docs VALUES('n1', 'alice', 'mine now', '')")
    a.q("DELETE FROM docs WHERE id = 'n1'")
    r = a.sync()
    check(r["send"]["rejected"] == 1, r)
    check(a.rejected() == {("docs", '{"id":"n1"}', "server"): "42501"}, a.rejected())
    # 2: a tombstone with a high causal length (insert/delete many times)
    for _ in range(4):
        a.q("INSERT INTO docs VALUES('n1', 'alice', 'x', '')")
        a.q("DELETE FROM docs WHERE id = 'n1'")
    r = a.sync()
    check(r["send"]["rejected"] == 1, r)
    # 3: insert synced first (same life: an update of bob's invisible row), then delete
    a.q("INSERT INTO docs VALUES('n1', 'alice', 'hijack', 'gone')")
    r = a.sync()
    check(r["send"]["rejected"] == 1, r)
    a.q("DELETE FROM docs WHERE id = 'n1'")
    r = a.sync()
    check(r["send"]["rejected"] == 1, r)
    check(pg_docs(env) == before and pg_clock(env, "n1") == 1, (pg_docs(env), pg_clock(env, "n1")))
    for b in (b1, b2):
        b.sync()
        check(docs(b) == before, (b.name, docs(b)))
    b3 = dev(env, "b3", "bob", s)
    b3.sync()
    check(docs(b3) == before, docs(b3))
    # alice gives up her change: her device ends as her view (nothing)
    a.one("SELECT sync_network_discard()")
    a.sync_quiet()
    check_view(env, a, "alice")
    check(a.rejected() == {}, a.rejected())
    check(pg_docs(env) == before)


@test
def forged_delete_read_all_policy(env):
    """Everyone reads, only the owner writes: Alice's delete (and update) of
    Bob's visible row are refused; discard brings the row back."""
    world(env, READ_ALL_OWNER_WRITES)
    s = env.server()
    b1 = dev(env, "b1", "bob", s)
    b1.q("INSERT INTO docs VALUES('n1', 'bob', 'plan', 'public')")
    b1.q("INSERT INTO docs VALUES('n2', 'bob', 'other', 'public too')")
    b1.sync()
    a = dev(env, "a", "alice", s)
    a.sync()
    before = pg_docs(env)
    check(docs(a) == before, docs(a))
    a.q("DELETE FROM docs WHERE id = 'n1'")
    a.q("UPDATE docs SET body = 'defaced' WHERE id = 'n2'")
    a.q("INSERT INTO docs VALUES('a1', 'alice', 'mine', '')")
    r = a.sync()
    check(r["send"]["rejected"] == 2, r)
    rej = a.rejected()
    check(rej == {("docs", '{"id":"n1"}', "server"): "42501", ("docs", '{"id":"n2"}', "server"): "42501"}, rej)
    check(pg_docs(env) == sorted(before + [("a1", "alice", "mine", "")]), pg_docs(env))
    check(pg_clock(env, "n1") == 1)
    # the refused rows stay as the app left them until it decides
    check(docs(a) == [("a1", "alice", "mine", ""), ("n2", "bob", "other", "defaced")], docs(a))
    b1.sync()
    check(docs(b1) == pg_docs(env), docs(b1))
    b3 = dev(env, "b3", "bob", s)
    b3.sync()
    check(docs(b3) == pg_docs(env), docs(b3))
    # Bob edits n1 meanwhile; alice discards: she gets the current server rows
    b1.q("UPDATE docs SET body = 'edited by bob' WHERE id = 'n1'")
    b1.sync()
    check(a.one("SELECT sync_network_discard()") == 2)
    a.sync_quiet()
    check_view(env, a, "alice")
    check(("n1", "bob", "plan", "edited by bob") in docs(a), docs(a))
    check(a.rejected() == {} and a.status()["pending_rows"] == 0, (a.rejected(), a.status()))


if __name__ == "__main__":
    sys.exit(suite.main(sys.argv[1:], test, setup))
