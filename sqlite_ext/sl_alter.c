/*
 * sl_alter.c — schema changes of synced tables on SQLite (docs/MIGRATIONS.md).
 *
 * SQLite has no DDL hooks (its authorizer belongs to the app), so a synced
 * table's schema is checked whenever the metadata loads (the first sqlitesync
 * call after any schema change: sl_meta.c), against what sync_init recorded:
 *
 *   RENAME COLUMN  supported: SQLite rewrites the capture triggers itself;
 *                  the column is found again by its position (cid, kept in
 *                  sync_column_pos), travels under its new name, and its
 *                  former name goes to sync_column_history so that replicas
 *                  that still use it match it. Recorded by the next write
 *                  (sl_alter_resolve and sl_alter_persist, in sl_meta.c).
 *   DROP COLUMN    refused by SQLite itself (the capture triggers name the
 *                  column); sync_alter(t, 'DROP COLUMN c') does it: the
 *                  column leaves every clock blob, payloads that still carry
 *                  it are ignored.
 *   ADD COLUMN     then sync_init(t) (or sync_alter(t, 'ADD COLUMN ...')).
 *   RENAME TO      refused at the next call with the fix (rename it back):
 *                  a table's name is its name in payloads.
 *   key changes    impossible with ALTER TABLE in SQLite.
 */
#include "sl_internal.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

static pgs_rc
nomem(pgs_err *err)
{
	return pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
}

/* ---- sync_alter ------------------------------------------------------------ */

/* ident: the identifier at *p (bare, or "quoted" with "" inside), advanced past it. */
static char *
ident(const char **p)
{
	const char *s = *p;
	char	   *out;

	while (*s == ' ' || *s == '\t' || *s == '\n')
		s++;
	if (*s == '"' || *s == '`' || *s == '[')
	{
		char close = *s == '[' ? ']' : *s;
		int	 n = 0;

		out = sqlite3_malloc64(strlen(s) + 1);
		if (!out)
			return NULL;
		for (s++; *s; s++)
		{
			if (*s == close && s[1] == close && close != ']')
				out[n++] = *s++;
			else if (*s == close)
				break;
			else
				out[n++] = *s;
		}
		if (*s != close)
		{
			sqlite3_free(out);
			return NULL;
		}
		out[n] = '\0';
		*p = s + 1;
		return out;
	}
	{
		const char *b = s;

		while (*s && *s != ' ' && *s != '\t' && *s != '\n' && *s != ';')
			s++;
		if (s == b)
			return NULL;
		*p = s;
		return sqlite3_mprintf("%.*s", (int) (s - b), b);
	}
}

/* word: whether *p starts with keyword w (any case), then skips it. */
static bool
word(const char **p, const char *w)
{
	const char *s = *p;
	size_t		n = strlen(w);

	while (*s == ' ' || *s == '\t' || *s == '\n')
		s++;
	if (sqlite3_strnicmp(s, w, (int) n) != 0 ||
		(s[n] && s[n] != ' ' && s[n] != '\t' && s[n] != '\n' && s[n] != '"'))
		return false;
	*p = s + n;
	return true;
}

static void
alter_fail(sqlite3_context *ctx, pgs_err *err)
{
	char *m = err->hint[0] ? sqlite3_mprintf("%s. %s", err->msg, err->hint)
						   : sqlite3_mprintf("%s", err->msg);

	sqlite3_result_error(ctx, m ? m : err->msg, -1);
	sqlite3_free(m);
}

/* drop_col: DROP COLUMN of synced column i of t (in sync_alter's savepoint). */
static pgs_rc
drop_col(db_conn *c, db_table *t, int i, const char *cmd, pgs_err *err)
{
	long long id = (long long) t->id;
	char	 *name = sqlite3_mprintf("%s", t->col_names[i]);
	char	 *tname = sqlite3_mprintf("%s", t->name);
	int		  ncols = t->ncols;
	pgs_rc	  rc;

	if (!name || !tname)
		return nomem(err);
	/* the capture triggers name the column: SQLite refuses the drop while they exist */
	if ((rc = sl_execf(c, err,
					   "DROP TRIGGER IF EXISTS \"%w__sync_ins\"; DROP TRIGGER IF EXISTS "
					   "\"%w__sync_upd\"; DROP TRIGGER IF EXISTS \"%w__sync_del\";"
					   "ALTER TABLE \"%w\" %s;"
					   "UPDATE \"%w__sync_clock\" SET clk = sqlitesync_rowclock_drop(clk, %d, %d);"
					   "DELETE FROM sync_columns WHERE tbl = %lld AND is_pk = 0 AND idx = %d;"
					   "UPDATE sync_columns SET idx = -idx - 1 WHERE tbl = %lld AND is_pk = 0 AND "
					   "idx > %d;"
					   "UPDATE sync_columns SET idx = -idx - 2 WHERE tbl = %lld AND is_pk = 0 AND "
					   "idx < 0;"
					   "INSERT OR REPLACE INTO sync_column_history(tbl, name, now) "
					   "VALUES (%lld, %Q, NULL);"
					   "UPDATE sync_column_history SET now = NULL WHERE tbl = %lld AND now = %Q;"
					   "DELETE FROM sync_column_pos WHERE tbl = %lld",
					   tname, tname, tname, tname, cmd, tname, ncols, i, id, i, id, i, id, id, name,
					   id, name, id)) == PGS_OK)
	{
		const char *algo = t->algo == DB_ALGO_GSET ? "gset" : "cls";

		/* triggers again, over the remaining columns (t is reloaded: use copies) */
		rc = sl_init_table(c, tname, algo, err);
	}
	sqlite3_free(name);
	sqlite3_free(tname);
	return rc;
}

/*
 * sync_alter(table, command): ALTER TABLE table command, for ADD COLUMN
 * (synced at once, held values fill in), DROP COLUMN and RENAME COLUMN,
 * keeping clocks valid and older replicas syncing (docs/MIGRATIONS.md).
 */
static void
sync_alter(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	db_conn	   *c = sqlite3_user_data(ctx);
	const char *table = (const char *) sqlite3_value_text(argv[0]);
	const char *cmd = (const char *) sqlite3_value_text(argv[1]);
	const char *p = cmd;
	db_table   *t = NULL;
	pgs_err		err;
	pgs_rc		rc;
	char	   *col = NULL, *tname = NULL;
	int			verb; /* 0 add, 1 drop, 2 rename */

	(void) argc;
	if (!table || !cmd)
	{
		sqlite3_result_error(ctx, "sync_alter: pass a table and a command", -1);
		return;
	}
	if (word(&p, "ADD"))
		verb = 0;
	else if (word(&p, "DROP"))
		verb = 1;
	else if (word(&p, "RENAME"))
		verb = 2;
	else
		verb = -1;
	if (verb >= 0)
	{
		const char *q = p;

		if (word(&q, "CONSTRAINT") || (verb == 2 && word(&q, "TO")))
			verb = -1; /* not a column change */
		else if (word(&q, "COLUMN"))
			p = q;
	}
	if (verb < 0 || strchr(cmd, ';'))
	{
		sqlite3_result_error(
			ctx,
			"sync_alter: pass one column change: 'ADD COLUMN name type ...', "
			"'DROP COLUMN name' or 'RENAME COLUMN old TO new' (docs/MIGRATIONS.md)",
			-1);
		return;
	}
	if (sl_load(c, &err) != PGS_OK)
	{
		alter_fail(ctx, &err);
		return;
	}
	for (int i = 0; i < c->ntables; i++)
		if (sqlite3_stricmp(c->tables[i]->name, table) == 0)
			t = c->tables[i];
	if (!t)
	{
		sqlite3_result_error(ctx, "sync_alter: the table is not synced; use ALTER TABLE", -1);
		return;
	}
	if ((rc = sl_exec(c, "SAVEPOINT sync_alter", &err)) != PGS_OK)
	{
		alter_fail(ctx, &err);
		return;
	}
	/* positions first: a rename is found again by them */
	rc = sl_alter_persist(c, &err);
	if (rc == PGS_OK && !(tname = sqlite3_mprintf("%s", t->name)))
		rc = nomem(&err);
	if (rc == PGS_OK && verb == 1 && !(col = ident(&p)))
		rc = pgs_failf(&err, PGS_ERR_MISUSE, "Name the column to drop.",
					   "sync_alter: no column in \"%s\"", cmd);
	if (rc == PGS_OK && verb == 1)
	{
		int i = -1;

		for (int k = 0; k < t->ncols; k++)
			if (sqlite3_stricmp(t->col_names[k], col) == 0)
				i = k;
		for (int k = 0; k < t->npk; k++)
			if (sqlite3_stricmp(t->pk_names[k], col) == 0)
				rc = pgs_failf(&err, PGS_ERR_MISUSE,
							   "A synced table's key cannot change (docs/MIGRATIONS.md).",
							   "sync_alter: \"%s\" is a key column of \"%s\"", col, t->name);
		if (rc == PGS_OK)
			rc = i >= 0 ? drop_col(c, t, i, cmd, &err)
						: sl_execf(c, &err, "ALTER TABLE \"%w\" %s", tname, cmd);
	}
	else if (rc == PGS_OK)
	{
		rc = sl_execf(c, &err, "ALTER TABLE \"%w\" %s", tname, cmd);
		if (rc == PGS_OK && verb == 0)
		{
			const char *algo = t->algo == DB_ALGO_GSET ? "gset" : "cls";

			rc = sl_init_table(c, tname, algo, &err);
		}
		if (rc == PGS_OK && verb == 2)
		{
			/* found again by position, recorded now */
			if ((rc = sl_reload(c, &err)) == PGS_OK)
				rc = sl_alter_persist(c, &err);
		}
	}
	if (rc == PGS_OK && (rc = sl_reload(c, &err)) == PGS_OK)
		rc = sl_alter_persist(c, &err);
	if (rc == PGS_OK && verb == 0)
	{
		int64_t n;

		/* held changes the new column lets in are an apply's: change events */
		if ((rc = sl_events_begin(c, &err)) == PGS_OK &&
			(rc = sl_apply_held(c, NULL, &n, &err)) == PGS_OK)
			rc = sl_events_end(c, &err);
		if (rc != PGS_OK)
			sl_events_reset(c);
	}
	sqlite3_free(col);
	sqlite3_free(tname);
	if (rc != PGS_OK)
	{
		pgs_err ignore;

		sl_exec(c, "ROLLBACK TO sync_alter; RELEASE sync_alter", &ignore);
		sl_unload_tables(c);
		c->ready = false;
		alter_fail(ctx, &err);
		return;
	}
	sl_exec(c, "RELEASE sync_alter", &err);
	c->ready = false; /* what it wrote is read at the next call */
	sqlite3_result_int(ctx, 1);
}

/* sqlitesync_rowclock_drop(clk, ncols, col): a clock blob without one column. */
static void
rowclock_drop(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	pgs_buf out;
	pgs_err err;

	(void) argc;
	pgs_buf_init(&out);
	if (pgs_rowclock_drop_col(sqlite3_value_blob(argv[0]), (size_t) sqlite3_value_bytes(argv[0]),
							  sqlite3_value_int(argv[1]), sqlite3_value_int(argv[2]), &out,
							  &err) != PGS_OK)
	{
		sqlite3_result_error(ctx, err.msg, -1);
		return;
	}
	sqlite3_result_blob64(ctx, out.p, out.len, SQLITE_TRANSIENT);
	pgs_buf_free(&out);
}

/*
 * sqlitesync_key_json(tbl, k): the key k (as sync_held stores it) as the JSON
 * object sync_network_rejected shows; for the sync_network_held view. NULL
 * when the table is not synced here (yet): then k is shown as hex.
 */
static void
key_json(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	db_conn		  *c = sqlite3_user_data(ctx);
	const char	  *tbl = (const char *) sqlite3_value_text(argv[0]);
	const uint8_t *k = sqlite3_value_blob(argv[1]), *ke = k + sqlite3_value_bytes(argv[1]);
	db_table	  *t = NULL;
	pgs_value	   pk[64];
	char		  *json;
	pgs_err		   err;
	bool		   ok;

	(void) argc;
	if (tbl && (c->ready || sl_load(c, &err) == PGS_OK))
		for (int i = 0; i < c->ntables; i++)
			if (sqlite3_stricmp(c->tables[i]->name, tbl) == 0)
				t = c->tables[i];
	ok = t && k && t->npk <= 64;
	for (int i = 0; ok && i < t->npk; i++)
	{
		uint8_t type = *k++;

		ok = k <= ke && pgs_value_get(&k, ke, type, &pk[i], NULL) == PGS_OK;
	}
	if (!ok || !(json = sl_pk_json(t, pk)))
	{
		sqlite3_result_null(ctx);
		return;
	}
	sqlite3_result_text(ctx, json, -1, sqlite3_free);
}

int
sl_alter_register(sqlite3 *db, db_conn *c)
{
	int rc = sqlite3_create_function_v2(db, "sync_alter", 2, SQLITE_UTF8 | SQLITE_DIRECTONLY, c,
										sync_alter, NULL, NULL, NULL);

	if (rc == SQLITE_OK)
		rc = sqlite3_create_function_v2(db, "sqlitesync_key_json", 2, SQLITE_UTF8, c, key_json,
										NULL, NULL, NULL);
	if (rc == SQLITE_OK)
		rc = sqlite3_create_function_v2(db, "sqlitesync_rowclock_drop", 3,
										SQLITE_UTF8 | SQLITE_DIRECTONLY, c, rowclock_drop, NULL,
										NULL, NULL);
	return rc;
}
