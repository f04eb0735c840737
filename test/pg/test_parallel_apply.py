#!/usr/bin/python3
"""test_parallel_apply — concurrent applies, with and without local writers.

Applies run in parallel (no global lock, docs/PG.md "Concurrency"); this test
checks that they neither deadlock nor lose a change, against serial oracles.

Devices. Six Postgres databases start from one seed state (120 items, 60
tags with a two-column key) and make random changes in rounds (updates,
deletes, re-inserts of the shared keys; inserts and deletes of keys of their
own; now and then one applies another's state, so their histories
interleave). After every round each device has two payloads: its whole
state (150-200 rows: an apply of it takes table locks) and the changes of
the round (a few dozen rows, as a device pushes: row locks). They overlap
on the shared keys and are disjoint on the own keys. Whole states merge in
any order to the same result, and so do the incremental payloads as long
as each device's come in their order (a partial row's life came whole in
an earlier one), so a serial oracle exists.

1. Parallel applies: six threads apply the payloads (each device's
   incremental ones in order, whole states and random duplicates in any)
   into one hub, some in transactions held open for a few milliseconds the
   way the server's push holds them; an oracle applies them one by one,
   interleaved in another order. No apply may fail, and hub and oracle must
   hold the same rows, causal lengths and per-column stamps (compared
   through sync_payload_info).
2. With local writers: the same, on a fresh hub, while four writers change
   the shared keys (each its own share: writers never conflict with each
   other, only with applies) in transactions of one to four statements in
   random key order, and a mirror pulls the hub incrementally. The device
   payloads were made before the writers start, so every local write is
   newer than every device change of the same row life. No writer and no
   apply may see any error (no deadlock reaches anyone). Then:
   - hub == oracle, where the oracle applies every device payload serially
     and then the hub's state: a device change the hub lost would show;
   - for every key a writer changed, the row's final causal length is not
     below that of the writer's last committed change, and where it is the
     same the row is exactly what the writer wrote: a local change an apply
     overwrote would show;
   - the mirror, which only ever pulled incrementally while applies and
     writers committed, equals the hub.
3. Scenarios, deterministic: an apply does not wait for another apply of
   other rows (the old global lock would have made it); a pull taken while
   an older apply is still open does not move past its version, and the
   next pull brings its rows; an apply that shares a row with an open apply
   waits for it and both changes merge; an apply that needs a row a local
   transaction holds, while that transaction then needs a row the apply
   already wrote (the deadlock test_concurrency used to hit), gives way
   instead: the local transaction never fails; the same when the local
   transaction merely locked the row (SELECT ... FOR UPDATE); with
   pgsync.serialize_applies = on (the old global lock, for benchmarks) an
   apply of other rows waits for an open apply; an apply waits for a
   transaction that writes the row's clock row alone (an administrator's
   UPDATE) and goes through when it commits or rolls back.
4. Foreign keys: a payload that lists the child table first applies parents
   first and deletes children first, without rejections, also while another
   apply adds children of the same new parent.

PGSYNC_SEED fixes the random choices (printed); thread timing still varies.
Bounded: part 2 runs RUN_SECONDS, everything else stops by itself.
"""
import os
import random
import sys
import threading
import time

import psycopg2

from pglib import check, connect, drop_db, fresh_db, one, pull, rows, wait_safe

SEED = int(os.environ.get("PGSYNC_SEED", random.randrange(1 << 30)))
ITEMS = 120
TAGS = 60
DEVICES = 6
ROUNDS = 4
OPS = 25
APPLIERS = 6
WRITERS = 4
RUN_SECONDS = 6.0
DDL = ["CREATE TABLE items (id text PRIMARY KEY, n int, note text, x float8)",
       "CREATE TABLE tags (k1 int, k2 text, a text, b int, PRIMARY KEY (k1, k2))",
       "SELECT sync_init('items')", "SELECT sync_init('tags')"]
DBS = []


def db(name, seed_payload=None):
    name = f"pgsync_t_par_{name}"
    DBS.append(name)
    c = fresh_db(name, DDL)
    if seed_payload is not None:
        one(c, "SELECT sync_apply_payload(%s)", (seed_payload,))
    return name, c


def state(c):
    """The synced state of a database: rows with causal lengths and stamps.

    Without the site of a row's life (cl_site): when two devices end or start
    the same life concurrently (both delete a row: cl 2 and 2), the first to
    arrive keeps its site, so it depends on the order of delivery even when
    payloads are applied one by one (it only steers echo suppression, never
    what a row holds; a core matter, not one of concurrency)."""
    p, _ = pull(c, 0)
    if p is None:
        return []
    info = one(c, "SELECT sync_payload_info(%s)", (p,))
    out = []
    for r in info["rows"]:
        out.append((r["table"], tuple(r["key"]), r["cl"], r["deleted"],
                    tuple(sorted((ch["column"], ch["hlc"], ch["site"], repr(ch["value"]))
                                 for ch in r["changes"]))))
    return sorted(out)


def values(c):
    return (rows(c, "SELECT id, n, note, x FROM items ORDER BY id"),
            rows(c, "SELECT k1, k2, a, b FROM tags ORDER BY k1, k2"))


def same_state(a, b, what):
    sa, sb = state(a), state(b)
    if sa != sb:
        da, db_ = {r[:2]: r for r in sa}, {r[:2]: r for r in sb}
        for k in [k for k in sorted(set(da) | set(db_)) if da.get(k) != db_.get(k)][:10]:
            print("DIFF", k, "\n   ", da.get(k), "\n   ", db_.get(k))
    va, vb = values(a), values(b)
    for ta, tb in zip(va, vb):
        for ra, rb in zip(sorted(set(ta) - set(tb)), sorted(set(tb) - set(ta))):
            print("ROW DIFF\n   ", ra, "\n   ", rb)
    check(sa == sb and va == vb, what)


# ---- devices ---------------------------------------------------------------

def device_round(c, rnd, me, others):
    cur = c.cursor()
    for _ in range(OPS):
        op = rnd.random()
        if op < 0.08 and others:
            p, _ = pull(rnd.choice(others), 0)
            if p:
                cur.execute("SELECT sync_apply_payload(%s)", (p,))
            continue
        own = rnd.random() < 0.3
        if rnd.random() < 0.7:
            k = f"{me}-{rnd.randrange(20)}" if own else f"k{rnd.randrange(ITEMS)}"
            v = (k, rnd.randrange(10 ** 6), f"{me}:{rnd.randrange(10 ** 6)}", rnd.random())
            if op < 0.45:
                cur.execute("UPDATE items SET n = %s, note = %s WHERE id = %s", (v[1], v[2], k))
            elif op < 0.75:
                cur.execute("""INSERT INTO items VALUES (%s, %s, %s, %s) ON CONFLICT (id)
                               DO UPDATE SET n = EXCLUDED.n, x = EXCLUDED.x""", v)
            else:
                cur.execute("DELETE FROM items WHERE id = %s", (k,))
        else:
            k1 = rnd.randrange(TAGS // 2) + (1000 * (int(me[1:]) + 1) if own else 0)
            k2 = f"t{rnd.randrange(2)}"
            if op < 0.5:
                cur.execute("""INSERT INTO tags VALUES (%s, %s, %s, %s) ON CONFLICT (k1, k2)
                               DO UPDATE SET a = EXCLUDED.a""",
                            (k1, k2, f"{me}:{rnd.randrange(10 ** 6)}", rnd.randrange(100)))
            elif op < 0.8:
                cur.execute("UPDATE tags SET b = %s WHERE k1 = %s AND k2 = %s",
                            (rnd.randrange(10 ** 6), k1, k2))
            else:
                cur.execute("DELETE FROM tags WHERE k1 = %s AND k2 = %s", (k1, k2))


def make_devices(rnd, seed):
    """Per device: its whole state after each round, and the sequence of its
    incremental payloads (the changes of each round, as a device pushes)."""
    devs = [db(f"dev{i}", seed)[1] for i in range(DEVICES)]
    fulls, incs = [], [[] for _ in devs]
    sinces = [one(c, "SELECT sync_db_version()") for c in devs]
    for _ in range(ROUNDS):
        for i, c in enumerate(devs):
            device_round(c, rnd, f"d{i}", [d for d in devs if d is not c])
            fulls.append(pull(c, 0)[0])
            p, sinces[i] = pull(c, sinces[i])
            if p:
                incs[i].append(p)
    return fulls, incs


def sequences(rnd, fulls, incs, dups=0):
    """What the appliers apply: each device's incremental payloads in order
    (they carry partial rows whose lives came whole in earlier ones), each
    whole state alone, and dups random extra whole states."""
    seqs = [list(s) for s in incs] + [[p] for p in fulls]
    seqs += [[rnd.choice(fulls)] for _ in range(dups)]
    rnd.shuffle(seqs)
    return seqs


def serial(rnd, conn, seqs):
    """Applies seqs one payload at a time, interleaving them at random but
    keeping the order inside each."""
    seqs = [list(s) for s in seqs if s]
    while seqs:
        s = rnd.choice(seqs)
        one(conn, "SELECT sync_apply_payload(%s)", (s.pop(0),))
        if not s:
            seqs.remove(s)


# ---- appliers ----------------------------------------------------------------

def appliers(dbname, seqs, errors, stats, rnd_seed, until=None):
    """APPLIERS threads take sequences of payloads from seqs (a queue) and
    apply each in its order; with until, they then go on applying random
    payloads of seqs again until then."""
    lock = threading.Lock()
    queue = [list(s) for s in seqs]
    pool = [p for s in seqs for p in s]

    def run(i):
        rnd = random.Random(rnd_seed + i)
        c = connect(dbname, autocommit=False)
        cur = c.cursor()
        mine = []
        while True:
            with lock:
                if not mine and queue:
                    mine = queue.pop()
                if mine:
                    p = mine.pop(0)
                elif until is not None and time.time() < until:
                    p = rnd.choice(pool)
                else:
                    break
            try:
                cur.execute("SELECT sync_apply_payload(%s)", (p,))
                cur.execute("SELECT sync_db_version()")
                if rnd.random() < 0.5:
                    time.sleep(rnd.random() * 0.005)  # held open, like a push's second round trip
                c.commit()
                with lock:
                    stats["applies"] += 1
            except Exception as e:  # noqa: BLE001
                c.rollback()
                errors.append(f"apply: {type(e).__name__}: {e}".strip())
        c.close()

    return [threading.Thread(target=run, args=(i,)) for i in range(APPLIERS)]


# ---- part 1 ------------------------------------------------------------------

def part1(rnd, seed, fulls, incs):
    hub_name, hub = db("hub1", seed)
    _, oracle = db("oracle1", seed)
    seqs = sequences(rnd, fulls, incs, dups=len(fulls) // 3)
    errors, stats = [], {"applies": 0}
    ts = appliers(hub_name, seqs, errors, stats, rnd.randrange(1 << 30))
    for t in ts:
        t.start()
    serial(rnd, oracle, seqs)
    for t in ts:
        t.join()
    check(not errors, f"{stats['applies']} parallel applies, no error: " + "; ".join(errors[:3]))
    same_state(hub, oracle, "parallel applies end where serial applies do (rows, causal lengths, stamps)")


# ---- part 2 ------------------------------------------------------------------

def writer(dbname, w, rnd, stop, errors, last, stats):
    c = connect(dbname, autocommit=False)
    cur = c.cursor()
    my_items = [f"k{i}" for i in range(ITEMS) if i % WRITERS == w]
    my_tags = [(i, f"t{j}") for i in range(TAGS // 2) for j in range(2) if (2 * i + j) % WRITERS == w]
    seq = 0
    while not stop.is_set():
        done = {}
        try:
            for _ in range(rnd.randrange(1, 5)):
                seq += 1
                note = f"w{w}:{seq}"
                if rnd.random() < 0.7:
                    ks = rnd.sample(my_items, rnd.choice((1, 1, 2, 3)))
                    op = rnd.random()
                    if op < 0.5:
                        cur.execute("""UPDATE items SET n = %s, note = %s, x = %s
                                       WHERE id = ANY(%s) RETURNING id""",
                                    (seq, note, rnd.random(), ks))
                        changed = [r[0] for r in cur.fetchall()]
                    elif op < 0.8:
                        for k in ks:
                            cur.execute("""INSERT INTO items VALUES (%s, %s, %s, %s) ON CONFLICT (id)
                                           DO UPDATE SET n = EXCLUDED.n, note = EXCLUDED.note,
                                           x = EXCLUDED.x""", (k, seq, note, rnd.random()))
                        changed = ks
                    else:
                        cur.execute("DELETE FROM items WHERE id = ANY(%s) RETURNING id", (ks,))
                        changed = [r[0] for r in cur.fetchall()]
                    if changed:
                        for k in changed:
                            cur.execute("SELECT cl FROM items__sync_clock WHERE id = %s", (k,))
                            cl = cur.fetchone()
                            cur.execute("SELECT n, note, x FROM items WHERE id = %s", (k,))
                            done[("items", k)] = (cl[0] if cl else None, cur.fetchone())
                else:
                    k1, k2 = rnd.choice(my_tags)
                    if rnd.random() < 0.75:
                        cur.execute("""INSERT INTO tags VALUES (%s, %s, %s, %s) ON CONFLICT (k1, k2)
                                       DO UPDATE SET a = EXCLUDED.a, b = EXCLUDED.b""",
                                    (k1, k2, note, seq))
                    else:
                        cur.execute("DELETE FROM tags WHERE k1 = %s AND k2 = %s", (k1, k2))
                    if cur.rowcount > 0:
                        cur.execute("SELECT cl FROM tags__sync_clock WHERE k1 = %s AND k2 = %s",
                                    (k1, k2))
                        cl = cur.fetchone()
                        cur.execute("SELECT a, b FROM tags WHERE k1 = %s AND k2 = %s", (k1, k2))
                        done[("tags", (k1, k2))] = (cl[0] if cl else None, cur.fetchone())
                if rnd.random() < 0.3:
                    time.sleep(rnd.random() * 0.003)
            c.commit()
            last.update(done)
            stats["writes"] += 1
        except Exception as e:  # noqa: BLE001
            c.rollback()
            errors.append(f"writer {w}: {type(e).__name__}: {e}".strip())
            return
    c.close()


def mirror(hub_name, m_name, stop, errors, box):
    src, dst = connect(hub_name), connect(m_name)
    since = 0
    while not stop.is_set():
        try:
            p, since = pull(src, since)
            box["since"] = since
            if p:
                one(dst, "SELECT sync_apply_payload(%s)", (p,))
        except Exception as e:  # noqa: BLE001
            errors.append(f"mirror: {type(e).__name__}: {e}")
            return
        time.sleep(0.02)


def part2(rnd, seed, fulls, incs):
    hub_name, hub = db("hub2", seed)
    m_name, mir = db("mirror2", seed)
    _, oracle = db("oracle2", seed)
    errors, stats = [], {"applies": 0, "writes": 0}
    stop = threading.Event()
    lasts = [dict() for _ in range(WRITERS)]
    box = {"since": 0}
    seqs = sequences(rnd, fulls, incs)
    ts = appliers(hub_name, seqs, errors, stats, rnd.randrange(1 << 30),
                  until=time.time() + RUN_SECONDS)
    ws = [threading.Thread(target=writer, args=(hub_name, w, random.Random(rnd.randrange(1 << 30)),
                                                stop, errors, lasts[w], stats))
          for w in range(WRITERS)]
    ms = threading.Thread(target=mirror, args=(hub_name, m_name, stop, errors, box))
    for t in ws + [ms] + ts:
        t.start()
    for t in ts:
        t.join()
    stop.set()
    for t in ws + [ms]:
        t.join()
    print(f"part 2: {stats['applies']} applies, {stats['writes']} local transactions")
    check(not errors, "no deadlock or other error reached an apply, a writer or the mirror: "
          + "; ".join(errors[:3]))
    check(stats["writes"] > 200 and stats["applies"] > 50, "the run did real work")

    # the mirror goes on from where it was: nothing committed meanwhile was skipped
    p, _ = pull(hub, box["since"])
    if p:
        one(mir, "SELECT sync_apply_payload(%s)", (p,))
    same_state(hub, mir, "the mirror, pulling incrementally during the run, equals the hub")

    # no device change lost: oracle = every device payload, serially, then the hub
    serial(rnd, oracle, seqs)
    p, _ = pull(hub, 0)
    one(oracle, "SELECT sync_apply_payload(%s)", (p,))
    same_state(hub, oracle, "hub == device payloads applied serially + the hub's own changes")

    # no local change lost: every writer's last committed change is still there
    bad = []
    checked = 0
    for last in lasts:
        for (table, k), (cl_l, row_l) in last.items():
            if table == "items":
                cl = one(hub, "SELECT cl FROM items__sync_clock WHERE id = %s", (k,))
                row = rows(hub, "SELECT n, note, x FROM items WHERE id = %s", (k,))
            else:
                cl = one(hub, "SELECT cl FROM tags__sync_clock WHERE k1 = %s AND k2 = %s", k)
                row = rows(hub, "SELECT a, b FROM tags WHERE k1 = %s AND k2 = %s", k)
            row = row[0] if row else None
            checked += 1
            if cl is None or cl < cl_l or (cl == cl_l and row != row_l):
                bad.append(f"{table} {k}: wrote cl {cl_l} {row_l}, now cl {cl} {row}")
    check(checked > 50 and not bad,
          f"the last committed local change of each of {checked} rows survived: " + "; ".join(bad[:3]))


# ---- part 3 ------------------------------------------------------------------

def in_thread(fn):
    box = {}

    def run():
        try:
            box["result"] = fn()
        except Exception as e:  # noqa: BLE001
            box["error"] = f"{type(e).__name__}: {e}"
        box["t"] = time.time()
    t = threading.Thread(target=run)
    t.start()
    return t, box


def part3(seed):
    hub_name, hub = db("hub3", seed)
    _, dev = db("dev3", seed)
    d = dev.cursor()

    def change(sql, args=()):
        """A payload of exactly this change: from the version before its
        transaction's, once every older xid has ended (a pull from the last
        pull's until would also carry the previous change whenever some
        transaction, an autoanalyze, held an older xid at that pull)."""
        d.execute("BEGIN")
        d.execute(sql, args)
        x = int(one(dev, "SELECT pg_current_xact_id()::text"))
        d.execute("COMMIT")
        wait_safe(dev, x)
        return bytes(one(dev, "SELECT sync_payload(%s)", (x - 1,)))
    # the hub learns the device's site first: an apply that registers a new
    # site holds its row in pgsync.sites until it commits
    one(hub, "SELECT sync_apply_payload(%s)", (change("UPDATE items SET n = -10 WHERE id = 'k0'"),))
    pa = change("UPDATE items SET n = -1 WHERE id = 'k1'")
    pb = change("UPDATE items SET n = -2 WHERE id = 'k2'")
    pc = change("UPDATE items SET note = 'from c' WHERE id IN ('k1', 'k3')")

    a = connect(hub_name, autocommit=False)
    a.cursor().execute("SELECT sync_apply_payload(%s)", (pa,))
    xid_a = int(one(a, "SELECT pg_current_xact_id()::text"))
    b = connect(hub_name)
    b.cursor().execute("SET statement_timeout = '5s'")
    t0 = time.time()
    one(b, "SELECT sync_apply_payload(%s)", (pb,))
    check(time.time() - t0 < 2, "an apply of other rows does not wait for an open apply")
    p, until = pull(hub, 0)
    got = {r["key"][0] for r in one(hub, "SELECT sync_payload_info(%s)", (p,))["rows"]}
    check(until < xid_a and "k2" in got and
          one(hub, "SELECT n FROM items WHERE id = 'k1'") != -1,
          "a pull during the open apply stops below its version (and has the committed one)")
    tc, bc = in_thread(lambda: one(connect(hub_name), "SELECT sync_apply_payload(%s)", (pc,)))
    time.sleep(0.5)
    check(tc.is_alive(), "an apply sharing a row with the open apply waits for it")
    t_commit = time.time()
    a.commit()
    tc.join(10)
    check("error" not in bc and not tc.is_alive() and bc["t"] >= t_commit,
          f"... and goes on when it commits {bc.get('error', '')}")
    p, _ = pull(hub, until)
    got = {r["key"][0] for r in one(hub, "SELECT sync_payload_info(%s)", (p,))["rows"]}
    check("k1" in got, "the next pull from that point brings the apply that committed later")
    check(rows(hub, "SELECT id, n, note FROM items WHERE id IN ('k1', 'k3') ORDER BY id") ==
          [("k1", -1, "from c"), ("k3", one(hub, "SELECT n FROM items WHERE id = 'k3'"), "from c")],
          "both applies' changes of the shared row merged")

    # the deadlock of test_concurrency, played exactly: a local transaction
    # holds k11; an apply writes k10, then needs k11; the local transaction
    # then writes k10, after more than deadlock_timeout (200 ms in cluster.sh)
    for lock_only in (False, True):
        dv, lv = f"dev {lock_only}", f"local {lock_only}"
        pd = change("UPDATE items SET note = %s WHERE id IN ('k10', 'k11')", (dv,))
        w = connect(hub_name, autocommit=False)
        wc = w.cursor()
        if lock_only:
            wc.execute("SELECT 1 FROM items WHERE id = 'k11' FOR UPDATE")
        else:
            wc.execute("UPDATE items SET note = %s WHERE id = 'k11'", (lv,))
        tp, bp = in_thread(lambda: one(connect(hub_name), "SELECT sync_apply_payload(%s)", (pd,)))
        time.sleep(0.4)
        t0 = time.time()
        err = None
        try:
            wc.execute("UPDATE items SET note = %s WHERE id = 'k10'", (lv,))
            w.commit()
        except Exception as e:  # noqa: BLE001
            err = f"{type(e).__name__}: {e}"
            w.rollback()
        waited = time.time() - t0
        tp.join(10)
        how = "merely locked" if lock_only else "written"
        check(err is None and waited < 1.0,
              f"the local transaction that {how} a row the apply needs never fails, nor waits "
              f"for the apply to end ({err or f'{waited * 1000:.0f} ms'})")
        check("error" not in bp and not tp.is_alive(),
              f"... and the apply gave way, then went through ({bp.get('error', 'ok')})")
        check(rows(hub, "SELECT note FROM items WHERE id IN ('k10', 'k11') ORDER BY id") ==
              [(lv,), (dv if lock_only else lv,)],
              "... and the newer change of each cell won")
        w.close()

    # a transaction that writes a clock row alone (an administrator's direct
    # UPDATE; a local writer always writes the base row too, and sync_gc is
    # kept apart by its table lock): the probe reads only the base key
    # index, so the apply meets it as a lock wait, gives way, waits for it
    # holding nothing, and goes through when it ends
    clock = one(hub, "SELECT clock::regclass::text FROM pgsync.tables WHERE tbl = 'items'::regclass")
    for end in ("commit", "rollback"):
        pe = change("UPDATE items SET note = %s WHERE id = 'k12'", (f"dev {end}",))
        g = connect(hub_name, autocommit=False)
        g.cursor().execute(f"UPDATE {clock} SET clk = clk WHERE id = 'k12'")
        te, be = in_thread(lambda: one(connect(hub_name), "SELECT sync_apply_payload(%s)", (pe,)))
        time.sleep(0.4)
        check(te.is_alive(), f"an apply waits for a transaction writing the row's clock row alone ({end})")
        t_end = time.time()
        getattr(g, end)()
        te.join(10)
        check("error" not in be and not te.is_alive() and be["t"] >= t_end and
              rows(hub, "SELECT note FROM items WHERE id = 'k12'") == [(f"dev {end}",)],
              f"... and goes through when it ends ({be.get('error', 'ok')})")
        g.close()

    # pgsync.serialize_applies = on (for benchmarks): the old global lock, so
    # an apply of other rows waits for an open apply again
    def serialized(p):
        c = connect(hub_name)
        c.cursor().execute("SET pgsync.serialize_applies = on")
        return one(c, "SELECT sync_apply_payload(%s)", (p,))
    p4 = change("UPDATE items SET n = -4 WHERE id = 'k4'")
    p5 = change("UPDATE items SET n = -5 WHERE id = 'k5'")
    a = connect(hub_name, autocommit=False)
    a.cursor().execute("SET pgsync.serialize_applies = on")
    a.cursor().execute("SELECT sync_apply_payload(%s)", (p4,))
    t5, b5 = in_thread(lambda: serialized(p5))
    time.sleep(0.5)
    check(t5.is_alive(), "with pgsync.serialize_applies an apply of other rows waits for an open apply")
    t_commit = time.time()
    a.commit()
    t5.join(10)
    check("error" not in b5 and not t5.is_alive() and b5["t"] >= t_commit and
          rows(hub, "SELECT n FROM items WHERE id IN ('k4', 'k5') ORDER BY id") == [(-4,), (-5,)],
          f"... and goes on when it commits {b5.get('error', '')}")
    a.close()


def part4():
    """Foreign keys: a payload whose child table comes first still applies
    parents first (inserts) and children first (deletes), with no rejection,
    while another apply adds children to the same parent."""
    ddl = ["CREATE TABLE b_lists (id text PRIMARY KEY, name text)",
           "CREATE TABLE a_todos (id text PRIMARY KEY, list text REFERENCES b_lists, t text)",
           "SELECT sync_init('a_todos')", "SELECT sync_init('b_lists')"]
    names = [f"pgsync_t_par_fk{i}" for i in range(3)]
    DBS.extend(names)
    hub, d1, d2 = (fresh_db(n, ddl) for n in names)
    d1.cursor().execute("INSERT INTO b_lists VALUES ('l1', 'one')")
    d1.cursor().execute("INSERT INTO a_todos VALUES ('t1', 'l1', 'first')")
    p1, _ = pull(d1, 0)
    check([t["name"] for t in one(hub, "SELECT sync_payload_info(%s)", (p1,))["tables"]][0] ==
          "a_todos", "the payload lists the child table first")
    # parents first on the fast path, not after a failed attempt (a sequence
    # counts every insert tried, rolled back or not)
    c = d2.cursor()
    c.execute("CREATE SEQUENCE tries")
    c.execute("""CREATE FUNCTION count_try() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN PERFORM nextval('tries'); RETURN NEW; END $$""")
    c.execute("CREATE TRIGGER tries BEFORE INSERT ON a_todos FOR EACH ROW EXECUTE FUNCTION count_try()")
    one(d2, "SELECT sync_apply_payload(%s)", (p1,))
    check(one(d2, "SELECT last_value FROM tries") == 1, "the child row was written once: parents first")
    c.execute("DROP TRIGGER tries ON a_todos")
    d2.cursor().execute("INSERT INTO a_todos VALUES ('t2', 'l1', 'second')")
    p2, _ = pull(d2, 0)
    t, box = in_thread(lambda: one(connect(names[0]), "SELECT sync_apply_payload(%s)", (p2,)))
    one(hub, "SELECT sync_apply_payload(%s)", (p1,))
    t.join(10)
    check("error" not in box and not rows(hub, "SELECT * FROM sync_rejections()") and
          rows(hub, "SELECT id, list FROM a_todos ORDER BY id") == [("t1", "l1"), ("t2", "l1")],
          f"parents first: two concurrent applies of children of one new parent {box.get('error', '')}")
    d2.cursor().execute("DELETE FROM a_todos")
    d2.cursor().execute("DELETE FROM b_lists")
    p3, _ = pull(d2, 0)
    one(hub, "SELECT sync_apply_payload(%s)", (p3,))
    check(not rows(hub, "SELECT * FROM sync_rejections()") and
          one(hub, "SELECT count(*) FROM b_lists") == 0 and one(hub, "SELECT count(*) FROM a_todos") == 0,
          "children first: deleting a parent and its children applies without rejection")
    for c in (hub, d1, d2):
        c.close()


def main():
    print("seed", SEED)
    rnd = random.Random(SEED)
    _, s = db("seed")
    s.cursor().execute(f"""INSERT INTO items SELECT 'k' || g, g, 'seed', g / 7.0
                           FROM generate_series(0, {ITEMS - 1}) g""")
    s.cursor().execute(f"""INSERT INTO tags SELECT g, 't' || j, 'seed', g
                           FROM generate_series(0, {TAGS // 2 - 1}) g, generate_series(0, 1) j""")
    seed, _ = pull(s, 0)
    t0 = time.time()
    fulls, incs = make_devices(rnd, seed)
    print(f"{len(fulls)} whole states and {sum(map(len, incs))} incremental payloads of "
          f"{DEVICES} devices in {time.time() - t0:.1f} s")
    part1(rnd, seed, fulls, incs)
    part2(rnd, seed, fulls, incs)
    part3(seed)
    part4()
    for c in list(DBS):
        drop_db(c)
    return 0


if __name__ == "__main__":
    sys.exit(main())
