#!/usr/bin/python3
"""test_corrupt — malformed payloads: a clear ERROR with a fitting SQLSTATE,
no crash, and no memory growth over thousands of attempts.

Corruptions: random byte flips and truncations (caught by the length and
checksum checks), and body damage behind a recomputed checksum (so the body
decoder itself sees garbage), both compressed and uncompressed payloads.
"""
import random
import sys

import psycopg2

from pglib import ROOT, check, connect, drop_db, fresh_db, one

sys.path.insert(0, str(ROOT / "test" / "sqlite"))
import payload_codec as pc  # noqa: E402  (XXH3 + zstd through ctypes)

ALLOWED = {"22P03", "0A000", "54000", "42704", "42703", "22P02", "22003", "XX001", "22021"}
ITER = 4000


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def mutate(rnd, good):
    p = bytearray(good)
    kind = rnd.randrange(6)
    if kind == 0:			# flip bytes anywhere
        for _ in range(rnd.randint(1, 4)):
            p[rnd.randrange(len(p))] ^= 1 << rnd.randrange(8)
        return bytes(p)
    if kind == 1:			# truncate
        return bytes(p[:rnd.randrange(len(p))])
    if kind == 2:			# junk
        return bytes(rnd.randrange(256) for _ in range(rnd.randrange(200)))
    # body damage behind a valid checksum (decompressed body, resealed)
    h = pc.header(good)
    body = bytearray(pc.body(good))
    if kind == 3:
        for _ in range(rnd.randint(1, 6)):
            body[rnd.randrange(len(body))] = rnd.randrange(256)
    elif kind == 4:
        cut = rnd.randrange(len(body))
        body = body[:cut]
    else:					# huge forged counts / lengths
        pos = rnd.randrange(len(body))
        body[pos:pos + 5] = b"\xff\xff\xff\xff\x0f"
    h.flags = 0
    h.body_len = h.stored_len = len(body)
    return pc.seal(h, bytes(body))


def main():
    src = fresh_db("pgsync_t_corrupt", [
        "CREATE TABLE t (id text PRIMARY KEY, a int, b float8, c text, d bytea)",
        "SELECT sync_init('t')",
        """INSERT INTO t SELECT 'k' || g, g, g / 3.0, repeat('x', g % 40), '\\x0102'
           FROM generate_series(1, 300) g"""])
    good_c = bytes(one(src, "SELECT sync_payload(0)"))
    src.cursor().execute("UPDATE t SET c = md5(id) WHERE a % 7 = 0")
    good_u = bytes(one(src, "SELECT sync_payload(%s)", (pc.header(good_c).until,)))
    check(pc.header(good_c).flags & 1 == 1, "the full payload is compressed")
    dst = fresh_db("pgsync_t_corrupt_dst", [
        "CREATE TABLE t (id text PRIMARY KEY, a int, b float8, c text, d bytea)",
        "SELECT sync_init('t')"])
    pid = one(dst, "SELECT pg_backend_pid()")
    started = one(dst, "SELECT pg_postmaster_start_time()")
    rnd = random.Random(7)
    codes = {}
    base = None
    for i in range(ITER):
        p = mutate(rnd, good_c if i % 2 else good_u)
        try:
            one(dst, "SELECT sync_apply_payload(%s)", (p,))
            codes["applied"] = codes.get("applied", 0) + 1
        except psycopg2.Error as e:
            codes[e.pgcode] = codes.get(e.pgcode, 0) + 1
            if e.pgcode not in ALLOWED:
                # the source carries this run's site id and clocks: the payload
                # itself, not the seed, is what reproduces it
                print("unexpected:", e.pgcode, e.pgerror, "for the payload", p.hex())
                return 1
        if i == 300:
            base = rss_kb(pid)
    grown = rss_kb(pid) - base
    print("outcomes:", codes)
    check(one(dst, "SELECT pg_postmaster_start_time()") == started, "the server never restarted")
    check(set(codes) - {"applied"} <= ALLOWED, "every failure had a payload-related SQLSTATE")
    check(grown < 4096, f"backend memory did not grow ({grown} kB over {ITER - 300} payloads)")

    # the same inside one transaction with savepoints
    tx = connect("pgsync_t_corrupt_dst", autocommit=False)
    cur = tx.cursor()
    tpid = one(tx, "SELECT pg_backend_pid()")
    base = None
    for i in range(2000):
        cur.execute("SAVEPOINT s")
        try:
            cur.execute("SELECT sync_apply_payload(%s)", (mutate(rnd, good_c),))
        except psycopg2.Error:
            pass
        cur.execute("ROLLBACK TO SAVEPOINT s")
        cur.execute("RELEASE SAVEPOINT s")
        if i == 200:
            base = rss_kb(tpid)
    grown = rss_kb(tpid) - base
    tx.rollback()
    check(grown < 4096, f"no growth inside one transaction with savepoints ({grown} kB)")

    # the intact payloads still apply (on a fresh replica: the mutations that
    # happened to decode into plausible rows did apply above)
    dst2 = fresh_db("pgsync_t_corrupt_dst2", [
        "CREATE TABLE t (id text PRIMARY KEY, a int, b float8, c text, d bytea)",
        "SELECT sync_init('t')"])
    check(one(dst2, "SELECT sync_apply_payload(%s)", (good_c,)) > 0, "the intact payload applies")
    check(one(dst2, "SELECT sync_apply_payload(%s)", (good_u,)) >= 0, "and so does the next one")
    q = "SELECT * FROM t ORDER BY id"
    cs, cd = src.cursor(), dst2.cursor()
    cs.execute(q)
    cd.execute(q)
    check(cs.fetchall() == cd.fetchall(), "the replicas agree")
    for c in (src, dst, dst2, tx):
        c.close()
    drop_db("pgsync_t_corrupt_dst2")
    drop_db("pgsync_t_corrupt")
    drop_db("pgsync_t_corrupt_dst")
    return 0


if __name__ == "__main__":
    sys.exit(main())
