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

#include "access/table.h"
#include "access/transam.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/relcache.h"
#include "utils/resowner.h"
#include "utils/rls.h"
#include "utils/snapmgr.h"
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
		int	 n = pgsync_table_list(&relids);
		int	 i;

		db->ntables = 0;
		db->tables = NULL;
		for (i = 0; i < n; i++)
		{
			db_table *t = pgsync_table_get(relids[i], true);

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
	relid = pgsync_table_by_name((const char *) name, len);
	if (!OidIsValid(relid) || (t = pgsync_table_get(relid, true)) == NULL)
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

/* site_remember records a pair in the call's maps; returns the site as kept there */
static const uint8_t *
site_remember(db_conn *db, uint32 idx, const uint8_t *site)
{
	site_by_idx *a;
	site_by_id	*b;

	a = hash_search(db->by_idx, &idx, HASH_ENTER, NULL);
	memcpy(a->site, site, PGS_SITE_LEN);
	b = hash_search(db->by_site, site, HASH_ENTER, NULL);
	b->idx = idx;
	return a->site;
}

/*
 * The backend's sites: what committed rows of pgsync.sites said, kept
 * across calls (a push read its device's site with a statement of its own
 * each time). A committed row never changes: nothing updates or deletes
 * sites, and idx and site are both unique. A row this transaction inserted
 * (or read back, xmin ours) stays in the call's maps only, for it may still
 * roll back; the next transaction that reads it keeps it. The cache belongs
 * to one pgsync.sites (db->sites_relid), and is emptied past KNOWN_MAX
 * entries, so a server with many devices holds a bounded amount per
 * backend.
 */
#define KNOWN_MAX 20000
static HTAB *known_idx, *known_site;
static Oid	 known_relid = InvalidOid;
static long	 known_n = 0;

static void
known_reset(Oid relid)
{
	HASHCTL ctl;

	if (known_idx)
		hash_destroy(known_idx);
	if (known_site)
		hash_destroy(known_site);
	/* nothing dangles if a hash_create below runs out of memory */
	known_idx = known_site = NULL;
	known_relid = InvalidOid;
	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = sizeof(uint32);
	ctl.entrysize = sizeof(site_by_idx);
	ctl.hcxt = TopMemoryContext;
	known_idx =
		hash_create("pgsync known sites by idx", 256, &ctl, HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = PGS_SITE_LEN;
	ctl.entrysize = sizeof(site_by_id);
	ctl.hcxt = TopMemoryContext;
	known_site =
		hash_create("pgsync known sites by id", 256, &ctl, HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	known_relid = relid;
	known_n = 0;
}

/* known_ready: the cache, emptied when pgsync.sites is another table now */
static void
known_ready(const db_conn *db)
{
	if (known_idx == NULL || known_site == NULL || db->sites_relid != known_relid)
		known_reset(db->sites_relid);
}

/* known_keep: a row read by a statement; kept when its insert has committed */
static void
known_keep(uint32 idx, const uint8_t *site, Datum xmin)
{
	site_by_idx *a;
	site_by_id	*b;

	/* visible to the statement and not ours: committed */
	if (TransactionIdIsCurrentTransactionId(DatumGetTransactionId(xmin)))
		return;
	if (known_n >= KNOWN_MAX)
		known_reset(known_relid);
	a = hash_search(known_idx, &idx, HASH_ENTER, NULL);
	memcpy(a->site, site, PGS_SITE_LEN);
	b = hash_search(known_site, site, HASH_ENTER, NULL);
	b->idx = idx;
	known_n++;
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
	pgsync_user_save  us;
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
	known_ready(db);
	if ((e = hash_search(known_site, site, HASH_FIND, NULL)) != NULL)
	{
		*idx = e->idx;
		site_remember(db, *idx, site);
		return PGS_OK;
	}
	arg[0] = uuid_datum(site);
	pgsync_as_meta(&us);
	if (sel == NULL)
	{
		sel = pgsync_plan_keep("SELECT idx, xmin FROM pgsync.sites WHERE site = $1", 1, argt);
		ins = pgsync_plan_keep(
			"INSERT INTO pgsync.sites (idx, site) "
			"VALUES (pg_catalog.nextval('pgsync.sites_idx_seq'::pg_catalog.regclass)::integer, $1) "
			"ON CONFLICT (site) DO NOTHING RETURNING idx",
			1, argt);
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
			if (attempt == 0)
				known_keep(*idx, site,
						   SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
			SPI_freetuptable(SPI_tuptable);
			pgsync_as_caller(&us);
			site_remember(db, *idx, site);
			return PGS_OK;
		}
		SPI_freetuptable(SPI_tuptable);
	}
	/* lost a race with a concurrent insert that has committed by now */
	if (SPI_execute_plan(sel, arg, NULL, false, 1) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "pgsync: could not record site");
	*idx = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	known_keep(*idx, site, SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
	SPI_freetuptable(SPI_tuptable);
	pgsync_as_caller(&us);
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
	pgsync_user_save  us;
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
	known_ready(db);
	if ((e = hash_search(known_idx, &idx, HASH_FIND, NULL)) != NULL)
	{
		*site = site_remember(db, idx, e->site);
		return PGS_OK;
	}
	arg[0] = Int32GetDatum((int32) idx);
	pgsync_as_meta(&us);
	if (sel == NULL)
		sel = pgsync_plan_keep("SELECT site, xmin FROM pgsync.sites WHERE idx = $1", 1, argt);
	if (SPI_execute_plan(sel, arg, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "pgsync: reading pgsync.sites failed");
	pgsync_as_caller(&us);
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
		known_keep(idx, copy,
				   SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
		SPI_freetuptable(SPI_tuptable);
		*site = site_remember(db, idx, copy);
	}
	return PGS_OK;
}

/* ---- versions and clock ------------------------------------------------ */

pgs_rc
db_apply_version(db_conn *db, int64_t *ver, pgs_err *err)
{
	if (!db->have_ver)
	{
		pgsync_wrote_xid = GetTopFullTransactionId();
		db->ver = pgsync_txn_version();
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
	pgsync_hlc_observe(hlc);
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

	/*
	 * What pg_snapshot_xmin(pg_current_snapshot()) says, without a statement
	 * (a push asks it once): the active snapshot's xmin, widened to 64 bits
	 * by the epoch of the next xid, the epoch before when it has wrapped
	 * since (xid8funcs.c does the same).
	 */
	if (ActiveSnapshotSet())
	{
		FullTransactionId next = ReadNextFullTransactionId();
		TransactionId	  xmin = GetActiveSnapshot()->xmin;
		uint64			  epoch = EpochFromFullTransactionId(next);

		if (TransactionIdIsNormal(xmin))
		{
			if (xmin > XidFromFullTransactionId(next))
				epoch--;
			*until = (int64_t) (epoch << 32 | xmin) - 1;
			return PGS_OK;
		}
	}
	if (plan == NULL)
		plan =
			pgsync_plan_keep("SELECT pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot())"
							 "::pg_catalog.text::pg_catalog.int8 - 1",
							 0, NULL);
	if (SPI_execute_plan(plan, NULL, NULL, true, 1) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "pgsync: reading the snapshot failed");
	*until = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	SPI_freetuptable(SPI_tuptable);
	return PGS_OK;
}

/* pgsync_pk_datums converts the key values for the table's key types. */
Datum *
pgsync_pk_datums(db_table *t, const pgs_value *pk, int extra)
{
	Datum *d = palloc(sizeof(Datum) * (t->npk + extra + 1));
	int	   i;

	for (i = 0; i < t->npk; i++)
	{
		bool isnull;

		d[i] = pgsync_value_datum(&t->pk[i], &pk[i], &isnull, t, pk);
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

typedef struct keys_args
{
	db_table		*t;
	const pgs_value *pk;
	Datum			*out;
} keys_args;

static pgs_rc guarded(db_conn *db, void (*fn)(db_conn *, void *), void *arg, pgs_err *err);

static void
keys_fn(db_conn *db, void *arg)
{
	keys_args *k = arg;

	k->out = pgsync_pk_datums(k->t, k->pk, 0);
	pgsync_key_forms(k->t, k->pk, k->out); /* docs/TYPES.md, "Key columns" */
}

pgs_rc
db_clock_get(db_conn *db, db_table *t, const pgs_value *pk, bool *found, int64_t *cl,
			 const uint8_t **blob, size_t *blob_len, pgs_err *err)
{
	MemoryContext	 row = scratch(db);
	MemoryContext	 old = MemoryContextSwitchTo(row);
	keys_args		 ka = {t, pk, NULL};
	Datum			*d;
	pgsync_user_save us;
	int				 rc;
	int64			 dcl;
	bytea			*b = NULL;
	int				 f;

	/* a key this table cannot hold (text into an integer key) is that row's fate */
	if (guarded(db, keys_fn, &ka, err) != PGS_OK)
	{
		MemoryContextSwitchTo(old);
		return PGS_ERR_ROW;
	}
	d = ka.out;
	f = pgsync_clock_lookup_direct(t, d, &dcl, &b);

	if (f < 0)
	{
		pgsync_as_meta(&us);
		rc = SPI_execute_plan(pgsync_plan_clock_get(t), d, NULL, false, 1);
		pgsync_as_caller(&us);
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
	MemoryContext	 old = MemoryContextSwitchTo(scratch(db));
	Datum			*d = pgsync_pk_datums(t, pk, 5);
	bytea			*b = pgsync_bytea(CurrentMemoryContext, blob, blob_len);
	pgsync_user_save us;
	int				 rc;
	bool			 ok;

	d[t->npk] = Int64GetDatum(cl);
	d[t->npk + 1] = Int64GetDatum(ver);
	d[t->npk + 2] = PointerGetDatum(b);
	pgsync_lock_clock(t, pk);
	pgsync_as_meta(&us);
	if (exists && db->last_found)
	{
		d[t->npk + 3] = Int64GetDatum(db->last_cl);
		d[t->npk + 4] = PointerGetDatum(db->last_blob);
		rc = SPI_execute_plan(pgsync_plan_clock_cas(t), d, NULL, false, 0);
		if (rc != SPI_OK_UPDATE)
			elog(ERROR, "pgsync: writing the clock of %s failed", t->name);
		ok = SPI_processed == 1;
	}
	else if (pgsync_clock_insert_direct(t, d, cl, ver, b))
		ok = true; /* a new key: straight into heap and indexes */
	else
	{
		/* the key exists or is being written: let the executor wait for it */
		rc = SPI_execute_plan(pgsync_plan_clock_insnew(t), d, NULL, false, 0);
		if (rc != SPI_OK_INSERT)
			elog(ERROR, "pgsync: writing the clock of %s failed", t->name);
		ok = SPI_processed == 1;
	}
	pgsync_as_caller(&us);
	if (!ok)
	{
		pgsync_apply_conflict = true;
		ereport(ERROR, (errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
						errmsg("row %s of table %s was changed locally while a payload was applied",
							   pgsync_pk_text(t, pk), t->name),
						errhint("Apply the payload again.")));
	}
	MemoryContextSwitchTo(old);
	return PGS_OK;
}

/* ---- base rows ------------------------------------------------------------ */

/*
 * Row writes and every row's own fate. On the fast path a row write runs
 * directly: an error longjmps to sync_apply_payload, which, when the error
 * is one a row can cause (pgsync_row_error), rolls the attempt back and applies
 * again in careful mode. In careful mode every row write, with the
 * conversion of its values, runs in its own subtransaction: a failing row
 * comes back as PGS_ERR_ROW with its SQLSTATE and message, and the core
 * rejects it alone. A write that Postgres turns into "0 rows affected"
 * because row-level security hides the row is an error too (42501): a
 * change the role may not make never passes as applied.
 */

void
db_apply_careful(db_conn *db, bool careful)
{
	db->careful = careful;
}

bool
db_hold_rejected(db_conn *db)
{
	return false; /* the sending device keeps its change and is told */
}

typedef enum write_kind
{
	W_MERGE,
	W_REPLACE,
	W_DELETE
} write_kind;

typedef struct write_args
{
	db_table		  *t;
	write_kind		   kind;
	const pgs_value	  *pk;
	int				   n;
	const int		  *cols;
	const pgs_value	  *vals;
	pgsync_merge_plan *m;
} write_args;

/* row_exists: does the base row exist, whoever may see it? */
static bool
row_exists(db_table *t, Datum *keys)
{
	pgsync_user_save us;
	int				 rc;
	bool			 yes;

	pgsync_as_meta(&us);
	rc = SPI_execute_plan(pgsync_plan_row_exists(t), keys, NULL, false, 1);
	pgsync_as_caller(&us);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "pgsync: reading %s failed", t->name);
	yes = SPI_processed > 0;
	SPI_freetuptable(SPI_tuptable);
	return yes;
}

static void
hidden_row(db_table *t, const char *what)
{
	ereport(ERROR,
			(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
			 errmsg("row-level security prevents %s this row of table \"%s\"", what, t->name),
			 errdetail("The row exists, but the role's policies do not let it %s it.",
					   strcmp(what, "deleting") == 0 ? "delete" : "update")));
}

static void do_write_row(db_conn *db, write_args *w);

/* do_write converts the values and writes; ereports on any failure. The
 * capture trigger skips this row only (pgsync_apply_relid, pgsync_apply_key). */
static void
do_write(db_conn *db, write_args *w)
{
	Oid	   relid = pgsync_apply_relid;
	Datum *key = pgsync_apply_key;

	pgsync_apply_relid = w->t->relid;
	pgsync_apply_key = pgsync_pk_datums(w->t, w->pk, 0);
	PG_TRY();
	{
		do_write_row(db, w);
	}
	PG_FINALLY();
	{
		pgsync_apply_relid = relid;
		pgsync_apply_key = key;
	}
	PG_END_TRY();
}

static void
do_write_row(db_conn *db, write_args *w)
{
	db_table *t = w->t;
	Datum	 *vals;
	char	 *nulls;
	int		  i, rc;

	if (w->kind == W_DELETE)
	{
		vals = pgsync_pk_datums(t, w->pk, 0);
		rc = SPI_execute_plan(pgsync_plan_row_delete(t), vals, NULL, false, 0);
		if (rc != SPI_OK_DELETE)
			elog(ERROR, "pgsync: delete from %s failed", t->name);
		if (SPI_processed == 0 && row_exists(t, vals))
			hidden_row(t, "deleting");
		return;
	}
	if (w->kind == W_MERGE)
	{
		w->m = pgsync_table_merge_plan(t, w->n, w->cols);
		vals = pgsync_pk_datums(t, w->pk, w->n);
		nulls = palloc(t->npk + w->n + 1);
		memset(nulls, ' ', t->npk + w->n);
		for (i = 0; i < w->n; i++)
		{
			bool isnull;

			vals[t->npk + i] =
				pgsync_value_datum(&t->cols[w->cols[i]], &w->vals[i], &isnull, t, w->pk);
			nulls[t->npk + i] = isnull ? 'n' : ' ';
			if (pgsync_form_differs(&t->cols[w->cols[i]], &w->vals[i], vals[t->npk + i], isnull))
				db->forms[i] = db->forms_any = true;
		}
		rc = SPI_execute_plan(w->m->upd, vals, nulls, false, 0);
		if (rc != SPI_OK_UPDATE)
			elog(ERROR, "pgsync: update of %s failed", t->name);
		if (SPI_processed == 0)
		{
			/* absent, or hidden from the role: the upsert raises for a hidden row */
			rc = SPI_execute_plan(w->m->ins, vals, nulls, false, 0);
			if (rc != SPI_OK_INSERT)
				elog(ERROR, "pgsync: insert into %s failed", t->name);
			if (SPI_processed == 0 && row_exists(t, vals))
				hidden_row(t, "updating");
		}
		return;
	}
	/* a new life: the row is exactly these columns, the others null */
	vals = pgsync_pk_datums(t, w->pk, t->ncols);
	nulls = palloc(t->npk + t->ncols + 1);
	memset(nulls, ' ', t->npk);
	memset(nulls + t->npk, 'n', t->ncols);
	for (i = 0; i < w->n; i++)
	{
		bool isnull;
		int	 c = w->cols[i];

		vals[t->npk + c] = pgsync_value_datum(&t->cols[c], &w->vals[i], &isnull, t, w->pk);
		nulls[t->npk + c] = isnull ? 'n' : ' ';
		if (pgsync_form_differs(&t->cols[c], &w->vals[i], vals[t->npk + c], isnull))
			db->forms[i] = db->forms_any = true;
	}
	rc = SPI_execute_plan(pgsync_plan_row_replace(t), vals, nulls, false, 0);
	if (rc != SPI_OK_INSERT)
		elog(ERROR, "pgsync: insert into %s failed", t->name);
	if (SPI_processed == 0 && row_exists(t, vals))
		hidden_row(t, "updating");
}

/*
 * pgsync_row_error: is this error a row's own fate (its data, its constraints,
 * the role's rights on it, a trigger on it) rather than the transaction's
 * or the server's? Everything but: transaction rollback (40: serialization,
 * deadlock — the apply is retried whole), a lock not available (55P03: the
 * apply gave way or a lock wait was cut short, pg_lock.c; it waits and runs
 * again), insufficient resources (53),
 * operator intervention (57: cancel, shutdown), system errors (58), lost
 * connections (08), invalid transaction state (25), corrupted data or index
 * (XX001, XX002).
 */
bool
pgsync_row_error(int code)
{
	const char *s = unpack_sql_state(code);

	if (strncmp(s, "40", 2) == 0 || strncmp(s, "53", 2) == 0 || strncmp(s, "57", 2) == 0 ||
		strncmp(s, "58", 2) == 0 || strncmp(s, "08", 2) == 0 || strncmp(s, "25", 2) == 0 ||
		strcmp(s, "55P03") == 0 || strcmp(s, "XX001") == 0 || strcmp(s, "XX002") == 0)
		return false;
	return true;
}

/*
 * guarded runs fn(db, arg) in a subtransaction (careful mode); a row's error
 * comes back as PGS_ERR_ROW with err filled (code = SQLSTATE), others are
 * re-thrown. On the fast path it just runs fn.
 */
static pgs_rc
guarded(db_conn *db, void (*fn)(db_conn *, void *), void *arg, pgs_err *err)
{
	MemoryContext	cxt = CurrentMemoryContext;
	ResourceOwner	owner = CurrentResourceOwner;
	volatile pgs_rc rc = PGS_OK;

	if (!db->careful)
	{
		fn(db, arg);
		return PGS_OK;
	}
	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(cxt);
	PG_TRY();
	{
		fn(db, arg);
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
		if (!pgsync_row_error(ed->sqlerrcode) || pgsync_apply_conflict)
			ReThrowError(ed);
		memset(err, 0, sizeof(*err));
		err->rc = PGS_ERR_ROW;
		strlcpy(err->msg, ed->message ? ed->message : "row refused", sizeof(err->msg));
		if (ed->detail)
			strlcpy(err->detail, ed->detail, sizeof(err->detail));
		if (ed->hint)
			strlcpy(err->hint, ed->hint, sizeof(err->hint));
		else if (ed->sqlerrcode == ERRCODE_INSUFFICIENT_PRIVILEGE && ed->message &&
				 strncmp(ed->message, "permission denied for schema ", 29) == 0)
		{
			/* name the grant: the role is the caller's, the schema in the message */
			const char *role = GetUserNameFromId(GetUserId(), false);

			snprintf(err->hint, sizeof(err->hint), "GRANT USAGE ON SCHEMA %s TO %s;",
					 ed->message + 29, quote_identifier(role));
		}
		strlcpy(err->code, unpack_sql_state(ed->sqlerrcode), sizeof(err->code));
		FreeErrorData(ed);
		rc = PGS_ERR_ROW;
	}
	PG_END_TRY();
	return rc;
}

static void
write_fn(db_conn *db, void *arg)
{
	do_write(db, arg);
}

pgs_rc
db_row_write(db_conn *db, db_table *t, const pgs_value *pk, db_write_mode mode, int n,
			 const int *cols, const pgs_value *vals, pgs_err *err)
{
	MemoryContext old = MemoryContextSwitchTo(scratch(db));
	pgs_rc		  rc;
	write_args	  w = {.t = t,
					   .kind = mode == DB_WRITE_MERGE ? W_MERGE : W_REPLACE,
					   .pk = pk,
					   .n = n,
					   .cols = cols,
					   .vals = vals,
					   .m = NULL};

	if (n > db->forms_cap)
	{
		db->forms = MemoryContextAlloc(db->cxt, sizeof(bool) * n);
		db->forms_cap = n;
	}
	if (n > 0)
		memset(db->forms, 0, sizeof(bool) * n);
	db->forms_any = false;
	pgsync_lock_row(db, t, pk);
	rc = guarded(db, write_fn, &w, err);
	if (w.m && w.m->cols_key)
	{
		/* one-off plan (too many column sets): free it */
		SPI_freeplan(w.m->upd);
		SPI_freeplan(w.m->ins);
	}
	MemoryContextSwitchTo(old);
	return rc;
}

/* db_row_forms: pgsync_form_differs of each value of the last db_row_write */
bool
db_row_forms(db_conn *db, int n, bool *differs)
{
	if (!db->forms_any)
		return false;
	memcpy(differs, db->forms, sizeof(bool) * n);
	return true;
}

pgs_rc
db_row_delete(db_conn *db, db_table *t, const pgs_value *pk, pgs_err *err)
{
	MemoryContext old = MemoryContextSwitchTo(scratch(db));
	write_args	  w = {.t = t, .kind = W_DELETE, .pk = pk};
	pgs_rc		  rc;

	pgsync_lock_row(db, t, pk);
	rc = guarded(db, write_fn, &w, err);

	MemoryContextSwitchTo(old);
	return rc;
}

/* db_row_forget: Postgres is not a device, but a payload may still say so. */
static void
forget_fn(db_conn *db, void *arg)
{
	write_args		*w = arg;
	Datum			*vals = pgsync_pk_datums(w->t, w->pk, 0);
	pgsync_user_save us;
	StringInfoData	 b;

	if (SPI_execute_plan(pgsync_plan_row_delete(w->t), vals, NULL, false, 0) != SPI_OK_DELETE)
		elog(ERROR, "pgsync: forgetting a row of %s failed", w->t->name);
	initStringInfo(&b);
	appendStringInfo(&b, "DELETE FROM %s WHERE ", w->t->q_clock);
	for (int i = 0; i < w->t->npk; i++)
		appendStringInfo(&b, "%s%s OPERATOR(pg_catalog.=) $%d", i ? " AND " : "",
						 quote_identifier(w->t->pk[i].name), i + 1);
	pgsync_as_meta(&us);
	if (SPI_execute_with_args(b.data, w->t->npk, w->t->pk_types, vals, NULL, false, 0) !=
		SPI_OK_DELETE)
		elog(ERROR, "pgsync: forgetting a clock of %s failed", w->t->name);
	pgsync_as_caller(&us);
}

pgs_rc
db_row_forget(db_conn *db, db_table *t, const pgs_value *pk, bool *forgot, pgs_err *err)
{
	MemoryContext old = MemoryContextSwitchTo(scratch(db));
	write_args	  w = {.t = t, .kind = W_DELETE, .pk = pk};
	pgs_rc		  rc;

	pgsync_lock_row(db, t, pk);
	rc = guarded(db, forget_fn, &w, err);

	MemoryContextSwitchTo(old);
	*forgot = rc == PGS_OK;
	return rc == PGS_ERR_ROW ? PGS_OK : rc;
}

/* db_snapshot: Postgres pulls from no one as a device: snapshots are ignored. */
pgs_rc
db_snapshot(db_conn *db, db_table *t, db_snap_op op, const pgs_value *pk, int64_t *forgot,
			pgs_err *err)
{
	return PGS_OK;
}

void
db_reject(db_conn *db, db_table *t, const pgs_value *pk, const pgs_err *why)
{
	MemoryContext old = MemoryContextSwitchTo(scratch(db));

	pgsync_reject_add(t->name, pgsync_pk_json(t, pk), why->code[0] ? why->code : "42501", why->msg);
	db->rejected++;
	MemoryContextSwitchTo(old);
}

/*
 * db_table_parents: synced tables t references by foreign keys. From the
 * relcache's foreign-key list (kept current by relcache invalidation), not
 * a catalog query: every apply asks, for every table of its payload.
 */
pgs_rc
db_table_parents(db_conn *db, db_table *t, db_table ***parents, int *n, pgs_err *err)
{
	Relation   rel = table_open(t->relid, AccessShareLock);
	List	  *fks = RelationGetFKeyList(rel);
	Oid		  *rels = palloc(sizeof(Oid) * (list_length(fks) + 1));
	int		   nrels = 0;
	db_table **out;
	ListCell  *lc;

	foreach (lc, fks)
	{
		ForeignKeyCacheInfo *fk = lfirst(lc);
		bool				 seen = fk->confrelid == t->relid;

		for (int k = 0; k < nrels && !seen; k++)
			seen = rels[k] == fk->confrelid;
		if (!seen)
			rels[nrels++] = fk->confrelid;
	}
	table_close(rel, NoLock);
	out = MemoryContextAlloc(db->cxt, sizeof(db_table *) * (nrels + 1));
	*n = 0;
	for (int k = 0; k < nrels; k++)
	{
		db_table *p = pgsync_table_get(rels[k], true);

		if (p)
			out[(*n)++] = p;
	}
	*parents = out;
	return PGS_OK;
}

/* ---- held changes ---------------------------------------------------------- */

pgs_rc
db_held_get(db_conn *db, pgs_name table, pgs_name key, const uint8_t **frag, size_t *len,
			pgs_err *err)
{
	Oid				 types[2] = {TEXTOID, BYTEAOID};
	Datum			 vals[2];
	pgsync_user_save us;
	MemoryContext	 old = MemoryContextSwitchTo(scratch(db));

	vals[0] = PointerGetDatum(cstring_to_text_with_len((const char *) table.p, (int) table.len));
	vals[1] = PointerGetDatum(pgsync_bytea(CurrentMemoryContext, key.p, key.len));
	pgsync_as_meta(&us);
	if (SPI_execute_with_args("SELECT frag FROM pgsync.held WHERE tbl = $1 AND k = $2", 2, types,
							  vals, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "pgsync: reading pgsync.held failed");
	pgsync_as_caller(&us);
	*frag = NULL;
	*len = 0;
	if (SPI_processed == 1)
	{
		bool   isnull;
		bytea *b = DatumGetByteaPCopy(
			SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));

		*frag = (const uint8_t *) VARDATA(b);
		*len = VARSIZE(b) - VARHDRSZ;
	}
	SPI_freetuptable(SPI_tuptable);
	MemoryContextSwitchTo(old);
	return PGS_OK;
}

pgs_rc
db_held_put(db_conn *db, pgs_name table, pgs_name key, const char *code, const char *message,
			const uint8_t *frag, size_t len, pgs_err *err)
{
	Oid				 types[5] = {TEXTOID, BYTEAOID, TEXTOID, TEXTOID, BYTEAOID};
	Datum			 vals[5];
	pgsync_user_save us;
	MemoryContext	 old = MemoryContextSwitchTo(scratch(db));
	int				 rc;

	vals[0] = PointerGetDatum(cstring_to_text_with_len((const char *) table.p, (int) table.len));
	vals[1] = PointerGetDatum(pgsync_bytea(CurrentMemoryContext, key.p, key.len));
	pgsync_as_meta(&us);
	if (frag)
	{
		vals[2] = CStringGetTextDatum(code ? code : "");
		vals[3] = CStringGetTextDatum(message ? message : "");
		vals[4] = PointerGetDatum(pgsync_bytea(CurrentMemoryContext, frag, len));
		rc = SPI_execute_with_args(
			"INSERT INTO pgsync.held (tbl, k, code, message, frag) VALUES ($1, $2, $3, $4, $5) "
			"ON CONFLICT (tbl, k) DO UPDATE SET code = excluded.code, message = excluded.message, "
			"frag = excluded.frag, last_at = now(), attempts = pgsync.held.attempts + 1",
			5, types, vals, NULL, false, 0);
	}
	else
		rc = SPI_execute_with_args("DELETE FROM pgsync.held WHERE tbl = $1 AND k = $2", 2, types,
								   vals, NULL, false, 0);
	pgsync_as_caller(&us);
	if (rc < 0)
		elog(ERROR, "pgsync: writing pgsync.held failed");
	MemoryContextSwitchTo(old);
	return PGS_OK;
}

/* ---- one row as the caller may see it ------------------------------------- */

pgs_rc
db_row_read(db_conn *db, db_table *t, const pgs_value *pk, bool *visible, int64_t *cl,
			const uint8_t **blob, size_t *blob_len, const pgs_value **cols, pgs_err *err)
{
	MemoryContext  old = MemoryContextSwitchTo(scratch(db));
	Datum		  *keys = pgsync_pk_datums(t, pk, 0);
	Datum		  *arrays = palloc(sizeof(Datum) * t->npk);
	pgs_value	  *vals = palloc(sizeof(pgs_value) * Max(t->ncols, 1));
	bool		   found;
	int64_t		   dcl;
	const uint8_t *b;
	size_t		   bl;
	pgs_rc		   rc;

	*visible = false;
	if (!pgsync_key_canonical(t, pk, keys))
	{
		/* not a key Postgres stores (docs/TYPES.md, "Key columns"): that row is
		 * absent here, even when the converted key names another one */
		MemoryContextSwitchTo(old);
		return PGS_OK;
	}
	for (int i = 0; i < t->npk; i++)
	{
		int16 typlen;
		bool  typbyval;
		char  typalign;

		get_typlenbyvalalign(t->pk[i].basetyp, &typlen, &typbyval, &typalign);
		arrays[i] = PointerGetDatum(
			construct_array(&keys[i], 1, t->pk[i].basetyp, typlen, typbyval, typalign));
	}
	/* the base row as the caller: privileges and row-level security decide */
	if (SPI_execute_plan(pgsync_plan_probe(t, false), arrays, NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "pgsync: reading a row of %s failed", t->name);
	if (SPI_processed == 1)
	{
		HeapTuple tup = SPI_tuptable->vals[0];
		TupleDesc td = SPI_tuptable->tupdesc;

		for (int i = 0; i < t->ncols; i++)
		{
			bool  isnull;
			Datum d = SPI_getbinval(tup, td, t->npk + 1 + i, &isnull);

			pgsync_datum_value(&t->cols[i], d, isnull, &vals[i]);
		}
		*visible = true;
	}
	MemoryContextSwitchTo(old);
	if (!*visible)
		return PGS_OK;
	/* its clock as the metadata owner (scratch is reset by db_clock_get:
	 * the values were converted into memory it does not own) */
	old = MemoryContextSwitchTo(db->cxt);
	{
		pgs_value *copy = palloc(sizeof(pgs_value) * Max(t->ncols, 1));

		for (int i = 0; i < t->ncols; i++)
		{
			copy[i] = vals[i];
			if (vals[i].type == PGS_TEXT || vals[i].type == PGS_BLOB)
			{
				uint8_t *p = palloc(vals[i].len + 1);

				memcpy(p, vals[i].v.p, vals[i].len);
				copy[i].v.p = p;
			}
		}
		vals = copy;
	}
	MemoryContextSwitchTo(old);
	if ((rc = db_clock_get(db, t, pk, &found, &dcl, &b, &bl, err)) != PGS_OK)
		return rc;
	if (!found || !(dcl & 1))
	{
		*visible = false;
		return PGS_OK;
	}
	*cl = dcl;
	*blob = b;
	*blob_len = bl;
	*cols = vals;
	return PGS_OK;
}
