"""test_types.py — issue 9, point 6: one form on every replica (docs/TYPES.md,
"One form on every replica"). Where Postgres stores a value in a form other
than the one a device sent (jsonb spacing and key order, timestamptz offsets,
numeric scale, ...), Postgres re-stamps the cell with its stored form (the
received hlc + 1, the canonical site); every replica, the writer included,
ends with the same bytes and the same stamps, and further syncs change
nothing.

    test/server/run.sh [names...]
    /usr/bin/python3 test/server/test_types.py [names...]   (after build.sh; see run.sh)
    PGS_TYPES_SCHEDULES=50 PGS_SEED=7 ... test_types.py canonical_forms_converge   (long mode)

"Postgres" in the comparisons is its payload form: what sync_payload sends,
applied to a scratch SQLite replica whose columns have no type (no affinity:
it keeps every value exactly as it travels).
"""
import json
import os
import random
import sqlite3
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import suite  # noqa: E402
from suite import Device, check, info, token  # noqa: E402
from harness import EXT  # noqa: E402

test = suite.Registry()

CANON_SITE = "00000000-0000-0000-0000-000000000000"
UUID = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"

# (column, Postgres type, device declaration, what device A writes, the form
# every replica must end with). The device declarations keep what is written
# and what Postgres sends as it is (TEXT for text forms, no type where the
# device writes one payload type and Postgres sends another); see
# affinity_converts_quietly for declarations that do not.
CASES = [
    ("jsonb_keys", "jsonb", "TEXT", '{"size":2,"color":"white"}', '{"size": 2, "color": "white"}'),
    ("jsonb_space", "jsonb", "TEXT", '[1,2,  {"a" :null}]', '[1, 2, {"a": null}]'),
    ("json", "json", "TEXT", '{"b":1,  "a":2}', '{"b":1,  "a":2}'),
    ("tstz_offset", "timestamptz", "TEXT", "2024-05-06 12:00:00+02:00", "2024-05-06 10:00:00.000000Z"),
    ("tstz_iso", "timestamptz", "TEXT", "2024-05-06T10:00:00.5Z", "2024-05-06 10:00:00.500000Z"),
    ("tstz_epoch", "timestamptz", "TEXT", "epoch", "1970-01-01 00:00:00.000000Z"),
    ("ts_fraction", "timestamp", "TEXT", "2024-05-06 12:00:00.5", "2024-05-06 12:00:00.500000"),
    ("ts_round", "timestamp(0)", "TEXT", "2024-05-06 12:00:00.7", "2024-05-06 12:00:01.000000"),
    ("date", "date", "TEXT", "2024-5-6", "2024-05-06"),
    ("date_inf", "date", "TEXT", "Infinity", "infinity"),
    ("time", "time", "TEXT", "1:2:3", "01:02:03"),
    ("timetz", "timetz", "TEXT", "12:00+02", "12:00:00+02"),
    ("interval", "interval", "TEXT", "90 minutes", "01:30:00"),
    ("interval_iso", "interval", "TEXT", "P1DT2H", "1 day 02:00:00"),
    ("numeric_scale", "numeric(10,2)", "TEXT", "1.5", "1.50"),
    ("numeric_exp", "numeric", "TEXT", "1.5e3", "1500"),
    ("numeric_nan", "numeric", "TEXT", "nan", "NaN"),
    ("numeric_keep", "numeric", "TEXT", "1.50", "1.50"),
    ("numeric_real", "numeric", "", 2.5, "2.5"),
    ("numeric_int", "numeric", "", 42, "42"),
    ("int_text", "integer", "", " 42", 42),
    ("int_real", "bigint", "", 7.0, 7),
    ("smallint_text", "smallint", "", "-3", -3),
    ("real_text", "real", "", "2.5", 2.5),
    ("double_int", "double precision", "", 3, 3.0),
    ("double_text", "double precision", "", "1e-3", 0.001),
    ("bool_word", "boolean", "", "yes", 1),
    ("bool_letter", "boolean", "", "f", 0),
    ("bool_int", "boolean", "", 1, 1),
    ("uuid_upper", "uuid", "TEXT", UUID.upper(), UUID),
    ("uuid_braces", "uuid", "TEXT", "{" + UUID.replace("-", "") + "}", UUID),
    ("uuid_blob", "uuid", "", bytes.fromhex(UUID.replace("-", "")), UUID),
    ("char_pad", "char(5)", "TEXT", "ab", "ab   "),
    ("varchar", "varchar(10)", "TEXT", "abc", "abc"),
    ("text", "text", "TEXT", "Plain  text ", "Plain  text "),
    ("bytea", "bytea", "BLOB", b"\x00\xff", b"\x00\xff"),
    ("bytea_text", "bytea", "", "hi", b"hi"),
    ("inet", "inet", "TEXT", "10.0.0.1/32", "10.0.0.1"),
    ("inet6", "inet", "TEXT", "2001:DB8:0:0::1", "2001:db8::1"),
    ("cidr", "cidr", "TEXT", "10.1/16", "10.1.0.0/16"),
    ("int_array", "integer[]", "TEXT", "{1, 2,3}", "{1,2,3}"),
    ("text_array", "text[]", "TEXT", '{"a",b, "c d"}', '{a,b,"c d"}'),
    ("jsonb_null", "jsonb", "TEXT", None, None),
    # other payload types than Postgres sends back: re-stamped for the type alone
    ("tstz_half", "timestamptz", "TEXT", "2024-05-06 12:00:00+05:30", "2024-05-06 06:30:00.000000Z"),
    ("real_int", "real", "", 2, 2.0),
    ("text_int", "text", "", 42, "42"),
    ("text_real", "text", "", 1.25, "1.25"),
    ("text_blob", "text", "", b"hi", "hi"),
    ("varchar_int", "varchar(10)", "", 7, "7"),
    ("jsonb_blob", "jsonb", "", b'{"b":1,"a":2}', '{"a": 2, "b": 1}'),
    ("json_blob", "json", "", b'{"b":1}', '{"b":1}'),
]
COLS = [c[0] for c in CASES]


def pg_schema(cases, table="v", extra=""):
    cols = ", ".join(f"c_{n} {t}" for n, t, *_ in cases)
    return f"""
CREATE TABLE {table}(id text PRIMARY KEY, {cols}{extra});
SELECT sync_init('{table}');
GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO app_user;
"""


def dev_schema(cases, table="v", extra=""):
    cols = ", ".join(f"c_{n} {d}".rstrip() for n, _t, d, *_ in cases)
    return f"CREATE TABLE {table}(id TEXT PRIMARY KEY, {cols}{extra});"


PG_BASE = """
CREATE EXTENSION pgsync;
GRANT EXECUTE ON FUNCTION sync_device(uuid, text) TO authenticator;
"""


def setup(pg):
    pass


def dev(env, name, server, schema, tables=("v",), sub="alice"):
    return Device(env, name, token(sub), server, schema, list(tables))


def cells(db, table, cols):
    """{key: (typeof, hex) per column}: the bytes a SQLite replica holds."""
    sel = ", ".join(f"typeof(c_{c}), hex(c_{c})" for c in cols)
    out = {}
    for r in db.execute(f"SELECT id, {sel} FROM {table} ORDER BY id").fetchall():
        out[r[0]] = tuple((r[1 + 2 * i], r[2 + 2 * i]) for i in range(len(cols)))
    return out


def as_cell(v):
    """(typeof, hex) of a Python value as SQLite stores it without affinity."""
    db = sqlite3.connect(":memory:")
    try:
        return db.execute("SELECT typeof(?1), hex(?1)", (v,)).fetchone()
    finally:
        db.close()


def pg_payload(env, since=0):
    return bytes(env.sql("SELECT sync_payload(%s)", (since,), fetch=True)[0][0])


def pg_mirror(env, table, cols):
    """Postgres as its payload form: sync_payload(0) applied to a scratch
    SQLite replica with untyped columns."""
    db = sqlite3.connect(":memory:")
    db.enable_load_extension(True)
    db.load_extension(EXT)
    try:
        db.execute(f"CREATE TABLE {table}(id TEXT PRIMARY KEY, " + ", ".join(f"c_{c}" for c in cols) + ")")
        db.execute(f"SELECT sync_init('{table}')")
        p = pg_payload(env)
        if p:
            db.execute("SELECT sync_apply_payload(?)", (p,))
        return cells(db, table, cols)
    finally:
        db.close()


def stamps(payload, table):
    """{(key, column): (value json, hlc, site)} of every change in payload."""
    out = {}
    if not payload:
        return out
    for row in info(payload)["rows"]:
        if row["table"] != table or row["kind"] == "candidate":
            continue
        for c in row.get("changes", []):
            out[(row["key"][0], c["column"])] = (json.dumps(c["value"]), c["hlc"], c["site"])
    return out


def all_equal(env, devs, table, cols, live_check=True):
    """A, B, ... and Postgres hold the same bytes and the same stamps."""
    want = pg_mirror(env, table, cols)
    for d in devs:
        got = cells(d.db, table, cols)
        if got != want:
            diff = [(k, cols[i], got.get(k, [None] * len(cols))[i] if k in got else None,
                     want[k][i] if k in want else None)
                    for k in sorted(set(got) | set(want))
                    for i in range(len(cols))
                    if (got.get(k) or [None] * len(cols))[i] != (want.get(k) or [None] * len(cols))[i]]
            raise AssertionError(f"{d.name} differs from Postgres (key, column, device, postgres):\n    "
                                 + "\n    ".join(map(str, diff[:20])))
    pst = stamps(pg_payload(env), table)
    for d in devs:
        dst = stamps(d.one("SELECT sync_payload(0)"), table)
        if dst != pst:
            diff = [(k, dst.get(k), pst.get(k)) for k in sorted(set(dst) | set(pst)) if dst.get(k) != pst.get(k)]
            raise AssertionError(f"{d.name}'s stamps differ from Postgres' (cell, device, postgres):\n    "
                                 + "\n    ".join(map(str, diff[:20])))
    return want, pst


def versions(env, devs):
    return (env.sql("SELECT sync_db_version()", fetch=True)[0][0],
            tuple(d.one("SELECT max(ver) FROM v__sync_clock") for d in devs))


def quiet_rounds(env, devs, rounds=3):
    """Further sync rounds: nothing is sent or received, no version moves."""
    before = versions(env, devs)
    for _ in range(rounds):
        for d in devs:
            r = d.sync()
            check(r["send"].get("sent_bytes", 0) == 0 and r["receive"]["payloads"] == 0,
                  f"{d.name}: a further sync moved something (ping-pong?): {r}")
    check(versions(env, devs) == before, f"versions moved: {before} -> {versions(env, devs)}")


def settle(devs, rounds=6):
    for _ in range(rounds):
        moved = False
        for d in devs:
            r = d.sync()
            moved |= r["send"].get("sent_bytes", 0) > 0 or r["receive"]["payloads"] > 0
        if not moved:
            return
    raise AssertionError("replicas never got quiet")


@test
def every_type_one_form(env):
    """Device A writes a non-canonical form of every type of docs/TYPES.md
    (row 'raw') and the canonical forms (row 'canon'); through a real server
    into Postgres, then device B receives. A, Postgres and B hold the same
    bytes and stamps; the cells Postgres stored differently are re-stamped
    (received hlc + 1, the canonical site), the others keep A's stamps; a
    further round changes nothing."""
    env.sql(PG_BASE + pg_schema(CASES))
    s = env.server()
    a = dev(env, "a", s, dev_schema(CASES))
    b = dev(env, "b", s, dev_schema(CASES))
    marks = ", ".join("?" for _ in CASES)
    a.q(f"INSERT INTO v VALUES('raw', {marks})", *[c[3] for c in CASES])
    a.q(f"INSERT INTO v VALUES('canon', {marks})", *[c[4] for c in CASES])
    sent = stamps(a.one("SELECT sync_payload(0)"), "v")
    a.sync()   # push, then receive the re-stamps
    b.sync()
    want, pst = all_equal(env, [a, b], "v", COLS)
    site_a = a.site()
    restamped = []
    for i, (name, _t, _d, raw, canon) in enumerate(CASES):
        check(want["canon"][i] == as_cell(canon), f"{name}: canonical row holds {want['canon'][i]}, "
                                                  f"expected {as_cell(canon)}")
        check(want["raw"][i] == as_cell(canon), f"{name}: {raw!r} ends as {want['raw'][i]} on every replica, "
                                                f"expected {as_cell(canon)}")
        col = f"c_{name}"
        for key in ("raw", "canon"):
            if (key, col) not in pst:
                check(raw is None, f"{name}: no stamp for {key}")
                continue
            _v, hlc, site = pst[(key, col)]
            _v0, hlc0, site0 = sent[(key, col)]
            if key == "raw" and as_cell(raw) != as_cell(canon):
                check(site == CANON_SITE and hlc == hlc0 + 1,
                      f"{name}: stored differently but stamped ({hlc}, {site}), sent ({hlc0}, {site0})")
                restamped.append(name)
            else:
                check(site == site_a == site0 and hlc == hlc0,
                      f"{name} ({key}): stored as received but re-stamped ({hlc}, {site})")
    check(len(restamped) >= 30, restamped)
    quiet_rounds(env, [a, b])
    # the writer's clock passed the re-stamps: its next edit wins everywhere
    a.q("UPDATE v SET c_jsonb_keys = '{\"b\":2, \"a\":1}', c_text = 'later' WHERE id = 'raw'")
    a.sync()
    b.sync()
    want, _ = all_equal(env, [a, b], "v", COLS)
    check(want["raw"][COLS.index("jsonb_keys")] == as_cell('{"a": 1, "b": 2}'), want["raw"])
    check(want["raw"][COLS.index("text")] == as_cell("later"), want["raw"])
    quiet_rounds(env, [a, b])


@test
def affinity_converts_quietly(env):
    """The SQLite receiver stores payload values as sent; only the column's
    declared affinity may convert one (TEXT '1.50' in a NUMERIC column becomes
    REAL 1.5). Such a device keeps its converted value, never sends it back,
    and devices with the same declaration agree; an untyped column holds
    Postgres' form exactly."""
    env.sql(PG_BASE + """
CREATE TABLE p(id text PRIMARY KEY, price numeric(10,2), qty integer, x double precision, at timestamptz);
SELECT sync_init('p');
GRANT SELECT, INSERT, UPDATE, DELETE ON p TO app_user;""")
    s = env.server()
    typed = "CREATE TABLE p(id TEXT PRIMARY KEY, price NUMERIC, qty REAL, x INTEGER, at DATETIME);"
    untyped = "CREATE TABLE p(id TEXT PRIMARY KEY, price, qty, x, at);"
    a = dev(env, "a", s, typed, ["p"])
    b = dev(env, "b", s, typed, ["p"])
    c = dev(env, "c", s, untyped, ["p"])
    a.q("INSERT INTO p VALUES('k', '1.5', 2, 3.0, '2024-05-06 12:00:00+02:00')")
    for d in (a, b, c, a, b, c):
        d.sync()

    def row(d):
        return d.q("SELECT typeof(price), price, typeof(qty), qty, typeof(x), x, typeof(at), at FROM p")

    # NUMERIC affinity: '1.50' -> REAL 1.5; REAL affinity: INTEGER 2 -> REAL 2.0;
    # INTEGER affinity: REAL 3.0 -> INTEGER 3; DATETIME (NUMERIC) keeps non-numeric text
    conv = [("real", 1.5, "real", 2.0, "integer", 3, "text", "2024-05-06 10:00:00.000000Z")]
    check(row(a) == conv and row(b) == conv, (row(a), row(b)))
    check(row(c) == [("text", "1.50", "integer", 2, "real", 3.0, "text", "2024-05-06 10:00:00.000000Z")],
          row(c))
    before = env.sql("SELECT sync_db_version()", fetch=True)[0][0]
    for _ in range(3):
        for d in (a, b, c):
            r = d.sync()
            check(r["send"].get("sent_bytes", 0) == 0 and r["receive"]["payloads"] == 0, (d.name, r))
    check(env.sql("SELECT sync_db_version()", fetch=True)[0][0] == before)
    check(env.sql("SELECT price::text, qty, x, at FROM p", fetch=True)[0][:3] == ("1.50", 2, 3.0))


@test
def nan_held_not_nulled(env):
    """SQLite cannot store a NaN REAL (it would hold NULL under Postgres'
    stamp): a row whose change carries NaN is held on the device with its
    reason, the rest applies, and it lands when Postgres' value changes."""
    env.sql(PG_BASE + """
CREATE TABLE f(id text PRIMARY KEY, x double precision, n integer);
SELECT sync_init('f');
GRANT SELECT, INSERT, UPDATE, DELETE ON f TO app_user;
INSERT INTO f VALUES ('ok', 1.5, 1), ('nan', 'NaN', 2), ('inf', '-Infinity', 3);""")
    s = env.server()
    a = dev(env, "a", s, "CREATE TABLE f(id TEXT PRIMARY KEY, x REAL, n INTEGER);", ["f"])
    a.sync()
    check(a.q("SELECT id, x, n FROM f ORDER BY id") == [("inf", float("-inf"), 3), ("ok", 1.5, 1)],
          a.q("SELECT id, x, n, typeof(x) FROM f ORDER BY id"))
    held = a.q("SELECT tbl, pk, code, message FROM sync_network_held")
    check(len(held) == 1 and held[0][:3] == ("f", '{"id":"nan"}', "22000") and "NaN" in held[0][3], held)
    env.sql("UPDATE f SET x = 2.5 WHERE id = 'nan'")
    a.sync()
    check(a.q("SELECT id, x, n FROM f ORDER BY id") ==
          [("inf", float("-inf"), 3), ("nan", 2.5, 2), ("ok", 1.5, 1)], a.q("SELECT * FROM f"))
    check(a.q("SELECT count(*) FROM sync_network_held") == [(0,)], a.q("SELECT * FROM sync_network_held"))


@test
def canonical_under_rls(env):
    """The re-stamp changes a clock, not a row: who sees the row does not
    change. Bob never learns of Alice's row; Alice gets the canonical form."""
    env.sql(PG_BASE + """
CREATE TABLE notes(id text PRIMARY KEY, owner text NOT NULL, doc jsonb, at timestamptz);
SELECT sync_init('notes');
ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
CREATE POLICY own ON notes USING (owner = current_setting('request.jwt.claims', true)::json->>'sub')
  WITH CHECK (owner = current_setting('request.jwt.claims', true)::json->>'sub');
GRANT SELECT, INSERT, UPDATE, DELETE ON notes TO app_user;""")
    s = env.server()
    schema = "CREATE TABLE notes(id TEXT PRIMARY KEY, owner TEXT NOT NULL, doc TEXT, at TEXT);"
    a = dev(env, "a", s, schema, ["notes"], sub="alice")
    a2 = dev(env, "a2", s, schema, ["notes"], sub="alice")
    b = dev(env, "b", s, schema, ["notes"], sub="bob")
    b.q("INSERT INTO notes VALUES('bob1', 'bob', '{\"z\":1,\"y\":2}', '2024-01-01 00:00:00-05')")
    b.sync()
    a.q("INSERT INTO notes VALUES('n1', 'alice', '{\"color\":\"white\"}', '2024-05-06 12:00:00+02:00')")
    for d in (a, b, a2, a, b, a2):
        d.sync()
    want_a = [("n1", "alice", '{"color": "white"}', "2024-05-06 10:00:00.000000Z")]
    check(a.rows("notes") == want_a and a2.rows("notes") == want_a, (a.rows("notes"), a2.rows("notes")))
    check(b.rows("notes") == [("bob1", "bob", '{"y": 2, "z": 1}', "2024-01-01 05:00:00.000000Z")],
          b.rows("notes"))
    pv = env.sql("SELECT sync_db_version()", fetch=True)[0][0]
    for _ in range(2):
        for d in (a, b, a2):
            r = d.sync()
            check(r["send"].get("sent_bytes", 0) == 0 and r["receive"]["payloads"] == 0, (d.name, r))
    check(env.sql("SELECT sync_db_version()", fetch=True)[0][0] == pv)


@test
def held_column_canonical_when_added(env):
    """A column Postgres does not have yet is held with its clock; when it is
    added (ADD COLUMN + sync_init) the held value applies and is re-stamped
    in Postgres' form like any other."""
    env.sql(PG_BASE + "CREATE TABLE h(id text PRIMARY KEY, name text); SELECT sync_init('h');"
            "GRANT SELECT, INSERT, UPDATE, DELETE ON h TO app_user;")
    s = env.server()
    schema = "CREATE TABLE h(id TEXT PRIMARY KEY, name TEXT, doc TEXT);"
    a = dev(env, "a", s, schema, ["h"])
    b = dev(env, "b", s, schema, ["h"])
    a.q("INSERT INTO h VALUES('k', 'n', '{\"b\":1,\"a\":2}')")
    a.sync()
    check(env.sql("SELECT count(*) FROM pgsync.held", fetch=True)[0][0] == 1)
    env.sql("ALTER TABLE h ADD COLUMN doc jsonb; SELECT sync_init('h');")
    got = env.sql("SELECT doc::text FROM h", fetch=True)
    check(got == [('{"a": 2, "b": 1}',)], (got, env.sql("SELECT tbl, code, message FROM pgsync.held", fetch=True)))
    for d in (a, b, a, b):
        d.sync()
    want = [("k", "n", '{"a": 2, "b": 1}')]
    check(a.rows("h") == want and b.rows("h") == want, (a.rows("h"), b.rows("h")))
    sa = stamps(a.one("SELECT sync_payload(0)"), "h")
    check(sa[("k", "doc")][2] == CANON_SITE and sa == stamps(b.one("SELECT sync_payload(0)"), "h"), sa)
    check(stamps(pg_payload(env), "h") == sa)
    quiet_h = env.sql("SELECT sync_db_version()", fetch=True)[0][0]
    for d in (a, b):
        r = d.sync()
        check(r["send"].get("sent_bytes", 0) == 0 and r["receive"]["payloads"] == 0, (d.name, r))
    check(env.sql("SELECT sync_db_version()", fetch=True)[0][0] == quiet_h)


@test
def key_forms_refused(env):
    """A key cannot be re-stamped (it names the row): one that Postgres would
    store in another form is refused alone (PS007, with the form to use),
    the rest applies; discarding it leaves every replica identical. The nil
    site of canonical forms cannot be registered as a device."""
    env.sql(PG_BASE + """
CREATE TABLE k(id uuid PRIMARY KEY, name text);
CREATE TABLE d(day date PRIMARY KEY, name text);
CREATE TABLE t(at timestamp PRIMARY KEY, name text);
SELECT sync_init('k'), sync_init('d'), sync_init('t');
GRANT SELECT, INSERT, UPDATE, DELETE ON k, d, t TO app_user;""")
    s = env.server()
    schema = ("CREATE TABLE k(id TEXT PRIMARY KEY, name TEXT); CREATE TABLE d(day TEXT PRIMARY KEY, name TEXT);"
              "CREATE TABLE t(at TEXT PRIMARY KEY, name TEXT);")
    a = dev(env, "a", s, schema, ["k", "d", "t"])
    b = dev(env, "b", s, schema, ["k", "d", "t"])
    a.q("INSERT INTO k VALUES(?, 'upper')", UUID.upper())
    a.q("INSERT INTO k VALUES(?, 'canonical')", UUID.replace("a0", "b0"))
    a.q("INSERT INTO d VALUES('2024-5-6', 'short'), ('2024-05-07', 'canonical')")
    a.q("INSERT INTO t VALUES('2024-05-06 12:00:00', 'short'), ('2024-05-06 12:00:00.000000', 'canonical')")
    r = a.sync()
    check(r["send"]["rejected"] == 3, r)
    rej = a.q("SELECT tbl, code, message FROM sync_network_rejected ORDER BY tbl")
    check([(t, c) for t, c, _m in rej] == [("d", "PS007"), ("k", "PS007"), ("t", "PS007")], rej)
    check(all("not in the form Postgres stores" in m for _t, _c, m in rej), rej)
    check(env.sql("SELECT id::text, name FROM k", fetch=True) == [(UUID.replace("a0", "b0"), "canonical")])
    check(env.sql("SELECT day::text, name FROM d", fetch=True) == [("2024-05-07", "canonical")])
    check(env.sql("SELECT at::text, name FROM t", fetch=True) == [("2024-05-06 12:00:00", "canonical")])
    a.one("SELECT sync_network_discard()")
    settle([a, b])
    keys = {"k": "id::text", "d": "day::text", "t": "to_char(at, 'YYYY-MM-DD HH24:MI:SS.US')"}
    for t in ("k", "d", "t"):
        check(a.rows(t) == b.rows(t) == [tuple(r) for r in env.sql(f"SELECT {keys[t]}, name FROM {t} ORDER BY 1",
                                                                     fetch=True)],
              (t, a.rows(t), b.rows(t)))
    try:
        env.sql("SELECT sync_device(%s, 'mallory')", (CANON_SITE,))
        raise AssertionError("the canonical site was registered as a device")
    except Exception as e:  # noqa: BLE001
        check("stamps canonical forms" in str(e), str(e))


# ---- randomized: canonicalizing writes among concurrent edits ---------------------

RCASES = [
    ("j", "jsonb", "TEXT"), ("ts", "timestamptz", "TEXT"), ("n", "numeric(8,2)", "TEXT"),
    ("u", "uuid", "TEXT"), ("b", "boolean", ""), ("t", "text", "TEXT"), ("iv", "interval", "TEXT"),
]
RCOLS = [c[0] for c in RCASES]


def rand_value(rng, col):
    k = rng.randint(0, 9)
    if col == "j":
        return rng.choice(['{"a":%d,"b":[1,2]}' % k, '{"b": [1, 2], "a": %d}' % k, '{"a": %d, "b": [1, 2]}' % k,
                           "[%d,  %d]" % (k, k + 1), None])
    if col == "ts":
        return rng.choice(["2024-05-06 1%d:00:00+02:00" % k, "2024-05-06 0%d:00:00.000000Z" % k,
                           "2024-05-06T0%d:00:00Z" % k, "2024-05-0%d" % (k % 9 + 1)])
    if col == "n":
        return rng.choice(["%d.5" % k, "%d.50" % k, "%d" % k, k, k + 0.25, "%de1" % k])
    if col == "u":
        u = "%08x-9c0b-4ef8-bb6d-6bb9bd380a1%d" % (k, k)
        return rng.choice([u, u.upper(), "{" + u.replace("-", "") + "}"])
    if col == "b":
        return rng.choice(["yes", "no", "t", "false", 1, 0, "on"])
    if col == "iv":
        return rng.choice(["%d minutes" % (k * 30), "P%dD" % k, "%d days 01:00:00" % k])
    return rng.choice(["v%d" % k, "V%d " % k])


def types_schedule(env, rng, n_ops, log):
    env.sql(PG_BASE + pg_schema([(n, t) for n, t, _ in RCASES]))
    servers = [env.server("s1"), env.server("s2", pull_max_rows=rng.choice([1, 2, 3]))]
    schema = dev_schema([(n, None, d) for n, _t, d in RCASES])
    devs = [dev(env, f"c{i}", servers[i % 2], schema) for i in range(2)]

    def key():
        return f"k{rng.randint(0, 4)}"

    for _ in range(n_ops):
        r = rng.random()
        d = rng.choice(devs)
        if r < 0.3:
            k = key()
            vals = [rand_value(rng, c) for c in RCOLS]
            d.q(f"INSERT OR REPLACE INTO v VALUES(?, {', '.join('?' for _ in RCOLS)})", k, *vals)
            log.append(f"{d.name}: insert {k} {vals}")
        elif r < 0.65:
            k, cs = key(), rng.sample(RCOLS, rng.randint(1, 3))
            vals = [rand_value(rng, c) for c in cs]
            d.q(f"UPDATE v SET {', '.join(f'c_{c} = ?' for c in cs)} WHERE id = ?", *vals, k)
            log.append(f"{d.name}: update {k} {dict(zip(cs, vals))}")
        elif r < 0.7:
            k = key()
            d.q("DELETE FROM v WHERE id = ?", k)
            log.append(f"{d.name}: delete {k}")
        elif r < 0.75:
            k, v = key(), rand_value(rng, "j")
            env.sql("UPDATE v SET c_j = %s WHERE id = %s", (v, k))
            log.append(f"sql: j {k} {v}")
        else:
            how = rng.choice(["sync", "send", "receive"])
            getattr(d, how)()
            log.append(f"{d.name}: {how}")
    settle(devs)
    all_equal(env, devs, "v", RCOLS)
    quiet_rounds(env, devs, rounds=2)


@test
def canonical_forms_converge(env):
    """Random schedules (seeded, bounded): two devices on two servers (one
    pulling in chunks of 1-3 rows) write canonical and non-canonical forms of
    jsonb, timestamptz, numeric, uuid, boolean and interval, edit the same
    cells concurrently, delete and re-insert rows; Postgres edits too. After
    syncing, both devices and Postgres hold the same bytes and stamps, and
    further rounds change nothing.
    PGS_TYPES_SCHEDULES=N (default 3), PGS_SEED=S, PGS_OPS=N (default 40)."""
    n = int(os.environ.get("PGS_TYPES_SCHEDULES", "3"))
    seed = int(os.environ.get("PGS_SEED", "20260906"))
    n_ops = int(os.environ.get("PGS_OPS", "40"))
    only = os.environ.get("PGS_SCHEDULE")
    t0 = time.time()
    for i in range(n):
        if only is not None and i != int(only):
            continue
        e = env if i == 0 or only is not None else suite.Env(schema=None, pg=env.pg)
        log = []
        try:
            types_schedule(e, random.Random(seed * 7919 + i), n_ops, log)
        except Exception as ex:  # noqa: BLE001
            print(f"  types: schedule {i} failed (rerun: PGS_SEED={seed} PGS_TYPES_SCHEDULES={i + 1} "
                  f"PGS_SCHEDULE={i}); its operations:\n    " + "\n    ".join(log))
            raise AssertionError(f"schedule {i}: {ex}")
        finally:
            if e is not env:
                e.close()
                env.pg.sql(f"DROP DATABASE IF EXISTS {e.db} WITH (FORCE)")
    print(f"  types: {n} schedules, seed {seed}, {n_ops} operations each, {time.time() - t0:.1f}s")


if __name__ == "__main__":
    sys.exit(suite.main(sys.argv[1:], test, setup))
