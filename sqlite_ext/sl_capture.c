/*
 * sl_capture.c — change capture: the C functions behind the triggers.
 *
 * sync_init creates three AFTER triggers per table. Their WHEN clauses call
 * sqlitesync_capture(table_id, op, ncols, ...) with ops 4, 5, 6 and their
 * bodies write the clock row in SQL (see "the capture triggers" below).
 * Databases whose tables sync_init has not migrated yet still have the
 * triggers of before, whose body is one call with ops 1, 2, 3, and the
 * function writes the clock row itself:
 * (after the op comes the table's synced column count as the triggers know it;
 * another connection's sync_init after ALTER TABLE ADD COLUMN changes it and
 * makes this connection reload its metadata)
 *   op 1 INSERT: pk...                       (NEW values)
 *   op 2 UPDATE: pk_changed, old pk..., new pk..., mask...
 *                 mask k has bit i set when column 62*k+i changed
 *                 (OLD.c IS NOT NEW.c, computed by the trigger itself)
 *   op 3 DELETE: pk...                       (OLD values)
 * Either way one clock row is written per captured row, and in bulk
 * transactions nothing else (sl_log.c says why that matters). A connection
 * that did not load the extension cannot run these triggers ("no such
 * function: sqlitesync_capture"), so its write fails instead of being lost.
 * Writes made by sync_apply_payload are skipped here (c->applying).
 */
#include "sl_internal.h"

#include <string.h>

static void sl_fire_ins(sqlite3_context *ctx, int argc, sqlite3_value **argv);
static void sl_fire_upd(sqlite3_context *ctx, int argc, sqlite3_value **argv);
static void sl_fire_del(sqlite3_context *ctx, int argc, sqlite3_value **argv);

static void
to_value(sqlite3_value *in, pgs_value *v)
{
	v->len = 0;
	switch (sqlite3_value_type(in))
	{
		case SQLITE_INTEGER:
			v->type = PGS_INT;
			v->v.i = sqlite3_value_int64(in);
			break;
		case SQLITE_FLOAT:
			v->type = PGS_REAL;
			v->v.r = sqlite3_value_double(in);
			break;
		case SQLITE_TEXT:
			v->type = PGS_TEXT;
			v->v.p = sqlite3_value_text(in);
			v->len = (uint32_t) sqlite3_value_bytes(in);
			break;
		case SQLITE_BLOB:
			v->type = PGS_BLOB;
			v->v.p = sqlite3_value_blob(in);
			v->len = (uint32_t) sqlite3_value_bytes(in);
			if (!v->v.p)
				v->v.p = (const uint8_t *) "";
			break;
		default:
			v->type = PGS_NULL;
	}
}

static pgs_rc
pk_values(db_table *t, sqlite3_value **argv, pgs_value *pk, pgs_err *err)
{
	for (int i = 0; i < t->npk; i++)
	{
		to_value(argv[i], &pk[i]);
		if (pk[i].type == PGS_NULL)
			return pgs_failf(
				err, PGS_ERR_VALUE,
				"Give every row of a synced table a primary key value (sync_uuid() makes one).",
				"primary key column \"%s\" of synced table \"%s\" is NULL", t->pk_names[i],
				t->name);
	}
	return PGS_OK;
}

/*
 * put_clock writes a row clock stamped with the transaction's version. When
 * the write finds that version rolled back by a savepoint (NOT NULL on ver,
 * see VER_CHECKED), it takes a fresh version, restamps and writes again.
 */
static pgs_rc
put_clock(db_conn *c, db_table *t, const pgs_value *pk, bool exists, pgs_rowclock *rc, pgs_err *err)
{
	for (int attempt = 0;; attempt++)
	{
		int64_t old = pgs_rowclock_max_ver(rc), ver;
		pgs_rc	r;

		c->scratch.len = 0;
		pgs_rowclock_encode(rc, &c->scratch);
		if (c->scratch.oom)
			return pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
		r = db_clock_put(c, t, pk, exists, rc->cl, old, c->scratch.p, c->scratch.len, err);
		if (r == PGS_OK || attempt > 0 ||
			sqlite3_extended_errcode(c->db) != SQLITE_CONSTRAINT_NOTNULL)
			return r;
		c->txn_ver = 0;
		if ((r = sl_txn_version(c, false, &ver, err)) != PGS_OK)
			return r;
		if (rc->cl_ver == old)
			rc->cl_ver = ver;
		for (int i = 0; i < rc->ncols; i++)
			if (rc->cols[i].hlc && rc->cols[i].ver == old)
				rc->cols[i].ver = ver;
	}
}

/* changed_of: the changed-column masks (62 columns a value) as one flag per
 * column; exactly one of masks (SQL values) and words (C) is given. */
static const bool *
changed_of(db_conn *c, db_table *t, sqlite3_value *const *masks, const uint64_t *words)
{
	bool *ch;

	if (t->ncols + 1 > c->fire_changed_cap)
	{
		bool *n = sqlite3_realloc64(c->fire_changed, sizeof(bool) * (size_t) (t->ncols + 1));

		if (!n)
			return NULL;
		c->fire_changed = n;
		c->fire_changed_cap = t->ncols + 1;
	}
	ch = c->fire_changed;
	for (int i = 0; i < t->ncols; i++)
	{
		/* cppcheck-suppress nullPointer ; words is given when masks is not */
		uint64_t w = masks ? (uint64_t) sqlite3_value_int64(masks[i / 62]) : words[i / 62];

		ch[i] = (w >> (i % 62)) & 1;
	}
	return ch;
}

static pgs_rc
gset_refused(db_table *t, pgs_err *err)
{
	return pgs_failf(err, PGS_ERR_VALUE, "Tables synced with algo 'gset' only accept new rows.",
					 "cannot replace a row of grow-only table \"%s\"", t->name);
}

/*
 * local_edit: read the row's clock, change it by the core's rule for op
 * (core/local.c, pgs_local_edit) and write it. masks: an UPDATE's
 * changed-column masks (NULL: every column).
 */
static pgs_rc
local_edit(db_conn *c, db_table *t, const pgs_value *pk, pgs_local_op op, sqlite3_value **masks,
		   int64_t ver, pgs_err *err)
{
	pgs_stamp		*s = sl_stamps(c, t->ncols);
	pgs_rowclock	 rc = {.ncols = t->ncols, .cols = s};
	const bool		*changed = NULL;
	const uint8_t	*blob;
	size_t			 len;
	bool			 found;
	int64_t			 cl;
	pgs_local_result res;
	pgs_rc			 r;

	if (!s || (masks && !(changed = changed_of(c, t, masks, NULL))))
		return pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
	if ((r = db_clock_get(c, t, pk, &found, &cl, &blob, &len, err)) != PGS_OK)
		return r;
	memset(s, 0, sizeof(pgs_stamp) * (size_t) t->ncols);
	rc.cl = found ? cl : 0;
	if (found && (r = pgs_rowclock_decode(blob, len, &rc, err)) != PGS_OK)
		return r;
	res = pgs_local_edit(&rc, found, op, t->algo, changed, ver,
						 op == PGS_LOCAL_DELETE ? 0 : sl_tick(c));
	if (res == PGS_LOCAL_GSET)
		return gset_refused(t, err);
	if (res == PGS_LOCAL_NONE)
		return PGS_OK;
	if (!found)
		pgs_local_above_floor(&rc, sl_gc_floor_known(c, t)); /* after a GC (sl_gc.c) */
	return put_clock(c, t, pk, found, &rc, err);
}

pgs_rc
sl_capture_insert(db_conn *c, db_table *t, sqlite3_value **pkargs, pgs_err *err)
{
	pgs_value  pk[64];
	pgs_value *pkv = t->npk <= 64 ? pk : sqlite3_malloc64(sizeof(pgs_value) * t->npk);
	int64_t	   ver;
	pgs_rc	   r;

	if (!pkv)
		return pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
	if ((r = pk_values(t, pkargs, pkv, err)) != PGS_OK ||
		(r = sl_txn_version(c, false, &ver, err)) != PGS_OK)
		goto out;
	/* fast path: a key never seen before takes one INSERT and no lookup */
	{
		pgs_stamp	*s = sl_stamps(c, t->ncols);
		pgs_rowclock rc = {.ncols = t->ncols, .cols = s};

		if (!s)
		{
			r = pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
			goto out;
		}
		(void) pgs_local_edit(&rc, false, PGS_LOCAL_INSERT, t->algo, NULL, ver, sl_tick(c));
		pgs_local_above_floor(&rc, sl_gc_floor_known(c, t)); /* after a GC (sl_gc.c) */
		r = put_clock(c, t, pkv, false, &rc, err);
	}
	if (r == PGS_OK || sqlite3_extended_errcode(c->db) != SQLITE_CONSTRAINT_PRIMARYKEY)
		goto out;
	/* the key has a clock: a resurrection, or an INSERT OR REPLACE */
	r = local_edit(c, t, pkv, PGS_LOCAL_INSERT, NULL, ver, err);
out:
	if (pkv != pk)
		sqlite3_free(pkv);
	return r;
}

static pgs_rc
capture_delete(db_conn *c, db_table *t, const pgs_value *pk, pgs_err *err)
{
	int64_t ver;
	pgs_rc	r;

	if ((r = sl_txn_version(c, false, &ver, err)) != PGS_OK)
		return r;
	return local_edit(c, t, pk, PGS_LOCAL_DELETE, NULL, ver, err);
}

static pgs_rc
capture_update(db_conn *c, db_table *t, int argc, sqlite3_value **argv, pgs_err *err)
{
	int		  nmask = (t->ncols + 61) / 62;
	pgs_value pk[64];
	int64_t	  ver;
	pgs_rc	  r;

	if (argc != 1 + 2 * t->npk + nmask || t->npk > 64)
		return pgs_failf(err, PGS_ERR_MISUSE,
						 "Call sync_init on the table again to refresh its triggers.",
						 "sync triggers of table \"%s\" are out of date", t->name);
	if (sqlite3_value_int(argv[0]))
	{
		/* primary key change: delete of the old key + insert of the new one */
		if ((r = pk_values(t, argv + 1, pk, err)) != PGS_OK ||
			(r = capture_delete(c, t, pk, err)) != PGS_OK)
			return r;
		return sl_capture_insert(c, t, argv + 1 + t->npk, err);
	}
	if ((r = pk_values(t, argv + 1 + t->npk, pk, err)) != PGS_OK ||
		(r = sl_txn_version(c, false, &ver, err)) != PGS_OK)
		return r;
	return local_edit(c, t, pk, PGS_LOCAL_UPDATE, argv + 1 + 2 * t->npk, ver, err);
}

void
sl_capture(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	db_conn	 *c = sqlite3_user_data(ctx);
	pgs_err	  err;
	db_table *t;
	int		  op;
	pgs_rc	  r = PGS_OK;

	if (argc >= 4)
	{
		/* the triggers sync_init writes since the change log (ops 4 to 7) */
		op = sqlite3_value_int(argv[1]);
		if (op == 4)
			sl_fire_ins(ctx, argc, argv);
		else if (op == 5 || op == 7)
			sl_fire_upd(ctx, argc, argv);
		else if (op == 6)
			sl_fire_del(ctx, argc, argv);
		if (op >= 4 && op <= 7)
			return;
	}
	if (c->applying)
		return;
	if (argc < 4)
	{
		sqlite3_result_error(
			ctx,
			"sqlitesync_capture: bad arguments (sync triggers are damaged; call sync_init again)",
			-1);
		return;
	}
	if (!(t = sl_table_by_id(c, sqlite3_value_int64(argv[0]), &err)))
	{
		sqlite3_result_error(ctx, err.msg, -1);
		return;
	}
	if (t->ncols != sqlite3_value_int(argv[2]))
	{
		/* another connection changed the table's synced columns: reload */
		if (sl_load(c, &err) != PGS_OK ||
			!(t = sl_table_by_id(c, sqlite3_value_int64(argv[0]), &err)))
		{
			sqlite3_result_error(ctx, err.msg, -1);
			return;
		}
	}
	op = sqlite3_value_int(argv[1]);
	argc--;
	argv++; /* drop the column count: argv[2] is now the first key */
	if (t->algo == DB_ALGO_GSET && (op == 2 || op == 3))
	{
		char *m = sqlite3_mprintf(
			"cannot %s grow-only table \"%s\": tables synced with algo 'gset' only accept inserts",
			op == 2 ? "UPDATE" : "DELETE FROM", t->name);

		sqlite3_result_error(ctx, m, -1);
		sqlite3_result_error_code(ctx, SQLITE_CONSTRAINT);
		sqlite3_free(m);
		return;
	}
	if (op == 1)
	{
		if (argc != 2 + t->npk)
			r = pgs_failf(&err, PGS_ERR_MISUSE, NULL,
						  "sync triggers of table \"%s\" are out of date; call sync_init again",
						  t->name);
		else
			r = sl_capture_insert(c, t, argv + 2, &err);
	}
	else if (op == 3)
	{
		pgs_value pk[64];

		if (argc != 2 + t->npk || t->npk > 64)
			r = pgs_failf(&err, PGS_ERR_MISUSE, NULL,
						  "sync triggers of table \"%s\" are out of date; call sync_init again",
						  t->name);
		else if ((r = pk_values(t, argv + 2, pk, &err)) == PGS_OK)
			r = capture_delete(c, t, pk, &err);
	}
	else if (op == 2)
		r = capture_update(c, t, argc - 2, argv + 2, &err);
	if (r != PGS_OK)
	{
		sqlite3_result_error(ctx, err.msg, -1);
		if (r == PGS_ERR_NOMEM)
			sqlite3_result_error_nomem(ctx);
		else if (r == PGS_ERR_VALUE)
			sqlite3_result_error_code(ctx, SQLITE_CONSTRAINT);
	}
}

/*
 * ---- the capture triggers (layout 2) ----
 *
 * sync_init writes triggers that change the clock row themselves, in SQL, so
 * that a captured row costs no statement of its own (sl_schema.c has their
 * text). Each trigger's WHEN clause calls sqlitesync_capture with
 *   op 4 INSERT: (table_id, 4, ncols, seq, NEW.pk...)
 *   op 5 UPDATE: (table_id, 5, ncols, seq, OLD.pk..., NEW.pk..., OLD.c, NEW.c...)
 *       every column's old and new value, compared here
 *   op 7 UPDATE of a table too wide for op 5's arguments: the same with
 *       masks instead of pairs, as for op 2
 *   op 6 DELETE: (table_id, 6, ncols, seq, OLD.pk...)
 * (seq is sync_state.seq, see sl_log_version), which returns 0 when there
 * is nothing to write (applying a payload, no column changed, a key change,
 * handled here) and otherwise takes the version, decides between index and
 * bulk marker (sl_log_row) and stages what the body's statement asks for:
 *   sqlitesync_ver()        the version
 *   sqlitesync_bulk(old)    the bulkver column (sl_log.c)
 *   sqlitesync_fresh()      the clock blob of a new row
 *   sqlitesync_relife(cl, clk)  an INSERT meeting an existing clock row:
 *                               resurrection or INSERT OR REPLACE
 *   sqlitesync_touch(cl, clk)   an UPDATE: the changed columns restamped
 *   sqlitesync_tomb(cl)         a DELETE
 *   sqlitesync_done(pk...)  after the UPDATE of the clock row: when it found
 *                           no row, the C paths above write it
 * The body runs right after its WHEN clause, with no other capture between.
 */

static bool
differs(sqlite3_value *a, sqlite3_value *b)
{
	int ta = sqlite3_value_type(a), n;

	/* the identity the triggers' DIFFERS tests: type, then exact value */
	if (ta != sqlite3_value_type(b))
		return true;
	switch (ta)
	{
		case SQLITE_INTEGER:
			return sqlite3_value_int64(a) != sqlite3_value_int64(b);
		case SQLITE_FLOAT:
			return sqlite3_value_double(a) != sqlite3_value_double(b);
		case SQLITE_TEXT:
			n = sqlite3_value_bytes(a);
			return n != sqlite3_value_bytes(b) ||
				   (n && memcmp(sqlite3_value_text(a), sqlite3_value_text(b), (size_t) n) != 0);
		case SQLITE_BLOB:
			n = sqlite3_value_bytes(a);
			return n != sqlite3_value_bytes(b) ||
				   (n && memcmp(sqlite3_value_blob(a), sqlite3_value_blob(b), (size_t) n) != 0);
		default:
			return false;
	}
}

static void
fire_fail(sqlite3_context *ctx, pgs_rc r, const pgs_err *err)
{
	sqlite3_result_error(ctx, err->msg, -1);
	if (r == PGS_ERR_NOMEM)
		sqlite3_result_error_nomem(ctx);
	else if (r == PGS_ERR_VALUE)
		sqlite3_result_error_code(ctx, SQLITE_CONSTRAINT);
}

static void
fire_stale(sqlite3_context *ctx, db_table *t)
{
	char *m = sqlite3_mprintf("sync triggers of table \"%s\" are out of date; call sync_init again",
							  t->name);

	sqlite3_result_error(ctx, m ? m : "sync triggers are out of date", -1);
	sqlite3_free(m);
}

/* fire_table: the table a trigger fires for, metadata reloaded when another
 * connection's sync_init changed its columns. NULL with the error set. */
static db_table *
fire_table(sqlite3_context *ctx, db_conn *c, sqlite3_value **argv)
{
	int64_t	  id = sqlite3_value_int64(argv[0]);
	pgs_err	  err;
	db_table *t = sl_table_by_id(c, id, &err);

	if (t && t->ncols != sqlite3_value_int(argv[2]) &&
		(sl_load(c, &err) != PGS_OK || !(t = sl_table_by_id(c, id, &err))))
		t = NULL;
	if (t && !t->layout && sl_log_layout(c, t, &err) != PGS_OK)
		t = NULL;
	if (!t)
		sqlite3_result_error(ctx, err.msg, -1);
	return t;
}

static bool
fire_gset(sqlite3_context *ctx, db_table *t, int op)
{
	char *m;

	if (t->algo != DB_ALGO_GSET)
		return false;
	m = sqlite3_mprintf(
		"cannot %s grow-only table \"%s\": tables synced with algo 'gset' only accept inserts",
		op == 2 ? "UPDATE" : "DELETE FROM", t->name);
	sqlite3_result_error(ctx, m, -1);
	sqlite3_result_error_code(ctx, SQLITE_CONSTRAINT);
	sqlite3_free(m);
	return true;
}

/*
 * fire_blob encodes rc into c->fire_blob and returns it as the result. An
 * UPDATE's SET (touch, tomb) writes the value into its record before the
 * next capture call can change the buffer: SQLite may use it in place
 * (SQLITE_STATIC, no copy). The INSERT's upsert (relife) gets a copy: its
 * statement holds the VALUES row's fresh blob (the same buffer) meanwhile.
 */
static void
fire_blob(sqlite3_context *ctx, db_conn *c, const pgs_rowclock *rc, bool in_place)
{
	c->fire_blob.len = 0;
	pgs_rowclock_encode(rc, &c->fire_blob);
	if (c->fire_blob.oom)
		sqlite3_result_error_nomem(ctx);
	else
		sqlite3_result_blob(ctx, c->fire_blob.p, (int) c->fire_blob.len,
							in_place ? SQLITE_STATIC : SQLITE_TRANSIENT);
}

/* life_clock: a key's first life, every column stamped now (core/local.c). */
static bool
life_clock(db_conn *c, db_table *t, pgs_rowclock *rc)
{
	pgs_stamp *s = sl_stamps(c, t->ncols);

	if (!s)
		return false;
	*rc = (pgs_rowclock){.ncols = t->ncols, .cols = s};
	(void) pgs_local_edit(rc, false, PGS_LOCAL_INSERT, t->algo, NULL, c->fire_ver, sl_tick(c));
	return true;
}

/* fire_version: the transaction's version (sl_log_version). Taking one may
 * reload the metadata (sl_repair_clock), so *t is looked up again. */
static bool
fire_version(sqlite3_context *ctx, db_conn *c, db_table **t, sqlite3_value *seq)
{
	int64_t id = (*t)->id;
	pgs_err err;
	pgs_rc	r;

	if ((r = sl_log_version(c, sqlite3_value_int64(seq), &err)) != PGS_OK ||
		!(*t = sl_table_by_id(c, id, &err)))
	{
		fire_fail(ctx, r != PGS_OK ? r : err.rc, &err);
		return false;
	}
	return true;
}

/* fire_begin: version, index or marker, for a row about to be written. */
static bool
fire_begin(sqlite3_context *ctx, db_conn *c, db_table *t, sqlite3_value *seq, const pgs_value *pk)
{
	pgs_err err;
	pgs_rc	r;

	if (!fire_version(ctx, c, &t, seq))
		return false;
	if (!t->layout && (r = sl_log_layout(c, t, &err)) != PGS_OK)
	{
		fire_fail(ctx, r, &err);
		return false;
	}
	if ((r = sl_log_row(c, t, pk, &err)) != PGS_OK)
	{
		fire_fail(ctx, r, &err);
		return false;
	}
	c->fire_t = t;
	c->fire_pending = false;
	return true;
}

static void
sl_fire_ins(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	db_conn		*c = sqlite3_user_data(ctx);
	pgs_value	 pk[64];
	pgs_rowclock rc;
	pgs_err		 err;
	pgs_rc		 r;
	db_table	*t;

	if (c->applying)
	{
		sqlite3_result_int(ctx, 0);
		return;
	}
	if (!(t = fire_table(ctx, c, argv)))
		return;
	if (argc != 4 + t->npk || t->npk > 64)
	{
		fire_stale(ctx, t);
		return;
	}
	if ((r = pk_values(t, argv + 4, pk, &err)) != PGS_OK)
	{
		fire_fail(ctx, r, &err);
		return;
	}
	if (!fire_begin(ctx, c, t, argv[3], pk))
		return;
	t = c->fire_t;
	if (sl_gc_floor_known(c, t) > 0)
	{
		/*
		 * Tombstones of this table were collected here: a key without a clock
		 * row starts its life above the floor (sl_gc.c), which the trigger's
		 * literal 1 cannot say. Written from C; the body does nothing.
		 */
		bool		   found;
		int64_t		   cl;
		const uint8_t *blob;
		size_t		   len;

		if ((r = db_clock_get(c, t, pk, &found, &cl, &blob, &len, &err)) != PGS_OK)
		{
			fire_fail(ctx, r, &err);
			return;
		}
		if (!found)
		{
			if (!life_clock(c, t, &rc))
			{
				sqlite3_result_error_nomem(ctx);
				return;
			}
			pgs_local_above_floor(&rc, sl_gc_floor_known(c, t));
			if ((r = put_clock(c, t, pk, false, &rc, &err)) != PGS_OK)
			{
				fire_fail(ctx, r, &err);
				return;
			}
			sqlite3_result_int(ctx, 0);
			return;
		}
	}
	if (!life_clock(c, t, &rc))
	{
		sqlite3_result_error_nomem(ctx);
		return;
	}
	c->fire_blob.len = 0;
	pgs_rowclock_encode(&rc, &c->fire_blob);
	if (c->fire_blob.oom)
	{
		sqlite3_result_error_nomem(ctx);
		return;
	}
	c->fire_op = 1;
	sqlite3_result_int(ctx, 1);
}

static void
sl_fire_upd(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	db_conn		   *c = sqlite3_user_data(ctx);
	pgs_value		pk[64];
	pgs_err			err;
	pgs_rc			r = PGS_OK;
	db_table	   *t;
	sqlite3_value **oldpk, **newpk, **cols;
	bool			pairs, key = false, any = false;
	int				nmask;

	if (c->applying)
	{
		sqlite3_result_int(ctx, 0);
		return;
	}
	if (!(t = fire_table(ctx, c, argv)))
		return;
	if (fire_gset(ctx, t, 2))
		return;
	pairs = sqlite3_value_int(argv[1]) == 5;
	nmask = (t->ncols + 61) / 62;
	if (t->npk > 64 || argc != 4 + 2 * t->npk + (pairs ? 2 * t->ncols : nmask))
	{
		fire_stale(ctx, t);
		return;
	}
	oldpk = argv + 4;
	newpk = oldpk + t->npk;
	cols = newpk + t->npk;
	for (int i = 0; i < t->npk; i++)
		key = key || differs(oldpk[i], newpk[i]);
	if (key)
	{
		/* primary key change: delete of the old key + insert of the new one,
		 * written from C (rare; indexed rows) */
		if (!fire_version(ctx, c, &t, argv[3]))
			return;
		if ((r = pk_values(t, oldpk, pk, &err)) == PGS_OK &&
			(r = capture_delete(c, t, pk, &err)) == PGS_OK)
			r = sl_capture_insert(c, t, newpk, &err);
		if (r != PGS_OK)
			fire_fail(ctx, r, &err);
		else
			sqlite3_result_int(ctx, 0);
		return;
	}
	if (nmask > c->fire_mask_cap)
	{
		uint64_t *m = sqlite3_realloc64(c->fire_mask, sizeof(uint64_t) * (size_t) nmask);

		if (!m)
		{
			sqlite3_result_error_nomem(ctx);
			return;
		}
		c->fire_mask = m;
		c->fire_mask_cap = nmask;
	}
	for (int k = 0; k < nmask; k++)
		c->fire_mask[k] = pairs ? 0 : (uint64_t) sqlite3_value_int64(cols[k]);
	for (int i = 0; pairs && i < t->ncols; i++)
		if (differs(cols[2 * i], cols[2 * i + 1]))
			c->fire_mask[i / 62] |= UINT64_C(1) << (i % 62);
	for (int k = 0; k < nmask; k++)
		any = any || c->fire_mask[k] != 0;
	if (!any)
	{
		sqlite3_result_int(ctx, 0); /* no column changed: nothing to capture */
		return;
	}
	if ((r = pk_values(t, newpk, pk, &err)) != PGS_OK)
	{
		fire_fail(ctx, r, &err);
		return;
	}
	if (!fire_begin(ctx, c, t, argv[3], pk))
		return;
	c->fire_op = 2;
	c->fire_pending = true;
	sqlite3_result_int(ctx, 1);
}

static void
sl_fire_del(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	db_conn	 *c = sqlite3_user_data(ctx);
	pgs_value pk[64];
	pgs_err	  err;
	pgs_rc	  r;
	db_table *t;

	if (c->applying)
	{
		sqlite3_result_int(ctx, 0);
		return;
	}
	if (!(t = fire_table(ctx, c, argv)))
		return;
	if (fire_gset(ctx, t, 3))
		return;
	if (argc != 4 + t->npk || t->npk > 64)
	{
		fire_stale(ctx, t);
		return;
	}
	if ((r = pk_values(t, argv + 4, pk, &err)) != PGS_OK)
	{
		fire_fail(ctx, r, &err);
		return;
	}
	if (!fire_begin(ctx, c, t, argv[3], pk))
		return;
	c->fire_op = 3;
	c->fire_pending = true;
	sqlite3_result_int(ctx, 1);
}

void
sl_fire_ver(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	db_conn *c = sqlite3_user_data(ctx);

	(void) argc, (void) argv;
	sqlite3_result_int64(ctx, c->fire_ver);
}

void
sl_fire_bulk(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	db_conn *c = sqlite3_user_data(ctx);
	int64_t	 old = argc > 0 ? sqlite3_value_int64(argv[0]) : 0;

	/* bulk: unindexed under the marker; otherwise anything but ver */
	sqlite3_result_int64(ctx, c->fire_bulk ? c->fire_ver : old == c->fire_ver ? 0 : old);
}

void
sl_fire_fresh(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	db_conn *c = sqlite3_user_data(ctx);

	(void) argc, (void) argv;
	sqlite3_result_blob(ctx, c->fire_blob.p, (int) c->fire_blob.len, SQLITE_TRANSIENT);
}

/*
 * fire_edit: the result is the clock blob of the row whose clock is (cl,
 * clk) after op, by the core's rules (core/local.c); the trigger's SQL
 * writes it (and computes cl the same way: cl | 1 for a life, cl + 1 for a
 * delete). mask: an UPDATE's changed columns (NULL: all).
 */
static void
fire_edit(sqlite3_context *ctx, db_conn *c, db_table *t, sqlite3_value *cl, sqlite3_value *clk,
		  pgs_local_op op, const uint64_t *mask)
{
	pgs_stamp		*s = sl_stamps(c, t->ncols);
	pgs_rowclock	 rc = {.cl = sqlite3_value_int64(cl), .ncols = t->ncols, .cols = s};
	const bool		*changed = NULL;
	pgs_local_result res;
	pgs_err			 err;
	pgs_rc			 r;

	if (!s || (mask && !(changed = changed_of(c, t, NULL, mask))))
	{
		sqlite3_result_error_nomem(ctx);
		return;
	}
	memset(s, 0, sizeof(pgs_stamp) * (size_t) t->ncols);
	if ((rc.cl & 1) && op != PGS_LOCAL_DELETE &&
		(r = pgs_rowclock_decode(sqlite3_value_blob(clk), (size_t) sqlite3_value_bytes(clk), &rc,
								 &err)) != PGS_OK)
	{
		fire_fail(ctx, r, &err);
		return;
	}
	res = pgs_local_edit(&rc, true, op, t->algo, changed, c->fire_ver,
						 op == PGS_LOCAL_DELETE ? 0 : sl_tick(c));
	if (res == PGS_LOCAL_GSET)
	{
		r = gset_refused(t, &err);
		fire_fail(ctx, r, &err);
		return;
	}
	fire_blob(ctx, c, &rc, op != PGS_LOCAL_INSERT);
}

void
sl_fire_relife(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	db_conn *c = sqlite3_user_data(ctx);

	if (argc != 2 || !c->fire_t)
	{
		sqlite3_result_error(ctx, "sqlitesync_relife: called outside a capture trigger", -1);
		return;
	}
	/* an INSERT meeting a clock row: a resurrection, or INSERT OR REPLACE */
	fire_edit(ctx, c, c->fire_t, argv[0], argv[1], PGS_LOCAL_INSERT, NULL);
}

void
sl_fire_touch(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	db_conn *c = sqlite3_user_data(ctx);

	if (argc != 2 || !c->fire_t || c->fire_op != 2)
	{
		sqlite3_result_error(ctx, "sqlitesync_touch: called outside a capture trigger", -1);
		return;
	}
	c->fire_pending = false;
	fire_edit(ctx, c, c->fire_t, argv[0], argv[1], PGS_LOCAL_UPDATE, c->fire_mask);
}

void
sl_fire_tomb(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	db_conn *c = sqlite3_user_data(ctx);

	if (argc != 1 || !c->fire_t || c->fire_op != 3)
	{
		sqlite3_result_error(ctx, "sqlitesync_tomb: called outside a capture trigger", -1);
		return;
	}
	c->fire_pending = false;
	fire_edit(ctx, c, c->fire_t, argv[0], NULL, PGS_LOCAL_DELETE, NULL);
}

void
sl_fire_done(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	db_conn	 *c = sqlite3_user_data(ctx);
	db_table *t = c->fire_t;
	pgs_value pk[64];
	pgs_err	  err;
	pgs_rc	  r;

	if (!c->fire_pending)
		return;
	c->fire_pending = false;
	if (!t || argc != t->npk || t->npk > 64)
	{
		sqlite3_result_error(ctx, "sqlitesync_done: called outside a capture trigger", -1);
		return;
	}
	/* the trigger's UPDATE found no clock row to change: an UPDATE of a row
	 * without one (a new life), or a DELETE of a row without one or whose
	 * clock already says deleted */
	if ((r = pk_values(t, argv, pk, &err)) == PGS_OK)
		r = c->fire_op == 2 ? local_edit(c, t, pk, PGS_LOCAL_UPDATE, NULL, c->fire_ver, &err)
							: capture_delete(c, t, pk, &err);
	if (r != PGS_OK)
		fire_fail(ctx, r, &err);
}
