"""test_convergence — randomized convergence of 2 to 5 replicas.

Each schedule opens 2-5 replicas (file databases, WAL), makes random inserts,
updates, deletes, re-inserts, upserts, INSERT OR REPLACE, key changes and
multi-row statements over four tables (small key spaces, so conflicts are
frequent; mixed value types), some of them grouped in transactions that
commit, roll back or roll back to a savepoint, and between them random
partial syncs: incremental pulls (with and without exclude_site), full and
stale pulls, and payloads kept "in flight" and delivered later, reordered and
duplicated, which also relays changes through third replicas; a replica's
second connection writes rows and applies some of the payloads. Then:

  1. incremental pulls only (each replica's `since` per peer) until quiescent:
     every replica's tables must be identical (type-exact, REAL by bit
     pattern), and
  2. a full exchange (since 0 between every pair) must then win nothing.

    PGS_SEED        base seed (default 20261122); schedule i uses seed "SEED:i"
    PGS_SCHEDULES   number of schedules (default 300, ~20 s; long runs: 5000+)
    PGS_SCHEDULE    run only schedule i (to reproduce a failure)
    PGS_HYPOTHESIS_EXAMPLES   examples of the hypothesis variant (default 30)

A failure prints the seed, the schedule and the path of a trace of every
operation; reproduce it with PGS_SEED=<seed> PGS_SCHEDULE=<i>.
"""
import math
import os
import random
import sqlite3
import tempfile

import pytest

import synclib
from synclib import Replica, table_rows

SEED = os.environ.get("PGS_SEED", "20261122")
SCHEDULES = int(os.environ.get("PGS_SCHEDULES", "300"))
ONLY = os.environ.get("PGS_SCHEDULE")
HYPOTHESIS_EXAMPLES = int(os.environ.get("PGS_HYPOTHESIS_EXAMPLES", "30"))

SCHEMA = """
CREATE TABLE t(id TEXT PRIMARY KEY, a, b, c);
CREATE TABLE u(k1 TEXT, k2 INTEGER, v REAL, w, PRIMARY KEY(k1, k2)) WITHOUT ROWID;
CREATE TABLE bk(id BLOB PRIMARY KEY, x) WITHOUT ROWID;
CREATE TABLE g(id TEXT PRIMARY KEY, v, w);
CREATE TABLE hb(site TEXT PRIMARY KEY, n);
"""
TABLES = ("t", "u", "bk", "g")

# Values that SQLite's `IS NOT` tells apart. Equal-but-distinct pairs (1 and
# 1.0, 0.0 and -0.0) are left out here: test_update_to_equal_but_different_value
# in test_scenarios.py tracks that bug, and the xfail variant below uses them.
VALUES = [None, 1, -1, 7, 2 ** 62, -(2 ** 63), 0.5, -2.25, 1e308, 5e-324, math.inf, -math.inf,
          3.141592653589793, "", "a", "A", "1", "ünï 日本", "x" * 300, b"", b"\x00", b"a",
          b"\xff" * 20]
# -0.0 is left out: SQL cannot tell it from 0.0 (a documented limitation)
EQUAL_BUT_DISTINCT = [1.0, 0.0, 7.0, -1.0]

T_KEYS = [f"k{i}" for i in range(6)]
U_KEYS = [(k1, k2) for k1 in ("x", "y") for k2 in (1, 2, 3)]
B_KEYS = [b"\x00", b"\x01", b"", b"\xff\xfe"]
G_KEYS = [f"g{i}" for i in range(4)]


class World:
    """World: replicas, the payloads in flight, and a trace of what happened."""

    def __init__(self, tmpdir, n, values=VALUES):
        self.reps = []
        for i in range(n):
            r = Replica(os.path.join(tmpdir, f"r{i}.db"), f"r{i}")
            r.xs(SCHEMA)
            for t in TABLES + ("hb",):
                r.init(t, "gset" if t == "g" else None)
            r.alt = synclib.connect(r.path)     # a second connection writing the same file
            self.reps.append(r)
        self.values = values
        self.flight = []            # (payload, origin index)
        self.trace = []
        self.savepoint_rollbacks = set()

    def close(self):
        for r in self.reps:
            r.alt.close()
            r.close()

    def log(self, *what):
        self.trace.append(" ".join(str(w) for w in what))

    # ---- local writes ----

    def val(self, pick):
        return self.values[pick(len(self.values))]

    def write(self, pick, ri, in_txn=False):
        r = self.reps[ri]
        cx = r.conn if in_txn or pick(3) else r.alt
        table = TABLES[pick(len(TABLES))]
        kind = pick(8)
        try:
            if table == "t":
                k = T_KEYS[pick(len(T_KEYS))]
                if kind == 0:
                    sql, args = "INSERT OR REPLACE INTO t VALUES (?, ?, ?, ?)", (k, self.val(pick), self.val(pick), self.val(pick))
                elif kind == 1:
                    sql, args = "INSERT OR IGNORE INTO t(id, a) VALUES (?, ?)", (k, self.val(pick))
                elif kind == 2:
                    col = "abc"[pick(3)]
                    sql, args = f"UPDATE t SET {col} = ? WHERE id = ?", (self.val(pick), k)
                elif kind == 3:
                    sql, args = "UPDATE t SET a = ?, c = ? WHERE id = ?", (self.val(pick), self.val(pick), k)
                elif kind == 4:
                    sql, args = "DELETE FROM t WHERE id = ?", (k,)
                elif kind == 5:
                    sql, args = ("INSERT INTO t(id, b) VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET b = excluded.b",
                                 (k, self.val(pick)))
                elif kind == 6:
                    sql, args = "UPDATE t SET id = ? WHERE id = ?", (T_KEYS[pick(len(T_KEYS))], k)
                else:
                    k2 = T_KEYS[pick(len(T_KEYS))]
                    sql, args = "UPDATE t SET b = ? WHERE id IN (?, ?)", (self.val(pick), k, k2)
            elif table == "u":
                k1, k2 = U_KEYS[pick(len(U_KEYS))]
                if kind < 2:
                    sql, args = "INSERT OR REPLACE INTO u VALUES (?, ?, ?, ?)", (k1, k2, self.val(pick), self.val(pick))
                elif kind < 5:
                    sql, args = "UPDATE u SET w = ? WHERE k1 = ? AND k2 = ?", (self.val(pick), k1, k2)
                elif kind == 5:
                    sql, args = "UPDATE u SET v = ? WHERE k1 = ?", (self.val(pick), k1)
                elif kind == 6:
                    sql, args = "DELETE FROM u WHERE k1 = ? AND k2 = ?", (k1, k2)
                else:
                    sql, args = "UPDATE u SET k2 = ? WHERE k1 = ? AND k2 = ?", (pick(5), k1, k2)
            elif table == "bk":
                k = B_KEYS[pick(len(B_KEYS))]
                if kind < 3:
                    sql, args = "INSERT OR REPLACE INTO bk VALUES (?, ?)", (k, self.val(pick))
                elif kind < 6:
                    sql, args = "UPDATE bk SET x = ? WHERE id = ?", (self.val(pick), k)
                else:
                    sql, args = "DELETE FROM bk WHERE id = ?", (k,)
            else:                   # grow-only: inserts of absent keys only
                k = G_KEYS[pick(len(G_KEYS))]
                sql, args = "INSERT OR IGNORE INTO g VALUES (?, ?, ?)", (k, self.val(pick), self.val(pick))
            cx.execute(sql, args)
            self.log(r.name + ("" if cx is r.conn else "/alt"), sql, args)
        except sqlite3.IntegrityError as e:      # key change onto an existing key
            self.log(r.name, "refused:", sql, args, e)

    def transaction(self, pick, ri):
        r = self.reps[ri]
        how = pick(10)
        r.x("BEGIN")
        self.log(r.name, "BEGIN")
        for _ in range(1 + pick(4)):
            if pick(5) == 0:
                self.deliver(pick, ri)          # a merge inside the user's transaction
            else:
                self.write(pick, ri, True)
        if how == 0:
            r.x("SAVEPOINT s")
            self.write(pick, ri, True)
            r.x("ROLLBACK TO s")
            self.log(r.name, "ROLLBACK TO s")
            self.savepoint_rollbacks.add(ri)
            self.write(pick, ri, True)
        if how == 1:
            r.x("ROLLBACK")
            self.log(r.name, "ROLLBACK")
        else:
            r.x("COMMIT")
            self.log(r.name, "COMMIT")

    # ---- syncs ----

    def pull(self, pick, si, di):
        src, dst = self.reps[si], self.reps[di]
        kind = pick(6)
        tracked = dst.since.get(src.name, 0)
        if kind <= 1:                           # the normal incremental pull
            won = synclib.sync(src, dst, exclude=kind == 1)
            self.log(f"pull {src.name}->{dst.name} since {tracked}{' excl' if kind else ''}: won {won}")
            return
        if kind == 2:
            since, excl = 0, None
        elif kind == 3:
            since, excl = pick(tracked + 1), None     # stale
        elif kind == 4:
            since, excl = pick(tracked + 1), dst.site()
        else:
            since, excl = tracked, None
        p = src.payload(since, excl)
        if p is None:
            return
        if pick(2):
            self.flight.append((p, si, di))
            self.log(f"send {src.name}->{dst.name} since {since} (in flight #{len(self.flight) - 1})")
        else:
            self.log(f"apply {src.name}->{dst.name} since {since}: won {dst.apply(p)}")

    def deliver(self, pick, to=None):
        if not self.flight:
            return
        i = pick(len(self.flight))
        p, si, di = self.flight[i]
        if to is not None:
            di = to
        elif pick(3) == 0:
            di = pick(len(self.reps))           # to someone else: a relay
        if pick(2):
            self.flight.pop(i)                  # else it stays: delivered again later
        r = self.reps[di]
        if to is None and pick(3) == 0:
            # through the file's other connection: the sites it records and the
            # clocks it writes must be seen by the first one's loaded metadata
            won = r.alt.execute("SELECT sync_apply_payload(?)", (p,)).fetchone()[0]
            self.log(f"deliver #{i} from r{si} to r{di}/alt: won {won}")
            return
        self.log(f"deliver #{i} from r{si} to r{di}: won {r.apply(p)}")

    def step(self, pick):
        n = len(self.reps)
        what = pick(10)
        if what < 4:
            self.write(pick, pick(n))
        elif what < 5:
            self.transaction(pick, pick(n))
        elif what < 8:
            si = pick(n)
            di = (si + 1 + pick(n - 1)) % n
            self.pull(pick, si, di)
        else:
            self.deliver(pick)

    # ---- the end ----

    def settle(self):
        """settle syncs incrementally until quiescent, then checks that a full
        exchange wins nothing; returns a description of any difference."""
        for ri in sorted(self.savepoint_rollbacks):
            # rows written after ROLLBACK TO become visible to pulls only with the
            # next transaction (test_savepoint_rollback_commit_is_visible_at_once)
            self.reps[ri].x("INSERT OR REPLACE INTO hb VALUES (?, 1)", self.reps[ri].name)
        synclib.sync_all(self.reps, rounds=8)
        diff = self.differences()
        if diff:
            return "after incremental sync: " + diff
        for a in self.reps:
            p = a.payload(0)
            for b in self.reps:
                if a is not b and p is not None:
                    won = b.apply(p)
                    if won:
                        return f"full payload {a.name}->{b.name} still won {won} changes"
        diff = self.differences()
        if diff:
            return "after full exchange: " + diff
        for r in self.reps:
            if synclib.integrity(r) != ["ok"]:
                return f"{r.name}: integrity_check {synclib.integrity(r)}"
        return None

    def differences(self):
        for t in TABLES + ("hb",):
            first = table_rows(self.reps[0], t)
            for r in self.reps[1:]:
                other = table_rows(r, t)
                if other != first:
                    only0 = [x for x in first if x not in other]
                    only1 = [x for x in other if x not in first]
                    return (f"table {t}: r0 vs {r.name}: only in r0 {only0[:5]}, "
                            f"only in {r.name} {only1[:5]}")
        return None


def run_schedule(tmpdir, seed, values=VALUES):
    rng = random.Random(seed)
    w = World(tmpdir, rng.randint(2, 5), values)
    try:
        for _ in range(rng.randint(20, 120)):
            w.step(rng.randrange)
        problem = w.settle()
        if problem:
            trace = os.path.join(tmpdir, "trace.txt")
            with open(trace, "w") as f:
                f.write("\n".join(w.trace) + "\n")
            return f"{problem} (trace: {trace})"
        return None
    finally:
        w.close()


def schedules():
    if ONLY is not None:
        return [int(ONLY)]
    return range(SCHEDULES)


@pytest.mark.parametrize("i", schedules(), ids=lambda i: f"s{i}")
def test_random_schedule_converges(tmp_path, i):
    problem = run_schedule(str(tmp_path), f"{SEED}:{i}")
    assert problem is None, (
        f"PGS_SEED={SEED} schedule {i} diverged: {problem}\n"
        f"reproduce: PGS_SEED={SEED} PGS_SCHEDULE={i} /usr/bin/python3 -m pytest -q "
        f"test/sqlite/test_convergence.py")


def test_random_schedules_with_equal_but_distinct_values(tmp_path):
    pool = [None, 1, -1, 7, 0] + EQUAL_BUT_DISTINCT       # mostly values that compare equal
    for i in range(100):
        d = tmp_path / f"s{i}"
        d.mkdir()
        problem = run_schedule(str(d), f"equal:{SEED}:{i}", pool)
        assert problem is None, f"schedule equal:{SEED}:{i}: {problem}"


# ---- the same with hypothesis (shrinks a failure to a minimal schedule) ----------------

try:
    from hypothesis import HealthCheck, given, settings, strategies as st
except ImportError:             # pragma: no cover - python3-hypothesis is in scripts/deps
    st = None


if st is not None:
    @settings(max_examples=HYPOTHESIS_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def test_hypothesis_schedule_converges(data):
        with tempfile.TemporaryDirectory() as d:
            n = data.draw(st.integers(2, 4), label="replicas")
            w = World(d, n)
            try:
                for _ in range(data.draw(st.integers(1, 60), label="steps")):
                    w.step(lambda k: data.draw(st.integers(0, k - 1)) if k > 1 else 0)
                problem = w.settle()
                assert problem is None, problem + "\n" + "\n".join(w.trace)
            finally:
                w.close()
