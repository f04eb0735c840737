/*
 * sl_meta.c — the sync metadata in memory: the synced tables (sync_tables,
 * sync_columns, their column history) and the sites (sync_sites), loaded by
 * sl_load and loaded again only when the schema cookie or the number of
 * sites says they changed (see fingerprint); sl_reload after this connection's
 * own metadata writes. Column renames are found here, at load, and recorded
 * by the next write (sl_alter_resolve, sl_alter_persist; docs/MIGRATIONS.md).
 */
#include "sl_internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void
free_table(db_table *t)
{
	if (!t)
		return;
	sqlite3_finalize(t->clock_get);
	sqlite3_finalize(t->clock_ins);
	sqlite3_finalize(t->clock_upd);
	sqlite3_finalize(t->row_delete);
	sqlite3_finalize(t->batch_rows_st);
	sqlite3_finalize(t->batch_clock_st);
	sqlite3_free(t->batch_vals);
	sqlite3_free(t->batch_clock);
	sqlite3_free(t->batch_blob_len);
	sqlite3_free(t->batch_ckeys);
	pgs_buf_free(&t->batch_blobs);
	sqlite3_free(t->parent_ids);
	for (int i = 0; i < SL_STMT_CACHE; i++)
		sqlite3_finalize(t->cache[i].stmt);
	for (int i = 0; i < t->npk; i++)
	{
		sqlite3_free(t->pk_names ? t->pk_names[i] : NULL);
		sqlite3_free(t->pk_q ? t->pk_q[i] : NULL);
	}
	for (int i = 0; i < t->ncols; i++)
	{
		sqlite3_free(t->col_names ? t->col_names[i] : NULL);
		sqlite3_free(t->col_q ? t->col_q[i] : NULL);
	}
	sqlite3_free(t->pk_names);
	sqlite3_free(t->pk_q);
	sqlite3_free(t->col_names);
	sqlite3_free(t->col_q);
	sqlite3_free(t->name);
	sqlite3_free(t->qname);
	sqlite3_free(t->qclock);
	for (int i = 0; i < t->nhist; i++)
		sqlite3_free(t->hist_names[i]);
	sqlite3_free(t->hist_names);
	sqlite3_free(t->hist_cols);
	sqlite3_free(t->cids);
	sl_log_free(t);
	sqlite3_free(t);
}

void
sl_unload_tables(db_conn *c)
{
	c->fire_t = NULL;
	for (int i = 0; i < c->ntables; i++)
		free_table(c->tables[i]);
	sqlite3_free(c->tables);
	c->tables = NULL;
	c->ntables = 0;
}

static pgs_rc
load_tables(db_conn *c, pgs_err *err)
{
	sqlite3_stmt *st = NULL, *cs = NULL;
	pgs_rc		  rc = PGS_OK;

	sl_unload_tables(c);
	if (sqlite3_prepare_v2(c->db, "SELECT id, name, algo FROM sync_tables ORDER BY id", -1, &st,
						   NULL) != SQLITE_OK ||
		sqlite3_prepare_v2(
			c->db, "SELECT name, is_pk FROM sync_columns WHERE tbl = ?1 ORDER BY is_pk DESC, idx",
			-1, &cs, NULL) != SQLITE_OK)
	{
		rc = sl_dberr(c, err, "could not read sync metadata");
		goto out;
	}
	while (sqlite3_step(st) == SQLITE_ROW)
	{
		db_table  *t = sqlite3_malloc(sizeof *t);
		db_table **n;
		int		   ncol = 0, npk = 0;

		if (!t)
			goto nomem;
		memset(t, 0, sizeof *t);
		n = sqlite3_realloc64(c->tables, sizeof(db_table *) * (c->ntables + 1));
		if (!n)
		{
			sqlite3_free(t);
			goto nomem;
		}
		c->tables = n;
		c->tables[c->ntables++] = t;
		t->id = sqlite3_column_int64(st, 0);
		t->name = sqlite3_mprintf("%s", sqlite3_column_text(st, 1));
		t->algo = strcmp((const char *) sqlite3_column_text(st, 2), "gset") == 0 ? DB_ALGO_GSET
																				 : DB_ALGO_CLS;
		t->qname = sl_quote(t->name);
		t->qclock = sqlite3_mprintf("\"%w__sync_clock\"", t->name);
		sqlite3_bind_int64(cs, 1, t->id);
		while (sqlite3_step(cs) == SQLITE_ROW)
			sqlite3_column_int(cs, 1) ? npk++ : ncol++;
		sqlite3_reset(cs);
		t->pk_names = sqlite3_malloc64(sizeof(char *) * (npk + 1));
		t->pk_q = sqlite3_malloc64(sizeof(char *) * (npk + 1));
		t->col_names = sqlite3_malloc64(sizeof(char *) * (ncol + 1));
		t->col_q = sqlite3_malloc64(sizeof(char *) * (ncol + 1));
		if (!t->name || !t->qname || !t->qclock || !t->pk_names || !t->pk_q || !t->col_names ||
			!t->col_q)
			goto nomem;
		while (sqlite3_step(cs) == SQLITE_ROW)
		{
			const char *nm = (const char *) sqlite3_column_text(cs, 0);

			if (sqlite3_column_int(cs, 1))
			{
				t->pk_names[t->npk] = sqlite3_mprintf("%s", nm);
				t->pk_q[t->npk++] = sl_quote(nm);
			}
			else
			{
				t->col_names[t->ncols] = sqlite3_mprintf("%s", nm);
				t->col_q[t->ncols++] = sl_quote(nm);
			}
		}
		sqlite3_reset(cs);
		t->info.name = t->name;
		t->info.algo = t->algo;
		t->info.npk = t->npk;
		t->info.ncols = t->ncols;
		t->info.pk_names = (const char *const *) t->pk_names;
		t->info.col_names = (const char *const *) t->col_names;
		if ((rc = sl_alter_resolve(c, t, err)) != PGS_OK) /* renamed columns, former names */
			goto out;
	}
	goto out;
nomem:
	rc = pgs_fail(err, PGS_ERR_NOMEM, "out of memory loading sync metadata", NULL, NULL);
out:
	sqlite3_finalize(st);
	sqlite3_finalize(cs);
	return rc;
}

static pgs_rc
load_sites(db_conn *c, pgs_err *err)
{
	sqlite3_stmt *st = NULL;

	c->nsites = 0;
	if (sqlite3_prepare_v2(c->db, "SELECT idx, site FROM sync_sites ORDER BY idx", -1, &st, NULL) !=
		SQLITE_OK)
		return sl_dberr(c, err, "could not read sync_sites");
	while (sqlite3_step(st) == SQLITE_ROW)
	{
		uint32_t idx = (uint32_t) sqlite3_column_int64(st, 0);

		if (idx >= c->sites_cap)
		{
			uint32_t cap = c->sites_cap ? c->sites_cap * 2 : 16;
			void	*n;

			while (cap <= idx)
				cap *= 2;
			n = sqlite3_realloc64(c->sites, (sqlite3_uint64) cap * 16);
			if (!n)
			{
				sqlite3_finalize(st);
				return pgs_fail(err, PGS_ERR_NOMEM, "out of memory loading sites", NULL, NULL);
			}
			c->sites = n;
			c->sites_cap = cap;
		}
		if (sqlite3_column_bytes(st, 1) == 16)
			memcpy(c->sites[idx], sqlite3_column_blob(st, 1), 16);
		if (idx + 1 > c->nsites)
			c->nsites = idx + 1;
	}
	sqlite3_finalize(st);
	if (c->nsites == 0)
		return pgs_fail(err, PGS_ERR_DB, "sync metadata is damaged: sync_sites has no own site",
						NULL,
						"Restore the database from a backup, or call sync_init on a fresh copy.");
	memcpy(c->site, c->sites[0], 16);
	return PGS_OK;
}

/*
 * The metadata's fingerprint: the schema cookie and the number of sites.
 * What sl_load reads changes only with DDL (sync_init, sync_alter,
 * sync_cleanup and the app's own ALTER TABLE all change the cookie; a
 * savepoint rollback of one restores another value) or with a site added
 * (by another connection, or by this one in a savepoint the app rolled
 * back: the count differs from what is loaded). Another connection's
 * ordinary commits change neither, so they cost no reload: a background
 * syncer (sl_background.c) does not re-read every table's layout after each
 * write of the app. Settings are not loaded: each call reads them. Equal
 * fingerprints: what is in memory is what the tables hold. false when it
 * cannot be read.
 */
static bool
fingerprint(db_conn *c, int64_t fp[2])
{
	/* a PRAGMA statement rather than pragma_schema_version: that table-valued
	 * function prepares its PRAGMA again on every run */
	static const char *const sql[2] = {"PRAGMA schema_version", "SELECT count(*) FROM sync_sites"};

	for (int i = 0; i < 2; i++)
	{
		sqlite3_stmt *st = sl_stmt(c, sql[i]);
		bool		  ok = st && sqlite3_step(st) == SQLITE_ROW;

		if (ok)
			fp[i] = sqlite3_column_int64(st, 0);
		sl_stmt_done(c, st);
		if (!ok)
			return false;
	}
	return true;
}

int
sl_load(db_conn *c, pgs_err *err)
{
	sqlite3_stmt *st = NULL;
	int			  exists = 0;
	pgs_rc		  rc;
	int64_t		  fp[2];

	/* every sync_* call loads: nothing to do when nothing changed (a full
	 * load re-reads every table's layout and re-prepares its statements) */
	if (c->ready && fingerprint(c, fp) && memcmp(fp, c->loaded_fp, sizeof fp) == 0 &&
		(int64_t) c->nsites == fp[1])
		return PGS_OK;

	if (sqlite3_prepare_v2(
			c->db, "SELECT count(*) FROM sqlite_schema WHERE type='table' AND name='sync_state'",
			-1, &st, NULL) != SQLITE_OK)
		return sl_dberr(c, err, "could not read the schema");
	if (sqlite3_step(st) == SQLITE_ROW)
		exists = sqlite3_column_int(st, 0);
	sqlite3_finalize(st);
	if (!exists)
	{
		c->ready = false;
		return pgs_fail(err, PGS_ERR_MISUSE, "sync is not initialized in this database",
						"No table has been enabled for sync yet.",
						"Call sync_init('table') first.");
	}
	if ((rc = load_sites(c, err)) != PGS_OK || (rc = load_tables(c, err)) != PGS_OK)
		return rc;
	/* a persisted clock past the format's range is repaired by the next write */
	if (sqlite3_prepare_v2(c->db, "SELECT hlc FROM sync_state", -1, &st, NULL) == SQLITE_OK)
	{
		if (sqlite3_step(st) == SQLITE_ROW)
		{
			int64_t h = sqlite3_column_int64(st, 0);

			c->clock_suspect = h < 0 || (uint64_t) h > PGS_HLC_MAX;
		}
		sqlite3_finalize(st);
	}
	sl_log_load(c);
	if (!fingerprint(c, c->loaded_fp))
		memset(c->loaded_fp, 0xff, sizeof c->loaded_fp); /* never equal: load every time */
	c->ready = true;
	return PGS_OK;
}

int
sl_reload(db_conn *c, pgs_err *err)
{
	c->ready = false;
	return sl_load(c, err);
}

db_table *
sl_table_by_id(db_conn *c, int64_t id, pgs_err *err)
{
	for (int pass = 0; pass < 2; pass++)
	{
		for (int i = 0; i < c->ntables; i++)
			if (c->tables[i]->id == id)
				return c->tables[i];
		if (pass == 0 && sl_reload(c, err) != PGS_OK) /* one this connection just registered */
			return NULL;
	}
	pgs_failf(err, PGS_ERR_MISUSE, "Call sync_init on the table again.",
			  "sync metadata for table id %lld is missing", (long long) id);
	return NULL;
}

db_table *
sl_table_by_name(db_conn *c, const char *name)
{
	for (int i = 0; i < c->ntables; i++)
		if (sqlite3_stricmp(c->tables[i]->name, name) == 0)
			return c->tables[i];
	return NULL;
}

/* ---- column history: renames found at load, recorded by the next write ---- */

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

			if ((rc = sl_execf(
					 c, err,
					 "UPDATE sync_columns SET name = %Q WHERE tbl = %lld AND is_pk = 0 AND "
					 "idx = %d;"
					 "UPDATE sync_column_history SET now = %Q WHERE tbl = %lld AND now = %Q;"
					 "INSERT OR REPLACE INTO sync_column_history(tbl, name, now) "
					 "VALUES (%lld, %Q, %Q);"
					 "DELETE FROM sync_column_history WHERE tbl = %lld AND name = %Q",
					 now, id, t->hist_cols[h], now, id, old, id, old, now, id, now)) != PGS_OK)
				return rc;
		}
		if ((rc = sl_execf(c, err, "DELETE FROM sync_column_pos WHERE tbl = %lld", id)) != PGS_OK)
			return rc;
		for (int i = 0; i < t->ncols; i++)
			if ((rc = sl_execf(c, err,
							   "INSERT INTO sync_column_pos(tbl, idx, cid) VALUES (%lld, %d, %d)",
							   id, i, t->cids[i])) != PGS_OK)
				return rc;
		t->alter_dirty = false;
		t->renames = 0;
	}
	c->alter_dirty = false;
	return PGS_OK;
}
