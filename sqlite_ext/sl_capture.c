/*
 * sl_capture.c — change capture: the C function behind the triggers.
 *
 * sync_init creates three AFTER triggers per table that call
 * sqlitesync_capture(table_id, op, ...):
 * (after the op comes the table's synced column count as the triggers know it;
 * another connection's sync_init after ALTER TABLE ADD COLUMN changes it and
 * makes this connection reload its metadata)
 *   op 1 INSERT: pk...                       (NEW values)
 *   op 2 UPDATE: pk_changed, old pk..., new pk..., mask...
 *                 mask k has bit i set when column 62*k+i changed
 *                 (OLD.c IS NOT NEW.c, computed by the trigger itself)
 *   op 3 DELETE: pk...                       (OLD values)
 * The function updates the row's clock row and nothing else: exactly one
 * B-tree written per captured row (see sl_database.c for why). A connection
 * that did not load the extension cannot run these triggers ("no such
 * function: sqlitesync_capture"), so its write fails instead of being lost.
 * Writes made by sync_apply_payload are skipped here (c->applying).
 */
#include "sl_internal.h"

#include <string.h>

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

/* new_life stamps every column for a row that starts a life at cl. */
static pgs_rc
new_life(db_conn *c, db_table *t, const pgs_value *pk, bool exists, int64_t cl, int64_t ver,
		 pgs_err *err)
{
	pgs_stamp	*s = sl_stamps(c, t->ncols);
	pgs_rowclock rc = {.cl = cl, .cl_ver = ver, .cl_site = 0, .ncols = t->ncols, .cols = s};
	uint64_t	 hlc = sl_tick(c);

	if (!s)
		return pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
	for (int i = 0; i < t->ncols; i++)
		s[i].hlc = hlc, s[i].ver = ver, s[i].site = 0;
	return put_clock(c, t, pk, exists, &rc, err);
}

static pgs_rc
touch_columns(db_conn *c, db_table *t, const pgs_value *pk, const uint8_t *blob, size_t len,
			  int64_t cl, int64_t ver, sqlite3_value **masks, pgs_err *err)
{
	pgs_stamp	*s = sl_stamps(c, t->ncols);
	pgs_rowclock rc = {.cl = cl, .ncols = t->ncols, .cols = s};
	uint64_t	 tick = sl_tick(c);
	int			 changed = 0;
	pgs_rc		 r;

	if (!s)
		return pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
	if ((r = pgs_rowclock_decode(blob, len, &rc, err)) != PGS_OK)
		return r;
	for (int i = 0; i < t->ncols; i++)
	{
		bool bit = masks ? (sqlite3_value_int64(masks[i / 62]) >> (i % 62)) & 1 : true;

		if (!bit)
			continue;
		/* an edit made after seeing the cell's stamp always beats it */
		s[i].hlc = s[i].hlc >= tick ? s[i].hlc + 1 : tick;
		s[i].ver = ver;
		s[i].site = 0;
		changed++;
	}
	if (!changed)
		return PGS_OK;
	return put_clock(c, t, pk, true, &rc, err);
}

pgs_rc
sl_capture_insert(db_conn *c, db_table *t, sqlite3_value **pkargs, pgs_err *err)
{
	pgs_value	   pk[64];
	pgs_value	  *pkv = t->npk <= 64 ? pk : sqlite3_malloc64(sizeof(pgs_value) * t->npk);
	int64_t		   ver, cl;
	bool		   found;
	const uint8_t *blob;
	size_t		   len;
	pgs_rc		   r;

	if (!pkv)
		return pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
	if ((r = pk_values(t, pkargs, pkv, err)) != PGS_OK ||
		(r = sl_txn_version(c, false, &ver, err)) != PGS_OK)
		goto out;
	/* fast path: a key never seen before takes one INSERT and no lookup */
	r = new_life(c, t, pkv, false, 1, ver, err);
	if (r == PGS_OK || sqlite3_extended_errcode(c->db) != SQLITE_CONSTRAINT_PRIMARYKEY)
		goto out;
	if ((r = db_clock_get(c, t, pkv, &found, &cl, &blob, &len, err)) != PGS_OK)
		goto out;
	if (!found)
		r = pgs_failf(err, PGS_ERR_DB, NULL, "clock row of table \"%s\" vanished during capture",
					  t->name);
	else if ((cl & 1) == 0)
		r = new_life(c, t, pkv, true, cl + 1, ver, err); /* resurrection */
	else if (t->algo == DB_ALGO_GSET)
		r = pgs_failf(err, PGS_ERR_VALUE, "Tables synced with algo 'gset' only accept new rows.",
					  "cannot replace a row of grow-only table \"%s\"", t->name);
	else
		r = touch_columns(c, t, pkv, blob, len, cl, ver, NULL, err); /* INSERT OR REPLACE */
out:
	if (pkv != pk)
		sqlite3_free(pkv);
	return r;
}

static pgs_rc
capture_delete(db_conn *c, db_table *t, const pgs_value *pk, pgs_err *err)
{
	int64_t		   ver, cl = 0;
	bool		   found;
	const uint8_t *blob;
	size_t		   len;
	pgs_rc		   r;
	pgs_rowclock   rc = {.ncols = 0, .cols = NULL};

	if ((r = sl_txn_version(c, false, &ver, err)) != PGS_OK ||
		(r = db_clock_get(c, t, pk, &found, &cl, &blob, &len, err)) != PGS_OK)
		return r;
	if (found && (cl & 1) == 0)
		return PGS_OK; /* already a tombstone */
	rc.cl = found ? cl + 1 : 2;
	rc.cl_ver = ver;
	rc.cl_site = 0;
	return put_clock(c, t, pk, found, &rc, err);
}

static pgs_rc
capture_update(db_conn *c, db_table *t, int argc, sqlite3_value **argv, pgs_err *err)
{
	int			   nmask = (t->ncols + 61) / 62;
	pgs_value	   pk[64];
	int64_t		   ver, cl;
	bool		   found;
	const uint8_t *blob;
	size_t		   len;
	pgs_rc		   r;

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
		(r = sl_txn_version(c, false, &ver, err)) != PGS_OK ||
		(r = db_clock_get(c, t, pk, &found, &cl, &blob, &len, err)) != PGS_OK)
		return r;
	if (!found || (cl & 1) == 0)
		return new_life(c, t, pk, found, found ? cl + 1 : 1, ver, err);
	return touch_columns(c, t, pk, blob, len, cl, ver, argv + 1 + 2 * t->npk, err);
}

void
sl_capture(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	db_conn	 *c = sqlite3_user_data(ctx);
	pgs_err	  err;
	db_table *t;
	int		  op;
	pgs_rc	  r = PGS_OK;

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
