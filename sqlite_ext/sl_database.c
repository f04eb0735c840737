/*
 * sl_database.c — the database.h seam implemented on SQLite.
 *
 * Storage per synced table T (created by sl_schema.c):
 *   "T__sync_clock"(pk columns..., cl, ver, clk, bulkver) WITHOUT ROWID, one
 *   row per key, with the change index and bulk markers of sl_log.c, which
 *   answer incremental pulls; a pull since 0 (or a database sync_init has
 *   not migrated yet) scans the clock table, ~60 bytes a row.
 * sync_payload returns at once when nothing is newer than since.
 */
#include "sl_internal.h"

#include <math.h>

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static sqlite3_stmt *row_stmt(db_conn *c, db_table *t, int kind, int n, const int *cols, bool *temp,
							  pgs_err *err);
static pgs_rc run_row(db_conn *c, db_table *t, sqlite3_stmt *st, bool temp, const pgs_value *pk,
					  int n, const pgs_value *vals, bool pk_first, int64_t *changed, pgs_err *err);

/* ---- database.h ---- */

pgs_rc
db_tables(db_conn *c, db_table ***tables, int *ntables, pgs_err *err)
{
	(void) err;
	*tables = c->tables;
	*ntables = c->ntables;
	return PGS_OK;
}

pgs_rc
db_table_find(db_conn *c, const uint8_t *name, size_t len, db_table **out, pgs_err *err)
{
	char buf[72];

	for (int i = 0; i < c->ntables; i++)
		if (strlen(c->tables[i]->name) == len &&
			sqlite3_strnicmp(c->tables[i]->name, (const char *) name, (int) len) == 0)
		{
			*out = c->tables[i];
			return PGS_OK;
		}
	pgs_failf(err, PGS_ERR_SCHEMA,
			  "Create the table and call sync_init on it before applying payloads that contain it.",
			  "unknown table \"%s\" in payload", pgs_name_for_msg(buf, name, len));
	pgs_err_detailf(err, "The table is not synced in this database.");
	return PGS_ERR_SCHEMA;
}

const db_table_info *
db_table_describe(db_table *t)
{
	return &t->info;
}

const uint8_t *
db_site_id(db_conn *c)
{
	return c->site;
}

pgs_rc
db_site_intern(db_conn *c, const uint8_t site[16], uint32_t *idx, pgs_err *err)
{
	for (uint32_t i = 0; i < c->nsites; i++)
		if (memcmp(c->sites[i], site, 16) == 0)
		{
			*idx = i;
			return PGS_OK;
		}
	if (c->nsites >= c->sites_cap)
	{
		uint32_t cap = c->sites_cap ? c->sites_cap * 2 : 16;
		void	*n = sqlite3_realloc64(c->sites, (sqlite3_uint64) cap * 16);

		if (!n)
			return pgs_fail(err, PGS_ERR_NOMEM, "out of memory adding a site", NULL, NULL);
		c->sites = n;
		c->sites_cap = cap;
	}
	if (sl_prepare(c, &c->st_site_add, "INSERT INTO sync_sites(idx, site) VALUES(?1, ?2)", err) !=
		PGS_OK)
		return err->rc;
	sqlite3_bind_int64(c->st_site_add, 1, c->nsites);
	sqlite3_bind_blob(c->st_site_add, 2, site, 16, SQLITE_STATIC);
	if (sqlite3_step(c->st_site_add) != SQLITE_DONE)
	{
		sqlite3_reset(c->st_site_add);
		return sl_dberr(c, err, "could not record a new site");
	}
	sqlite3_reset(c->st_site_add);
	/* the fingerprint (sl_meta.c) counts this site: what is loaded stays
	 * current (a rollback of the insert leaves nsites above the count) */
	if (c->loaded_fp[1] == (int64_t) c->nsites)
		c->loaded_fp[1]++;
	memcpy(c->sites[c->nsites], site, 16);
	*idx = c->nsites++;
	return PGS_OK;
}

pgs_rc
db_site_lookup(db_conn *c, uint32_t idx, const uint8_t **site, pgs_err *err)
{
	if (idx >= c->nsites)
		return pgs_failf(err, PGS_ERR_DB, NULL, "sync metadata is damaged: unknown site index %u",
						 idx);
	*site = c->sites[idx];
	return PGS_OK;
}

pgs_rc
db_apply_version(db_conn *c, int64_t *ver, pgs_err *err)
{
	/* once per apply: make sure a cached version was not rolled back */
	return sl_txn_version(c, true, ver, err);
}

pgs_rc
db_hlc_observe(db_conn *c, uint64_t hlc, pgs_err *err)
{
	sqlite3_stmt *st;
	int			  s;

	if (hlc > c->hlc)
		c->hlc = hlc;
	if (!(st = sl_stmt(c, "UPDATE sync_state SET hlc = max(hlc, ?1)")))
		return sl_dberr(c, err, "could not advance the clock");
	sqlite3_bind_int64(st, 1, (sqlite3_int64) hlc);
	s = sqlite3_step(st);
	sl_stmt_done(c, st);
	return s == SQLITE_DONE ? PGS_OK : sl_dberr(c, err, "could not advance the clock");
}

static void
bind_pk(sqlite3_stmt *st, const db_table *t, const pgs_value *pk, int first)
{
	for (int i = 0; i < t->npk; i++)
		sl_bind_value(st, first + i, &pk[i]);
}

static pgs_rc
prepare_fmt(db_conn *c, sqlite3_stmt **st, pgs_err *err, const char *fmt, ...)
{
	va_list ap;
	char   *sql;
	pgs_rc	rc;

	if (*st)
		return PGS_OK;
	va_start(ap, fmt);
	sql = sqlite3_vmprintf(fmt, ap);
	va_end(ap);
	if (!sql)
		return pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
	rc = sl_prepare(c, st, sql, err);
	sqlite3_free(sql);
	return rc;
}

/*
 * Batching of merged new rows.
 *
 * A base table with capture triggers makes every INSERT a multi-write
 * statement with its own statement journal, which costs more than the
 * insert itself. While sync_apply_payload runs (inside its own savepoint,
 * which already makes the whole merge atomic), rows that are new here with
 * every column known, and new clock rows, are queued per table and written
 * SL_BATCH_MAX rows per INSERT statement. The queue is flushed before any
 * other write or change enumeration and at the end of the apply; values
 * point into the payload, which outlives the apply. A failing batch is
 * retried row by row, so an error still names the row that caused it.
 */
#define SL_BATCH_MAX 64

static int
batch_size(db_table *t)
{
	int per = t->npk + (t->ncols > 3 - t->npk ? t->ncols : 3);
	int b = 30000 / (per + 3);

	return b < 1 ? 1 : b > SL_BATCH_MAX ? SL_BATCH_MAX : b;
}

static pgs_rc
batch_alloc(db_table *t, pgs_err *err)
{
	if (t->batch_rows)
		return PGS_OK;
	t->batch_rows = batch_size(t);
	t->batch_vals =
		sqlite3_malloc64(sizeof(pgs_value) * (size_t) t->batch_rows * (t->npk + t->ncols + 1));
	t->batch_clock = sqlite3_malloc64(sizeof(int64_t) * 2 * (size_t) t->batch_rows);
	t->batch_blob_len = sqlite3_malloc64(sizeof(size_t) * (size_t) t->batch_rows);
	t->batch_ckeys = sqlite3_malloc64(sizeof(pgs_value) * (size_t) t->batch_rows * t->npk);
	if (!t->batch_vals || !t->batch_clock || !t->batch_blob_len || !t->batch_ckeys)
	{
		t->batch_rows = 0;
		return pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
	}
	return PGS_OK;
}

/* multi_insert prepares INSERT INTO target(cols) VALUES (...) x nrows: into
 * *st, a table's slot when slot is true; a partial batch of up to
 * SMALL_BATCH rows through the connection's statement cache (sl_stmt: give
 * it back with sl_stmt_done, which finalizes anything else). */
#define SMALL_BATCH 4
static pgs_rc
multi_insert(db_conn *c, sqlite3_stmt **st, bool slot, const char *target, const char *cols,
			 int per, int nrows, pgs_err *err)
{
	char  *sql = sqlite3_mprintf("INSERT INTO %s(%s) VALUES ", target, cols);
	pgs_rc rc;

	for (int r = 0; r < nrows && sql; r++)
	{
		char *x = sqlite3_mprintf("%s%s(", sql, r ? ", " : "");

		sqlite3_free(sql);
		sql = x;
		for (int k = 0; k < per && sql; k++)
		{
			x = sqlite3_mprintf("%s%s?%d", sql, k ? ", " : "", r * per + k + 1);
			sqlite3_free(sql);
			sql = x;
		}
		if (sql)
		{
			x = sqlite3_mprintf("%s)", sql);
			sqlite3_free(sql);
			sql = x;
		}
	}
	if (!sql)
		return pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
	if (!slot && nrows <= SMALL_BATCH)
	{
		/* the tail of an apply (often its only rows): kept by its text */
		rc = (*st = sl_stmt(c, sql)) ? PGS_OK : sl_dberr(c, err, "could not prepare statement");
		sqlite3_free(sql);
		return rc;
	}
	rc = sl_prepare(c, st, sql, err);
	sqlite3_free(sql);
	return rc;
}

static char *
row_columns(const db_table *t)
{
	char *a = sl_pk_list(t, "");

	for (int i = 0; i < t->ncols && a; i++)
	{
		char *x = sqlite3_mprintf("%s, %s", a, t->col_q[i]);

		sqlite3_free(a);
		a = x;
	}
	return a;
}

static pgs_rc
flush_rows(db_conn *c, db_table *t, pgs_err *err)
{
	int			  per = t->npk + t->ncols;
	int			  n = t->nbatch;
	sqlite3_stmt *st = NULL;
	char		 *cols;
	pgs_rc		  rc = PGS_OK;

	if (n == 0)
		return PGS_OK;
	t->nbatch = 0;
	if (n == t->batch_rows && t->batch_rows_st)
		st = t->batch_rows_st;
	else
	{
		if (!(cols = row_columns(t)))
			return pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
		if (n == t->batch_rows)
			rc = multi_insert(c, &t->batch_rows_st, true, t->qname, cols, per, n, err),
			st = t->batch_rows_st;
		else
			rc = multi_insert(c, &st, false, t->qname, cols, per, n, err);
		sqlite3_free(cols);
		if (rc != PGS_OK)
			return rc;
	}
	for (int i = 0; i < n * per; i++)
		sl_bind_value(st, i + 1, &t->batch_vals[i]);
	if (sqlite3_step(st) != SQLITE_DONE)
	{
		/* retry row by row: a stray row is replaced, an error names its row */
		int *all = sqlite3_malloc64(sizeof(int) * (t->ncols + 1));

		sqlite3_reset(st);
		if (!all)
			rc = pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
		for (int i = 0; all && i < t->ncols; i++)
			all[i] = i;
		c->flushing = true;
		for (int r = 0; r < n && rc == PGS_OK; r++)
			rc = db_row_write(c, t, &t->batch_vals[r * per], DB_WRITE_INSERT, t->ncols, all,
							  &t->batch_vals[r * per + t->npk], err);
		c->flushing = false;
		sqlite3_free(all);
		if (rc == PGS_OK)
			goto done;
	}
done:
	sqlite3_reset(st);
	sqlite3_clear_bindings(st);
	if (st != t->batch_rows_st)
		sl_stmt_done(c, st);
	return rc;
}

static pgs_rc
flush_clocks(db_conn *c, db_table *t, pgs_err *err)
{
	int			  per = 3 + t->npk;
	int			  n = t->nclock;
	sqlite3_stmt *st = NULL;
	size_t		  off = 0;
	pgs_rc		  rc = PGS_OK;

	if (n == 0)
		return PGS_OK;
	t->nclock = 0;
	if (n == t->batch_rows && t->batch_clock_st)
		st = t->batch_clock_st;
	else
	{
		char *pk = sl_pk_list(t, "");
		char *cols = pk ? sqlite3_mprintf("cl, ver, clk, %s", pk) : NULL;

		sqlite3_free(pk);
		if (!cols)
			return pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
		if (n == t->batch_rows)
			rc = multi_insert(c, &t->batch_clock_st, true, t->qclock, cols, per, n, err),
			st = t->batch_clock_st;
		else
			rc = multi_insert(c, &st, false, t->qclock, cols, per, n, err);
		sqlite3_free(cols);
		if (rc != PGS_OK)
			return rc;
	}
	for (int r = 0; r < n; r++)
	{
		sqlite3_bind_int64(st, r * per + 1, t->batch_clock[2 * r]);
		sqlite3_bind_int64(st, r * per + 2, t->batch_clock[2 * r + 1]);
		sqlite3_bind_blob(st, r * per + 3, t->batch_blobs.p + off, (int) t->batch_blob_len[r],
						  SQLITE_STATIC);
		off += t->batch_blob_len[r];
		for (int k = 0; k < t->npk; k++)
			sl_bind_value(st, r * per + 4 + k, &t->batch_ckeys[r * t->npk + k]);
	}
	rc = sqlite3_step(st) == SQLITE_DONE ? PGS_OK
										 : sl_dberr(c, err, "could not write merged row clocks");
	sqlite3_reset(st);
	sqlite3_clear_bindings(st);
	if (st != t->batch_clock_st)
		sl_stmt_done(c, st);
	t->batch_blobs.len = 0;
	return rc;
}

pgs_rc
sl_flush(db_conn *c, pgs_err *err)
{
	pgs_rc rc = PGS_OK;

	for (int i = 0; i < c->ntables && rc == PGS_OK; i++)
	{
		rc = flush_rows(c, c->tables[i], err);
		if (rc == PGS_OK)
			rc = flush_clocks(c, c->tables[i], err);
	}
	c->pending = false;
	if (rc != PGS_OK)
		sl_discard(c);
	return rc;
}

/* db_apply_lock: SQLite has one writer at a time: nothing to lock. */
pgs_rc
db_apply_lock(db_conn *c, const db_lock_key *keys, uint32_t n, pgs_err *err)
{
	(void) c;
	(void) keys;
	(void) n;
	(void) err;
	return PGS_OK;
}

pgs_rc
db_apply_end(db_conn *c, pgs_err *err)
{
	return c->pending ? sl_flush(c, err) : PGS_OK;
}

#define FLUSH_FIRST(c, err)                                                                        \
	do                                                                                             \
	{                                                                                              \
		if ((c)->pending)                                                                          \
		{                                                                                          \
			pgs_rc frc_ = sl_flush(c, err);                                                        \
			if (frc_ != PGS_OK)                                                                    \
				return frc_;                                                                       \
		}                                                                                          \
	} while (0)

void
sl_discard(db_conn *c)
{
	for (int i = 0; i < c->ntables; i++)
	{
		c->tables[i]->nbatch = 0;
		c->tables[i]->nclock = 0;
		c->tables[i]->batch_blobs.len = 0;
	}
	c->pending = false;
}

/* batch_row queues a new row with every column; false if it cannot be queued. */
static bool
batch_row(db_table *t, const pgs_value *pk, int n, const int *cols, const pgs_value *vals)
{
	int		   per = t->npk + t->ncols;
	pgs_value *row;
	uint64_t   seen[4] = {0};

	if (n != t->ncols || t->ncols > 256 || !t->batch_rows)
		return false;
	row = &t->batch_vals[t->nbatch * per];
	for (int i = 0; i < n; i++)
	{
		if (seen[cols[i] / 64] & (UINT64_C(1) << (cols[i] % 64)))
			return false;
		seen[cols[i] / 64] |= UINT64_C(1) << (cols[i] % 64);
		row[t->npk + cols[i]] = vals[i];
	}
	for (int k = 0; k < t->npk; k++)
		row[k] = pk[k];
	t->nbatch++;
	return true;
}

/* batch_clock queues a new clock row. */
static bool
batch_clock(db_table *t, const pgs_value *pk, int64_t cl, int64_t ver, const uint8_t *blob,
			size_t len)
{
	int r = t->nclock;

	if (!t->batch_rows)
		return false;
	pgs_buf_put(&t->batch_blobs, blob, len);
	if (t->batch_blobs.oom)
		return false;
	t->batch_clock[2 * r] = cl;
	t->batch_clock[2 * r + 1] = ver;
	t->batch_blob_len[r] = len;
	for (int k = 0; k < t->npk; k++)
		t->batch_ckeys[r * t->npk + k] = pk[k];
	t->nclock++;
	return true;
}

pgs_rc
db_clock_get(db_conn *c, db_table *t, const pgs_value *pk, bool *found, int64_t *cl,
			 const uint8_t **blob, size_t *blob_len, pgs_err *err)
{
	pgs_rc rc;
	int	   s;

	if (!t->clock_get)
	{
		char *w = sl_pk_where(t, "", 1);

		rc = prepare_fmt(c, &t->clock_get, err, "SELECT cl, clk FROM %s WHERE %s", t->qclock, w);
		sqlite3_free(w);
		if (rc != PGS_OK)
			return rc;
	}
	bind_pk(t->clock_get, t, pk, 1);
	s = sqlite3_step(t->clock_get);
	*found = s == SQLITE_ROW;
	if (*found)
	{
		int n = sqlite3_column_bytes(t->clock_get, 1);

		*cl = sqlite3_column_int64(t->clock_get, 0);
		c->clockbuf.len = 0;
		pgs_buf_put(&c->clockbuf, sqlite3_column_blob(t->clock_get, 1), (size_t) n);
		if (c->clockbuf.oom)
		{
			sqlite3_reset(t->clock_get);
			return pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
		}
		*blob = c->clockbuf.p;
		*blob_len = (size_t) n;
	}
	sqlite3_reset(t->clock_get);
	if (s != SQLITE_ROW && s != SQLITE_DONE)
		return sl_dberr(c, err, "could not read a row clock");
	return PGS_OK;
}

/*
 * VER_CHECKED: the version written into a clock row, checked against
 * sync_state in the same statement. If a savepoint rollback undid this
 * transaction's version bump, the subquery yields NULL, the NOT NULL
 * constraint on ver fails, and the capture takes a fresh version and retries
 * (sl_capture.c). Cheaper than re-reading sync_state before every write, and
 * it keeps versions distinct and every commit visible at once.
 */
#define VER_CHECKED "(SELECT db_version FROM sync_state WHERE db_version = ?2)"

pgs_rc
db_clock_put(db_conn *c, db_table *t, const pgs_value *pk, bool exists, int64_t cl, int64_t ver,
			 const uint8_t *blob, size_t blob_len, pgs_err *err)
{
	sqlite3_stmt **stp = exists ? &t->clock_upd : &t->clock_ins;
	sqlite3_stmt  *st;
	pgs_rc		   rc;

	if (!exists && c->applying && !c->flushing && !c->careful && batch_alloc(t, err) == PGS_OK &&
		batch_clock(t, pk, cl, ver, blob, blob_len))
	{
		c->pending = true;
		return t->nclock == t->batch_rows ? flush_clocks(c, t, err) : PGS_OK;
	}
	FLUSH_FIRST(c, err);

	if (!*stp)
	{
		char *sql;

		if (exists)
		{
			char *w = sl_pk_where(t, "", 4);

			sql = sqlite3_mprintf("UPDATE %s SET cl = ?1, ver = " VER_CHECKED ", clk = ?3 WHERE %s",
								  t->qclock, w);
			sqlite3_free(w);
		}
		else
		{
			char *cols = sl_pk_list(t, "");
			char *vals = sqlite3_mprintf("");

			for (int i = 0; i < t->npk && vals; i++)
			{
				char *n = sqlite3_mprintf("%s, ?%d", vals, i + 4);

				sqlite3_free(vals);
				vals = n;
			}
			sql = sqlite3_mprintf("INSERT INTO %s(cl, ver, clk, %s) VALUES(?1, " VER_CHECKED
								  ", ?3%s)",
								  t->qclock, cols, vals);
			sqlite3_free(cols);
			sqlite3_free(vals);
		}
		if (!sql)
			return pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
		rc = sl_prepare(c, stp, sql, err);
		sqlite3_free(sql);
		if (rc != PGS_OK)
			return rc;
	}
	st = *stp;
	sqlite3_bind_int64(st, 1, cl);
	sqlite3_bind_int64(st, 2, ver);
	sqlite3_bind_blob(st, 3, blob, (int) blob_len, SQLITE_STATIC);
	bind_pk(st, t, pk, 4);
	if (sqlite3_step(st) != SQLITE_DONE)
	{
		sqlite3_reset(st);
		return sl_dberr(c, err, "could not write a row clock");
	}
	sqlite3_reset(st);
	return PGS_OK;
}

/*
 * row_stmt returns a cached statement writing the given column set:
 * kind 0 = UPDATE ... WHERE pk, 1 = INSERT (pk, cols).
 */
static sqlite3_stmt *
row_stmt(db_conn *c, db_table *t, int kind, int n, const int *cols, bool *temp, pgs_err *err)
{
	uint64_t	  key = (uint64_t) kind << 62;
	bool		  cacheable = t->ncols <= 62;
	char		 *sql = NULL, *a = NULL, *b = NULL;
	sqlite3_stmt *st = NULL;

	*temp = !cacheable;
	if (cacheable)
	{
		for (int i = 0; i < n; i++)
			key |= UINT64_C(1) << cols[i];
		for (int i = 0; i < SL_STMT_CACHE; i++)
			if (t->cache[i].stmt && t->cache[i].key == key)
				return t->cache[i].stmt;
	}
	if (kind == 0)
	{
		char *w = sl_pk_where(t, "", n + 1);

		a = sqlite3_mprintf("");
		for (int i = 0; i < n && a; i++)
		{
			char *x = sqlite3_mprintf("%s%s%s = ?%d", a, i ? ", " : "", t->col_q[cols[i]], i + 1);

			sqlite3_free(a);
			a = x;
		}
		sql = sqlite3_mprintf("UPDATE %s SET %s WHERE %s", t->qname, a, w);
		sqlite3_free(w);
	}
	else
	{
		a = sl_pk_list(t, "");
		b = sqlite3_mprintf("");
		for (int i = 0; i < t->npk + n && b; i++)
		{
			char *x = sqlite3_mprintf("%s%s?%d", b, i ? ", " : "", i + 1);

			sqlite3_free(b);
			b = x;
		}
		for (int i = 0; i < n && a; i++)
		{
			char *x = sqlite3_mprintf("%s, %s", a, t->col_q[cols[i]]);

			sqlite3_free(a);
			a = x;
		}
		sql = sqlite3_mprintf("INSERT INTO %s(%s) VALUES(%s)", t->qname, a, b);
	}
	sqlite3_free(a);
	sqlite3_free(b);
	if (!sql)
	{
		pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
		return NULL;
	}
	if (sl_prepare(c, &st, sql, err) != PGS_OK)
	{
		sqlite3_free(sql);
		return NULL;
	}
	sqlite3_free(sql);
	if (cacheable)
	{
		sl_stmt_slot *slot = &t->cache[t->cache_next];

		t->cache_next = (t->cache_next + 1) % SL_STMT_CACHE;
		sqlite3_finalize(slot->stmt);
		slot->stmt = st;
		slot->key = key;
	}
	return st;
}

static pgs_rc
run_row(db_conn *c, db_table *t, sqlite3_stmt *st, bool temp, const pgs_value *pk, int n,
		const pgs_value *vals, bool pk_first, int64_t *changed, pgs_err *err)
{
	int			  s;
	sqlite3_int64 before = sqlite3_total_changes64(c->db);

	for (int i = 0; i < n; i++)
		sl_bind_value(st, (pk_first ? t->npk : 0) + i + 1, &vals[i]);
	bind_pk(st, t, pk, pk_first ? 1 : n + 1);
	s = sqlite3_step(st);
	sqlite3_reset(st);
	sqlite3_clear_bindings(st);
	if (temp)
		sqlite3_finalize(st);
	if (s != SQLITE_DONE)
	{
		pgs_rc rc = sl_row_error(c, err, "could not write a merged row");

		pgs_err_detailf(err, "Table \"%s\".", t->name);
		return rc;
	}
	if (changed)
		*changed = sqlite3_total_changes64(c->db) - before;
	return PGS_OK;
}

/*
 * db_row_write: single-row UPDATE and INSERT statements only (no upsert, no
 * OR REPLACE), so SQLite needs no statement journal per row. A REPLACE of
 * every column is an UPDATE; a partial REPLACE deletes the old row first.
 */
static pgs_rc delete_row(db_conn *c, db_table *t, const pgs_value *pk, pgs_err *err);

static pgs_rc
row_write(db_conn *c, db_table *t, const pgs_value *pk, db_write_mode mode, int n, const int *cols,
		  const pgs_value *vals, bool *inserted, pgs_err *err)
{
	sqlite3_stmt *st;
	bool		  temp;
	int64_t		  changed = 0;
	pgs_rc		  rc;

	*inserted = mode == DB_WRITE_INSERT;
	if (mode == DB_WRITE_INSERT && c->applying && !c->flushing && !c->careful &&
		batch_alloc(t, err) == PGS_OK && batch_row(t, pk, n, cols, vals))
	{
		c->pending = true;
		return t->nbatch == t->batch_rows ? flush_rows(c, t, err) : PGS_OK;
	}
	if (!c->flushing)
		FLUSH_FIRST(c, err);
	if (mode == DB_WRITE_INSERT)
	{
		if (!(st = row_stmt(c, t, 1, n, cols, &temp, err)))
			return err->rc;
		rc = run_row(c, t, st, temp, pk, n, vals, true, NULL, err);
		if (rc == PGS_OK || sqlite3_extended_errcode(c->db) != SQLITE_CONSTRAINT_PRIMARYKEY)
			return rc;
		mode = DB_WRITE_REPLACE; /* a stray row without a clock: replace it */
	}
	if (mode == DB_WRITE_MERGE || (mode == DB_WRITE_REPLACE && n == t->ncols && n > 0))
	{
		if (!(st = row_stmt(c, t, 0, n, cols, &temp, err)))
			return err->rc;
		if ((rc = run_row(c, t, st, temp, pk, n, vals, false, &changed, err)) != PGS_OK)
			return rc;
		if (changed > 0)
			return PGS_OK;
		*inserted = mode == DB_WRITE_MERGE; /* the row was not there */
	}
	else if ((rc = delete_row(c, t, pk, err)) != PGS_OK)
		return rc;
	if (!(st = row_stmt(c, t, 1, n, cols, &temp, err)))
		return err->rc;
	return run_row(c, t, st, temp, pk, n, vals, true, NULL, err);
}

/*
 * db_row_forms: SQLite stores the values it receives as they are bound; the
 * declared type's affinity may still convert one (TEXT '1.50' in a NUMERIC
 * column becomes REAL 1.5), which is the app's choice of column type and is
 * never sent back as a change: a device is not an authority on forms, two
 * devices converting differently would re-stamp each other forever
 * (docs/TYPES.md, "One form on every replica").
 */
bool
db_row_forms(db_conn *c, int n, bool *differs)
{
	(void) c, (void) n, (void) differs;
	return false;
}

/* db_row_write: row_write, and the change event (sl_events.c) when it succeeded. */
/*
 * nan_refused: SQLite stores a NaN REAL as NULL, which would leave this
 * replica holding another value than its peers under the same stamp. The
 * row is refused here, as one its own constraints refuse: kept aside
 * (sync_network_held) and retried, never changed silently.
 */
static pgs_rc
nan_refused(db_conn *c, db_table *t, int col, pgs_err *err)
{
	pgs_failf(err, c->careful ? PGS_ERR_ROW : PGS_ERR_CAREFUL,
			  "Keep NaN out of columns that SQLite replicas sync (NULL, or a numeric or text "
			  "column on Postgres), or change the value on the server: the row is held until then.",
			  "column \"%s\" of table \"%s\": SQLite cannot store NaN as a REAL (it would become "
			  "NULL)",
			  t->col_names[col], t->name);
	pgs_err_code(err, "22000");
	return err->rc;
}

pgs_rc
db_row_write(db_conn *c, db_table *t, const pgs_value *pk, db_write_mode mode, int n,
			 const int *cols, const pgs_value *vals, pgs_err *err)
{
	bool   inserted = false;
	bool   retry = c->flushing; /* a batched row written again: already recorded */
	pgs_rc rc;

	for (int i = 0; i < n; i++)
		if (vals[i].type == PGS_REAL && isnan(vals[i].v.r))
			return nan_refused(c, t, cols[i], err);
	rc = row_write(c, t, pk, mode, n, cols, vals, &inserted, err);

	if (rc == PGS_OK && !retry)
		sl_event(c, t, pk, inserted ? "insert" : "update");
	return rc;
}

/* db_row_delete: delete_row, and the change event when a row went. */
pgs_rc
db_row_delete(db_conn *c, db_table *t, const pgs_value *pk, pgs_err *err)
{
	pgs_rc rc = delete_row(c, t, pk, err);

	if (rc == PGS_OK && sqlite3_changes(c->db) > 0)
		sl_event(c, t, pk, "delete");
	return rc;
}

static pgs_rc
delete_row(db_conn *c, db_table *t, const pgs_value *pk, pgs_err *err)
{
	if (!c->flushing)
		FLUSH_FIRST(c, err);
	if (!t->row_delete)
	{
		char  *w = sl_pk_where(t, "", 1);
		pgs_rc rc = prepare_fmt(c, &t->row_delete, err, "DELETE FROM %s WHERE %s", t->qname, w);

		sqlite3_free(w);
		if (rc != PGS_OK)
			return rc;
	}
	bind_pk(t->row_delete, t, pk, 1);
	if (sqlite3_step(t->row_delete) != SQLITE_DONE)
	{
		sqlite3_reset(t->row_delete);
		return sl_row_error(c, err, "could not delete a merged row");
	}
	sqlite3_reset(t->row_delete);
	return PGS_OK;
}

pgs_rc
db_version_safe(db_conn *c, int64_t *until, pgs_err *err)
{
	sqlite3_stmt *st = NULL;
	pgs_rc		  rc = PGS_OK;

	if (sl_stmt_prepare(c, "SELECT db_version FROM sync_state", &st) != SQLITE_OK)
		return sl_dberr(c, err, "could not read db_version");
	if (sqlite3_step(st) == SQLITE_ROW)
		*until = sqlite3_column_int64(st, 0);
	else
		rc = sl_dberr(c, err, "could not read db_version");
	sl_stmt_done(c, st);
	return rc;
}

struct db_cursor
{
	db_conn		 *c;
	db_table	 *t;
	sqlite3_stmt *st;
	pgs_value	 *vals; /* npk + ncols */
	bool		  snapshot;
};

/* db_changes_open: access is always FULL on SQLite; a snapshot (never asked
 * of SQLite, which builds no views) would be every row from version 0. */
pgs_rc
db_changes_open(db_conn *c, db_table *t, int64_t since, int64_t until, bool by_key,
				const pgs_value *after_pk, db_access access, bool snapshot, db_cursor **out,
				pgs_err *err)
{
	db_cursor *cur;
	char	  *sel;
	char	  *on;
	char	  *sql;
	char	  *keys = sqlite3_mprintf("");
	char	  *params = sqlite3_mprintf("");
	pgs_rc	   rc;
	bool	   use_log = false;
	int		   lo_kind = 0;

	FLUSH_FIRST(c, err);
	/* the change log (sl_log.c) answers incremental pulls */
	if (since > 0 && !snapshot &&
		(rc = sl_log_plan(c, t, since, &use_log, &lo_kind, err)) != PGS_OK)
	{
		sqlite3_free(keys);
		sqlite3_free(params);
		return rc;
	}
	cur = sqlite3_malloc(sizeof *cur);
	sel = sqlite3_mprintf("c.cl, c.clk, t.%s IS NOT NULL", t->pk_q[0]);
	on = sqlite3_mprintf("");
	for (int i = 0; i < t->npk && sel && on; i++)
	{
		char *x = sqlite3_mprintf("%s, c.%s", sel, t->pk_q[i]);
		char *y = sqlite3_mprintf("%s%st.%s = c.%s", on, i ? " AND " : "", t->pk_q[i], t->pk_q[i]);

		sqlite3_free(sel);
		sqlite3_free(on);
		sel = x;
		on = y;
	}
	for (int i = 0; i < t->ncols && sel; i++)
	{
		char *x = sqlite3_mprintf("%s, t.%s", sel, t->col_q[i]);

		sqlite3_free(sel);
		sel = x;
	}
	/* by_key: the clock table is WITHOUT ROWID clustered by its key, so
	 * (k..) > (?..) ORDER BY k.. is a range scan of it */
	for (int i = 0; i < t->npk && keys && params; i++)
	{
		char *x = sqlite3_mprintf("%s%sc.%s", keys, i ? ", " : "", t->pk_q[i]);
		char *y = sqlite3_mprintf("%s%s?%d", params, i ? ", " : "", i + 2);

		sqlite3_free(keys);
		sqlite3_free(params);
		keys = x;
		params = y;
	}
	if (use_log)
		sql = keys && sel && on
				  ? sl_log_select(t, sel, on, keys, by_key, by_key && after_pk, lo_kind)
				  : NULL;
	else if (!by_key)
		sql = sqlite3_mprintf("SELECT %s FROM %s AS c LEFT JOIN %s AS t ON %s WHERE c.ver > ?1",
							  sel, t->qclock, t->qname, on);
	else if (!after_pk)
		sql = sqlite3_mprintf(
			"SELECT %s FROM %s AS c LEFT JOIN %s AS t ON %s WHERE c.ver > ?1 ORDER BY %s", sel,
			t->qclock, t->qname, on, keys);
	else
		sql = sqlite3_mprintf("SELECT %s FROM %s AS c LEFT JOIN %s AS t ON %s WHERE (%s) > (%s) "
							  "AND c.ver > ?1 ORDER BY %s",
							  sel, t->qclock, t->qname, on, keys, params, keys);
	sqlite3_free(sel);
	sqlite3_free(on);
	sqlite3_free(keys);
	sqlite3_free(params);
	if (!cur || !sql)
	{
		sqlite3_free(cur);
		sqlite3_free(sql);
		return pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
	}
	memset(cur, 0, sizeof *cur);
	cur->c = c;
	cur->t = t;
	cur->vals = sqlite3_malloc64(sizeof(pgs_value) * (t->npk + t->ncols + 1));
	/* kept by its text: a pull of a table asks the same few questions */
	if (!cur->vals)
		rc = pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
	else
		rc = (cur->st = sl_stmt(c, sql)) ? PGS_OK : sl_dberr(c, err, "could not prepare statement");
	sqlite3_free(sql);
	if (rc != PGS_OK)
	{
		db_changes_close(cur);
		return rc;
	}
	(void) access;
	cur->snapshot = snapshot;
	sqlite3_bind_int64(cur->st, 1, snapshot ? -1 : since);
	if (by_key && after_pk)
		for (int i = 0; i < t->npk; i++)
			sl_bind_value(cur->st, i + 2, &after_pk[i]);
	if (use_log && lo_kind == 2)
		for (int i = 0; i < t->npk; i++)
			sl_bind_value(cur->st, t->npk + i + 2, &t->pull_lo[i]);
	(void) until; /* SQLite's until is the newest version anyway */
	*out = cur;
	return PGS_OK;
}

pgs_rc
db_changes_next(db_cursor *cur, bool *done, const pgs_value **pk, int64_t *cl, const uint8_t **blob,
				size_t *blob_len, bool *alive, const pgs_value **cols, db_vis *vis, pgs_err *err)
{
	db_table *t = cur->t;
	int		  s = sqlite3_step(cur->st);

	*vis = cur->snapshot ? DB_VIS_WHOLE : DB_VIS_CHANGES;
	if (s == SQLITE_DONE)
	{
		*done = true;
		return PGS_OK;
	}
	if (s != SQLITE_ROW)
		return sl_dberr(cur->c, err, "could not read changes");
	*done = false;
	*cl = sqlite3_column_int64(cur->st, 0);
	*blob = sqlite3_column_blob(cur->st, 1);
	*blob_len = (size_t) sqlite3_column_bytes(cur->st, 1);
	*alive = sqlite3_column_int(cur->st, 2) != 0;
	for (int i = 0; i < t->npk + t->ncols; i++)
		sl_column_value(cur->st, 3 + i, &cur->vals[i]);
	*pk = cur->vals;
	*cols = cur->vals + t->npk;
	return PGS_OK;
}

void
db_changes_close(db_cursor *cur)
{
	if (!cur)
		return;
	sl_stmt_done(cur->c, cur->st); /* either kind: a kept one goes back */
	sqlite3_free(cur->vals);
	sqlite3_free(cur);
}

/* db_keys_open: the keys of t's live rows, from its clock table. */
pgs_rc
db_keys_open(db_conn *c, db_table *t, db_cursor **out, pgs_err *err)
{
	db_cursor *cur;
	char	  *keys = sqlite3_mprintf("");
	char	  *sql;
	pgs_rc	   rc;

	FLUSH_FIRST(c, err);
	for (int i = 0; i < t->npk && keys; i++)
	{
		char *x = sqlite3_mprintf("%s, %s", keys, t->pk_q[i]);

		sqlite3_free(keys);
		keys = x;
	}
	sql = keys ? sqlite3_mprintf("SELECT cl%s FROM %s WHERE cl %% 2 = 1", keys, t->qclock) : NULL;
	sqlite3_free(keys);
	cur = sqlite3_malloc(sizeof *cur);
	if (!cur || !sql)
	{
		sqlite3_free(cur);
		sqlite3_free(sql);
		return pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
	}
	memset(cur, 0, sizeof *cur);
	cur->c = c;
	cur->t = t;
	cur->vals = sqlite3_malloc64(sizeof(pgs_value) * (t->npk + 1));
	rc = cur->vals ? (sqlite3_prepare_v2(c->db, sql, -1, &cur->st, NULL) == SQLITE_OK
						  ? PGS_OK
						  : sl_dberr(c, err, "could not read keys"))
				   : pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
	sqlite3_free(sql);
	if (rc != PGS_OK)
	{
		db_changes_close(cur);
		return rc;
	}
	*out = cur;
	return PGS_OK;
}

pgs_rc
db_keys_next(db_cursor *cur, bool *done, const pgs_value **pk, int64_t *cl, pgs_err *err)
{
	int s = sqlite3_step(cur->st);

	if (s == SQLITE_DONE)
	{
		*done = true;
		return PGS_OK;
	}
	if (s != SQLITE_ROW)
		return sl_dberr(cur->c, err, "could not read keys");
	*done = false;
	*cl = sqlite3_column_int64(cur->st, 0);
	for (int i = 0; i < cur->t->npk; i++)
		sl_column_value(cur->st, 1 + i, &cur->vals[i]);
	*pk = cur->vals;
	return PGS_OK;
}
