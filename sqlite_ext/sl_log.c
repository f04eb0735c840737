/*
 * sl_log.c — finding the rows changed since a version without scanning.
 *
 * A pull asks for every clock row with ver > since. The clock table is keyed
 * by the primary key, so without help that is a scan of the whole table
 * (32 ms for one changed row among 1M). Two structures answer it instead,
 * both written in the same transaction as the clock rows they describe:
 *
 *   "T__sync_clock_ver"  a partial index ON "T__sync_clock"(ver) WHERE
 *                        ver <> bulkver: (ver, key) of every row except
 *                        those a bulk transaction wrote (below);
 *   "T__sync_bulk"       (ver PRIMARY KEY, key columns): one marker per bulk
 *                        transaction, "rows of version ver with keys >= lo
 *                        (NULL: every key) may be unindexed".
 *
 * Why two: a tracked INSERT runs as a statement with a statement journal
 * (it fires a trigger, which may fail), and SQLite keeps that journal in
 * memory only up to 64 KiB: 15 pages of 4 KiB that existed when the
 * statement began. A tracked insert writes three B-trees (base table, its
 * key index, clock) and its biggest statements already reach 15 pages; a
 * fourth B-tree written per row (an index on ver, or a change log) pushes
 * one of them over, the journal becomes a temp file for the rest of the
 * transaction and every later page journaled is two write() calls (measured:
 * 787,000 writes and 2.1x the CPU time for 100k rows with a plain index on
 * ver). So a transaction indexes its first SL_LOG_ROWS rows of a table (the
 * whole of a typical transaction) and then switches that table to bulk mode:
 * it writes bulkver = ver, which keeps the row out of the partial index (no
 * fourth B-tree, no page), and covers the row by the transaction's marker.
 *
 * Invariant: every clock row with ver <> bulkver has an index entry (SQLite
 * keeps it, whoever writes the row: capture, sync_apply_payload with its
 * bulkver left alone, forgetting); every row with ver = bulkver = V has a
 * marker (V, lo) with lo <= its key. A pull since S therefore reads
 *   the index entries with ver > S, and
 *   the keys >= the smallest lo of the markers with ver > S whose row has
 *   ver = bulkver > S,
 * two disjoint sets, each row once. Capture writes a marker before the first
 * row it covers, and widens lo (or sets it to NULL after SL_LOG_WIDEN
 * widenings, or when keys cannot be ordered in C) before a row below it.
 *
 * Savepoints: markers and index entries roll back with the rows. What could
 * go stale is this connection's memory of them (sl_cap), so every marker
 * write, like every version bump, increments sync_state.seq, each trigger
 * firing passes the current seq in, and a seq that is not ours makes
 * capture check its version and forget what it knew (sl_log_version).
 *
 * Trimming: index entries need none (one per row, replaced when the row
 * changes). A marker is redundant once no row has ver = bulkver = its ver;
 * instead of tracking that, markers beyond SL_LOG_MARKS per table are
 * coalesced into one with the largest of their versions and the smallest of
 * their bounds, which only widens the scans of pulls from before them.
 */
#include "sl_internal.h"

#include <string.h>

/* ---- layout ---- */

static int
query_int(db_conn *c, const char *sql, const char *arg, int def)
{
	sqlite3_stmt *st;
	int			  v = def;

	if (sqlite3_prepare_v2(c->db, sql, -1, &st, NULL) != SQLITE_OK)
		return def;
	if (arg)
		sqlite3_bind_text(st, 1, arg, -1, SQLITE_TRANSIENT);
	if (sqlite3_step(st) == SQLITE_ROW)
		v = sqlite3_column_int(st, 0);
	sqlite3_finalize(st);
	return v;
}

/* sl_log_layout: which layout t's clock table has, and whether its key
 * order can be reproduced in C (BINARY or NOCASE keys in a UTF-8 database). */
pgs_rc
sl_log_layout(db_conn *c, db_table *t, pgs_err *err)
{
	char		 *clock = sqlite3_mprintf("%s__sync_clock", t->name);
	char		 *bulk = sqlite3_mprintf("%s__sync_bulk", t->name);
	sqlite3_stmt *st = NULL;
	int			  ok = 1;

	if (!clock || !bulk)
	{
		sqlite3_free(clock);
		sqlite3_free(bulk);
		return pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
	}
	/* layout 2: the bulkver column, the marker table and the index */
	t->layout = query_int(c, "SELECT count(*) FROM pragma_table_info(?1) WHERE name = 'bulkver'",
						  clock, 0) &&
						query_int(c,
								  "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND "
								  "name = ?1",
								  bulk, 0) &&
						query_int(c,
								  "SELECT count(*) FROM sqlite_schema WHERE type = 'index' AND "
								  "name = ?1 || '_ver'",
								  clock, 0)
					? 2
					: 1;
	sqlite3_free(bulk);
	sqlite3_free(t->key_nocase);
	t->key_nocase = sqlite3_malloc64((size_t) t->npk + 1);
	if (!t->key_nocase)
	{
		sqlite3_free(clock);
		return pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
	}
	memset(t->key_nocase, 0, (size_t) t->npk + 1);
	if (query_int(c, "SELECT encoding = 'UTF-8' FROM pragma_encoding", NULL, 0) != 1)
		ok = 0;
	/* a WITHOUT ROWID table's key is its pk index; collations in key order */
	if (ok && sqlite3_prepare_v2(c->db,
								 "SELECT x.coll FROM pragma_index_list(?1) AS l, "
								 "pragma_index_xinfo(l.name) AS x WHERE l.origin = 'pk' AND x.key "
								 "ORDER BY x.seqno",
								 -1, &st, NULL) == SQLITE_OK)
	{
		int i = 0;

		sqlite3_bind_text(st, 1, clock, -1, SQLITE_STATIC);
		while (sqlite3_step(st) == SQLITE_ROW)
		{
			const char *coll = (const char *) sqlite3_column_text(st, 0);

			if (i < t->npk && coll && sqlite3_stricmp(coll, "NOCASE") == 0)
				t->key_nocase[i] = 1;
			else if (i >= t->npk || !coll || sqlite3_stricmp(coll, "BINARY") != 0)
				ok = 0;
			i++;
		}
		sqlite3_finalize(st);
		if (i != t->npk)
			ok = 0;
	}
	else
		ok = 0;
	t->keycmp = ok;
	sqlite3_free(clock);
	return PGS_OK;
}

/* ---- keys in the clock table's order ---- */

static int
type_class(int type)
{
	switch (type)
	{
		case PGS_NULL:
			return 0;
		case PGS_INT:
		case PGS_REAL:
			return 1;
		case PGS_TEXT:
			return 2;
		default:
			return 3;
	}
}

/* int_real_cmp: SQLite's exact comparison of an integer with a double. */
static int
int_real_cmp(int64_t i, double r)
{
	int64_t y;
	double	s;

	if (r < -9223372036854775808.0)
		return 1;
	if (r >= 9223372036854775808.0)
		return -1;
	y = (int64_t) r;
	if (i < y)
		return -1;
	if (i > y)
		return 1;
	s = (double) i;
	return s < r ? -1 : s > r ? 1 : 0;
}

static int
bytes_cmp(const pgs_value *a, const pgs_value *b, bool nocase)
{
	uint32_t n = a->len < b->len ? a->len : b->len;
	int		 r = 0;

	if (nocase)
	{
		/* NOCASE folds ASCII letters only, like sqlite3StrNICmp */
		for (uint32_t i = 0; i < n && !r; i++)
		{
			int x = a->v.p[i], y = b->v.p[i];

			if (x >= 'A' && x <= 'Z')
				x += 'a' - 'A';
			if (y >= 'A' && y <= 'Z')
				y += 'a' - 'A';
			r = x - y;
		}
	}
	else if (n)
		r = memcmp(a->v.p, b->v.p, n);
	if (r)
		return r < 0 ? -1 : 1;
	return a->len < b->len ? -1 : a->len > b->len ? 1 : 0;
}

/* key_cmp compares two keys the way the clock table orders them (only
 * called when t->keycmp says the collations allow it). */
static int
key_cmp(const db_table *t, const pgs_value *a, const pgs_value *b)
{
	for (int i = 0; i < t->npk; i++)
	{
		int ca = type_class(a[i].type), cb = type_class(b[i].type), r = 0;

		if (ca != cb)
			return ca < cb ? -1 : 1;
		if (ca == 1)
		{
			if (a[i].type == PGS_INT && b[i].type == PGS_INT)
				r = a[i].v.i < b[i].v.i ? -1 : a[i].v.i > b[i].v.i;
			else if (a[i].type == PGS_REAL && b[i].type == PGS_REAL)
				r = a[i].v.r < b[i].v.r ? -1 : a[i].v.r > b[i].v.r;
			else if (a[i].type == PGS_INT)
				r = int_real_cmp(a[i].v.i, b[i].v.r);
			else
				r = -int_real_cmp(b[i].v.i, a[i].v.r);
		}
		else if (ca > 1)
			r = bytes_cmp(&a[i], &b[i], ca == 2 && t->key_nocase[i]);
		if (r)
			return r;
	}
	return 0;
}

/* copy_key copies n values into *dst (reallocated), bytes into buf. */
static pgs_rc
copy_key(pgs_buf *buf, pgs_value **dst, const pgs_value *src, int n, pgs_err *err)
{
	pgs_value *d = sqlite3_realloc64(*dst, sizeof(pgs_value) * (size_t) (n + 1));
	size_t	   off = 0;

	if (!d)
		return pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
	*dst = d;
	buf->len = 0;
	for (int i = 0; i < n; i++)
		if (src[i].type == PGS_TEXT || src[i].type == PGS_BLOB)
			pgs_buf_put(buf, src[i].v.p, src[i].len);
	if (buf->oom)
		return pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
	for (int i = 0; i < n; i++)
	{
		d[i] = src[i];
		if (src[i].type == PGS_TEXT || src[i].type == PGS_BLOB)
		{
			d[i].v.p = buf->p ? buf->p + off : (const uint8_t *) "";
			off += src[i].len;
		}
	}
	return PGS_OK;
}

/* sl_log_load: after (re)loading metadata, what sync_state looks like. */
void
sl_log_load(db_conn *c)
{
	int has = query_int(
		c, "SELECT count(*) FROM pragma_table_info('sync_state') WHERE name = 'seq'", NULL, 0);

	if (has != c->has_seq)
	{
		sqlite3_finalize(c->st_ver_bump);
		c->st_ver_bump = NULL;
		c->has_seq = has;
	}
}

void
sl_log_reset(db_conn *c)
{
	for (int i = 0; i < c->ntables; i++)
		c->tables[i]->cap.ver = 0;
}

void
sl_log_free(db_table *t)
{
	sqlite3_finalize(t->mark_put);
	sqlite3_finalize(t->mark_min);
	sqlite3_finalize(t->log_count);
	sqlite3_free(t->cap.lo);
	pgs_buf_free(&t->cap.lobuf);
	sqlite3_free(t->pull_lo);
	pgs_buf_free(&t->pull_lobuf);
	sqlite3_free(t->key_nocase);
}

/* ---- markers ---- */

static pgs_rc
bump_seq(db_conn *c, pgs_err *err)
{
	int s;

	if (sl_prepare(c, &c->st_seq_bump, "UPDATE sync_state SET seq = seq + 1 RETURNING seq", err) !=
		PGS_OK)
		return err->rc;
	s = sqlite3_step(c->st_seq_bump);
	if (s == SQLITE_ROW)
		c->seq = sqlite3_column_int64(c->st_seq_bump, 0);
	s = s == SQLITE_ROW ? sqlite3_step(c->st_seq_bump) : s;
	sqlite3_reset(c->st_seq_bump);
	return s == SQLITE_DONE ? PGS_OK : sl_dberr(c, err, "could not write sync_state");
}

/* coalesce: markers of t older than ver become one (see the file comment). */
static pgs_rc
coalesce(db_conn *c, db_table *t, int64_t ver, pgs_err *err)
{
	char  *keys = sl_pk_list(t, ""), *sets = sqlite3_mprintf(""), *sql;
	pgs_rc rc;

	for (int i = 0; i < t->npk && sets; i++)
	{
		char *x = sqlite3_mprintf("%s%s%s = (SELECT %s FROM \"%w__sync_bulk\" WHERE ver < %lld "
								  "ORDER BY %s LIMIT 1)",
								  sets, i ? ", " : "", t->pk_q[i], t->pk_q[i], t->name,
								  (long long) ver, keys);

		sqlite3_free(sets);
		sets = x;
	}
	sql = keys && sets
			  ? sqlite3_mprintf(
					"UPDATE \"%w__sync_bulk\" SET %s WHERE ver = (SELECT max(ver) FROM "
					"\"%w__sync_bulk\" WHERE ver < %lld); DELETE FROM \"%w__sync_bulk\" "
					"WHERE ver < (SELECT max(ver) FROM \"%w__sync_bulk\" WHERE ver < %lld)",
					t->name, sets, t->name, (long long) ver, t->name, t->name, (long long) ver)
			  : NULL;
	sqlite3_free(keys);
	sqlite3_free(sets);
	if (!sql)
		return pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
	rc = sl_exec(c, sql, err);
	sqlite3_free(sql);
	return rc;
}

/* put_marker makes the marker of ver cover keys >= pk (every key if pk is
 * NULL); an existing marker is only ever widened. */
static pgs_rc
put_marker(db_conn *c, db_table *t, int64_t ver, const pgs_value *pk, pgs_err *err)
{
	sqlite3_stmt *st;
	pgs_rc		  rc;
	bool		  fresh = t->cap.widen == 0;
	int			  s;

	if (!t->mark_put)
	{
		char *cols = sl_pk_list(t, ""), *vals = sqlite3_mprintf(""), *sets = sqlite3_mprintf("");
		char *ex = sl_pk_list(t, "excluded."), *sql = NULL;

		for (int i = 0; i < t->npk && vals && sets; i++)
		{
			char *x = sqlite3_mprintf("%s, ?%d", vals, i + 2);
			char *y = sqlite3_mprintf("%s%s%s = excluded.%s", sets, i ? ", " : "", t->pk_q[i],
									  t->pk_q[i]);

			sqlite3_free(vals);
			sqlite3_free(sets);
			vals = x;
			sets = y;
		}
		if (cols && vals && sets && ex)
			sql = sqlite3_mprintf(
				"INSERT INTO \"%w__sync_bulk\"(ver, %s) VALUES(?1%s) ON CONFLICT(ver) DO UPDATE "
				"SET %s WHERE excluded.%s IS NULL OR (%s IS NOT NULL AND (%s) < (%s))",
				t->name, cols, vals, sets, t->pk_q[0], t->pk_q[0], ex, cols);
		sqlite3_free(cols);
		sqlite3_free(vals);
		sqlite3_free(sets);
		sqlite3_free(ex);
		if (!sql)
			return pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
		rc = sl_prepare(c, &t->mark_put, sql, err);
		sqlite3_free(sql);
		if (rc != PGS_OK)
			return rc;
	}
	st = t->mark_put;
	sqlite3_bind_int64(st, 1, ver);
	for (int i = 0; i < t->npk; i++)
		if (pk)
			sl_bind_value(st, i + 2, &pk[i]);
		else
			sqlite3_bind_null(st, i + 2);
	s = sqlite3_step(st);
	sqlite3_reset(st);
	sqlite3_clear_bindings(st);
	if (s != SQLITE_DONE)
		return sl_dberr(c, err, "could not write a bulk marker");
	if (fresh)
	{
		char *sql =
			sqlite3_mprintf("SELECT count(*) > %d FROM \"%w__sync_bulk\"", SL_LOG_MARKS, t->name);
		int many = sql ? query_int(c, sql, NULL, 0) : 0;

		sqlite3_free(sql);
		if (many && (rc = coalesce(c, t, ver, err)) != PGS_OK)
			return rc;
	}
	return bump_seq(c, err);
}

/*
 * sl_log_row: capture is about to write the clock row of pk in t at the
 * transaction's version (sl_log_version ran): decide whether the row is
 * indexed (c->fire_bulk false) or goes under the marker, writing or widening
 * the marker first.
 */
pgs_rc
sl_log_row(db_conn *c, db_table *t, const pgs_value *pk, pgs_err *err)
{
	sl_cap *cap = &t->cap;
	bool	all;
	pgs_rc	rc;

	c->fire_ver = c->txn_ver;
	c->fire_bulk = false;
	if (t->layout != 2)
		return PGS_OK;
	if (cap->ver != c->txn_ver)
	{
		cap->ver = c->txn_ver;
		cap->rows = 0;
		cap->bulk = cap->marked = cap->all = false;
		cap->widen = 0;
	}
	if (!cap->bulk && ++cap->rows <= SL_LOG_ROWS)
		return PGS_OK;
	cap->bulk = true;
	c->fire_bulk = true;
	if (t->keycmp < 0 && (rc = sl_log_layout(c, t, err)) != PGS_OK)
		return rc;
	if (cap->marked && (cap->all || key_cmp(t, pk, cap->lo) >= 0))
		return PGS_OK;
	all = t->keycmp != 1 || cap->widen >= SL_LOG_WIDEN;
	if ((rc = put_marker(c, t, c->txn_ver, all ? NULL : pk, err)) != PGS_OK)
		return rc;
	cap->widen++;
	cap->marked = true;
	cap->all = all;
	return all ? PGS_OK : copy_key(&cap->lobuf, &cap->lo, pk, t->npk, err);
}

/* ---- pulls ---- */

/*
 * sl_log_plan: how to read t's changes since a version (> 0): *use false =
 * scan the clock table (legacy layout, or more than SL_LOG_SCAN indexed
 * changes, where the scan is the cheaper); otherwise *lo_kind says what the
 * bulk part reads: 0 nothing, 1 every key, 2 keys >= t->pull_lo.
 */
pgs_rc
sl_log_plan(db_conn *c, db_table *t, int64_t since, bool *use, int *lo_kind, pgs_err *err)
{
	pgs_rc rc;
	int	   s;

	*use = false;
	*lo_kind = 0;
	if (!t->layout && (rc = sl_log_layout(c, t, err)) != PGS_OK)
		return rc;
	if (t->layout != 2)
		return PGS_OK;
	if (!t->log_count)
	{
		char *sql = sqlite3_mprintf(
			"SELECT count(*) FROM (SELECT 1 FROM %s INDEXED BY \"%w__sync_clock_ver\" WHERE ver "
			"> ?1 AND ver <> bulkver LIMIT %d)",
			t->qclock, t->name, SL_LOG_SCAN + 1);

		rc = sql ? sl_prepare(c, &t->log_count, sql, err)
				 : pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
		sqlite3_free(sql);
		if (rc != PGS_OK)
			return rc;
	}
	sqlite3_bind_int64(t->log_count, 1, since);
	s = sqlite3_step(t->log_count);
	*use = s == SQLITE_ROW && sqlite3_column_int64(t->log_count, 0) <= SL_LOG_SCAN;
	sqlite3_reset(t->log_count);
	if (s != SQLITE_ROW)
		return sl_dberr(c, err, "could not read the change index");
	if (!*use)
		return PGS_OK;
	if (!t->mark_min)
	{
		char *keys = sl_pk_list(t, "");
		char *sql = keys ? sqlite3_mprintf("SELECT %s FROM \"%w__sync_bulk\" WHERE ver > ?1 ORDER "
										   "BY %s LIMIT 1",
										   keys, t->name, keys)
						 : NULL;

		sqlite3_free(keys);
		rc = sql ? sl_prepare(c, &t->mark_min, sql, err)
				 : pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
		sqlite3_free(sql);
		if (rc != PGS_OK)
			return rc;
	}
	sqlite3_bind_int64(t->mark_min, 1, since);
	s = sqlite3_step(t->mark_min);
	rc = PGS_OK;
	if (s == SQLITE_ROW && sqlite3_column_type(t->mark_min, 0) == SQLITE_NULL)
		*lo_kind = 1;
	else if (s == SQLITE_ROW)
	{
		pgs_value lo[64];

		*lo_kind = 2;
		for (int i = 0; i < t->npk && i < 64; i++)
			sl_column_value(t->mark_min, i, &lo[i]);
		rc = t->npk <= 64 ? copy_key(&t->pull_lobuf, &t->pull_lo, lo, t->npk, err) : PGS_OK;
		if (t->npk > 64)
			*lo_kind = 1;
	}
	else if (s != SQLITE_DONE)
		rc = sl_dberr(c, err, "could not read bulk markers");
	sqlite3_reset(t->mark_min);
	return rc;
}

/*
 * sl_log_select: the pull query of the change log. Parameters: ?1 since,
 * ?2.. the key to continue after (by_key with after), then the bulk part's
 * lower bound (lo_kind 2). sel, on and keys are db_changes_open's select
 * list (key columns from position 4), join condition and key list.
 */
char *
sl_log_select(const db_table *t, const char *sel, const char *on, const char *keys, bool by_key,
			  bool after, int lo_kind)
{
	char *params = sqlite3_mprintf(""), *los = sqlite3_mprintf(""), *ord = sqlite3_mprintf("");
	char *plain = sl_pk_list(t, ""), *aft = NULL, *low = NULL, *sql = NULL;

	for (int i = 0; i < t->npk && params && los && ord; i++)
	{
		char *x = sqlite3_mprintf("%s%s?%d", params, i ? ", " : "", i + 2);
		char *y = sqlite3_mprintf("%s%s?%d", los, i ? ", " : "", t->npk + i + 2);
		char *z = sqlite3_mprintf("%s%s%d", ord, i ? ", " : "", i + 4);

		sqlite3_free(params);
		sqlite3_free(los);
		sqlite3_free(ord);
		params = x;
		los = y;
		ord = z;
	}
	if (params && los && ord && plain)
	{
		aft = after ? sqlite3_mprintf(" AND (%s) > (%s)", keys, params) : sqlite3_mprintf("");
		low = lo_kind == 2 ? sqlite3_mprintf("(%s) >= (%s) AND ", keys, los) : sqlite3_mprintf("");
	}
	if (aft && low)
	{
		/* the indexed part: the IN list is built once, sorted by key, and
		 * drives lookups of c; the bulk part: a range scan of the clock table */
		sql = sqlite3_mprintf("SELECT %s FROM %s AS c LEFT JOIN %s AS t ON %s WHERE (%s) IN "
							  "(SELECT %s FROM %s INDEXED BY \"%w__sync_clock_ver\" WHERE ver > "
							  "?1 AND ver <> bulkver)%s",
							  sel, t->qclock, t->qname, on, keys, plain, t->qclock, t->name, aft);
		if (sql && lo_kind)
		{
			char *b = sqlite3_mprintf("%s UNION ALL SELECT %s FROM %s AS c LEFT JOIN %s AS t ON "
									  "%s WHERE %sc.ver = c.bulkver AND c.ver > ?1%s",
									  sql, sel, t->qclock, t->qname, on, low, aft);

			sqlite3_free(sql);
			sql = b;
		}
		if (sql && by_key)
		{
			char *b = sqlite3_mprintf("%s ORDER BY %s", sql, ord);

			sqlite3_free(sql);
			sql = b;
		}
	}
	sqlite3_free(params);
	sqlite3_free(los);
	sqlite3_free(ord);
	sqlite3_free(plain);
	sqlite3_free(aft);
	sqlite3_free(low);
	return sql;
}
