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
 * the cache survives. Capture does not re-read sync_state before each write
 * (that costs ~10% of a tracked insert); instead every clock write checks its
 * version in the same statement (VER_CHECKED in sl_database.c) and a
 * mismatch makes the capture take a fresh version (sl_capture.c). A merge
 * checks once, here, with verify = true.
 * The persisted HLC is advanced at the same moment, and the connection then
 * ticks it in memory for each write of the transaction.
 */
#include "sl_internal.h"

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
				   "UPDATE sync_state SET db_version = db_version + 1, hlc = max(hlc + 1, ?1) "
				   "RETURNING db_version, hlc",
				   err) != PGS_OK)
		return err->rc;
	sqlite3_bind_int64(c->st_ver_bump, 1, (sqlite3_int64) pgs_hlc_from_ms(pgs_now_ms()));
	s = sqlite3_step(c->st_ver_bump);
	if (s != SQLITE_ROW)
	{
		sqlite3_reset(c->st_ver_bump);
		return sl_dberr(c, err, "could not take a new db_version");
	}
	c->txn_ver = sqlite3_column_int64(c->st_ver_bump, 0);
	c->hlc = (uint64_t) sqlite3_column_int64(c->st_ver_bump, 1);
	s = sqlite3_step(c->st_ver_bump);
	sqlite3_reset(c->st_ver_bump);
	if (s != SQLITE_DONE)
		return sl_dberr(c, err, "could not take a new db_version");
	*ver = c->txn_ver;
	return PGS_OK;
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
