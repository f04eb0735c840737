"""harness.py — throwaway PostgreSQL, pgsync-server processes and SQLite
clients for the server tests, the benchmark and the demo.

Everything runs on 127.0.0.1 with free ports and lives under one temporary
directory; Env.close() stops every process it started (by pid) and removes
the directory. Postgres refuses to run as root, so the cluster runs as the
`postgres` user when we are root.
"""
import base64
import hashlib
import hmac
import http.client as httplib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PGBIN = os.environ.get("PGSYNC_PGBIN", "/usr/lib/postgresql/15/bin")
SERVER_BIN = os.environ.get("PGSYNC_SERVER_BIN", os.path.join(ROOT, "server", "pgsync-server"))
EXT = os.environ.get("PGSYNC_SQLITE_EXT", "/tmp/netbuild/sqlitesync.so")
SECRET = "test-secret-0123456789-0123456789-abcdef"
# run.sh points this at its own work directory, which it cleans up whatever happens
TMP = os.environ.get("PGSYNC_TEST_TMP", "/tmp")


def tmpdir(prefix):
    d = tempfile.mkdtemp(prefix=prefix, dir=TMP)
    os.chmod(d, 0o755)
    return d


def _record_pid(pid):
    if TMP != "/tmp":
        with open(os.path.join(TMP, "pids"), "a") as f:
            f.write(f"{pid}\n")

ROLES = """
CREATE ROLE authenticator LOGIN NOINHERIT;
CREATE ROLE app_user NOLOGIN;
CREATE ROLE admin_user NOLOGIN;
GRANT app_user TO authenticator;
"""

SCHEMA = """
CREATE EXTENSION pgsync;
GRANT EXECUTE ON FUNCTION sync_device(uuid, text) TO authenticator;
CREATE TABLE items(id text PRIMARY KEY, name text, qty integer, price double precision);
CREATE TABLE notes(id text PRIMARY KEY, owner text NOT NULL, body text);
SELECT sync_init('items');
SELECT sync_init('notes');
ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
CREATE POLICY notes_owner ON notes
  USING (owner = current_setting('request.jwt.claims', true)::json->>'sub')
  WITH CHECK (owner = current_setting('request.jwt.claims', true)::json->>'sub');
GRANT SELECT, INSERT, UPDATE, DELETE ON items, notes TO app_user;
"""

CLIENT_SCHEMA = """
CREATE TABLE IF NOT EXISTS items(id TEXT PRIMARY KEY, name TEXT, qty INTEGER, price REAL);
CREATE TABLE IF NOT EXISTS notes(id TEXT PRIMARY KEY, owner TEXT NOT NULL, body TEXT);
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(extra=None):
    """The environment for child processes: never inherit a sanitizer preload
    meant for this Python process."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "ASAN_OPTIONS") and not k.startswith("PGSYNC_")}
    env.update(extra or {})
    return env


def _as_postgres(cmd):
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--"] + cmd
    return cmd


# ---- tokens -----------------------------------------------------------------

def _b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def jwt_hs256(claims, secret=SECRET, alg="HS256"):
    head = _b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


def jwt_rs256(claims, keyfile):
    head = _b64(json.dumps({"alg": "RS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims).encode())
    sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", keyfile], env=child_env(),
                         input=f"{head}.{body}".encode(), capture_output=True, check=True).stdout
    return f"{head}.{body}.{_b64(sig)}"


def token(sub, role="app_user", ttl=3600, **extra):
    claims = {"sub": sub, "role": role, "exp": int(time.time()) + ttl}
    claims.update(extra)
    return jwt_hs256(claims)


# ---- HTTP -------------------------------------------------------------------

def tls_context(ca, minimum=None, maximum=None):
    """A client TLS context that trusts only the CA file ca."""
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    if minimum:
        ctx.minimum_version = minimum
    if maximum:
        ctx.maximum_version = maximum
    return ctx


def http(method, url, body=None, headers=None, timeout=30, ca=None):
    """Returns (status, headers dict lower-case, body bytes). https:// urls
    are verified against the CA file ca."""
    scheme, _, rest = url.partition("://")
    assert scheme in ("http", "https") and rest.startswith(("127.0.0.1:", "localhost:")), url
    hostport, _, path = rest.partition("/")
    host, port = hostport.split(":")
    if scheme == "https":
        c = httplib.HTTPSConnection(host, int(port), timeout=timeout, context=tls_context(ca))
    else:
        c = httplib.HTTPConnection(host, int(port), timeout=timeout)
    try:
        chunked = (headers or {}).get("Transfer-Encoding") == "chunked"
        c.request(method, "/" + path, body=body, headers=headers or {}, encode_chunked=chunked)
        r = c.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data
    finally:
        c.close()


# ---- processes ----------------------------------------------------------------

class Postgres:
    def __init__(self, base):
        self.base = base
        self.data = os.path.join(base, "pgdata")
        self.sock = os.path.join(base, "pgsock")
        self.log = os.path.join(base, "pg.log")
        self.port = free_port()

    def init(self):
        os.makedirs(self.sock, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres")
            shutil.chown(self.sock, "postgres")
        subprocess.run(_as_postgres([f"{PGBIN}/initdb", "-D", self.data, "-U", "postgres", "-A", "trust",
                                     "-E", "UTF8", "--locale=C", "--no-sync"]),
                       check=True, capture_output=True, env=child_env())
        with open(os.path.join(self.data, "postgresql.auto.conf"), "a") as f:
            f.write(f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                    f"unix_socket_directories = '{self.sock}'\nfsync = off\n"
                    "synchronous_commit = off\nfull_page_writes = off\nmax_connections = 300\n"
                    "shared_buffers = 128MB\n"
                    # an autoanalyze takes an xid, which moves every cursor and wakes
                    # every long-poll: the tests that count pulls or compare cursors
                    # make their own xids, none at random
                    "autovacuum = off\n")
        self.start()
        self.sql(ROLES, db="postgres")

    def start(self):
        subprocess.run(_as_postgres([f"{PGBIN}/pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "30", "start"]),
                       check=True, capture_output=True, env=child_env())

    def stop(self, mode="fast"):
        subprocess.run(_as_postgres([f"{PGBIN}/pg_ctl", "-D", self.data, "-m", mode, "-w", "stop"]),
                       capture_output=True, env=child_env())

    def dsn(self, user="postgres", db="postgres"):
        return f"host=127.0.0.1 port={self.port} user={user} dbname={db}"

    def sql(self, q, args=None, db="postgres", fetch=False):
        import psycopg2
        c = psycopg2.connect(self.dsn(db=db))
        c.autocommit = True
        try:
            with c.cursor() as cur:
                cur.execute(q, args)
                return cur.fetchall() if fetch else None
        finally:
            c.close()


class Server:
    """A pgsync-server process; with tls_cert/tls_key it serves https, and ca
    is the CA file that verifies its certificate."""

    def __init__(self, env, name="s1", ca=None, conf=None, **settings):
        """conf: text of a config file (e.g. [database NAME] sections),
        read before the settings (environment variables)."""
        self.env = env
        self.name = name
        self.conf = conf
        self.port = free_port()
        self.ca = ca
        scheme = "https" if "tls_cert" in settings else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.log = os.path.join(env.base, f"{name}.log")
        self.settings = {
            "port": str(self.port), "listen": "127.0.0.1",
            "database": env.pg.dsn(user="authenticator", db=env.db),
            "jwt_secret": SECRET, "allowed_roles": "app_user",
            "pool_size": "8", "poll_ms": "1000",
        }
        self.settings.update({k: str(v) for k, v in settings.items()})
        self.proc = None

    def start(self, wait=True):
        env = child_env({"PGSYNC_" + k.upper(): v for k, v in self.settings.items()})
        args = [SERVER_BIN]
        if self.conf is not None:
            path = os.path.join(self.env.base, f"{self.name}.conf")
            with open(path, "w") as f:
                f.write(self.conf)
            args += ["--config", path]
        self.proc = subprocess.Popen(args, env=env, stdout=open(self.log, "a"),
                                     stderr=subprocess.STDOUT)
        self.env.procs.append(self.proc)
        _record_pid(self.proc.pid)
        if wait:
            deadline = time.time() + 10
            while time.time() < deadline:
                try:
                    http("GET", self.url + "/healthz", timeout=2, ca=self.ca)
                    return self
                except OSError:
                    if self.proc.poll() is not None:
                        raise RuntimeError(f"{self.name} exited: " + open(self.log).read()[-2000:])
                    time.sleep(0.05)
            raise RuntimeError(f"{self.name} did not start")
        return self

    def kill9(self):
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout=10):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill9()
                return None
        return self.proc.returncode if self.proc else None

    def rss_kb(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0


class Client:
    """A SQLite replica with the sqlitesync extension (network functions included)."""

    def __init__(self, env, name, token_=None, server=None, url=None, ca_file=None):
        self.path = os.path.join(env.base, f"{name}.db")
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self.db.enable_load_extension(True)
        self.db.load_extension(EXT)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")   # the usual app setting with WAL
        self.db.executescript(CLIENT_SCHEMA)
        self.db.execute("SELECT sync_init('items')")
        self.db.execute("SELECT sync_init('notes')")
        if server or url:
            self.db.execute("SELECT sync_network_init(?, ?)", (url or server.url, token_))
            self.db.execute("UPDATE sync_network SET value = 50 WHERE key = 'backoff_ms'")
        if ca_file:
            self.db.execute("INSERT OR REPLACE INTO sync_network(key, value) VALUES ('ca_file', ?)",
                            (ca_file,))
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

    def close(self):
        self.db.close()


class Env:
    """One test's world: a fresh database (in a shared or own cluster),
    its servers and clients, all under one temporary directory."""
    counter = 0

    def __init__(self, schema=SCHEMA, pg=None):
        self.base = tmpdir("pgsync-srv-")
        self.procs = []
        self.clients = []
        self.own_pg = pg is None
        if pg is None:
            pg = Postgres(self.base)
            pg.init()
        self.pg = pg
        Env.counter += 1
        self.db = f"t{os.getpid()}_{Env.counter}"
        pg.sql(f"CREATE DATABASE {self.db}")
        if schema:
            self.sql(schema)

    def sql(self, q, args=None, fetch=False):
        return self.pg.sql(q, args, db=self.db, fetch=fetch)

    def extra_db(self, pg=None, schema=SCHEMA):
        """Another database with the schema, in this test's cluster or in pg
        (a Postgres of its own); returns its name."""
        pg = pg or self.pg
        Env.counter += 1
        name = f"t{os.getpid()}_{Env.counter}"
        pg.sql(f"CREATE DATABASE {name}")
        if schema:
            pg.sql(schema, db=name)
        return name

    def server(self, name="s1", **settings):
        return Server(self, name, **settings).start()

    def client(self, name, sub="alice", server=None, **kw):
        return Client(self, name, token(sub), server, **kw)

    def close(self, keep=False):
        for c in self.clients:
            try:
                c.close()
            except Exception:
                pass
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if self.own_pg:
            self.pg.stop("immediate")
        if not keep:
            shutil.rmtree(self.base, ignore_errors=True)
