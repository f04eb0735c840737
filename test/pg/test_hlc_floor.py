#!/usr/bin/python3
"""test_hlc_floor — the persisted HLC floor (sequence pgsync.hlc).

pg_ext reads and raises it with the functions behind pg_sequence_last_value()
and setval() (pg_capture.c). What must hold:
1. an apply raises the floor to the largest stamp it received, in every
   backend's view: a local edit in another backend, made after the apply,
   is stamped above it;
2. a stamp below the floor leaves it where it is (the floor never goes
   down);
3. many backends applying stamps of different sizes at once leave the
   largest of them;
4. a stamp far ahead moves it no further than 5 minutes past now.
"""
import threading

from pglib import check, connect, drop_db, fresh_db, one

DDL = ["CREATE TABLE t (id text PRIMARY KEY, v int)", "SELECT sync_init('t')"]
MINUTE = 60 * 1000 << 16  # a minute of HLC (ms above 16 logical bits)
# (a remote stamp moves the clock at most 5 minutes past now: core/clock.c)


def stamps(conn, p):
    info = one(conn, "SELECT sync_payload_info(%s)", (p,))
    return [c["hlc"] for r in info["rows"] for c in r["changes"]]


def payload_at(db, key, ahead):
    """a one-row payload of db whose stamp is `ahead` HLC units past now"""
    c = connect(db)
    c.cursor().execute("SELECT setval('pgsync.hlc', (SELECT last_value FROM pgsync.hlc) + %s)",
                       (ahead,))
    c.cursor().execute("INSERT INTO t VALUES (%s, 1)", (key,))
    p = bytes(one(c, "SELECT sync_payload(0)"))
    c.close()
    return p


def main():
    names = ["hf_a", "hf_d"] + [f"hf_s{i}" for i in range(6)]
    try:
        for n in names:
            fresh_db(n, DDL).close()
        d = connect("hf_d")
        floor0 = one(d, "SELECT last_value FROM pgsync.hlc")

        # 1. an apply raises the floor; another backend's edit is stamped above
        p = payload_at("hf_a", "far", MINUTE)
        far = max(stamps(d, p))
        check(far > floor0 + MINUTE // 2, "the payload's stamp is a minute ahead")
        one(d, "SELECT sync_apply_payload(%s)", (p,))
        check(one(d, "SELECT last_value FROM pgsync.hlc") == far,
              "the apply raised the floor to the received stamp")
        other = connect("hf_d")
        other.cursor().execute("INSERT INTO t VALUES ('local', 1)")
        mine = bytes(one(other, "SELECT sync_payload(0)"))
        local = [c["hlc"] for r in one(other, "SELECT sync_payload_info(%s)", (mine,))["rows"]
                 if r["key"] == ["local"] for c in r["changes"]]
        check(local and min(local) > far, "another backend's later edit is stamped above it")
        other.close()

        # 2. a smaller stamp leaves the floor alone
        before = one(d, "SELECT last_value FROM pgsync.hlc")
        one(d, "SELECT sync_apply_payload(%s)", (payload_at("hf_s0", "near", 0),))
        check(one(d, "SELECT last_value FROM pgsync.hlc") == before,
              "an apply of an older stamp leaves the floor where it is")

        # 3. backends racing with stamps of different sizes: the largest stays
        ps = [payload_at(f"hf_s{i}", f"k{i}", MINUTE * (2 + i) // 3) for i in range(6)]
        top = max(max(stamps(d, p)) for p in ps)
        for _ in range(3):
            barrier = threading.Barrier(len(ps))
            errors = []

            def push(p):
                c = connect("hf_d")
                try:
                    barrier.wait()
                    one(c, "SELECT sync_apply_payload(%s)", (p,))
                except Exception as e:  # noqa: BLE001
                    errors.append(e)
                finally:
                    c.close()
            ts = [threading.Thread(target=push, args=(p,)) for p in reversed(ps)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(60)
            check(not errors, f"the racing applies succeeded ({errors[:1]})")
        check(one(d, "SELECT last_value FROM pgsync.hlc") == top,
              "the floor is the largest stamp the racing applies received")

        # 4. a stamp an hour ahead drags the floor no further than 5 minutes past now
        one(d, "SELECT sync_apply_payload(%s)", (payload_at("hf_a", "hour", 60 * MINUTE),))
        now = one(d, "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint") << 16
        got = one(d, "SELECT last_value FROM pgsync.hlc")
        check(top <= got <= now + 5 * MINUTE + MINUTE // 60,
              "a stamp an hour ahead moves the floor at most 5 minutes past now")
        d.close()
    finally:
        for n in names:
            drop_db(n)


if __name__ == "__main__":
    main()
