/*
 * sl_schema.c — sync_init and sync_cleanup on SQLite.
 *
 * sync_init(table [, algo]) checks the table (a real primary key, not the
 * rowid alias), records it in sync_tables/sync_columns, creates its clock
 * table and triggers, and backfills clocks for rows that existed before.
 * Running it again is harmless; after ALTER TABLE ADD COLUMN it appends the
 * new columns and refreshes the triggers. All identifiers are quoted with
 * %w, so names with quotes, spaces or non-ASCII letters work and cannot
 * inject SQL.
 */
#include "sl_internal.h"

#include <stdarg.h>
#include <string.h>

static const char *meta_sql =
	"CREATE TABLE IF NOT EXISTS sync_state("
	"  id INTEGER PRIMARY KEY CHECK (id = 1),"
	"  db_version INTEGER NOT NULL, hlc INTEGER NOT NULL, format INTEGER NOT NULL,"
	"  seq INTEGER NOT NULL DEFAULT 0);"
	"CREATE TABLE IF NOT EXISTS sync_sites(idx INTEGER PRIMARY KEY, site BLOB NOT NULL UNIQUE);"
	"CREATE TABLE IF NOT EXISTS sync_tables("
	"  id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE COLLATE NOCASE, algo TEXT NOT NULL);"
	"CREATE TABLE IF NOT EXISTS sync_columns("
	"  tbl INTEGER NOT NULL REFERENCES sync_tables(id) ON DELETE CASCADE,"
	"  is_pk INTEGER NOT NULL, idx INTEGER NOT NULL, name TEXT NOT NULL,"
	"  PRIMARY KEY (tbl, is_pk, idx)) WITHOUT ROWID;";

/* has_column: whether table tbl (unquoted) has column col. */
static bool
has_column(db_conn *c, const char *tbl, const char *col)
{
	sqlite3_stmt *st;
	bool		  yes = false;

	if (sqlite3_prepare_v2(c->db, "SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2", -1, &st,
						   NULL) != SQLITE_OK)
		return false;
	sqlite3_bind_text(st, 1, tbl, -1, SQLITE_STATIC);
	sqlite3_bind_text(st, 2, col, -1, SQLITE_STATIC);
	yes = sqlite3_step(st) == SQLITE_ROW;
	sqlite3_finalize(st);
	return yes;
}

pgs_rc
sl_ensure_meta(db_conn *c, pgs_err *err)
{
	sqlite3_stmt *st = NULL;
	pgs_rc		  rc;
	int			  have_site = 0;

	if ((rc = sl_exec(c, meta_sql, err)) != PGS_OK ||
		(rc = sl_exec(c, sl_fate_meta_sql, err)) != PGS_OK ||
		(rc = sl_exec(c, sl_alter_meta_sql, err)) != PGS_OK)
		return rc;
	if ((rc = sl_exec(
			 c, "INSERT OR IGNORE INTO sync_state(id, db_version, hlc, format) VALUES(1, 0, 0, 1)",
			 err)) != PGS_OK)
		return rc;
	/* seq came with the change log (sl_log.c): add it to older databases */
	if (!has_column(c, "sync_state", "seq") &&
		(rc = sl_exec(c, "ALTER TABLE sync_state ADD COLUMN seq INTEGER NOT NULL DEFAULT 0",
					  err)) != PGS_OK)
		return rc;
	if (sqlite3_prepare_v2(c->db, "SELECT count(*) FROM sync_sites WHERE idx = 0", -1, &st, NULL) !=
		SQLITE_OK)
		return sl_dberr(c, err, "could not read sync_sites");
	if (sqlite3_step(st) == SQLITE_ROW)
		have_site = sqlite3_column_int(st, 0);
	sqlite3_finalize(st);
	if (!have_site)
	{
		uint8_t site[16];

		if ((rc = pgs_uuid7(site, err)) != PGS_OK)
			return rc;
		if (sqlite3_prepare_v2(c->db, "INSERT INTO sync_sites(idx, site) VALUES(0, ?1)", -1, &st,
							   NULL) != SQLITE_OK)
			return sl_dberr(c, err, "could not create the site id");
		sqlite3_bind_blob(st, 1, site, 16, SQLITE_STATIC);
		if (sqlite3_step(st) != SQLITE_DONE)
		{
			sqlite3_finalize(st);
			return sl_dberr(c, err, "could not create the site id");
		}
		sqlite3_finalize(st);
	}
	return sl_reload(c, err);
}

typedef struct col_desc
{
	char *name;
	char *type;
	char *coll;
	int	  pk; /* position in the key, 1-based; 0 = not a key column */
} col_desc;

static void
free_cols(col_desc *cols, int n)
{
	for (int i = 0; i < n; i++)
	{
		sqlite3_free(cols[i].name);
		sqlite3_free(cols[i].type);
		sqlite3_free(cols[i].coll);
	}
	sqlite3_free(cols);
}

/* describe reads the table's columns; fails with a precise message. */
static pgs_rc
describe(db_conn *c, const char *table, char **canon, col_desc **out, int *ncols, pgs_err *err)
{
	sqlite3_stmt *st = NULL;
	col_desc	 *cols = NULL;
	int			  n = 0, npk = 0;
	char		 *pkindex = NULL;
	bool		  without_rowid = false;

	*out = NULL;
	*ncols = 0;
	*canon = NULL;
	if (sqlite3_prepare_v2(c->db,
						   "SELECT name, sql FROM main.sqlite_schema WHERE type = 'table' AND name "
						   "= ?1 COLLATE NOCASE",
						   -1, &st, NULL) != SQLITE_OK)
		return sl_dberr(c, err, "could not read the schema");
	sqlite3_bind_text(st, 1, table, -1, SQLITE_STATIC);
	if (sqlite3_step(st) == SQLITE_ROW)
		*canon = sqlite3_mprintf("%s", sqlite3_column_text(st, 0));
	sqlite3_finalize(st);
	if (!*canon)
		return pgs_failf(err, PGS_ERR_MISUSE,
						 "Create the table first; sync_init takes the name of an existing table in "
						 "the main database.",
						 "table \"%s\" does not exist", table);
	if (strncmp(*canon, "sync_", 5) == 0 || strstr(*canon, "__sync_clock") ||
		strstr(*canon, "__sync_bulk"))
		return pgs_failf(err, PGS_ERR_MISUSE, NULL,
						 "table \"%s\" belongs to sqlitesync and cannot be synced", *canon);

	/* WITHOUT ROWID tables and rowid tables with a non-INTEGER key have a pk index */
	if (sqlite3_prepare_v2(c->db, "SELECT name FROM pragma_index_list(?1) WHERE origin = 'pk'", -1,
						   &st, NULL) != SQLITE_OK)
		return sl_dberr(c, err, "could not read the schema");
	sqlite3_bind_text(st, 1, *canon, -1, SQLITE_STATIC);
	if (sqlite3_step(st) == SQLITE_ROW)
		pkindex = sqlite3_mprintf("%s", sqlite3_column_text(st, 0));
	sqlite3_finalize(st);
	if (sqlite3_prepare_v2(c->db, "SELECT wr FROM pragma_table_list(?1) WHERE schema = 'main'", -1,
						   &st, NULL) == SQLITE_OK)
	{
		sqlite3_bind_text(st, 1, *canon, -1, SQLITE_STATIC);
		if (sqlite3_step(st) == SQLITE_ROW)
			without_rowid = sqlite3_column_int(st, 0) != 0;
		sqlite3_finalize(st);
	}

	if (sqlite3_prepare_v2(c->db,
						   "SELECT name, type, pk, hidden FROM pragma_table_xinfo(?1) ORDER BY cid",
						   -1, &st, NULL) != SQLITE_OK)
	{
		sqlite3_free(pkindex);
		return sl_dberr(c, err, "could not read the table's columns");
	}
	sqlite3_bind_text(st, 1, *canon, -1, SQLITE_STATIC);
	while (sqlite3_step(st) == SQLITE_ROW)
	{
		col_desc *nc;

		if (sqlite3_column_int(st, 3) != 0)
			continue; /* generated or hidden column: computed, not synced */
		nc = sqlite3_realloc64(cols, sizeof(col_desc) * (n + 1));
		if (!nc)
			break;
		cols = nc;
		cols[n].name = sqlite3_mprintf("%s", sqlite3_column_text(st, 0));
		cols[n].type = sqlite3_mprintf("%s", sqlite3_column_text(st, 1));
		cols[n].coll = NULL;
		cols[n].pk = sqlite3_column_int(st, 2);
		if (cols[n].pk)
			npk++;
		n++;
	}
	sqlite3_finalize(st);
	*out = cols;
	*ncols = n;
	if (npk == 0)
	{
		sqlite3_free(pkindex);
		return pgs_failf(err, PGS_ERR_MISUSE,
						 "Add a primary key that is unique across devices, e.g. id TEXT PRIMARY "
						 "KEY DEFAULT (sync_uuid()).",
						 "table \"%s\" has no primary key; synced tables need one (replicas "
						 "name a row by its key, and rowids collide across devices)",
						 *canon);
	}
	if (!pkindex && !without_rowid)
		return pgs_failf(err, PGS_ERR_MISUSE,
						 "Use a key that is unique across devices, e.g. id TEXT PRIMARY KEY "
						 "DEFAULT (sync_uuid()), or a BLOB key.",
						 "table \"%s\" uses INTEGER PRIMARY KEY (the rowid alias); row ids collide "
						 "across devices",
						 *canon);
	for (int i = 0; i < n; i++)
		if (!cols[i].name || cols[i].name[0] == '\0' || strlen(cols[i].name) > PGS_MAX_NAME)
		{
			sqlite3_free(pkindex);
			return pgs_failf(
				err, PGS_ERR_MISUSE,
				"Rename the column: names travel in payloads and must be 1 to 65535 bytes long.",
				"table \"%s\" has a column whose name cannot be synced", *canon);
		}
	if ((*canon)[0] == '\0' || strlen(*canon) > PGS_MAX_NAME)
	{
		sqlite3_free(pkindex);
		return pgs_failf(
			err, PGS_ERR_MISUSE,
			"Rename the table: names travel in payloads and must be 1 to 65535 bytes long.",
			"table name \"%.40s\" cannot be synced", *canon);
	}
	{
		/* the UPDATE trigger passes 4 + 2 * keys + one mask per 62 columns */
		int nargs = 4 + 2 * npk + (n - npk + 61) / 62;
		int limit = sqlite3_limit(c->db, SQLITE_LIMIT_FUNCTION_ARG, -1);

		if (nargs > limit)
		{
			sqlite3_free(pkindex);
			return pgs_failf(err, PGS_ERR_MISUSE,
							 "Use a primary key with fewer columns (a single UUID key is best).",
							 "table \"%s\" has too many primary key columns to be synced (%d; its "
							 "triggers would need %d function arguments, SQLite allows %d)",
							 *canon, npk, nargs, limit);
		}
	}
	if (npk > 64)
	{
		sqlite3_free(pkindex);
		return pgs_failf(err, PGS_ERR_MISUSE, NULL,
						 "table \"%s\" has more than 64 primary key columns", *canon);
	}
	/* key collations, so the clock table compares keys exactly like the table */
	if (pkindex &&
		sqlite3_prepare_v2(c->db, "SELECT name, coll FROM pragma_index_xinfo(?1) WHERE key = 1", -1,
						   &st, NULL) == SQLITE_OK)
	{
		sqlite3_bind_text(st, 1, pkindex, -1, SQLITE_STATIC);
		while (sqlite3_step(st) == SQLITE_ROW)
			for (int i = 0; i < n; i++)
				if (cols[i].pk &&
					sqlite3_stricmp(cols[i].name, (const char *) sqlite3_column_text(st, 0)) == 0)
					cols[i].coll = sqlite3_mprintf("%s", sqlite3_column_text(st, 1));
		sqlite3_finalize(st);
	}
	sqlite3_free(pkindex);
	return PGS_OK;
}

static char *
append(char *s, const char *fmt, ...)
{
	va_list ap;
	char   *add, *r;

	if (!s)
		return NULL;
	va_start(ap, fmt);
	add = sqlite3_vmprintf(fmt, ap);
	va_end(ap);
	r = add ? sqlite3_mprintf("%s%s", s, add) : NULL;
	sqlite3_free(s);
	sqlite3_free(add);
	return r;
}

/*
 * DIFFERS: the trigger's test that a column's value changed. Identity, not
 * SQL equality: 1 -> 1.0 and 'abc' -> 'ABC' in a NOCASE column are changes
 * (IS NOT alone would call them equal and the replicas would diverge).
 * SQLite cannot tell 0.0 from -0.0 in SQL, nor keep -0.0 in a REAL column.
 */
#define DIFFERS                                                                                    \
	"(OLD.\"%w\" IS NOT NEW.\"%w\" COLLATE BINARY OR typeof(OLD.\"%w\") <> typeof(NEW.\"%w\"))"

/*
 * create_objects: the clock table, its change index and bulk markers
 * (sl_log.c), and the capture triggers (sl_capture.c). A clock table made
 * before the change index (no bulkver column) is rebuilt into the new layout
 * with its rows; its triggers are replaced like any others.
 *
 * Clock table key columns repeat the table's type and collation, except
 * BINARY, which is left implicit: SQLite compares keys declared COLLATE
 * BINARY through its generic record comparison instead of the fast path for
 * the default collation (measured: 12% of a tracked UPDATE).
 */
static pgs_rc
create_objects(db_conn *c, db_table *t, col_desc *cols, int ncols, pgs_err *err)
{
	char  *clock = sqlite3_mprintf("%s__sync_clock", t->name);
	char  *defs = sqlite3_mprintf(""), *lodefs = sqlite3_mprintf(""), *pkl = sqlite3_mprintf("");
	char  *newpk = sqlite3_mprintf(""), *oldpk = sqlite3_mprintf(""), *newl = sqlite3_mprintf("");
	char  *oldl = sqlite3_mprintf(""), *wnew = sqlite3_mprintf(""), *wold = sqlite3_mprintf("");
	char  *sql = NULL, *table = NULL;
	int	   limit = sqlite3_limit(c->db, SQLITE_LIMIT_FUNCTION_ARG, -1);
	bool   pairs = 4 + 2 * t->npk + 2 * t->ncols <= limit;
	pgs_rc rc;

	/* key columns in key order */
	for (int p = 1; p <= t->npk; p++)
		for (int i = 0; i < ncols; i++)
		{
			bool coll = cols[i].coll && sqlite3_stricmp(cols[i].coll, "BINARY") != 0;

			if (cols[i].pk != p)
				continue;
			defs = append(defs, "\"%w\" %s%s%s NOT NULL, ", cols[i].name, cols[i].type,
						  coll ? " COLLATE " : "", coll ? cols[i].coll : "");
			lodefs = append(lodefs, ", \"%w\" %s%s%s", cols[i].name, cols[i].type,
							coll ? " COLLATE " : "", coll ? cols[i].coll : "");
			pkl = append(pkl, "%s\"%w\"", p > 1 ? ", " : "", cols[i].name);
			newpk = append(newpk, ", NEW.\"%w\"", cols[i].name);
			oldpk = append(oldpk, ", OLD.\"%w\"", cols[i].name);
			newl = append(newl, "%sNEW.\"%w\"", p > 1 ? ", " : "", cols[i].name);
			oldl = append(oldl, "%sOLD.\"%w\"", p > 1 ? ", " : "", cols[i].name);
			wnew = append(wnew, "%s\"%w\" = NEW.\"%w\"", p > 1 ? " AND " : "", cols[i].name,
						  cols[i].name);
			wold = append(wold, "%s\"%w\" = OLD.\"%w\"", p > 1 ? " AND " : "", cols[i].name,
						  cols[i].name);
		}
	if (defs && pkl)
		table =
			sqlite3_mprintf("(%scl INTEGER NOT NULL, ver INTEGER NOT NULL, clk BLOB NOT NULL, "
							"bulkver INTEGER NOT NULL DEFAULT 0, PRIMARY KEY(%s)) WITHOUT ROWID",
							defs, pkl);
	if (table && clock)
		sql = sqlite3_mprintf("DROP TRIGGER IF EXISTS \"%w__sync_ins\"; DROP TRIGGER IF EXISTS "
							  "\"%w__sync_upd\"; DROP TRIGGER IF EXISTS \"%w__sync_del\";",
							  t->name, t->name, t->name);
	if (sql && has_column(c, clock, "cl") && !has_column(c, clock, "bulkver"))
		sql = append(sql,
					 "CREATE TABLE \"%w__sync_clock_v2\"%s; INSERT INTO \"%w__sync_clock_v2\"(%s, "
					 "cl, ver, clk) SELECT %s, cl, ver, clk FROM \"%w__sync_clock\"; DROP TABLE "
					 "\"%w__sync_clock\"; ALTER TABLE \"%w__sync_clock_v2\" RENAME TO "
					 "\"%w__sync_clock\";",
					 t->name, table, t->name, pkl, pkl, t->name, t->name, t->name, t->name);
	sql = append(sql,
				 "CREATE TABLE IF NOT EXISTS \"%w__sync_clock\"%s; CREATE INDEX IF NOT EXISTS "
				 "\"%w__sync_clock_ver\" ON \"%w__sync_clock\"(ver) WHERE ver <> bulkver; CREATE "
				 "TABLE IF NOT EXISTS \"%w__sync_bulk\"(ver INTEGER PRIMARY KEY%s);",
				 t->name, table, t->name, t->name, t->name, lodefs);
	sql = append(
		sql,
		"CREATE TRIGGER \"%w__sync_ins\" AFTER INSERT ON \"%w\" WHEN sqlitesync_capture("
		"%lld, 4, %d, (SELECT seq FROM sync_state)%s) BEGIN INSERT INTO \"%w__sync_clock\"(%s, cl, "
		"ver, clk, bulkver) VALUES(%s, 1, sqlitesync_ver(), sqlitesync_fresh(), "
		"sqlitesync_bulk(0)) ON CONFLICT DO UPDATE SET cl = cl | 1, ver = excluded.ver, "
		"clk = sqlitesync_relife(cl, clk), bulkver = sqlitesync_bulk(bulkver); END;",
		t->name, t->name, (long long) t->id, t->ncols, newpk, t->name, pkl, newl);
	sql = append(sql,
				 "CREATE TRIGGER \"%w__sync_del\" AFTER DELETE ON \"%w\" WHEN sqlitesync_capture("
				 "%lld, 6, %d, (SELECT seq FROM sync_state)%s) BEGIN UPDATE \"%w__sync_clock\" SET "
				 "cl = cl + "
				 "1, ver = sqlitesync_ver(), clk = sqlitesync_tomb(cl), bulkver = "
				 "sqlitesync_bulk(bulkver) WHERE %s AND cl %% 2 = 1; SELECT sqlitesync_done(%s); "
				 "END;",
				 t->name, t->name, (long long) t->id, t->ncols, oldpk, t->name, wold, oldl);
	sql = append(sql,
				 "CREATE TRIGGER \"%w__sync_upd\" AFTER UPDATE ON \"%w\" WHEN sqlitesync_capture("
				 "%lld, %d, %d, (SELECT seq FROM sync_state)%s%s",
				 t->name, t->name, (long long) t->id, pairs ? 5 : 7, t->ncols, oldpk, newpk);
	for (int i = 0; i < t->ncols; i++)
	{
		if (pairs)
			sql = append(sql, ", OLD.\"%w\", NEW.\"%w\"", t->col_names[i], t->col_names[i]);
		else
		{
			/* wide tables: changed-column masks, 62 columns per argument */
			if (i % 62 == 0)
				sql = append(sql, ", 0");
			sql = append(sql, " | ((" DIFFERS ") << %d)", t->col_names[i], t->col_names[i],
						 t->col_names[i], t->col_names[i], i % 62);
		}
	}
	sql = append(sql,
				 ") BEGIN UPDATE \"%w__sync_clock\" SET cl = cl | 1, ver = sqlitesync_ver(), clk = "
				 "sqlitesync_touch(cl, clk), bulkver = sqlitesync_bulk(bulkver) WHERE %s; SELECT "
				 "sqlitesync_done(%s); END;",
				 t->name, wnew, newl);
	sqlite3_free(clock);
	sqlite3_free(defs);
	sqlite3_free(lodefs);
	sqlite3_free(pkl);
	sqlite3_free(newpk);
	sqlite3_free(oldpk);
	sqlite3_free(newl);
	sqlite3_free(oldl);
	sqlite3_free(wnew);
	sqlite3_free(wold);
	sqlite3_free(table);
	if (!sql)
		return pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
	rc = sl_exec(c, sql, err);
	sqlite3_free(sql);
	t->layout = 0; /* looked at again on first use */
	return rc;
}

/* backfill gives every existing row without a clock row a clock (cl = 1). */
static pgs_rc
backfill(db_conn *c, db_table *t, pgs_err *err)
{
	char		 *sel = sqlite3_mprintf("SELECT ");
	sqlite3_stmt *st = NULL;
	pgs_rc		  rc = PGS_OK;
	int			  s;

	for (int i = 0; i < t->npk; i++)
		sel = append(sel, "%st.%s", i ? ", " : "", t->pk_q[i]);
	sel = append(sel, " FROM %s AS t WHERE NOT EXISTS (SELECT 1 FROM %s AS c WHERE ", t->qname,
				 t->qclock);
	for (int i = 0; i < t->npk; i++)
		sel = append(sel, "%sc.%s = t.%s", i ? " AND " : "", t->pk_q[i], t->pk_q[i]);
	sel = append(sel, ")");
	if (!sel)
		return pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
	s = sqlite3_prepare_v2(c->db, sel, -1, &st, NULL);
	sqlite3_free(sel);
	if (s != SQLITE_OK)
		return sl_dberr(c, err, "could not backfill existing rows");
	while ((s = sqlite3_step(st)) == SQLITE_ROW)
	{
		sqlite3_value *args[64];

		for (int i = 0; i < t->npk; i++)
			args[i] = sqlite3_column_value(st, i);
		if ((rc = sl_capture_insert(c, t, args, err)) != PGS_OK)
			break;
	}
	if (rc == PGS_OK && s != SQLITE_DONE)
		rc = sl_dberr(c, err, "could not backfill existing rows");
	sqlite3_finalize(st);
	return rc;
}

static pgs_rc
register_table(db_conn *c, const char *canon, const char *algo, col_desc *cols, int ncols,
			   db_table **out, pgs_err *err)
{
	sqlite3_stmt *st = NULL;
	int64_t		  id = 0;
	char		 *have_algo = NULL;
	pgs_rc		  rc = PGS_OK;
	int			  next_idx = 0;

	if (sqlite3_prepare_v2(c->db, "SELECT id, algo FROM sync_tables WHERE name = ?1", -1, &st,
						   NULL) != SQLITE_OK)
		return sl_dberr(c, err, "could not read sync_tables");
	sqlite3_bind_text(st, 1, canon, -1, SQLITE_STATIC);
	if (sqlite3_step(st) == SQLITE_ROW)
	{
		id = sqlite3_column_int64(st, 0);
		have_algo = sqlite3_mprintf("%s", sqlite3_column_text(st, 1));
	}
	sqlite3_finalize(st);
	if (id && strcmp(have_algo, algo) != 0)
	{
		rc = pgs_failf(err, PGS_ERR_MISUSE,
					   "Call sync_cleanup first to change a table's algorithm on every replica.",
					   "table \"%s\" is already synced with algo '%s'", canon, have_algo);
		sqlite3_free(have_algo);
		return rc;
	}
	sqlite3_free(have_algo);
	if (!id)
	{
		if (sqlite3_prepare_v2(c->db,
							   "INSERT INTO sync_tables(name, algo) VALUES(?1, ?2) RETURNING id",
							   -1, &st, NULL) != SQLITE_OK)
			return sl_dberr(c, err, "could not register the table");
		sqlite3_bind_text(st, 1, canon, -1, SQLITE_STATIC);
		sqlite3_bind_text(st, 2, algo, -1, SQLITE_STATIC);
		if (sqlite3_step(st) == SQLITE_ROW)
			id = sqlite3_column_int64(st, 0);
		sqlite3_step(st);
		sqlite3_finalize(st);
		if (!id)
			return sl_dberr(c, err, "could not register the table");
		/* key columns, in key order */
		for (int p = 1; p <= ncols && rc == PGS_OK; p++)
			for (int i = 0; i < ncols; i++)
				if (cols[i].pk == p)
				{
					char *sql = sqlite3_mprintf(
						"INSERT INTO sync_columns(tbl, is_pk, idx, name) VALUES(%lld, 1, %d, %Q)",
						(long long) id, p - 1, cols[i].name);

					rc = sql ? sl_exec(c, sql, err) : PGS_ERR_NOMEM;
					sqlite3_free(sql);
				}
	}
	else
	{
		/* the key must not have changed */
		int same = 0, nkey = 0;

		for (int i = 0; i < ncols; i++)
			if (cols[i].pk)
				nkey++;
		if (sqlite3_prepare_v2(c->db,
							   "SELECT count(*) FROM sync_columns WHERE tbl = ?1 AND is_pk = 1 AND "
							   "idx = ?2 AND name = ?3",
							   -1, &st, NULL) != SQLITE_OK)
			return sl_dberr(c, err, "could not read sync_columns");
		for (int i = 0; i < ncols; i++)
			if (cols[i].pk)
			{
				sqlite3_bind_int64(st, 1, id);
				sqlite3_bind_int(st, 2, cols[i].pk - 1);
				sqlite3_bind_text(st, 3, cols[i].name, -1, SQLITE_STATIC);
				if (sqlite3_step(st) == SQLITE_ROW)
					same += sqlite3_column_int(st, 0);
				sqlite3_reset(st);
			}
		sqlite3_finalize(st);
		sqlite3_prepare_v2(c->db, "SELECT count(*) FROM sync_columns WHERE tbl = ?1 AND is_pk = 1",
						   -1, &st, NULL);
		sqlite3_bind_int64(st, 1, id);
		if (sqlite3_step(st) == SQLITE_ROW && sqlite3_column_int(st, 0) != nkey)
			same = -1;
		sqlite3_finalize(st);
		if (same != nkey)
			return pgs_failf(err, PGS_ERR_MISUSE,
							 "A synced table's primary key cannot change; call sync_cleanup and "
							 "sync_init on every replica.",
							 "primary key of table \"%s\" changed since sync_init", canon);
	}
	/* non-key columns: keep existing indexes, append new ones */
	if (sqlite3_prepare_v2(
			c->db,
			"SELECT coalesce(max(idx) + 1, 0) FROM sync_columns WHERE tbl = ?1 AND is_pk = 0", -1,
			&st, NULL) != SQLITE_OK)
		return sl_dberr(c, err, "could not read sync_columns");
	sqlite3_bind_int64(st, 1, id);
	if (sqlite3_step(st) == SQLITE_ROW)
		next_idx = sqlite3_column_int(st, 0);
	sqlite3_finalize(st);
	for (int i = 0; i < ncols && rc == PGS_OK; i++)
	{
		char *sql;

		if (cols[i].pk)
			continue;
		sql = sqlite3_mprintf(
			"INSERT INTO sync_columns(tbl, idx, name, is_pk) SELECT %lld, %d, %Q, 0 WHERE NOT "
			"EXISTS "
			"(SELECT 1 FROM sync_columns WHERE tbl = %lld AND is_pk = 0 AND name = %Q)",
			(long long) id, next_idx, cols[i].name, (long long) id, cols[i].name);
		rc = sql ? sl_exec(c, sql, err) : PGS_ERR_NOMEM;
		sqlite3_free(sql);
		if (rc == PGS_OK && sqlite3_changes(c->db) > 0)
			next_idx++;
	}
	if (rc != PGS_OK)
		return rc;
	/* a synced column that disappeared would silently stop syncing: refuse */
	{
		int	  missing = 0;
		char *gone = NULL;

		if (sqlite3_prepare_v2(c->db, "SELECT name FROM sync_columns WHERE tbl = ?1 AND is_pk = 0",
							   -1, &st, NULL) != SQLITE_OK)
			return sl_dberr(c, err, "could not read sync_columns");
		sqlite3_bind_int64(st, 1, id);
		while (sqlite3_step(st) == SQLITE_ROW)
		{
			const char *nm = (const char *) sqlite3_column_text(st, 0);
			bool		found = false;

			for (int i = 0; i < ncols; i++)
				if (!cols[i].pk && strcmp(cols[i].name, nm) == 0)
					found = true;
			if (!found && !missing++)
				gone = sqlite3_mprintf("%s", nm);
		}
		sqlite3_finalize(st);
		if (missing)
		{
			rc = pgs_failf(
				err, PGS_ERR_MISUSE,
				"Dropping or renaming a synced column is not supported yet; restore the column.",
				"column \"%s\" of synced table \"%s\" no longer exists", gone, canon);
			sqlite3_free(gone);
			return rc;
		}
	}
	if ((rc = sl_reload(c, err)) != PGS_OK)
		return rc;
	if (!(*out = sl_table_by_id(c, id, err)))
		return err->rc;
	return PGS_OK;
}

/* record_renames: columns renamed with ALTER TABLE since the last write are
 * recorded (sl_alter.c) before sync_init compares the table with its metadata. */
static pgs_rc
record_renames(db_conn *c, pgs_err *err)
{
	pgs_rc rc;

	c->alter_lenient = true; /* other tables' troubles are not this call's */
	rc = sl_reload(c, err);
	c->alter_lenient = false;
	return rc == PGS_OK ? sl_alter_persist(c, err) : rc;
}

pgs_rc
sl_init_table(db_conn *c, const char *table, const char *algo, pgs_err *err)
{
	col_desc *cols = NULL;
	int		  ncols = 0;
	char	 *canon = NULL;
	db_table *t;
	pgs_rc	  rc;

	if (strcmp(algo, "cls") != 0 && strcmp(algo, "gset") != 0)
		return pgs_failf(err, PGS_ERR_MISUSE, "Use 'cls' (the default) or 'gset'.",
						 "unknown sync algorithm '%s'", algo);
	if ((rc = sl_exec(c, "SAVEPOINT sync_init", err)) != PGS_OK)
		return rc;
	if ((rc = sl_ensure_meta(c, err)) == PGS_OK && (rc = record_renames(c, err)) == PGS_OK &&
		(rc = describe(c, table, &canon, &cols, &ncols, err)) == PGS_OK &&
		(rc = register_table(c, canon, algo, cols, ncols, &t, err)) == PGS_OK &&
		(rc = create_objects(c, t, cols, ncols, err)) == PGS_OK)
		rc = backfill(c, t, err);
	free_cols(cols, ncols);
	sqlite3_free(canon);
	if (rc != PGS_OK)
	{
		pgs_err ignore;

		sl_exec(c, "ROLLBACK TO sync_init", &ignore);
		sl_exec(c, "RELEASE sync_init", &ignore);
		sl_unload_tables(c);
		c->ready = false;
		c->txn_ver = 0;
		return rc;
	}
	c->ready = false; /* the table's new metadata is read at the next call */
	return sl_exec(c, "RELEASE sync_init", err);
}

pgs_rc
sl_cleanup_table(db_conn *c, const char *table, pgs_err *err)
{
	db_table *t;
	char	 *sql;
	pgs_rc	  rc;

	/* a renamed or dropped table (or column) can still be cleaned up */
	c->alter_lenient = true;
	rc = sl_load(c, err);
	c->alter_lenient = false;
	if (rc != PGS_OK)
		return rc;
	if (!(t = sl_table_by_name(c, table)))
		return pgs_failf(err, PGS_ERR_MISUSE,
						 "sync_cleanup takes the name of a table passed to sync_init.",
						 "table \"%s\" is not synced", table);
	sql = sqlite3_mprintf(
		"SAVEPOINT sync_cleanup;"
		"DROP TRIGGER IF EXISTS \"%w__sync_ins\"; DROP TRIGGER IF EXISTS \"%w__sync_upd\";"
		"DROP TRIGGER IF EXISTS \"%w__sync_del\"; DROP TABLE IF EXISTS \"%w__sync_clock\";"
		"DROP TABLE IF EXISTS \"%w__sync_bulk\";"
		"DELETE FROM sync_columns WHERE tbl = %lld; DELETE FROM sync_tables WHERE id = %lld;"
		"RELEASE sync_cleanup;",
		t->name, t->name, t->name, t->name, t->name, (long long) t->id, (long long) t->id);
	if (!sql)
		return pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
	rc = sl_exec(c, sql, err);
	sqlite3_free(sql);
	if (rc != PGS_OK)
	{
		pgs_err ignore;

		sl_exec(c, "ROLLBACK TO sync_cleanup; RELEASE sync_cleanup", &ignore);
	}
	else
	{
		pgs_err ignore; /* tables of sl_alter.c: missing in databases of older builds */

		sql = sqlite3_mprintf("DELETE FROM sync_column_history WHERE tbl = %lld;"
							  "DELETE FROM sync_column_pos WHERE tbl = %lld",
							  (long long) t->id, (long long) t->id);
		if (sql)
			sl_exec(c, sql, &ignore);
		sqlite3_free(sql);
	}
	sl_reload(c, err);
	return rc;
}
