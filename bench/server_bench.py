"""server_bench.py — throughput and latency of pgsync-server, loopback only.

    bench/server_bench.sh [seconds_per_phase]

Phases (one throwaway PostgreSQL, two server processes, SQLite clients):
  push     1, 10 and 50 SQLite clients in parallel: insert one row,
           sync_network_send() (server: 8 pool connections, 8 threads);
           each with concurrent applies and with serialized ones
           (pgsync.serialize_applies = on: one global lock, as before
           issue 11), back to back (no target: the SQLite clients' own CPU
           is the limit here; the target is pushraw's)
  pushraw  the same pushes without the SQLite clients' own cost: one-row
           payloads made beforehand by one device per client, then 1, 10
           and 50 clients of build/pushload (bench/pushload.c: a thread and
           a keep-alive connection each) POST them; concurrent and serialized
           applies, alternating, best of 3 runs each (what Postgres and
           the server sustain); with 50 clients also against the baseline
           build (bench/baseline.sh: 3535751, the last main with the global
           apply lock, "today's" of issue 11.4), run by server_bench.sh before
           and after this bench: target >= 3x its best
  pull     50 clients in parallel: GET /v1/pull of the last 100 changed rows
  pull204  50 clients in parallel: GET /v1/pull with nothing new (cursor check)
  latency  A writes + sends through server 1, B waits on server 2
           (sync_network_wait): time until the row is visible on B
  idle     RSS of a server holding 1,000 parked long-polls (and 1,000 WebSockets)
  fanout   one push through the server wakes 1,000 parked long-polls of 1,000
           devices (one token, each its own site id, as sync_network_wait
           parks them): time until the last has its whole payload; then one
           push notifies 1,000 WebSockets: time until the last has the
           notification, and until each has also pulled the payload (what a
           WebSocket client does next). Target 100 ms each; met/missed printed.
Prints a small table. Every phase stops by itself.

    bench/server_bench.sh 5 fanout      only the fan-out phase
    bench/server_bench.sh 5 push        only the pushes
"""
import json
import os
import selectors
import socket
import struct
import sys
import threading
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "test", "server"))
from harness import Env, http, token  # noqa: E402
from tools import RawHTTP, WebSocket  # noqa: E402

SECONDS = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
PHASES = set(sys.argv[2:]) or {"push", "pushraw", "pull", "latency", "idle", "fanout"}
CLIENTS = 50
# pushes/s with 50 clients: target 3x those of the baseline build (the last
# main with the global apply lock, bench/baseline.sh), measured in the same
# run by server_bench.sh; the ratio to serialized applies of this build
# (pgsync.serialize_applies = on: the old lock back, nothing else) is printed
# beside it: what the lock alone still costs
PUSH50_FACTOR = 3
# PGSYNC_BENCH_BASELINE=1: this process drives the baseline build (which has
# no serialize_applies): only the 50-client pushraw runs, concurrent side only
BASELINE = os.environ.get("PGSYNC_BENCH_BASELINE") == "1"
# file that receives "pushraw50 RATE" (server_bench.sh compares the two)
RESULT = os.environ.get("PGSYNC_BENCH_RESULT")
PUSHLOAD = os.environ.get("PGSYNC_PUSHLOAD", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                          "..", "build", "pushload"))
FANOUT = 1000
FANOUT_TARGET_MS = 100


def head_cursor(url, tok):
    """The cursor at the head: every chunk of a pull since 0, followed (the first
    chunk's cursor asks for the next chunk, answered at once, never parked)."""
    cur = "0"
    while True:
        st, h, _ = http("GET", f"{url}/v1/pull?since={cur}", headers={"Authorization": "Bearer " + tok})
        if st == 204:
            return cur
        cur = h["x-pgsync-cursor"]
        if h.get("x-pgsync-more") != "1":
            return cur


def pulls_computed(s):
    """the server's pgsync_pulls_computed_total (one computation may answer many pulls)"""
    m = http("GET", s.url + "/metrics")[2].decode()
    return sum(int(float(ln.split()[-1])) for ln in m.splitlines()
               if ln.startswith("pgsync_pulls_computed_total"))


def parallel(n, fn, seconds):
    """Runs fn(i) in n threads until `seconds` pass; returns (ops, errors, elapsed)."""
    stop = time.time() + seconds
    counts = [0] * n
    errors = [0] * n

    def loop(i):
        while time.time() < stop:
            try:
                fn(i)
                counts[i] += 1
            except Exception:  # noqa: BLE001
                errors[i] += 1
    t0 = time.time()
    ts = [threading.Thread(target=loop, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(counts), sum(errors), time.time() - t0


def payload_one(env):
    """A one-row payload built by a scratch SQLite replica."""
    from harness import Client
    c = Client(env, "scratch")
    c.q("INSERT INTO items VALUES('herd', 'wake up', 1, 1)")
    p = c.one("SELECT sync_payload(0)")
    c.close()
    env.clients.remove(c)
    return p


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p / 100))]


def main():
    env = Env()
    rows = []
    try:
        s1 = env.server("s1", pool_size="8", threads="8")
        s2 = env.server("s2", pool_size="8", threads="8")

        if PHASES & {"push", "pull"}:
            phase_push_pull(env, rows, s1)
        if "pushraw" in PHASES:
            phase_push_raw(env, rows, s1)
        if "latency" in PHASES:
            phase_latency(env, rows, s1, s2)
        if "idle" in PHASES:
            phase_idle(env, rows)
        if "fanout" in PHASES:
            phase_fanout(env, rows)
    finally:
        env.close()
    w = max(len(r[0]) for r in rows)
    print(f"\npgsync-server bench ({CLIENTS} clients, {SECONDS:g} s per phase, {os.cpu_count()} cores, loopback)")
    print("-" * (w + 40))
    for name, val, note in rows:
        print(f"{name:<{w}}  {val:>12}  {note}")


def serialize(env, on):
    """pgsync.serialize_applies for every backend: the old global apply lock."""
    import psycopg2
    if BASELINE:
        return  # the baseline build always holds its lock, and knows no setting
    c = psycopg2.connect(env.pg.dsn(db=env.db))
    c.autocommit = True
    try:
        with c.cursor() as cur:
            cur.execute("LOAD 'pgsync'")  # ALTER SYSTEM knows the setting once loaded
            cur.execute(f"ALTER SYSTEM SET pgsync.serialize_applies = {'on' if on else 'off'}")
            cur.execute("SELECT pg_reload_conf()")
    finally:
        c.close()
    time.sleep(0.5)  # every backend of the pool has read it


def compare(rows, nc, got, what):
    """got[serialized] = (pushes/s, errors): two rows, the second with the ratio."""
    for on in (True, False):
        rate, err = got[on]
        note = f"{err} errors"
        if not on:
            ratio = rate / max(got[True][0], 1e-9)
            note += f"; {ratio:.1f}x serialized"
            if nc == CLIENTS and what.startswith("payload"):
                note += " (target against the baseline build: below the table)"
        rows.append((f"push (1 row, {what}), {nc:>2} clients, "
                     f"{'serialized' if on else 'concurrent'} applies", f"{rate:,.0f} /s", note))


def phase_push_raw(env, rows, s1):
    """Pushes of payloads made beforehand: what the server and Postgres
    sustain, without the SQLite clients' cost (on 2 cores they take as much
    CPU as server and Postgres together)."""
    import shutil
    import sqlite3
    import subprocess
    import tempfile
    from harness import CLIENT_SCHEMA, EXT
    # pushes per client and run: about a second of work at the rates of 2
    # cores; each side runs REPEAT times, alternating, and keeps its best run
    # (other work on the machine only ever slows a run down)
    per = {1: 1000, 10: 200, CLIENTS: 60}
    REPEAT = 3

    def device():
        c = sqlite3.connect(":memory:", isolation_level=None)
        c.enable_load_extension(True)
        c.load_extension(EXT)
        c.executescript(CLIENT_SCHEMA)
        c.execute("SELECT sync_init('items')")
        c.execute("SELECT sync_init('notes')")
        return c
    devs = [device() for _ in range(CLIENTS)]
    toks = [token(f"raw{i}") for i in range(CLIENTS)]
    seq = [0] * CLIENTS

    def payloads(i, n):
        c, out = devs[i], []
        for _ in range(n):
            seq[i] += 1
            since = c.execute("SELECT sync_db_version()").fetchone()[0]
            c.execute("INSERT INTO items VALUES(?, 'bench', ?, 1.5)", (f"r{i}-{seq[i]}", seq[i]))
            out.append(bytes(c.execute("SELECT sync_payload(?)", (since,)).fetchone()[0]))
        return out

    def run(nc, lists):
        """build/pushload (bench/pushload.c) posts them: one thread and one
        keep-alive connection per client, so that the client's own CPU
        stays small beside the server's and Postgres'."""
        d = tempfile.mkdtemp(prefix="pushload", dir=os.environ.get("PGSYNC_TEST_TMP", "/tmp"))
        for i in range(nc):
            with open(os.path.join(d, f"c{i}"), "wb") as f:
                f.write(toks[i].encode() + b"\n")
                for body in lists[i]:
                    f.write(struct.pack(">I", len(body)) + body)
        out = subprocess.run([PUSHLOAD, f"http://127.0.0.1:{s1.port}/v1/push", d, str(nc)],
                             capture_output=True, text=True, timeout=300)
        shutil.rmtree(d)
        if out.returncode != 0:
            raise RuntimeError(f"pushload failed: {out.stderr.strip()}")
        if out.stderr.strip():  # what the failed pushes were answered
            print(out.stderr.strip(), file=sys.stderr, flush=True)
        pushes, errors, seconds = out.stdout.split()
        return int(pushes) / float(seconds), int(errors)

    # every device's first push registers its site, and the pool warms up,
    # outside the measured runs
    run(CLIENTS, [payloads(i, 20) for i in range(CLIENTS)])
    for nc in ((CLIENTS,) if BASELINE else (1, 10, CLIENTS)):
        got = {True: (0, 0), False: (0, 0)}
        for k in range(REPEAT):
            for on in ((False,) if BASELINE else (True, False) if k % 2 == 0 else (False, True)):
                lists = [payloads(i, per[nc]) for i in range(nc)]
                serialize(env, on)
                print(f"pushraw: {nc} clients, {'serialized' if on else 'concurrent'} applies",
                      file=sys.stderr, flush=True)
                rate, err = run(nc, lists)
                got[on] = (max(rate, got[on][0]), got[on][1] + err)
        serialize(env, False)
        if nc == CLIENTS and RESULT:
            with open(RESULT, "a") as f:
                f.write(f"pushraw50 {got[False][0]:.0f} {got[False][1]}\n")
        if BASELINE:
            rows.append((f"push (1 row, payload made beforehand -> baseline build, best of {REPEAT}), "
                         f"{nc} clients", f"{got[False][0]:,.0f} /s", f"{got[False][1]} errors"))
        else:
            compare(rows, nc, got, f"payload made beforehand -> server, best of {REPEAT}")
    for c in devs:
        c.close()


def phase_push_pull(env, rows, s1):
    if True:
        # -- push: 50 replicas, one row per push -------------------------------
        clients = [env.client(f"c{i}", f"user{i}", s1) for i in range(CLIENTS)]
        seq = [0] * CLIENTS

        def push(i):
            seq[i] += 1
            clients[i].q("INSERT INTO items VALUES(?, 'bench', ?, 1.5)", f"c{i}-{seq[i]}", seq[i])
            clients[i].one("SELECT sync_network_send()")
        if "push" not in PHASES:
            parallel(CLIENTS, push, 1.0)  # rows for the pull phases
        for nc in ((1, 10, CLIENTS) if "push" in PHASES else ()):
            got = {}
            # the order alternates, so that a machine getting busier or quieter
            # during the run does not favour one side
            for on in ((True, False) if nc != 10 else (False, True)):
                serialize(env, on)
                what = "serialized" if on else "concurrent"
                print(f"push: {nc} clients, {what} applies", file=sys.stderr, flush=True)
                n, err, dt = parallel(nc, push, SECONDS)
                got[on] = (n / dt, err)
            serialize(env, False)
            compare(rows, nc, got, "SQLite client -> server")
        if "pull" not in PHASES:
            for c in clients:
                c.close()
            env.clients.clear()
            return

        # -- pull: the last 100 changed rows, raw HTTP ----------------------------
        head = head_cursor(s1.url, token("x"))
        env.sql("UPDATE items SET qty = qty + 1 WHERE id IN (SELECT id FROM items LIMIT 100)")
        toks = [token(f"user{i}") for i in range(CLIENTS)]

        def pull(i):
            st, h, b = http("GET", f"{s1.url}/v1/pull?since={head}", headers={"Authorization": "Bearer " + toks[i]})
            if st != 200:
                raise RuntimeError(st)
        n, err, dt = parallel(CLIENTS, pull, SECONDS)
        rows.append(("pull (100 changed rows, 200)", f"{n / dt:,.0f} /s", f"{err} errors"))
        top = head_cursor(s1.url, token("x"))

        def pull204(i):
            st, _, _ = http("GET", f"{s1.url}/v1/pull?since={top}", headers={"Authorization": "Bearer " + toks[i]})
            if st != 204:
                raise RuntimeError(st)
        n, err, dt = parallel(CLIENTS, pull204, SECONDS)
        rows.append(("pull (nothing new, 204)", f"{n / dt:,.0f} /s", f"{err} errors"))
        for c in clients:
            c.close()
        env.clients.clear()


def phase_latency(env, rows, s1, s2):
    if True:
        # -- latency: write on A (server 1) -> visible on B (server 2) ------------
        a = env.client("lat_a", "alice", s1)
        b = env.client("lat_b", "alice", s2)
        a.sync()
        b.sync()
        lat = []
        deadline = time.time() + max(SECONDS * 2, 10)
        k = 0
        while time.time() < deadline and k < 300:
            k += 1
            seen = {}

            def waiter():
                while True:
                    if b.one("SELECT sync_network_wait(5000)") == "changes" and \
                            b.one("SELECT count(*) FROM items WHERE id = ?", f"lat{k}"):
                        seen["t"] = time.perf_counter()
                        return
            t = threading.Thread(target=waiter)
            t.start()
            time.sleep(0.02)
            t0 = time.perf_counter()
            a.q("INSERT INTO items VALUES(?, 'latency', ?, 0)", f"lat{k}", k)
            a.one("SELECT sync_network_send()")
            t.join(10)
            lat.append((seen["t"] - t0) * 1000)
        rows.append(("write on A -> visible on B, p50", f"{pct(lat, 50):.1f} ms", f"{len(lat)} samples"))
        rows.append(("write on A -> visible on B, p99", f"{pct(lat, 99):.1f} ms", "two servers, NOTIFY"))


def phase_idle(env, rows):
    if True:

        # -- RSS with 1,000 idle long-polls and 1,000 WebSockets --------------------
        s3 = env.server("s3", pool_size="8", threads="8")
        rss0 = s3.rss_kb()
        # the head, every chunk followed: after the push phases the table is
        # bigger than one chunk, whose cursor would be answered, not parked
        tok = token("idle")
        cur = head_cursor(s3.url, tok)
        socks = []
        for i in range(1000):
            sk = socket.create_connection(("127.0.0.1", s3.port))
            sk.sendall(f"GET /v1/pull?since={cur}&wait=60000 HTTP/1.1\r\nHost: x\r\n"
                       f"Authorization: Bearer {tok}\r\n\r\n".encode())
            socks.append(sk)
        deadline = time.time() + 30
        parked = 0
        while time.time() < deadline:
            m = http("GET", s3.url + "/metrics")[2].decode()
            parked = int(next(line.split()[-1] for line in m.splitlines()
                              if line.startswith('pgsync_clients_connected{kind="longpoll"}')))
            if parked >= 1000:
                break
            time.sleep(0.2)
        rss1 = s3.rss_kb()
        rows.append(("server RSS, idle", f"{rss0 / 1024:.1f} MB", ""))
        rows.append(("server RSS, 1,000 parked long-polls", f"{rss1 / 1024:.1f} MB",
                     f"{parked} parked, {(rss1 - rss0) / max(parked, 1):.1f} kB each"))
        # one push wakes them all: each re-runs its pull and gets the row
        t0 = time.time()
        st, _, _ = http("POST", s3.url + "/v1/push", body=payload_one(env),
                        headers={"Authorization": "Bearer " + tok})
        answered = 0
        for sk in socks:
            sk.settimeout(30)
            if sk.recv(64).startswith(b"HTTP/1.1 200"):
                answered += 1
        rows.append(("  one push answers 1,000 long-polls", f"{(time.time() - t0) * 1000:.0f} ms",
                     f"{answered} got the payload"))
        for sk in socks:
            sk.close()
        socks = []
        wss = [WebSocket(s3.port, tok) for _ in range(1000)]
        for w in wss:
            w.recv_json()
        rss2 = s3.rss_kb()
        rows.append(("  + 1,000 WebSockets", f"{rss2 / 1024:.1f} MB",
                     f"{(rss2 - rss1) / 1000:.1f} kB each"))
        t0 = time.time()
        env.sql("INSERT INTO items VALUES('wake', 'all', 1, 1)")
        got = sum(1 for w in wss if w.recv_json(timeout=10)["type"] == "changes")
        rows.append(("  notify 1,000 WebSockets (direct PG write)", f"{(time.time() - t0) * 1000:.0f} ms",
                     f"{got} received (poll_ms 1000)"))
        for w in wss:
            w.close()
        for sk in socks:
            sk.close()


def register_devices(url, tok, n):
    """n devices (site ids) that are in sync: [(site, cursor)]. Each first
    pull records its device (a write), so a second pull brings them all to
    the same cursor, as devices that stay connected are."""
    out = []
    for _ in range(n):
        site = str(uuid.uuid4())
        st, h, _ = http("GET", f"{url}/v1/pull?since=0&exclude={site}", headers={"Authorization": "Bearer " + tok})
        assert st in (200, 204), st
        out.append(site)
    done = []
    for site in out:
        st, h, _ = http("GET", f"{url}/v1/pull?since=0&exclude={site}", headers={"Authorization": "Bearer " + tok})
        st, h, _ = http("GET", f"{url}/v1/pull?since={h['x-pgsync-cursor']}&exclude={site}",
                        headers={"Authorization": "Bearer " + tok})
        done.append((site, h["x-pgsync-cursor"]))
    return done


def perf_start(env, s):
    """PGSYNC_BENCH_PERF=FILE: perf record -g of the server and its Postgres
    backends around the fan-out to kept-alive long-polls (docs/SERVER.md, fan-out)."""
    out = os.environ.get("PGSYNC_BENCH_PERF")
    if not out:
        return None
    import subprocess
    pids = [str(s.proc.pid)] + [str(r[0]) for r in env.pg.sql(
        "SELECT pid FROM pg_stat_activity WHERE datname = %s", (env.db,), fetch=True)]
    p = subprocess.Popen(["perf", "record", "-F", "20000", "-g", "-o", out, "-p", ",".join(pids)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    return p


def perf_stop(p):
    if p:
        import signal
        p.send_signal(signal.SIGINT)
        p.wait(30)


def met(ms):
    return "met" if ms <= FANOUT_TARGET_MS else "MISSED"


def ws_frames(buf):
    """The complete server frames at the start of buf: ([(opcode, data)], the rest)."""
    out = []
    while len(buf) >= 2:
        n, h = buf[1] & 0x7F, 2
        if n == 126:
            if len(buf) < 4:
                break
            n, h = struct.unpack(">H", buf[2:4])[0], 4
        elif n == 127:
            if len(buf) < 10:
                break
            n, h = struct.unpack(">Q", buf[2:10])[0], 10
        if len(buf) < h + n:
            break
        out.append((buf[0] & 0x0F, buf[h:h + n]))
        buf = buf[h + n:]
    return out, buf


def phase_fanout(env0, rows):
    """One push, 1,000 waiting devices of one token: long-polls, then WebSockets."""
    import resource
    from harness import Client
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 3 * FANOUT + 512)), hard))
    env = Env(pg=env0.pg)               # a database of its own: small first syncs
    try:
        s = env.server("fan", pool_size="8", threads="8")
        tok = token("fleet")
        writer = Client(env, "writer", token("writer"), s)
        writer.sync()
        devs = register_devices(s.url, tok, FANOUT)
        conns = [RawHTTP(s.port) for _ in devs]
        # round 1: fresh connections; round 2: the same connections again, as
        # connected devices keep theirs (the first answer on a connection
        # also pays for libmicrohttpd's first touch of its memory pool)
        for rnd in (1, 2):
            sel = selectors.DefaultSelector()
            for c, (site, cur) in zip(conns, devs):
                c.send(f"/v1/pull?since={cur}&exclude={site}&wait=60000", tok)
                sel.register(c.s, selectors.EVENT_READ, c)
            deadline = time.time() + 30
            while time.time() < deadline:
                m = http("GET", s.url + "/metrics")[2].decode()
                parked = sum(int(ln.split()[-1]) for ln in m.splitlines()
                             if ln.startswith('pgsync_clients_connected{kind="longpoll"'))
                if parked >= FANOUT:
                    break
                time.sleep(0.1)
            writer.q("INSERT INTO items VALUES(?, 'wake up', 1, 1)", f"fan{rnd}")
            prof = perf_start(env, s) if rnd == 2 else None
            t0 = time.perf_counter()
            writer.send()
            t_push = time.perf_counter()
            done, last = 0, t0
            while done < FANOUT and time.perf_counter() - t0 < 30:
                for key, _ in sel.select(timeout=1):
                    c = key.data
                    if c.feed():
                        sel.unregister(c.s)
                        last = time.perf_counter()
                        done += c.status == 200 and len(c.body) > 0
            perf_stop(prof)
            sel.close()
            ms = (last - t0) * 1000
            what = "fresh connections" if rnd == 1 else "kept-alive connections"
            rows.append((f"fan-out: one push -> {FANOUT:,} parked long-polls, {what}", f"{ms:.0f} ms",
                         f"{met(ms)} (target {FANOUT_TARGET_MS} ms): {done} got the payload; the push "
                         f"itself {(t_push - t0) * 1000:.1f} ms"))
            # the next round waits at the new cursor
            devs = [(site, c.headers["x-pgsync-cursor"]) for c, (site, _) in zip(conns, devs)]
        for c in conns:
            c.s.close()

        # WebSockets: the notification alone, then the notification and each device's pull
        devs = register_devices(s.url, tok, FANOUT)
        wss = [WebSocket(s.port, tok) for _ in range(FANOUT)]
        for w in wss:
            w.recv_json()
            w.s.setblocking(False)
        pulls = [RawHTTP(s.port) for _ in range(FANOUT)]
        # each device's pull, made beforehand: the loop below should measure
        # the server, not this process building a thousand requests
        reqs = [f"GET /v1/pull?since={cur}&exclude={site} HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {tok}\r\n\r\n".encode() for site, cur in devs]
        for rnd, also_pull in ((1, False), (2, True)):
            sel = selectors.DefaultSelector()
            for i, w in enumerate(wss):
                w.buf = b""
                sel.register(w.s, selectors.EVENT_READ, ("ws", i))
            writer.q("INSERT INTO items VALUES(?, 'wake up', 2, 2)", f"fanws{rnd}")
            computed0 = pulls_computed(s)
            t0 = time.perf_counter()
            writer.send()
            notified, pulled, t_note, t_pull = 0, 0, t0, t0
            while (pulled if also_pull else notified) < FANOUT and time.perf_counter() - t0 < 30:
                for key, _ in sel.select(timeout=1):
                    kind, i = key.data
                    if kind == "ws":
                        try:
                            wss[i].buf += wss[i].s.recv(1 << 16)
                        except BlockingIOError:
                            continue
                        if b'"changes"' not in wss[i].buf:
                            continue
                        sel.unregister(wss[i].s)
                        notified += 1
                        t_note = time.perf_counter()
                        if also_pull:
                            pulls[i].send_prepared(reqs[i])
                            sel.register(pulls[i].s, selectors.EVENT_READ, ("pull", i))
                    elif pulls[i].feed():
                        sel.unregister(pulls[i].s)
                        t_pull = time.perf_counter()
                        pulled += pulls[i].status == 200 and len(pulls[i].body) > 0
            sel.close()
            ms_n, ms_p = (t_note - t0) * 1000, (t_pull - t0) * 1000
            if not also_pull:
                rows.append((f"fan-out: one push -> {FANOUT:,} WebSockets notified", f"{ms_n:.0f} ms",
                             f"{met(ms_n)} (target {FANOUT_TARGET_MS} ms): {notified} notified"))
            else:
                rows.append(("  ... notified, then each pulled the payload", f"{ms_p:.0f} ms",
                             f"(no target: subscriptions, below, deliver the payload): {pulled} got it, "
                             f"the last notification after {ms_n:.0f} ms; "
                             f"{pulls_computed(s) - computed0} pulls computed by Postgres"))

        # subscribed WebSockets: the payload comes on the socket itself
        # (docs/PROTOCOL.md, "Payloads over the WebSocket"); each first gets
        # the catch-up payload of the rounds above
        for w, (site, cur) in zip(wss, devs):
            w.s.setblocking(True)
            w.s.settimeout(30)
            w.buf = b""
            w.send(0x1, json.dumps({"type": "subscribe", "since": cur, "exclude": site}).encode())
        for w in wss:
            while w.recv(30)[0] != 2:
                pass
            w.s.setblocking(False)
        sel = selectors.DefaultSelector()
        for i, w in enumerate(wss):
            sel.register(w.s, selectors.EVENT_READ, i)
        writer.q("INSERT INTO items VALUES('fanws3', 'wake up', 3, 3)")
        computed0 = pulls_computed(s)
        t0 = time.perf_counter()
        writer.send()
        got, last = 0, t0
        while got < FANOUT and time.perf_counter() - t0 < 30:
            for key, _ in sel.select(timeout=1):
                w = wss[key.data]
                try:
                    w.buf += w.s.recv(1 << 16)
                except BlockingIOError:
                    continue
                frames, w.buf = ws_frames(w.buf)
                if any(op == 2 for op, _ in frames):
                    sel.unregister(w.s)
                    got += 1
                    last = time.perf_counter()
        sel.close()
        ms = (last - t0) * 1000
        rows.append((f"fan-out: one push -> {FANOUT:,} subscribed WebSockets, payload on the socket",
                     f"{ms:.0f} ms", f"{met(ms)} (target {FANOUT_TARGET_MS} ms): {got} got it; "
                     f"{pulls_computed(s) - computed0} pulls computed by Postgres"))
        for w in wss:
            w.close()
        for c in pulls:
            c.s.close()
        s.stop()
    finally:
        env.close()


if __name__ == "__main__":
    main()
