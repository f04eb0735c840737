"""test_background.py — end-to-end tests of background sync (issue 10,
docs/CLIENT.md): sync_network_start/stop, change events, progress, typed
status, from the sqlite3 shell, Python's sqlite3 and Node (better-sqlite3).
Real processes only: a throwaway PostgreSQL, pgsync-server on loopback,
SQLite replicas in this process and in child processes.

Run through test/server/run.sh (names starting with bg_ come here), or
directly: /usr/bin/python3 test/server/test_background.py [names...]
Prints "PASS name" / "FAIL name"; exit status 1 if any failed.
"""
import fcntl
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import EXT, ROOT, CLIENT_SCHEMA, Env, Postgres, child_env, tmpdir, token  # noqa: E402

TESTS = []
NODE_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                        "pgsync", "node")
BETTER_SQLITE3 = "better-sqlite3@12.11.1"


def test(fn):
    TESTS.append(fn)
    return fn


def check(cond, msg="check failed"):
    if not cond:
        raise AssertionError(msg)


def until(fn, timeout=20, step=0.01, what="condition"):
    """Polls fn() until it is truthy; returns its value or fails after timeout."""
    deadline = time.time() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


def open_db(path, sub="alice", url=None, tok=None):
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    db.enable_load_extension(True)
    db.load_extension(EXT)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(CLIENT_SCHEMA)
    db.execute("SELECT sync_init('items')")
    db.execute("SELECT sync_init('notes')")
    if url:
        db.execute("SELECT sync_network_init(?, ?)", (url, tok or token(sub)))
    return db


def status(db):
    return json.loads(db.execute("SELECT sync_network_status()").fetchone()[0])


def one(db, sql, *args):
    return db.execute(sql, args).fetchone()[0]


def lock_held(dbpath):
    """True when some process holds the syncer's lock of dbpath."""
    lp = dbpath + "-sync.lock"
    if not os.path.exists(lp):
        return False
    fd = os.open(lp, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def threads(pid):
    return len(os.listdir(f"/proc/{pid}/task"))


def pg_count(env, table="items"):
    return env.sql(f"SELECT count(*) FROM {table}", fetch=True)[0][0]


def events(db, since=0):
    return db.execute("SELECT seq, tbl, pk, kind FROM sync_network_changes WHERE seq > ? ORDER BY seq",
                      (since,)).fetchall()


FAST = '{"retry_min_ms": 50, "retry_max_ms": 1000}'


# ---- Python's sqlite3 -----------------------------------------------------------

@test
def bg_two_devices_python(env):
    """Two devices with background sync see each other's rows without any
    sync call; the change events list exactly the keys the other changed,
    with their kind, and the counters count them."""
    s = env.server()
    a = open_db(os.path.join(env.base, "a.db"), url=s.url)
    b = open_db(os.path.join(env.base, "b.db"), url=s.url)
    for db in (a, b):
        r = json.loads(one(db, "SELECT sync_network_start(?)", FAST))
        check(r["started"] and r["state"] == "running", r)
    check(not json.loads(one(a, "SELECT sync_network_start()"))["started"], "a second start on the same file")
    # A writes, B sees it (no sync function called by the app after start)
    a.execute("INSERT INTO items VALUES ('i1', 'one', 1, 1.0)")
    a.execute("BEGIN")
    a.execute("INSERT INTO items VALUES ('i2', 'two', 2, 2.0)")
    a.execute("INSERT INTO items VALUES ('i3', 'three', 3, 3.0)")
    a.execute("COMMIT")
    until(lambda: one(b, "SELECT count(*) FROM items") == 3, what="B to see A's 3 rows")
    ev = events(b)
    check(sorted((t, json.loads(pk)["id"], k) for _, t, pk, k in ev) ==
          [("items", "i1", "insert"), ("items", "i2", "insert"), ("items", "i3", "insert")], ev)
    last = ev[-1][0]
    # B updates one and deletes one; A's events are exactly those
    a_last = max([e[0] for e in events(a)] or [0])
    b.execute("UPDATE items SET qty = 20 WHERE id = 'i2'")
    b.execute("DELETE FROM items WHERE id = 'i3'")
    until(lambda: a.execute("SELECT qty FROM items WHERE id = 'i2'").fetchone() == (20,) and
          one(a, "SELECT count(*) FROM items") == 2, what="A to see B's update and delete")
    ev_a = [(t, json.loads(pk)["id"], k) for _, t, pk, k in events(a, a_last)]
    check(sorted(ev_a) == [("items", "i2", "update"), ("items", "i3", "delete")], ev_a)
    # local writes are not events; B's own writes did not land in B's events
    check(events(b, last) == [], events(b, last))
    cnt = dict(a.execute("SELECT tbl, changes FROM sync_network_counters").fetchall())
    check(cnt == {"items": 2}, cnt)
    check(pg_count(env) == 2)
    st = status(a)
    check(st["background"]["state"] == "running" and st["last_error"] is None and
          st["pending"]["rows"] == 0, st)
    for db in (a, b):
        check(json.loads(one(db, "SELECT sync_network_stop()"))["stopped"])
        db.close()


@test
def bg_move_out_event(env):
    """A row that leaves the device's view (RLS: its owner changes on the
    server) is removed locally and listed as a move-out."""
    s = env.server()
    a = open_db(os.path.join(env.base, "a.db"), url=s.url)
    one(a, "SELECT sync_network_start(?)", FAST)
    env.sql("INSERT INTO notes VALUES ('n1', 'alice', 'mine'), ('n2', 'alice', 'mine too')")
    until(lambda: one(a, "SELECT count(*) FROM notes") == 2, what="the notes")
    last = max(e[0] for e in events(a))
    env.sql("UPDATE notes SET owner = 'bob' WHERE id = 'n2'")
    env.sql("SELECT sync_visibility_changed('notes')")
    until(lambda: one(a, "SELECT count(*) FROM notes") == 1, what="n2 to move out")
    ev = [(t, json.loads(pk)["id"], k) for _, t, pk, k in events(a, last)]
    check(("notes", "n2", "move-out") in ev and all(e[1] != "n1" for e in ev), ev)
    a.close()


@test
def bg_progress_300k(env):
    """A 300,000-row first sync in the background: sync_network_status()
    on another connection shows progress (rows_done, bytes_done,
    rows_total = 300000 from the server) growing monotonically."""
    n = 300000
    env.sql("INSERT INTO items SELECT 'k' || lpad(g::text, 6, '0'), 'row ' || g, g, g / 7.0 "
            f"FROM generate_series(1, {n}) g")
    s = env.server()
    path = os.path.join(env.base, "big.db")
    app = open_db(path, url=s.url)
    watcher = open_db(path)
    t0 = time.time()
    one(app, "SELECT sync_network_start('{\"chunk_rows\": 5000}')")
    seen = []
    while time.time() - t0 < 120:
        p = status(watcher)["progress"]
        if p:
            seen.append((p["rows_done"], p["bytes_done"], p["rows_total"], p["phase"]))
        if one(watcher, "SELECT count(*) FROM items") == n and not p:
            break
        time.sleep(0.02)
    dt = time.time() - t0
    check(one(watcher, "SELECT count(*) FROM items") == n, "not all rows arrived")
    recv = [x for x in seen if x[3] == "receive"]
    check(len({x[0] for x in recv}) >= 5, f"too few progress steps: {recv[:5]}... ({len(recv)})")
    check(all(x[2] == n for x in recv), f"rows_total: {set(x[2] for x in recv)}")
    check(all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(recv, recv[1:])), "progress went back")
    check(all(0 < x[0] <= n and x[0] % 5000 == 0 for x in recv), f"rows_done: {sorted(set(recv))[-3:]}")
    check(status(watcher)["progress"] is None)
    print(f"  300k first sync in the background: {dt:.1f}s, {len(set(x[0] for x in recv))} progress steps")
    app.close()
    check(not lock_held(path), "lock still held after close")


# ---- typed errors, tokens, offline -------------------------------------------------

@test
def bg_token_expired_then_recovers(env):
    """A token that expires: status says token_expired (code, http_status,
    token_expires_at); the syncer waits, and recovers by itself after
    sync_network_set_token."""
    s = env.server(jwt_leeway=0)
    short = token("alice", ttl=2)
    a = open_db(os.path.join(env.base, "a.db"), url=s.url, tok=short)
    one(a, "SELECT sync_network_start(?)", FAST)
    a.execute("INSERT INTO items VALUES ('t1', 'before', 1, 1)")
    until(lambda: pg_count(env) == 1, what="the first push")
    st = status(a)
    check(st["token_expires_at"] and st["token_expires_at"].endswith("Z"), st)
    time.sleep(2.5)
    a.execute("INSERT INTO items VALUES ('t2', 'after', 2, 2)")
    try:
        err = until(lambda: status(a)["last_error"], what="an error")
    except AssertionError:
        print("  status:", status(a), "server rows:", pg_count(env))
        raise
    check(err["code"] == "token_expired" and err["http_status"] == 401, err)
    check(pg_count(env) == 1)
    one(a, "SELECT sync_network_set_token(?)", token("alice"))
    until(lambda: pg_count(env) == 2, timeout=10, what="the push after the new token")
    until(lambda: status(a)["last_error"] is None, what="the error to clear")
    a.close()


@test
def bg_offline_then_online(env):
    """The server is down: the syncer backs off (status: offline), the app
    keeps writing; when the server comes up the rows go out by themselves.
    sync_network_wait offline waits until its timeout and says why."""
    s = env.server()
    s.stop()
    a = open_db(os.path.join(env.base, "a.db"), url=s.url)
    t0 = time.time()
    r = one(a, "SELECT sync_network_wait(1500)")
    dt = time.time() - t0
    check(r == "offline" and 1.4 < dt < 5, (r, dt))
    check(status(a)["failures"] >= 2, status(a))
    one(a, "SELECT sync_network_start(?)", FAST)
    a.execute("INSERT INTO items VALUES ('o1', 'offline', 1, 1)")
    err = until(lambda: status(a)["last_error"], what="the offline error")
    check(err["code"] == "offline" and err["http_status"] is None, err)
    s.start()
    until(lambda: pg_count(env) == 1, timeout=10, what="the push once online")
    until(lambda: status(a)["last_error"] is None, what="the error to clear")
    a.close()


@test
def bg_wait_wakes_on_changes(env):
    """With a syncer running, sync_network_wait on the app's connection
    returns 'changes' when the syncer applied something, 'timeout' otherwise."""
    s = env.server()
    a = open_db(os.path.join(env.base, "a.db"), url=s.url)
    one(a, "SELECT sync_network_start(?)", FAST)
    until(lambda: status(a)["last_sync"], what="the first sync")
    t0 = time.time()
    check(one(a, "SELECT sync_network_wait(300)") == "timeout" and time.time() - t0 >= 0.29)
    env.sql("INSERT INTO items VALUES ('w1', 'x', 1, 1)")
    t0 = time.time()
    r = one(a, "SELECT sync_network_wait(5000)")
    check(r == "changes" and time.time() - t0 < 3, (r, time.time() - t0))
    check(one(a, "SELECT count(*) FROM items") == 1)
    a.close()


# ---- stop, exit, kill -9, one syncer per file ---------------------------------------

CHILD = r"""
import json, os, sqlite3, sys, time
path, ext, url, tok, mode = sys.argv[1:6]
db = sqlite3.connect(path, isolation_level=None, timeout=30)
db.enable_load_extension(True); db.load_extension(ext)
db.execute("PRAGMA journal_mode=WAL")
db.executescript('''CREATE TABLE IF NOT EXISTS items(id TEXT PRIMARY KEY, name TEXT, qty INTEGER, price REAL);
CREATE TABLE IF NOT EXISTS notes(id TEXT PRIMARY KEY, owner TEXT NOT NULL, body TEXT);''')
db.execute("SELECT sync_init('items')"); db.execute("SELECT sync_init('notes')")
db.execute("SELECT sync_network_init(?, ?)", (url, tok))
print(db.execute("SELECT sync_network_start('{\"chunk_rows\": 1000, \"retry_min_ms\": 50, \"retry_max_ms\": 500}')").fetchone()[0], flush=True)
if mode == "write":
    i = 0
    while True:                      # one row per transaction, each reported once committed
        i += 1
        db.execute("INSERT INTO items VALUES (?, 'local', ?, 0)", (f"w{os.getpid()}-{i:06d}", i))
        print(f"committed {i}", flush=True)
        time.sleep(0.002)
for line in sys.stdin:               # commands: stop, count, exit, status
    cmd = line.strip()
    if cmd == "stop":
        print(db.execute("SELECT sync_network_stop()").fetchone()[0], flush=True)
    elif cmd == "count":
        print(db.execute("SELECT count(*) FROM items").fetchone()[0], flush=True)
    elif cmd == "status":
        print(db.execute("SELECT sync_network_status()").fetchone()[0], flush=True)
    elif cmd == "start":
        print(db.execute("SELECT sync_network_start()").fetchone()[0], flush=True)
    elif cmd == "exit":
        sys.exit(0)                  # without stop and without close: atexit stops the syncer
"""


class Child:
    def __init__(self, env, path, url, mode="cmd", sub="alice"):
        self.p = subprocess.Popen([sys.executable if os.path.exists(sys.executable) else "/usr/bin/python3",
                                   "-c", CHILD, path, EXT, url, token(sub), mode],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  env=child_env(), bufsize=1)
        env.procs.append(self.p)
        self.started = json.loads(self.p.stdout.readline())

    def cmd(self, c):
        self.p.stdin.write(c + "\n")
        self.p.stdin.flush()
        return self.p.stdout.readline().strip()


@test
def bg_stop_and_exit_leave_nothing(env):
    """stop and a plain process exit (atexit) end the thread, release the
    lock, and leave only whole chunks applied (each with its cursor)."""
    n = 40000
    env.sql("INSERT INTO items SELECT 'k' || lpad(g::text, 6, '0'), 'row ' || g, g, g "
            f"FROM generate_series(1, {n}) g")
    s = env.server()
    path = os.path.join(env.base, "c.db")
    c = Child(env, path, s.url)
    check(c.started["state"] == "running", c.started)
    check(lock_held(path) and threads(c.p.pid) == 2, (lock_held(path), threads(c.p.pid)))
    until(lambda: int(c.cmd("count")) > 0, what="the first chunk")
    check(json.loads(c.cmd("stop"))["stopped"])
    got = int(c.cmd("count"))
    check(got % 1000 == 0 and (got < n or got == n), f"a partial chunk was applied: {got}")
    check(threads(c.p.pid) == 1 and not lock_held(path), (threads(c.p.pid), lock_held(path)))
    time.sleep(0.3)
    check(int(c.cmd("count")) == got, "rows arrived after stop")
    # again, then exit the process in the middle of the sync (no stop, no close)
    check(json.loads(c.cmd("start"))["started"])
    until(lambda: int(c.cmd("count")) > got, what="more chunks")
    c.p.stdin.write("exit\n")
    c.p.stdin.flush()
    check(c.p.wait(10) == 0, "the process did not exit cleanly")
    check(not lock_held(path), "lock held after exit")
    db = open_db(path)
    got2 = one(db, "SELECT count(*) FROM items")
    check(got2 % 1000 == 0 or got2 == n, f"a partial chunk was applied: {got2}")
    check(json.loads(one(db, "SELECT sync_network_status()"))["background"]["state"] == "stopped")
    db.close()
    # a third start finishes the job from the stored cursor
    c = Child(env, path, s.url)
    until(lambda: int(c.cmd("count")) == n, timeout=60, what="the rest of the rows")
    c.cmd("stop")


@test
def bg_kill9_loses_nothing(env):
    """kill -9 of an app that writes while its syncer pushes and pulls: after
    a restart every committed local row reaches Postgres, every server row
    reaches the device, and the data is identical."""
    s = env.server()
    path = os.path.join(env.base, "k.db")
    env.sql("INSERT INTO items SELECT 's' || g, 'server', g, 0 FROM generate_series(1, 20000) g")
    c0 = Child(env, path, s.url)        # the first sync first (see the report on issue 10:
    until(lambda: int(c0.cmd("count")) == 20000, timeout=60, what="the first sync")
    c0.cmd("stop")                      # local writes during a chunked first sync lose rows)
    c0.p.stdin.close()
    c0.p.wait(10)
    stop_feed = []

    def feed():                         # the server changes while the app runs
        i = 0
        while not stop_feed:
            i += 1
            env.sql(f"INSERT INTO items VALUES ('f{i:05d}', 'feed', {i}, 0)")
            time.sleep(0.01)
    import threading
    feeder = threading.Thread(target=feed)
    feeder.start()
    w = Child(env, path, s.url, mode="write")
    last = 0
    t0 = time.time()
    while time.time() - t0 < 1.5:
        line = w.p.stdout.readline()
        if line.startswith("committed "):
            last = int(line.split()[1])
    os.kill(w.p.pid, signal.SIGKILL)
    w.p.wait()
    stop_feed.append(1)
    feeder.join()
    check(last > 50, f"only {last} commits")
    check(not lock_held(path), "the dead process still holds the lock")
    c = Child(env, path, s.url)
    check(c.started["state"] == "running", c.started)
    prefix = f"w{w.p.pid}-"
    until(lambda: env.sql(f"SELECT count(*) FROM items WHERE id LIKE '{prefix}%'", fetch=True)[0][0] >= last,
          timeout=30, what="every committed local row on the server")
    try:
        until(lambda: int(c.cmd("count")) == pg_count(env), timeout=30, what="the device to match the server")
    except AssertionError:
        print("  device", c.cmd("count"), "server", pg_count(env), c.cmd("status"))
        raise
    c.cmd("stop")
    db = open_db(path)
    local = db.execute("SELECT id, name, qty FROM items ORDER BY id").fetchall()
    remote = [tuple(r) for r in env.sql("SELECT id, name, qty FROM items ORDER BY id", fetch=True)]
    check(local == remote, f"{len(local)} local rows, {len(remote)} on the server")
    db.close()


@test
def bg_one_syncer_per_file(env):
    """Two processes start background sync on one file: one runs, the other
    stands by; when the first is killed the second takes over."""
    s = env.server()
    path = os.path.join(env.base, "one.db")
    c1 = Child(env, path, s.url)
    c2 = Child(env, path, s.url)
    check(c1.started["state"] == "running" and c2.started["state"] == "standby" and
          c2.started.get("active_pid") == c1.p.pid, (c1.started, c2.started))
    st = json.loads(c2.cmd("status"))["background"]
    check(st["state"] == "standby" and st["pid"] == c1.p.pid, st)
    os.kill(c1.p.pid, signal.SIGKILL)
    c1.p.wait()
    until(lambda: json.loads(c2.cmd("status"))["background"]["state"] == "running", timeout=5,
          what="the standby to take over")
    env.sql("INSERT INTO items VALUES ('x1', 'after failover', 1, 1)")
    until(lambda: int(c2.cmd("count")) == 1, what="the row through the new syncer")
    c2.cmd("stop")


# ---- the sqlite3 shell ---------------------------------------------------------------

@test
def bg_sqlite3_shell(env):
    """The sqlite3 shell: .load, start, and rows flow both ways while the
    shell only runs ordinary SQL; .quit leaves no lock."""
    s = env.server()
    path = os.path.join(env.base, "shell.db")
    b = open_db(os.path.join(env.base, "b.db"), url=s.url)
    one(b, "SELECT sync_network_start(?)", FAST)
    sh = subprocess.Popen(["sqlite3", "-batch", path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=child_env(), bufsize=1)
    env.procs.append(sh)

    def run(sql):
        sh.stdin.write(sql + "\n.print --done--\n")
        sh.stdin.flush()
        out = []
        while True:
            line = sh.stdout.readline()
            if not line or line.strip() == "--done--":
                return "\n".join(out)
            out.append(line.rstrip("\n"))
    ext = os.path.splitext(EXT)[0]
    run(f".load {ext}\n.timeout 5000\nPRAGMA journal_mode=WAL;\n{CLIENT_SCHEMA}\n"
        "SELECT sync_init('items'); SELECT sync_init('notes');")
    run(f"SELECT sync_network_init('{s.url}', '{token('alice')}');")
    out = run("SELECT json_extract(sync_network_start('" + FAST + "'), '$.state');")
    check(out.strip() == "running", out)
    run("INSERT INTO items VALUES ('sh1', 'from the shell', 1, 1);")
    until(lambda: one(b, "SELECT count(*) FROM items") == 1, what="B to see the shell's row")
    b.execute("INSERT INTO items VALUES ('py1', 'from python', 2, 2)")
    until(lambda: run("SELECT count(*) FROM items;").strip() == "2", what="the shell to see B's row")
    out = run("SELECT group_concat(json_extract(pk, '$.id') || ':' || kind) FROM sync_network_changes;")
    check(out.strip() == "py1:insert", out)
    check(lock_held(path))
    sh.stdin.write(".quit\n")
    sh.stdin.flush()
    check(sh.wait(10) == 0)
    check(not lock_held(path), "lock held after .quit")
    b.close()


# ---- Node (better-sqlite3) -------------------------------------------------------------

NODE_APP = r"""
const Database = require('better-sqlite3');
const [path, ext, url, tok] = process.argv.slice(2);
const db = new Database(path, { timeout: 5000 });
db.loadExtension(ext);
db.pragma('journal_mode = WAL');
db.exec(`CREATE TABLE IF NOT EXISTS items(id TEXT PRIMARY KEY, name TEXT, qty INTEGER, price REAL);
         CREATE TABLE IF NOT EXISTS notes(id TEXT PRIMARY KEY, owner TEXT NOT NULL, body TEXT);`);
db.prepare("SELECT sync_init('items')").get(); db.prepare("SELECT sync_init('notes')").get();
db.prepare('SELECT sync_network_init(?, ?)').get(url, tok);
let ticks = 0, maxGap = 0, last = Date.now();
const timer = setInterval(() => { const t = Date.now(); maxGap = Math.max(maxGap, t - last); last = t; ticks++; }, 5);
const t0 = Date.now();
const started = JSON.parse(db.prepare("SELECT sync_network_start('{\"chunk_rows\": 2000}') AS r").get().r);
const count = db.prepare('SELECT count(*) AS n FROM items');
const status = db.prepare('SELECT sync_network_status() AS s');
const counter = db.prepare("SELECT coalesce((SELECT changes FROM sync_network_counters WHERE tbl = 'items'), 0) AS n");
db.prepare("INSERT INTO items VALUES ('node1', 'from node', 1, 1)").run();
const poll = setInterval(() => {
  const n = count.get().n;
  if (n >= Number(process.env.WANT) && JSON.parse(status.get().s).pending.rows === 0) {
    clearInterval(poll); clearInterval(timer);
    const res = { started, rows: n, events: counter.get().n, ticks, maxGap, ms: Date.now() - t0 };
    db.close();
    console.log(JSON.stringify(res));
  }
  if (Date.now() - t0 > 60000) { console.log(JSON.stringify({ timeout: true, n, ticks })); process.exit(1); }
}, 20);
"""


def ensure_better_sqlite3():
    """better-sqlite3 from npm, installed once into ~/.cache/pgsync/node (outside the repo)."""
    if os.path.exists(os.path.join(NODE_DIR, "node_modules", "better-sqlite3", "build", "Release",
                                   "better_sqlite3.node")):
        return
    if not shutil.which("npm"):
        raise AssertionError("npm is missing: run scripts/deps (it installs nodejs and npm)")
    os.makedirs(NODE_DIR, exist_ok=True)
    print(f"  installing {BETTER_SQLITE3} into {NODE_DIR} (once; builds from source if needed)", flush=True)
    r = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", NODE_DIR, BETTER_SQLITE3],
                       capture_output=True, text=True, timeout=900, env=child_env())
    check(r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:])


@test
def bg_node_event_loop(env):
    """Node with better-sqlite3: a 60,000-row first sync runs in the background
    while a 5 ms timer keeps ticking (the event loop is never blocked for
    long), the app's own row reaches the other device, and the app sees the
    rows and counters without calling a sync function."""
    ensure_better_sqlite3()
    n = 60000
    env.sql("INSERT INTO items SELECT 'k' || lpad(g::text, 6, '0'), 'row ' || g, g, g "
            f"FROM generate_series(1, {n}) g")
    s = env.server()
    b = open_db(os.path.join(env.base, "b.db"), url=s.url)
    script = os.path.join(env.base, "app.js")
    with open(script, "w") as f:
        f.write(NODE_APP)
    envn = child_env({"NODE_PATH": os.path.join(NODE_DIR, "node_modules"), "WANT": str(n + 1)})
    r = subprocess.run(["node", script, os.path.join(env.base, "node.db"), EXT, s.url, token("alice")],
                       capture_output=True, text=True, timeout=120, env=envn)
    check(r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:])
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print("  node:", json.dumps(res))
    check(res["started"]["state"] == "running" and res["rows"] == n + 1, res)
    check(res["events"] == n, res)
    # a loop blocked by the sync would show one gap as long as the sync; a busy
    # machine (other processes) only stretches the gaps a little
    check(res["ticks"] >= res["ms"] / 5 * 0.2, f"the timer starved: {res}")
    check(res["maxGap"] < max(250, res["ms"] / 10), f"the event loop was blocked for {res['maxGap']} ms")
    one(b, "SELECT sync_network_start(?)", FAST)
    until(lambda: b.execute("SELECT name FROM items WHERE id = 'node1'").fetchone() == ("from node",),
          what="node's row on the other device")
    b.close()


def main(argv):
    names = set(argv)
    unknown = names - {fn.__name__ for fn in TESTS}
    if unknown:
        print("unknown tests:", " ".join(sorted(unknown)), "\navailable:", " ".join(f.__name__ for f in TESTS))
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    root = tmpdir("pgsync-pg-")
    pg = Postgres(root)
    pg.init()
    failed = 0
    try:
        for fn in TESTS:
            if names and fn.__name__ not in names:
                continue
            env = Env(pg=pg)
            t0 = time.time()
            error = None
            try:
                fn(env)
            except Exception:  # noqa: BLE001
                error = traceback.format_exc()
            env.close(keep=True)
            logs = {f: open(os.path.join(env.base, f), errors="replace").read()
                    for f in os.listdir(env.base) if f.endswith(".log") and f != "pg.log"}
            if error:
                failed += 1
                print(f"FAIL {fn.__name__}", flush=True)
                print(error)
                for f, text in logs.items():
                    print(f"--- {f} (tail)\n{text[-1500:]}")
            else:
                print(f"PASS {fn.__name__} ({time.time() - t0:.1f}s)", flush=True)
            shutil.rmtree(env.base, ignore_errors=True)
    finally:
        pg.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
