/*
 * sl_events.c — what each apply changed here, for the app (docs/CLIENT.md,
 * "Change events"), and the rows still waiting for the server.
 *
 *   sync_network_changes(seq INTEGER PRIMARY KEY, tbl, pk, kind)
 *       one row per key a received payload changed on this device: kind is
 *       insert, update, delete or move-out; pk the JSON object text of
 *       sl_pk_json (as in sync_network_rejected). The newest changes_keep
 *       rows are kept (a sync_network setting, default 10,000; 0 = off).
 *   sync_network_counters(tbl PRIMARY KEY, changes, seq)
 *       per table: events ever recorded and the last one's seq, for cheap
 *       polling.
 *   sync_network_pending(tbl, pk, ver, deleted)   (eponymous virtual table)
 *       rows with local changes the server has not acknowledged (clock
 *       version above send_cursor).
 *
 * Invariants: events are written by the engine's write functions while an
 * apply runs (c->applying), inside the apply's savepoint, so an apply that
 * fails or is rolled back leaves none; the in-memory per-table counts are
 * zeroed with it (sl_events_reset) and written once per apply
 * (sl_events_end). Local writes are never events.
 */
#include "sl_network.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SL_EVENTS_KEEP 10000

static const char events_meta_sql[] =
	"CREATE TABLE IF NOT EXISTS sync_network_changes("
	"  seq INTEGER PRIMARY KEY, tbl TEXT NOT NULL, pk TEXT NOT NULL, kind TEXT NOT NULL);"
	"CREATE TABLE IF NOT EXISTS sync_network_counters("
	"  tbl TEXT PRIMARY KEY, changes INTEGER NOT NULL, seq INTEGER NOT NULL) WITHOUT ROWID;";

/* keep_setting: changes_keep from sync_network, when that table exists. */
static int64_t
keep_setting(db_conn *c)
{
	sqlite3_stmt *st;
	int64_t		  keep = SL_EVENTS_KEEP;

	if (sl_stmt_prepare(c, "SELECT value FROM sync_network WHERE key = 'changes_keep'", &st) !=
		SQLITE_OK)
		return keep;
	if (sqlite3_step(st) == SQLITE_ROW && sqlite3_column_type(st, 0) != SQLITE_NULL)
		keep = sqlite3_column_int64(st, 0);
	sl_stmt_done(c, st);
	return keep < 0 ? 0 : keep;
}

/*
 * The events of the running apply are kept in memory, in a ring of the
 * newest EV_RING (or changes_keep, if smaller), and written when the apply
 * ends: an apply that changes more keys than the window holds writes only
 * those that stay in it, with the seq numbers they would have had (max(seq)
 * at the first event, plus one per event), so the table ends exactly as if
 * every event had been inserted and the oldest trimmed. (Inserting every
 * event made an apply into an empty replica of 20,000 rows take almost twice
 * the instructions, most of them for events deleted at its end.) When a
 * window larger than the ring overflows it, the oldest event that is still
 * inside the window is written at once.
 */
#define EV_RING 65536
#define EV_KEEP_SLOTS 1024 /* kept between applies; a larger ring is freed at its end */

typedef struct sl_ev
{
	const char *kind; /* static text */
	char	   *tbl;  /* in mem */
	pgs_value  *pk;	  /* in mem, npk values, their bytes after them */
	int			npk;
	char	   *mem;
	size_t		cap;
} sl_ev;

/* ring_size: the ring's slots for the window (changes_keep) of the running apply */
static int64_t
ring_size(const db_conn *c)
{
	return c->ev_keep < EV_RING ? c->ev_keep : EV_RING;
}

/* ev_shrink: the ring keeps at most n slots (the others' memory goes) */
static void
ev_shrink(db_conn *c, int64_t n)
{
	sl_ev *smaller;

	if (c->ev_cap <= n)
		return;
	while (c->ev_cap > n)
		sqlite3_free(c->evs[--c->ev_cap].mem);
	if (c->ev_cap == 0)
	{
		sqlite3_free(c->evs);
		c->evs = NULL;
	}
	else if ((smaller = sqlite3_realloc64(c->evs, (sqlite3_uint64) c->ev_cap * sizeof *smaller)))
		c->evs = smaller; /* else the larger array stays: as good */
}

/* ev_fail: an event could not be kept; the apply fails with err at its end */
static void
ev_fail(db_conn *c, const pgs_err *err)
{
	if (!c->ev_failed)
		c->ev_err = *err;
	c->ev_failed = true;
}

/*
 * sl_events_begin: an apply starts on c. Reads the window and makes the
 * tables on first use; errors are the engine's (they fail the apply).
 */
pgs_rc
sl_events_begin(db_conn *c, pgs_err *err)
{
	c->ev_keep = keep_setting(c);
	sl_events_reset(c); /* also fits the ring to this window */
	if (c->ev_keep == 0)
		return PGS_OK;
	/* made on first use, and again if the app dropped them */
	if (!c->ev_ready || !sl_table_exists(c, "sync_network_changes") ||
		!sl_table_exists(c, "sync_network_counters"))
	{
		pgs_rc rc = sl_exec(c, events_meta_sql, err);

		if (rc != PGS_OK)
			return rc;
		c->ev_ready = true;
	}
	return PGS_OK;
}

/* ev_slot: the ring's slot of event i (grown on use), or NULL out of memory */
static sl_ev *
ev_slot(db_conn *c, int64_t i)
{
	int64_t size = ring_size(c);
	int64_t k = i % size;

	if (k >= c->ev_cap)
	{
		int64_t ncap = c->ev_cap ? 2 * (int64_t) c->ev_cap : 64;
		sl_ev  *n;

		if (ncap > size)
			ncap = size;
		if (!(n = sqlite3_realloc64(c->evs, (sqlite3_uint64) ncap * sizeof *n)))
			return NULL;
		memset(n + c->ev_cap, 0, (size_t) (ncap - c->ev_cap) * sizeof *n);
		c->evs = n;
		c->ev_cap = (int) ncap;
	}
	return &c->evs[k];
}

/* ev_write: inserts event i (its slot e) with its seq; false with err on an error */
static bool
ev_write(db_conn *c, int64_t i, const sl_ev *e, pgs_err *err)
{
	db_table *t = sl_table_by_name(c, e->tbl);
	char	 *json;
	bool	  ok;

	if (!c->st_event &&
		sqlite3_prepare_v3(c->db,
						   "INSERT INTO sync_network_changes(seq, tbl, pk, kind) "
						   "VALUES (?1, ?2, ?3, ?4)",
						   -1, SQLITE_PREPARE_PERSISTENT, &c->st_event, NULL) != SQLITE_OK)
	{
		sl_dberr(c, err, "could not record change events");
		return false;
	}
	if (!t || t->npk != e->npk)
	{
		pgs_failf(err, PGS_ERR_MISUSE, "Call sync_init on the table again.",
				  "could not record change events: table %s changed during the apply", e->tbl);
		return false;
	}
	if (!(json = sl_pk_json(t, e->pk)))
	{
		pgs_failf(err, PGS_ERR_NOMEM, NULL, "could not record change events: out of memory");
		return false;
	}
	sqlite3_bind_int64(c->st_event, 1, c->ev_base + i + 1);
	sqlite3_bind_text(c->st_event, 2, e->tbl, -1, SQLITE_STATIC);
	sqlite3_bind_text(c->st_event, 3, json, -1, sqlite3_free);
	sqlite3_bind_text(c->st_event, 4, e->kind, -1, SQLITE_STATIC);
	ok = sqlite3_step(c->st_event) == SQLITE_DONE;
	if (!ok)
		sl_dberr(c, err, "could not record change events");
	sqlite3_reset(c->st_event);
	sqlite3_clear_bindings(c->st_event);
	return ok;
}

static void
ev_nomem(db_conn *c)
{
	pgs_err e;

	pgs_failf(&e, PGS_ERR_NOMEM, NULL, "could not record change events: out of memory");
	ev_fail(c, &e);
}

/* sl_event records that the running apply changed key pk of t (kind is static text). */
void
sl_event(db_conn *c, db_table *t, const pgs_value *pk, const char *kind)
{
	int64_t i = c->ev_n;
	size_t	len, need;
	sl_ev  *e;
	char   *at;

	if (!c->applying || c->ev_keep == 0 || !c->ev_ready || c->ev_failed)
		return;
	if (c->ev_base < 0)
	{
		sqlite3_stmt *st;
		pgs_err		  fail;

		if (sl_stmt_prepare(c, "SELECT coalesce(max(seq), 0) FROM sync_network_changes", &st) ==
			SQLITE_OK)
		{
			if (sqlite3_step(st) == SQLITE_ROW)
				c->ev_base = sqlite3_column_int64(st, 0);
			sl_stmt_done(c, st);
		}
		if (c->ev_base < 0)
		{
			sl_dberr(c, &fail, "could not read sync_network_changes");
			ev_fail(c, &fail);
			return;
		}
	}
	if (!(e = ev_slot(c, i)))
	{
		ev_nomem(c);
		return;
	}
	/* the slot's event, if any, leaves the ring: written if still in the window */
	if (i >= c->ev_cap && e->kind && i - c->ev_cap > c->ev_n - c->ev_keep)
	{
		pgs_err fail;

		if (!ev_write(c, i - c->ev_cap, e, &fail))
		{
			ev_fail(c, &fail);
			return;
		}
	}
	len = strlen(t->name) + 1;
	need = (size_t) t->npk * sizeof(pgs_value) + len;
	for (int k = 0; k < t->npk; k++)
		if (pk[k].type == PGS_TEXT || pk[k].type == PGS_BLOB)
			need += pk[k].len;
	if (need > e->cap)
	{
		char *m = sqlite3_realloc64(e->mem, need);

		if (!m)
		{
			ev_nomem(c);
			return;
		}
		e->mem = m;
		e->cap = need;
	}
	e->pk = (pgs_value *) e->mem;
	at = e->mem + (size_t) t->npk * sizeof(pgs_value);
	memcpy(at, t->name, len);
	e->tbl = at;
	at += len;
	for (int k = 0; k < t->npk; k++)
	{
		e->pk[k] = pk[k];
		if (pk[k].type == PGS_TEXT || pk[k].type == PGS_BLOB)
		{
			if (pk[k].len)
				memcpy(at, pk[k].v.p, pk[k].len);
			e->pk[k].v.p = (const uint8_t *) at;
			at += pk[k].len;
		}
	}
	e->npk = t->npk;
	e->kind = kind;
	c->ev_n = i + 1;
	t->ev_count++;
	t->ev_seq = c->ev_base + c->ev_n;
}

/* sl_events_reset: the apply's writes were rolled back; so were its events. */
void
sl_events_reset(db_conn *c)
{
	for (int i = 0; i < c->ntables; i++)
		c->tables[i]->ev_count = c->tables[i]->ev_seq = 0;
	/* what a large apply grew goes; and a smaller window than the last apply's has fewer slots */
	ev_shrink(c, ring_size(c) < EV_KEEP_SLOTS ? ring_size(c) : EV_KEEP_SLOTS);
	for (int i = 0; i < c->ev_cap; i++)
		c->evs[i].kind = NULL;
	c->ev_failed = false;
	c->ev_n = 0;
	c->ev_base = -1;
}

/* sl_events_free: the connection closes. */
void
sl_events_free(db_conn *c)
{
	ev_shrink(c, 0);
}

/*
 * sl_events_end: the apply succeeded (still inside its savepoint): write the
 * events in the window, bump the per-table counters once and drop the events
 * that left the window.
 */
pgs_rc
sl_events_end(db_conn *c, pgs_err *err)
{
	sqlite3_stmt *st;
	int64_t		  last = 0, first;
	pgs_rc		  rc = PGS_OK;

	if (c->ev_failed)
	{
		*err = c->ev_err;
		sl_events_reset(c);
		return err->rc;
	}
	if (c->ev_n == 0)
		return PGS_OK;
	first = c->ev_n - c->ev_cap;
	if (first < c->ev_n - c->ev_keep)
		first = c->ev_n - c->ev_keep;
	if (first < 0)
		first = 0;
	for (int64_t i = first; i < c->ev_n; i++)
		if (!ev_write(c, i, &c->evs[i % c->ev_cap], err))
		{
			sl_events_reset(c);
			return err->rc;
		}
	if (sl_stmt_prepare(c,
						"INSERT INTO sync_network_counters(tbl, changes, seq) VALUES (?1, ?2, ?3) "
						"ON CONFLICT(tbl) DO UPDATE SET changes = changes + excluded.changes, "
						"seq = excluded.seq",
						&st) != SQLITE_OK)
		return sl_dberr(c, err, "could not count change events");
	for (int i = 0; i < c->ntables && rc == PGS_OK; i++)
	{
		db_table *t = c->tables[i];

		if (!t->ev_count)
			continue;
		sqlite3_bind_text(st, 1, t->name, -1, SQLITE_STATIC);
		sqlite3_bind_int64(st, 2, t->ev_count);
		sqlite3_bind_int64(st, 3, t->ev_seq);
		if (sqlite3_step(st) != SQLITE_DONE)
			rc = sl_dberr(c, err, "could not count change events");
		sqlite3_reset(st);
		if (t->ev_seq > last)
			last = t->ev_seq;
		t->ev_count = t->ev_seq = 0;
	}
	sl_stmt_done(c, st);
	sl_events_reset(c);
	if (rc != PGS_OK || last <= c->ev_keep)
		return rc;
	if (sl_stmt_prepare(c, "DELETE FROM sync_network_changes WHERE seq <= ?1", &st) != SQLITE_OK)
		return sl_dberr(c, err, "could not trim change events");
	sqlite3_bind_int64(st, 1, last - c->ev_keep);
	if (sqlite3_step(st) != SQLITE_DONE)
		rc = sl_dberr(c, err, "could not trim change events");
	sl_stmt_done(c, st);
	return rc;
}

/* ---- sync_network_pending ---------------------------------------------------- */

/*
 * An eponymous, read-only virtual table: a view whose body depends on the
 * synced tables of the moment (a real view would have to be rebuilt at
 * every sync_init). xFilter collects the rows of every clock table with
 * ver > send_cursor; there are few (they wait for a push).
 */
typedef struct pend_vtab
{
	sqlite3_vtab base;
	db_conn		*c;
} pend_vtab;

typedef struct pend_row
{
	const char *tbl; /* the table's name (lives with the metadata) */
	char	   *pk;
	int64_t		ver;
	int			deleted;
} pend_row;

typedef struct pend_cur
{
	sqlite3_vtab_cursor base;
	pend_row		   *rows;
	int64_t				n;
	int64_t				i;
} pend_cur;

static int
pend_connect(sqlite3 *db, void *aux, int argc, const char *const *argv, sqlite3_vtab **out,
			 char **errmsg)
{
	pend_vtab *v;
	int		   rc;

	(void) argc, (void) argv, (void) errmsg;
	if ((rc = sqlite3_declare_vtab(db, "CREATE TABLE x(tbl TEXT, pk TEXT, ver INTEGER, "
									   "deleted INTEGER)")) != SQLITE_OK)
		return rc;
	if (!(v = sqlite3_malloc(sizeof *v)))
		return SQLITE_NOMEM;
	memset(v, 0, sizeof *v);
	v->c = aux;
	*out = &v->base;
	return SQLITE_OK;
}

static int
pend_disconnect(sqlite3_vtab *vt)
{
	sqlite3_free(vt);
	return SQLITE_OK;
}

static int
pend_best_index(sqlite3_vtab *vt, sqlite3_index_info *info)
{
	(void) vt;
	info->estimatedCost = 1000;
	info->estimatedRows = 100;
	return SQLITE_OK;
}

static int
pend_open(sqlite3_vtab *vt, sqlite3_vtab_cursor **cur)
{
	pend_cur *c;

	(void) vt;
	if (!(c = sqlite3_malloc(sizeof *c)))
		return SQLITE_NOMEM;
	memset(c, 0, sizeof *c);
	*cur = &c->base;
	return SQLITE_OK;
}

static void
pend_clear(pend_cur *pc)
{
	for (int64_t i = 0; i < pc->n; i++)
		sqlite3_free(pc->rows[i].pk);
	sqlite3_free(pc->rows);
	pc->rows = NULL;
	pc->n = pc->i = 0;
}

static int
pend_close(sqlite3_vtab_cursor *cur)
{
	pend_clear((pend_cur *) cur);
	sqlite3_free(cur);
	return SQLITE_OK;
}

static int
pend_filter(sqlite3_vtab_cursor *cur, int idx, const char *s, int argc, sqlite3_value **argv)
{
	pend_cur	 *pc = (pend_cur *) cur;
	db_conn		 *c = ((pend_vtab *) cur->pVtab)->c;
	sqlite3_stmt *st;
	int64_t		  sent = 0, cap = 0;
	pgs_err		  err;
	int			  rc = SQLITE_OK;

	(void) idx, (void) s, (void) argc, (void) argv;
	pend_clear(pc);
	if (sl_load(c, &err) != PGS_OK)
		return SQLITE_OK; /* sync not initialized: nothing pending */
	if (sqlite3_prepare_v2(c->db, "SELECT value FROM sync_network WHERE key = 'send_cursor'", -1,
						   &st, NULL) == SQLITE_OK)
	{
		if (sqlite3_step(st) == SQLITE_ROW)
			sent = sqlite3_column_int64(st, 0);
		sqlite3_finalize(st);
	}
	for (int t = 0; t < c->ntables && rc == SQLITE_OK; t++)
	{
		db_table  *tb = c->tables[t];
		char	  *cols = sl_pk_list(tb, "");
		char	  *sql;
		pgs_value *pk;

		sql = cols ? sqlite3_mprintf("SELECT cl, ver, %s FROM %s WHERE ver > ?1 ORDER BY ver", cols,
									 tb->qclock)
				   : NULL;
		sqlite3_free(cols);
		if (!sql || !(pk = sqlite3_malloc64(sizeof *pk * (size_t) tb->npk)))
		{
			sqlite3_free(sql);
			return SQLITE_NOMEM;
		}
		if (sqlite3_prepare_v2(c->db, sql, -1, &st, NULL) != SQLITE_OK)
			rc = SQLITE_ERROR;
		sqlite3_free(sql);
		if (rc == SQLITE_OK)
		{
			sqlite3_bind_int64(st, 1, sent);
			while (rc == SQLITE_OK && sqlite3_step(st) == SQLITE_ROW)
			{
				pend_row *r;

				if (pc->n == cap)
				{
					pend_row *g =
						sqlite3_realloc64(pc->rows, sizeof *g * (size_t) (cap ? cap * 2 : 16));

					if (!g)
					{
						rc = SQLITE_NOMEM;
						break;
					}
					pc->rows = g;
					cap = cap ? cap * 2 : 16;
				}
				for (int k = 0; k < tb->npk; k++)
					sl_column_value(st, 2 + k, &pk[k]);
				r = &pc->rows[pc->n];
				r->tbl = tb->name;
				r->ver = sqlite3_column_int64(st, 1);
				r->deleted = (sqlite3_column_int64(st, 0) & 1) == 0;
				if (!(r->pk = sl_pk_json(tb, pk)))
					rc = SQLITE_NOMEM;
				else
					pc->n++;
			}
			sqlite3_finalize(st);
		}
		sqlite3_free(pk);
	}
	return rc;
}

static int
pend_next(sqlite3_vtab_cursor *cur)
{
	((pend_cur *) cur)->i++;
	return SQLITE_OK;
}

static int
pend_eof(sqlite3_vtab_cursor *cur)
{
	pend_cur *pc = (pend_cur *) cur;

	return pc->i >= pc->n;
}

static int
pend_column(sqlite3_vtab_cursor *cur, sqlite3_context *ctx, int i)
{
	pend_cur *pc = (pend_cur *) cur;
	pend_row *r = &pc->rows[pc->i];

	switch (i)
	{
		case 0:
			sqlite3_result_text(ctx, r->tbl, -1, SQLITE_TRANSIENT);
			break;
		case 1:
			sqlite3_result_text(ctx, r->pk, -1, SQLITE_TRANSIENT);
			break;
		case 2:
			sqlite3_result_int64(ctx, r->ver);
			break;
		default:
			sqlite3_result_int(ctx, r->deleted);
	}
	return SQLITE_OK;
}

static int
pend_rowid(sqlite3_vtab_cursor *cur, sqlite3_int64 *rowid)
{
	*rowid = ((pend_cur *) cur)->i + 1;
	return SQLITE_OK;
}

static const sqlite3_module pending_module = {
	.xConnect = pend_connect,
	.xBestIndex = pend_best_index,
	.xDisconnect = pend_disconnect,
	.xOpen = pend_open,
	.xClose = pend_close,
	.xFilter = pend_filter,
	.xNext = pend_next,
	.xEof = pend_eof,
	.xColumn = pend_column,
	.xRowid = pend_rowid,
};

int
sl_pending_register(sqlite3 *db, db_conn *c)
{
	return sqlite3_create_module_v2(db, "sync_network_pending", &pending_module, c, NULL);
}
