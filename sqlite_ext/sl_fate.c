/*
 * sl_fate.c — the receiving side of views and of every row's own fate, on
 * SQLite (database.h: db_table_view, db_row_forget, db_snapshot, db_held_*,
 * db_reject, db_table_parents, ...).
 *
 * A SQLite database is a device: what it cannot store of a payload is not
 * lost but kept aside in sync_held (one row per table and key, the change
 * with its clocks as a one-row payload), listed with its reason, and tried
 * again at every receive and after every sync_init (sl_apply_held). Rows the
 * server's view no longer contains are forgotten locally: base row and clock
 * row deleted with capture off, no tombstone, unless the device still has
 * something to say about them (a local change the server has not
 * acknowledged, or a rejection the app has not resolved).
 *
 * Tables (created by sl_ensure_meta):
 *   sync_held(tbl, k, code, message, frag, first_at, last_at, attempts)
 *   sync_snapshots(tbl, tracking) + sync_snapshot_keys(tbl, k): a snapshot
 *   being received; tracking = 0 when the table was empty at its beginning
 *   (a first sync: nothing to forget, nothing recorded).
 */
#include "sl_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cjson/cJSON.h>

const char sl_fate_meta_sql[] =
	"CREATE TABLE IF NOT EXISTS sync_held("
	"  tbl TEXT NOT NULL, k BLOB NOT NULL, code TEXT, message TEXT, frag BLOB NOT NULL,"
	"  first_at TEXT NOT NULL, last_at TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 1,"
	"  PRIMARY KEY (tbl, k)) WITHOUT ROWID;"
	"CREATE TABLE IF NOT EXISTS sync_snapshots(tbl INTEGER PRIMARY KEY, tracking INTEGER NOT "
	"NULL);"
	"CREATE TABLE IF NOT EXISTS sync_snapshot_keys(tbl INTEGER NOT NULL, k BLOB NOT NULL,"
	"  PRIMARY KEY (tbl, k)) WITHOUT ROWID;"
	"CREATE TABLE IF NOT EXISTS sync_snapshot_begin(tbl INTEGER PRIMARY KEY,"
	"  send_cursor INTEGER NOT NULL);"
	/* what is kept aside and why, for the app (docs/MIGRATIONS.md) */
	"CREATE VIEW IF NOT EXISTS sync_network_held AS SELECT tbl,"
	"  coalesce(sqlitesync_key_json(tbl, k), hex(k)) AS pk, code, message, first_at, last_at,"
	"  attempts FROM sync_held;";

/* ---- views ---- */

pgs_rc
db_table_view(db_conn *c, db_table *t, bool view, int64_t since, int64_t until, db_access *access,
			  bool *snapshot, pgs_err *err)
{
	(void) c, (void) t, (void) view, (void) since, (void) until, (void) err;
	*access = DB_ACCESS_FULL; /* no roles in SQLite */
	*snapshot = false;
	return PGS_OK;
}

pgs_rc
db_site_check(db_conn *c, uint32_t idx, pgs_err *err)
{
	(void) c, (void) idx, (void) err;
	return PGS_OK;
}

void
db_apply_careful(db_conn *c, bool careful)
{
	c->careful = careful;
}

bool
db_hold_rejected(db_conn *c)
{
	(void) c;
	return true;
}

/* ---- small SQL helpers ---- */

static int
step_done(sqlite3_stmt *st)
{
	int s = sqlite3_step(st);

	sqlite3_reset(st);
	return s;
}

static void
now_iso(char out[32])
{
	time_t	  t = time(NULL);
	struct tm tm;

	gmtime_r(&t, &tm);
	strftime(out, 32, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

/* where_pk: "pk1" = ?first AND ... (sqlite3_malloc'd) */
/* ---- rejections and held changes ---- */

/*
 * db_reject: this device cannot store a row the server sent (its own NOT
 * NULL, CHECK, trigger...). The change itself is held by the core; the
 * rejection is listed beside the server's in sync_network_rejected when the
 * network client is in use (origin 'local').
 */
void
db_reject(db_conn *c, db_table *t, const pgs_value *pk, const pgs_err *why)
{
	char		 *json;
	sqlite3_stmt *st;
	char		  now[32];

	if (!sl_table_exists(c, "sync_network_rejected") || !(json = sl_pk_json(t, pk)))
		return;
	now_iso(now);
	if (sl_stmt_prepare(c,
						"INSERT INTO sync_network_rejected(tbl, pk, origin, code, message, "
						"first_attempt, last_attempt, attempts) VALUES(?1, ?2, 'local', ?3, ?4, "
						"?5, ?5, 1) ON CONFLICT(tbl, pk, origin) DO UPDATE SET code = "
						"excluded.code, message = excluded.message, last_attempt = "
						"excluded.last_attempt, attempts = attempts + 1",
						&st) == SQLITE_OK)
	{
		sqlite3_bind_text(st, 1, t->name, -1, SQLITE_STATIC);
		sqlite3_bind_text(st, 2, json, -1, SQLITE_STATIC);
		sqlite3_bind_text(st, 3, why->code, -1, SQLITE_STATIC);
		sqlite3_bind_text(st, 4, why->msg, -1, SQLITE_STATIC);
		sqlite3_bind_text(st, 5, now, -1, SQLITE_STATIC);
		sqlite3_step(st);
		sl_stmt_done(c, st);
	}
	sqlite3_free(json);
}

pgs_rc
db_held_get(db_conn *c, pgs_name table, pgs_name key, const uint8_t **frag, size_t *len,
			pgs_err *err)
{
	pgs_rc rc;
	int	   s;

	*frag = NULL;
	*len = 0;
	if ((rc = sl_prepare(c, &c->st_held_get, "SELECT frag FROM sync_held WHERE tbl = ?1 AND k = ?2",
						 err)) != PGS_OK)
		return rc;
	sqlite3_bind_text(c->st_held_get, 1, (const char *) table.p, (int) table.len, SQLITE_STATIC);
	sqlite3_bind_blob(c->st_held_get, 2, key.p, (int) key.len, SQLITE_STATIC);
	s = sqlite3_step(c->st_held_get);
	if (s == SQLITE_ROW)
	{
		c->heldbuf.len = 0;
		pgs_buf_put(&c->heldbuf, sqlite3_column_blob(c->st_held_get, 0),
					(size_t) sqlite3_column_bytes(c->st_held_get, 0));
		*frag = c->heldbuf.p;
		*len = c->heldbuf.len;
	}
	sqlite3_reset(c->st_held_get);
	if (s != SQLITE_ROW && s != SQLITE_DONE)
		return sl_dberr(c, err, "could not read held changes");
	if (c->heldbuf.oom)
		return pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
	return PGS_OK;
}

pgs_rc
db_held_put(db_conn *c, pgs_name table, pgs_name key, const char *code, const char *message,
			const uint8_t *frag, size_t len, pgs_err *err)
{
	sqlite3_stmt **stp = frag ? &c->st_held_put : &c->st_held_del;
	pgs_rc		   rc;
	char		   now[32];

	rc =
		sl_prepare(c, stp,
				   frag ? "INSERT INTO sync_held(tbl, k, code, message, frag, first_at, last_at) "
						  "VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?6) ON CONFLICT(tbl, k) DO UPDATE SET "
						  "code = excluded.code, message = excluded.message, frag = excluded.frag, "
						  "last_at = excluded.last_at, attempts = attempts + 1"
						: "DELETE FROM sync_held WHERE tbl = ?1 AND k = ?2",
				   err);
	if (rc != PGS_OK)
		return rc;
	now_iso(now);
	sqlite3_bind_text(*stp, 1, (const char *) table.p, (int) table.len, SQLITE_STATIC);
	sqlite3_bind_blob(*stp, 2, key.p, (int) key.len, SQLITE_STATIC);
	if (frag)
	{
		sqlite3_bind_text(*stp, 3, code, -1, SQLITE_STATIC);
		sqlite3_bind_text(*stp, 4, message, -1, SQLITE_STATIC);
		sqlite3_bind_blob(*stp, 5, frag, (int) len, SQLITE_STATIC);
		sqlite3_bind_text(*stp, 6, now, -1, SQLITE_STATIC);
		c->held_again = true;
	}
	if (step_done(*stp) != SQLITE_DONE)
		return sl_dberr(c, err, "could not keep a change aside");
	sqlite3_clear_bindings(*stp);
	return PGS_OK;
}

/*
 * sl_apply_held tries every held change again (of one table, or all when
 * table is NULL): after sync_init made a table or column known, and at every
 * receive. A change that applies now leaves the store (and its local
 * rejection the list); one that still cannot be stored stays, with one more
 * attempt counted. Runs inside the caller's transaction, with capture off.
 */
pgs_rc
sl_apply_held(db_conn *c, const char *table, int64_t *applied, pgs_err *err)
{
	sqlite3_stmt *st = NULL;
	pgs_rc		  rc = PGS_OK;
	pgs_buf		  all;
	int			  s;

	*applied = 0;
	if (!sl_table_exists(c, "sync_held"))
		return PGS_OK;
	/* copy them out first: applying writes the same table */
	pgs_buf_init(&all);
	if (sl_stmt_prepare(c,
						table ? "SELECT tbl, k, frag FROM sync_held WHERE tbl = ?1"
							  : "SELECT tbl, k, frag FROM sync_held",
						&st) != SQLITE_OK)
		return sl_dberr(c, err, "could not read held changes");
	if (table)
		sqlite3_bind_text(st, 1, table, -1, SQLITE_STATIC);
	while ((s = sqlite3_step(st)) == SQLITE_ROW)
		for (int col = 0; col < 3; col++)
		{
			uint64_t n = (uint64_t) sqlite3_column_bytes(st, col);

			pgs_buf_varint(&all, n);
			pgs_buf_put(&all, sqlite3_column_blob(st, col), (size_t) n);
		}
	if (s != SQLITE_DONE)
		rc = sl_dberr(c, err, "could not read held changes");
	sl_stmt_done(c, st);
	if (all.oom)
		rc = pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
	for (const uint8_t *p = all.p, *end = all.p + all.len; rc == PGS_OK && p < end;)
	{
		pgs_name		f[3];
		pgs_apply_stats ast;
		bool			was = c->applying;

		for (int col = 0; col < 3; col++)
		{
			uint64_t n;
			int		 k = pgs_varint_get(p, end, &n);

			p += k;
			f[col] = (pgs_name){p, (uint32_t) n};
			p += n;
		}
		c->held_again = false;
		c->applying = true;
		rc = pgs_apply(c, f[2].p, f[2].len, true, &ast, err);
		c->applying = was;
		if (rc != PGS_OK)
			break;
		if (!c->held_again)
		{
			/* stored now: out of the store, and off the list */
			rc = db_held_put(c, f[0], f[1], NULL, NULL, NULL, 0, err);
			(*applied)++;
			if (rc == PGS_OK && sl_table_exists(c, "sync_network_rejected"))
			{
				char		  *tn = sqlite3_mprintf("%.*s", (int) f[0].len, (const char *) f[0].p);
				db_table	  *t = tn ? sl_table_by_name(c, tn) : NULL;
				pgs_value	   pk[64];
				const uint8_t *q = f[1].p, *qe = f[1].p + f[1].len;
				bool		   ok = t && t->npk <= 64;

				for (int i = 0; ok && i < t->npk; i++)
				{
					uint8_t type = *q++;

					ok = pgs_value_get(&q, qe, type, &pk[i], NULL) == PGS_OK;
				}
				if (ok)
				{
					char		 *json = sl_pk_json(t, pk);
					sqlite3_stmt *d;

					if (json && sl_stmt_prepare(c,
												"DELETE FROM sync_network_rejected WHERE tbl = "
												"?1 AND pk = ?2 AND origin = 'local'",
												&d) == SQLITE_OK)
					{
						sqlite3_bind_text(d, 1, t->name, -1, SQLITE_STATIC);
						sqlite3_bind_text(d, 2, json, -1, SQLITE_STATIC);
						sqlite3_step(d);
						sl_stmt_done(c, d);
					}
					sqlite3_free(json);
				}
				sqlite3_free(tn);
			}
		}
	}
	pgs_buf_free(&all);
	return rc;
}

/* ---- forgetting ---- */

/* protected_row: the device still has something to say about this row. */
static bool
protected_row(db_conn *c, db_table *t, const pgs_value *pk, int64_t ver)
{
	bool		  yes = false;
	char		 *json;
	sqlite3_stmt *st;

	if (ver > c->protect_ver)
		return true; /* a local change the server has not acknowledged */
	if (!c->protect_rejected)
		return false;
	if (!(json = sl_pk_json(t, pk)))
		return true;
	if (sl_stmt_prepare(c,
						"SELECT 1 FROM sync_network_rejected WHERE tbl = ?1 AND pk = ?2 AND "
						"origin = 'server'",
						&st) == SQLITE_OK)
	{
		sqlite3_bind_text(st, 1, t->name, -1, SQLITE_STATIC);
		sqlite3_bind_text(st, 2, json, -1, SQLITE_STATIC);
		yes = sqlite3_step(st) == SQLITE_ROW;
		sl_stmt_done(c, st);
	}
	sqlite3_free(json);
	return yes;
}

/*
 * sl_protect_load: what db_row_forget protects during this apply — local
 * versions the server has not acknowledged (send_cursor of the network
 * client), and rows of unresolved rejections. Without the network client,
 * nothing (a plain payload exchange never forgets anyway).
 *
 * Acknowledged when the pull was requested, not now: a push that another
 * connection of this app made while the pull was on its way committed on
 * the server after the pull's snapshot, so the payload does not have it,
 * and what the payload says is gone must not take it (nor may a snapshot,
 * whose start records this value: the device never gets its own changes
 * back). The network client sets protect_cap around its applies.
 */
void
sl_protect_load(db_conn *c)
{
	sqlite3_stmt *st;

	c->protect_ver = INT64_MAX;
	c->protect_rejected = false;
	if (!sl_table_exists(c, "sync_network"))
		return;
	if (sl_stmt_prepare(c, "SELECT value FROM sync_network WHERE key = 'send_cursor'", &st) ==
		SQLITE_OK)
	{
		if (sqlite3_step(st) == SQLITE_ROW)
			c->protect_ver = sqlite3_column_int64(st, 0);
		else
			c->protect_ver = 0;
		sl_stmt_done(c, st);
	}
	if (c->protect_capped && c->protect_cap < c->protect_ver)
		c->protect_ver = c->protect_cap;
	c->protect_rejected = sl_table_exists(c, "sync_network_rejected");
}

pgs_rc
db_row_forget(db_conn *c, db_table *t, const pgs_value *pk, bool *forgot, pgs_err *err)
{
	char		 *w, *sql;
	sqlite3_stmt *st = NULL;
	int64_t		  ver = -1;
	pgs_rc		  rc = PGS_OK;
	bool		  was = c->applying, had_row = false;

	*forgot = false;
	if ((rc = sl_flush(c, err)) != PGS_OK)
		return rc;
	if (!(w = sl_pk_where(t, "", 1)))
		return pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
	sql = sqlite3_mprintf("SELECT ver FROM %s WHERE %s", t->qclock, w);
	if (sql && sqlite3_prepare_v2(c->db, sql, -1, &st, NULL) == SQLITE_OK)
	{
		for (int i = 0; i < t->npk; i++)
			sl_bind_value(st, i + 1, &pk[i]);
		if (sqlite3_step(st) == SQLITE_ROW)
			ver = sqlite3_column_int64(st, 0);
		sqlite3_finalize(st);
	}
	sqlite3_free(sql);
	if (ver >= 0 && protected_row(c, t, pk, ver))
	{
		sqlite3_free(w);
		return PGS_OK;
	}
	/* base row first (capture is off while applying), then its clock */
	c->applying = true;
	for (int pass = 0; pass < 2 && rc == PGS_OK; pass++)
	{
		sql = sqlite3_mprintf("DELETE FROM %s WHERE %s", pass ? t->qclock : t->qname, w);
		st = NULL;
		if (!sql || sqlite3_prepare_v2(c->db, sql, -1, &st, NULL) != SQLITE_OK)
			rc = sl_dberr(c, err, "could not forget a row");
		else
		{
			for (int i = 0; i < t->npk; i++)
				sl_bind_value(st, i + 1, &pk[i]);
			if (sqlite3_step(st) != SQLITE_DONE)
			{
				int code = sqlite3_extended_errcode(c->db);

				/* a row that other rows still reference stays: not an error */
				if (pass == 0 && (code & 0xff) == SQLITE_CONSTRAINT)
				{
					sqlite3_finalize(st);
					sqlite3_free(sql);
					c->applying = was;
					sqlite3_free(w);
					return PGS_OK;
				}
				rc = sl_dberr(c, err, "could not forget a row");
			}
			else if (pass == 0)
			{
				had_row = sqlite3_changes(c->db) > 0;
				*forgot = had_row || ver >= 0;
			}
		}
		sqlite3_finalize(st);
		sqlite3_free(sql);
	}
	c->applying = was;
	sqlite3_free(w);
	if (rc == PGS_OK && had_row && was)
		sl_event(c, t, pk, "move-out"); /* an apply's forget, not an app's discard */
	return rc;
}

/* ---- snapshots ---- */

static pgs_rc
snap_sql(db_conn *c, pgs_err *err, const char *sql, int64_t id, const uint8_t *k, size_t klen,
		 int64_t extra)
{
	sqlite3_stmt *st;
	int			  s;

	if (sqlite3_prepare_v2(c->db, sql, -1, &st, NULL) != SQLITE_OK)
		return sl_dberr(c, err, "could not record a snapshot");
	sqlite3_bind_int64(st, 1, id);
	if (k)
		sqlite3_bind_blob(st, 2, k, (int) klen, SQLITE_STATIC);
	if (extra >= 0)
		sqlite3_bind_int64(st, k ? 3 : 2, extra);
	s = sqlite3_step(st);
	sqlite3_finalize(st);
	return s == SQLITE_DONE ? PGS_OK : sl_dberr(c, err, "could not record a snapshot");
}

static int64_t
query_int(db_conn *c, const char *sql, int64_t id, int64_t def)
{
	sqlite3_stmt *st;
	int64_t		  v = def;

	if (sl_stmt_prepare(c, sql, &st) == SQLITE_OK)
	{
		sqlite3_bind_int64(st, 1, id);
		if (sqlite3_step(st) == SQLITE_ROW)
			v = sqlite3_column_int64(st, 0);
		sl_stmt_done(c, st);
	}
	return v;
}

pgs_rc
db_snapshot(db_conn *c, db_table *t, db_snap_op op, const pgs_value *pk, int64_t *nforgot,
			pgs_err *err)
{
	pgs_rc rc;

	switch (op)
	{
		case DB_SNAP_BEGIN:
		{
			char *sql =
				sqlite3_mprintf("SELECT EXISTS (SELECT 1 FROM %s WHERE cl %% 2 = 1)", t->qclock);
			int64_t tracking = sql ? query_int(c, sql, 0, 1) : 1;

			sqlite3_free(sql);
			if ((rc = snap_sql(c, err, "DELETE FROM sync_snapshot_keys WHERE tbl = ?1", t->id, NULL,
							   0, -1)) != PGS_OK)
				return rc;
			/*
			 * What the server had acknowledged when the snapshot began: a row
			 * this device pushes while the snapshot's chunks arrive is not in
			 * them (they are pinned to the snapshot's start), so the end must
			 * not forget it (and the device's pulls never send its own changes
			 * back). Kept through the chunks, which are separate applies.
			 */
			if (sl_table_exists(c, "sync_snapshot_begin") &&
				(rc = snap_sql(c, err,
							   "INSERT OR REPLACE INTO sync_snapshot_begin(tbl, send_cursor) "
							   "VALUES(?1, ?2)",
							   t->id, NULL, 0, c->protect_ver == INT64_MAX ? 0 : c->protect_ver)) !=
					PGS_OK)
				return rc;
			return snap_sql(c, err,
							"INSERT OR REPLACE INTO sync_snapshots(tbl, tracking) VALUES(?1, ?2)",
							t->id, NULL, 0, tracking);
		}
		case DB_SNAP_SEEN:
		{
			pgs_buf k;

			if (query_int(c, "SELECT tracking FROM sync_snapshots WHERE tbl = ?1", t->id, 0) != 1)
				return PGS_OK;
			pgs_buf_init(&k);
			pgs_key_encode(&k, (uint32_t) t->npk, pk);
			rc = k.oom ? pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL)
					   : snap_sql(c, err,
								  "INSERT OR IGNORE INTO sync_snapshot_keys(tbl, k) VALUES(?1, ?2)",
								  t->id, k.p, k.len, -1);
			pgs_buf_free(&k);
			return rc;
		}
		case DB_SNAP_END:
		{
			int64_t tracking =
				query_int(c, "SELECT tracking FROM sync_snapshots WHERE tbl = ?1", t->id, -1);
			db_cursor	 *cur;
			pgs_buf		  gone;
			sqlite3_stmt *seen = NULL;

			int64_t protect = c->protect_ver;

			if (tracking == 1 && protect != INT64_MAX && sl_table_exists(c, "sync_snapshot_begin"))
			{
				int64_t begun =
					query_int(c, "SELECT send_cursor FROM sync_snapshot_begin WHERE tbl = ?1",
							  t->id, INT64_MAX);

				if (begun < c->protect_ver)
					c->protect_ver = begun; /* rows pushed since the snapshot began are kept */
			}
			if (tracking == 1)
			{
				/* collect the live keys the snapshot did not contain, then forget them */
				pgs_buf_init(&gone);
				if ((rc = db_keys_open(c, t, &cur, err)) != PGS_OK)
					return rc;
				if (sqlite3_prepare_v2(c->db,
									   "SELECT 1 FROM sync_snapshot_keys WHERE tbl = ?1 AND k = ?2",
									   -1, &seen, NULL) != SQLITE_OK)
					rc = sl_dberr(c, err, "could not read a snapshot");
				while (rc == PGS_OK)
				{
					bool			 done;
					const pgs_value *key;
					int64_t			 cl;
					pgs_buf			 k;

					if ((rc = db_keys_next(cur, &done, &key, &cl, err)) != PGS_OK || done)
						break;
					pgs_buf_init(&k);
					pgs_key_encode(&k, (uint32_t) t->npk, key);
					sqlite3_bind_int64(seen, 1, t->id);
					sqlite3_bind_blob(seen, 2, k.p, (int) k.len, SQLITE_STATIC);
					if (step_done(seen) != SQLITE_ROW)
					{
						pgs_buf_varint(&gone, k.len);
						pgs_buf_put(&gone, k.p, k.len);
					}
					pgs_buf_free(&k);
				}
				sqlite3_finalize(seen);
				db_changes_close(cur);
				for (const uint8_t *p = gone.p, *end = gone.p + gone.len; rc == PGS_OK && p < end;)
				{
					uint64_t	   n;
					const uint8_t *q, *qe;
					pgs_value	   kv[64];
					bool		   forgot;

					p += pgs_varint_get(p, end, &n);
					q = p;
					qe = p + n;
					p += n;
					for (int i = 0; rc == PGS_OK && i < t->npk && i < 64; i++)
					{
						uint8_t type = *q++;

						rc = pgs_value_get(&q, qe, type, &kv[i], err);
					}
					if (rc == PGS_OK)
						rc = db_row_forget(c, t, kv, &forgot, err);
					if (rc == PGS_OK && forgot && nforgot)
						(*nforgot)++;
				}
				pgs_buf_free(&gone);
				c->protect_ver = protect;
				if (rc != PGS_OK)
					return rc;
			}
			c->protect_ver = protect;
			if ((rc = snap_sql(c, err, "DELETE FROM sync_snapshot_keys WHERE tbl = ?1", t->id, NULL,
							   0, -1)) != PGS_OK)
				return rc;
			if (sl_table_exists(c, "sync_snapshot_begin") &&
				(rc = snap_sql(c, err, "DELETE FROM sync_snapshot_begin WHERE tbl = ?1", t->id,
							   NULL, 0, -1)) != PGS_OK)
				return rc;
			return snap_sql(c, err, "DELETE FROM sync_snapshots WHERE tbl = ?1", t->id, NULL, 0,
							-1);
		}
	}
	return PGS_OK;
}

/* ---- foreign keys between synced tables ---- */

/*
 * parent_ids reads which synced tables t references (PRAGMA foreign_key_list,
 * which SQLite prepares again on every read) once per schema: a foreign key,
 * like a newly synced table, comes with DDL, which changes the cookie, and
 * sl_load then builds every db_table anew.
 */
static pgs_rc
parent_ids(db_conn *c, db_table *t, pgs_err *err)
{
	sqlite3_stmt *st;
	int			  s, cap = 0;

	if (t->parents_read)
		return PGS_OK;
	t->nparent_ids = 0;
	if (sl_stmt_prepare(c, "SELECT DISTINCT \"table\" FROM pragma_foreign_key_list(?1)", &st) !=
		SQLITE_OK)
		return sl_dberr(c, err, "could not read foreign keys");
	sqlite3_bind_text(st, 1, t->name, -1, SQLITE_STATIC);
	while ((s = sqlite3_step(st)) == SQLITE_ROW)
	{
		db_table *p = sl_table_by_name(c, (const char *) sqlite3_column_text(st, 0));

		if (!p || p == t)
			continue;
		if (t->nparent_ids == cap)
		{
			int64_t *np;

			cap = cap ? cap * 2 : 4;
			if (!(np = sqlite3_realloc64(t->parent_ids, sizeof(int64_t) * (size_t) cap)))
			{
				sl_stmt_done(c, st);
				t->nparent_ids = 0;
				return pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
			}
			t->parent_ids = np;
		}
		t->parent_ids[t->nparent_ids++] = p->id;
	}
	sl_stmt_done(c, st);
	if (s != SQLITE_DONE)
	{
		t->nparent_ids = 0;
		return sl_dberr(c, err, "could not read foreign keys");
	}
	t->parents_read = true;
	return PGS_OK;
}

pgs_rc
db_table_parents(db_conn *c, db_table *t, db_table ***parents, int *n, pgs_err *err)
{
	pgs_rc rc;

	*n = 0;
	*parents = c->parents;
	if ((rc = parent_ids(c, t, err)) != PGS_OK)
		return rc;
	if (t->nparent_ids > c->parents_cap)
	{
		db_table **np = sqlite3_realloc64(c->parents, sizeof(db_table *) * (size_t) t->nparent_ids);

		if (!np)
			return pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
		c->parents = np;
		c->parents_cap = t->nparent_ids;
	}
	for (int i = 0; i < t->nparent_ids; i++)
		for (int k = 0; k < c->ntables; k++)
			if (c->tables[k]->id == t->parent_ids[i])
				c->parents[(*n)++] = c->tables[k];
	*parents = c->parents;
	return PGS_OK;
}

/* ---- sending a row again, whole ---- */

/*
 * sl_touch_row gives every stamp of row pk (and its life) the current local
 * version, keeping every HLC and site: the next build sends the row whole,
 * with its true clocks, so the server decides column by column as usual.
 * This is how a device re-sends a row the server lacks (rejected before,
 * retried by the app, or answered PS001). *found = false without a clock.
 */
pgs_rc
sl_touch_row(db_conn *c, db_table *t, const pgs_value *pk, bool *found, pgs_err *err)
{
	return sl_touch_row_above(c, t, pk, -1, found, err);
}

/*
 * sl_touch_row_above: sl_touch_row, and with floor >= 0 the row's life
 * starts again above floor (a first life the server collected below, PS005:
 * sl_gc_renumber) by this device; then *found = false also when the row is
 * deleted here (its delete goes out as usual).
 */
pgs_rc
sl_touch_row_above(db_conn *c, db_table *t, const pgs_value *pk, int64_t floor, bool *found,
				   pgs_err *err)
{
	const uint8_t *blob;
	size_t		   len;
	int64_t		   cl, ver;
	pgs_stamp	  *s;
	pgs_rowclock   rc;
	pgs_rc		   r;

	*found = false;
	if ((r = db_clock_get(c, t, pk, found, &cl, &blob, &len, err)) != PGS_OK || !*found)
		return r;
	if (floor >= 0 && (cl & 1) == 0)
	{
		*found = false; /* deleted meanwhile: the delete goes out as usual */
		return PGS_OK;
	}
	if (!(s = sl_stamps(c, t->ncols)))
		return pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
	rc = (pgs_rowclock){.ncols = t->ncols, .cols = s};
	if ((r = pgs_rowclock_decode(blob, len, &rc, err)) != PGS_OK ||
		(r = sl_txn_version(c, false, &ver, err)) != PGS_OK)
		return r;
	if (floor >= 0)
	{
		if (cl <= floor)
			cl = floor + 1 + (floor & 1);
		rc.cl_site = 0; /* this device's life */
	}
	rc.cl = cl;
	rc.cl_ver = ver;
	for (int i = 0; i < t->ncols; i++)
		if (s[i].hlc)
			s[i].ver = ver;
	c->scratch.len = 0;
	pgs_rowclock_encode(&rc, &c->scratch);
	if (c->scratch.oom)
		return pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
	return db_clock_put(c, t, pk, true, cl, ver, c->scratch.p, c->scratch.len, err);
}

/*
 * sl_pk_from_json: the key of t named by the JSON object text json (the form
 * sync_network_rejected shows: {"col": value, ...}). Strings are TEXT, or a
 * BLOB for "\x..." when no TEXT key of that value has a clock; numbers are
 * INTEGER when integral, else REAL. TEXT/BLOB point into *store
 * (sqlite3_free it). False when json does not name every key column.
 */
bool
sl_pk_from_json(db_conn *c, db_table *t, const char *json, pgs_value *pk, char **store)
{
	cJSON *j = cJSON_Parse(json);
	size_t need = 0, off = 0;
	bool   ok = cJSON_IsObject(j) && t->npk <= 64;

	*store = NULL;
	for (int i = 0; ok && i < t->npk; i++)
	{
		cJSON *v = cJSON_GetObjectItemCaseSensitive(j, t->pk_names[i]);

		ok = cJSON_IsString(v) || cJSON_IsNumber(v);
		if (ok && cJSON_IsString(v))
			need += strlen(v->valuestring) + 1;
	}
	if (ok && !(*store = sqlite3_malloc64(need + 1)))
		ok = false;
	for (int pass = 0; ok && pass < 2; pass++)
	{
		bool		   any_hex = false, found;
		int64_t		   cl;
		const uint8_t *b;
		size_t		   bl;
		pgs_err		   err;

		off = 0;
		for (int i = 0; i < t->npk; i++)
		{
			cJSON *v = cJSON_GetObjectItemCaseSensitive(j, t->pk_names[i]);

			if (cJSON_IsNumber(v))
			{
				double d = v->valuedouble;

				if (d == (double) (int64_t) d)
					pk[i] = (pgs_value){.type = PGS_INT, .v.i = (int64_t) d};
				else
					pk[i] = (pgs_value){.type = PGS_REAL, .v.r = d};
				continue;
			}
			{
				const char *sv = v->valuestring;
				size_t		n = strlen(sv);
				bool		hex = n >= 2 && n % 2 == 0 && sv[0] == '\\' && sv[1] == 'x';

				any_hex |= hex;
				if (pass == 1 && hex)
				{
					/* the BLOB of "\x..." */
					uint8_t *o = (uint8_t *) *store + off;

					for (size_t k = 2; k + 1 < n; k += 2)
					{
						char h[3] = {sv[k], sv[k + 1], 0};

						o[(k - 2) / 2] = (uint8_t) strtoul(h, NULL, 16);
					}
					pk[i] = (pgs_value){.type = PGS_BLOB, .len = (uint32_t) (n - 2) / 2, .v.p = o};
				}
				else
				{
					memcpy(*store + off, sv, n + 1);
					pk[i] = (pgs_value){.type = PGS_TEXT,
										.len = (uint32_t) n,
										.v.p = (const uint8_t *) *store + off};
				}
				off += n + 1;
			}
		}
		if (pass == 1 || !any_hex)
			break;
		/* TEXT first; a BLOB key only when no TEXT key of that spelling exists */
		if (db_clock_get(c, t, pk, &found, &cl, &b, &bl, &err) == PGS_OK && found)
			break;
	}
	cJSON_Delete(j);
	if (!ok)
	{
		sqlite3_free(*store);
		*store = NULL;
	}
	return ok;
}

/* sl_forget_now forgets row pk whatever protects it (an app's discard). */
pgs_rc
sl_forget_now(db_conn *c, db_table *t, const pgs_value *pk, pgs_err *err)
{
	int64_t pv = c->protect_ver;
	bool	pr = c->protect_rejected, forgot;
	pgs_rc	rc;

	c->protect_ver = INT64_MAX;
	c->protect_rejected = false;
	rc = db_row_forget(c, t, pk, &forgot, err);
	c->protect_ver = pv;
	c->protect_rejected = pr;
	return rc;
}

/* db_row_read: a live row and its clock (SQLite has no roles: every row is visible). */
pgs_rc
db_row_read(db_conn *c, db_table *t, const pgs_value *pk, bool *visible, int64_t *cl,
			const uint8_t **blob, size_t *blob_len, const pgs_value **cols, pgs_err *err)
{
	char  *sel = sqlite3_mprintf("SELECT c.cl, c.clk");
	char  *sql;
	pgs_rc rc = PGS_OK;
	int	   s;

	*visible = false;
	if ((rc = sl_flush(c, err)) != PGS_OK)
		goto out;
	for (int i = 0; i < t->ncols && sel; i++)
	{
		char *x = sqlite3_mprintf("%s, t.%s", sel, t->col_q[i]);

		sqlite3_free(sel);
		sel = x;
	}
	{
		/* join on every key column, the key bound once */
		char *on = sqlite3_mprintf("");
		char *wk = sl_pk_where(t, "c.", 1);

		for (int i = 0; i < t->npk && on; i++)
		{
			char *x =
				sqlite3_mprintf("%s%sc.%s = t.%s", on, i ? " AND " : "", t->pk_q[i], t->pk_q[i]);

			sqlite3_free(on);
			on = x;
		}
		sql = sel && on && wk ? sqlite3_mprintf("%s FROM %s AS c JOIN %s AS t ON %s WHERE %s", sel,
												t->qclock, t->qname, on, wk)
							  : NULL;
		sqlite3_free(on);
		sqlite3_free(wk);
	}
	if (!sql)
	{
		rc = pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
		goto out;
	}
	sqlite3_finalize(c->st_row_read);
	c->st_row_read = NULL;
	if (sqlite3_prepare_v2(c->db, sql, -1, &c->st_row_read, NULL) != SQLITE_OK)
	{
		sqlite3_free(sql);
		rc = sl_dberr(c, err, "could not read a row");
		goto out;
	}
	sqlite3_free(sql);
	for (int i = 0; i < t->npk; i++)
		sl_bind_value(c->st_row_read, i + 1, &pk[i]);
	s = sqlite3_step(c->st_row_read);
	if (s == SQLITE_ROW && (sqlite3_column_int64(c->st_row_read, 0) & 1))
	{
		if (!c->row_vals || c->row_vals_cap < t->ncols + 1)
		{
			sqlite3_free(c->row_vals);
			c->row_vals = sqlite3_malloc64(sizeof(pgs_value) * (t->ncols + 1));
			c->row_vals_cap = c->row_vals ? t->ncols + 1 : 0;
		}
		if (!c->row_vals)
		{
			rc = pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
			goto out;
		}
		*visible = true;
		*cl = sqlite3_column_int64(c->st_row_read, 0);
		*blob = sqlite3_column_blob(c->st_row_read, 1);
		*blob_len = (size_t) sqlite3_column_bytes(c->st_row_read, 1);
		for (int i = 0; i < t->ncols; i++)
			sl_column_value(c->st_row_read, 2 + i, &c->row_vals[i]);
		*cols = c->row_vals;
	}
	else if (s != SQLITE_ROW && s != SQLITE_DONE)
		rc = sl_dberr(c, err, "could not read a row");
out:
	sqlite3_free(sel);
	return rc;
}
