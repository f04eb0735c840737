#!/usr/bin/python3
"""test_dump_restore — pg_dump and pg_restore of a synced database.

A restore is a new database: CREATE EXTENSION gives it a new site id (so
every device starts over from a snapshot, docs/PROTOCOL.md 409 and the
server's site header) and its own cursor secret and GC state. What it keeps
(pg_ext/sql/pgsync.sql, pg_extension_config_dump) must work at once:
1. pg_restore runs without an error (pgsync.secret and pgsync.gc, whose row
   CREATE EXTENSION writes, were dumped too and collided);
2. the synced tables, their clocks, the sites and the device bindings come
   back; the site id is new;
3. new devices push at once (pgsync.sites_idx_seq was not dumped and
   restarted at 1, below the restored sites: "duplicate key" on the first
   pushes), and devices already known keep their index;
4. the HLC floor comes back (pgsync.hlc), so local edits stamp above what
   the database had;
5. a pull from 0 of the restored database carries what the source had.
"""
import os
import subprocess
import tempfile

from pglib import check, connect, drop_db, fresh_db, one, payload_of, rows

DDL = ["CREATE TABLE t (id text PRIMARY KEY, v int)", "SELECT sync_init('t')"]
PGBIN = os.environ.get("PGSYNC_PGBIN", "/usr/lib/postgresql/15/bin")


def table(c):
    return rows(c, "SELECT id, v FROM t ORDER BY id")


def main():
    dbs = ["dr_a", "dr_b", "dr_c", "dr_d", "dr_src", "dr_dst"]
    dump = tempfile.NamedTemporaryFile(prefix="pgsync-dump-", suffix=".dump", delete=False).name
    try:
        for d in dbs[:5]:
            fresh_db(d, DDL).close()
        src = connect("dr_src")
        for db, key in (("dr_a", "a1"), ("dr_b", "b1")):
            one(src, "SELECT sync_apply_payload(%s)", (payload_of(db, key, 1)[0],))
        _, site_a = payload_of("dr_a", "a1", 1)
        one(src, "SELECT sync_device(%s, 'alice')", (site_a,))
        src.cursor().execute("INSERT INTO t VALUES ('local', 7)")
        src.cursor().execute("DELETE FROM t WHERE id = 'b1'")
        before = {
            "site": one(src, "SELECT sync_site_id()"),
            "sites": rows(src, "SELECT idx, site FROM pgsync.sites WHERE idx > 0 ORDER BY idx"),
            "hlc": int(one(src, "SELECT last_value FROM pgsync.hlc")),
            "clocks": rows(src, "SELECT id, cl, clk FROM t__sync_clock ORDER BY id"),
            "table": table(src),
        }
        src.close()
        subprocess.run([f"{PGBIN}/pg_dump", "-Fc", "-f", dump, "dr_src"], check=True,
                       capture_output=True)
        admin = connect("postgres")
        admin.cursor().execute("CREATE DATABASE dr_dst")
        admin.close()
        r = subprocess.run([f"{PGBIN}/pg_restore", "--exit-on-error", "-d", "dr_dst", dump],
                           capture_output=True, text=True)
        check(r.returncode == 0, f"pg_restore of a synced database runs without an error: {r.stderr[:800]}")

        dst = connect("dr_dst")
        check(table(dst) == before["table"] and
              rows(dst, "SELECT id, cl, clk FROM t__sync_clock ORDER BY id") == before["clocks"],
              "the synced table and its clocks come back")
        check(rows(dst, "SELECT idx, site FROM pgsync.sites WHERE idx > 0 ORDER BY idx") == before["sites"]
              and one(dst, "SELECT principal FROM pgsync.devices WHERE site = %s", (site_a,)) == "alice",
              "the sites keep their indexes, the device bindings come back")
        check(one(dst, "SELECT sync_site_id()") != before["site"],
              "the restored database has a site id of its own (devices start over)")
        check(int(one(dst, "SELECT last_value FROM pgsync.hlc")) >= before["hlc"],
              "the HLC floor comes back")
        # new devices, then a known one
        for db, key in (("dr_c", "c1"), ("dr_d", "d1")):
            one(dst, "SELECT sync_apply_payload(%s)", (payload_of(db, key, 2)[0],))
        one(dst, "SELECT sync_apply_payload(%s)", (payload_of("dr_a", "a2", 3)[0],))
        idx = dict((str(s), i) for i, s in rows(dst, "SELECT idx, site FROM pgsync.sites"))
        check(len(idx) == len(before["sites"]) + 3 and idx[str(site_a)] == before["sites"][0][0],
              f"new devices push at once, a known one keeps its index: {sorted(idx.values())}")
        # the known sites' clocks still name them
        info = one(dst, "SELECT sync_payload_info(%s)", (bytes(one(dst, "SELECT sync_payload(0)")),))
        by_key = {r["key"][0]: r for r in info["rows"]}
        check(by_key["a1"]["changes"][0]["site"] == str(site_a) and by_key["b1"]["deleted"] and
              {"a1", "a2", "c1", "d1", "local"} <= set(by_key),
              "a pull from 0 carries every row, tombstone and site of the source and the new pushes")
        dst.cursor().execute("UPDATE t SET v = 8 WHERE id = 'local'")
        info = one(dst, "SELECT sync_payload_info(%s)", (bytes(one(dst, "SELECT sync_payload(0)")),))
        stamp = [r for r in info["rows"] if r["key"] == ["local"]][0]["changes"][0]["hlc"]
        check(stamp > before["hlc"], "a local edit after the restore stamps above the old floor")
        dst.close()
    finally:
        os.unlink(dump)
        for x in dbs:
            drop_db(x)


if __name__ == "__main__":
    main()
