"""demo_full.py — pgsync end to end, narrated (run it through scripts/demo_full.sh).

A throwaway PostgreSQL with the pgsync extension, two pgsync-server processes
in front of it, and two SQLite replicas — alice's phone and laptop — that edit
offline, sync, conflict, get notified in real time and converge. Loopback
only; everything stops at the end.
"""
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "test", "server"))
from harness import Env, EXT, token  # noqa: E402

SCHEMA = """
CREATE EXTENSION pgsync;
GRANT EXECUTE ON FUNCTION sync_device(uuid, text) TO authenticator;
CREATE TABLE todos(id text PRIMARY KEY, owner text NOT NULL,
                   title text CHECK (length(title) <= 30), done integer DEFAULT 0);
SELECT sync_init('todos');
ALTER TABLE todos ENABLE ROW LEVEL SECURITY;
CREATE POLICY mine ON todos
  USING (owner = current_setting('request.jwt.claims', true)::json->>'sub')
  WITH CHECK (owner = current_setting('request.jwt.claims', true)::json->>'sub');
GRANT SELECT, INSERT, UPDATE, DELETE ON todos TO app_user;
"""


def say(msg):
    print(f"\n\033[1m== {msg}\033[0m")


class Device:
    def __init__(self, env, name, server, sub="alice"):
        import sqlite3
        self.name = name
        self.db = sqlite3.connect(os.path.join(env.base, f"{name}.db"), isolation_level=None,
                                  check_same_thread=False)
        self.db.enable_load_extension(True)
        self.db.load_extension(EXT)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.sql("CREATE TABLE todos(id TEXT PRIMARY KEY, owner TEXT NOT NULL, title TEXT, done INTEGER DEFAULT 0)")
        self.sql("SELECT sync_init('todos')")
        self.sql("SELECT sync_network_init(?, ?)", server.url, token(sub))
        env.clients.append(self)

    def sql(self, q, *args, show=True):
        shown = q if not args else q + "   -- " + ", ".join(repr(a)[:40] for a in args)
        rows = self.db.execute(q, args).fetchall()
        if show:
            print(f"{self.name:>7}> {shown}")
            for r in rows:
                if len(r) == 1 and isinstance(r[0], str) and r[0].startswith("{"):
                    print(" " * 9 + json.dumps(json.loads(r[0])))
                elif r != (None,) and r != (1,):
                    print(" " * 9 + " | ".join(str(x) for x in r))
        return rows

    def close(self):
        self.db.close()


def table(rows):
    return [tuple(r) for r in sorted(rows)]


def main():
    say("throwaway PostgreSQL 15 + pgsync extension, table todos with row-level security by owner")
    env = Env(schema=SCHEMA)
    try:
        print(f"  postgres on 127.0.0.1:{env.pg.port}, database {env.db}")
        say("two pgsync-server processes sharing that database")
        s1 = env.server("s1")
        s2 = env.server("s2")
        print(f"  server 1: {s1.url}   server 2: {s2.url}   (stateless; LISTEN/NOTIFY between them)")

        say("alice's phone syncs with server 1, her laptop with server 2")
        phone = Device(env, "phone", s1)
        laptop = Device(env, "laptop", s2)

        say("offline: both devices edit")
        phone.sql("INSERT INTO todos VALUES('t1', 'alice', 'buy milk', 0)")
        phone.sql("INSERT INTO todos VALUES('t2', 'alice', 'call mum', 0)")
        laptop.sql("INSERT INTO todos VALUES('t3', 'alice', 'write report', 0)")
        phone.sql("SELECT sync_network_sync()")
        laptop.sql("SELECT sync_network_sync()")
        phone.sql("SELECT sync_network_sync()")
        phone.sql("SELECT id, title FROM todos ORDER BY id")
        say("offline again: the same todo edited on both, one deleted, one forged for bob, "
            "one with a title longer than the server allows")
        phone.sql("UPDATE todos SET title = 'buy oat milk' WHERE id = 't1'")
        time.sleep(0.01)
        laptop.sql("UPDATE todos SET title = 'buy milk and bread' WHERE id = 't1'")   # later: wins
        laptop.sql("UPDATE todos SET done = 1 WHERE id = 't2'")
        phone.sql("DELETE FROM todos WHERE id = 't3'")
        phone.sql("INSERT INTO todos VALUES('t4', 'bob', 'not yours', 0)")          # RLS refuses it
        phone.sql("INSERT INTO todos VALUES('t6', 'alice', 'renew passport, book photos first', 0)")  # CHECK
        phone.sql("SELECT sync_network_status()")

        say("back online: sync both (the forged row and the too-long title are rejected, "
            "each alone; everything else lands)")
        phone.sql("SELECT sync_network_sync()")
        laptop.sql("SELECT sync_network_sync()")
        phone.sql("SELECT sync_network_sync()")
        phone.sql("SELECT tbl, pk, code, message FROM sync_network_rejected ORDER BY pk")

        say("the app decides each rejected row's fate: fix t6 (it goes again with the next sync), "
            "give up t4 (the server's version, here none, comes back)")
        phone.sql("UPDATE todos SET title = 'renew passport' WHERE id = 't6'")
        phone.sql("""SELECT sync_network_discard('todos', '{"id":"t4"}')""")
        phone.sql("SELECT sync_network_sync()")
        laptop.sql("SELECT sync_network_sync()")
        phone.sql("SELECT count(*) AS still_rejected FROM sync_network_rejected")
        phone.sql("SELECT id, owner, title FROM todos ORDER BY id")

        say("real time: the laptop waits (long-poll on server 2), the phone writes through server 1")
        result = {}

        def wait():
            t = time.perf_counter()
            result["woke"] = laptop.db.execute("SELECT sync_network_wait(10000)").fetchone()[0]
            result["t"] = time.perf_counter()
            result["waited"] = time.perf_counter() - t
        th = threading.Thread(target=wait)
        th.start()
        print(" laptop> SELECT sync_network_wait(10000)   -- blocks ...")
        time.sleep(0.5)
        t0 = time.perf_counter()
        phone.sql("INSERT INTO todos VALUES('t5', 'alice', 'plan holiday', 0)")
        phone.sql("SELECT sync_network_send()")
        th.join()
        print(f"  laptop woke up with {result['woke']} {(result['t'] - t0) * 1000:.1f} ms after the phone's write "
              f"and already has the row:")
        laptop.sql("SELECT * FROM todos WHERE id = 't5'")

        say("another app writes directly in PostgreSQL; the devices pick it up")
        env.sql("UPDATE todos SET done = 1 WHERE id = 't5'")
        print("   psql> UPDATE todos SET done = 1 WHERE id = 't5'")
        phone.sql("SELECT sync_network_sync()")
        laptop.sql("SELECT sync_network_sync()")

        say("converged: phone, laptop and PostgreSQL hold the same rows")
        want = table(env.sql("SELECT id, owner, title, done FROM todos", fetch=True))
        ph = table(phone.sql("SELECT id, owner, title, done FROM todos", show=False))
        la = table(laptop.sql("SELECT id, owner, title, done FROM todos", show=False))
        for r in want:
            print("  " + " | ".join(str(x) for x in r))
        la_ok = la == want
        ph_ok = ph == want
        print(f"  laptop == postgres: {la_ok}   phone == postgres: {ph_ok}")
        laptop.sql("SELECT sync_network_status()")
        if not (la_ok and ph_ok):
            print("DEMO FAILED: replicas differ")
            return 1
        say("done; stopping everything")
        return 0
    finally:
        env.close()


if __name__ == "__main__":
    sys.exit(main())
