/*
 * pg_database.c — the database.h seam implemented on PostgreSQL (SPI).
 *
 * Storage per synced table T (created by pg_table.c):
 *   <schema>."T__sync_clock"(pk columns..., cl, ver, clk), PRIMARY KEY (pk),
 *   plus an index on ver so that sync_payload reads only what is new.
 * Sites live in pgsync.sites (idx 0 = this database), the persisted HLC in
 * the sequence pgsync.hlc, versions are transaction ids (pg_capture.c).
 *
 * Every function runs inside an SPI connection opened by the SQL wrapper.
 * Clock and site tables are accessed as the metadata owner; base rows are
 * written with the caller's rights. A write the caller may not make
 * (insufficient_privilege, which also covers row-level security WITH CHECK
 * and USING failures) comes back as PGS_ERR_PERMISSION: it runs in a
 * subtransaction unless the caller holds every privilege on a table without
 * row-level security, where such a failure cannot happen.
 * Other errors ereport directly (longjmp through the core is allowed: it
 * keeps its memory in the call's memory context).
 */
#include "pg_internal.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/rls.h"
#include "utils/uuid.h"

typedef struct site_by_idx
{
	uint32	idx;
	uint8_t site[PGS_SITE_LEN];
} site_by_idx;

typedef struct site_by_id
{
	uint8_t site[PGS_SITE_LEN];
	uint32	idx;
} site_by_id;

struct db_cursor
{
	db_conn		  *db;
	db_table	  *t;
	Portal		   portal;
	SPITupleTable *tt;
	uint64		   pos;
	uint64		   n;
	bool		   eof;
	MemoryContext  row_cxt;
	pgs_value	  *pk;
	pgs_value	  *cols;
};

#define FETCH_BATCH 1000

/* ---- schema ------------------------------------------------------------- */

static void
track(db_conn *db, db_table *t)
{
	db_table **n;

	n = MemoryContextAlloc(db->cxt, sizeof(db_table *) * (db->ntables + 1));
	if (db->ntables)
		memcpy(n, db->tables, sizeof(db_table *) * db->ntables);
	n[db->ntables++] = t;
	db->tables = n;
}

pgs_rc
db_tables(db_conn *db, db_table ***tables, int *ntables, pgs_err *err)
{
	if (!db->tables_loaded)
	{
		Oid *relids;
		int	 n = pg_table_list(&relids);
		int	 i;

		db->ntables = 0;
		db->tables = NULL;
		for (i = 0; i < n; i++)
		{
			db_table *t = pg_table_get(relids[i], true);

			if (t)
				track(db, t);
		}
		db->tables_loaded = true;
	}
	*tables = db->tables;
	*ntables = db->ntables;
	return PGS_OK;
}

pgs_rc
db_table_find(db_conn *db, const uint8_t *name, size_t len, db_table **out, pgs_err *err)
{
	Oid		  relid;
	int		  i;
	db_table *t;

	for (i = 0; i < db->ntables; i++)
		if (strlen(db->tables[i]->name) == len && memcmp(db->tables[i]->name, name, len) == 0)
		{
			*out = db->tables[i];
			return PGS_OK;
		}
	relid = pg_table_by_name((const char *) name, len);
	if (!OidIsValid(relid) || (t = pg_table_get(relid, true)) == NULL)
	{
		char nm[72];

		pgs_failf(err, PGS_ERR_SCHEMA,
				  "Create the table here and call sync_init on it (the name must match, "
				  "schema-qualified when not in public).",
				  "table \"%s\" of the payload is not synced here",
				  pgs_name_for_msg(nm, name, len));
		return PGS_ERR_SCHEMA;
	}
	if (db->tables_loaded)
		db->tables_loaded = false; /* tables[] is now a superset; reload on db_tables */
	track(db, t);
	*out = t;
	return PGS_OK;
}

const db_table_info *
db_table_describe(db_table *t)
{
	return &t->info;
}

/* ---- sites ------------------------------------------------------------ */

static void
site_maps(db_conn *db)
{
	HASHCTL ctl;

	if (db->by_idx)
		return;
	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = sizeof(uint32);
	ctl.entrysize = sizeof(site_by_idx);
	ctl.hcxt = db->cxt;
	db->by_idx =
		hash_create("pgsync sites by idx", 64, &ctl, HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = PGS_SITE_LEN;
	ctl.entrysize = sizeof(site_by_id);
	ctl.hcxt = db->cxt;
	db->by_site =
		hash_create("pgsync sites by id", 64, &ctl, HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
}

static void
site_remember(db_conn *db, uint32 idx, const uint8_t *site)
{
	site_by_idx *a;
	site_by_id	*b;

	a = hash_search(db->by_idx, &idx, HASH_ENTER, NULL);
	memcpy(a->site, site, PGS_SITE_LEN);
	b = hash_search(db->by_site, site, HASH_ENTER, NULL);
	b->idx = idx;
}

const uint8_t *
db_site_id(db_conn *db)
{
	return db->site;
}

static Datum
uuid_datum(const uint8_t *site)
{
	pg_uuid_t *u = palloc(sizeof(pg_uuid_t));

	memcpy(u->data, site, PGS_SITE_LEN);
	return UUIDPGetDatum(u);
}

pgs_rc
db_site_intern(db_conn *db, const uint8_t site[16], uint32_t *idx, pgs_err *err)
{
	static SPIPlanPtr sel = NULL, ins = NULL;
	Oid				  argt[1] = {UUIDOID};
	Datum			  arg[1];
	site_by_id		 *e;
	pg_user_save	  us;
	bool			  isnull;
	int				  attempt;

	site_maps(db);
	if (memcmp(site, db->site, PGS_SITE_LEN) == 0)
	{
		*idx = 0;
		return PGS_OK;
	}
	e = hash_search(db->by_site, site, HASH_FIND, NULL);
	if (e)
	{
		*idx = e->idx;
		return PGS_OK;
	}
	arg[0] = uuid_datum(site);
	pg_as_meta(&us);
	if (sel == NULL)
	{
		sel = SPI_prepare("SELECT idx FROM pgsync.sites WHERE site = $1", 1, argt);
		if (sel == NULL)
			elog(ERROR, "SPI_prepare failed");
		SPI_keepplan(sel);
		ins = SPI_prepare(
			"INSERT INTO pgsync.sites (idx, site) "
			"VALUES (pg_catalog.nextval('pgsync.sites_idx_seq'::pg_catalog.regclass)::integer, $1) "
			"ON CONFLICT (site) DO NOTHING RETURNING idx",
			1, argt);
		if (ins == NULL)
			elog(ERROR, "SPI_prepare failed");
		SPI_keepplan(ins);
	}
	for (attempt = 0; attempt < 2; attempt++)
	{
		SPIPlanPtr p = attempt == 0 ? sel : ins;
		int		   rc = SPI_execute_plan(p, arg, NULL, false, 1);

		if (rc != SPI_OK_SELECT && rc != SPI_OK_INSERT_RETURNING)
			elog(ERROR, "pgsync: reading pgsync.sites failed");
		if (SPI_processed == 1)
		{
			*idx = DatumGetInt32(
				SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
			SPI_freetuptable(SPI_tuptable);
			pg_as_caller(&us);
			site_remember(db, *idx, site);
			return PGS_OK;
		}
		SPI_freetuptable(SPI_tuptable);
	}
	/* lost a race with a concurrent insert that has committed by now */
	if (SPI_execute_plan(sel, arg, NULL, false, 1) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "pgsync: could not record site");
	*idx = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	SPI_freetuptable(SPI_tuptable);
	pg_as_caller(&us);
	site_remember(db, *idx, site);
	return PGS_OK;
}

pgs_rc
db_site_lookup(db_conn *db, uint32_t idx, const uint8_t **site, pgs_err *err)
{
	static SPIPlanPtr sel = NULL;
	Oid				  argt[1] = {INT4OID};
	Datum			  arg[1];
	site_by_idx		 *e;
	pg_user_save	  us;
	bool			  isnull;

	site_maps(db);
	if (idx == 0)
	{
		*site = db->site;
		return PGS_OK;
	}
	e = hash_search(db->by_idx, &idx, HASH_FIND, NULL);
	if (e)
	{
		*site = e->site;
		return PGS_OK;
	}
	arg[0] = Int32GetDatum((int32) idx);
	pg_as_meta(&us);
	if (sel == NULL)
	{
		sel = SPI_prepare("SELECT site FROM pgsync.sites WHERE idx = $1", 1, argt);
		if (sel == NULL)
			elog(ERROR, "SPI_prepare failed");
		SPI_keepplan(sel);
	}
	if (SPI_execute_plan(sel, arg, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "pgsync: reading pgsync.sites failed");
	pg_as_caller(&us);
	if (SPI_processed != 1)
	{
		SPI_freetuptable(SPI_tuptable);
		return pgs_failf(err, PGS_ERR_DB,
						 "The metadata in schema pgsync is damaged; restore it from a backup.",
						 "unknown site index %u in a row clock", idx);
	}
	{
		pg_uuid_t *u =
			DatumGetUUIDP(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
		uint8_t copy[PGS_SITE_LEN];

		memcpy(copy, u->data, PGS_SITE_LEN);
		SPI_freetuptable(SPI_tuptable);
		site_remember(db, idx, copy);
	}
	e = hash_search(db->by_idx, &idx, HASH_FIND, NULL);
	*site = e->site;
	return PGS_OK;
}

/* ---- versions and clock ------------------------------------------------ */

pgs_rc
db_apply_version(db_conn *db, int64_t *ver, pgs_err *err)
{
	if (!db->have_ver)
	{
		pg_wrote_xid = GetTopFullTransactionId();
		db->ver = pg_txn_version();
		db->have_ver = true;
	}
	*ver = db->ver;
	return PGS_OK;
}

/* db_apply_end: nothing is deferred on Postgres (every row is written as
 * it is merged). */
pgs_rc
db_apply_end(db_conn *db, pgs_err *err)
{
	return PGS_OK;
}

pgs_rc
db_hlc_observe(db_conn *db, uint64_t hlc, pgs_err *err)
{
	pg_hlc_observe(hlc);
	return PGS_OK;
}

/*
 * db_version_safe: every transaction with an xid below the snapshot's xmin
 * has ended, so no version <= xmin - 1 can still appear. db may be NULL.
 */
pgs_rc
db_version_safe(db_conn *db, int64_t *until, pgs_err *err)
{
	static SPIPlanPtr plan = NULL;
	bool			  isnull;

	if (plan == NULL)
	{
		plan = SPI_prepare("SELECT pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot())"
						   "::pg_catalog.text::pg_catalog.int8 - 1",
						   0, NULL);
		if (plan == NULL)
			elog(ERROR, "SPI_prepare failed");
		SPI_keepplan(plan);
	}
	if (SPI_execute_plan(plan, NULL, NULL, true, 1) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "pgsync: reading the snapshot failed");
	*until = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	SPI_freetuptable(SPI_tuptable);
	return PGS_OK;
}

/* pk_datums converts the key values for the table's key types. */
static Datum *
pk_datums(db_table *t, const pgs_value *pk, int extra)
{
	Datum *d = palloc(sizeof(Datum) * (t->npk + extra + 1));
	int	   i;

	for (i = 0; i < t->npk; i++)
	{
		bool isnull;

		d[i] = pg_value_datum(&t->pk[i], &pk[i], &isnull, t, pk);
		if (isnull)
			ereport(ERROR, (errcode(ERRCODE_INVALID_BINARY_REPRESENTATION),
							errmsg("null primary key value for table %s in payload", t->name)));
	}
	return d;
}

static MemoryContext
scratch(db_conn *db)
{
	/* per-row scratch, reset on every db_ call that needs it */
	static MemoryContext cxt = NULL;
	static uint64		 call = 0;

	if (cxt == NULL || call != db->call_id)
	{
		cxt = AllocSetContextCreate(db->cxt, "pgsync row", ALLOCSET_DEFAULT_SIZES);
		call = db->call_id;
	}
	else
		MemoryContextReset(cxt);
	return cxt;
}

pgs_rc
db_clock_get(db_conn *db, db_table *t, const pgs_value *pk, bool *found, int64_t *cl,
			 const uint8_t **blob, size_t *blob_len, pgs_err *err)
{
	MemoryContext row = scratch(db);
	MemoryContext old = MemoryContextSwitchTo(row);
	Datum		 *d = pk_datums(t, pk, 0);
	pg_user_save  us;
	int			  rc;
	int64		  dcl;
	bytea		 *b = NULL;
	int			  f = pg_clock_lookup_direct(t, d, &dcl, &b);

	if (f < 0)
	{
		pg_as_meta(&us);
		rc = SPI_execute_plan(pg_plan_clock_get(t), d, NULL, false, 1);
		pg_as_caller(&us);
		if (rc != SPI_OK_SELECT)
			elog(ERROR, "pgsync: reading the clock of %s failed", t->name);
		f = SPI_processed == 1;
		if (f)
		{
			bool	  isnull;
			HeapTuple tup = SPI_tuptable->vals[0];

			dcl = DatumGetInt64(SPI_getbinval(tup, SPI_tuptable->tupdesc, 1, &isnull));
			b = DatumGetByteaPCopy(SPI_getbinval(tup, SPI_tuptable->tupdesc, 2, &isnull));
		}
		SPI_freetuptable(SPI_tuptable);
	}
	*found = db->last_found = f == 1;
	if (*found)
	{
		size_t len;

		*cl = db->last_cl = dcl;
		len = VARSIZE_ANY_EXHDR(b);
		/* kept until db_clock_put compares against it */
		if (db->last_blob == NULL || db->last_cap < len + VARHDRSZ)
		{
			if (db->last_blob)
				pfree(db->last_blob);
			db->last_cap = Max(len + VARHDRSZ, 256);
			db->last_blob = MemoryContextAlloc(db->cxt, db->last_cap);
		}
		SET_VARSIZE(db->last_blob, len + VARHDRSZ);
		memcpy(VARDATA(db->last_blob), VARDATA_ANY(b), len);
		*blob = (const uint8_t *) VARDATA(db->last_blob);
		*blob_len = len;
	}
	MemoryContextSwitchTo(old);
	return PGS_OK;
}

/*
 * db_clock_put writes the clock row as a compare-and-set against what
 * db_clock_get read: if a local writer changed the row in between (its
 * trigger wrote the clock; our row write waited for its commit), the merge
 * decisions of this row are stale. That raises serialization_failure and
 * sync_apply_payload runs the apply again.
 */
pgs_rc
db_clock_put(db_conn *db, db_table *t, const pgs_value *pk, bool exists, int64_t cl, int64_t ver,
			 const uint8_t *blob, size_t blob_len, pgs_err *err)
{
	MemoryContext old = MemoryContextSwitchTo(scratch(db));
	Datum		 *d = pk_datums(t, pk, 5);
	bytea		 *b = pg_bytea(CurrentMemoryContext, blob, blob_len);
	pg_user_save  us;
	int			  rc;
	bool		  ok;

	d[t->npk] = Int64GetDatum(cl);
	d[t->npk + 1] = Int64GetDatum(ver);
	d[t->npk + 2] = PointerGetDatum(b);
	pg_as_meta(&us);
	if (exists && db->last_found)
	{
		d[t->npk + 3] = Int64GetDatum(db->last_cl);
		d[t->npk + 4] = PointerGetDatum(db->last_blob);
		rc = SPI_execute_plan(pg_plan_clock_cas(t), d, NULL, false, 0);
		if (rc != SPI_OK_UPDATE)
			elog(ERROR, "pgsync: writing the clock of %s failed", t->name);
		ok = SPI_processed == 1;
	}
	else if (pg_clock_insert_direct(t, d, cl, ver, b))
		ok = true; /* a new key: straight into heap and indexes */
	else
	{
		/* the key exists or is being written: let the executor wait for it */
		rc = SPI_execute_plan(pg_plan_clock_insnew(t), d, NULL, false, 0);
		if (rc != SPI_OK_INSERT)
			elog(ERROR, "pgsync: writing the clock of %s failed", t->name);
		ok = SPI_processed == 1;
	}
	pg_as_caller(&us);
	if (!ok)
	{
		pg_apply_conflict = true;
		ereport(ERROR, (errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
						errmsg("row %s of table %s was changed locally while a payload was applied",
							   pg_pk_text(t, pk), t->name),
						errhint("Apply the payload again.")));
	}
	MemoryContextSwitchTo(old);
	return PGS_OK;
}

/* ---- base rows ------------------------------------------------------------ */

/*
 * fast_write: may this call write t without a subtransaction? Only when the
 * caller holds INSERT, UPDATE, DELETE and SELECT on it and row-level security
 * does not apply, so that no insufficient_privilege error can come back.
 */
static bool
fast_write(db_conn *db, db_table *t)
{
	if (t->priv_call != db->call_id)
	{
		Oid user = GetUserId();

		t->fast_write = pg_class_aclcheck(t->relid, user, ACL_INSERT) == ACLCHECK_OK &&
						pg_class_aclcheck(t->relid, user, ACL_UPDATE) == ACLCHECK_OK &&
						pg_class_aclcheck(t->relid, user, ACL_DELETE) == ACLCHECK_OK &&
						pg_class_aclcheck(t->relid, user, ACL_SELECT) == ACLCHECK_OK &&
						check_enable_rls(t->relid, InvalidOid, true) != RLS_ENABLED;
		t->priv_call = db->call_id;
	}
	return t->fast_write;
}

typedef enum write_kind
{
	W_MERGE,
	W_REPLACE,
	W_DELETE
} write_kind;

typedef struct write_args
{
	db_table	  *t;
	write_kind	   kind;
	pg_merge_plan *m;
	Datum		  *vals;
	char		  *nulls;
} write_args;

static void
do_write(write_args *w)
{
	int rc;

	switch (w->kind)
	{
		case W_DELETE:
			rc = SPI_execute_plan(pg_plan_row_delete(w->t), w->vals, w->nulls, false, 0);
			if (rc != SPI_OK_DELETE)
				elog(ERROR, "pgsync: delete from %s failed", w->t->name);
			break;
		case W_REPLACE:
			rc = SPI_execute_plan(pg_plan_row_replace(w->t), w->vals, w->nulls, false, 0);
			if (rc != SPI_OK_INSERT)
				elog(ERROR, "pgsync: insert into %s failed", w->t->name);
			break;
		case W_MERGE:
			rc = SPI_execute_plan(w->m->upd, w->vals, w->nulls, false, 0);
			if (rc != SPI_OK_UPDATE)
				elog(ERROR, "pgsync: update of %s failed", w->t->name);
			if (SPI_processed == 0)
			{
				rc = SPI_execute_plan(w->m->ins, w->vals, w->nulls, false, 0);
				if (rc != SPI_OK_INSERT)
					elog(ERROR, "pgsync: insert into %s failed", w->t->name);
			}
			break;
	}
}

/*
 * guarded_write runs do_write in a subtransaction; insufficient_privilege
 * (42501, also raised by row-level security) comes back as
 * PGS_ERR_PERMISSION with err filled, any other error is re-thrown.
 */
static pgs_rc
guarded_write(db_conn *db, write_args *w, pgs_err *err)
{
	MemoryContext	cxt = CurrentMemoryContext;
	ResourceOwner	owner = CurrentResourceOwner;
	volatile pgs_rc rc = PGS_OK;

	if (fast_write(db, w->t))
	{
		do_write(w);
		return PGS_OK;
	}
	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(cxt);
	PG_TRY();
	{
		do_write(w);
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(cxt);
		CurrentResourceOwner = owner;
	}
	PG_CATCH();
	{
		ErrorData *ed;

		MemoryContextSwitchTo(cxt);
		ed = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(cxt);
		CurrentResourceOwner = owner;
		if (ed->sqlerrcode != ERRCODE_INSUFFICIENT_PRIVILEGE)
			ReThrowError(ed);
		memset(err, 0, sizeof(*err));
		err->rc = PGS_ERR_PERMISSION;
		strlcpy(err->msg, ed->message ? ed->message : "permission denied", sizeof(err->msg));
		if (ed->detail)
			strlcpy(err->detail, ed->detail, sizeof(err->detail));
		strlcpy(db->sqlstate, unpack_sql_state(ed->sqlerrcode), sizeof(db->sqlstate));
		FreeErrorData(ed);
		rc = PGS_ERR_PERMISSION;
	}
	PG_END_TRY();
	return rc;
}

pgs_rc
db_row_write(db_conn *db, db_table *t, const pgs_value *pk, db_write_mode mode, int n,
			 const int *cols, const pgs_value *vals, pgs_err *err)
{
	MemoryContext old = MemoryContextSwitchTo(scratch(db));
	write_args	  w;
	int			  i;
	pgs_rc		  rc;

	w.t = t;
	if (mode == DB_WRITE_MERGE)
	{
		w.kind = W_MERGE;
		w.m = pg_table_merge_plan(t, n, cols);
		w.vals = pk_datums(t, pk, n);
		w.nulls = palloc(t->npk + n + 1);
		memset(w.nulls, ' ', t->npk + n);
		for (i = 0; i < n; i++)
		{
			bool isnull;

			w.vals[t->npk + i] = pg_value_datum(&t->cols[cols[i]], &vals[i], &isnull, t, pk);
			w.nulls[t->npk + i] = isnull ? 'n' : ' ';
		}
	}
	else
	{
		/* a new life: the row is exactly these columns, the others null */
		w.kind = W_REPLACE;
		w.m = NULL;
		w.vals = pk_datums(t, pk, t->ncols);
		w.nulls = palloc(t->npk + t->ncols + 1);
		memset(w.nulls, ' ', t->npk);
		memset(w.nulls + t->npk, 'n', t->ncols);
		for (i = 0; i < n; i++)
		{
			bool isnull;
			int	 c = cols[i];

			w.vals[t->npk + c] = pg_value_datum(&t->cols[c], &vals[i], &isnull, t, pk);
			w.nulls[t->npk + c] = isnull ? 'n' : ' ';
		}
	}
	rc = guarded_write(db, &w, err);
	if (w.m && w.m->cols_key)
	{
		/* one-off plan (too many column sets): free it */
		SPI_freeplan(w.m->upd);
		SPI_freeplan(w.m->ins);
	}
	MemoryContextSwitchTo(old);
	return rc;
}

pgs_rc
db_row_delete(db_conn *db, db_table *t, const pgs_value *pk, pgs_err *err)
{
	MemoryContext old = MemoryContextSwitchTo(scratch(db));
	write_args	  w;
	pgs_rc		  rc;

	w.t = t;
	w.kind = W_DELETE;
	w.m = NULL;
	w.vals = pk_datums(t, pk, 0);
	w.nulls = NULL;
	rc = guarded_write(db, &w, err);
	MemoryContextSwitchTo(old);
	return rc;
}

void
db_reject(db_conn *db, db_table *t, const pgs_value *pk, const pgs_err *why)
{
	MemoryContext old = MemoryContextSwitchTo(scratch(db));

	pg_reject_add(t->name, pg_pk_json(t, pk), db->sqlstate[0] ? db->sqlstate : "42501", why->msg);
	db->rejected++;
	db->sqlstate[0] = '\0';
	MemoryContextSwitchTo(old);
}

/* ---- change enumeration -------------------------------------------------- */

pgs_rc
db_changes_open(db_conn *db, db_table *t, int64_t since, int64_t until, bool by_key,
				const pgs_value *after_pk, db_cursor **out, pgs_err *err)
{
	db_cursor *c = MemoryContextAllocZero(db->cxt, sizeof(db_cursor));
	Datum	  *args = palloc(sizeof(Datum) * (t->npk + 2));
	int		   mode = !by_key ? 0 : after_pk ? 2 : 1;

	c->db = db;
	c->t = t;
	c->row_cxt = AllocSetContextCreate(db->cxt, "pgsync changes", ALLOCSET_DEFAULT_SIZES);
	c->pk = MemoryContextAllocZero(db->cxt, sizeof(pgs_value) * t->npk);
	c->cols = MemoryContextAllocZero(db->cxt, sizeof(pgs_value) * Max(t->ncols, 1));
	args[0] = Int64GetDatum(since);
	args[1] = Int64GetDatum(until);
	if (mode == 2)
	{
		/* a token's key: converted (and checked) like a payload's key */
		Datum *k = pk_datums(t, after_pk, 0);

		memcpy(args + 2, k, sizeof(Datum) * t->npk);
	}
	if (mode == 0)
		c->portal = SPI_cursor_open(NULL, pg_plan_changes(t, mode), args, NULL, true);
	else
	{
		/* planned at open: a chunk reads a small fraction of the rows */
		int level = NewGUCNestLevel();

		(void) set_config_option("cursor_tuple_fraction", "0.0001", PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_SAVE, true, 0, false);
		c->portal = SPI_cursor_open(NULL, pg_plan_changes(t, mode), args, NULL, true);
		AtEOXact_GUC(true, level);
	}
	if (c->portal == NULL)
		elog(ERROR, "pgsync: opening the changes of %s failed", t->name);
	*out = c;
	return PGS_OK;
}

pgs_rc
db_changes_next(db_cursor *c, bool *done, const pgs_value **pk, int64_t *cl, const uint8_t **blob,
				size_t *blob_len, bool *alive, const pgs_value **cols, pgs_err *err)
{
	db_table	 *t = c->t;
	MemoryContext old;

	for (;;)
	{
		HeapTuple tup;
		TupleDesc td;
		bool	  isnull;
		bool	  exists;
		int		  i;
		bytea	 *b;

		if (c->tt == NULL || c->pos >= c->n)
		{
			if (c->tt)
				SPI_freetuptable(c->tt);
			c->tt = NULL;
			if (c->eof)
			{
				*done = true;
				return PGS_OK;
			}
			SPI_cursor_fetch(c->portal, true, FETCH_BATCH);
			c->tt = SPI_tuptable;
			c->n = SPI_processed;
			c->pos = 0;
			if (c->n < FETCH_BATCH)
				c->eof = true;
			if (c->n == 0)
				continue;
		}
		tup = c->tt->vals[c->pos++];
		td = c->tt->tupdesc;
		MemoryContextReset(c->row_cxt);
		old = MemoryContextSwitchTo(c->row_cxt);
		*cl = DatumGetInt64(SPI_getbinval(tup, td, t->npk + 1, &isnull));
		exists = DatumGetBool(SPI_getbinval(tup, td, t->npk + 3, &isnull));
		if ((*cl & 1) && !exists)
		{
			/* clock says alive but the row is gone (written with capture off) */
			MemoryContextSwitchTo(old);
			continue;
		}
		for (i = 0; i < t->npk; i++)
		{
			Datum d = SPI_getbinval(tup, td, i + 1, &isnull);

			pg_datum_value(&t->pk[i], d, isnull, &c->pk[i]);
		}
		b = DatumGetByteaPP(SPI_getbinval(tup, td, t->npk + 2, &isnull));
		*blob = (const uint8_t *) VARDATA_ANY(b);
		*blob_len = VARSIZE_ANY_EXHDR(b);
		*alive = (*cl & 1) && exists;
		if (*alive)
			for (i = 0; i < t->ncols; i++)
			{
				Datum d = SPI_getbinval(tup, td, t->npk + 4 + i, &isnull);

				pg_datum_value(&t->cols[i], d, isnull, &c->cols[i]);
			}
		MemoryContextSwitchTo(old);
		*pk = c->pk;
		*cols = c->cols;
		*done = false;
		return PGS_OK;
	}
}

void
db_changes_close(db_cursor *c)
{
	if (c->tt)
		SPI_freetuptable(c->tt);
	SPI_cursor_close(c->portal);
	MemoryContextDelete(c->row_cxt);
}
