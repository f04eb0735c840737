/*
 * sqlitesync.c — entry point of the SQLite loadable extension `sqlitesync`
 * and its sync_* SQL functions.
 *
 * The SQL functions of this file (contracts; every error is a SQL error with
 * what went wrong and what to do, and changes nothing):
 *
 *   sync_init(tbl [, algo])        start syncing table tbl (algo 'cls', the
 *                                  default); idempotent; after ADD COLUMN it
 *                                  adds the new columns, keeping every clock
 *                                  -> 1
 *   sync_cleanup(tbl)              stop syncing tbl and drop its metadata -> 1
 *   sync_site_id()                 this database's site id (UUID text)
 *   sync_db_version()              the highest local change version (integer)
 *   sync_payload(since [, exclude_site [, max_rows, cursor]])
 *                                  the changes after version since (not
 *                                  those of exclude_site), at most max_rows
 *                                  rows per chunk (0: no limit), continuing
 *                                  at cursor -> BLOB, or NULL when nothing
 *                                  changed; refused inside a transaction with
 *                                  uncommitted synced changes
 *   sync_payload_cursor(payload)   the cursor of the next chunk -> BLOB or NULL
 *   sync_payload_until(payload)    the version a payload reaches -> integer
 *   sync_payload_info(payload)     what a payload holds -> JSON text
 *   sync_apply_payload(payload)    merge a peer's payload in one transaction
 *                                  (every row has its own fate: applied,
 *                                  held or rejected, sl_fate.c) -> rows applied
 *   sync_uuid()                    a new UUID v7 (text), for keys
 *   sync_version()                 the extension's version (text)
 *
 * Elsewhere: sync_alter (sl_alter.c: ADD/DROP/RENAME COLUMN of a synced
 * table), sync_network_* (sl_network.c, sl_background.c: the server), and
 * the sqlitesync_* functions the capture triggers call (sl_capture.c; not
 * for applications). Tables and views the extension keeps: sync_state,
 * <tbl>__sync_clock, sync_column_history, sync_column_pos, sync_network,
 * sync_network_rejected, sync_network_held, sync_network_changes,
 * sync_network_counters.
 *
 * Each SQL function is a thin static wrapper with the same name: check the
 * arguments, call the core (or sl_*), map a pgs_err to sqlite3_result_error.
 * Registration is the table `functions` at the bottom.
 */
#include "sl_internal.h"
#include "sl_network.h"

#include <stdio.h>
#include <string.h>

SQLITE_EXTENSION_INIT1

/* ---- error mapping ---- */

static void
result_err(sqlite3_context *ctx, const pgs_err *err)
{
	char *m;

	if (err->rc == PGS_ERR_NOMEM)
	{
		sqlite3_result_error_nomem(ctx);
		return;
	}
	m = sqlite3_mprintf("%s%s%s%s%s", err->msg, err->detail[0] ? ". " : "", err->detail,
						err->hint[0] ? (err->detail[0] ? " " : ". ") : "", err->hint);
	sqlite3_result_error(ctx, m ? m : err->msg, -1);
	sqlite3_free(m);
	switch (err->rc)
	{
		case PGS_ERR_CORRUPT:
		case PGS_ERR_VERSION:
			/* not SQLITE_CORRUPT: SQLite would then treat the database file as
			 * corrupt and fail every later statement of the transaction */
			sqlite3_result_error_code(ctx, SQLITE_ERROR);
			break;
		case PGS_ERR_TOO_BIG:
			sqlite3_result_error_code(ctx, SQLITE_TOOBIG);
			break;
		case PGS_ERR_VALUE:
			sqlite3_result_error_code(ctx, SQLITE_CONSTRAINT);
			break;
		case PGS_ERR_SCHEMA:
		case PGS_ERR_MISUSE:
			sqlite3_result_error_code(ctx, SQLITE_ERROR);
			break;
		default:
			break;
	}
}

/* ready loads the sync metadata; false (with the error set) before sync_init. */
static bool
ready(sqlite3_context *ctx, db_conn *c, const char *fn)
{
	pgs_err err;

	if (sl_load(c, &err) == PGS_OK)
		return true;
	if (err.rc == PGS_ERR_MISUSE)
		pgs_failf(&err, PGS_ERR_MISUSE, "Call sync_init('table') first.",
				  "%s: sync is not initialized in this database", fn);
	result_err(ctx, &err);
	return false;
}

static bool
blob_arg(sqlite3_context *ctx, sqlite3_value *v, const char *fn, const uint8_t **p, size_t *n)
{
	if (sqlite3_value_type(v) != SQLITE_BLOB)
	{
		char *m = sqlite3_mprintf(
			"%s: the payload must be a BLOB (got %s); pass the value returned by sync_payload", fn,
			sqlite3_value_type(v) == SQLITE_NULL   ? "NULL"
			: sqlite3_value_type(v) == SQLITE_TEXT ? "TEXT"
												   : "a number");

		sqlite3_result_error(ctx, m, -1);
		sqlite3_free(m);
		return false;
	}
	*p = sqlite3_value_blob(v);
	*n = (size_t) sqlite3_value_bytes(v);
	if (!*p)
		*p = (const uint8_t *) "";
	return true;
}

/* ---- SQL functions ---- */

static void
sync_init(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	db_conn	   *c = sqlite3_user_data(ctx);
	const char *table = (const char *) sqlite3_value_text(argv[0]);
	const char *algo = argc > 1 ? (const char *) sqlite3_value_text(argv[1]) : "cls";
	pgs_err		err;

	if (!table || !algo)
	{
		sqlite3_result_error(ctx, "sync_init: table name and algorithm must not be NULL", -1);
		return;
	}
	if (sl_init_table(c, table, algo, &err) != PGS_OK)
	{
		result_err(ctx, &err);
		return;
	}
	{
		/* changes kept aside while the table or a column was unknown fill in now */
		int64_t n;

		if (sl_exec(c, "SAVEPOINT sync_init_held", &err) != PGS_OK ||
			sl_events_begin(c, &err) != PGS_OK || sl_apply_held(c, NULL, &n, &err) != PGS_OK ||
			sl_events_end(c, &err) != PGS_OK)
		{
			pgs_err ignore;

			sl_events_reset(c);
			sl_exec(c, "ROLLBACK TO sync_init_held; RELEASE sync_init_held", &ignore);
			result_err(ctx, &err);
			return;
		}
		sl_exec(c, "RELEASE sync_init_held", &err);
	}
	sqlite3_result_int(ctx, 1);
}

static void
sync_cleanup(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	db_conn	   *c = sqlite3_user_data(ctx);
	const char *table = (const char *) sqlite3_value_text(argv[0]);
	pgs_err		err;

	(void) argc;
	if (!table)
	{
		sqlite3_result_error(ctx, "sync_cleanup: table name must not be NULL", -1);
		return;
	}
	c->alter_lenient = true; /* a renamed or dropped table can still be cleaned up */
	if (!ready(ctx, c, "sync_cleanup"))
	{
		c->alter_lenient = false;
		return;
	}
	c->alter_lenient = false;
	if (sl_cleanup_table(c, table, &err) != PGS_OK)
	{
		result_err(ctx, &err);
		return;
	}
	sqlite3_result_int(ctx, 1);
}

static void
sync_site_id(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	db_conn *c = sqlite3_user_data(ctx);
	char	 u[37];

	(void) argc, (void) argv;
	if (!ready(ctx, c, "sync_site_id"))
		return;
	pgs_uuid_format(c->site, u);
	sqlite3_result_text(ctx, u, 36, SQLITE_TRANSIENT);
}

static void
sync_db_version(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	db_conn *c = sqlite3_user_data(ctx);
	int64_t	 v;
	pgs_err	 err;

	(void) argc, (void) argv;
	if (!ready(ctx, c, "sync_db_version"))
		return;
	if (db_version_safe(c, &v, &err) != PGS_OK)
	{
		result_err(ctx, &err);
		return;
	}
	sqlite3_result_int64(ctx, v);
}

static void
sync_uuid(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	uint8_t b[16];
	char	u[37];
	pgs_err err;

	(void) argc, (void) argv;
	if (pgs_uuid7(b, &err) != PGS_OK)
	{
		result_err(ctx, &err);
		return;
	}
	pgs_uuid_format(b, u);
	sqlite3_result_text(ctx, u, 36, SQLITE_TRANSIENT);
}

static void
sync_version(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	(void) argc, (void) argv;
	sqlite3_result_text(ctx, PGS_VERSION, -1, SQLITE_STATIC);
}

static void
sync_payload(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	db_conn		  *c = sqlite3_user_data(ctx);
	pgs_build_opts o = {.compress = 1};
	uint8_t		   excl[16];
	pgs_buf		   out;
	pgs_err		   err;

	if (!ready(ctx, c, "sync_payload"))
		return;
	if (sqlite3_value_type(argv[0]) == SQLITE_NULL)
		o.since = 0;
	else if (sqlite3_value_type(argv[0]) != SQLITE_INTEGER || sqlite3_value_int64(argv[0]) < 0)
	{
		sqlite3_result_error(ctx,
							 "sync_payload: since must be a non-negative integer (0 for "
							 "everything, or the value of sync_payload_until of the last payload)",
							 -1);
		return;
	}
	else
		o.since = sqlite3_value_int64(argv[0]);
	if (argc > 1 && sqlite3_value_type(argv[1]) != SQLITE_NULL)
	{
		if (sqlite3_value_type(argv[1]) == SQLITE_BLOB && sqlite3_value_bytes(argv[1]) == 16)
			memcpy(excl, sqlite3_value_blob(argv[1]), 16);
		else if (sqlite3_value_type(argv[1]) != SQLITE_TEXT ||
				 !pgs_uuid_parse((const char *) sqlite3_value_text(argv[1]),
								 (size_t) sqlite3_value_bytes(argv[1]), excl))
		{
			sqlite3_result_error(
				ctx, "sync_payload: exclude_site must be a site id as returned by sync_site_id()",
				-1);
			return;
		}
		o.exclude_site = excl;
	}
	if (argc > 2)
	{
		if (sqlite3_value_type(argv[2]) == SQLITE_NULL)
			o.max_rows = 0;
		else if (sqlite3_value_type(argv[2]) != SQLITE_INTEGER ||
				 sqlite3_value_int64(argv[2]) < 0 || sqlite3_value_int64(argv[2]) > UINT32_MAX)
		{
			sqlite3_result_error(
				ctx, "sync_payload: max_rows must be an integer from 0 (no limit) to 4294967295",
				-1);
			return;
		}
		else
			o.max_rows = (uint32_t) sqlite3_value_int64(argv[2]);
	}
	if (argc > 3 && sqlite3_value_type(argv[3]) != SQLITE_NULL)
	{
		if (sqlite3_value_type(argv[3]) != SQLITE_BLOB)
		{
			sqlite3_result_error(ctx,
								 "sync_payload: cursor must be the BLOB returned by "
								 "sync_payload_cursor, or NULL for the first chunk",
								 -1);
			return;
		}
		o.after = sqlite3_value_blob(argv[3]);
		o.after_len = (size_t) sqlite3_value_bytes(argv[3]);
		if (!o.after)
			o.after = (const uint8_t *) "";
	}
	if (c->txn_ver && !sqlite3_get_autocommit(c->db))
	{
		sqlite3_result_error(
			ctx,
			"sync_payload: this transaction has uncommitted changes to synced tables. "
			"A payload must only carry committed changes; call sync_payload after COMMIT.",
			-1);
		return;
	}
	if (db_version_safe(c, &o.until, &err) != PGS_OK)
	{
		result_err(ctx, &err);
		return;
	}
	o.known_lives_partial = c->pushing; /* sl_network.c's push (docs/DESIGN.md, "Tombstone GC") */
	if (o.since >= o.until && !o.after)
		return; /* NULL: nothing newer */
	pgs_buf_init(&out);
	if (pgs_build(c, &o, &out, NULL, NULL, &err) != PGS_OK)
	{
		pgs_buf_free(&out);
		result_err(ctx, &err);
		return;
	}
	if (out.len)
		sqlite3_result_blob64(ctx, out.p, out.len, pgs_free);
	else
		pgs_buf_free(&out);
}

/* sync_payload_cursor(payload): the cursor of the next chunk, or NULL */
static void
sync_payload_cursor(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	db_conn		  *c = sqlite3_user_data(ctx);
	const uint8_t *p;
	size_t		   n;
	pgs_buf		   tok;
	pgs_err		   err;

	(void) argc;
	if (!ready(ctx, c, "sync_payload_cursor"))
		return;
	if (sqlite3_value_type(argv[0]) == SQLITE_NULL)
		return;
	if (!blob_arg(ctx, argv[0], "sync_payload_cursor", &p, &n))
		return;
	pgs_buf_init(&tok);
	if (pgs_payload_next_token(c, p, n, &tok, &err) != PGS_OK)
	{
		pgs_buf_free(&tok);
		result_err(ctx, &err);
		return;
	}
	if (tok.len)
		sqlite3_result_blob64(ctx, tok.p, tok.len, pgs_free);
	else
		pgs_buf_free(&tok);
}

static void
sync_payload_until(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	const uint8_t *p;
	size_t		   n;
	int64_t		   until;
	pgs_err		   err;

	(void) argc;
	if (sqlite3_value_type(argv[0]) == SQLITE_NULL)
		return;
	if (!blob_arg(ctx, argv[0], "sync_payload_until", &p, &n))
		return;
	if (pgs_payload_until(p, n, &until, &err) != PGS_OK)
	{
		result_err(ctx, &err);
		return;
	}
	sqlite3_result_int64(ctx, until);
}

static void
sync_payload_info(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	const uint8_t *p;
	size_t		   n;
	char		  *json;
	pgs_err		   err;

	(void) argc;
	if (!blob_arg(ctx, argv[0], "sync_payload_info", &p, &n))
		return;
	if (pgs_payload_info(p, n, &json, &err) != PGS_OK)
	{
		result_err(ctx, &err);
		return;
	}
	sqlite3_result_text(ctx, json, -1, pgs_free);
	sqlite3_result_subtype(ctx, 'J');
}

static void
sync_apply_payload(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	db_conn		   *c = sqlite3_user_data(ctx);
	const uint8_t  *p;
	size_t			n;
	pgs_apply_stats st;
	pgs_err			err, ignore;
	pgs_rc			rc;

	(void) argc;
	if (!blob_arg(ctx, argv[0], "sync_apply_payload", &p, &n))
		return;
	if (!ready(ctx, c, "sync_apply_payload"))
		return;
	if (sl_exec(c, "SAVEPOINT sync_apply", &err) != PGS_OK)
	{
		result_err(ctx, &err);
		return;
	}
	/*
	 * Foreign keys are checked per statement (the core applies parents
	 * first and retries a row whose parent comes later), so that a row that
	 * really lacks its parent is this row's rejection, not a failed commit.
	 * The fast path first; a row that fails sends the apply back, carefully.
	 */
	sl_protect_load(c);
	memset(&st, 0, sizeof st);
	if ((rc = sl_events_begin(c, &err)) == PGS_OK)
	{
		c->applying = true;
		rc = pgs_apply(c, p, n, false, &st, &err);
	}
	if (rc == PGS_ERR_CAREFUL)
	{
		sl_discard(c);
		sl_exec(c, "ROLLBACK TO sync_apply", &ignore);
		c->txn_ver = 0;
		sl_reload(c, &ignore);
		memset(&st, 0, sizeof st);
		/* begins again: the rollback undid the event tables if sl_events_begin made them */
		if ((rc = sl_events_begin(c, &err)) == PGS_OK)
			rc = pgs_apply(c, p, n, true, &st, &err);
	}
	c->applying = false;
	c->careful = false;
	if (rc == PGS_OK)
		rc = sl_events_end(c, &err);
	if (rc != PGS_OK)
	{
		sl_discard(c);
		sl_events_reset(c);
		sl_exec(c, "ROLLBACK TO sync_apply", &ignore);
		sl_exec(c, "RELEASE sync_apply", &ignore);
		c->txn_ver = 0;
		sl_reload(c, &ignore); /* sites interned in the savepoint are gone */
		result_err(ctx, &err);
		return;
	}
	if (sl_exec(c, "RELEASE sync_apply", &err) != PGS_OK)
	{
		result_err(ctx, &err);
		return;
	}
	c->last_apply = st; /* rows and columns, for the network client's summaries */
	sqlite3_result_int64(ctx, st.won);
}

/* ---- connection state and registration ---- */

static int
on_commit(void *arg)
{
	db_conn *c = arg;

	if (c->txn_ver)
		sl_background_committed(c, c->txn_ver); /* a synced table was written */
	sl_txn_end(c);
	return 0;
}

static void
on_rollback(void *arg)
{
	sl_txn_end(arg);
}

/* finalize_all drops every cached statement; they are re-prepared on use. */
static void
finalize_all(db_conn *c)
{
	sl_unload_tables(c);
	sl_stmt_clear(c);
	sqlite3_finalize(c->st_ver_get);
	sqlite3_finalize(c->st_ver_bump);
	sqlite3_finalize(c->st_site_add);
	sqlite3_finalize(c->st_held_get);
	sqlite3_finalize(c->st_held_put);
	sqlite3_finalize(c->st_held_del);
	sqlite3_finalize(c->st_row_read);
	sqlite3_finalize(c->st_event);
	c->st_row_read = c->st_event = NULL;
	sqlite3_finalize(c->st_seq_bump);
	c->st_seq_bump = NULL;
	c->has_seq = -1;
	c->st_ver_get = c->st_ver_bump = c->st_site_add = NULL;
	c->st_held_get = c->st_held_put = c->st_held_del = NULL;
	c->ready = false;
}

static void
conn_free(void *arg)
{
	db_conn *c = arg;

	sl_background_closing(c);
	finalize_all(c);
	sqlite3_free(c->sites);
	sqlite3_free(c->stamps);
	sqlite3_free(c->parents);
	sqlite3_free(c->row_vals);
	pgs_buf_free(&c->heldbuf);
	pgs_buf_free(&c->clockbuf);
	pgs_buf_free(&c->scratch);
	pgs_buf_free(&c->fire_blob);
	sqlite3_free(c->fire_mask);
	sqlite3_free(c->fire_changed);
	sl_events_free(c);
	sqlite3_free(c);
}

/*
 * sqlitesync_close: an empty eponymous virtual table whose only job is its
 * xDisconnect. sqlite3_close() disconnects virtual tables before it checks
 * for unfinalized statements (so that they can drop cached statements), which
 * is exactly what we need: the cached statements go, and a plain
 * sqlite3_close() succeeds instead of returning SQLITE_BUSY.
 */
typedef struct close_vtab
{
	sqlite3_vtab base;
	db_conn		*c;
} close_vtab;

static int
close_connect(sqlite3 *db, void *aux, int argc, const char *const *argv, sqlite3_vtab **out,
			  char **errmsg)
{
	close_vtab *v;
	int			rc;

	(void) argc, (void) argv, (void) errmsg;
	rc = sqlite3_declare_vtab(db, "CREATE TABLE x(unused)");
	if (rc != SQLITE_OK)
		return rc;
	if (!(v = sqlite3_malloc(sizeof *v)))
		return SQLITE_NOMEM;
	memset(v, 0, sizeof *v);
	v->c = aux;
	*out = &v->base;
	return SQLITE_OK;
}

static int
close_disconnect(sqlite3_vtab *vt)
{
	sl_background_closing(((close_vtab *) vt)->c); /* stop a syncer this connection started */
	finalize_all(((close_vtab *) vt)->c);
	sqlite3_free(vt);
	return SQLITE_OK;
}

static int
close_best_index(sqlite3_vtab *vt, sqlite3_index_info *info)
{
	(void) vt;
	info->estimatedCost = 1;
	info->estimatedRows = 0;
	return SQLITE_OK;
}

static int
close_open(sqlite3_vtab *vt, sqlite3_vtab_cursor **cur)
{
	(void) vt;
	if (!(*cur = sqlite3_malloc(sizeof **cur)))
		return SQLITE_NOMEM;
	memset(*cur, 0, sizeof **cur);
	return SQLITE_OK;
}

static int
close_close(sqlite3_vtab_cursor *cur)
{
	sqlite3_free(cur);
	return SQLITE_OK;
}

static int
close_filter(sqlite3_vtab_cursor *cur, int idx, const char *s, int argc, sqlite3_value **argv)
{
	(void) cur, (void) idx, (void) s, (void) argc, (void) argv;
	return SQLITE_OK;
}

static int
close_next(sqlite3_vtab_cursor *cur)
{
	(void) cur;
	return SQLITE_OK;
}

static int
close_eof(sqlite3_vtab_cursor *cur)
{
	(void) cur;
	return 1;
}

static int
close_column(sqlite3_vtab_cursor *cur, sqlite3_context *ctx, int i)
{
	(void) cur, (void) ctx, (void) i;
	return SQLITE_OK;
}

static int
close_rowid(sqlite3_vtab_cursor *cur, sqlite3_int64 *rowid)
{
	(void) cur;
	*rowid = 0;
	return SQLITE_OK;
}

static const sqlite3_module close_module = {
	.xConnect = close_connect,
	.xBestIndex = close_best_index,
	.xDisconnect = close_disconnect,
	.xOpen = close_open,
	.xClose = close_close,
	.xFilter = close_filter,
	.xNext = close_next,
	.xEof = close_eof,
	.xColumn = close_column,
	.xRowid = close_rowid,
};

static void *
sl_malloc(size_t n)
{
	return sqlite3_malloc64(n);
}

static void *
sl_realloc(void *p, size_t n)
{
	return sqlite3_realloc64(p, n);
}

static void
sl_free(void *p)
{
	sqlite3_free(p);
}

static const struct
{
	const char *name;
	int			nargs;
	int			flags;
	void (*fn)(sqlite3_context *, int, sqlite3_value **);
} functions[] = {
	{"sync_init", 1, SQLITE_DIRECTONLY, sync_init},
	{"sync_init", 2, SQLITE_DIRECTONLY, sync_init},
	{"sync_cleanup", 1, SQLITE_DIRECTONLY, sync_cleanup},
	{"sync_site_id", 0, 0, sync_site_id},
	{"sync_db_version", 0, 0, sync_db_version},
	{"sync_payload", 1, SQLITE_DIRECTONLY, sync_payload},
	{"sync_payload", 2, SQLITE_DIRECTONLY, sync_payload},
	{"sync_payload", 4, SQLITE_DIRECTONLY, sync_payload},
	{"sync_payload_cursor", 1, SQLITE_DIRECTONLY, sync_payload_cursor},
	{"sync_payload_until", 1, SQLITE_DETERMINISTIC | SQLITE_INNOCUOUS, sync_payload_until},
	{"sync_apply_payload", 1, SQLITE_DIRECTONLY, sync_apply_payload},
	{"sync_payload_info", 1, SQLITE_DETERMINISTIC | SQLITE_INNOCUOUS | SQLITE_RESULT_SUBTYPE,
	 sync_payload_info},
	{"sync_uuid", 0, SQLITE_INNOCUOUS, sync_uuid},
	{"sync_version", 0, SQLITE_DETERMINISTIC | SQLITE_INNOCUOUS, sync_version},
	/* called by the capture triggers; see sl_capture.c */
	{"sqlitesync_ver", 0, 0, sl_fire_ver},
	{"sqlitesync_bulk", 1, 0, sl_fire_bulk},
	{"sqlitesync_fresh", 0, 0, sl_fire_fresh},
	{"sqlitesync_relife", 2, 0, sl_fire_relife},
	{"sqlitesync_touch", 2, 0, sl_fire_touch},
	{"sqlitesync_tomb", 1, 0, sl_fire_tomb},
	{"sqlitesync_done", -1, 0, sl_fire_done},
	/* the capture triggers' WHEN clauses, and the older triggers (last: owns c) */
	{"sqlitesync_capture", -1, 0, sl_capture},
};

/*
 * sl_attach sets the extension up on db (functions, hooks, virtual tables)
 * and returns its per-connection state in *out (owned by db: freed when it
 * closes). Used by the entry point and by the background syncer for its
 * own connection.
 */
int
sl_attach(sqlite3 *db, char **pzErrMsg, db_conn **out)
{
	db_conn *c;
	pgs_err	 ignore;

	if (out)
		*out = NULL;
	c = sqlite3_malloc(sizeof *c);
	if (!c)
		return SQLITE_NOMEM;
	memset(c, 0, sizeof *c);
	c->has_seq = -1;
	c->db = db;
	for (size_t i = 0; i < sizeof functions / sizeof functions[0]; i++)
	{
		int rc = sqlite3_create_function_v2(
			db, functions[i].name, functions[i].nargs, SQLITE_UTF8 | functions[i].flags, c,
			functions[i].fn, NULL, NULL,
			i == sizeof functions / sizeof functions[0] - 1 ? conn_free : NULL);

		if (rc != SQLITE_OK)
		{
			if (pzErrMsg)
				*pzErrMsg = sqlite3_mprintf("sqlitesync: could not register %s", functions[i].name);
			if (i < sizeof functions / sizeof functions[0] - 1)
				conn_free(c);
			return rc;
		}
	}
	if (sqlite3_create_module_v2(db, "sqlitesync_close", &close_module, c, NULL) != SQLITE_OK ||
		sqlite3_exec(db, "SELECT * FROM sqlitesync_close", NULL, NULL, NULL) != SQLITE_OK)
	{
		if (pzErrMsg)
			*pzErrMsg = sqlite3_mprintf("sqlitesync: could not register its close hook: %s",
										sqlite3_errmsg(db));
		return SQLITE_ERROR;
	}
	if (sl_alter_register(db, c) != SQLITE_OK)
	{
		if (pzErrMsg)
			*pzErrMsg = sqlite3_mprintf("sqlitesync: could not register sync_alter");
		return SQLITE_ERROR;
	}
	if (sl_gc_register(db, c) != SQLITE_OK)
	{
		if (pzErrMsg)
			*pzErrMsg = sqlite3_mprintf("sqlitesync: could not register sync_gc");
		return SQLITE_ERROR;
	}
	if (sl_network_register(db, c) != SQLITE_OK ||
		sl_background_register(db, c, c->net, sl_attach) != SQLITE_OK ||
		sl_pending_register(db, c) != SQLITE_OK)
	{
		if (pzErrMsg)
			*pzErrMsg =
				sqlite3_mprintf("sqlitesync: could not register the sync_network functions");
		return SQLITE_ERROR;
	}
	sqlite3_commit_hook(db, on_commit, c);
	sqlite3_rollback_hook(db, on_rollback, c);
	(void) sl_load(c, &ignore); /* fine to fail before the first sync_init */
	if (out)
		*out = c;
	return SQLITE_OK;
}

#ifdef _WIN32
__declspec(dllexport)
#endif
	int sqlite3_sqlitesync_init(sqlite3 *db, char **pzErrMsg, const sqlite3_api_routines *pApi)
{
	static const pgs_allocator alloc = {sl_malloc, sl_realloc, sl_free};

	SQLITE_EXTENSION_INIT2(pApi);
	pgs_set_allocator(&alloc);
	return sl_attach(db, pzErrMsg, NULL);
}
