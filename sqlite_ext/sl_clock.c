/*
 * sl_clock.c — db_version and HLC on SQLite.
 *
 * Every writing transaction takes one db_version, from sync_state, the first
 * time it captures or merges a change: UPDATE sync_state SET db_version =
 * db_version + 1. The value is cached on the connection until the commit or
 * rollback hook clears it. SQLite admits one writer at a time, so versions
 * are never handed out twice, across connections and processes alike.
 *
 * A savepoint rolled back inside the transaction may undo that UPDATE while
 * the cache survives. The bump also increments sync_state.seq, and each
 * capture trigger passes the current seq in: a seq that is not the one we
 * wrote makes capture check the version (sl_log_version in sl_log.c).
 * Clock writes made from C check their version in the same statement
 * (VER_CHECKED in sl_database.c) and a mismatch makes the capture take a
 * fresh version (sl_capture.c). A merge checks once, here, with verify =
 * true.
 * The persisted HLC is advanced at the same moment, and the connection then
 * ticks it in memory for each write of the transaction.
 */
#include "sl_internal.h"

#include <stdio.h>
#include <string.h>

pgs_rc
sl_txn_version(db_conn *c, bool verify, int64_t *ver, pgs_err *err)
{
	int s;

	if (c->txn_ver && verify)
	{
		if (sl_prepare(c, &c->st_ver_get, "SELECT db_version FROM sync_state", err) != PGS_OK)
			return err->rc;
		s = sqlite3_step(c->st_ver_get);
		if (s != SQLITE_ROW || sqlite3_column_int64(c->st_ver_get, 0) != c->txn_ver)
			c->txn_ver = 0; /* rolled back: take a new one */
		sqlite3_reset(c->st_ver_get);
	}
	if (c->txn_ver)
	{
		*ver = c->txn_ver;
		return PGS_OK;
	}
	if (sl_prepare(c, &c->st_ver_bump,
				   c->has_seq == 1
					   ? "UPDATE sync_state SET db_version = db_version + 1, hlc = max(hlc + 1, "
						 "?1), seq = seq + 1 RETURNING db_version, hlc, seq"
					   : "UPDATE sync_state SET db_version = db_version + 1, hlc = max(hlc + 1, "
						 "?1) RETURNING db_version, hlc",
				   err) != PGS_OK)
		return err->rc;
	/* now as a stamp, 0 when the wall clock reads past the format's range */
	sqlite3_bind_int64(c->st_ver_bump, 1, (sqlite3_int64) pgs_hlc_tick(0, pgs_now_ms()));
	s = sqlite3_step(c->st_ver_bump);
	if (s != SQLITE_ROW)
	{
		sqlite3_reset(c->st_ver_bump);
		return sl_dberr(c, err, "could not take a new db_version");
	}
	c->txn_ver = sqlite3_column_int64(c->st_ver_bump, 0);
	c->hlc = (uint64_t) sqlite3_column_int64(c->st_ver_bump, 1);
	if (c->clock_suspect)
	{
		c->clock_suspect = false;
		c->hlc = PGS_HLC_MAX + 1; /* repair below */
	}
	if (c->has_seq == 1)
		c->seq = sqlite3_column_int64(c->st_ver_bump, 2);
	s = sqlite3_step(c->st_ver_bump);
	sqlite3_reset(c->st_ver_bump);
	if (s != SQLITE_DONE)
		return sl_dberr(c, err, "could not take a new db_version");
	*ver = c->txn_ver;
	if (c->hlc > PGS_HLC_MAX || (int64_t) c->hlc < 0)
		return sl_repair_clock(c, *ver, err);
	/* renamed columns and column positions found at load (sl_alter.c) */
	if (c->alter_dirty)
		return sl_alter_persist(c, err);
	return PGS_OK;
}

/*
 * sl_repair_clock: the persisted HLC is past the format's range (a clock
 * that once read a year past 6400, under a build without pgs_hlc_tick's
 * rule). No peer ever accepted such a stamp, so every cell stamped past the
 * range is stamped again now, with this transaction's version (it goes out
 * with the next push), and the clock restarts from now (or from 1 when the
 * wall clock is still past the range). Done once; O(rows).
 */
pgs_rc
sl_repair_clock(db_conn *c, int64_t ver, pgs_err *err)
{
	uint64_t fresh = pgs_hlc_tick(0, pgs_now_ms());
	char	 sql[96];
	pgs_rc	 rc;

	/* runs inside a write (often a capture trigger): the loaded tables and the
	 * caller's buffers (c->scratch, sl_stamps) stay as they are */
	if (!c->ready && (rc = sl_load(c, err)) != PGS_OK)
		return rc;
	for (int i = 0; i < c->ntables; i++)
	{
		db_table	 *t = c->tables[i];
		sqlite3_stmt *sel = NULL;
		char		 *q;
		pgs_stamp	 *st;
		int			  s;

		/* every clock row: decode, restamp, write back */
		{
			char *keys = sl_pk_list(t, ""), *w = sl_pk_where(t, "", 3);

			q = keys ? sqlite3_mprintf("SELECT clk, %s FROM %s", keys, t->qclock) : NULL;
			s = q ? sqlite3_prepare_v2(c->db, q, -1, &sel, NULL) : SQLITE_NOMEM;
			sqlite3_free(q);
			q = w ? sqlite3_mprintf("UPDATE %s SET clk = ?1, ver = ?2 WHERE %s", t->qclock, w)
				  : NULL;
			sqlite3_free(keys);
			sqlite3_free(w);
		}
		if (s != SQLITE_OK || !q ||
			!(st = sqlite3_malloc64(sizeof(pgs_stamp) * (size_t) (t->ncols + 1))))
		{
			sqlite3_finalize(sel);
			sqlite3_free(q);
			return sl_dberr(c, err, "could not repair the clock");
		}
		{
			pgs_buf		  all, one;
			sqlite3_stmt *up = NULL;

			/* read everything first: the update writes the table being read */
			pgs_buf_init(&all);
			pgs_buf_init(&one);
			while ((s = sqlite3_step(sel)) == SQLITE_ROW)
			{
				pgs_rowclock rcl = {.ncols = t->ncols, .cols = st};
				bool		 bad = false;
				pgs_value	 pk;

				if (pgs_rowclock_decode(sqlite3_column_blob(sel, 0),
										(size_t) sqlite3_column_bytes(sel, 0), &rcl,
										NULL) != PGS_OK)
					continue;
				for (int k = 0; k < t->ncols; k++)
					if (st[k].hlc > PGS_HLC_MAX)
					{
						st[k].hlc = fresh;
						st[k].ver = ver;
						bad = true;
					}
				if (!bad)
					continue;
				one.len = 0;
				pgs_rowclock_encode(&rcl, &one);
				pgs_buf_varint(&all, one.len);
				pgs_buf_put(&all, one.p, one.len);
				for (int k = 0; k < t->npk; k++)
				{
					sl_column_value(sel, 1 + k, &pk);
					pgs_key_encode(&all, 1, &pk);
				}
			}
			sqlite3_finalize(sel);
			s = sqlite3_prepare_v2(c->db, q, -1, &up, NULL);
			sqlite3_free(q);
			for (const uint8_t *p = all.p, *end = all.p + all.len; s == SQLITE_OK && p < end;)
			{
				uint64_t  n;
				pgs_value keys[64];

				p += pgs_varint_get(p, end, &n);
				sqlite3_bind_blob(up, 1, p, (int) n, SQLITE_TRANSIENT);
				p += n;
				sqlite3_bind_int64(up, 2, ver);
				for (int k = 0; k < t->npk && k < 64; k++)
				{
					uint8_t type = *p++;

					if (pgs_value_get(&p, end, type, &keys[k], NULL) != PGS_OK)
						break;
					sl_bind_value(up, 3 + k, &keys[k]);
				}
				s = sqlite3_step(up) == SQLITE_DONE ? SQLITE_OK : SQLITE_ERROR;
				sqlite3_reset(up);
			}
			sqlite3_finalize(up);
			pgs_buf_free(&all);
			pgs_buf_free(&one);
			sqlite3_free(st);
			if (s != SQLITE_OK)
				return sl_dberr(c, err, "could not repair the clock");
		}
	}
	snprintf(sql, sizeof sql, "UPDATE sync_state SET hlc = %lld", (long long) fresh);
	c->hlc = fresh;
	rc = sl_exec(c, sql, err);
	c->clock_suspect = false;
	return rc;
}

uint64_t
sl_tick(db_conn *c)
{
	c->hlc = pgs_hlc_tick(c->hlc, pgs_now_ms());
	return c->hlc;
}

void
sl_txn_end(db_conn *c)
{
	c->txn_ver = 0;
	sl_log_reset(c);
}

pgs_stamp *
sl_stamps(db_conn *c, int n)
{
	if (n + 1 > c->stamps_cap)
	{
		pgs_stamp *s = sqlite3_realloc64(c->stamps, sizeof(pgs_stamp) * (n + 1));

		if (!s)
			return NULL;
		c->stamps = s;
		c->stamps_cap = n + 1;
	}
	return c->stamps;
}

/* ---- versions and the change log's markers (sl_log.c) ---- */

/*
 * sl_log_version: the transaction's version is valid given seq, the value of
 * sync_state.seq the trigger read. Equal to ours: nothing we wrote to
 * sync_state was undone, so neither were our version bump and markers.
 * Otherwise (a savepoint rolled back, or another connection wrote since our
 * last transaction, when the application replaced our commit hook) check the
 * version and forget what we knew about markers.
 */
pgs_rc
sl_log_version(db_conn *c, int64_t seq, pgs_err *err)
{
	int64_t ver, mine = c->seq;

	if (c->txn_ver && seq == c->seq)
		return PGS_OK;
	sl_log_reset(c);
	if (sl_txn_version(c, c->txn_ver != 0, &ver, err) != PGS_OK)
		return err->rc;
	if (c->seq == mine)
		c->seq = seq; /* no new version was needed: what was undone was a marker */
	return PGS_OK;
}
