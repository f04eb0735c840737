"""smoke.py — a smoke test of the installed Debian packages, run by
test/packages/run.sh after `dpkg -i`: it uses only what the packages put on
the system (no file of the source or build tree; run.sh runs it from a copy
in its work directory, WORKDIR), as an operator would:

  - /usr/bin/pgsync-server --version, and --check-config on the shipped
    /etc/pgsync/pgsync-server.conf (refused: it has the example secret);
  - the system user, the settings file's owner and mode, the systemd unit
    (where, not enabled, ExecStart and User), the man page;
  - a throwaway cluster of the system's PostgreSQL 15 with CREATE EXTENSION
    pgsync from /usr/share/postgresql/15/extension;
  - pgsync-server started the way the unit starts it (as its user), over
    HTTPS with a certificate made here;
  - two SQLite replicas that load sqlitesync by name (Python and the sqlite3
    shell) and sync through the server.

Prints "PASS name" / "FAIL name"; exit status 1 if anything failed.
usage: smoke.py WORKDIR
"""
import base64
import grp
import hashlib
import hmac
import json
import os
import pwd
import re
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time

WORK = sys.argv[1]
PGBIN = "/usr/lib/postgresql/15/bin"
SERVER = "/usr/bin/pgsync-server"
CONF = "/etc/pgsync/pgsync-server.conf"
UNIT = "/lib/systemd/system/pgsync-server.service"
SECRET = "smoke-test-secret-0123456789-0123456789"
failed = 0
procs = []


def step(name, fn):
    """Runs fn; True if it passed."""
    global failed
    t0 = time.time()
    try:
        fn()
        print(f"PASS {name} ({time.time() - t0:.1f}s)", flush=True)
        return True
    except Exception as e:  # noqa: BLE001
        failed += 1
        print(f"FAIL {name}: {e}", flush=True)
        return False


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jwt(claims):
    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()  # noqa: E731
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


# ---- the installed files -------------------------------------------------------

def server_binary():
    r = run([SERVER, "--version"])
    check(r.returncode == 0 and r.stdout.startswith("pgsync-server "), r)
    check("TLS available" in r.stdout, r.stdout)
    r = run([SERVER, "--config", CONF, "--check-config"])
    check(r.returncode == 2 and "is the example value" in r.stderr, (r.returncode, r.stderr))


def user_and_settings():
    u = pwd.getpwnam("pgsync")
    check(u.pw_uid < 1000 and u.pw_shell.endswith("nologin"), u)
    st = os.stat(CONF)
    check(stat.S_IMODE(st.st_mode) == 0o640 and st.st_uid == 0 and grp.getgrgid(st.st_gid).gr_name == "pgsync",
          (oct(st.st_mode), st.st_uid, st.st_gid))


def unit_file():
    text = open(UNIT).read()
    check("User=pgsync" in text, text)
    check(f"ExecStart={SERVER} --config {CONF}" in text, text)
    check(not os.path.exists("/etc/systemd/system/multi-user.target.wants/pgsync-server.service"),
          "the service must not be enabled before it is configured")
    if shutil.which("systemd-analyze"):
        r = run(["systemd-analyze", "verify", UNIT])
        # without systemd as PID 1 verify may complain about the machine; not about our unit
        bad = [ln for ln in (r.stdout + r.stderr).splitlines() if "pgsync-server.service" in ln]
        check(not bad, bad)
    if shutil.which("man"):
        r = run(["man", "-w", "pgsync-server"])
        check(r.returncode == 0 and "pgsync-server.1" in r.stdout, r)


# ---- PostgreSQL, server, clients ---------------------------------------------------

class PG:
    def __init__(self):
        self.dir = os.path.join(WORK, "pg")
        self.port = free_port()
        os.makedirs(self.dir)
        shutil.chown(self.dir, "postgres")
        self.as_pg([f"{PGBIN}/initdb", "-D", f"{self.dir}/data", "-U", "postgres", "-A", "trust",
                    "--no-sync", "-E", "UTF8", "--locale=C"])
        with open(f"{self.dir}/data/postgresql.auto.conf", "a") as f:
            f.write(f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                    f"unix_socket_directories = '{self.dir}'\nfsync = off\n")
        self.as_pg([f"{PGBIN}/pg_ctl", "-D", f"{self.dir}/data", "-l", f"{self.dir}/log", "-w", "start"])

    def as_pg(self, cmd):
        r = run(["runuser", "-u", "postgres", "--"] + cmd)
        check(r.returncode == 0, r)

    def sql(self, q, db="postgres"):
        import psycopg2
        c = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=db)
        c.autocommit = True
        try:
            with c.cursor() as cur:
                cur.execute(q)
                return cur.fetchall() if cur.description else None
        finally:
            c.close()

    def stop(self):
        run(["runuser", "-u", "postgres", "--", f"{PGBIN}/pg_ctl", "-D", f"{self.dir}/data", "-m", "immediate",
             "stop"])


PGC = None
SRV = {}


def postgres_extension():
    global PGC
    PGC = PG()
    PGC.sql("CREATE ROLE authenticator LOGIN NOINHERIT; CREATE ROLE app_user NOLOGIN; "
            "GRANT app_user TO authenticator")
    PGC.sql("CREATE DATABASE app")
    PGC.sql("""
        CREATE EXTENSION pgsync;
        -- what docs/SERVER.md tells an operator to grant the server's login role
        GRANT EXECUTE ON FUNCTION sync_device(uuid, text) TO authenticator;
        CREATE TABLE notes(id text PRIMARY KEY, body text);
        SELECT sync_init('notes');
        GRANT SELECT, INSERT, UPDATE, DELETE ON notes TO app_user;""", db="app")
    v = PGC.sql("SELECT sync_version(), (SELECT probin FROM pg_proc WHERE proname = 'sync_version')", db="app")
    check(v[0][1] == "$libdir/pgsync", v)
    check(os.path.exists("/usr/lib/postgresql/15/lib/pgsync.so"), "no pgsync.so in the system PostgreSQL")


def server_as_the_unit_runs_it():
    d = os.path.join(WORK, "srv")
    os.makedirs(d)
    for cmd in (["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", "ca.key", "-out", "ca.pem", "-days", "30", "-subj", "/CN=smoke CA"],
                ["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"]):
        check(run(["openssl"] + cmd, cwd=d).returncode == 0, cmd)
    with open(f"{d}/ext.cnf", "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\n")
    check(run(["openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
               "-CAcreateserial", "-out", "server.pem", "-days", "30", "-extfile", "ext.cnf"], cwd=d).returncode == 0,
          "server certificate")
    port = free_port()
    # the shipped settings file, with what an operator must fill in (the
    # first occurrence of each key: later commented ones belong to the
    # [database NAME] sections of the example)
    text = open(CONF).read()
    for key, value in {"port": str(port), "jwt_secret": SECRET, "allowed_roles": "app_user",
                       "database": f"host=127.0.0.1 port={PGC.port} dbname=app user=authenticator"}.items():
        text, n = re.subn(rf"(?m)^#?\s*{key}\s*=.*$", f"{key} = {value}", text, count=1)
        check(n == 1, f"{key} is not in {CONF}")
    text += f"tls_cert = {d}/server.pem\ntls_key = {d}/server.key\nlog_requests = on\n"
    conf = f"{d}/pgsync-server.conf"
    with open(conf, "w") as f:
        f.write(text)
    for p in (d, conf, f"{d}/server.key", f"{d}/server.pem"):
        shutil.chown(p, "root", "pgsync")
        os.chmod(p, 0o750 if p == d else 0o640)
    os.chmod(WORK, 0o755)
    # ExecStart= and User= of the unit, with this settings file
    unit = open(UNIT).read()
    exec_start = re.search(r"(?m)^ExecStart=(.*)$", unit)[1].split()
    user = re.search(r"(?m)^User=(.*)$", unit)[1]
    exec_start[exec_start.index("--config") + 1] = conf
    as_user = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--"]
    r = run(as_user + exec_start + ["--check-config"])
    check(r.returncode == 0, r.stderr)
    log = open(f"{d}/server.log", "w")
    p = subprocess.Popen(as_user + exec_start, stdout=log, stderr=subprocess.STDOUT)
    procs.append(p)
    SRV.update(url=f"https://127.0.0.1:{port}", ca=f"{d}/ca.pem", log=f"{d}/server.log", proc=p)
    import ssl
    import urllib.request
    ctx = ssl.create_default_context(cafile=SRV["ca"])
    for _ in range(100):
        try:
            with urllib.request.urlopen(SRV["url"] + "/healthz", context=ctx, timeout=2) as r2:
                check(json.loads(r2.read())["postgres"] == "ok", "healthz")
                break
        except OSError:
            check(p.poll() is None, open(SRV["log"]).read())
            time.sleep(0.1)
    else:
        raise AssertionError("the server did not answer: " + open(SRV["log"]).read())
    uid = [ln.split()[1] for ln in open(f"/proc/{p.pid}/status") if ln.startswith("Uid:")][0]
    check(int(uid) == pwd.getpwnam(user).pw_uid, f"the server runs as uid {uid}, not as {user}")


def sqlite_clients_sync():
    tok = jwt({"sub": "smoke", "role": "app_user", "exp": int(time.time()) + 600})
    dbs = []
    for name in ("a", "b"):
        db = sqlite3.connect(os.path.join(WORK, f"{name}.db"), isolation_level=None)
        db.enable_load_extension(True)
        db.load_extension("sqlitesync")          # by name, as the package promises
        db.execute("CREATE TABLE notes(id TEXT PRIMARY KEY, body TEXT)")
        db.execute("SELECT sync_init('notes')")
        db.execute("SELECT sync_network_init(?, ?)", (SRV["url"], tok))
        db.execute("INSERT INTO sync_network(key, value) VALUES ('ca_file', ?)", (SRV["ca"],))
        dbs.append(db)
    maps = open("/proc/self/maps").read()
    check(re.search(r" /usr/lib/[^/ ]+/sqlitesync\.so$", maps, re.M), "sqlitesync.so was not loaded from /usr/lib")
    a, b = dbs
    a.execute("INSERT INTO notes VALUES ('n1', 'from a'), ('n2', 'also from a')")
    json.loads(a.execute("SELECT sync_network_sync()").fetchone()[0])
    json.loads(b.execute("SELECT sync_network_sync()").fetchone()[0])
    check(b.execute("SELECT id, body FROM notes ORDER BY id").fetchall() == [("n1", "from a"), ("n2", "also from a")],
          "b did not receive a's rows")
    check(PGC.sql("SELECT count(*) FROM notes", db="app")[0][0] == 2, "Postgres did not get the rows")
    # the sqlite3 shell loads it by name too
    if shutil.which("sqlite3"):
        r = run(["sqlite3", ":memory:", ".load sqlitesync", "SELECT sync_version();"])
        check(r.returncode == 0 and re.match(r"\d+\.\d+\.\d+", r.stdout), r)
    log = open(SRV["log"]).read()
    check(re.search(r"request POST /v1/push route=push status=200 .*role=app_user database=app", log), log[-2000:])


def main():
    try:
        step("installed server binary and settings", server_binary)
        step("system user and settings file permissions", user_and_settings)
        step("systemd unit and man page", unit_file)
        if step("CREATE EXTENSION pgsync in the system PostgreSQL 15", postgres_extension) and \
                step("pgsync-server as its unit runs it, over HTTPS", server_as_the_unit_runs_it):
            step("two SQLite replicas load sqlitesync by name and sync", sqlite_clients_sync)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        if PGC:
            PGC.stop()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
