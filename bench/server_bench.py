"""server_bench.py — throughput and latency of pgsync-server, loopback only.

    bench/server_bench.sh [seconds_per_phase]

Phases (one throwaway PostgreSQL, two server processes, SQLite clients):
  push     50 SQLite clients in parallel: insert one row, sync_network_send()
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
"""
import os
import selectors
import socket
import sys
import threading
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "test", "server"))
from harness import Env, http, token  # noqa: E402
from tools import RawHTTP, WebSocket  # noqa: E402

SECONDS = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
PHASES = set(sys.argv[2:]) or {"push", "pull", "latency", "idle", "fanout"}
CLIENTS = 50
FANOUT = 1000
FANOUT_TARGET_MS = 100


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


def phase_push_pull(env, rows, s1):
    if True:
        # -- push: 50 replicas, one row per push -------------------------------
        clients = [env.client(f"c{i}", f"user{i}", s1) for i in range(CLIENTS)]
        seq = [0] * CLIENTS

        def push(i):
            seq[i] += 1
            clients[i].q("INSERT INTO items VALUES(?, 'bench', ?, 1.5)", f"c{i}-{seq[i]}", seq[i])
            clients[i].one("SELECT sync_network_send()")
        n, err, dt = parallel(CLIENTS, push, SECONDS)
        rows.append(("push (1 row, SQLite client -> server)", f"{n / dt:,.0f} /s", f"{err} errors"))

        # -- pull: the last 100 changed rows, raw HTTP ----------------------------
        st, h, _ = http("GET", s1.url + "/v1/pull?since=0", headers={"Authorization": "Bearer " + token("x")})
        head = int(h["x-pgsync-cursor"])
        env.sql("UPDATE items SET qty = qty + 1 WHERE id IN (SELECT id FROM items LIMIT 100)")
        toks = [token(f"user{i}") for i in range(CLIENTS)]

        def pull(i):
            st, h, b = http("GET", f"{s1.url}/v1/pull?since={head}", headers={"Authorization": "Bearer " + toks[i]})
            if st != 200:
                raise RuntimeError(st)
        n, err, dt = parallel(CLIENTS, pull, SECONDS)
        rows.append(("pull (100 changed rows, 200)", f"{n / dt:,.0f} /s", f"{err} errors"))
        st, h, _ = http("GET", s1.url + "/v1/pull?since=0", headers={"Authorization": "Bearer " + token("x")})
        top = h["x-pgsync-cursor"]

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
        st, h, _ = http("GET", s3.url + "/v1/pull?since=0", headers={"Authorization": "Bearer " + token("x")})
        cur = h["x-pgsync-cursor"]
        socks = []
        tok = token("idle")
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
        for rnd, also_pull in ((1, False), (2, True)):
            sel = selectors.DefaultSelector()
            for i, w in enumerate(wss):
                w.buf = b""
                sel.register(w.s, selectors.EVENT_READ, ("ws", i))
            writer.q("INSERT INTO items VALUES(?, 'wake up', 2, 2)", f"fanws{rnd}")
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
                            site, cur = devs[i]
                            pulls[i].send(f"/v1/pull?since={cur}&exclude={site}", tok)
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
                             f"{met(ms_p)} (target {FANOUT_TARGET_MS} ms): {pulled} got it, "
                             f"the last notification after {ms_n:.0f} ms"))
        for w in wss:
            w.close()
        for c in pulls:
            c.s.close()
        s.stop()
    finally:
        env.close()


if __name__ == "__main__":
    main()
