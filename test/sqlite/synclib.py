"""synclib — helpers shared by the sqlitesync test suite (test/sqlite/).

Opens real SQLite file databases with the extension loaded, models a replica
(connection + per-peer `since` trackers), syncs replicas the way an
application would, and renders tables and whole databases in a type-exact
form (REAL by its 8-byte bit pattern, TEXT by its bytes) so that two
replicas compare equal only when every stored value is identical.

Imported by conftest.py (fixtures) and by the test modules; child processes
of the multiprocessing tests import it too, so it must stay importable on its
own (no pytest at import time).
"""
import os
import pathlib
import re
import sqlite3
import struct
import time

REPO = pathlib.Path(__file__).resolve().parents[2]


def ext_path():
    """ext_path returns the extension to test: $SQLITESYNC_EXT (relative paths
    are taken from the repository root) or build/sqlitesync.so."""
    p = pathlib.Path(os.environ.get("SQLITESYNC_EXT", "build/sqlitesync.so"))
    if not p.is_absolute():
        p = REPO / p
    return p


def connect(path, load=True, wal=True):
    """connect opens a file database in autocommit mode (we issue BEGIN ourselves)."""
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=60)
    if load:
        conn.enable_load_extension(True)
        conn.load_extension(str(ext_path()))
        conn.enable_load_extension(False)
    if wal:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        assert mode == "wal", mode
        conn.execute("PRAGMA synchronous=OFF")     # durability is not under test here
    return conn


class Replica:
    """A replica: one database file, one connection, and the `since` it has
    reached for every peer it pulls from."""

    def __init__(self, path, name=None, load=True):
        self.path = pathlib.Path(path)
        self.name = name or self.path.stem
        self.conn = connect(self.path, load=load)
        self.since = {}

    def __repr__(self):
        return f"Replica({self.name})"

    def x(self, sql, *args):
        return self.conn.execute(sql, args)

    def xs(self, script):
        self.conn.executescript(script)

    def q(self, sql, *args):
        return self.conn.execute(sql, args).fetchall()

    def one(self, sql, *args):
        row = self.conn.execute(sql, args).fetchone()
        return None if row is None else row[0]

    def site(self):
        return self.one("SELECT sync_site_id()")

    def version(self):
        return self.one("SELECT sync_db_version()")

    def init(self, table, algo=None):
        if algo is None:
            return self.one("SELECT sync_init(?)", table)
        return self.one("SELECT sync_init(?, ?)", table, algo)

    def payload(self, since=0, exclude=None):
        if exclude is None:
            return self.one("SELECT sync_payload(?)", since)
        return self.one("SELECT sync_payload(?, ?)", since, exclude)

    def apply(self, p):
        return self.one("SELECT sync_apply_payload(?)", p)

    def info(self, p):
        import json
        return json.loads(self.one("SELECT sync_payload_info(?)", p))

    def rows(self, table):
        return table_rows(self.conn, table)

    def close(self):
        self.conn.close()


def until(conn, p):
    return conn.execute("SELECT sync_payload_until(?)", (p,)).fetchone()[0]


def sync(src, dst, exclude=False):
    """sync pulls src's changes into dst incrementally (dst remembers, per
    source, the `until` of the last payload it applied). Returns the number of
    winning changes, 0 when there was nothing new."""
    since = dst.since.get(src.name, 0)
    p = src.payload(since, dst.site() if exclude else None)
    if p is None:
        return 0
    won = dst.apply(p)
    dst.since[src.name] = until(src.conn, p)
    return won


def sync_all(replicas, rounds=10):
    """sync_all exchanges incrementally between every ordered pair until a whole
    round changes nothing; returns the number of rounds it took."""
    for r in range(rounds):
        won = 0
        for a in replicas:
            for b in replicas:
                if a is not b:
                    won += sync(a, b)
        if won == 0:
            return r + 1
    raise AssertionError(f"replicas did not become quiescent in {rounds} rounds")


def full_exchange(replicas, rounds=10):
    """full_exchange sends every replica's whole history (since 0) to every
    other until nothing wins any more."""
    for r in range(rounds):
        won = 0
        for a in replicas:
            for b in replicas:
                if a is not b:
                    p = a.payload(0)
                    if p is not None:
                        won += b.apply(p)
        if won == 0:
            return r + 1
    raise AssertionError(f"replicas did not become quiescent in {rounds} rounds")


# SQLite error code(s) a damaged or forged payload may be reported with: today
# SQLITE_CORRUPT, which poisons an open transaction (see
# test_api.py::test_bad_payload_inside_user_transaction_keeps_the_transaction,
# the test that pins the behaviour); SQLITE_ERROR once that bug is fixed.
BAD_PAYLOAD_CODES = ("SQLITE_CORRUPT", "SQLITE_ERROR")


# ---- type-exact rendering ------------------------------------------------


def canon(v):
    """canon maps a stored value to a comparable, type-exact tuple."""
    if v is None:
        return ("null",)
    if isinstance(v, int):
        return ("int", v)
    if isinstance(v, float):
        return ("real", struct.pack("<d", v).hex())
    if isinstance(v, str):
        return ("text", v.encode())
    if isinstance(v, bytes):
        return ("text", v)      # table_rows reads TEXT as bytes; BLOBs are tagged there
    raise TypeError(type(v))


def qi(name):
    """qi quotes an SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def table_rows(conn, table):
    """table_rows returns the sorted, type-exact rows of a table: TEXT as its
    bytes (text_factory=bytes), BLOB as ('blob', bytes) told apart by typeof(),
    REAL by bit pattern. Hidden and generated columns included."""
    conn = getattr(conn, "conn", conn)
    old = conn.text_factory
    conn.text_factory = bytes
    try:
        cols = [r[1] for r in conn.execute(f"PRAGMA table_xinfo({qi(table)})")]
        cols = [c.decode() if isinstance(c, bytes) else c for c in cols]
        sel = ", ".join(f"{qi(c)}, typeof({qi(c)})" for c in cols)
        rows = []
        for row in conn.execute(f"SELECT {sel} FROM {qi(table)}"):
            vals = []
            for i in range(0, len(row), 2):
                v, t = row[i], row[i + 1]
                t = t.decode() if isinstance(t, bytes) else t
                if t == "blob":
                    vals.append(("blob", bytes(v)))
                else:
                    vals.append(canon(v))
            rows.append(tuple(vals))
    finally:
        conn.text_factory = old
    return sorted(rows)


def dump(conn):
    """dump renders the whole main database: schema and every table's rows,
    the sync metadata and clock tables included."""
    conn = getattr(conn, "conn", conn)
    schema = conn.execute(
        "SELECT type, name, tbl_name, sql FROM sqlite_schema ORDER BY type, name").fetchall()
    tables = [r[1] for r in schema if r[0] == "table" and not r[1].startswith("sqlite_")]
    return {"schema": schema, "tables": {t: table_rows(conn, t) for t in tables}}


def integrity(conn):
    """integrity: PRAGMA integrity_check as a list of messages (["ok"] when
    sound), minus one false positive of SQLite 3.40 (Debian 12): on a WITHOUT
    ROWID table whose PRIMARY KEY lists columns out of declaration order it
    reports "NULL value in T.C" for rows that have no NULL there; such a
    message is dropped only when a direct query confirms T.C has no NULL.
    test_api.py::test_integrity_check_is_literally_ok covers the raw pragma."""
    conn = getattr(conn, "conn", conn)
    out = []
    for (msg,) in conn.execute("PRAGMA integrity_check"):
        m = re.fullmatch(r"NULL value in (.+)\.([^.]+)", msg)
        if m and conn.execute(f"SELECT count(*) FROM {qi(m[1])} WHERE {qi(m[2])} IS NULL").fetchone()[0] == 0:
            continue
        out.append(msg)
    return out or ["ok"]


def clock_rows(conn, table):
    """clock_rows: the clock table of a synced table (pk..., cl, ver, clk)."""
    return table_rows(conn, table + "__sync_clock")


def wait_ms():
    """wait_ms sleeps past the current millisecond so that the next local edit
    gets a strictly larger HLC than edits made before the call."""
    time.sleep(0.002)
