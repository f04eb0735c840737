"""suite.py — the runner and helpers shared by test_rls.py and test_fate.py
(test_server.py keeps its own): one throwaway PostgreSQL per file, a fresh
database per test (harness.Env), "PASS name (1.2s)" / "FAIL name" lines,
exit status 1 when a test failed.

Devices here are SQLite files with a schema of the test's choosing (the
harness' Client always creates items and notes); roles, claims and raw HTTP
go through the same harness helpers as test_server.py.
"""
import json
import os
import shutil
import signal
import sqlite3
import sys
import threading
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import EXT, Env, Postgres, http, jwt_hs256, tmpdir, token  # noqa: E402,F401

PG = None


class Registry:
    def __init__(self):
        self.tests = []

    def __call__(self, fn):
        self.tests.append(fn)
        return fn


def check(cond, msg="check failed"):
    if not cond:
        raise AssertionError(msg)


def eventually(fn, timeout=5.0, every=0.05, msg="condition never held"):
    """Calls fn until it returns a true value (returned) or timeout passes."""
    deadline = time.time() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.time() > deadline:
            raise AssertionError(msg)
        time.sleep(every)


def run_bg(fn):
    out = {}

    def go():
        try:
            out["result"] = fn()
        except Exception as e:  # noqa: BLE001
            out["error"] = e
        out["t"] = time.time()
    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, out


def auth(tok):
    return {"Authorization": "Bearer " + tok}


class Device:
    """A SQLite replica with the sqlitesync extension, the given schema (SQL)
    and synced tables, bound to one server with one token."""

    def __init__(self, env, name, tok, server, schema, tables, foreign_keys=False):
        self.env = env
        self.name = name
        self.path = os.path.join(env.base, f"{name}.db")
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self.db.enable_load_extension(True)
        self.db.load_extension(EXT)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        if foreign_keys:
            self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(schema)
        for t in tables:
            self.db.execute("SELECT sync_init(?)", (t,))
        self.server = server
        if server is not None:
            self.db.execute("SELECT sync_network_init(?, ?)", (server.url, tok))
            self.db.execute("UPDATE sync_network SET value = 50 WHERE key = 'backoff_ms'")
        env.clients.append(self)

    def q(self, sql, *args):
        return self.db.execute(sql, args).fetchall()

    def one(self, sql, *args):
        return self.db.execute(sql, args).fetchone()[0]

    def sync(self):
        return json.loads(self.one("SELECT sync_network_sync()"))

    def send(self):
        return json.loads(self.one("SELECT sync_network_send()"))

    def receive(self):
        return json.loads(self.one("SELECT sync_network_receive()"))

    def status(self):
        return json.loads(self.one("SELECT sync_network_status()"))

    def set_token(self, tok):
        self.one("SELECT sync_network_set_token(?)", tok)

    def site(self):
        return self.one("SELECT sync_site_id()")

    def rows(self, table, order="1"):
        return self.q(f"SELECT * FROM {table} ORDER BY {order}")

    def rejected(self, origin=None):
        """{(tbl, pk json, origin): code} of sync_network_rejected."""
        rows = self.q("SELECT tbl, pk, origin, code FROM sync_network_rejected")
        return {(t, p, o): c for t, p, o, c in rows if origin is None or o == origin}

    def held(self):
        return self.q("SELECT tbl, code FROM sync_held ORDER BY tbl, k")

    def has_clock(self, table, key):
        return self.one(f"SELECT count(*) FROM {table}__sync_clock WHERE id = ?", key) > 0

    def sync_quiet(self, rounds=6):
        """Syncs until a round sends and receives nothing."""
        for _ in range(rounds):
            r = self.sync()
            if r["send"].get("sent_bytes", 0) == 0 and r["receive"]["payloads"] == 0:
                return r
        raise AssertionError(f"{self.name} never got quiet: {r}")

    def close(self):
        self.db.close()


def info(payload):
    """sync_payload_info of payload bytes, decoded on a scratch SQLite connection."""
    db = sqlite3.connect(":memory:")
    db.enable_load_extension(True)
    db.load_extension(EXT)
    try:
        return json.loads(db.execute("SELECT sync_payload_info(?)", (payload,)).fetchone()[0])
    finally:
        db.close()


def as_role(env, role, claims, sql, args=None):
    """The rows sql returns to role with request.jwt.claims = claims (a dict),
    in one transaction, like the server's requests."""
    import psycopg2
    c = psycopg2.connect(env.pg.dsn(db=env.db))
    try:
        with c.cursor() as cur:
            cur.execute("SET LOCAL ROLE %s" % role)
            cur.execute("SELECT set_config('request.jwt.claims', %s, true)", (json.dumps(claims),))
            cur.execute(sql, args)
            rows = cur.fetchall()
        c.rollback()
        return [tuple(r) for r in rows]
    finally:
        c.close()


def main(argv, registry, setup=None):
    """Runs the tests of registry named in argv (all when argv is empty)."""
    global PG
    names = set(argv)
    known = {fn.__name__ for fn in registry.tests}
    unknown = names - known
    if unknown:
        print("unknown tests:", " ".join(sorted(unknown)), "\navailable:", " ".join(sorted(known)))
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    root = tmpdir("pgsync-pg-")
    PG = Postgres(root)
    failed = 0
    try:
        PG.init()
        if setup:
            setup(PG)
        for fn in registry.tests:
            if names and fn.__name__ not in names:
                continue
            env = Env(schema=None, pg=PG)
            t0 = time.time()
            error = None
            try:
                fn(env)
            except Exception:  # noqa: BLE001
                error = traceback.format_exc()
            env.close(keep=True)
            logs = {f: open(os.path.join(env.base, f), errors="replace").read()
                    for f in os.listdir(env.base) if f.endswith(".log") and f != "pg.log"}
            for f, text in logs.items():
                for bad in ("AddressSanitizer", "LeakSanitizer", "runtime error:", "Segmentation"):
                    if bad in text and not error:
                        error = f"{f}: sanitizer report ({bad}):\n" + text[max(0, text.index(bad) - 200):][:3000]
            if error:
                failed += 1
                print(f"FAIL {fn.__name__} ({time.time() - t0:.1f}s)", flush=True)
                print(error)
                for f, text in logs.items():
                    print(f"--- {f} (tail)\n{text[-1500:]}")
            else:
                print(f"PASS {fn.__name__} ({time.time() - t0:.1f}s)", flush=True)
            shutil.rmtree(env.base, ignore_errors=True)
            try:
                PG.sql(f"DROP DATABASE IF EXISTS {env.db} WITH (FORCE)")
            except Exception:  # noqa: BLE001
                pass
    finally:
        PG.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0
