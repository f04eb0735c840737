"""test_schema.py — end-to-end tests of issue 9 (docs/MIGRATIONS.md): old and
new app versions keep syncing side by side through schema changes, on real
Postgres, a real pgsync-server and real SQLite files.

    test/server/run.sh [names...]
    PGS_SCHEMA_SCHEDULES=100 PGS_SEED=7 test/server/run.sh schema_changes_converge   (long mode)
"""
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import suite  # noqa: E402
from suite import Device, check, info, token  # noqa: E402

test = suite.Registry()

V1_PG = """
CREATE EXTENSION pgsync;
GRANT EXECUTE ON FUNCTION sync_device(uuid, text) TO authenticator;
CREATE TABLE items(id text PRIMARY KEY, title text, qty integer);
SELECT sync_init('items');
GRANT SELECT, INSERT, UPDATE, DELETE ON items TO app_user;
"""
V1_DEV = "CREATE TABLE items(id TEXT PRIMARY KEY, title TEXT, qty INTEGER);"
V2_DEV = V1_DEV.replace("qty INTEGER)", "qty INTEGER, barcode TEXT)") + \
    "CREATE TABLE tags(id TEXT PRIMARY KEY, item TEXT, tag TEXT);"


def pg_rows(env, table, cols="*"):
    return [tuple(r) for r in env.sql(f"SELECT {cols} FROM {table} ORDER BY 1", fetch=True)]


def quiet(*devs, rounds=4):
    for _ in range(rounds):
        for d in devs:
            d.sync()


def pg_error(env, sql):
    """The error Postgres raises for sql (message and hint), or None."""
    import psycopg2
    c = psycopg2.connect(env.pg.dsn(db=env.db))
    try:
        with c.cursor() as cur:
            cur.execute(sql)
        c.commit()
        return None
    except psycopg2.Error as e:
        c.rollback()
        return (e.diag.message_primary or "") + " | " + (e.diag.message_hint or "")
    finally:
        c.close()


@test
def mixed_versions_add_column_and_table(env):
    """v1 and v2 devices edit throughout; the server is migrated between them
    (a column and a table); v1 is upgraded last. Nothing a newer replica sends
    blocks an older one (held, then filled in), no edit is lost, and every
    replica ends identical."""
    env.sql(V1_PG)
    s = env.server()
    old = Device(env, "old", token("alice"), s, V1_DEV, ["items"])
    new = Device(env, "new", token("alice"), s, V2_DEV, ["items", "tags"])
    old.q("INSERT INTO items VALUES('i1', 'one', 1)")
    old.sync()
    new.sync()
    # v2 writes what the server does not know yet: held there, the rest applies
    new.q("UPDATE items SET barcode = 'B-1', qty = 2 WHERE id = 'i1'")
    new.q("INSERT INTO items VALUES('i2', 'two', 2, 'B-2')")
    new.q("INSERT INTO tags VALUES('t1', 'i1', 'red')")
    r = new.sync()
    check(r["send"]["rejected"] == 0, r)
    check(pg_rows(env, "items") == [("i1", "one", 2), ("i2", "two", 2)], pg_rows(env, "items"))
    check(env.sql("SELECT count(*) FROM pgsync.held", fetch=True)[0][0] >= 2, "the server holds the new parts")
    # v1 keeps syncing meanwhile
    old.q("UPDATE items SET title = 'one, edited on v1' WHERE id = 'i1'")
    old.sync()
    # the server migrates: held values fill in, nothing is downloaded again
    before = old.status()["recv_cursor"]
    env.sql("ALTER TABLE items ADD COLUMN barcode text; SELECT sync_init('items');"
            "CREATE TABLE tags(id text PRIMARY KEY, item text, tag text); SELECT sync_init('tags');"
            "GRANT SELECT, INSERT, UPDATE, DELETE ON tags TO app_user")
    check(pg_rows(env, "items") == [("i1", "one, edited on v1", 2, "B-1"), ("i2", "two", 2, "B-2")],
          pg_rows(env, "items"))
    check(pg_rows(env, "tags") == [("t1", "i1", "red")], pg_rows(env, "tags"))
    # v1 receives columns and a table it lacks: held on the device, the rest applies
    new.q("UPDATE items SET qty = 3 WHERE id = 'i2'")
    quiet(new, old)
    check(old.rows("items") == [("i1", "one, edited on v1", 2), ("i2", "two", 3)], old.rows("items"))
    st = old.status()
    check(st["held"] > 0 and st["last_error"] is None, st)
    held = old.q("SELECT tbl, pk, code, message FROM sync_network_held ORDER BY tbl, pk")
    check(("items", '{"id":"i1"}', "PS003") in [h[:3] for h in held] and
          any('"barcode"' in h[3] for h in held) and any(h[0] == "tags" for h in held), held)
    check(before != st["recv_cursor"], st)
    # v1 upgrades last: its held values fill in at sync_init, no re-download
    old.q("ALTER TABLE items ADD COLUMN barcode TEXT")
    old.q("SELECT sync_init('items')")
    old.q("CREATE TABLE tags(id TEXT PRIMARY KEY, item TEXT, tag TEXT)")
    old.q("SELECT sync_init('tags')")
    check(old.rows("items") == [("i1", "one, edited on v1", 2, "B-1"), ("i2", "two", 3, "B-2")],
          old.rows("items"))
    check(old.rows("tags") == [("t1", "i1", "red")], old.rows("tags"))
    check(old.status()["held"] == 0, old.status())
    r = old.sync()
    check(r["receive"]["applied"] == 0, f"nothing is downloaded again: {r}")
    old.q("UPDATE items SET barcode = 'B-1b' WHERE id = 'i1'")
    quiet(old, new)
    want = pg_rows(env, "items")
    check(old.rows("items") == new.rows("items") == want, (old.rows("items"), new.rows("items"), want))
    check(old.rows("tags") == new.rows("tags") == pg_rows(env, "tags"))
    check(want[0][3] == "B-1b", want)


@test
def pg_add_column_keeps_clocks(env):
    """ALTER TABLE ... ADD COLUMN + sync_init on Postgres: the clocks stay,
    devices download nothing again, and a device's offline edit of an older
    column made before the migration still lands."""
    env.sql(V1_PG + "INSERT INTO items SELECT 'k' || g, 'row ' || g, g FROM generate_series(1, 50) g")
    s = env.server()
    a = Device(env, "a", token("alice"), s, V1_DEV, ["items"])
    a.sync()
    a.q("UPDATE items SET title = 'offline edit' WHERE id = 'k7'")
    clocks = env.sql("SELECT id, cl, ver, clk FROM items__sync_clock ORDER BY id", fetch=True)
    env.sql("ALTER TABLE items ADD COLUMN note text DEFAULT 'n/a'; SELECT sync_init('items')")
    after = env.sql("SELECT id, cl, ver, clk FROM items__sync_clock ORDER BY id", fetch=True)
    check(after == clocks, "sync_init after ADD COLUMN re-stamped the clocks")
    check(env.sql("SELECT cols FROM pgsync.tables WHERE name = 'items'", fetch=True)[0][0] ==
          ["title", "qty", "note"])
    r = a.sync()
    check(r["send"]["applied"] >= 1 and r["send"]["rejected"] == 0, r)
    check(r["receive"]["applied"] == 0, f"an avalanche of changes after ADD COLUMN: {r}")
    check(pg_rows(env, "items", "id, title, note")[:1] == [("k1", "row 1", "n/a")])
    check(("k7", "offline edit", "n/a") in pg_rows(env, "items", "id, title, note"))
    # a device that upgrades keeps the default locally until someone writes the column
    a.q("ALTER TABLE items ADD COLUMN note TEXT DEFAULT 'n/a'")
    a.q("SELECT sync_init('items')")
    env.sql("UPDATE items SET note = 'from the server' WHERE id = 'k3'")
    a.q("UPDATE items SET note = 'from the device' WHERE id = 'k4'")
    quiet(a)
    check(a.rows("items") == pg_rows(env, "items"), (a.rows("items")[:5], pg_rows(env, "items")[:5]))


@test
def pg_destructive_ddl(env):
    """Postgres: DROP COLUMN and RENAME COLUMN of a synced column are
    recorded (clocks stay valid, older devices keep syncing); a type change
    that changes how values travel, a change of the key and a rename of a key
    column are refused at DDL time with the supported way."""
    env.sql(V1_PG.replace("qty integer)", "qty integer, note varchar(10), old text)"))
    dev_schema = V1_DEV.replace("qty INTEGER)", "qty INTEGER, note TEXT, old TEXT)")
    s = env.server()
    v1 = Device(env, "v1", token("alice"), s, dev_schema, ["items"])
    v1.q("INSERT INTO items VALUES('i1', 'one', 1, 'n', 'o'), ('i2', 'two', 2, 'm', 'p')")
    v1.sync()
    # refused, with the supported way
    e = pg_error(env, "ALTER TABLE items ALTER COLUMN qty TYPE text")
    check(e and "cannot change to text" in e and "Add a new column" in e, e)
    e = pg_error(env, "ALTER TABLE items DROP CONSTRAINT items_pkey, ADD PRIMARY KEY (id, title)")
    check(e and "primary key of synced table items cannot change" in e and "MIGRATIONS" in e, e)
    e = pg_error(env, "ALTER TABLE items RENAME COLUMN id TO item_id")
    check(e and "key column \"id\"" in e, e)
    # harmless: a type change that keeps the payload form
    check(pg_error(env, "ALTER TABLE items ALTER COLUMN note TYPE text") is None)
    check(pg_error(env, "ALTER TABLE items ALTER COLUMN qty TYPE bigint") is None)  # INTEGER still
    # supported: rename and drop
    env.sql("ALTER TABLE items RENAME COLUMN title TO name")
    env.sql("ALTER TABLE items DROP COLUMN old")
    check(env.sql("SELECT name, now FROM pgsync.column_history ORDER BY 1", fetch=True) ==
          [("old", None), ("title", "name")])
    check(env.sql("SELECT cols FROM pgsync.tables", fetch=True)[0][0] == ["name", "qty", "note"])
    # the v1 device still sends title and old: title lands in name, old is ignored
    v1.q("UPDATE items SET title = 'one from v1', old = 'ignored', qty = 10 WHERE id = 'i1'")
    r = v1.sync()
    check(r["send"]["rejected"] == 0, r)
    check(pg_rows(env, "items") == [("i1", "one from v1", 10, "n"), ("i2", "two", 2, "m")],
          pg_rows(env, "items"))
    check(env.sql("SELECT count(*) FROM pgsync.held", fetch=True)[0][0] == 0, "nothing held")
    # the server's changes reach v1 under the former name
    env.sql("UPDATE items SET name = 'two from the server' WHERE id = 'i2'")
    v1.sync()
    check(v1.rows("items") == [("i1", "one from v1", 10, "n", "ignored"),
                               ("i2", "two from the server", 2, "m", "p")], v1.rows("items"))
    check(v1.status()["held"] == 0, v1.status())
    # a new device with the new names syncs directly
    v2 = Device(env, "v2", token("alice"), s, "CREATE TABLE items(id TEXT PRIMARY KEY, name TEXT, qty INTEGER, note TEXT)",
                ["items"])
    v2.sync()
    check(v2.rows("items") == pg_rows(env, "items"), v2.rows("items"))
    # renaming a table keeps its name in payloads
    env.sql("ALTER TABLE items RENAME TO products")
    env.sql("UPDATE products SET qty = 42 WHERE id = 'i1'")
    quiet(v1, v2)
    check(v2.rows("items")[0] == ("i1", "one from v1", 42, "n"), v2.rows("items"))
    v1.q("UPDATE items SET qty = 5000000000 WHERE id = 'i2'")  # beyond integer: bigint now
    quiet(v1, v2)
    check(env.sql("SELECT qty FROM products WHERE id = 'i2'", fetch=True) == [(5000000000,)])
    check(v2.rows("items")[1][2] == 5000000000, v2.rows("items"))
    # dropping a synced table drops its metadata
    env.sql("DROP TABLE products")
    check(env.sql("SELECT count(*) FROM pgsync.tables", fetch=True)[0][0] == 0)


@test
def sqlite_destructive_ddl(env):
    """SQLite: DROP COLUMN of a synced column is refused by SQLite itself and
    done with sync_alter; RENAME COLUMN works with plain ALTER TABLE or
    sync_alter; RENAME TO fails the next sync with the fix. A device that did
    each keeps syncing with the server and with older devices."""
    env.sql(V1_PG.replace("qty integer)", "qty integer, note text)"))
    schema = V1_DEV.replace("qty INTEGER)", "qty INTEGER, note TEXT)")
    s = env.server()
    a = Device(env, "a", token("alice"), s, schema, ["items"])
    b = Device(env, "b", token("alice"), s, schema, ["items"])
    a.q("INSERT INTO items VALUES('i1', 'one', 1, 'n1')")
    quiet(a, b)
    try:
        a.q("ALTER TABLE items DROP COLUMN note")
        check(False, "SQLite let a synced column be dropped")
    except Exception as e:  # noqa: BLE001
        check("no such column" in str(e), str(e))
    a.q("SELECT sync_alter('items', 'DROP COLUMN note')")
    a.q("ALTER TABLE items RENAME COLUMN title TO name")
    a.q("UPDATE items SET name = 'renamed on a', qty = 5 WHERE id = 'i1'")
    r = a.sync()
    check(r["send"]["rejected"] == 0, r)
    # the server knows the column as title: a's payload names it name, formerly title
    check(pg_rows(env, "items") == [("i1", "renamed on a", 5, "n1")], pg_rows(env, "items"))
    b.q("UPDATE items SET note = 'b writes the dropped column', title = 'b' WHERE id = 'i1'")
    quiet(b, a)
    check(a.rows("items") == [("i1", "b", 5)], a.rows("items"))
    check(a.status()["held"] == 0 and a.status()["last_error"] is None, a.status())
    check(b.rows("items") == [("i1", "b", 5, "b writes the dropped column")], b.rows("items"))
    # RENAME TO: the next sync says what to do, nothing is lost
    a.q("ALTER TABLE items RENAME TO things")
    a.q("UPDATE things SET qty = 6")
    try:
        a.sync()
        check(False, "sync after RENAME TO did not fail")
    except Exception as e:  # noqa: BLE001
        check('renamed to "things"' in str(e) and "RENAME TO" in str(e), str(e))
    a.q("ALTER TABLE things RENAME TO items")
    quiet(a, b)
    check(pg_rows(env, "items")[0][2] == 6, pg_rows(env, "items"))


@test
def non_public_schema_with_rls(env):
    """shop.products on Postgres syncs with products on SQLite, under RLS;
    a role without USAGE on the schema gets an error that names the GRANT;
    two schemas with one table name are told apart with sync_init's name."""
    env.sql("""
    CREATE EXTENSION pgsync;
    GRANT EXECUTE ON FUNCTION sync_device(uuid, text) TO authenticator;
    CREATE SCHEMA shop;
    CREATE TABLE shop.products(id text PRIMARY KEY, owner text NOT NULL, name text);
    SELECT sync_init('shop.products');
    ALTER TABLE shop.products ENABLE ROW LEVEL SECURITY;
    CREATE POLICY mine ON shop.products
      USING (owner = current_setting('request.jwt.claims', true)::json->>'sub')
      WITH CHECK (owner = current_setting('request.jwt.claims', true)::json->>'sub');
    GRANT SELECT, INSERT, UPDATE, DELETE ON shop.products TO app_user;
    INSERT INTO shop.products VALUES ('p1', 'alice', 'alice''s'), ('p2', 'bob', 'bob''s');
    """)
    check(env.sql("SELECT name FROM pgsync.tables", fetch=True) == [("products",)])
    s = env.server()
    a = Device(env, "a", token("alice"), s, "CREATE TABLE products(id TEXT PRIMARY KEY, owner TEXT NOT NULL, name TEXT)",
               ["products"])
    try:
        err = json.dumps(a.sync()) + json.dumps(a.status())
    except Exception as e:  # noqa: BLE001
        err = str(e)
    check("GRANT USAGE ON SCHEMA shop TO app_user" in err, f"the error does not name the grant: {err}")
    env.sql("GRANT USAGE ON SCHEMA shop TO app_user")
    a.sync()
    check(a.rows("products") == [("p1", "alice", "alice's")], a.rows("products"))
    a.q("INSERT INTO products VALUES ('p3', 'alice', 'new'), ('p4', 'bob', 'forged')")
    r = a.sync()
    check(r["send"]["rejected"] == 1, r)
    check(pg_rows(env, "shop.products") == [("p1", "alice", "alice's"), ("p2", "bob", "bob's"),
                                            ("p3", "alice", "new")])
    # one name in payloads per synced table
    env.sql("CREATE TABLE products(id text PRIMARY KEY, label text)")
    e = pg_error(env, "SELECT sync_init('public.products')")
    check(e and "already synced as \"products\"" in e and "name =>" in e, e)
    env.sql("SELECT sync_init('public.products', name => 'public_products');"
            "GRANT SELECT, INSERT, UPDATE, DELETE ON products TO app_user;"
            "INSERT INTO products VALUES ('x', 'public one')")
    b = Device(env, "b", token("alice"), s, "CREATE TABLE products(id TEXT PRIMARY KEY, owner TEXT NOT NULL, name TEXT);"
               "CREATE TABLE public_products(id TEXT PRIMARY KEY, label TEXT)", ["products", "public_products"])
    b.sync()
    check(b.rows("public_products") == [("x", "public one")], b.rows("public_products"))
    check(b.rows("products") == [("p1", "alice", "alice's"), ("p3", "alice", "new")], b.rows("products"))


@test
def sequence_keys_refused(env):
    """Keys a sequence generates collide between replicas: sync_init refuses
    serial, identity and nextval() keys (unless allow_sequence_keys), and
    SQLite's INTEGER PRIMARY KEY; the message says what to use."""
    env.sql("CREATE EXTENSION pgsync;"
            "CREATE TABLE a(id serial PRIMARY KEY, v text);"
            "CREATE TABLE b(id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text);"
            "CREATE SEQUENCE s; CREATE TABLE c(id bigint PRIMARY KEY DEFAULT nextval('s'), v text);"
            "CREATE TABLE d(id bigint PRIMARY KEY, v text);")
    for t in ("a", "b", "c"):
        e = pg_error(env, f"SELECT sync_init('{t}')")
        check(e and "generated by a sequence" in e and "sync_uuid()" in e and "allow_sequence_keys" in e, e)
    check(pg_error(env, "SELECT sync_init('a', allow_sequence_keys => true)") is None)
    check(pg_error(env, "SELECT sync_init('d')") is None, "a plain integer key is the app's choice")
    d = Device(env, "dev", token("alice"), None, "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)", [])
    try:
        d.q("SELECT sync_init('t')")
        check(False, "INTEGER PRIMARY KEY accepted")
    except Exception as e:  # noqa: BLE001
        check("row ids collide" in str(e) and "sync_uuid()" in str(e), str(e))


def schema_schedule(env, rng, n_ops, log):
    """Three app versions (v1 items; v2 + barcode; v3 + tags table), two
    devices and the server upgrading at random points, random edits by all,
    everyone on v3 at the end: every replica identical to Postgres."""
    env.sql(V1_PG)
    s = env.server()
    devs = [Device(env, f"d{i}", token("alice"), s, V1_DEV, ["items"]) for i in range(2)]
    ver = {"pg": 1, 0: 1, 1: 1}
    keys = [f"k{i}" for i in range(6)]

    def upgrade(who):
        v = ver[who] + 1
        if who == "pg":
            if v == 2:
                env.sql("ALTER TABLE items ADD COLUMN barcode text; SELECT sync_init('items')")
            else:
                env.sql("CREATE TABLE tags(id text PRIMARY KEY, item text, tag text); SELECT sync_init('tags');"
                        "GRANT SELECT, INSERT, UPDATE, DELETE ON tags TO app_user")
        else:
            d = devs[who]
            if v == 2:
                d.q("ALTER TABLE items ADD COLUMN barcode TEXT")
                d.q("SELECT sync_init('items')")
            else:
                d.q("CREATE TABLE tags(id TEXT PRIMARY KEY, item TEXT, tag TEXT)")
                d.q("SELECT sync_init('tags')")
        ver[who] = v
        log.append(f"{who}: upgrade to v{v}")

    for _ in range(n_ops):
        op = rng.random()
        who = rng.choice(["pg", 0, 1])
        if op < 0.12 and ver[who] < 3:
            upgrade(who)
            continue
        if op < 0.3 and who != "pg":
            devs[who].sync()
            log.append(f"d{who}: sync")
            continue
        k, val = rng.choice(keys), f"{who}-{rng.randrange(1000)}"
        cols = ["title", "qty"] + (["barcode"] if ver[who] >= 2 else [])
        col = rng.choice(cols)
        v = rng.randrange(100) if col == "qty" else val
        write = rng.random()
        if who == "pg":
            if write < 0.15:
                env.sql("DELETE FROM items WHERE id = %s", (k,))
            elif ver["pg"] >= 3 and write < 0.3:
                env.sql("INSERT INTO tags VALUES (%s, %s, %s) ON CONFLICT (id) DO UPDATE SET tag = EXCLUDED.tag",
                        (k + "t", k, val))
            else:
                env.sql(f"INSERT INTO items(id, {col}) VALUES (%s, %s) ON CONFLICT (id) DO UPDATE SET {col} = EXCLUDED.{col}",
                        (k, v))
        else:
            d = devs[who]
            if write < 0.15:
                d.q("DELETE FROM items WHERE id = ?", k)
            elif ver[who] >= 3 and write < 0.3:
                d.q("INSERT INTO tags VALUES (?, ?, ?) ON CONFLICT (id) DO UPDATE SET tag = excluded.tag", k + "t", k, val)
            else:
                d.q(f"INSERT INTO items(id, {col}) VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET {col} = excluded.{col}",
                    k, v)
        log.append(f"{who}: write {k}.{col} = {v!r} ({write:.2f})")
    for who in ("pg", 0, 1):
        while ver[who] < 3:
            upgrade(who)
    for _ in range(4):
        for d in devs:
            d.sync()
    want_items, want_tags = pg_rows(env, "items"), pg_rows(env, "tags")
    for d in devs:
        check(d.rows("items") == want_items, f"{d.name} items {d.rows('items')} != Postgres {want_items}")
        check(d.rows("tags") == want_tags, f"{d.name} tags {d.rows('tags')} != Postgres {want_tags}")
        check(d.status()["held"] == 0, f"{d.name} still holds {d.held()}")
    check(env.sql("SELECT count(*) FROM pgsync.held", fetch=True)[0][0] == 0, "the server still holds changes")


@test
def schema_changes_converge(env):
    """Randomized: the convergence schedules with schema changes at random
    points on every replica (PGS_SCHEMA_SCHEDULES, PGS_SEED, PGS_OPS)."""
    n = int(os.environ.get("PGS_SCHEMA_SCHEDULES", "5"))
    seed = int(os.environ.get("PGS_SEED", "20261201"))
    n_ops = int(os.environ.get("PGS_OPS", "40"))
    only = os.environ.get("PGS_SCHEDULE")
    t0 = time.time()
    ran = 0
    for i in range(n):
        if only is not None and i != int(only):
            continue
        e = env if ran == 0 else suite.Env(schema=None, pg=env.pg)
        log = []
        try:
            schema_schedule(e, random.Random(seed * 104729 + i), n_ops, log)
        except Exception as ex:  # noqa: BLE001
            print(f"  schema: schedule {i} failed (rerun: PGS_SEED={seed} PGS_SCHEMA_SCHEDULES={i + 1} "
                  f"PGS_SCHEDULE={i}); its operations:\n    " + "\n    ".join(log))
            raise AssertionError(f"schedule {i}: {ex}")
        finally:
            ran += 1
            if e is not env:
                e.close()
                env.pg.sql(f"DROP DATABASE IF EXISTS {e.db} WITH (FORCE)")
    print(f"  schema: {ran} schedules run, seed {seed}, {n_ops} operations each, {time.time() - t0:.1f}s")


if __name__ == "__main__":
    sys.exit(suite.main(sys.argv[1:], test))
