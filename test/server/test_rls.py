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
    """What role with these claims sees of table on Postgres (nothing
    without the privilege)."""
    import psycopg2
    cols = {"docs": "id, owner, title, body", "items": "id, name, qty"}[table]
    try:
        return as_role(env, role, dict({"sub": sub, "role": role}, **claims),
                       f"SELECT {cols} FROM {table} ORDER BY id")
    except psycopg2.errors.InsufficientPrivilege:
        return []


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


@test
def pull_visibility_race(env):
    """A thread hands rows from Bob to Alice and clears their secret body in
    one transaction (and back), over and over, while Alice pulls ~1,500
    times (some chunked): her device never holds a secret body."""
    world(env)
    n_pulls = int(os.environ.get("PGS_RACE_PULLS", "1500"))
    keys = [f"r{i}" for i in range(6)]
    for k in keys:
        env.sql("INSERT INTO docs VALUES(%s, 'bob', 'race', 'secret-0')", (k,))
    env.sql("INSERT INTO docs SELECT 'a' || g, 'alice', 'filler', '' FROM generate_series(1, 20) g")
    s1 = env.server("s1")
    s2 = env.server("s2", pull_max_rows=3)          # chunks: several snapshots per pull
    a1, a2 = dev(env, "a1", "alice", s1), dev(env, "a2", "alice", s2)
    stop = threading.Event()
    flips = [0]
    errors = []

    def flipper():
        import psycopg2
        c = psycopg2.connect(env.pg.dsn(db=env.db))
        try:
            n = 0
            while not stop.is_set():
                n += 1
                k = keys[n % len(keys)]
                with c.cursor() as cur:
                    cur.execute("UPDATE docs SET owner = 'alice', body = '' WHERE id = %s", (k,))
                c.commit()
                with c.cursor() as cur:
                    cur.execute("UPDATE docs SET owner = 'bob', body = %s WHERE id = %s", (f"secret-{n}", k))
                c.commit()
                flips[0] = n
        except Exception as e:  # noqa: BLE001
            errors.append(e)
        finally:
            c.close()

    th = threading.Thread(target=flipper, daemon=True)
    th.start()
    try:
        seen_rows = 0
        for i in range(n_pulls):
            d = a1 if i % 2 == 0 else a2
            d.receive()
            bad = d.q("SELECT id, owner, body FROM docs WHERE owner <> 'alice' OR body <> ''")
            check(not bad, f"pull {i} on {d.name}: alice's device holds {bad}")
            seen_rows += d.one("SELECT count(*) FROM docs WHERE id LIKE 'r%'")
    finally:
        stop.set()
        th.join(10)
    check(not errors, errors)
    print(f"  {n_pulls} pulls, {flips[0]} hand-overs, racing rows held {seen_rows} times in all")
    check(flips[0] > 50 and seen_rows > 0, "the race did not race")
    for d in (a1, a2):
        d.sync_quiet()
        check_view(env, d, "alice")


# ---- move-in ----------------------------------------------------------------------

@test
def move_in_arrives_whole(env):
    """Rows that become visible (a share, an owner change) arrive whole into
    a SQLite table with NOT NULL columns, although only some of their
    columns changed since the device's cursor; other tables keep syncing."""
    world(env, SHARES)
    s1 = env.server("s1")
    s2 = env.server("s2", pull_max_rows=2)
    b = dev(env, "b", "bob", s1)
    for i in range(1, 6):
        b.q("INSERT INTO docs VALUES(?, 'bob', ?, ?)", f"d{i}", f"title {i}", f"body {i}")
    b.sync()
    a1, a2 = dev(env, "a1", "alice", s1), dev(env, "a2", "alice", s2)
    for a in (a1, a2):
        a.sync()
        check(docs(a) == [], docs(a))
    # only some columns change after alice's cursor
    b.q("UPDATE docs SET title = 'new title 1' WHERE id = 'd1'")
    b.q("UPDATE docs SET body = 'new body 2' WHERE id = 'd2'")
    b.q("INSERT INTO items VALUES('i1', 'unrelated', 1)")
    b.sync()
    env.sql("INSERT INTO shares VALUES('d1', 'alice'), ('d3', 'alice')")     # move-in by share
    env.sql("UPDATE docs SET owner = 'alice' WHERE id = 'd2'")              # move-in by owner change
    for a in (a1, a2):
        r = a.sync()
        check(r["receive"]["payloads"] >= 1, r)
        check_view(env, a, "alice")
        check(docs(a) == [("d1", "bob", "new title 1", "body 1"), ("d2", "alice", "title 2", "new body 2"),
                          ("d3", "bob", "title 3", "body 3")], docs(a))
        check(a.held() == [] and a.rejected() == {}, (a.held(), a.rejected()))
        check(a.q("SELECT * FROM items") == [("i1", "unrelated", 1)], a.q("SELECT * FROM items"))
    # and what moved in keeps syncing both ways
    a1.q("UPDATE docs SET body = 'alice was here' WHERE id = 'd1'")
    a1.sync()
    b.sync()
    a2.sync()
    check(("d1", "bob", "new title 1", "alice was here") in docs(b), docs(b))
    check(docs(a2) == docs(a1) == view(env, "alice"), (docs(a1), docs(a2)))
    # a move-in arriving while the device holds an unrelated unsent change
    a2.q("INSERT INTO items VALUES('i2', 'from a2', 2)")
    env.sql("UPDATE docs SET owner = 'alice', body = 'given' WHERE id = 'd4'")
    a2.receive()
    check(("d4", "alice", "title 4", "given") in docs(a2), docs(a2))
    a2.sync()
    check(env.sql("SELECT name FROM items WHERE id = 'i2'", fetch=True) == [("from a2",)])


# ---- move-out, for every cause --------------------------------------------------

class MoveOut:
    """Alice's two devices (one pulls in chunks of 2 rows, through a second
    server) and Bob's device around one row `key` that leaves Alice's view
    and comes back."""

    def __init__(self, env, key, alice_claims=None, alice_role="app_user", bob_role="app_user",
                 table="docs", **server):
        self.env, self.key, self.table = env, key, table
        roles = ",".join(sorted({"app_user", alice_role, bob_role}))
        self.s1 = env.server("s1", allowed_roles=roles, **server)
        self.s2 = env.server("s2", allowed_roles=roles, pull_max_rows=2, **server)
        self.claims = dict(alice_claims or {})
        self.role = alice_role
        self.a = [dev(env, "a1", "alice", self.s1, role=alice_role, **self.claims),
                  dev(env, "a2", "alice", self.s2, role=alice_role, **self.claims)]
        self.b = dev(env, "b", "bob", self.s1, role=bob_role)

    def rows(self, d):
        cols = "id, owner, title, body" if self.table == "docs" else "id, name, qty"
        return d.q(f"SELECT {cols} FROM {self.table} ORDER BY id")

    def pg_row(self):
        cols = "id, owner, title, body" if self.table == "docs" else "id, name, qty"
        r = self.env.sql(f"SELECT {cols} FROM {self.table} WHERE id = %s", (self.key,), fetch=True)
        return tuple(r[0]) if r else None

    def pg_cl(self):
        r = self.env.sql(f"SELECT cl FROM {self.table}__sync_clock WHERE id = %s", (self.key,), fetch=True)
        return r[0][0] if r else None

    def view(self, sub="alice"):
        return view(self.env, sub, self.role, self.table, **self.claims)

    def sync_all(self):
        for d in self.a + [self.b]:
            d.sync()

    def held_by(self, d):
        return any(r[0] == self.key for r in self.rows(d))

    def start(self):
        """Everyone synced; Alice's devices hold the row."""
        self.sync_all()
        for d in self.a:
            check(self.held_by(d), f"{d.name} does not hold {self.key} to begin with: {self.rows(d)}")
            check(self.rows(d) == self.view(), (d.name, self.rows(d), self.view()))
        check(self.held_by(self.b), f"bob does not hold {self.key}: {self.rows(self.b)}")
        self.cl = self.pg_cl()

    def out(self, what):
        """After the cause: the row leaves Alice's devices, locally only."""
        pg_before = self.pg_row()
        check(pg_before is not None, "the row must stay in Postgres")
        for d in self.a:
            d.sync()
            check(not self.held_by(d), f"{what}: {self.key} is still on {d.name}: {self.rows(d)}")
            check(self.rows(d) == self.view(), (what, d.name, self.rows(d), self.view()))
            check(d.one(f"SELECT count(*) FROM {self.table}__sync_clock WHERE id = ?", self.key) == 0,
                  f"{what}: {d.name} keeps a clock (a tombstone?) for {self.key}")
            check(d.rejected() == {} and d.status()["pending_rows"] == 0, (d.rejected(), d.status()))
        check(self.pg_row() == pg_before and self.pg_cl() == self.cl,
              f"{what}: Postgres changed: {self.pg_row()} cl={self.pg_cl()} (was {pg_before}, cl={self.cl})")
        self.b.sync()
        check(self.held_by(self.b), f"{what}: bob lost {self.key}")
        check(self.rows(self.b) == view(self.env, "bob", "app_user", self.table), "bob's view")

    def edit_while_out(self):
        """The row changes while Alice cannot see it (through Postgres), and
        her devices pull past the change: when it comes back, it has not
        changed since their cursor."""
        if self.table == "docs":
            self.env.sql("UPDATE docs SET body = body || ' (edited while away)' WHERE id = %s", (self.key,))
        else:
            self.env.sql(f"UPDATE {self.table} SET qty = qty + 100 WHERE id = %s", (self.key,))
        self.cl = self.pg_cl()
        for d in self.a:
            d.sync()
            check(not self.held_by(d), f"{d.name} got {self.key} while it may not see it")

    def back(self, what):
        """After the cause is undone: the row is back, with current values."""
        want = self.pg_row()
        for d in self.a:
            d.sync()
            got = [r for r in self.rows(d) if r[0] == self.key]
            check(got == [want], f"{what}: {d.name} has {got}, Postgres {want}")
            check(self.rows(d) == self.view(), (what, d.name, self.rows(d), self.view()))
            check(d.held() == [] and d.rejected() == {}, (d.held(), d.rejected()))
        check(self.pg_cl() == self.cl, "Postgres unchanged by the move-in")


@test
def move_out_share_revoked(env):
    world(env, SHARES)
    env.sql("INSERT INTO docs VALUES('d1', 'bob', 'shared', 'hello'), ('d2', 'alice', 'own', 'x'),"
            " ('d3', 'bob', 'other', 'y'); INSERT INTO shares VALUES('d1', 'alice')")
    m = MoveOut(env, "d1")
    m.start()
    env.sql("DELETE FROM shares WHERE doc = 'd1'")
    m.out("share revoked")
    m.edit_while_out()
    env.sql("INSERT INTO shares VALUES('d1', 'alice')")
    m.back("share granted again")


@test
def move_out_owner_changed(env):
    world(env)
    env.sql("INSERT INTO docs VALUES('d1', 'alice', 'mine', 'hello'), ('d2', 'alice', 'own', 'x'),"
            " ('d3', 'bob', 'other', 'y')")
    m = MoveOut(env, "d1")
    m.sync_all()
    env.sql("UPDATE docs SET owner = 'bob' WHERE id = 'd1'")
    m.a[0].sync()          # a1 sees the move-out now, a2 only after the row is back
    check(not m.held_by(m.a[0]), docs(m.a[0]))
    m.b.sync()
    check(m.held_by(m.b), docs(m.b))
    # bob, the new owner, edits it on his device
    m.b.q("UPDATE docs SET body = 'bob took it' WHERE id = 'd1'")
    m.b.sync()
    check(m.pg_row() == ("d1", "bob", "mine", "bob took it"), m.pg_row())
    m.cl = m.pg_cl()
    m.a[0].sync()
    check(not m.held_by(m.a[0]), docs(m.a[0]))
    check_view(env, m.a[0], "alice")
    env.sql("UPDATE docs SET owner = 'alice' WHERE id = 'd1'")
    m.back("owner changed back")


@test
def move_out_policy_altered(env):
    world(env, f"CREATE POLICY p ON docs USING (owner = {SUB} OR title = 'public') WITH CHECK (owner = {SUB});")
    env.sql("INSERT INTO docs VALUES('d1', 'bob', 'public', 'hello'), ('d2', 'alice', 'own', 'x'),"
            " ('d3', 'bob', 'other', 'y')")
    m = MoveOut(env, "d1")
    m.start()
    env.sql(f"ALTER POLICY p ON docs USING (owner = {SUB})")
    m.out("ALTER POLICY")
    m.edit_while_out()
    env.sql(f"ALTER POLICY p ON docs USING (owner = {SUB} OR title = 'public')")
    m.back("ALTER POLICY back")


@test
def move_out_policy_dropped_and_created(env):
    world(env, f"{OWNER_POLICY} CREATE POLICY everyone_reads ON docs FOR SELECT USING (title = 'public');")
    env.sql("INSERT INTO docs VALUES('d1', 'bob', 'public', 'hello'), ('d2', 'alice', 'own', 'x'),"
            " ('d3', 'bob', 'other', 'y')")
    m = MoveOut(env, "d1")
    m.start()
    env.sql("DROP POLICY everyone_reads ON docs")
    m.out("DROP POLICY")
    m.edit_while_out()
    env.sql("CREATE POLICY everyone_reads ON docs FOR SELECT USING (title = 'public')")
    m.back("CREATE POLICY")


@test
def move_out_rls_enabled(env):
    world(env, OWNER_POLICY + "ALTER TABLE docs DISABLE ROW LEVEL SECURITY;")
    env.sql("INSERT INTO docs VALUES('d1', 'bob', 'open', 'hello'), ('d2', 'alice', 'own', 'x')")
    m = MoveOut(env, "d1")
    m.start()
    env.sql("ALTER TABLE docs ENABLE ROW LEVEL SECURITY")
    m.out("ENABLE ROW LEVEL SECURITY")
    m.edit_while_out()
    env.sql("ALTER TABLE docs DISABLE ROW LEVEL SECURITY")
    m.back("DISABLE ROW LEVEL SECURITY")


@test
def move_out_grant_revoked(env):
    """REVOKE SELECT from Alice's role (viewer): the whole table leaves her
    devices, Bob (app_user) keeps it; GRANT brings it back. Both a table
    without RLS (items) and one with (docs)."""
    world(env, READ_ALL_OWNER_WRITES, "GRANT SELECT ON docs, items TO viewer;")
    env.sql("INSERT INTO items VALUES('i1', 'open', 1), ('i2', 'more', 2);"
            "INSERT INTO docs VALUES('d1', 'bob', 'read by all', 'hello')")
    for table, key in (("items", "i1"), ("docs", "d1")):
        m = MoveOut(env, key, alice_role="viewer", table=table) if table == "items" else m2(env, m)
        m.start()
        env.sql(f"REVOKE SELECT ON {table} FROM viewer")
        m.out(f"REVOKE SELECT ON {table}")
        check(all(m.rows(d) == [] for d in m.a), "the whole table leaves")
        m.edit_while_out()
        env.sql(f"GRANT SELECT ON {table} TO viewer")
        m.back(f"GRANT SELECT ON {table}")


def m2(env, m):
    """The same devices, now watching docs."""
    m.table, m.key = "docs", "d1"
    return m


@test
def move_out_role_membership_revoked(env):
    """Alice's role (viewer) reads through its membership in `readers`
    (a privilege on items; a policy on docs): REVOKE readers FROM viewer is
    invisible to event triggers, yet her view changes."""
    world(env, f"CREATE POLICY p ON docs USING (owner = {SUB} OR pg_has_role('readers', 'MEMBER'));",
          "GRANT SELECT ON items TO readers; GRANT SELECT ON docs TO viewer;")
    env.sql("GRANT readers TO viewer")
    try:
        env.sql("INSERT INTO items VALUES('i1', 'through readers', 1);"
                "INSERT INTO docs VALUES('d1', 'bob', 'through readers', 'hello')")
        m = MoveOut(env, "i1", alice_role="viewer", table="items")
        for table, key in (("items", "i1"), ("docs", "d1")):
            m.table, m.key = table, key
            m.start()
            env.sql("REVOKE readers FROM viewer")
            m.out(f"REVOKE readers FROM viewer ({table})")
            m.edit_while_out()
            env.sql("GRANT readers TO viewer")
            m.back(f"GRANT readers TO viewer ({table})")
    finally:
        env.sql("REVOKE readers FROM viewer")


@test
def move_out_claims_changed(env):
    world(env, f"CREATE POLICY p ON docs USING (owner = {SUB} OR title = {CLAIM_TEAM}) WITH CHECK (owner = {SUB});")
    env.sql("INSERT INTO docs VALUES('d1', 'bob', 'red', 'hello'), ('d2', 'bob', 'blue', 'x'),"
            " ('d3', 'alice', 'own', 'y')")
    m = MoveOut(env, "d1", alice_claims={"team": "red"})
    m.start()
    check(all("d2" not in [r[0] for r in docs(d)] for d in m.a))
    m.claims = {"team": "blue"}
    for d in m.a:
        d.set_token(token("alice", team="blue"))
    m.out("team claim red -> blue")
    check(all("d2" in [r[0] for r in docs(d)] for d in m.a), "blue rows move in")
    m.edit_while_out()
    m.claims = {"team": "red"}
    for d in m.a:
        d.set_token(token("alice", team="red"))
    m.back("team claim blue -> red")
    # claims that are only times or the token id do not make snapshots: a
    # new token with another exp, iat and jti pulls incrementally (204)
    for d in m.a:
        d.set_token(token("alice", ttl=7200, team="red", iat=int(time.time()), jti="x1"))
        r = d.sync()
        check(r["receive"]["payloads"] == 0, r)


@test
def move_out_watched_function(env):
    """A policy calls a SECURITY DEFINER function that reads `acl`: pgsync
    cannot see the dependency; sync_watch declares it. Changing the function
    itself needs sync_visibility_changed."""
    world(env, f"""
      CREATE TABLE acl(doc text, usr text, PRIMARY KEY (doc, usr));
      CREATE FUNCTION may_read(d text) RETURNS boolean LANGUAGE sql STABLE SECURITY DEFINER
        AS $$ SELECT EXISTS (SELECT 1 FROM acl WHERE doc = d AND usr = {SUB}) $$;
      CREATE POLICY p ON docs USING (owner = {SUB} OR may_read(id)) WITH CHECK (owner = {SUB});
      SELECT sync_watch('docs', 'acl');
    """)
    env.sql("INSERT INTO docs VALUES('d1', 'bob', 'acl', 'hello'), ('d2', 'alice', 'own', 'x');"
            "INSERT INTO acl VALUES('d1', 'alice')")
    m = MoveOut(env, "d1")
    m.start()
    env.sql("DELETE FROM acl")
    m.out("acl row deleted (sync_watch)")
    m.edit_while_out()
    env.sql("INSERT INTO acl VALUES('d1', 'alice')")
    m.back("acl row inserted (sync_watch)")
    # the function changes: pgsync cannot know, the admin says so
    env.sql("CREATE OR REPLACE FUNCTION may_read(d text) RETURNS boolean LANGUAGE sql STABLE "
            "SECURITY DEFINER AS $$ SELECT false $$; SELECT sync_visibility_changed('docs')")
    m.out("function replaced + sync_visibility_changed")
    m.edit_while_out()
    env.sql(f"CREATE OR REPLACE FUNCTION may_read(d text) RETURNS boolean LANGUAGE sql STABLE "
            f"SECURITY DEFINER AS $$ SELECT EXISTS (SELECT 1 FROM acl WHERE doc = d AND usr = {SUB}) $$;"
            "SELECT sync_visibility_changed('docs')")
    m.back("function restored + sync_visibility_changed")


if __name__ == "__main__":
    sys.exit(suite.main(sys.argv[1:], test, setup))
