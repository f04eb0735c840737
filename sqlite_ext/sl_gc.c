/*
 * sl_gc.c — tombstone GC on a device, and the floors that keep re-inserts
 * right after it (docs/DESIGN.md, "Tombstone GC with a horizon").
 *
 *   sync_gc()         collect the tombstones the server acknowledged: clock
 *                     ver <= sync_network.send_cursor (the delete was pushed
 *                     and acknowledged, or came from the server), without a
 *                     pending rejection. Assumes the server is the only peer.
 *   sync_gc(horizon)  collect tombstones with ver <= horizon: a local version
 *                     every peer has seen (peer-to-peer: the caller's promise)
 *   -> JSON {"horizon": H, "collected": n, "tables": {"t": {"collected": n,
 *            "floor": f}}}
 *
 * sync_gc_floor(tbl, floor) keeps, per synced table, the largest causal
 * length collected here or learned from the server (PS005). A local write
 * that starts a life for a key without a clock row starts above it
 * (sl_gc_life): the new life then beats every life of the key a replica may
 * still hold. Floors are read once per write transaction (SQLite has one
 * writer at a time, so a floor cannot move while a transaction writes).
 */
#include "sl_internal.h"

#include <string.h>

#include <cjson/cJSON.h>

static const char floor_meta_sql[] = "CREATE TABLE IF NOT EXISTS sync_gc_floor(tbl TEXT PRIMARY "
									 "KEY, floor INTEGER NOT NULL) WITHOUT ROWID";

/* floors_load reads every table's floor (0 without the floor table). */
static void
floors_load(db_conn *c)
{
	sqlite3_stmt *st;

	for (int i = 0; i < c->ntables; i++)
		c->tables[i]->gc_floor = 0;
	if (!sl_table_exists(c, "sync_gc_floor") ||
		sl_stmt_prepare(c, "SELECT tbl, floor FROM sync_gc_floor", &st) != SQLITE_OK)
		return; /* no floor table: nothing was ever collected */
	while (sqlite3_step(st) == SQLITE_ROW)
	{
		db_table *t = sl_table_by_name(c, (const char *) sqlite3_column_text(st, 0));

		if (t)
			t->gc_floor = sqlite3_column_int64(st, 1);
	}
	sl_stmt_done(c, st);
}

/*
 * sl_gc_life: the causal length a local write gives a key of t that has no
 * clock row: the first life (odd) or, for del, the first delete (even)
 * above the table's floor. Call it with the transaction's version taken.
 */
int64_t
sl_gc_life(db_conn *c, db_table *t, bool del)
{
	int64_t f;

	if (c->gc_floor_ver != c->txn_ver || !c->txn_ver)
	{
		floors_load(c);
		c->gc_floor_ver = c->txn_ver;
	}
	f = t->gc_floor < 0 ? 0 : t->gc_floor;
	f += f & 1; /* an even floor: lives above it are f + 1, f + 3, ... */
	return del ? f + 2 : f + 1;
}

/* sl_gc_floor_known: t's floor as of this transaction (0: no floor). */
int64_t
sl_gc_floor_known(db_conn *c, db_table *t)
{
	return sl_gc_life(c, t, false) - 1;
}

/* raise_floor: t's floor becomes at least f. */
static pgs_rc
raise_floor(db_conn *c, db_table *t, int64_t f, pgs_err *err)
{
	sqlite3_stmt *st = NULL;
	pgs_rc		  rc;

	if ((rc = sl_exec(c, floor_meta_sql, err)) != PGS_OK)
		return rc;
	if ((rc = sl_prepare(c, &st,
						 "INSERT INTO sync_gc_floor(tbl, floor) VALUES(?1, ?2) ON CONFLICT(tbl) DO "
						 "UPDATE SET floor = max(floor, excluded.floor)",
						 err)) != PGS_OK)
		return rc;
	sqlite3_bind_text(st, 1, t->name, -1, SQLITE_STATIC);
	sqlite3_bind_int64(st, 2, f);
	rc = sqlite3_step(st) == SQLITE_DONE ? PGS_OK : sl_dberr(c, err, "could not record a floor");
	sqlite3_finalize(st);
	if (rc == PGS_OK && f > t->gc_floor)
		t->gc_floor = f;
	return rc;
}

/*
 * sl_gc_renumber: the server refused the first life of row pk because it is
 * at or below what it collected (PS005, floor f): t's floor becomes f and
 * the row's life starts again above it, every column stamp kept and given
 * the current version, so the next push sends the row whole. *found = false
 * when the row has no live clock here any more.
 */
pgs_rc
sl_gc_renumber(db_conn *c, db_table *t, const pgs_value *pk, int64_t f, bool *found, pgs_err *err)
{
	pgs_rc r;

	*found = false;
	if ((r = raise_floor(c, t, f, err)) != PGS_OK)
		return r;
	return sl_touch_row_above(c, t, pk, f, found, err);
}

/* db_table_floor: a device takes the server's lives as they are. */
pgs_rc
db_table_floor(db_conn *c, db_table *t, int64_t *floor, pgs_err *err)
{
	(void) c, (void) t, (void) err;
	*floor = 0;
	return PGS_OK;
}

/* ---- collection ---------------------------------------------------------- */

/* rejected_keys: the JSON keys of t's pending server rejections (NULL-ended). */
static char **
rejected_keys(db_conn *c, db_table *t, int *n)
{
	sqlite3_stmt *st;
	char		**keys = NULL;

	*n = 0;
	if (sl_stmt_prepare(c,
						"SELECT pk FROM sync_network_rejected WHERE tbl = ?1 AND origin = 'server'",
						&st) != SQLITE_OK)
		return NULL;
	sqlite3_bind_text(st, 1, t->name, -1, SQLITE_STATIC);
	while (sqlite3_step(st) == SQLITE_ROW)
	{
		char **k = sqlite3_realloc64(keys, sizeof(char *) * (size_t) (*n + 2));

		if (!k)
			break;
		keys = k;
		keys[(*n)++] = sqlite3_mprintf("%s", sqlite3_column_text(st, 0));
		keys[*n] = NULL;
	}
	sl_stmt_done(c, st);
	return keys;
}

/* collect_table deletes t's tombstones with ver <= h; *n collected, *maxcl the largest cl. */
static pgs_rc
collect_table(db_conn *c, db_table *t, int64_t h, int64_t *n, int64_t *maxcl, pgs_err *err)
{
	int			  nrej;
	char		**rej = rejected_keys(c, t, &nrej);
	char		 *sql;
	sqlite3_stmt *st = NULL;
	pgs_rc		  rc = PGS_OK;

	*n = 0;
	*maxcl = 0;
	if (nrej == 0)
	{
		/* the common case: one statement */
		int s;

		sql = sqlite3_mprintf("DELETE FROM %s WHERE cl %% 2 = 0 AND ver <= ?1 RETURNING cl",
							  t->qclock);
		if (!sql)
			return pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
		rc = sl_prepare(c, &st, sql, err);
		sqlite3_free(sql);
		if (rc != PGS_OK)
			return rc;
		sqlite3_bind_int64(st, 1, h);
		while ((s = sqlite3_step(st)) == SQLITE_ROW)
		{
			int64_t cl = sqlite3_column_int64(st, 0);

			(*n)++;
			if (cl > *maxcl)
				*maxcl = cl;
		}
		if (s != SQLITE_DONE)
			rc = sl_dberr(c, err, "could not collect tombstones");
		sqlite3_finalize(st);
		return rc;
	}
	/* pending rejections keep their tombstone (the app may still retry or discard) */
	{
		char		 *cols = sl_pk_list(t, ""), *w = sl_pk_where(t, "", 1);
		sqlite3_stmt *del = NULL;

		sql = cols ? sqlite3_mprintf("SELECT %s, cl FROM %s WHERE cl %% 2 = 0 AND ver <= ?1", cols,
									 t->qclock)
				   : NULL;
		if (!sql || (rc = sl_prepare(c, &st, sql, err)) != PGS_OK)
			rc = rc != PGS_OK ? rc : pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
		sqlite3_free(sql);
		sql = w ? sqlite3_mprintf("DELETE FROM %s WHERE %s", t->qclock, w) : NULL;
		if (rc == PGS_OK && (!sql || (rc = sl_prepare(c, &del, sql, err)) != PGS_OK))
			rc = rc != PGS_OK ? rc : pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
		sqlite3_free(sql);
		sqlite3_free(cols);
		sqlite3_free(w);
		if (rc == PGS_OK)
		{
			/* keys first, deletes after: no statement deletes under an open scan */
			pgs_buf	  keys;
			pgs_value pk[64];
			int64_t	 *cls = NULL;
			int64_t	  nk = 0;

			pgs_buf_init(&keys);
			sqlite3_bind_int64(st, 1, h);
			while (rc == PGS_OK && t->npk <= 64 && sqlite3_step(st) == SQLITE_ROW)
			{
				char *json;
				bool  keep = false;

				for (int i = 0; i < t->npk; i++)
					sl_column_value(st, i, &pk[i]);
				if ((json = sl_pk_json(t, pk)) != NULL)
					for (int i = 0; i < nrej && !keep; i++)
						keep = rej[i] && strcmp(rej[i], json) == 0;
				sqlite3_free(json);
				if (keep)
					continue;
				pgs_key_encode(&keys, (uint32_t) t->npk, pk);
				{
					int64_t *nc = sqlite3_realloc64(cls, sizeof(int64_t) * (size_t) (nk + 1));

					if (!nc)
						rc = pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
					else
						(cls = nc)[nk++] = sqlite3_column_int64(st, t->npk);
				}
			}
			sqlite3_finalize(st);
			st = NULL;
			if (keys.oom)
				rc = pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
			{
				const uint8_t *p = keys.p, *end = keys.p + keys.len;

				for (int64_t k = 0; rc == PGS_OK && k < nk; k++)
				{
					for (int i = 0; rc == PGS_OK && i < t->npk; i++)
					{
						uint8_t type = *p++;

						rc = pgs_value_get(&p, end, type, &pk[i], err);
						sl_bind_value(del, i + 1, &pk[i]);
					}
					if (rc == PGS_OK && sqlite3_step(del) != SQLITE_DONE)
						rc = sl_dberr(c, err, "could not collect tombstones");
					sqlite3_reset(del);
					if (rc == PGS_OK)
					{
						(*n)++;
						if (cls[k] > *maxcl)
							*maxcl = cls[k];
					}
				}
			}
			pgs_buf_free(&keys);
			sqlite3_free(cls);
		}
		sqlite3_finalize(st);
		sqlite3_finalize(del);
	}
	for (int i = 0; i < nrej; i++)
		sqlite3_free(rej[i]);
	sqlite3_free(rej);
	return rc;
}

/* send_cursor: what the server acknowledged (0 without a configured server). */
static int64_t
send_cursor(db_conn *c)
{
	sqlite3_stmt *st;
	int64_t		  v = 0;

	if (sl_stmt_prepare(c, "SELECT value FROM sync_network WHERE key = 'send_cursor'", &st) !=
		SQLITE_OK)
		return 0;
	if (sqlite3_step(st) == SQLITE_ROW)
		v = sqlite3_column_int64(st, 0);
	sl_stmt_done(c, st);
	return v;
}

/*
 * sl_gc_collect collects every synced table's tombstones with ver <= h and
 * raises the floors; *json (cJSON, caller deletes) says what.
 */
static pgs_rc
gc_collect(db_conn *c, int64_t h, cJSON **json, pgs_err *err)
{
	cJSON  *j = cJSON_CreateObject(), *tabs = cJSON_CreateObject();
	int64_t total = 0;
	pgs_rc	rc = PGS_OK;

	cJSON_AddNumberToObject(j, "horizon", (double) h);
	for (int i = 0; i < c->ntables && rc == PGS_OK; i++)
	{
		db_table *t = c->tables[i];
		int64_t	  n = 0, maxcl = 0;
		cJSON	 *o = cJSON_CreateObject();

		if (h > 0)
			rc = collect_table(c, t, h, &n, &maxcl, err);
		if (rc == PGS_OK && maxcl > 0)
			rc = raise_floor(c, t, maxcl, err);
		total += n;
		cJSON_AddNumberToObject(o, "collected", (double) n);
		cJSON_AddNumberToObject(o, "floor", (double) (t->gc_floor > maxcl ? t->gc_floor : maxcl));
		cJSON_AddItemToObject(tabs, t->name, o);
	}
	cJSON_AddNumberToObject(j, "collected", (double) total);
	cJSON_AddItemToObject(j, "tables", tabs);
	*json = j;
	return rc;
}

/* sync_gc([horizon]) -> JSON */
static void
sync_gc(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	db_conn *c = sqlite3_user_data(ctx);
	int64_t	 h;
	cJSON	*j = NULL;
	pgs_err	 err;
	pgs_rc	 rc;

	if (sl_load(c, &err) != PGS_OK || !c->ready)
	{
		sqlite3_result_error(ctx, "sync_gc: nothing is synced yet; call sync_init first", -1);
		return;
	}
	if (argc > 0)
	{
		if (sqlite3_value_type(argv[0]) != SQLITE_INTEGER || sqlite3_value_int64(argv[0]) < 0)
		{
			sqlite3_result_error(ctx,
								 "sync_gc: horizon must be a local version (an integer >= 0) every "
								 "peer has acknowledged",
								 -1);
			return;
		}
		h = sqlite3_value_int64(argv[0]);
	}
	else
		h = send_cursor(c);
	if (sqlite3_exec(c->db, "SAVEPOINT sync_gc", NULL, NULL, NULL) != SQLITE_OK)
	{
		sqlite3_result_error(ctx, sqlite3_errmsg(c->db), -1);
		return;
	}
	floors_load(c);
	if ((rc = gc_collect(c, h, &j, &err)) != PGS_OK)
	{
		sqlite3_exec(c->db, "ROLLBACK TO sync_gc; RELEASE sync_gc", NULL, NULL, NULL);
		floors_load(c);
		cJSON_Delete(j);
		sqlite3_result_error(ctx, err.msg, -1);
		return;
	}
	sqlite3_exec(c->db, "RELEASE sync_gc", NULL, NULL, NULL);
	c->gc_floor_ver = -1; /* read again by the next write */
	sl_result_json(ctx, j);
}

int
sl_gc_register(sqlite3 *db, db_conn *c)
{
	int rc = sqlite3_create_function_v2(db, "sync_gc", 0,
										SQLITE_UTF8 | SQLITE_DIRECTONLY | SQLITE_RESULT_SUBTYPE, c,
										sync_gc, NULL, NULL, NULL);

	if (rc == SQLITE_OK)
		rc = sqlite3_create_function_v2(db, "sync_gc", 1,
										SQLITE_UTF8 | SQLITE_DIRECTONLY | SQLITE_RESULT_SUBTYPE, c,
										sync_gc, NULL, NULL, NULL);
	return rc;
}
