"""test_server.py — end-to-end tests of pgsync-server and the SQLite network
client: real processes (a throwaway PostgreSQL, pgsync-server on loopback,
SQLite replicas). Run through test/server/run.sh, or directly:

    /usr/bin/python3 test/server/test_server.py [test names...]

Prints "PASS name" / "FAIL name" per test; exit status 1 if any failed.
"""
import json
import re
import os
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import EXT, ROOT, CLIENT_SCHEMA, Env, Postgres, Server, Client, child_env, http, tls_context, tmpdir, token, jwt_hs256, jwt_rs256  # noqa: E402
from tools import Proxy, RawHTTP, WebSocket  # noqa: E402

TESTS = []
PG = None


def test(fn):
    TESTS.append(fn)
    return fn


def check(cond, msg="check failed"):
    if not cond:
        raise AssertionError(msg)


def err_json(body):
    j = json.loads(body)
    check(set(j) >= {"error", "detail", "hint"}, f"error body lacks fields: {j}")
    return j


def items(c):
    return c.q("SELECT id, name, qty, price FROM items ORDER BY id")


def pg_items(env):
    return [tuple(r) for r in env.sql("SELECT id, name, qty, price FROM items ORDER BY id", fetch=True)]


def sql_error(fn):
    try:
        fn()
    except sqlite3.Error as e:
        return str(e)
    raise AssertionError("expected an SQLite error")


def run_bg(fn):
    out = {}

    def go():
        t0 = time.time()
        try:
            out["result"] = fn()
        except Exception as e:  # noqa: BLE001
            out["error"] = e
        out["t"] = time.time()
        out["dt"] = out["t"] - t0
    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, out


# ---- routing, limits, errors --------------------------------------------------

@test
def routes_and_errors(env):
    s = env.server(max_body="4096")
    tok = token("alice")
    auth = {"Authorization": "Bearer " + tok}
    st, h, b = http("GET", s.url + "/nope")
    check(st == 404 and err_json(b)["error"] == "not found", (st, b))
    check(h["content-type"] == "application/json" and h["x-pgsync-protocol"] == "1")
    st, h, b = http("GET", s.url + "/v1/push", headers=auth)
    check(st == 405 and h.get("allow") == "POST", (st, h))
    st, h, b = http("GET", s.url + "/healthz")
    check(st == 200 and json.loads(b)["postgres"] == "ok", b)
    st, h, b = http("GET", s.url + "/metrics")
    check(st == 200 and b"pgsync_requests_total" in b and b"pgsync_pg_pool_connections" in b)
    st, h, b = http("POST", s.url + "/v1/push", body=b"", headers=auth)
    check(st == 400 and err_json(b)["error"] == "empty body", (st, b))
    st, h, b = http("POST", s.url + "/v1/push", body=b"hello world" * 10, headers=auth)
    check(st == 400 and err_json(b)["error"] == "malformed payload", (st, b))
    st, h, b = http("POST", s.url + "/v1/push", body=b"x" * 5000, headers=auth)
    check(st == 413 and err_json(b)["error"] == "payload too large", (st, b))

    def chunks():
        for _ in range(10):
            yield b"PGSY" + b"x" * 1000
    st, h, b = http("POST", s.url + "/v1/push", body=chunks(),
                    headers=dict(auth, **{"Transfer-Encoding": "chunked"}))
    check(st == 413, (st, b))
    for q in ("since=abc", "since=-1", "since=99999999999999999999", "exclude=not-a-uuid", "wait=soon"):
        st, h, b = http("GET", s.url + "/v1/pull?" + q, headers=auth)
        check(st == 400, (q, st, b))
    # a corrupted payload: valid header shape, broken checksum
    a = env.client("a", "alice", s)
    a.q("INSERT INTO items VALUES('i1', 'x', 1, 1.0)")
    p = bytearray(a.one("SELECT sync_payload(0)"))
    p[-1] ^= 0xFF
    st, h, b = http("POST", s.url + "/v1/push", body=bytes(p), headers=auth)
    check(st == 400 and err_json(b)["error"] == "malformed payload", (st, b))
    # a table the server does not sync (a newer app version): held there, not a failure
    a.q("CREATE TABLE extra(id TEXT PRIMARY KEY, v TEXT)")
    a.q("SELECT sync_init('extra')")
    a.q("INSERT INTO extra VALUES('e1', 'v')")
    st, h, b = http("POST", s.url + "/v1/push", body=a.one("SELECT sync_payload(0)"), headers=auth)
    check(st == 200, (st, b))
    check(env.sql("SELECT tbl, code FROM pgsync.held", fetch=True) == [("extra", "PS003")],
          env.sql("SELECT * FROM pgsync.held", fetch=True))
    # long-poll with nothing new: 204 after the wait, with a cursor
    cur = http("GET", s.url + "/v1/pull?since=0", headers=auth)[1]["x-pgsync-cursor"]
    t0 = time.time()
    st, h, b = http("GET", s.url + f"/v1/pull?since={cur}&wait=300", headers=auth)
    dt = time.time() - t0
    check(st == 204 and "x-pgsync-cursor" in h and 0.25 < dt < 2, (st, h, dt))
    st, h, b = http("GET", s.url + "/metrics")
    check(b'pgsync_requests_total{endpoint="push",status="413"}' in b, b[:500])


@test
def config_file(env):
    from harness import SERVER_BIN, SECRET, free_port, _record_pid
    port = free_port()
    conf = os.path.join(env.base, "server.conf")
    with open(conf, "w") as f:
        f.write(f"# test\nlisten = 127.0.0.1\nport = {port}\n"
                f"database = {env.pg.dsn(user='authenticator', db=env.db)}\n"
                f"jwt_secret = '{SECRET}'\nallowed_roles = app_user, other_role\nmax_body = 1M\n")
    bad = subprocess.run([SERVER_BIN, "--config", conf, "--pool-size=0"], capture_output=True, text=True,
                         env=child_env(), timeout=10)
    check(bad.returncode == 2 and "pool_size" in bad.stderr, bad.stderr)
    bad = subprocess.run([SERVER_BIN, "--config", conf], capture_output=True, text=True, timeout=10,
                         env=child_env({"PGSYNC_MAX_BODY": "lots"}))
    check(bad.returncode == 2 and "PGSYNC_MAX_BODY" in bad.stderr, bad.stderr)
    short = subprocess.run([SERVER_BIN, "--port=1", "--allowed_roles=x", "--jwt_secret=short"],
                           capture_output=True, text=True, timeout=10, env=child_env())
    check(short.returncode == 2 and "32 bytes" in short.stderr, short.stderr)
    p = subprocess.Popen([SERVER_BIN, "--config", conf, "--rate-limit=100"], env=child_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env.procs.append(p)
    _record_pid(p.pid)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            if http("GET", url + "/healthz")[0] == 200:
                break
        except OSError:
            time.sleep(0.05)
    # max_body = 1M from the file: a declared 2 MB body is refused before it is sent
    import socket
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sk:
        sk.sendall(f"POST /v1/push HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token('a')}\r\n"
                   f"Content-Length: {2 << 20}\r\n\r\n".encode())
        head = sk.recv(4096)
    check(head.startswith(b"HTTP/1.1 413"), head[:100])


@test
def auth_tokens(env):
    key = os.path.join(env.base, "rsa.pem")
    pub = os.path.join(env.base, "rsa.pub")
    other = os.path.join(env.base, "other.pem")
    for k in (key, other):
        subprocess.run(["openssl", "genrsa", "-out", k, "2048"], check=True, capture_output=True, env=child_env())
    subprocess.run(["openssl", "rsa", "-in", key, "-pubout", "-out", pub], check=True, capture_output=True,
                   env=child_env())
    s = env.server(jwt_public_key=pub)
    now = int(time.time())

    def pull(tok):
        h = {"Authorization": "Bearer " + tok} if tok is not None else {}
        st, hd, b = http("GET", s.url + "/v1/pull?since=0", headers=h)
        return st, (err_json(b)["error"] if st >= 400 else "")

    good = {"sub": "alice", "role": "app_user", "exp": now + 60}
    check(pull(jwt_hs256(good))[0] in (200, 204))
    check(pull(jwt_rs256(good, key))[0] in (200, 204))
    check(pull(None) == (401, "missing token"))
    check(pull("garbage")[0] == 401)
    check(pull(jwt_hs256(good, secret="x" * 40)) == (401, "invalid token"))
    check(pull(jwt_rs256(good, other)) == (401, "invalid token"))
    check(pull(jwt_hs256(dict(good, exp=now - 3600))) == (401, "token expired"))
    check(pull(jwt_hs256(dict(good, nbf=now + 3600))) == (401, "token not yet valid"))
    check(pull(jwt_hs256(good, alg="HS512"))[0] == 401)
    # algorithm confusion: an HS256 token whose secret is the RSA public key
    check(pull(jwt_hs256(good, secret=open(pub).read())) == (401, "invalid token"))
    none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0." + jwt_hs256(good).split(".")[1] + "."
    check(pull(none)[0] == 401)
    check(pull(jwt_hs256(dict(good, role="admin_user"))) == (403, "role not allowed"))
    check(pull(jwt_hs256({"sub": "alice", "exp": now + 60})) == (403, "role not allowed"))
    st, h, b = http("GET", s.url + "/v1/pull", headers={"Authorization": "Basic YWxpY2U6eA=="})
    check(st == 401 and "www-authenticate" in h, (st, h))
    # the client surfaces 401 with what to do
    c = Client(env, "c", jwt_hs256(dict(good, exp=now - 3600)), s)
    e = sql_error(lambda: c.sync())
    check("401" in e and "sync_network_set_token" in e, e)
    c.q("SELECT sync_network_set_token(?)", jwt_hs256(good))
    c.sync()


@test
def rate_limit(env):
    s = env.server(rate_limit="1", rate_burst="5")
    h = {"Authorization": "Bearer " + token("alice")}
    t0 = time.time()
    codes = [http("GET", s.url + "/v1/pull?since=0", headers=h) for _ in range(15)]
    dt = time.time() - t0
    limited = [c for c in codes if c[0] == 429]
    # the burst of 5, then one a second: at most 5 + dt + 1 pass
    check(len(limited) >= 15 - (5 + int(dt) + 1), ([c[0] for c in codes], dt))
    check(len(limited) <= 10, [c[0] for c in codes])
    check("retry-after" in limited[0][1] and err_json(limited[0][2])["error"] == "rate limit exceeded")
    # another subject has its own bucket
    st, _, _ = http("GET", s.url + "/v1/pull?since=0", headers={"Authorization": "Bearer " + token("bob")})
    check(st in (200, 204), st)


# ---- sync ---------------------------------------------------------------------

@test
def three_clients_converge(env):
    s = env.server()
    a, b, c = (env.client(n, "alice", s) for n in "abc")
    for i in range(1, 21):
        a.q("INSERT INTO items VALUES(?, ?, ?, ?)", f"i{i:02}", f"item {i}", i, i * 1.25)
    a.sync()
    b.sync()
    c.sync()
    check(items(b) == items(a) == items(c) == pg_items(env), "initial copy")
    # offline edits, conflicting on purpose
    a.q("UPDATE items SET name = 'A' WHERE id = 'i01'")
    time.sleep(0.01)
    b.q("UPDATE items SET name = 'B' WHERE id = 'i01'")      # later: wins
    c.q("DELETE FROM items WHERE id = 'i02'")
    a.q("UPDATE items SET qty = 100 WHERE id = 'i02'")       # concurrent with the delete
    b.q("INSERT INTO items VALUES('i21', 'from b', 21, 0.5)")
    c.q("INSERT INTO items VALUES('i22', 'from c', 22, -0.0)")
    a.q("DELETE FROM items WHERE id = 'i03'")
    a.q("INSERT INTO items VALUES('i03', 'reborn', 3, 3.5)")  # a new life
    c.q("UPDATE items SET price = 99.5 WHERE id = 'i04'")
    b.q("UPDATE items SET qty = 44 WHERE id = 'i04'")         # other column: both kept
    b.q("DELETE FROM items WHERE id = 'i05'")
    c.q("DELETE FROM items WHERE id = 'i05'")                 # double delete
    env.sql("UPDATE items SET name = 'from postgres' WHERE id = 'i06'")  # another app
    for r in (a, b, c, a, b, c):
        r.sync()
    want = pg_items(env)
    check(items(a) == want and items(b) == want and items(c) == want,
          f"diverged:\nA={items(a)}\nB={items(b)}\nC={items(c)}\nPG={want}")
    row = {r[0]: r for r in want}
    check(row["i01"][1] == "B", row["i01"])
    check(row["i04"][2:] == (44, 99.5), row["i04"])
    check("i21" in row and "i22" in row and "i05" not in row and row["i03"][1] == "reborn")
    check(row["i06"][1] == "from postgres")
    # a replica that joins late gets the same state
    d = env.client("d", "alice", s)
    d.sync()
    check(items(d) == want)
    # nothing pending anywhere, and a second sync moves nothing
    for r in (a, b, c, d):
        check(r.status()["pending_rows"] == 0, r.status())
        res = r.sync()
        check(res["send"]["sent_bytes"] == 0 and res["receive"]["payloads"] == 0, res)


@test
def behind_pgbouncer_transaction_pooling(env):
    """PgBouncer in transaction mode between the server and Postgres (1.18 in
    Debian 12 keeps no prepared statements across transactions): each
    transaction may run on another backend, which lacks the statements the
    server prepared on its connection. The server sees SQLSTATE 26000, stops
    preparing on that connection and retries the request: pushes, pulls and
    rejections go on as without a pooler."""
    import harness
    bouncer = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    check(os.path.exists(bouncer), "pgbouncer missing (scripts/deps installs it)")
    d = env.pg.base  # owned by postgres, who runs pgbouncer (it refuses root)
    port = harness.free_port()
    with open(os.path.join(d, "users.txt"), "w") as f:
        f.write('"authenticator" ""\n')
    with open(os.path.join(d, "pgbouncer.ini"), "w") as f:
        f.write(f"[databases]\n{env.db} = host=127.0.0.1 port={env.pg.port} dbname={env.db}\n"
                f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
                f"auth_type = trust\nauth_file = {d}/users.txt\npool_mode = transaction\n"
                f"default_pool_size = 2\nserver_round_robin = 1\n"
                f"max_client_conn = 50\nlogfile = {d}/pgbouncer.log\n"
                f"pidfile = {d}/pgbouncer.pid\n"
                # the server's statement_timeout comes in the startup packet's
                # options, which PgBouncer cannot pass on (docs/SERVER.md)
                "ignore_startup_parameters = options\n")
    for n in ("users.txt", "pgbouncer.ini"):
        if os.geteuid() == 0:
            shutil.chown(os.path.join(d, n), "postgres")
    pb = subprocess.Popen(harness._as_postgres([bouncer, os.path.join(d, "pgbouncer.ini")]),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env.procs.append(pb)
    harness._record_pid(pb.pid)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    # two backends open at once (min_pool_size only adds them by and by),
    # then taken in turn: the server's one connection runs its second
    # transaction where its first prepared nothing
    import psycopg2
    held = []
    for _ in range(2):
        c = psycopg2.connect(f"host=127.0.0.1 port={port} user=authenticator dbname={env.db}")
        c.cursor().execute("SELECT 1")   # in a transaction: the backend stays this client's
        held.append(c)
    for c in held:
        c.commit()   # (a client that leaves mid-transaction takes its backend along)
        c.close()
    s = env.server(database=f"host=127.0.0.1 port={port} user=authenticator dbname={env.db}",
                   pool_size=1)
    a, b = env.client("a", "alice", s), env.client("b", "bob", s)
    for rnd in range(6):
        a.q("INSERT INTO items VALUES(?, 'from a', ?, 1.5)", f"a{rnd}", rnd)
        b.q("INSERT INTO items VALUES(?, 'from b', ?, 2.5)", f"b{rnd}", rnd)
        a.q("UPDATE items SET qty = qty + 10 WHERE id LIKE 'b%'")
        for c in (a, b, a, b):
            r = c.sync()
            check(r["send"]["rejected"] == 0, r)
    want = pg_items(env)
    check(len(want) == 12 and items(a) == want and items(b) == want,
          f"diverged:\nA={items(a)}\nB={items(b)}\nPG={want}")
    log = open(s.log).read()
    check(" ERROR " not in log and "no longer prepared" in log, log[-2000:])
    pb.terminate()
    pb.wait(10)


@test
def realtime_two_servers(env):
    s1 = env.server("s1")
    s2 = env.server("s2")
    a = env.client("a", "alice", s1)
    b = env.client("b", "alice", s2)
    a.sync()
    b.sync()
    lat = []
    for i in range(10):
        t, out = run_bg(lambda: b.one("SELECT sync_network_wait(5000)"))
        time.sleep(0.3)                      # b is parked on s2
        a.q("INSERT INTO items VALUES(?, 'rt', ?, 0)", f"rt{i}", i)
        pushed = time.time()
        a.send()                             # through s1
        t.join(6)
        check(out.get("result") == "changes", out)
        lat.append((out["t"] - pushed) * 1000)
        check(b.one("SELECT count(*) FROM items WHERE id = ?", f"rt{i}") == 1)
    lat.sort()
    print(f"  push start -> B has the row (ms): min {lat[0]:.1f} median {lat[5]:.1f} max {lat[-1]:.1f}")
    # the median says the push's NOTIFY woke B (s2's version poll runs once a
    # second); one of ten may meet a scheduler stall of the shared machine
    check(lat[5] < 100 and lat[-1] < 1000, lat)
    # a change made directly in Postgres wakes waiters through the version poll
    t, out = run_bg(lambda: b.one("SELECT sync_network_wait(5000)"))
    time.sleep(0.3)
    env.sql("INSERT INTO items VALUES('direct', 'pg', 1, 1)")
    t0 = time.time()
    t.join(6)
    check(out.get("result") == "changes" and out["t"] - t0 < 2.5, out)
    check(b.one("SELECT name FROM items WHERE id = 'direct'") == "pg")
    # nothing new: wait times out
    t0 = time.time()
    check(b.one("SELECT sync_network_wait(300)") == "timeout")
    check(0.25 < time.time() - t0 < 2)


@test
def websocket_notifications(env):
    s1 = env.server("s1")
    s2 = env.server("s2")
    a = env.client("a", "alice", s1)
    ws = WebSocket(s2.port, token("alice"))
    check(ws.status == 101 and "pgsync.v1" in ws.head, ws.head)
    hello = ws.recv_json()
    check(hello["type"] == "hello" and len(hello["server_site"]) == 36, hello)
    a.q("INSERT INTO items VALUES('w1', 'ws', 1, 1)")
    a.send()
    t0 = time.time()
    msg = ws.recv_json(timeout=3)
    check(msg["type"] == "changes" and msg["version"] > hello["version"], msg)
    check(time.time() - t0 < 1)
    # a second "changes" may come before the answers: the push's NOTIFY
    # takes an xid of its own, which s2's version poll announces
    ws.send(0x9, b"hi")
    op, data = _reply(ws, frame=True)
    check(op == 0xA and data == b"hi", (op, data))
    ws.send(0x8, b"\x03\xe8")
    op, data = _reply(ws, frame=True)
    check(op == 0x8 and data[:2] == b"\x03\xe8", (op, data))
    ws.close()
    check(WebSocket(s2.port, None).status == 401)
    check(WebSocket(s2.port, token("x", role="admin_user")).status == 403)
    # browsers pass the token in the query string
    ws = WebSocket(s2.port, None, "/v1/ws?access_token=" + token("alice"))
    check(ws.status == 101 and ws.recv_json()["type"] == "hello")
    # unmasked client frames are a protocol error: close 1002
    ws.s.sendall(b"\x81\x02hi")
    op, data = _reply(ws, frame=True)
    check(op == 0x8 and data[:2] == b"\x03\xea", (op, data))
    ws.close()


# ---- TLS, operator comforts ------------------------------------------------------

def _make_certs(d, san="IP:127.0.0.1"):
    """A private CA and a server certificate it signed for san, under d."""
    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, env=child_env(), cwd=d)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "30",
            "-subj", "/CN=pgsync test CA")
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=pgsync test server")
    with open(os.path.join(d, "ext.cnf"), "w") as f:
        f.write(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "30", "-extfile", "ext.cnf")
    return {k: os.path.join(d, v) for k, v in
            {"ca": "ca.pem", "ca_key": "ca.key", "cert": "server.pem", "key": "server.key"}.items()}


def _tls_handshake(port, ca, lo, hi):
    """The TLS version a client limited to [lo, hi] negotiates, or None if refused."""
    import socket
    import ssl
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # TLS 1.1 is deprecated: the point
        ctx = tls_context(ca, lo, hi)
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")                # let OpenSSL offer TLS 1.1 at all
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            with ctx.wrap_socket(s, server_hostname="127.0.0.1") as t:
                return t.version()
    except (ssl.SSLError, OSError):
        return None


@test
def tls_end_to_end(env):
    import ssl
    from harness import free_port, _record_pid
    c = _make_certs(env.base)
    s = env.server(tls_cert=c["cert"], tls_key=c["key"], ca=c["ca"])
    check(s.url.startswith("https://"), s.url)
    st, h, b = http("GET", s.url + "/healthz", ca=c["ca"])
    check(st == 200 and json.loads(b)["postgres"] == "ok", (st, b))
    # two SQLite replicas over https, verifying the server with ca_file
    a = env.client("a", "alice", s, ca_file=c["ca"])
    b2 = env.client("b", "alice", s, ca_file=c["ca"])
    a.q("INSERT INTO items VALUES('t1', 'over tls', 1, 1.5)")
    a.sync()
    b2.sync()
    check(items(b2) == [("t1", "over tls", 1, 1.5)], items(b2))
    check(pg_items(env) == [("t1", "over tls", 1, 1.5)], pg_items(env))
    check(a.status()["last_error"] is None, a.status())
    # a long-poll over TLS is woken by a push
    t, out = run_bg(lambda: b2.one("SELECT sync_network_wait(5000)"))
    time.sleep(0.3)
    a.q("INSERT INTO items VALUES('t2', 'woken', 2, 0)")
    a.send()
    t.join(6)
    check(out.get("result") == "changes" and out["dt"] < 3, out)
    check(b2.one("SELECT name FROM items WHERE id = 't2'") == "woken")
    # WebSocket notifications over TLS (wss)
    ws = WebSocket(s.port, token("alice"), ssl_context=tls_context(c["ca"]))
    check(ws.status == 101 and ws.recv_json()["type"] == "hello", ws.head)
    a.q("INSERT INTO items VALUES('t3', 'ws', 3, 0)")
    a.send()
    check(ws.recv_json(timeout=3)["type"] == "changes")
    ws.close()
    # without the CA the client refuses the server, at once, and says what to do
    n = env.client("n", "alice", s)
    t0 = time.time()
    e = sql_error(lambda: n.sync())
    check("certificate" in e and "ca_file" in e and "attempt" not in e, e)
    check(time.time() - t0 < 2, time.time() - t0)
    check("ca_file" in n.status()["last_error"]["message"] and
          n.status()["last_error"]["code"] == "tls", n.status())
    # the host name is verified too: the certificate is for 127.0.0.1 only
    ln = Client(env, "l", token("alice"), url=f"https://localhost:{s.port}", ca_file=c["ca"])
    e = sql_error(lambda: ln.sync())
    check("certificate" in e and "localhost" in e, e)
    # a wrong ca_file is named as such
    bad = Client(env, "bad", token("alice"), server=s, ca_file=os.path.join(env.base, "missing.pem"))
    e = sql_error(lambda: bad.sync())
    check("ca_file" in e, e)
    # plain HTTP on the TLS port gets no answer
    p = Client(env, "p", token("alice"), url=f"http://127.0.0.1:{s.port}")
    p.q("INSERT INTO sync_network(key, value) VALUES ('retries', 0)")
    e = sql_error(lambda: p.sync())
    check("transfer failed" in e and "use an https:// url" in e, e)
    # TLS 1.2 and 1.3 are accepted, 1.1 is refused ...
    check(_tls_handshake(s.port, c["ca"], ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2) == "TLSv1.2")
    check(_tls_handshake(s.port, c["ca"], ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_3) == "TLSv1.3")
    check(_tls_handshake(s.port, c["ca"], ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1) is None)
    # ... by the server: the same client does get TLS 1.1 from a server that offers it
    port = free_port()
    o = subprocess.Popen(["openssl", "s_server", "-accept", str(port), "-cert", c["cert"], "-key", c["key"],
                          "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0", "-www", "-quiet"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env())
    env.procs.append(o)
    _record_pid(o.pid)
    got = None
    for _ in range(50):
        got = _tls_handshake(port, c["ca"], ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1)
        if got:
            break
        time.sleep(0.1)
    check(got == "TLSv1.1", got)
    # /metrics over https counts the requests like plain HTTP does
    st, h, b = http("GET", s.url + "/metrics", ca=c["ca"])
    check(st == 200 and b'pgsync_requests_total{endpoint="push",status="200"}' in b, b[:300])
    s.stop()
    check("listening on https://127.0.0.1" in open(s.log).read(), open(s.log).read()[-2000:])


def _run_server(args, env_=None, timeout=10):
    from harness import SERVER_BIN
    return subprocess.run([SERVER_BIN, *args], capture_output=True, text=True, timeout=timeout,
                          env=child_env(env_))


@test
def check_config(env):
    from harness import SECRET
    c = _make_certs(env.base)
    v = _run_server(["--version"])
    check(v.returncode == 0 and re.match(r"pgsync-server \d+\.\d+\.\d+ \(sync protocol 1\)", v.stdout), v)
    check("TLS available" in v.stdout, v.stdout)
    conf = os.path.join(env.base, "good.conf")
    base = (f"listen = 127.0.0.1\nport = 18443\n"
            f"database = host=127.0.0.1 port=1 dbname=app user=authenticator password=sekrit\n"
            f"jwt_secret = '{SECRET}'\nallowed_roles = app_user\n")
    with open(conf, "w") as f:
        f.write(base + f"tls_cert = {c['cert']}\ntls_key = {c['key']}\nlog_format = json\n")
    t0 = time.time()
    r = _run_server(["--config", conf, "--check-config", "--pool-size=3"])
    check(r.returncode == 0 and "configuration is valid" in r.stdout, (r.returncode, r.stdout, r.stderr))
    check(time.time() - t0 < 5, "--check-config must not wait for PostgreSQL")
    check("sekrit" not in r.stdout and SECRET not in r.stdout and "password=********" in r.stdout, r.stdout)
    check(re.search(r"pool_size\s+3\s+\(from the command line\)", r.stdout), r.stdout)
    check(re.search(r"tls_cert\s+\S+server\.pem\s+\(from \S+good\.conf:6\)", r.stdout), r.stdout)
    check('TLS 1.2+, certificate "CN=pgsync test server"' in r.stdout, r.stdout)
    # the example config as shipped is refused for its secret, and only for it
    example = os.path.join(ROOT, "server", "pgsync-server.conf.example")
    r = _run_server(["--config", example, "--check-config"])
    check(r.returncode == 2 and "is the example value" in r.stderr and "HINT:" in r.stderr, r.stderr)
    r = _run_server(["--config", example, "--check-config", "--jwt-secret=" + SECRET])
    check(r.returncode == 0, r.stderr)
    r = _run_server(["--config", example], {"PGSYNC_PORT": "1"})   # a real start is refused the same way
    check(r.returncode == 2 and "is the example value" in r.stderr, r.stderr)
    # bad configurations: exit status 2 and a message that names the setting or file
    other = _make_certs(tmpdir("pgsync-other-"))
    bad = {
        "colour = blue\n": 'unknown setting "colour"',
        "port = 99999\n": "for port",
        "log_format = xml\n": "for log_format",
        f"tls_cert = {c['cert']}\n": "but tls_key is not",
        f"tls_key = {c['key']}\n": "but tls_cert is not",
        f"tls_cert = {c['cert']}\ntls_key = {other['key']}\n": "is not the private key of tls_cert",
        f"tls_cert = {env.base}/nope.pem\ntls_key = {c['key']}\n": "could not read tls_cert",
        f"tls_cert = {c['key']}\ntls_key = {c['key']}\n": "holds no PEM certificate",
        "allowed_roles =\n": "allowed_roles is empty",
        "poll_ms = 10\n": "expected 0 (off) or at least 50",
        "no equals sign\n": "expected key = value",
    }
    for extra, want in bad.items():
        with open(conf, "w") as f:
            f.write(base + extra)
        r = _run_server(["--config", conf, "--check-config"])
        check(r.returncode == 2 and want in r.stderr, (extra, r.returncode, r.stderr))
    shutil.rmtree(os.path.dirname(other["ca"]), ignore_errors=True)
    with open(conf, "w") as f:
        f.write(base)
    r = _run_server(["--config", conf, "--check-config", "--poll-ms=0"])   # 0 = off, as documented
    check(r.returncode == 0 and re.search(r"poll_ms\s+0 ", r.stdout), r)
    r = _run_server(["--check-config", "--listen=127.0.0.1"])
    check(r.returncode == 2 and "no JWT key" in r.stderr, r.stderr)


def _request_lines(text, fmt):
    out = []
    for ln in text.splitlines():
        if fmt == "json":
            j = json.loads(ln)            # every line is one JSON object
            check({"ts", "level", "msg"} <= set(j), ln)
            if j["msg"] == "request":
                out.append(j)
        else:
            m = re.match(r"\S+Z (LOG|WARNING) request (\S+) (\S+)(.*)$", ln)
            if m:
                j = {"level": m[1], "method": m[2], "path": m[3]}
                for k, v1, v2 in re.findall(r' (\w+)=(?:"((?:[^"\\]|\\.)*)"|(\S+))', m[4]):
                    j[k] = json.loads(f'"{v1}"') if v1 else v2
                for k in ("status",):
                    j[k] = int(j[k])
                out.append(j)
    return out


@test
def request_log_lines(env):
    now = int(time.time())
    for fmt in ("text", "json"):
        s = env.server(f"log_{fmt}", log_requests="on", log_format=fmt)
        ok = {"Authorization": "Bearer " + token("alice")}
        old = {"Authorization": "Bearer " + jwt_hs256({"sub": "alice", "role": "app_user", "exp": now - 3600})}
        check(http("GET", s.url + "/v1/pull?since=0", headers=ok)[0] in (200, 204))
        check(http("GET", s.url + "/v1/pull?since=0", headers=old)[0] == 401)
        check(http("POST", s.url + "/v1/push", body=b"x" * 100, headers=ok)[0] == 400)
        check(http("GET", s.url + "/nope")[0] == 404)
        s.stop()
        lines = _request_lines(open(s.log).read(), fmt)
        # the four above, and the start-up wait's healthz (more than one when
        # the server was slow to answer the first)
        check(len([j for j in lines if j["path"] != "/healthz"]) == 4 and
              any(j["path"] == "/healthz" for j in lines), lines)
        by = {(j["path"], j["status"]): j for j in lines}
        pull = by[("/v1/pull", 200)] if ("/v1/pull", 200) in by else by[("/v1/pull", 204)]
        check(pull["method"] == "GET" and pull["route"] == "pull" and pull["role"] == "app_user"
              and pull["database"] == env.db and pull["client"] == "127.0.0.1" and "error" not in pull, pull)
        check(float(pull["ms"]) >= 0, pull)
        e = by[("/v1/pull", 401)]
        check(e["error"] == "token expired" and "expired" in e["detail"] and "role" not in e, e)
        e = by[("/v1/push", 400)]
        check(e["method"] == "POST" and e["error"] == "malformed payload" and e["role"] == "app_user", e)
        e = by[("/nope", 404)]
        check(e["route"] == "other" and e["error"] == "not found", e)
        if fmt == "json":
            check(isinstance(pull["status"], int) and isinstance(pull["ms"], (int, float)), pull)


def _dashboard_exprs(node, out):
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("expr", "query") and isinstance(v, str) and "pgsync_" in v:
                out.append(v)
            else:
                _dashboard_exprs(v, out)
    elif isinstance(node, list):
        for v in node:
            _dashboard_exprs(v, out)
    return out


def _dashboard_check(exprs, text, added):
    samples = {}                                   # name -> label names seen
    for ln in text.splitlines():
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})? ", ln)
        if m and not ln.startswith("#"):
            samples.setdefault(m[1], set()).update(re.findall(r'(\w+)="', m[2] or ""))
    used = set()
    for e in exprs:
        names = set(re.findall(r"\b(pgsync_[a-z0-9_]+)\b", e))
        check(names, e)
        for n in names:
            check(n in samples, f"dashboard queries {n}, which /metrics does not have: {e}")
        used |= names
        labels = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", e))
        for grp in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", e):
            labels |= {x.strip() for x in grp.split(",") if x.strip()}
        have = set().union(*(samples[n] for n in names))
        for lb in labels - added:
            check(lb in have, f"dashboard uses label {lb!r} that {sorted(names)} do not have: {e}")
    # and the dashboard shows every metric family the server exports
    families = set(re.findall(r"^# TYPE (\S+)", text, re.M))
    missing = {f for f in families if not any(u == f or u.startswith(f + "_") for u in used)}
    check(not missing, f"metrics not on the dashboard: {sorted(missing)}")


@test
def grafana_dashboard_metrics(env):
    """Every metric and label the dashboard in docs/ queries exists in /metrics:
    of a server with one database (no database label: Prometheus reads a missing
    label as empty, which the dashboard's database=~".*" matches) and of one
    with [database] sections (every series labelled by database)."""
    path = os.path.join(ROOT, "docs", "grafana-pgsync.json")
    with open(path) as f:
        dash = json.load(f)
    exprs = _dashboard_exprs(dash, [])
    check(len(exprs) >= 10, exprs)
    s = env.server()
    a = env.client("a", "alice", s)
    a.q("INSERT INTO items VALUES('g1', 'x', 1, 1)")
    a.sync()
    text = http("GET", s.url + "/metrics")[2].decode()
    # Prometheus adds the target's own labels; histogram_quantile's le is on the buckets
    _dashboard_check(exprs, text, {"instance", "job", "database"})
    check('database="' not in text, "one database: no database label, as before")
    other = env.extra_db()
    m = env.server("multi", conf=_two_db_conf(env, other))
    check(http("POST", m.url + "/db/one/v1/push", body=a.one("SELECT sync_payload(0)"),
               headers={"Authorization": "Bearer " + token("alice", db="one")})[0] == 200)
    text = _metrics_when(m, 'pgsync_requests_total{endpoint="push",status="200",database="one"} 1')
    _dashboard_check(exprs, text, {"instance", "job"})


def _metrics_when(s, line, timeout=3):
    """/metrics once it has line (a request is counted when its answer is sent)."""
    deadline = time.time() + timeout
    while True:
        text = http("GET", s.url + "/metrics")[2].decode()
        if line in text or time.time() > deadline:
            check(line in text, f"{line} not in /metrics:\n{text[:3000]}")
            return text
        time.sleep(0.05)


def _two_db_conf(env, other, claim="db", extra_one="", extra_two="", dsn_two=None):
    """A config with [database one] (the test's database) and [database two]."""
    return (f"database_claim = {claim}\n" if claim else "") + (
        f"[database one]\ndatabase = {env.pg.dsn(user='authenticator', db=env.db)}\n{extra_one}"
        f"[database two]\ndatabase = {dsn_two or env.pg.dsn(user='authenticator', db=other)}\n{extra_two}")


# ---- several databases behind one server ------------------------------------------

@test
def multi_database_routing(env):
    """Two [database] sections: chosen by the token's db claim or by /db/NAME/;
    data, tokens, WebSockets and metrics stay apart."""
    other = env.extra_db()
    # poll_ms 0: only NOTIFY wakes (versions are the cluster's transaction ids,
    # so a poll of two would also see a write to one, in the same cluster)
    s = env.server("multi", conf=_two_db_conf(env, other), poll_ms="0")
    t1, t2 = token("alice", db="one"), token("alice", db="two")
    a = Client(env, "a", t1, url=s.url)                 # /v1/..., the claim decides
    b = Client(env, "b", t2, url=s.url + "/db/two")     # the path decides (and the claim agrees)
    a.q("INSERT INTO items VALUES('one-1', 'a', 1, 1)")
    b.q("INSERT INTO items VALUES('two-1', 'b', 2, 2)")
    ra, rb = a.sync(), b.sync()
    check(ra["send"]["applied"] > 0 and rb["send"]["applied"] > 0, (ra, rb))
    check([r[0] for r in env.sql("SELECT id FROM items", fetch=True)] == ["one-1"])
    check([r[0] for r in env.pg.sql("SELECT id FROM items", db=other, fetch=True)] == ["two-1"])
    a.sync()
    b.sync()
    check([r[0] for r in a.q("SELECT id FROM items")] == ["one-1"], a.q("SELECT id FROM items"))
    check([r[0] for r in b.q("SELECT id FROM items")] == ["two-1"], b.q("SELECT id FROM items"))
    # a token of one database never opens the other, whatever the path says
    for path, tok, status, error in [
            ("/db/two/v1/pull?since=0", t1, 403, "token is for another database"),
            ("/v1/pull?since=0", token("alice"), 403, "token names no database"),
            ("/db/one/v1/pull?since=0", token("alice"), 403, "token names no database"),
            ("/v1/pull?since=0", token("alice", db="three"), 403, "unknown database"),
            ("/db/three/v1/pull?since=0", t1, 404, "unknown database"),
            ("/db/one", t1, 404, "unknown database")]:
        st, h, body = http("GET", s.url + path, headers={"Authorization": "Bearer " + tok})
        check(st == status and err_json(body)["error"] == error, (path, st, body))
    check(http("GET", s.url + "/db/one/v1/pull?since=0", headers={"Authorization": "Bearer " + t1})[0] == 200)
    # health: the server's at /healthz, each database's at /db/NAME/healthz
    st, h, body = http("GET", s.url + "/healthz")
    j = json.loads(body)
    check(st == 200 and j["status"] == "ok" and set(j["databases"]) == {"one", "two"}, j)
    st, h, body = http("GET", s.url + "/db/two/healthz")
    check(st == 200 and json.loads(body)["database"] == "two" and json.loads(body)["postgres"] == "ok", body)
    # WebSockets hear their own database only
    w2 = WebSocket(s.port, t2, path="/db/two/v1/ws")
    check(w2.status == 101 and w2.recv_json()["type"] == "hello")
    a.q("INSERT INTO items VALUES('one-2', 'a', 1, 1)")
    a.sync()
    try:
        msg = w2.recv_json(timeout=1.5)
        check(msg["type"] != "changes", f"database two's WebSocket heard a push to one: {msg}")
    except OSError:
        pass                                            # silence: right
    b.q("INSERT INTO items VALUES('two-2', 'b', 2, 2)")
    b.sync()
    check(w2.recv_json(timeout=5)["type"] == "changes")
    text = _metrics_when(s, 'pgsync_clients_connected{kind="websocket",database="two"} 1')
    check('pgsync_clients_connected{kind="websocket",database="one"} 0' in text, text)
    for name in ("one", "two"):   # two rows of 4 columns each
        check(f'pgsync_changes_applied_total{{database="{name}"}} 8' in text, text)
    w2.close()
    # without database_claim each database needs a key of its own: a token signed
    # for one is not accepted by the other
    k1, k2 = "k1-" + "x" * 40, "k2-" + "y" * 40
    s2 = env.server("keys", conf=_two_db_conf(env, other, claim=None, extra_one=f"jwt_secret = {k1}\n",
                                              extra_two=f"jwt_secret = {k2}\n"))
    claims = {"sub": "alice", "role": "app_user", "exp": int(time.time()) + 600}
    st1 = http("GET", s2.url + "/db/one/v1/pull?since=0", headers={"Authorization": "Bearer " + jwt_hs256(claims, k1)})[0]
    st2 = http("GET", s2.url + "/db/two/v1/pull?since=0", headers={"Authorization": "Bearer " + jwt_hs256(claims, k1)})[0]
    st, h, body = http("GET", s2.url + "/v1/pull?since=0", headers={"Authorization": "Bearer " + jwt_hs256(claims, k1)})
    check(st1 == 200 and st2 == 401 and st == 404 and err_json(body)["error"] == "which database?", (st1, st2, st, body))


def _round_ms(c, i):
    """One push and one pull of a SQLite client, in ms."""
    c.q("INSERT INTO items VALUES(?, 'lat', ?, 0)", f"r{i}-{time.time_ns()}", i)
    t0 = time.perf_counter()
    c.send()
    c.receive()
    return (time.perf_counter() - t0) * 1000


def _pg_pids(pg):
    with open(os.path.join(pg.data, "postmaster.pid")) as f:
        pm = int(f.readline())
    kids = subprocess.run(["pgrep", "-P", str(pm)], capture_output=True, text=True,
                          env=child_env()).stdout.split()
    return [pm] + [int(k) for k in kids]


@test
def multi_database_outage(env):
    """Database two's Postgres is blocked (SIGSTOP: its connections hang) under
    load, then down (stopped): database one keeps serving pushes and pulls
    within its normal latency, and two answers 503 instead of hanging."""
    pg2 = Postgres(tmpdir("pgsync-pg2-"))
    pg2.init()
    stopped = []
    try:
        other = env.extra_db(pg=pg2)
        # the cluster runs with synchronous_commit = off: make the schema survive
        # the immediate stop below
        pg2.sql("CHECKPOINT")
        conf = _two_db_conf(env, other, dsn_two=pg2.dsn(user="authenticator", db=other),
                            extra_two="pool_size = 4\npool_wait_ms = 1000\nmax_queue = 40\n")
        s = env.server("multi", conf=conf)
        a = Client(env, "a", token("alice", db="one"), url=s.url + "/db/one")
        b = Client(env, "b", token("bob", db="two"), url=s.url + "/db/two")
        a.sync()
        b.sync()
        base = sorted(_round_ms(a, i) for i in range(25))
        # two blocked, and 30 clients keep asking it
        stopped = _pg_pids(pg2)
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        statuses, stop_load = [], threading.Event()

        def load():
            tb = "Bearer " + token("bob", db="two")
            while not stop_load.is_set():
                try:
                    statuses.append(http("GET", s.url + "/db/two/v1/pull?since=0", timeout=15,
                                         headers={"Authorization": tb})[0])
                except OSError as e:
                    statuses.append(repr(e))
        threads = [threading.Thread(target=load, daemon=True) for _ in range(30)]
        for t in threads:
            t.start()
        time.sleep(1.5)                     # its workers hang, its queue fills
        blocked = sorted(_round_ms(a, 100 + i) for i in range(25))
        text = _metrics_when(s, 'pgsync_queued_requests{database="one"} 0')
        check(re.search(r'pgsync_queued_requests\{database="two"\} [1-9]', text), text)
        # the few requests Postgres was running when it stopped wait for it
        # (no client-side statement timeout): let it go on, then look
        stop_load.set()
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        stopped = []
        for t in threads:
            t.join(20)
        check(statuses.count(503) >= 10 and all(x in (200, 503) for x in statuses), statuses)
        # two down
        pg2.stop("immediate")
        down = sorted(_round_ms(a, 200 + i) for i in range(25))
        st, h, body = http("GET", s.url + "/db/two/v1/pull?since=0",
                           headers={"Authorization": "Bearer " + token("bob", db="two")})
        check(st == 503 and err_json(body)["error"] == "database unavailable", (st, body))
        deadline = time.time() + 5          # what the listener and the pool saw last
        while True:
            st, h, body = http("GET", s.url + "/healthz")
            j = json.loads(body)
            if j["status"] == "degraded" or time.time() > deadline:
                break
            time.sleep(0.1)
        check(st == 200 and j["status"] == "degraded" and j["databases"]["one"]["postgres"] == "ok"
              and j["databases"]["two"]["postgres"] == "down", j)
        med = lambda xs: xs[len(xs) // 2]   # noqa: E731
        print(f"  database one, push+pull ms (median/max): normal {med(base):.1f}/{base[-1]:.1f}, "
              f"two blocked {med(blocked):.1f}/{blocked[-1]:.1f}, two down {med(down):.1f}/{down[-1]:.1f}",
              flush=True)
        for name, xs in (("blocked", blocked), ("down", down)):
            check(med(xs) <= 3 * med(base) + 25 and xs[-1] <= 1500,   # a stall of the machine, not a wait for two (seconds)
                  f"database one slowed down while two was {name}: {xs} vs {base}")
        # two comes back by itself
        pg2.start()
        deadline = time.time() + 15
        while True:
            try:
                b.q("INSERT INTO items VALUES(?, 'back', 1, 1)", f"back{time.time_ns()}")
                if b.sync()["send"]["applied"] > 0:
                    break
            except sqlite3.Error:
                pass
            check(time.time() < deadline, "database two did not come back; its Postgres log:\n"
                  + open(pg2.log, errors="replace").read()[-3000:])
            time.sleep(0.3)
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        pg2.stop("immediate")
        shutil.rmtree(pg2.base, ignore_errors=True)


@test
def check_config_databases(env):
    """--check-config with [database] sections: what each database uses and
    where it came from; bad sections named with what to do."""
    from harness import SECRET
    conf = os.path.join(env.base, "multi.conf")
    top = (f"listen = 127.0.0.1\nport = 18444\njwt_secret = '{SECRET}'\nallowed_roles = app_user\n"
           f"pool_size = 3\n")
    good = top + ("database_claim = db\n[database eu]\ndatabase = host=127.0.0.1 dbname=eu user=a password=pw-secret-7Q\n"
                  "pool_size = 5\n[database us]\ndatabase = postgresql://a@127.0.0.1/us\n")
    with open(conf, "w") as f:
        f.write(good)
    r = _run_server(["--config", conf, "--check-config"])
    check(r.returncode == 0 and "configuration is valid" in r.stdout, (r.stdout, r.stderr))
    eu = r.stdout[r.stdout.index("[database eu]"):r.stdout.index("[database us]")]
    us = r.stdout[r.stdout.index("[database us]"):]
    check(re.search(r"pool_size\s+5\s+\(from \S+multi\.conf:9\)", eu), eu)
    check(re.search(r"pool_size\s+3\s+\(from \S+multi\.conf:5\)", us), us)     # from the top level
    check("password=********" in eu and "pw-secret-7Q" not in r.stdout, eu)
    check("/db/eu/v1/" in eu and "db claim names it" in eu, eu)
    bad = {
        top + "[database eu]\nport = 1\n": "is a setting of the whole server, not of [database eu]",
        top + "[tenant eu]\n": "unknown section [tenant eu]",
        top + "[database e/u]\n": 'invalid database name "e/u"',
        top + "database_claim = db\n[database eu]\n[database eu]\n": "[database eu] appears twice",
        top + "[database eu]\n[database us]\n": "accept tokens signed with the same key, and database_claim is not set",
        top + "database_claim = db\n[database eu]\n[database us]\nallowed_roles =\n": "[database us] allowed_roles is empty",
        top + "database_claim = db\n[database eu]\ndatabase = host='unterminated\n": "[database eu] database (from",
        top + "[database eu]\ncolour = blue\n": 'unknown setting "colour"',
        top + "[database eu\n": "expected [database NAME]",
    }
    for text, want in bad.items():
        with open(conf, "w") as f:
            f.write(text)
        r = _run_server(["--config", conf, "--check-config"])
        check(r.returncode == 2 and want in r.stderr, (text, r.returncode, r.stderr))
    # separate keys need no claim
    with open(conf, "w") as f:
        f.write(top + f"[database eu]\njwt_secret = {'e' * 40}\n[database us]\njwt_secret = {'u' * 40}\n")
    r = _run_server(["--config", conf, "--check-config"])
    check(r.returncode == 0, r.stderr)


# ---- fan-out ------------------------------------------------------------------------

def _settle(url, devices):
    """Devices [(token, site)] that are in sync: {site: cursor}. A device's
    first pull records it (a write, which moves every cursor), so all pull
    once, then again: the second pulls write nothing and end at one cursor."""
    for tok, site in devices:
        http("GET", f"{url}/v1/pull?since=0&exclude={site}", headers={"Authorization": "Bearer " + tok})
    deadline = time.time() + 15
    while True:   # a round that some xid (the listener's NOTIFY of a push) split: again
        out = {}
        for tok, site in devices:
            st, h, _ = http("GET", f"{url}/v1/pull?since=0&exclude={site}", headers={"Authorization": "Bearer " + tok})
            out[site] = h["x-pgsync-cursor"]
        if len(set(out.values())) == 1 or time.time() > deadline:
            return out


def _counter(text, name):
    m = re.search(rf"^{name} (\d+)$", text, re.M)
    return int(m[1]) if m else 0


@test
def fanout_shared_pulls(env):
    """One push wakes 60 parked devices of one token, the pusher's own parked
    device and a device of another user: the 60 are answered by one shared
    pull (each exactly what it would have pulled alone), the pusher gets
    nothing (its own change), the other user only what it may see."""
    s = env.server(pool_size="4")
    tok = token("fleet")
    writer = env.client("w", "fleet", s)
    writer.sync()
    own = writer.one("SELECT sync_site_id()")
    sites = [str(uuid.uuid4()) for _ in range(60)]
    stranger = str(uuid.uuid4())
    curs = _settle(s.url, [(tok, x) for x in sites + [own]] + [(token("stranger"), stranger)])
    devs = [(x, curs[x]) for x in sites]
    own_cur = curs[own]
    stranger = (stranger, curs[stranger])
    check(len(set(curs.values())) == 1, f"settled devices share one cursor: {set(curs.values())}")
    conns = []
    for site, cur in devs:
        c = RawHTTP(s.port)
        c.send(f"/v1/pull?since={cur}&exclude={site}&wait=15000", tok)   # parking 62 takes a while under valgrind
        conns.append(c)
    c = RawHTTP(s.port)
    c.send(f"/v1/pull?since={stranger[1]}&exclude={stranger[0]}&wait=15000", token("stranger"))
    conns.append(c)
    c = RawHTTP(s.port)
    c.send(f"/v1/pull?since={own_cur}&exclude={own}&wait=4000", tok)
    conns.append(c)   # read last: it waits the whole 4 s
    deadline = time.time() + 10
    while _counter(http("GET", s.url + "/metrics")[2].decode(), r'pgsync_clients_connected\{kind="longpoll"\}') < 62:
        check(time.time() < deadline, "the long-polls did not park")
        time.sleep(0.05)
    before = http("GET", s.url + "/metrics")[2].decode()
    writer.q("INSERT INTO items VALUES('fan', 'out', 1, 1)")
    writer.q("INSERT INTO notes VALUES('n-fleet', 'fleet', 'for the fleet')")
    t0 = time.time()
    writer.send()
    last = t0
    for c in conns:
        c.s.setblocking(True)
        c.s.settimeout(8)
        while not c.feed():
            c.s.setblocking(True)
        c.s.setblocking(False)
        if c.status == 200:
            last = max(last, time.time())
    dt = last - t0
    fleet, stranger_c, own_c = conns[:60], conns[60], conns[61]
    check(all(c.status == 200 for c in fleet), [c.status for c in fleet])
    check(len({c.body for c in fleet}) == 1, "one payload, computed once, for the 60")
    check(own_c.status == 204, f"the pusher's device must not get its own change back: {own_c.status}")
    check(stranger_c.status == 200 and stranger_c.body != fleet[0].body)
    info = lambda b: json.loads(writer.one("SELECT sync_payload_info(?)", b))   # noqa: E731
    rows = lambda j: sorted(str(g.get("pk")) for g in j.get("rows", j.get("groups", [])))  # noqa: E731
    fj, sj = info(fleet[0].body), info(stranger_c.body)
    check("n-fleet" in json.dumps(fj) and "fan" in json.dumps(fj), fj)
    check("n-fleet" not in json.dumps(sj) and "fan" in json.dumps(sj), sj)
    # exactly what one device pulls alone from the same cursor
    site, cur = devs[7]
    st, h, alone = http("GET", f"{s.url}/v1/pull?since={cur}&exclude={site}", headers={"Authorization": "Bearer " + tok})
    aj = info(alone)
    check(st == 200 and rows(aj) == rows(fj) and _same_pull(aj, fj), (aj, fj))
    after = _metrics_when(s, "pgsync_pulls_answered_total")
    computed = _counter(after, "pgsync_pulls_computed_total") - _counter(before, "pgsync_pulls_computed_total")
    answered = _counter(after, "pgsync_pulls_answered_total") - _counter(before, "pgsync_pulls_answered_total")
    print(f"  62 long-polls woken, the 61 with news answered in {dt * 1000:.0f} ms: {computed} pulls "
          f"computed, {answered} answered", flush=True)
    check(answered >= 62 and computed <= 12, (computed, answered))
    for c in conns:
        c.s.close()


def _ws_next(ws, timeout=5):
    """The next message of a subscription: a dict, or (meta, payload bytes) for a payload."""
    m = ws.recv_json(timeout)
    if m.get("type") != "payload":
        return m
    op, data = ws.recv(timeout)
    check(op == 2 and len(data) == m["bytes"], (op, len(data), m))
    return m, data


def _cursor_at_most(a, b):
    """Cursor a is at or below cursor b, of one generation. A cursor is the
    snapshot's xmin - 1, so any transaction that takes an xid meanwhile (an
    autoanalyze of the table just written, a device's first pull) moves a
    later pull's cursor on with no rows: the rows are what must agree."""
    (va, _, ga), (vb, _, gb) = a.partition("."), b.partition(".")
    return ga == gb and int(va) <= int(vb)


def _same_pull(a, b):
    """Two pulls (sync_payload_info) carry the same changes. Their since and
    until may differ: a shared pull that a version announce woke with nothing
    new moved its waiters' since on (to the until of that empty pull), and
    any xid taken between two pulls moves the later one's until."""
    a, b = json.loads(json.dumps(a)), json.loads(json.dumps(b))
    for j in (a, b):
        for d in (j, j.get("header", {})):
            d.pop("until", None)
            d.pop("since", None)
    return a == b


def _rows(j):
    """A payload's rows (sync_payload_info), in a stable order."""
    return sorted((json.dumps(r, sort_keys=True) for r in j.get("rows", [])))


def _ws_message(ws, timeout=5):
    """The next message of a subscription that is not a payload (payloads
    already on their way are read past)."""
    m = _ws_next(ws, timeout)
    while isinstance(m, tuple):
        m = _ws_next(ws, timeout)
    return m


def _metric(s, name):
    """The value of counter name in s's /metrics now."""
    return _counter(http("GET", s.url + "/metrics")[2].decode(), name)


def _ws_quiet(ws, seconds):
    """Nothing but pings comes on ws for `seconds`."""
    try:
        op, data = ws.recv(timeout=seconds)
    except (TimeoutError, OSError):
        return True
    return op in (0x9, 0xA) and _ws_quiet(ws, seconds)


def _reply(ws, timeout=5, frame=False):
    """The server's next answer on ws: a "changes" notification may come
    before it at any time on a socket that is not subscribed (a push that
    committed just before; under valgrind, often). frame: the raw (opcode,
    data) of a non-text answer, such as a pong."""
    while True:
        op, data = ws.recv(timeout)
        if op == 0x1 and json.loads(data).get("type") == "changes":
            continue
        if frame:
            return op, data
        if op == 0x1:
            return json.loads(data)


@test
def websocket_subscriptions(env):
    """A WebSocket that subscribes gets the payloads themselves: exactly the
    pull its device would make from the same cursor (RLS, its own changes
    left out), shared by the subscribers of one view, chunked when asked,
    and a clear error frame for every bad message or failed pull."""
    s = env.server(pool_size="4")
    tok = token("fleet")
    writer = env.client("w", "fleet", s)
    writer.q("INSERT INTO items VALUES('seed', 'x', 1, 1)")
    writer.sync()
    own = writer.one("SELECT sync_site_id()")
    sites = [str(uuid.uuid4()) for _ in range(20)]
    stranger = str(uuid.uuid4())
    curs = _settle(s.url, [(tok, x) for x in sites + [own]] + [(token("stranger"), stranger)])
    check(len(set(curs.values())) == 1, curs)
    cur0 = curs[own]

    # bad messages: an error frame each, and the socket stays open
    ws = WebSocket(s.port, tok)
    ws.recv_json()
    for msg, err in ((b"hello", "bad message"), (b'{"type": "dance"}', "unknown message type"),
                     (b'{"type": "subscribe", "since": "nope"}', "bad cursor"),
                     (b'{"type": "subscribe", "since": 7}', "bad cursor"),
                     (b'{"type": "subscribe", "exclude": "xyz"}', "bad site id"),
                     (b'{"type": "subscribe", "max_rows": 0}', "bad max_rows")):
        ws.send(0x1, msg)
        m = _reply(ws)
        check(m["type"] == "error" and m["status"] == 400 and m["error"] == err and m["hint"] and m["detail"],
              (msg, m))
    body = b'{"type": "sub'   # the first fragment of a text message (FIN clear), masked
    mask = os.urandom(4)
    ws.s.sendall(bytes([0x01, 0x80 | len(body)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(body)))
    m = _reply(ws)
    check(m["type"] == "error" and m["error"] == "fragmented message" and m["status"] == 400, m)
    ws.send(0x9, b"still here")
    check(_reply(ws, frame=True) == (0xA, b"still here"))
    # a device that is another user's: the pull's own 403, and the subscription ends
    ws.send(0x1, json.dumps({"type": "subscribe", "since": cur0, "exclude": stranger}).encode())
    check(_reply(ws)["type"] == "subscribed")
    st, _, body = http("GET", f"{s.url}/v1/pull?since={cur0}&exclude={stranger}", headers={"Authorization": "Bearer " + tok})
    m = _reply(ws)
    check(m["type"] == "error" and m["status"] == st and m["error"] == json.loads(body)["error"], (m, st, body))
    ws.close()

    def subscriber(tk, site, since=None, **extra):
        w = WebSocket(s.port, tk)
        w.recv_json()
        w.send(0x1, json.dumps(dict({"type": "subscribe", "since": since or curs[site], "exclude": site}, **extra)).encode())
        check(_reply(w)["type"] == "subscribed")
        return w

    fleet = [subscriber(tok, x) for x in sites]
    other = subscriber(token("stranger"), stranger)
    mine = subscriber(tok, own)
    check(_ws_quiet(fleet[0], 0.3), "caught up: nothing to send")
    before = http("GET", s.url + "/metrics")[2].decode()
    writer.q("INSERT INTO items VALUES('fan', 'out', 1, 1)")
    writer.q("INSERT INTO notes VALUES('n-fleet', 'fleet', 'for the fleet')")
    writer.send()
    got = [_ws_next(w) for w in fleet]
    check(all(isinstance(g, tuple) for g in got), got[:2])
    check(len({g[1] for g in got}) == 1 and len({g[0]["cursor"] for g in got}) == 1, "one payload for the fleet")
    meta, payload = got[0]
    check(meta["more"] is False, meta)
    info = lambda b: json.loads(writer.one("SELECT sync_payload_info(?)", b))   # noqa: E731
    # exactly what one of them pulls alone from the same cursor
    st, h, alone = http("GET", f"{s.url}/v1/pull?since={cur0}&exclude={sites[3]}", headers={"Authorization": "Bearer " + tok})
    fj, aj = info(payload), info(alone)
    check(st == 200 and _same_pull(fj, aj) and _cursor_at_most(meta["cursor"], h["x-pgsync-cursor"]),
          (fj, aj, meta, h))
    check("n-fleet" in json.dumps(fj) and "fan" in json.dumps(fj), fj)
    om, op_ = _ws_next(other)
    oj = json.dumps(info(op_))
    check("fan" in oj and "n-fleet" not in oj, oj)
    check(_ws_quiet(mine, 0.5), "the pusher's own device gets nothing back")
    after = _metrics_when(s, "pgsync_pulls_computed_total")
    computed = _counter(after, "pgsync_pulls_computed_total") - _counter(before, "pgsync_pulls_computed_total")
    print(f"  22 subscribers: {computed} pulls computed", flush=True)
    check(computed <= 10, computed)

    # the subscription goes on from its cursor: the next push, only what is new
    writer.q("UPDATE items SET name = 'again' WHERE id = 'fan'")
    writer.send()
    m2, p2 = _ws_next(fleet[5])
    j2 = json.dumps(info(p2))
    check("again" in j2 and "n-fleet" not in j2, j2)
    env.sql("SELECT pg_current_xact_id()")   # a transaction that takes an xid and writes no row
    st, h, p2alone = http("GET", f"{s.url}/v1/pull?since={meta['cursor']}&exclude={sites[5]}", headers={"Authorization": "Bearer " + tok})
    check(st == 200 and _rows(info(p2)) == _rows(info(p2alone)) and _cursor_at_most(m2["cursor"], h["x-pgsync-cursor"]),
          (m2, h))
    # and nothing between the two cursors is skipped: from m2's, no rows
    st, _, rest = http("GET", f"{s.url}/v1/pull?since={m2['cursor']}&exclude={sites[5]}", headers={"Authorization": "Bearer " + tok})
    check(st == 204 or (st == 200 and _rows(info(rest)) == []), (st, rest[:200]))
    # a payload above 64 KiB (a frame with a 64-bit length), read slowly
    writer.q("INSERT INTO items VALUES('big', ?, 1, 1)", os.urandom(200000).hex())
    writer.send()
    time.sleep(0.5)
    m3, p3 = _ws_next(fleet[5])
    check(m3["bytes"] > 65535 and "big" in json.dumps(info(p3)), m3)

    # chunked: from 0, one row per payload, then the last with more = false
    w = subscriber(tok, sites[0], since="0", max_rows=1)
    chunks = []
    while True:
        m, p = _ws_next(w)
        chunks.append(p)
        if not m["more"]:
            break
        check(len(chunks) < 50, "too many chunks")
    rows = sorted(str(r.get("pk")) for c in chunks for r in info(c).get("rows", []))
    whole = info(http("GET", f"{s.url}/v1/pull?since=0&exclude={sites[0]}", headers={"Authorization": "Bearer " + tok})[2])
    check(len(chunks) >= 3 and rows == sorted(str(r.get("pk")) for r in whole.get("rows", [])), (len(chunks), rows))
    w.close()

    # subscribing again replaces the subscription: from 0 now, chunked
    w = subscriber(tok, sites[12])
    w.send(0x1, json.dumps({"type": "subscribe", "since": "0", "exclude": sites[12], "max_rows": 1}).encode())
    for _ in range(5):
        m = _ws_next(w)
        if isinstance(m, tuple) and "rows_total" in m[0]:
            break
    check(isinstance(m, tuple) and m[0]["more"] and m[0]["rows_total"] >= 3, m)
    w.close()
    # unsubscribed: back to "changes" notifications
    fleet[1].send(0x1, b'{"type": "unsubscribe"}')
    m = _ws_message(fleet[1])   # past the payloads of the pushes above, sent before
    check(m["type"] == "unsubscribed", m)
    writer.q("INSERT INTO items VALUES('later', 'x', 1, 1)")
    writer.send()
    check(fleet[1].recv_json()["type"] == "changes")
    check(isinstance(_ws_next(fleet[2]), tuple))
    for w in fleet + [other, mine]:
        w.close()
    # a slow reader: a payload of ~0.6 MB sent from the shared answer while the
    # client reads nothing; the ping queued meanwhile comes after it, the
    # payload whole (Linux's socket buffers may take it all: the server's wait
    # for a full socket is not forced here)
    s3 = env.server("s3", ws_ping_s="2")   # silent peers go after 6 s
    slow = WebSocket(s3.port, tok)
    slow.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
    slow.recv_json()
    slow.send(0x1, json.dumps({"type": "subscribe", "since": h["x-pgsync-cursor"], "exclude": sites[11]}).encode())
    check(_reply(slow)["type"] == "subscribed")
    _ws_next(slow)   # the catch-up: the big row above
    writer.q("INSERT INTO items VALUES('bigger', ?, 1, 1)", os.urandom(600000).hex())
    writer.send()
    # an unsolicited pong (RFC 6455, 5.5.3) counts as the client's sign of
    # life: the 6 s of silence after which the server drops a peer start now,
    # not at the subscribe (the push of 1.2 MB takes seconds under valgrind)
    slow.send(0xA, b"")
    time.sleep(3)    # reading nothing meanwhile: a ping follows the payload
    m4, p4 = _ws_next(slow, timeout=10)
    check(m4["bytes"] > 500000 and "bigger" in json.dumps(info(p4)), m4)
    op, _ = slow.recv(timeout=5)
    check(op == 0x9, f"a ping after the payload, got opcode {op}")
    slow.close()
    s3.stop()
    # a token that expires ends its socket (close 4001): no payload after exp
    s2 = env.server("s2", jwt_leeway="0")
    w = WebSocket(s2.port, token("fleet", ttl=5))   # the upgrade and the subscribe inside the 4-5 s
    w.recv_json()
    w.send(0x1, json.dumps({"type": "subscribe", "since": meta["cursor"], "exclude": sites[9]}).encode())
    check(_reply(w)["type"] == "subscribed")
    while True:
        op, data = w.recv(timeout=10)
        if op == 8:
            break
        check(op in (1, 2, 9), op)
    check(data[:2] == (4001).to_bytes(2, "big"), data)
    s2.stop()
    # sockets that go while their pull runs (chunks from 0, one row each)
    for i in range(10):
        w = WebSocket(s.port, tok)
        w.send(0x1, json.dumps({"type": "subscribe", "since": "0", "exclude": sites[i], "max_rows": 1}).encode())
        if i % 2:
            time.sleep(0.01 * i)
        w.s.close()
    _metrics_when(s, 'pgsync_clients_connected{kind="websocket"} 0\n', timeout=15)
    check(s.proc.poll() is None, "the server died")


def _tcp_send_queue(local_port, remote_port):
    """Bytes queued to send on the loopback socket local_port -> remote_port
    (/proc/net/tcp's tx_queue), or None when there is no such socket."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            loc, rem, queues = parts[1], parts[2], parts[4]
            if (int(loc.split(":")[1], 16) == local_port and int(rem.split(":")[1], 16) == remote_port):
                return int(queues.split(":")[0], 16)
    return None


@test
def websocket_full_socket(env):
    """A subscriber that reads nothing while a payload larger than the
    kernel's socket buffers is sent (6 MB; Linux lets a send buffer grow to
    4 MB by default): the server's writes find the socket full, it waits for
    the socket to drain without holding up anyone else, and the payload
    arrives whole once the client reads (docs/PROTOCOL.md, flow control)."""
    s = env.server()
    tok = token("fleet")
    writer = env.client("w", "fleet", s)
    writer.q("INSERT INTO items VALUES('seed', 'x', 1, 1)")
    writer.sync()
    site = str(uuid.uuid4())
    cur = _settle(s.url, [(tok, site)])[site]
    slow = WebSocket(s.port, tok)
    # 256 KiB (Linux doubles it): with the server's 4 MB the kernel holds
    # 4.5 MB of the 6 at most, and reading later is not held to a tiny window
    slow.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 << 10)
    slow.recv_json()
    slow.send(0x1, json.dumps({"type": "subscribe", "since": cur, "exclude": site}).encode())
    check(_reply(slow)["type"] == "subscribed")
    # more than the kernel can hold: the send buffer's limit (net.ipv4.tcp_wmem,
    # 4 MB by default) and the receive buffer; hex text, which zstd halves
    with open("/proc/sys/net/ipv4/tcp_wmem") as f:
        wmem_max = int(f.read().split()[2])
    size = max(6_000_000, wmem_max + 2_000_000)
    writer.q("INSERT INTO items VALUES('huge', ?, 1, 1)", os.urandom(size).hex())
    writer.send()
    me = slow.s.getsockname()[1]
    deadline = time.time() + 30
    while (_tcp_send_queue(s.port, me) or 0) < 1_000_000:   # the server's side is full
        check(time.time() < deadline, f"the server never filled the socket: {_tcp_send_queue(s.port, me)}")
        time.sleep(0.05)
    # meanwhile others are served: a WebSocket's ping, a pull
    other = WebSocket(s.port, tok)
    other.recv_json()
    other.send(0x9, b"alive")
    check(_reply(other, frame=True) == (0xA, b"alive"), "a ping answered while one socket is full")
    st, _, _ = http("GET", f"{s.url}/v1/pull?since=0&exclude={uuid.uuid4()}", headers={"Authorization": "Bearer " + tok})
    check(st == 200, st)
    other.close()
    queued = _tcp_send_queue(s.port, me)
    m, p = _ws_next(slow, timeout=60)
    info = json.loads(writer.one("SELECT sync_payload_info(?)", p))
    check(m["bytes"] >= size and len(p) == m["bytes"] and
          [r["key"] for r in info["rows"]] == [["huge"]], (m, queued))
    print(f"  a {m['bytes']:,}-byte payload to a reader of nothing: {queued:,} bytes queued in the "
          f"kernel, the rest waited in the server; whole once read", flush=True)
    slow.close()


@test
def websocket_subscribe_rate_limit(env):
    """A subscribe costs a pull: it takes from the token's bucket like a
    request. Past the burst it gets an error 429 with retry_after and the
    standing subscription goes on unchanged; after the wait it works again."""
    s = env.server(rate_limit="1", rate_burst="3")
    writer = env.client("w", "fleet", s)
    writer.q("INSERT INTO items VALUES('rl0', 'x', 1, 1)")
    writer.sync()
    site = str(uuid.uuid4())
    ws = WebSocket(s.port, token("watcher"))    # its own bucket; the upgrade takes one token
    ws.recv_json()
    sub = json.dumps({"type": "subscribe", "since": "0", "exclude": site}).encode()
    answers = []
    for _ in range(6):
        ws.send(0x1, sub)
        answers.append(_ws_message(ws))         # past catch-up payloads of earlier subscribes
    kinds = [m["type"] for m in answers]
    check(kinds.count("subscribed") >= 1 and kinds[-1] == "error", kinds)
    e = answers[-1]
    check(e["status"] == 429 and e["error"] == "rate limit exceeded" and e["retry_after"] >= 1
          and "unchanged" in e["detail"] and e["hint"], e)
    check(_metric(s, "pgsync_rate_limited_total") >= 1)
    # the standing subscription still delivers
    before = _metric(s, "pgsync_websocket_payloads_total")
    writer.q("INSERT INTO items VALUES('rl1', 'y', 1, 1)")
    writer.send()
    m = _ws_next(ws)
    while not (isinstance(m, tuple) and "rl1" in json.dumps(json.loads(writer.one("SELECT sync_payload_info(?)", m[1])))):
        m = _ws_next(ws)
    deadline = time.time() + 5   # counted once the payload's frames are queued
    while _metric(s, "pgsync_websocket_payloads_total") <= before:
        check(time.time() < deadline, "pgsync_websocket_payloads_total did not count the payload")
        time.sleep(0.05)
    # after the wait a subscribe is taken again
    time.sleep(e["retry_after"] + 0.2)
    ws.send(0x1, sub)
    m = _ws_message(ws)
    check(m["type"] == "subscribed", m)
    ws.close()


@test
def pull_group_exact(env):
    """sync_pull_group against sync_pull in one snapshot: a served device's
    payload is byte for byte its own pull; a device whose change is in the
    payload, one with a stale generation and another principal's are not served."""
    import psycopg2
    s = env.server()
    tok = token("fleet")
    clients = [env.client(f"c{i}", "fleet", s) for i in range(3)]
    for c in clients:
        c.sync()
    sites = [c.one("SELECT sync_site_id()") for c in clients] + [str(uuid.uuid4()) for _ in range(3)]
    foreign = str(uuid.uuid4())
    curs = _settle(s.url, [(tok, x) for x in sites] + [(token("stranger"), foreign)])
    check(len(set(curs.values())) == 1, curs)
    since, gen = (int(x) for x in curs[sites[0]].split("."))
    env.sql("INSERT INTO items VALUES('direct', 'sql', 1, 1)")   # by the server's own site
    clients[1].q("INSERT INTO items VALUES('dev1', 'c1', 2, 2)")
    # the server NOTIFYs after the push's commit, in a transaction of its own:
    # wait for it, so that no transaction runs between the pulls compared below
    lc = psycopg2.connect(env.pg.dsn(db=env.db))
    lc.autocommit = True
    lc.cursor().execute("LISTEN pgsync_changes")
    clients[1].send()                                          # by sites[1]
    deadline = time.time() + 10
    while not lc.notifies and time.time() < deadline:
        select.select([lc], [], [], 0.2)
        lc.poll()
    check(lc.notifies, "the push was notified")
    lc.close()
    claims = json.dumps({"sub": "fleet", "role": "app_user"})
    c = psycopg2.connect(env.pg.dsn(user="authenticator", db=env.db))
    try:
        cur = c.cursor()

        def begin(device):
            cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            cur.execute("SELECT sync_device(%s, 'fleet')", (device,))
            cur.execute("SET LOCAL ROLE app_user")
            cur.execute("SELECT set_config('request.jwt.claims', %s, true)", (claims,))
        # a pull records the device's cursor (pgsync.devices.acked, the GC
        # horizon) when it moved: a write, which moves the versions. One pull
        # per device first, so that the pulls compared below write nothing.
        for site in sites:
            begin(site)
            cur.execute("SELECT until FROM sync_pull(%s, 0, NULL, %s)", (since, gen))
            c.commit()
        devices = sites + [foreign]
        gens = [gen] * len(devices)
        for _ in range(10):
            begin(sites[0])
            cur.execute("SELECT payload, until, served FROM sync_pull_group(%s, 0, %s, %s::uuid[])",
                        (since, gen, devices))
            payload, until, served = cur.fetchone()
            c.commit()
            check(served == [True, False, True, True, True, True, False], served)
            pulls = []
            for site, ok in zip(devices, served):
                if ok:
                    begin(site)
                    cur.execute("SELECT payload, until, gen FROM sync_pull(%s, 0, NULL, %s)", (since, gen))
                    pulls.append((site,) + cur.fetchone())
                    c.commit()
            # the payload holds its until: a transaction anywhere in the
            # cluster between the pulls (one that took an xid) moves it, and
            # then the round is compared again
            stable = all(u1 == until for _, _, u1, _ in pulls)
            if stable:
                break
        check(stable, "ten rounds of pulls, each with a transaction between its pulls")
        for site, p1, u1, g1 in pulls:
            check(bytes(p1) == bytes(payload) and u1 == until and g1 == gens[0], (site, u1, until, g1))
        # a stale generation: a snapshot of every table is due, no sharing
        begin(sites[0])
        cur.execute("SELECT served FROM sync_pull_group(%s, 0, %s, %s::uuid[])", (since, gen + 1, devices))
        check(cur.fetchone()[0] == [False] * len(devices))
        c.commit()
        # only the server may bind devices: without sync_device it refuses
        cur.execute("BEGIN")
        cur.execute("SET LOCAL ROLE app_user")
        try:
            cur.execute("SELECT * FROM sync_pull_group(0, 0, 0, %s::uuid[])", (devices,))
            check(False, "sync_pull_group ran without sync_device")
        except psycopg2.Error as e:
            check("needs the principal bound by sync_device" in str(e), str(e))
        c.rollback()
    finally:
        c.close()


@test
def rls_push_and_pull(env):
    s = env.server()
    a = env.client("a", "alice", s)
    b = env.client("b", "bob", s)
    a.q("INSERT INTO notes VALUES('n1', 'alice', 'mine')")
    a.q("INSERT INTO notes VALUES('n2', 'bob', 'forged')")   # RLS WITH CHECK refuses
    a.q("INSERT INTO items VALUES('shared', 'ok', 1, 1)")
    r = a.send()
    check(r["rejected"] == 1, r)
    rej = a.q("SELECT tbl, pk, code FROM sync_network_rejected")
    check(len(rej) == 1 and rej[0][0] == "notes" and "n2" in rej[0][1] and rej[0][2] == "42501", rej)
    check(env.sql("SELECT id FROM notes ORDER BY id", fetch=True) == [("n1",)])
    check(env.sql("SELECT count(*) FROM items", fetch=True)[0][0] == 1, "the rest still flows")
    check(a.status()["rejected"] == 1)
    b.q("INSERT INTO notes VALUES('n3', 'bob', 'bobs')")
    b.sync()
    a.sync()
    env.sql("INSERT INTO notes VALUES('n4', 'alice', 'written in postgres')")
    a.sync()
    b.sync()
    check(sorted(r[0] for r in a.q("SELECT id FROM notes")) == ["n1", "n2", "n4"])  # n2: local only
    check(sorted(r[0] for r in b.q("SELECT id FROM notes")) == ["n3"], b.q("SELECT * FROM notes"))
    check(b.one("SELECT count(*) FROM items") == 1, "bob still gets the unrestricted table")
    # bob cannot change alice's note, even knowing its key
    b.q("INSERT INTO notes VALUES('n1', 'bob', 'hijack')")
    r = b.send()
    check(r["rejected"] == 1, r)
    check(env.sql("SELECT owner, body FROM notes WHERE id = 'n1'", fetch=True) == [("alice", "mine")])
    # a raw pull as bob, applied to an empty replica, holds nothing of alice's
    st, h, body = http("GET", s.url + "/v1/pull?since=0", headers={"Authorization": "Bearer " + token("bob")})
    check(st == 200, st)
    e = env.client("empty", "bob")
    e.q("SELECT sync_apply_payload(?)", body)
    check(e.q("SELECT id, owner FROM notes") == [("n3", "bob")], e.q("SELECT * FROM notes"))
    info = json.loads(e.one("SELECT sync_payload_info(?)", body))
    check("alice" not in json.dumps(info), info)


@test
def rls_pull_key_types(env):
    """The pull filter casts keys back to their column types: int, uuid, bytea, composite."""
    env.sql("""
      CREATE TABLE t_int(id bigint PRIMARY KEY, owner text, v text);
      CREATE TABLE t_uuid(id uuid PRIMARY KEY, owner text, v text);
      CREATE TABLE t_blob(id bytea PRIMARY KEY, owner text, v text);
      CREATE TABLE t_pair(a text, b integer, owner text, v text, PRIMARY KEY (a, b));
    """)
    for t in ("t_int", "t_uuid", "t_blob", "t_pair"):
        env.sql(f"SELECT sync_init('{t}'); ALTER TABLE {t} ENABLE ROW LEVEL SECURITY; "
                f"CREATE POLICY p ON {t} USING (owner = current_setting('request.jwt.claims', true)::json->>'sub'); "
                f"GRANT ALL ON {t} TO app_user")
    env.sql("""
      INSERT INTO t_int VALUES (1, 'alice', 'a1'), (2, 'bob', 'b2'), (-3, 'alice', 'a3');
      INSERT INTO t_uuid VALUES ('0190d6c4-0000-7000-8000-000000000001', 'alice', 'a'),
                                ('0190d6c4-0000-7000-8000-000000000002', 'bob', 'b');
      INSERT INTO t_blob VALUES ('\\x00ff', 'alice', 'a'), ('\\x0102', 'bob', 'b');
      INSERT INTO t_pair VALUES ('x', 1, 'alice', 'a'), ('x', 2, 'bob', 'b'), ('y"\\', 1, 'alice', 'q');
    """)
    s = env.server()
    c = env.client("c", "alice", s)
    c.db.executescript("""
      CREATE TABLE t_int(id INTEGER PRIMARY KEY, owner TEXT, v TEXT) WITHOUT ROWID;
      CREATE TABLE t_uuid(id TEXT PRIMARY KEY, owner TEXT, v TEXT);
      CREATE TABLE t_blob(id BLOB PRIMARY KEY, owner TEXT, v TEXT);
      CREATE TABLE t_pair(a TEXT, b INTEGER, owner TEXT, v TEXT, PRIMARY KEY (a, b));
    """)
    for t in ("t_int", "t_uuid", "t_blob", "t_pair"):
        c.q(f"SELECT sync_init('{t}')")
    c.receive()
    for t in ("t_int", "t_uuid", "t_blob", "t_pair"):
        owners = {r[0] for r in c.q(f"SELECT owner FROM {t}")}
        want = env.sql(f"SELECT count(*) FROM {t} WHERE owner = 'alice'", fetch=True)[0][0]
        check(owners == {"alice"} and c.one(f"SELECT count(*) FROM {t}") == want, (t, c.q(f"SELECT * FROM {t}")))


# ---- resilience ------------------------------------------------------------------

@test
def offline_then_online(env):
    s = Server(env, "s1")                      # not started: the device is offline
    a = Client(env, "a", token("alice"), s)
    a.q("INSERT INTO items VALUES('o1', 'offline', 1, 1)")
    t0 = time.time()
    e = sql_error(lambda: a.sync())
    check(time.time() - t0 < 1.0, "offline must fail fast")
    check("server unreachable" in e and "Nothing was lost" in e, e)
    st = a.status()
    check(st["pending_rows"] == 1 and st["failures"] == 1 and "unreachable" in st["last_error"]["message"] and
          st["last_error"]["code"] == "offline" and st["pending"] == {"rows": 1, "by_table": {"items": 1}}, st)
    s.start()
    a.q("INSERT INTO items VALUES('o2', 'offline', 2, 2)")
    a.sync()
    check(pg_items(env) == items(a) and a.status()["pending_rows"] == 0 and a.status()["last_error"] is None)
    # a restarted app resumes from its stored cursors
    a.close()
    a2 = Client(env, "a", None, None)
    check(a2.status()["send_cursor"] > 0)
    a2.q("INSERT INTO items VALUES('o3', 'after restart', 3, 3)")
    r = a2.sync()
    check(0 < r["send"]["sent_bytes"] < 200 and r["receive"]["payloads"] == 0, r)
    check(pg_items(env) == items(a2))


@test
def transient_errors_retry(env):
    s = env.server()
    p = Proxy(s.port, mode="http503", count=2)
    a = Client(env, "a", token("alice"), Server(env, "via-proxy"))
    a.q("UPDATE sync_network SET value = ? WHERE key = 'url'", p.url)
    a.q("INSERT INTO items VALUES('t1', 'retry', 1, 1)")
    r = a.send()
    check(r["applied"] > 0 and p.connections >= 3, (r, p.connections))
    check(pg_items(env) == items(a))
    p.close()
    p = Proxy(s.port, mode="http503", count=10)  # more failures than retries
    a.q("UPDATE sync_network SET value = ? WHERE key = 'url'", p.url)
    a.q("INSERT INTO items VALUES('t2', 'retry', 2, 2)")
    e = sql_error(lambda: a.send())
    check("503" in e and "attempts" in e, e)
    p.count = 0
    a.send()
    check(pg_items(env) == items(a))
    p.close()


@test
def lost_push_answer_is_resent(env):
    s = env.server()
    p = Proxy(s.port, mode="drop_resp")
    a = Client(env, "a", token("alice"), Server(env, "via-proxy"))
    a.q("UPDATE sync_network SET value = ? WHERE key = 'url'", p.url)
    a.q("UPDATE sync_network SET value = 0 WHERE key = 'retries'")
    for i in range(50):
        a.q("INSERT INTO items VALUES(?, 'lost', ?, 0.5)", f"l{i}", i)
    before = a.status()["send_cursor"]
    e = sql_error(lambda: a.send())
    check("transfer failed" in e, e)
    check(env.sql("SELECT count(*) FROM items", fetch=True)[0][0] == 50, "the server did apply it")
    check(a.status()["send_cursor"] == before and a.status()["pending_rows"] == 50)
    p.mode = "pass"
    r = a.send()                              # the same changes again
    check(r["applied"] == 0 and r["rejected"] == 0, r)
    check(a.status()["pending_rows"] == 0)
    check(pg_items(env) == items(a))
    p.close()


def _bulk(c, n, tag):
    c.q("BEGIN")
    for i in range(n):
        c.q("INSERT OR REPLACE INTO items VALUES(?, ?, ?, ?)", f"b{i:05}", f"{tag} {i}", i, i / 3)
    c.q("COMMIT")


@test
def kill9_during_push(env):
    s = env.server()
    a = env.client("a", "alice", s)
    a.q("UPDATE sync_network SET value = 0 WHERE key = 'retries'")
    outcomes = []
    for k, delay in enumerate((0.0, 0.05, 0.15, 0.3, 0.45, 0.6, 1.2)):
        _bulk(a, 4000, f"round{k}")
        t, out = run_bg(lambda: a.send())
        time.sleep(delay)
        s.kill9()
        t.join(30)
        outcomes.append("ok" if "result" in out else "error")
        s.start()
        r = a.sync()
        check(r["send"]["rejected"] == 0, r)
        check(env.sql("SELECT count(*) FROM items", fetch=True)[0][0] == 4000, "no duplicates, no loss")
        check(pg_items(env) == items(a), f"round {k} diverged")
    print("  push outcomes when killed:", " ".join(outcomes))
    fresh = env.client("fresh", "alice", s)
    fresh.sync()
    check(items(fresh) == items(a))


@test
def kill9_during_pull(env):
    s = env.server()
    env.sql("INSERT INTO items SELECT 'p' || lpad(g::text, 6, '0'), 'from pg ' || g, g, g / 7.0 "
            "FROM generate_series(1, 30000) g")
    d = env.client("d", "alice", s)
    d.q("UPDATE sync_network SET value = 0 WHERE key = 'retries'")
    outcomes = []
    for delay in (0.0, 0.02, 0.05, 0.1, 0.2):
        t, out = run_bg(lambda: d.receive())
        time.sleep(delay)
        s.kill9()
        t.join(30)
        outcomes.append("ok" if "result" in out else "error")
        s.start()
        n = d.one("SELECT count(*) FROM items")
        # pulls come in chunks of pull_max_rows (10000 by default): a kill
        # may land between chunks, never inside one
        check(n in (0, 10000, 20000, 30000), f"partial chunk applied: {n}")
    d.receive()
    print("  pull outcomes when killed:", " ".join(outcomes))
    check(items(d) == pg_items(env))
    env.sql("UPDATE items SET qty = -qty WHERE id <= 'p000100'")
    d.receive()
    check(items(d) == pg_items(env))


@test
def postgres_down_and_back(env):
    s1 = env.server("s1", pool_size="4")
    s2 = env.server("s2", pool_size="4")
    a = env.client("a", "alice", s1)
    b = env.client("b", "alice", s2)
    a.q("INSERT INTO items VALUES('d1', 'before', 1, 1)")
    a.sync()
    b.sync()
    # Postgres stops in the middle of a push
    _bulk(a, 20000, "mid")
    a.q("UPDATE sync_network SET value = 0 WHERE key = 'retries'")
    t, out = run_bg(lambda: a.send())
    time.sleep(0.05)
    PG.stop("fast")
    t.join(30)
    if "error" in out:
        check("503" in str(out["error"]) or "unavailable" in str(out["error"]) or
              "transfer failed" in str(out["error"]), out["error"])
    st, h, body = http("POST", s1.url + "/v1/push", body=a.one("SELECT sync_payload(0)"),
                       headers={"Authorization": "Bearer " + token("alice")})
    check(st == 503 and err_json(body)["error"] == "database unavailable" and h.get("retry-after"), (st, body))
    st, h, body = http("GET", s1.url + "/healthz")
    check(st == 503, st)
    t0 = time.time()
    e = sql_error(lambda: a.sync())
    check("503" in e and "database unavailable" in e and time.time() - t0 < 5, e)
    check(a.status()["pending_rows"] > 0)
    PG.start()
    deadline = time.time() + 10
    while http("GET", s1.url + "/healthz")[0] != 200 and time.time() < deadline:
        time.sleep(0.1)
    a.sync()
    b.sync()
    check(pg_items(env) == items(a) == items(b))
    # the listener reconnected: real-time works again
    # (the listeners retry once a second; a round that met a stall of the
    # machine or a listener not yet back is played again, five at most)
    time.sleep(1.5)
    for i in range(5):
        t, out = run_bg(lambda: b.one("SELECT sync_network_wait(5000)"))
        time.sleep(0.3)
        a.q("INSERT INTO items VALUES(?, 'after', 2, 2)", f"d2-{i}")
        a.send()
        t0 = time.time()
        t.join(6)
        check(out.get("result") == "changes", out)
        if out["t"] - t0 < 1:
            break
    check(out["t"] - t0 < 1, out)
    # no connection leaked: at most pool_size + the listener per server
    n = PG.sql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'authenticator' AND datname = %s",
               (env.db,), fetch=True)[0][0]
    check(n <= 2 * (4 + 1), n)


@test
def server_database_replaced(env):
    s = env.server()
    a = env.client("a", "alice", s)
    a.q("INSERT INTO items VALUES('r1', 'one', 1, 1)")
    a.sync()
    env.sql("INSERT INTO items VALUES('r2', 'two', 2, 2)")
    a.sync()
    # the database was restored from an old backup: our cursor is in its future
    a.q("UPDATE sync_network SET value = '99999999999' WHERE key = 'recv_cursor'")
    st, h, b = http("GET", s.url + "/v1/pull?since=99999999999", headers={"Authorization": "Bearer " + token("a")})
    check(st == 409 and err_json(b)["error"] == "cursor ahead of server", (st, b))
    env.sql("UPDATE items SET name = 'changed' WHERE id = 'r1'")
    a.sync()
    check(items(a) == pg_items(env), "resynced from 0")
    # another database (another site id) now answers at the same url
    other = Env(pg=PG)
    try:
        s2 = Server(other, "other")
        s2.start()
        other.sql("INSERT INTO items VALUES('x1', 'elsewhere', 9, 9)")
        a.q("UPDATE sync_network SET value = ? WHERE key = 'url'", s2.url)
        a.sync()                 # receive notices the new site: pulls all
        a.sync()                 # and the next send pushes everything
        check(items(a) == pg_items(other) and len(items(a)) == 3, (items(a), pg_items(other)))
    finally:
        other.close()


@test
def graceful_shutdown(env):
    s = env.server()
    a = env.client("a", "alice", s)
    a.sync()
    t, out = run_bg(lambda: a.one("SELECT sync_network_wait(3000)"))
    ws = WebSocket(s.port, token("alice"))
    ws.recv_json()
    time.sleep(0.3)
    t0 = time.time()
    rc = s.stop(timeout=10)
    check(rc == 0 and time.time() - t0 < 3, (rc, time.time() - t0))
    t.join(8)
    # the parked pull got a 204, the wait went on: the server is gone, it retried until its timeout
    check(out.get("result") == "offline" and 2.9 < out["dt"] < 6, out)
    op, data = _reply(ws, frame=True)   # past a "changes" announced before the stop
    check(op == 0x8 and data[:2] == b"\x03\xe9", (op, data))   # 1001 going away


@test
def garbage_input(env):
    """Random and truncated requests, bad frames: the server stays up and sane."""
    import random
    import socket
    rnd = random.Random(4)
    s = env.server(max_body="65536")
    tok = token("alice")
    a = env.client("a", "alice", s)
    a.q("INSERT INTO items VALUES('g1', 'x', 1, 1)")
    good = a.one("SELECT sync_payload(0)")

    def raw(data, read=True):
        try:
            with socket.create_connection(("127.0.0.1", s.port), timeout=2) as sk:
                sk.sendall(data)
                if read:
                    sk.recv(4096)
        except OSError:
            pass
    for i in range(300):
        kind = i % 6
        if kind == 0:      # random bytes as a request
            raw(bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 2000))))
        elif kind == 1:    # truncated request, peer goes away
            raw(b"POST /v1/push HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + tok.encode() +
                b"\r\nContent-Length: 5000\r\n\r\nPGSY" + bytes(rnd.randrange(256) for _ in range(100)), read=False)
        elif kind == 2:    # a real payload with random bytes flipped
            p = bytearray(good)
            for _ in range(rnd.randrange(1, 8)):
                p[rnd.randrange(len(p))] = rnd.randrange(256)
            st, _, b = http("POST", s.url + "/v1/push", body=bytes(p), headers={"Authorization": "Bearer " + tok})
            check(st in (200, 400, 422), (st, b))
        elif kind == 3:    # weird query strings and tokens
            q = "".join(rnd.choice("abc=&%0x;/?since=wait=exclude=") for _ in range(rnd.randrange(40)))
            st, _, _ = http("GET", s.url + "/v1/pull?" + q,
                            headers={"Authorization": "Bearer " + tok[:rnd.randrange(len(tok))]})
            check(st in (200, 204, 400, 401, 403), st)
        elif kind == 4:    # WebSocket then random frames
            try:
                ws = WebSocket(s.port, tok)
                ws.s.sendall(bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 300))))
                ws.close()
            except (OSError, AssertionError):
                pass
        else:              # huge declared frame length
            try:
                ws = WebSocket(s.port, tok)
                ws.s.sendall(b"\x81\xff" + b"\x7f" * 8 + b"mask")
                ws.close()
            except OSError:
                pass
    st, _, b = http("GET", s.url + "/healthz")
    check(st == 200, (st, b))
    check(s.proc.poll() is None, "server died")
    a.q("INSERT INTO items VALUES('g2', 'y', 2, 2)")
    a.sync()
    check(pg_items(env) == items(a))


@test
def many_clients_no_leak(env):
    s = env.server(pool_size="4")
    clients = [env.client(f"c{i}", "alice", s) for i in range(12)]
    errors = []

    def work(c, i):
        try:
            for k in range(5):
                c.q("INSERT INTO items VALUES(?, 'm', ?, ?)", f"m{i}-{k}", k, i)
                c.sync()
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    ts = [threading.Thread(target=work, args=(c, i)) for i, c in enumerate(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    check(not errors, errors[:3])
    for c in clients:
        c.sync()
    want = pg_items(env)
    check(len(want) == 60 and all(items(c) == want for c in clients))
    n = PG.sql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'authenticator' AND datname = %s",
               (env.db,), fetch=True)[0][0]
    check(n <= 5, n)


def _raw_chunked_pull(url, sub, max_rows, since="0"):
    """pull by hand through every chunk; returns (list of payloads, final cursor)."""
    out = []
    cursor = since
    for _ in range(100000):
        st, h, body = http("GET", f"{url}/v1/pull?since={cursor}&max_rows={max_rows}",
                           headers={"Authorization": "Bearer " + token(sub)})
        check(st in (200, 204), (st, body[:300]))
        cursor = h["x-pgsync-cursor"]
        check(len(cursor) <= 8200 and re.fullmatch(r"[A-Za-z0-9._:-]+", cursor), cursor)
        if st == 200:
            out.append(body)
        if h["x-pgsync-more"] != "1":
            check(cursor.isdigit(), f"the last chunk's cursor is the pinned until: {cursor}")
            return out, cursor
        check(st == 200 and cursor.startswith("c"), (st, cursor))
    raise AssertionError("no end")


@test
def chunked_first_sync(env):
    s = env.server(pull_max_rows=2000)
    env.sql("INSERT INTO items SELECT 'k' || lpad(g::text, 6, '0'), 'from pg ' || g, g, g / 7.0 "
            "FROM generate_series(1, 50000) g")
    env.sql("INSERT INTO notes SELECT 'n' || g, CASE WHEN g % 2 = 0 THEN 'alice' ELSE 'bob' END, 'x' "
            "FROM generate_series(1, 3000) g")
    # the SQLite client follows X-Pgsync-More by itself, one transaction a chunk
    d = env.client("d", "alice", s)
    r = d.receive()
    check(r["payloads"] >= 26, r)
    check(items(d) == pg_items(env), "chunked first sync converges")
    check(d.one("SELECT count(*) FROM notes") == 1500 and
          d.one("SELECT count(*) FROM notes WHERE owner <> 'alice'") == 0, "RLS per chunk")
    check(not d.status()["recv_cursor"].startswith("c"), d.status())   # not a chunk cursor
    # changes made while chunks flow are not lost
    env.sql("UPDATE items SET qty = -qty WHERE id <= 'k000100'")
    env.sql("DELETE FROM items WHERE id > 'k049900'")
    d.receive()
    check(items(d) == pg_items(env), "incremental pull after a chunked one")
    # by hand: explicit max_rows, chunk cursors, forged cursors
    payloads, cur = _raw_chunked_pull(s.url, "bob", 5000)
    check(len(payloads) >= 11, len(payloads))
    e = env.client("e", "bob")
    for p in payloads:
        e.q("SELECT sync_apply_payload(?)", p)
    check(items(e) == pg_items(env), "raw chunks converge")
    check(e.one("SELECT count(*) FROM notes WHERE owner <> 'bob'") == 0, "RLS per raw chunk")
    st, h, body = http("GET", s.url + "/v1/pull?since=0&max_rows=10",
                       headers={"Authorization": "Bearer " + token("bob")})
    c1 = h["x-pgsync-cursor"]
    for bad in ("czz", "c0", "c" + "00" * 5, c1[:-2], c1 + "00", "c02" + c1[3:], "c" + "ab" * 5000):
        st, h, body = http("GET", f"{s.url}/v1/pull?since={bad}",
                           headers={"Authorization": "Bearer " + token("bob")})
        check(st == 400, (bad[:40], st, body[:300]))
        err_json(body)
    st, h, body = http("GET", s.url + "/v1/pull?since=0&max_rows=0",
                       headers={"Authorization": "Bearer " + token("bob")})
    check(st == 400, st)


@test
def chunked_resume_after_kill9(env):
    s = env.server(pull_max_rows=1000)
    env.sql("INSERT INTO items SELECT 'p' || lpad(g::text, 6, '0'), 'from pg ' || g, g, g / 7.0 "
            "FROM generate_series(1, 20000) g")
    d = env.client("d", "alice", s)
    d.q("UPDATE sync_network SET value = 0 WHERE key = 'retries'")
    seen = []
    for delay in (0.05, 0.15, 0.3):
        t, out = run_bg(lambda: d.receive())
        time.sleep(delay)
        s.kill9()
        t.join(30)
        s.start()
        n = d.one("SELECT count(*) FROM items")
        check(n % 1000 == 0, f"whole chunks only: {n}")
        seen.append(n)
    print("  rows kept after each kill -9:", " ".join(map(str, seen)))
    d.receive()
    check(items(d) == pg_items(env))


BIG = []


def big(fn):
    BIG.append(fn)
    return fn


def _peak_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _status_kb(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


@big
def million_rows_memory(env):
    """1,000,000-row first sync, chunked (10,000 rows) vs not: peak RSS of
    the server and the client (run: test_server.py million_rows_memory)."""
    n = int(os.environ.get("PGSYNC_BIG_ROWS", "1000000"))
    env.sql("INSERT INTO items SELECT 'k' || lpad(g::text, 7, '0'), 'row number ' || g, g, g / 7.0 "
            f"FROM generate_series(1, {n}) g")
    for rows in (10000, 0):
        s = env.server(name=f"s{rows}", pull_max_rows=rows)
        script = f"""
import json, sqlite3, sys, time
db = sqlite3.connect({os.path.join(env.base, f"big{rows}.db")!r}, isolation_level=None)
db.enable_load_extension(True); db.load_extension({EXT!r})
db.execute("PRAGMA journal_mode=WAL")
db.executescript({CLIENT_SCHEMA!r})
db.execute("SELECT sync_init('items')"); db.execute("SELECT sync_init('notes')")
db.execute("SELECT sync_network_init(?, ?)", ({s.url!r}, {token("alice")!r}))
t0 = time.time()
r = json.loads(db.execute("SELECT sync_network_receive()").fetchone()[0])
n = db.execute("SELECT count(*) FROM items").fetchone()[0]
hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]
print(json.dumps({{"rows": n, "payloads": r["payloads"], "bytes": r["received_bytes"], "s": round(time.time() - t0, 1), "client_peak_kb": int(hwm)}}))
"""
        res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             env=child_env(), timeout=3600)
        check(res.returncode == 0, res.stderr[-2000:])
        j = json.loads(res.stdout.strip().splitlines()[-1])
        j["server_peak_kb"] = _peak_kb(s.proc.pid)
        # the server's Postgres backends (peak RSS includes shared buffers touched)
        pids = subprocess.run(["pgrep", "-f", f"postgres: authenticator {env.db}"],
                              capture_output=True, text=True).stdout.split()
        j["pg_backend_peak_kb"] = max([_peak_kb(int(p)) for p in pids] or [0])
        j["pg_backend_anon_kb_at_end"] = max([_status_kb(int(p), "RssAnon:") for p in pids] or [0])
        j["max_rows"] = rows
        print("  1M:", json.dumps(j), flush=True)
        check(j["rows"] == n, j)
        s.stop()


def main(argv):
    global PG
    names = set(argv)
    if names & {fn.__name__ for fn in BIG}:
        TESTS.extend(fn for fn in BIG if fn.__name__ in names)
    unknown = names - {fn.__name__ for fn in TESTS}
    if unknown:
        print("unknown tests:", " ".join(sorted(unknown)), "\navailable:", " ".join(f.__name__ for f in TESTS))
        return 2
    # SIGTERM (run.sh's trap, timeout) unwinds like Ctrl-C: every finally runs
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    root = tmpdir("pgsync-pg-")
    PG = Postgres(root)
    PG.init()
    failed = 0
    try:
        for fn in TESTS:
            if names and fn.__name__ not in names:
                continue
            env = Env(pg=PG)
            t0 = time.time()
            error = None
            try:
                fn(env)
            except Exception:  # noqa: BLE001
                error = traceback.format_exc()
            env.close(keep=True)          # servers stopped: their logs are complete
            logs = {f: open(os.path.join(env.base, f), errors="replace").read()
                    for f in os.listdir(env.base) if f.endswith(".log") and f != "pg.log"}
            for f, text in logs.items():
                for bad in ("AddressSanitizer", "LeakSanitizer", "runtime error:", "Segmentation"):
                    if bad in text and not error:
                        error = f"{f}: sanitizer report ({bad}):\n" + text[max(0, text.index(bad) - 200):][:3000]
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
        PG.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
