"""test_server.py — end-to-end tests of pgsync-server and the SQLite network
client: real processes (a throwaway PostgreSQL, pgsync-server on loopback,
SQLite replicas). Run through test/server/run.sh, or directly:

    /usr/bin/python3 test/server/test_server.py [test names...]

Prints "PASS name" / "FAIL name" per test; exit status 1 if any failed.
"""
import json
import re
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import EXT, ROOT, CLIENT_SCHEMA, Env, Postgres, Server, Client, child_env, http, tls_context, tmpdir, token, jwt_hs256, jwt_rs256  # noqa: E402
from tools import Proxy, WebSocket  # noqa: E402

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
    s = env.server(rate_limit="5", rate_burst="5")
    h = {"Authorization": "Bearer " + token("alice")}
    codes = [http("GET", s.url + "/v1/pull?since=0", headers=h) for _ in range(15)]
    limited = [c for c in codes if c[0] == 429]
    check(len(limited) >= 8, [c[0] for c in codes])
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
    check(lat[-1] < 100, lat)
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
    ws.send(0x9, b"hi")
    op, data = ws.recv()
    check(op == 0xA and data == b"hi", (op, data))
    ws.send(0x8, b"\x03\xe8")
    op, data = ws.recv()
    check(op == 0x8 and data[:2] == b"\x03\xe8", (op, data))
    ws.close()
    check(WebSocket(s2.port, None).status == 401)
    check(WebSocket(s2.port, token("x", role="admin_user")).status == 403)
    # browsers pass the token in the query string
    ws = WebSocket(s2.port, None, "/v1/ws?access_token=" + token("alice"))
    check(ws.status == 101 and ws.recv_json()["type"] == "hello")
    # unmasked client frames are a protocol error: close 1002
    ws.s.sendall(b"\x81\x02hi")
    op, data = ws.recv()
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
        check(len(lines) == 5, lines)         # healthz (start-up wait) + the four above
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


@test
def grafana_dashboard_metrics(env):
    """Every metric and label the dashboard in docs/ queries exists in /metrics."""
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
    samples = {}                                   # name -> label names seen
    for ln in text.splitlines():
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})? ", ln)
        if m and not ln.startswith("#"):
            samples.setdefault(m[1], set()).update(re.findall(r'(\w+)="', m[2] or ""))
    # Prometheus adds the target's own labels; histogram_quantile's le is on the buckets
    added = {"instance", "job"}
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
    time.sleep(1.5)
    t, out = run_bg(lambda: b.one("SELECT sync_network_wait(5000)"))
    time.sleep(0.3)
    a.q("INSERT INTO items VALUES('d2', 'after', 2, 2)")
    a.send()
    t0 = time.time()
    t.join(6)
    check(out.get("result") == "changes" and out["t"] - t0 < 1, out)
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
    op, data = ws.recv()
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
