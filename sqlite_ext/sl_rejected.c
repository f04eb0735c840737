/*
 * sl_rejected.c — the device's side of "every change has its own fate":
 * the rejection list, sending a row again whole, discarding a change, and
 * asking the server for rows this device lacks (docs/DESIGN.md, "fate").
 *
 *   sync_network_rejected(tbl, pk, origin, code, message, first_attempt,
 *                         last_attempt, attempts)
 *       origin 'server': the server refused a change of ours; it stays local
 *       (and is never forgotten by a pull) until it lands or is discarded.
 *       origin 'local': this device could not store a server's row; the row
 *       is held (sync_held) and tried again at every receive.
 *   sync_network_want(tbl, pk): rows to fetch whole (POST /v1/rows): a
 *       discarded change (the server's version replaces it), or a change the
 *       server sent for a row this device does not have (PS001).
 *   sync_network_recheck(tbl, pk, gen): rows fetched that way, asked for
 *       once more after the next pull that began after the fetch (see
 *       sl_recheck_begin).
 *
 * A row the server refused and the app then fixed (UPDATE) goes out whole,
 * not as the changed column only: the server may not have it at all. The
 * same happens by itself, once, for a row the server answers PS001.
 */
#include "sl_network.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cjson/cJSON.h>

const char sl_rejected_meta_sql[] =
	"CREATE TABLE IF NOT EXISTS sync_network_rejected("
	"  tbl TEXT NOT NULL, pk TEXT NOT NULL, origin TEXT NOT NULL DEFAULT 'server',"
	"  code TEXT, message TEXT, first_attempt TEXT NOT NULL, last_attempt TEXT NOT NULL,"
	"  attempts INTEGER NOT NULL DEFAULT 1, PRIMARY KEY (tbl, pk, origin)) WITHOUT ROWID;"
	"CREATE TABLE IF NOT EXISTS sync_network_want("
	"  tbl TEXT NOT NULL, pk TEXT NOT NULL, PRIMARY KEY (tbl, pk)) WITHOUT ROWID;"
	"CREATE TABLE IF NOT EXISTS sync_network_recheck("
	"  tbl TEXT NOT NULL, pk TEXT NOT NULL, gen INTEGER NOT NULL, PRIMARY KEY (tbl, pk)) "
	"WITHOUT ROWID;";

static bool
exec(sqlite3 *db, const char *sql)
{
	return sqlite3_exec(db, sql, NULL, NULL, NULL) == SQLITE_OK;
}

/* kept: one literal statement (SAVEPOINT, RELEASE, ...), prepared once */
static bool
kept(sl_net *n, const char *sql)
{
	return sl_stmt_exec(n->c, sql);
}

/*
 * sl_rejected_meta creates the tables; a list of an older version
 * (id, at, tbl, pk, code, message: one row per refusal) becomes one row
 * per (table, key) with its first and last attempt and the count.
 */
bool
sl_rejected_meta(sqlite3 *db)
{
	sqlite3_stmt *st;
	bool		  old = false;

	if (sqlite3_prepare_v2(
			db, "SELECT 1 FROM pragma_table_info('sync_network_rejected') WHERE name = 'at'", -1,
			&st, NULL) == SQLITE_OK)
	{
		old = sqlite3_step(st) == SQLITE_ROW;
		sqlite3_finalize(st);
	}
	if (old && !exec(db, "SAVEPOINT sync_rejected_upgrade;"
						 "ALTER TABLE sync_network_rejected RENAME TO sync_network_rejected_v1;"))
		return false;
	if (!exec(db, sl_rejected_meta_sql))
		return false;
	if (old)
		return exec(db,
					"INSERT OR IGNORE INTO sync_network_rejected(tbl, pk, origin, code, message, "
					"first_attempt, last_attempt, attempts) SELECT coalesce(tbl, ''), "
					"coalesce(pk, ''), 'server', code, message, min(at), max(at), count(*) FROM "
					"sync_network_rejected_v1 GROUP BY tbl, pk;"
					"DROP TABLE sync_network_rejected_v1; RELEASE sync_rejected_upgrade;");
	return true;
}

static void
now_iso(char out[32])
{
	time_t	  t = time(NULL);
	struct tm tm;

	gmtime_r(&t, &tm);
	strftime(out, 32, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

/* row_of: the table and key of a list entry; false when gone or malformed. */
static bool
row_of(sl_net *n, const char *tbl, const char *pkjson, db_table **t, pgs_value *pk, char **store)
{
	pgs_err err;

	*store = NULL;
	if (sl_load(n->c, &err) != PGS_OK || !(*t = sl_table_by_name(n->c, tbl)))
		return false;
	return sl_pk_from_json(n->c, *t, pkjson, pk, store);
}

/* clock_ver: the local version of the row's newest stamp, -1 without a clock. */
static int64_t
clock_ver(sl_net *n, db_table *t, const pgs_value *pk)
{
	char		 *w = sl_pk_where(t, "", 1), *sql;
	sqlite3_stmt *st;
	int64_t		  v = -1;

	sql = w ? sqlite3_mprintf("SELECT ver FROM %s WHERE %s", t->qclock, w) : NULL;
	if (sql && sl_stmt_prepare(n->c, sql, &st) == SQLITE_OK)
	{
		for (int i = 0; i < t->npk; i++)
			sl_bind_value(st, i + 1, &pk[i]);
		if (sqlite3_step(st) == SQLITE_ROW)
			v = sqlite3_column_int64(st, 0);
		sl_stmt_done(n->c, st);
	}
	sqlite3_free(w);
	sqlite3_free(sql);
	return v;
}

static int64_t
db_version_now(sl_net *n)
{
	sqlite3_stmt *st;
	int64_t		  v = 0;

	if (sl_stmt_prepare(n->c, "SELECT db_version FROM sync_state", &st) == SQLITE_OK)
	{
		if (sqlite3_step(st) == SQLITE_ROW)
			v = sqlite3_column_int64(st, 0);
		sl_stmt_done(n->c, st);
	}
	return v;
}

/*
 * cursor_follow: what the server's rows wrote here since version v0 needs no
 * sending back: when nothing was pending at v0, the send cursor moves along
 * (as after a pull).
 */
static void
cursor_follow(sl_net *n, int64_t v0)
{
	int64_t v1 = db_version_now(n);
	char   *sql;

	if (v1 <= v0)
		return;
	sql = sqlite3_mprintf("UPDATE sync_network SET value = '%lld' WHERE key = 'send_cursor' AND "
						  "CAST(value AS INTEGER) = %lld",
						  (long long) v1, (long long) v0);
	if (sql)
		exec(n->db, sql);
	sqlite3_free(sql);
}

/* row_alive: whether the row is live here, or deleted here by this device
 * (false: forgotten, or deleted by another replica's change). */
static bool
row_alive(sl_net *n, db_table *t, const pgs_value *pk, const char *tb, const char *pj, void *arg)
{
	char		 *w = sl_pk_where(t, "", 1), *sql;
	sqlite3_stmt *st;
	bool		  alive = false;

	(void) tb, (void) pj, (void) arg;
	sql = w ? sqlite3_mprintf("SELECT cl, clk FROM %s WHERE %s", t->qclock, w) : NULL;
	if (sql && sl_stmt_prepare(n->c, sql, &st) == SQLITE_OK)
	{
		for (int i = 0; i < t->npk; i++)
			sl_bind_value(st, i + 1, &pk[i]);
		if (sqlite3_step(st) == SQLITE_ROW)
		{
			const uint8_t *b = sqlite3_column_blob(st, 1), *be = b + sqlite3_column_bytes(st, 1);
			uint64_t	   cl_ver = 0, cl_site = 0;
			int			   k = b ? pgs_varint_get(b, be, &cl_ver) : 0;

			if (k)
				pgs_varint_get(b + k, be, &cl_site);
			/* a row this device deleted itself (site 0) is its own refused change */
			alive = (sqlite3_column_int64(st, 0) & 1) != 0 || cl_site == 0;
		}
		sl_stmt_done(n->c, st);
	}
	sqlite3_free(w);
	sqlite3_free(sql);
	return alive;
}

/* life_of: the row's causal length and who made its life when (false: no clock). */
static bool
life_of(sl_net *n, db_table *t, const pgs_value *pk, int64_t *cl, uint64_t *cl_ver,
		uint64_t *cl_site)
{
	const uint8_t *b;
	size_t		   len;
	bool		   found;
	pgs_err		   err;
	int			   k;

	if (db_clock_get(n->c, t, pk, &found, cl, &b, &len, &err) != PGS_OK || !found)
		return false;
	*cl_ver = *cl_site = 0;
	k = pgs_varint_get(b, b + len, cl_ver);
	if (k)
		pgs_varint_get(b + k, b + len, cl_site);
	return true;
}

/*
 * gc_lost: the server answered PS006 (it lacks the row, whose life is older
 * than what it collected) for a live row whose
 * life it had acknowledged: the life began here before this push (cl_ver <=
 * old_cursor: pushed, or received) and was not refused then (the caller
 * checks that the refusal is new). The server collected the row's tombstone:
 * the row was deleted (docs/DESIGN.md, "Tombstone GC").
 */
static bool
gc_lost(sl_net *n, const char *tbl, const char *pkjson, int64_t old_cursor)
{
	db_table *t;
	pgs_value pk[64];
	char	 *store;
	int64_t	  cl;
	uint64_t  cl_ver, cl_site;
	bool	  lost = false;

	(void) cl_site;

	if (!row_of(n, tbl, pkjson, &t, pk, &store))
		return false;
	if (life_of(n, t, pk, &cl, &cl_ver, &cl_site) && (cl & 1))
		lost = (int64_t) cl_ver <= old_cursor;
	sqlite3_free(store);
	return lost;
}

/* forget_lost: forget a row the server lost to GC, and its refusal. */
static bool
forget_lost(sl_net *n, const char *tbl, const char *pkjson)
{
	db_table *t;
	pgs_value pk[64];
	char	 *store, *sql;
	pgs_err	  err;
	bool	  ok = true;

	if (row_of(n, tbl, pkjson, &t, pk, &store))
	{
		ok = sl_forget_now(n->c, t, pk, &err) == PGS_OK;
		sqlite3_free(store);
	}
	sql = sqlite3_mprintf("DELETE FROM sync_network_rejected WHERE tbl = %Q AND pk = %Q AND "
						  "origin = 'server'",
						  tbl, pkjson);
	ok = ok && sql && exec(n->db, sql);
	sqlite3_free(sql);
	return ok;
}

/* renumber: PS005 — the floor is the message's "causal length floor N". */
static bool
renumber(sl_net *n, const char *tbl, const char *pkjson, const char *msg, bool *found)
{
	const char *f = strstr(msg, "causal length floor ");
	db_table   *t;
	pgs_value	pk[64];
	char	   *store, *sql;
	pgs_err		err;
	bool		ok = true;
	long long	floor = f ? strtoll(f + strlen("causal length floor "), NULL, 10) : 0;

	*found = false;
	if (floor > 0 && row_of(n, tbl, pkjson, &t, pk, &store))
	{
		ok = sl_gc_renumber(n->c, t, pk, floor, found, &err) == PGS_OK;
		sqlite3_free(store);
	}
	sql = sqlite3_mprintf("DELETE FROM sync_network_rejected WHERE tbl = %Q AND pk = %Q AND "
						  "origin = 'server' AND code = %Q",
						  tbl, pkjson, PGS_CODE_FLOOR);
	ok = ok && sql && exec(n->db, sql);
	sqlite3_free(sql);
	return ok;
}

/* touch: send row (tbl, pkjson) whole with the next push. */
static bool
touch(sl_net *n, const char *tbl, const char *pkjson, bool *found)
{
	db_table *t;
	pgs_value pk[64];
	char	 *store;
	pgs_err	  err;
	bool	  ok;

	*found = false;
	if (!row_of(n, tbl, pkjson, &t, pk, &store))
		return true;
	ok = sl_touch_row(n->c, t, pk, found, &err) == PGS_OK;
	sqlite3_free(store);
	return ok;
}

/*
 * sl_rejected_before_send: a refused row the app changed since (a fix by
 * UPDATE) goes out whole: the server may not have the row at all, and a
 * changed column alone could not be stored there. Inside the caller's
 * savepoint.
 */
bool
sl_rejected_before_send(sl_net *n, int64_t send_cursor)
{
	sqlite3_stmt *st;
	char		**rows = NULL;
	int			  nrows = 0;
	bool		  ok = true;

	if (sl_stmt_prepare(n->c, "SELECT tbl, pk FROM sync_network_rejected WHERE origin = 'server'",
						&st) != SQLITE_OK)
		return true;
	while (sqlite3_step(st) == SQLITE_ROW)
	{
		char **nr = sqlite3_realloc64(rows, sizeof(char *) * (size_t) (nrows + 2));

		if (!nr)
			break;
		rows = nr;
		rows[nrows++] = sqlite3_mprintf("%s", sqlite3_column_text(st, 0));
		rows[nrows++] = sqlite3_mprintf("%s", sqlite3_column_text(st, 1));
	}
	sl_stmt_done(n->c, st);
	for (int i = 0; i + 1 < nrows && ok; i += 2)
	{
		db_table *t;
		pgs_value pk[64];
		char	 *store;

		if (!rows[i] || !rows[i + 1] || !row_of(n, rows[i], rows[i + 1], &t, pk, &store))
			continue;
		if (clock_ver(n, t, pk) > send_cursor)
		{
			bool	found;
			pgs_err err;

			ok = sl_touch_row(n->c, t, pk, &found, &err) == PGS_OK;
		}
		sqlite3_free(store);
	}
	for (int i = 0; i < nrows; i++)
		sqlite3_free(rows[i]);
	sqlite3_free(rows);
	return ok;
}

/*
 * sl_rejected_after_push records the server's answer to a push of the local
 * versions (old_cursor, until]: every refused row (one entry per row, with
 * its attempts), and every earlier refusal whose row went out in this push
 * and was not refused again is resolved. A row answered PS001 (the server
 * lacks it and got only some columns) is sent again whole, once: *again
 * tells the caller to push again now. Inside the caller's savepoint.
 */
/*
 * settle: remove from sync_network_rejected the rows of origin for which
 * keep(n, table, key, arg) says false (collected first: the list is read
 * while it is decided).
 */
typedef bool (*keep_fn)(sl_net *n, db_table *t, const pgs_value *pk, const char *tbl,
						const char *pkjson, void *arg);

static bool
settle(sl_net *n, const char *origin, keep_fn keep, void *arg)
{
	sqlite3_stmt *st;
	char		**gone = NULL;
	int			  ngone = 0;
	bool		  ok = true;

	if (sl_stmt_prepare(n->c, "SELECT tbl, pk FROM sync_network_rejected WHERE origin = ?1", &st) !=
		SQLITE_OK)
		return true; /* no list yet */
	sqlite3_bind_text(st, 1, origin, -1, SQLITE_STATIC);
	while (sqlite3_step(st) == SQLITE_ROW)
	{
		const char *tb = (const char *) sqlite3_column_text(st, 0);
		const char *pj = (const char *) sqlite3_column_text(st, 1);
		db_table   *t;
		pgs_value	pk[64];
		char	   *store, **ng;
		bool		kept;

		if (!row_of(n, tb, pj, &t, pk, &store))
			continue;
		kept = keep(n, t, pk, tb, pj, arg);
		sqlite3_free(store);
		if (kept || !(ng = sqlite3_realloc64(gone, sizeof(char *) * (size_t) (ngone + 2))))
			continue;
		gone = ng;
		gone[ngone++] = sqlite3_mprintf("%s", tb);
		gone[ngone++] = sqlite3_mprintf("%s", pj);
	}
	sl_stmt_done(n->c, st);
	for (int i = 0; i + 1 < ngone; i += 2)
	{
		char *sql = sqlite3_mprintf("DELETE FROM sync_network_rejected WHERE tbl = %Q AND pk = %Q "
									"AND origin = %Q",
									gone[i], gone[i + 1], origin);

		ok = ok && sql && exec(n->db, sql);
		sqlite3_free(sql);
	}
	for (int i = 0; i < ngone; i++)
		sqlite3_free(gone[i]);
	sqlite3_free(gone);
	return ok;
}

/* after a push: the refused rows of this answer, and the range it sent */
typedef struct push_outcome
{
	char  **seen; /* table, key JSON, table, key JSON, ... refused again */
	int		nseen;
	int64_t old_cursor, until;
} push_outcome;

/* still_refused: a row stays listed unless it went out in this push and was not refused */
static bool
still_refused(sl_net *n, db_table *t, const pgs_value *pk, const char *tb, const char *pj,
			  void *arg)
{
	const push_outcome *o = arg;
	int64_t				v;

	for (int i = 0; i + 1 < o->nseen; i += 2)
		if (o->seen[i] && o->seen[i + 1] && strcmp(o->seen[i], tb) == 0 &&
			strcmp(o->seen[i + 1], pj) == 0)
			return true;
	v = clock_ver(n, t, pk);
	return !(v > o->old_cursor && v <= o->until);
}

/* still_held: a row this device refused stays listed while its change is held */
static bool
still_held(sl_net *n, db_table *t, const pgs_value *pk, const char *tb, const char *pj, void *arg)
{
	pgs_buf		  k;
	sqlite3_stmt *h;
	bool		  held = true;

	(void) tb, (void) pj, (void) arg;
	pgs_buf_init(&k);
	pgs_key_encode(&k, (uint32_t) t->npk, pk);
	if (!k.oom && sl_stmt_prepare(n->c, "SELECT count(*) FROM sync_held WHERE tbl = ?1 AND k = ?2",
								  &h) == SQLITE_OK)
	{
		sqlite3_bind_text(h, 1, t->name, -1, SQLITE_STATIC);
		sqlite3_bind_blob(h, 2, k.p, (int) k.len, SQLITE_STATIC);
		if (sqlite3_step(h) == SQLITE_ROW)
			held = sqlite3_column_int(h, 0) > 0;
		sl_stmt_done(n->c, h);
	}
	pgs_buf_free(&k);
	return held;
}

bool
sl_rejected_after_push(sl_net *n, const cJSON *rejected, int64_t old_cursor, int64_t until,
					   int64_t *nrej, bool *again)
{
	sqlite3_stmt *up = NULL;
	const cJSON	 *it;
	char		  now[32];
	char		**seen = NULL;
	int			  nseen = 0;
	bool		  ok = true;

	*nrej = 0;
	*again = false;
	now_iso(now);
	if (sl_stmt_prepare(n->c,
						"INSERT INTO sync_network_rejected(tbl, pk, origin, code, message, "
						"first_attempt, last_attempt, attempts) VALUES(?1, ?2, 'server', ?3, ?4, "
						"?5, ?5, 1) ON CONFLICT(tbl, pk, origin) DO UPDATE SET code = "
						"excluded.code, message = excluded.message, last_attempt = "
						"excluded.last_attempt, attempts = attempts + 1 RETURNING attempts",
						&up) != SQLITE_OK)
		return false;
	cJSON_ArrayForEach(it, rejected)
	{
		const cJSON *pk = cJSON_GetObjectItemCaseSensitive(it, "pk");
		const cJSON *t = cJSON_GetObjectItemCaseSensitive(it, "table");
		const cJSON *code = cJSON_GetObjectItemCaseSensitive(it, "code");
		const cJSON *m = cJSON_GetObjectItemCaseSensitive(it, "message");
		char		*pktext = pk ? cJSON_PrintUnformatted(pk) : NULL;
		int64_t		 attempts = 1;
		char	   **ns;

		if (!cJSON_IsString(t) || !pktext)
		{
			cJSON_free(pktext);
			continue;
		}
		sqlite3_bind_text(up, 1, t->valuestring, -1, SQLITE_TRANSIENT);
		sqlite3_bind_text(up, 2, pktext, -1, SQLITE_TRANSIENT);
		sqlite3_bind_text(up, 3, cJSON_IsString(code) ? code->valuestring : NULL, -1,
						  SQLITE_TRANSIENT);
		sqlite3_bind_text(up, 4, cJSON_IsString(m) ? m->valuestring : NULL, -1, SQLITE_TRANSIENT);
		sqlite3_bind_text(up, 5, now, -1, SQLITE_STATIC);
		if (sqlite3_step(up) == SQLITE_ROW)
			attempts = sqlite3_column_int64(up, 0);
		else
			ok = false;
		sqlite3_reset(up);
		(*nrej)++;
		if (cJSON_IsString(code) && strcmp(code->valuestring, PGS_CODE_GONE) == 0 &&
			attempts <= 1 && gc_lost(n, t->valuestring, pktext, old_cursor))
		{
			/* the server knew this life and lost it to GC: it was deleted */
			ok = ok && forget_lost(n, t->valuestring, pktext);
			(*nrej)--;
		}
		else if (cJSON_IsString(code) && strcmp(code->valuestring, PGS_CODE_INCOMPLETE) == 0 &&
				 attempts <= 1)
		{
			bool found;

			ok = ok && touch(n, t->valuestring, pktext, &found);
			*again |= found;
		}
		else if (cJSON_IsString(code) && strcmp(code->valuestring, PGS_CODE_FLOOR) == 0)
		{
			/* a first life at or below what the server collected: start it above */
			bool found = false;

			ok = ok && renumber(n, t->valuestring, pktext, cJSON_IsString(m) ? m->valuestring : "",
								&found);
			*again |= found;
			(*nrej)--;
		}
		ns = sqlite3_realloc64(seen, sizeof(char *) * (size_t) (nseen + 2));
		if (ns)
		{
			seen = ns;
			seen[nseen++] = sqlite3_mprintf("%s", t->valuestring);
			seen[nseen++] = sqlite3_mprintf("%s", pktext);
		}
		cJSON_free(pktext);
	}
	sl_stmt_done(n->c, up);
	/* earlier refusals: resolved when their row went out and was not refused */
	if (ok)
	{
		push_outcome o = {seen, nseen, old_cursor, until};

		ok = settle(n, "server", still_refused, &o);
	}
	for (int i = 0; i < nseen; i++)
		sqlite3_free(seen[i]);
	sqlite3_free(seen);
	return ok;
}

/* ---- after a receive ---- */

/*
 * sl_rejected_after_receive: held changes are tried again (a row refused
 * here, or a table or column this app version lacked); a row that arrived
 * incomplete (PS001) is asked for whole.
 */
bool
sl_rejected_after_receive(sl_net *n)
{
	int64_t		  applied, v0;
	pgs_err		  err;
	sqlite3_stmt *st;
	bool		  ok;

	if (!kept(n, "SAVEPOINT sync_held_retry"))
		return false;
	v0 = db_version_now(n);
	ok = sl_apply_held(n->c, NULL, &applied, &err) == PGS_OK;
	if (ok)
		cursor_follow(n, v0);
	if (ok && sl_stmt_prepare(n->c, "SELECT tbl, k FROM sync_held WHERE code = 'PS001'", &st) ==
				  SQLITE_OK)
	{
		while (sqlite3_step(st) == SQLITE_ROW)
		{
			const char	  *tb = (const char *) sqlite3_column_text(st, 0);
			const uint8_t *k = sqlite3_column_blob(st, 1), *ke = k + sqlite3_column_bytes(st, 1);
			db_table	  *t = sl_table_by_name(n->c, tb);
			pgs_value	   pk[64];
			bool		   good = t && t->npk <= 64;
			char		  *json, *sql;

			for (int i = 0; good && i < t->npk; i++)
			{
				uint8_t type = *k++;

				good = pgs_value_get(&k, ke, type, &pk[i], NULL) == PGS_OK;
			}
			if (!good || !(json = sl_pk_json(t, pk)))
				continue;
			sql = sqlite3_mprintf("INSERT OR IGNORE INTO sync_network_want(tbl, pk) VALUES(%Q, %Q)",
								  t->name, json);
			exec(n->db, sql);
			sqlite3_free(sql);
			sqlite3_free(json);
		}
		sl_stmt_done(n->c, st);
	}
	/* a row this device refused whose change is no longer held (it applied, or a
	 * newer version of the row did) is settled; so is a row the server refused
	 * that the server's version removed here (deleted, moved out) */
	ok = ok && settle(n, "local", still_held, NULL) && settle(n, "server", row_alive, NULL);
	if (!ok)
	{
		kept(n, "ROLLBACK TO sync_held_retry");
		kept(n, "RELEASE sync_held_retry");
		return false;
	}
	return kept(n, "RELEASE sync_held_retry");
}

/*
 * sl_want_fetch asks the server for the wanted rows (POST /v1/rows) and
 * applies the answer: each row arrives whole, or ABSENT (it is forgotten
 * here). A discarded change thus becomes the server's version. The list
 * empties in the same local transaction as the apply.
 *
 * Rechecks. A pull leaves out a changed row this device may not see whose
 * only life began after the pull's since and which another device made
 * (core/build.c, unseen): by its cursor the device cannot hold it. A row
 * fetched here can be such a row (a discard brings another user's row
 * made after our cursor), and if it is hidden from us before our next pull
 * that pull says nothing of it. So every row fetched here is asked for once
 * more, after the first pull that began after the fetch and got to its end
 * (sl_recheck_fetch): that pull's until is past the row's life's start, so
 * the row is one of ours from then on, and the second answer says whether
 * we may still hold it. The order is kept by a generation, sync_network's
 * recheck_gen: a fetch files its rows under the current one; a pull that
 * finds rows filed under it starts the next (sl_recheck_begin) and asks for
 * the rows filed before its own at its end. A pull that began before a
 * fetch (another connection's) thus never counts for it.
 */
#define WANT_BATCH 1000
#define RECHECK_GEN                                                                                \
	"CAST(IFNULL((SELECT value FROM sync_network WHERE key = 'recheck_gen'), '0') AS INTEGER)"

/* which list a batch serves */
typedef enum want_list
{
	WANT_ROWS,	  /* sync_network_want */
	WANT_RECHECK, /* sync_network_recheck, the rows filed before gen */
} want_list;

static void
stats_add(pgs_apply_stats *sum, const pgs_apply_stats *a)
{
	sum->rows += a->rows;
	sum->rows_inserted += a->rows_inserted;
	sum->rows_updated += a->rows_updated;
	sum->rows_deleted += a->rows_deleted;
	sum->rows_forgotten += a->rows_forgotten;
	sum->won += a->won;
}

/* want_batch: one request of at most WANT_BATCH rows of the list (in key
 * order), the apply's counts added to *sum; *more when the list had more. */
static bool
want_batch(sl_net *n, const sl_net_settings *s, want_list list, int64_t gen, pgs_apply_stats *sum,
		   char **msg, bool *more)
{
	sqlite3_stmt *st;
	cJSON		 *req = cJSON_CreateObject(), *arr = cJSON_AddArrayToObject(req, "rows");
	char		 *body, *last_tbl = NULL, *last_pk = NULL;
	sl_net_resp	  r = {0};
	bool		  ok = true;
	int64_t		  k = 0;

	*more = false;
	if (sl_stmt_prepare(n->c,
						list == WANT_ROWS
							? "SELECT tbl, pk FROM sync_network_want ORDER BY tbl, pk LIMIT ?1"
							: "SELECT tbl, pk FROM sync_network_recheck WHERE gen < ?2 ORDER BY "
							  "tbl, pk LIMIT ?1",
						&st) != SQLITE_OK)
	{
		cJSON_Delete(req);
		return true; /* no list yet */
	}
	sqlite3_bind_int(st, 1, WANT_BATCH);
	if (list == WANT_RECHECK)
		sqlite3_bind_int64(st, 2, gen);
	while (sqlite3_step(st) == SQLITE_ROW)
	{
		cJSON *o = cJSON_CreateObject();
		cJSON *pk = cJSON_Parse((const char *) sqlite3_column_text(st, 1));

		cJSON_AddStringToObject(o, "table", (const char *) sqlite3_column_text(st, 0));
		cJSON_AddItemToObject(o, "pk", pk ? pk : cJSON_CreateObject());
		cJSON_AddItemToArray(arr, o);
		sqlite3_free(last_tbl);
		sqlite3_free(last_pk);
		last_tbl = sqlite3_mprintf("%s", sqlite3_column_text(st, 0));
		last_pk = sqlite3_mprintf("%s", sqlite3_column_text(st, 1));
		k++;
	}
	sl_stmt_done(n->c, st);
	*more = k == WANT_BATCH;
	if (k == 0)
	{
		cJSON_Delete(req);
		return true;
	}
	body = cJSON_PrintUnformatted(req);
	cJSON_Delete(req);
	if (!body)
		return false;
	{
		char  site[37];
		char *path;

		pgs_uuid_format(n->c->site, site);
		path = sqlite3_mprintf("/v1/rows?exclude=%s", site);
		ok = path && sl_http_call(n, s, path, (const uint8_t *) body, strlen(body), 0, &r, msg);
		sqlite3_free(path);
	}
	cJSON_free(body);
	if (ok && r.status == 200)
	{
		sqlite3_stmt *ap;

		if (!kept(n, "SAVEPOINT sync_want"))
			ok = false;
		else if (sl_stmt_prepare(n->c, "SELECT sync_apply_payload(?1)", &ap) == SQLITE_OK)
		{
			int64_t v0 = db_version_now(n);

			sqlite3_bind_blob64(ap, 1, r.body, r.len, SQLITE_STATIC);
			ok = sqlite3_step(ap) == SQLITE_ROW;
			if (ok)
			{
				cursor_follow(n, v0);
				stats_add(sum, &n->c->last_apply);
			}
			if (!ok)
				*msg = sqlite3_mprintf("applying the rows the server sent failed: %s",
									   sqlite3_errmsg(n->db));
			sl_stmt_done(n->c, ap);
			/* the rows came (or are known gone): off the list, wanted ones
			 * filed for their recheck; after the last batch the held
			 * incomplete ones too (they were all on it) */
			if (ok)
			{
				char *sql =
					list == WANT_ROWS
						? sqlite3_mprintf(
							  "INSERT OR REPLACE INTO sync_network_recheck(tbl, pk, gen) SELECT "
							  "tbl, pk, " RECHECK_GEN " FROM sync_network_want WHERE (tbl, pk) <= "
							  "(%Q, %Q); DELETE FROM sync_network_want WHERE (tbl, pk) <= "
							  "(%Q, %Q)%s",
							  last_tbl, last_pk, last_tbl, last_pk,
							  *more ? "" : "; DELETE FROM sync_held WHERE code = 'PS001'")
						: sqlite3_mprintf("DELETE FROM sync_network_recheck WHERE gen < %lld "
										  "AND (tbl, pk) <= (%Q, %Q)",
										  (long long) gen, last_tbl, last_pk);

				ok = sql && exec(n->db, sql);
				sqlite3_free(sql);
			}
			if (ok)
				kept(n, "RELEASE sync_want");
			else
				exec(n->db, "ROLLBACK TO sync_want; RELEASE sync_want");
		}
	}
	else
		*more = false; /* not now (the list stays for the next receive): never a stuck device */
	sl_http_resp_free(&r);
	sqlite3_free(last_tbl);
	sqlite3_free(last_pk);
	return ok;
}

static bool
fetch_list(sl_net *n, const sl_net_settings *s, want_list list, int64_t gen, pgs_apply_stats *sum,
		   char **msg)
{
	bool more = true, ok = true;

	*msg = NULL;
	for (int i = 0; ok && more && i < 1000; i++)
		ok = want_batch(n, s, list, gen, sum, msg, &more);
	return ok;
}

bool
sl_want_fetch(sl_net *n, const sl_net_settings *s, pgs_apply_stats *sum, char **msg)
{
	return fetch_list(n, s, WANT_ROWS, 0, sum, msg);
}

int64_t
sl_recheck_begin(sl_net *n)
{
	int64_t		  gen = 0;
	sqlite3_stmt *st;

	/* a write only when rows were filed under the current generation */
	exec(n->db, "INSERT OR REPLACE INTO sync_network(key, value) SELECT 'recheck_gen', "
				"" RECHECK_GEN " + 1 WHERE EXISTS (SELECT 1 FROM sync_network_recheck WHERE gen "
				">= " RECHECK_GEN ")");
	if (sl_stmt_prepare(n->c, "SELECT " RECHECK_GEN, &st) == SQLITE_OK)
	{
		if (sqlite3_step(st) == SQLITE_ROW)
			gen = sqlite3_column_int64(st, 0);
		sl_stmt_done(n->c, st);
	}
	return gen;
}

bool
sl_recheck_fetch(sl_net *n, const sl_net_settings *s, int64_t gen, pgs_apply_stats *sum, char **msg)
{
	return fetch_list(n, s, WANT_RECHECK, gen, sum, msg);
}

/* ---- SQL functions ---- */

/* entry: (table, key) arguments, NULL when argc == 0 (all). */
static bool
args_of(sqlite3_context *ctx, int argc, sqlite3_value **argv, const char *fn, const char **tbl,
		const char **pk)
{
	*tbl = *pk = NULL;
	if (argc == 0)
		return true;
	*tbl = (const char *) sqlite3_value_text(argv[0]);
	*pk = (const char *) sqlite3_value_text(argv[1]);
	if (!*tbl || !*pk)
	{
		char *m = sqlite3_mprintf("%s: pass the table and the key exactly as "
								  "sync_network_rejected shows them (tbl, pk)",
								  fn);

		sqlite3_result_error(ctx, m, -1);
		sqlite3_free(m);
		return false;
	}
	return true;
}

/*
 * sync_network_retry([table, key]): send a refused row again, whole, with
 * the next push (after the app fixed it). Without arguments every refused
 * row. Returns the number of rows queued.
 */
void
sl_sync_network_retry(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	sl_net		 *n = sqlite3_user_data(ctx);
	const char	 *tbl, *pk;
	sqlite3_stmt *st;
	int64_t		  count = 0;
	bool		  ok = true;

	if (!args_of(ctx, argc, argv, "sync_network_retry", &tbl, &pk) || !sl_rejected_meta(n->db))
		return;
	if (!kept(n, "SAVEPOINT sync_network_retry"))
	{
		sqlite3_result_error(ctx, sqlite3_errmsg(n->db), -1);
		return;
	}
	if (sqlite3_prepare_v2(n->db,
						   "SELECT tbl, pk FROM sync_network_rejected WHERE origin = 'server' AND "
						   "(?1 IS NULL OR (tbl = ?1 AND pk = ?2))",
						   -1, &st, NULL) == SQLITE_OK)
	{
		char **rows = NULL;
		int	   nrows = 0;

		sqlite3_bind_text(st, 1, tbl, -1, SQLITE_STATIC);
		sqlite3_bind_text(st, 2, pk, -1, SQLITE_STATIC);
		while (sqlite3_step(st) == SQLITE_ROW)
		{
			char **nr = sqlite3_realloc64(rows, sizeof(char *) * (size_t) (nrows + 2));

			if (!nr)
				break;
			rows = nr;
			rows[nrows++] = sqlite3_mprintf("%s", sqlite3_column_text(st, 0));
			rows[nrows++] = sqlite3_mprintf("%s", sqlite3_column_text(st, 1));
		}
		sqlite3_finalize(st);
		for (int i = 0; i + 1 < nrows && ok; i += 2)
		{
			bool found;

			ok = touch(n, rows[i], rows[i + 1], &found);
			count += found;
		}
		for (int i = 0; i < nrows; i++)
			sqlite3_free(rows[i]);
		sqlite3_free(rows);
	}
	if (!ok)
	{
		exec(n->db, "ROLLBACK TO sync_network_retry; RELEASE sync_network_retry");
		sqlite3_result_error(ctx, "sync_network_retry: could not queue the row", -1);
		return;
	}
	kept(n, "RELEASE sync_network_retry");
	if (tbl && count == 0)
	{
		sqlite3_result_error(ctx,
							 "sync_network_retry: no such refused row; pass tbl and pk exactly as "
							 "sync_network_rejected shows them",
							 -1);
		return;
	}
	sqlite3_result_int64(ctx, count);
}

/*
 * sync_network_discard([table, key]): give up a refused local change. The
 * row leaves this device at once, without a change that would propagate,
 * and becomes the server's current version (or stays gone, if the server
 * has none): fetched right away by sync_network_discard (sl_network.c)
 * when the call is not inside the app's own transaction and the server
 * answers, else at the next receive. Without
 * arguments every refused row. Returns the number of rows discarded.
 */
void
sl_sync_network_discard(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	sl_net		 *n = sqlite3_user_data(ctx);
	const char	 *tbl, *pk;
	sqlite3_stmt *st;
	int64_t		  count = 0;
	bool		  ok = true;
	char		**rows = NULL;
	int			  nrows = 0;

	if (!args_of(ctx, argc, argv, "sync_network_discard", &tbl, &pk) || !sl_rejected_meta(n->db))
		return;
	if (!kept(n, "SAVEPOINT sync_network_discard"))
	{
		sqlite3_result_error(ctx, sqlite3_errmsg(n->db), -1);
		return;
	}
	if (sqlite3_prepare_v2(n->db,
						   "SELECT tbl, pk FROM sync_network_rejected WHERE origin = 'server' AND "
						   "(?1 IS NULL OR (tbl = ?1 AND pk = ?2))",
						   -1, &st, NULL) == SQLITE_OK)
	{
		sqlite3_bind_text(st, 1, tbl, -1, SQLITE_STATIC);
		sqlite3_bind_text(st, 2, pk, -1, SQLITE_STATIC);
		while (sqlite3_step(st) == SQLITE_ROW)
		{
			char **nr = sqlite3_realloc64(rows, sizeof(char *) * (size_t) (nrows + 2));

			if (!nr)
				break;
			rows = nr;
			rows[nrows++] = sqlite3_mprintf("%s", sqlite3_column_text(st, 0));
			rows[nrows++] = sqlite3_mprintf("%s", sqlite3_column_text(st, 1));
		}
		sqlite3_finalize(st);
	}
	for (int i = 0; i + 1 < nrows && ok; i += 2)
	{
		db_table *t;
		pgs_value key[64];
		char	 *store, *sql;
		pgs_err	  err;

		if (row_of(n, rows[i], rows[i + 1], &t, key, &store))
		{
			ok = sl_forget_now(n->c, t, key, &err) == PGS_OK;
			sqlite3_free(store);
		}
		sql = sqlite3_mprintf("DELETE FROM sync_network_rejected WHERE tbl = %Q AND pk = %Q AND "
							  "origin = 'server';"
							  "INSERT OR IGNORE INTO sync_network_want(tbl, pk) VALUES(%Q, %Q);",
							  rows[i], rows[i + 1], rows[i], rows[i + 1]);
		ok = ok && sql && exec(n->db, sql);
		sqlite3_free(sql);
		count++;
	}
	for (int i = 0; i < nrows; i++)
		sqlite3_free(rows[i]);
	sqlite3_free(rows);
	if (!ok)
	{
		exec(n->db, "ROLLBACK TO sync_network_discard; RELEASE sync_network_discard");
		sqlite3_result_error(ctx, "sync_network_discard: could not discard the row", -1);
		return;
	}
	kept(n, "RELEASE sync_network_discard");
	n->discarded = count > 0; /* the caller (sl_network.c) fetches them */
	if (tbl && count == 0)
	{
		sqlite3_result_error(
			ctx,
			"sync_network_discard: no such refused row; pass tbl and pk exactly as "
			"sync_network_rejected shows them",
			-1);
		return;
	}
	sqlite3_result_int64(ctx, count);
}
