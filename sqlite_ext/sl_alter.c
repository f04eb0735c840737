/*
 * sl_alter.c — schema changes of synced tables on SQLite (docs/MIGRATIONS.md).
 *
 * SQLite has no DDL hooks (its authorizer belongs to the app), so a synced
 * table's schema is checked whenever the metadata loads (every sqlitesync
 * call), against what sync_init recorded:
 *
 *   RENAME COLUMN  supported: SQLite rewrites the capture triggers itself;
 *                  the column is found again by its position (cid, kept in
 *                  sync_column_pos), travels under its new name, and its
 *                  former name goes to sync_column_history so that replicas
 *                  that still use it match it. Recorded by the next write.
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

const char *sl_alter_meta_sql =
	"CREATE TABLE IF NOT EXISTS sync_column_history(tbl INTEGER NOT NULL, name TEXT NOT NULL,"
	"  now TEXT, PRIMARY KEY (tbl, name)) WITHOUT ROWID;"
	"CREATE TABLE IF NOT EXISTS sync_column_pos(tbl INTEGER NOT NULL, idx INTEGER NOT NULL,"
	"  cid INTEGER NOT NULL, PRIMARY KEY (tbl, idx)) WITHOUT ROWID;";

/* one column of the table as SQLite describes it */
typedef struct
{
	int	  cid;
	char *name;
} live_col;

static void
free_live(live_col *l, int n)
{
	for (int i = 0; i < n; i++)
		sqlite3_free(l[i].name);
	sqlite3_free(l);
}

static pgs_rc
nomem(pgs_err *err)
{
	return pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
}

/* live_cols: the table's columns (pragma_table_xinfo, visible ones). */
static pgs_rc
live_cols(db_conn *c, const char *table, live_col **out, int *n, pgs_err *err)
{
	sqlite3_stmt *st;
	live_col	 *l = NULL;
	int			  k = 0;

	*out = NULL;
	*n = 0;
	if (sqlite3_prepare_v2(c->db, "SELECT cid, name, hidden FROM pragma_table_xinfo(?1)", -1, &st,
						   NULL) != SQLITE_OK)
		return sl_dberr(c, err, "could not read the table's columns");
	sqlite3_bind_text(st, 1, table, -1, SQLITE_STATIC);
	while (sqlite3_step(st) == SQLITE_ROW)
	{
		live_col *nl;

		if (sqlite3_column_int(st, 2) != 0)
			continue;
		if (!(nl = sqlite3_realloc64(l, sizeof(live_col) * (size_t) (k + 1))))
		{
			sqlite3_finalize(st);
			free_live(l, k);
			return nomem(err);
		}
		l = nl;
		l[k].cid = sqlite3_column_int(st, 0);
		l[k].name = sqlite3_mprintf("%s", sqlite3_column_text(st, 1));
		k++;
	}
	sqlite3_finalize(st);
	*out = l;
	*n = k;
	return PGS_OK;
}

static int
live_find(const live_col *l, int n, const char *name)
{
	for (int i = 0; i < n; i++)
		if (l[i].name && sqlite3_stricmp(l[i].name, name) == 0)
			return i;
	return -1;
}

static pgs_rc
add_hist(db_table *t, const char *name, int col)
{
	char **nn = sqlite3_realloc64(t->hist_names, sizeof(char *) * (size_t) (t->nhist + 1));
	int	  *nc;

	if (!nn)
		return PGS_ERR_NOMEM;
	t->hist_names = nn;
	if (!(nc = sqlite3_realloc64(t->hist_cols, sizeof(int) * (size_t) (t->nhist + 1))))
		return PGS_ERR_NOMEM;
	t->hist_cols = nc;
	if (!(t->hist_names[t->nhist] = sqlite3_mprintf("%s", name)))
		return PGS_ERR_NOMEM;
	t->hist_cols[t->nhist++] = col;
	return PGS_OK;
}

/* table_gone: the error for a synced table that is not there any more. */
static pgs_rc
table_gone(db_conn *c, db_table *t, pgs_err *err)
{
	sqlite3_stmt *st;
	char		 *now = NULL;
	pgs_rc		  rc;

	if (sqlite3_prepare_v2(c->db,
						   "SELECT tbl_name FROM sqlite_schema WHERE type = 'trigger' AND name = "
						   "?1 || '__sync_ins'",
						   -1, &st, NULL) == SQLITE_OK)
	{
		sqlite3_bind_text(st, 1, t->name, -1, SQLITE_STATIC);
		if (sqlite3_step(st) == SQLITE_ROW)
			now = sqlite3_mprintf("%s", sqlite3_column_text(st, 0));
		sqlite3_finalize(st);
	}
	if (now)
	{
		char *hint = sqlite3_mprintf(
			"Rename it back: ALTER TABLE \"%w\" RENAME TO \"%w\". A synced table's name is its "
			"name in payloads; to use another one, create the new table, sync_init it, copy the "
			"rows and drop the old table (docs/MIGRATIONS.md).",
			now, t->name);

		rc = pgs_failf(err, PGS_ERR_SCHEMA, hint, "synced table \"%s\" was renamed to \"%s\"",
					   t->name, now);
		sqlite3_free(hint);
		sqlite3_free(now);
		return rc;
	}
	return pgs_failf(err, PGS_ERR_SCHEMA,
					 "Create it again, or stop syncing it with sync_cleanup (docs/MIGRATIONS.md).",
					 "synced table \"%s\" no longer exists", t->name);
}

pgs_rc
sl_alter_resolve(db_conn *c, db_table *t, pgs_err *err)
{
	live_col	 *live = NULL;
	int			  nlive = 0, exists = 0;
	int			 *pos = NULL; /* stored cid of each synced column, -1 unknown */
	sqlite3_stmt *st;
	pgs_rc		  rc = PGS_OK;

	if (sqlite3_prepare_v2(c->db,
						   "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = ?1",
						   -1, &st, NULL) != SQLITE_OK)
		return sl_dberr(c, err, "could not read the schema");
	sqlite3_bind_text(st, 1, t->name, -1, SQLITE_STATIC);
	if (sqlite3_step(st) == SQLITE_ROW)
		exists = sqlite3_column_int(st, 0);
	sqlite3_finalize(st);
	if (!exists)
		return c->alter_lenient ? PGS_OK : table_gone(c, t, err);
	if ((rc = live_cols(c, t->name, &live, &nlive, err)) != PGS_OK)
		return rc;
	sqlite3_free(t->cids);
	t->cids = sqlite3_malloc64(sizeof(int) * (size_t) (t->ncols + 1));
	if (!(pos = sqlite3_malloc64(sizeof(int) * (size_t) (t->ncols + 1))) || !t->cids)
	{
		sqlite3_free(pos);
		free_live(live, nlive);
		return nomem(err);
	}
	for (int i = 0; i < t->ncols; i++)
		pos[i] = -1;
	/* before the first write of a database made by an older build: no table yet */
	if (sqlite3_prepare_v2(c->db, "SELECT idx, cid FROM sync_column_pos WHERE tbl = ?1", -1, &st,
						   NULL) == SQLITE_OK)
	{
		sqlite3_bind_int64(st, 1, t->id);
		while (sqlite3_step(st) == SQLITE_ROW)
		{
			int i = sqlite3_column_int(st, 0);

			if (i >= 0 && i < t->ncols)
				pos[i] = sqlite3_column_int(st, 1);
		}
		sqlite3_finalize(st);
	}
	for (int k = 0; k < t->npk && rc == PGS_OK; k++)
		if (live_find(live, nlive, t->pk_names[k]) < 0)
			rc = pgs_failf(err, PGS_ERR_SCHEMA,
						   "Rename the key column back: payloads name key columns, and every "
						   "replica must use one name (docs/MIGRATIONS.md).",
						   "key column \"%s\" of synced table \"%s\" was renamed or removed",
						   t->pk_names[k], t->name);
	for (int i = 0; i < t->ncols && rc == PGS_OK; i++)
	{
		int at = live_find(live, nlive, t->col_names[i]);

		if (at < 0)
		{
			/* renamed in place (SQLite keeps the position): travels under the new name */
			for (int k = 0; k < nlive && pos[i] >= 0 && at < 0; k++)
			{
				bool synced = false;

				for (int j = 0; j < t->ncols; j++)
					synced |= j != i && sqlite3_stricmp(t->col_names[j], live[k].name) == 0;
				for (int j = 0; j < t->npk; j++)
					synced |= sqlite3_stricmp(t->pk_names[j], live[k].name) == 0;
				if (live[k].cid == pos[i] && !synced)
					at = k;
			}
			if (at < 0)
			{
				rc = pgs_failf(err, PGS_ERR_SCHEMA,
							   "Restore the column; drop a synced column with sync_alter('table', "
							   "'DROP COLUMN name') (docs/MIGRATIONS.md).",
							   "column \"%s\" of synced table \"%s\" no longer exists",
							   t->col_names[i], t->name);
				break;
			}
			if (add_hist(t, t->col_names[i], i) != PGS_OK)
			{
				rc = nomem(err);
				break;
			}
			sqlite3_free(t->col_names[i]);
			sqlite3_free(t->col_q[i]);
			t->col_names[i] = sqlite3_mprintf("%s", live[at].name);
			t->col_q[i] = sl_quote(live[at].name);
			if (!t->col_names[i] || !t->col_q[i])
			{
				rc = nomem(err);
				break;
			}
			t->renames++;
			t->alter_dirty = true;
		}
		if (live[at].cid != pos[i])
			t->alter_dirty = true;
		t->cids[i] = live[at].cid;
	}
	sqlite3_free(pos);
	free_live(live, nlive);
	if (rc != PGS_OK)
		return c->alter_lenient ? PGS_OK : rc;
	/* former names recorded earlier */
	if (sqlite3_prepare_v2(c->db, "SELECT name, now FROM sync_column_history WHERE tbl = ?1", -1,
						   &st, NULL) == SQLITE_OK)
	{
		sqlite3_bind_int64(st, 1, t->id);
		while (sqlite3_step(st) == SQLITE_ROW && rc == PGS_OK)
		{
			const char *nm = (const char *) sqlite3_column_text(st, 0);
			const char *now = (const char *) sqlite3_column_text(st, 1);
			int			col = -1;
			bool		dup = false;

			for (int i = 0; now && i < t->ncols; i++)
				if (sqlite3_stricmp(t->col_names[i], now) == 0)
					col = i;
			for (int h = 0; h < t->nhist; h++)
				dup |= sqlite3_stricmp(t->hist_names[h], nm) == 0;
			if (!dup && add_hist(t, nm, col) != PGS_OK)
				rc = nomem(err);
		}
		sqlite3_finalize(st);
	}
	t->info.col_names = (const char *const *) t->col_names;
	t->info.nhist = t->nhist;
	t->info.hist_names = (const char *const *) t->hist_names;
	t->info.hist_cols = t->hist_cols;
	if (t->alter_dirty)
		c->alter_dirty = true;
	return rc;
}

static pgs_rc
execf(db_conn *c, pgs_err *err, const char *fmt, ...)
{
	va_list ap;
	char   *sql;
	pgs_rc	rc;

	va_start(ap, fmt);
	sql = sqlite3_vmprintf(fmt, ap);
	va_end(ap);
	if (!sql)
		return nomem(err);
	rc = sl_exec(c, sql, err);
	sqlite3_free(sql);
	return rc;
}

pgs_rc
sl_alter_persist(db_conn *c, pgs_err *err)
{
	pgs_rc rc;

	sqlite3_stmt *st;
	int			  have = 0;

	if (!c->alter_dirty)
		return PGS_OK;
	/* made by sync_init (sl_ensure_meta); a database of an older build gets them there */
	if (sqlite3_prepare_v2(c->db,
						   "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name IN "
						   "('sync_column_history', 'sync_column_pos')",
						   -1, &st, NULL) == SQLITE_OK)
	{
		if (sqlite3_step(st) == SQLITE_ROW)
			have = sqlite3_column_int(st, 0);
		sqlite3_finalize(st);
	}
	if (have != 2)
		return PGS_OK;
	for (int k = 0; k < c->ntables; k++)
	{
		db_table *t = c->tables[k];
		long long id = (long long) t->id;

		if (!t->alter_dirty)
			continue;
		/* the renames found by sl_alter_resolve are the first t->renames entries */
		for (int h = 0; h < t->renames && h < t->nhist; h++)
		{
			const char *old = t->hist_names[h], *now = t->col_names[t->hist_cols[h]];

			if ((rc = execf(c, err,
							"UPDATE sync_columns SET name = %Q WHERE tbl = %lld AND is_pk = 0 AND "
							"idx = %d;"
							"UPDATE sync_column_history SET now = %Q WHERE tbl = %lld AND now = %Q;"
							"INSERT OR REPLACE INTO sync_column_history(tbl, name, now) "
							"VALUES (%lld, %Q, %Q);"
							"DELETE FROM sync_column_history WHERE tbl = %lld AND name = %Q",
							now, id, t->hist_cols[h], now, id, old, id, old, now, id, now)) !=
				PGS_OK)
				return rc;
		}
		if ((rc = execf(c, err, "DELETE FROM sync_column_pos WHERE tbl = %lld", id)) != PGS_OK)
			return rc;
		for (int i = 0; i < t->ncols; i++)
			if ((rc = execf(c, err,
							"INSERT INTO sync_column_pos(tbl, idx, cid) VALUES (%lld, %d, %d)", id,
							i, t->cids[i])) != PGS_OK)
				return rc;
		t->alter_dirty = false;
		t->renames = 0;
	}
	c->alter_dirty = false;
	return PGS_OK;
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
	if (sqlite3_strnicmp(s, w, (int) n) != 0 || (s[n] && s[n] != ' ' && s[n] != '\t' &&
												 s[n] != '\n' && s[n] != '"'))
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
	if ((rc = execf(c, err,
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
		sqlite3_result_error(ctx,
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
						: execf(c, &err, "ALTER TABLE \"%w\" %s", tname, cmd);
	}
	else if (rc == PGS_OK)
	{
		rc = execf(c, &err, "ALTER TABLE \"%w\" %s", tname, cmd);
		if (rc == PGS_OK && verb == 0)
		{
			const char *algo = t->algo == DB_ALGO_GSET ? "gset" : "cls";

			rc = sl_init_table(c, tname, algo, &err);
		}
		if (rc == PGS_OK && verb == 2)
		{
			/* found again by position, recorded now */
			if ((rc = sl_load(c, &err)) == PGS_OK)
				rc = sl_alter_persist(c, &err);
		}
	}
	if (rc == PGS_OK && (rc = sl_load(c, &err)) == PGS_OK)
		rc = sl_alter_persist(c, &err);
	if (rc == PGS_OK && verb == 0)
	{
		int64_t n;

		rc = sl_apply_held(c, NULL, &n, &err);
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
