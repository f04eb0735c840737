/*
 * pg_session.c — what every file of pg_ext shares for one backend and one
 * call, at the bottom of the extension (it calls nothing of it): the core's
 * allocator bound to palloc in the call's memory context, the one mapper of
 * core errors to ereport (pgsync_raise), switching to the metadata owner and
 * back (pgsync_as_meta, pgsync_as_caller), a call's db_conn (pgsync_conn_init), the
 * state of the running apply (pgsync_applying, pgsync_apply_relid, pgsync_apply_key,
 * pgsync_apply_conflict) and the rows it refused (pgsync_reject_add, for
 * sync_rejections()).
 */
#include "pg_internal.h"

#include "catalog/namespace.h"
#include "storage/lmgr.h"
#include "utils/inval.h"
#include "miscadmin.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/syscache.h"
#include "utils/uuid.h"

/* pgsync.record_interval (defined in _PG_init): see pg_view.c, device_view */
int pgsync_record_interval = 60;

bool   pgsync_applying = false;
Oid	   pgsync_apply_relid = InvalidOid;
Datum *pgsync_apply_key = NULL;
bool   pgsync_apply_conflict = false;

static MemoryContext core_cxt = NULL;
static MemoryContext reject_cxt = NULL;
static List			*rejections = NIL;
static uint64		 call_counter = 0;
static Oid			 meta_owner = InvalidOid;
static Oid			 meta_owner_of = InvalidOid; /* the pgsync.sites it was read from */

/* ---- allocator hooks --------------------------------------------------- */

static void *
core_malloc(size_t n)
{
	return MemoryContextAllocExtended(core_cxt ? core_cxt : CurrentMemoryContext, n ? n : 1,
									  MCXT_ALLOC_HUGE | MCXT_ALLOC_NO_OOM);
}

static void *
core_realloc(void *p, size_t n)
{
	if (p == NULL)
		return core_malloc(n);
	return repalloc_huge(p, n ? n : 1);
}

static void
core_free(void *p)
{
	if (p != NULL)
		pfree(p);
}

/* pgsync_core_memory makes the core allocate in cxt until the next call. */
void
pgsync_core_memory(MemoryContext cxt)
{
	core_cxt = cxt;
}

/* pgsync_session_setup: once per backend (_PG_init): the core allocates through palloc. */
void
pgsync_session_setup(void)
{
	static const pgs_allocator a = {core_malloc, core_realloc, core_free};

	pgs_set_allocator(&a);
}

/* ---- errors --------------------------------------------------------------- */

/*
 * pgsync_raise turns a core error into ereport(ERROR); the only mapper from
 * pgs_rc to SQLSTATE.
 */
void
pgsync_raise(const pgs_err *err)
{
	int code;

	switch (err->rc)
	{
		case PGS_ERR_MISUSE:
			code = ERRCODE_INVALID_PARAMETER_VALUE;
			break;
		case PGS_ERR_CORRUPT:
			code = ERRCODE_INVALID_BINARY_REPRESENTATION;
			break;
		case PGS_ERR_VERSION:
			code = ERRCODE_FEATURE_NOT_SUPPORTED;
			break;
		case PGS_ERR_TOO_BIG:
			code = ERRCODE_PROGRAM_LIMIT_EXCEEDED;
			break;
		case PGS_ERR_NOMEM:
			code = ERRCODE_OUT_OF_MEMORY;
			break;
		case PGS_ERR_SCHEMA:
			code = ERRCODE_UNDEFINED_OBJECT;
			break;
		case PGS_ERR_VALUE:
			code = ERRCODE_INVALID_TEXT_REPRESENTATION;
			break;
		case PGS_ERR_PERMISSION:
			code = ERRCODE_INSUFFICIENT_PRIVILEGE;
			break;
		default:
			code = ERRCODE_INTERNAL_ERROR;
			break;
	}
	ereport(ERROR, (errcode(code), errmsg("%s", err->msg[0] ? err->msg : "pgsync error"),
					err->detail[0] ? errdetail("%s", err->detail) : 0,
					err->hint[0] ? errhint("%s", err->hint) : 0));
	pg_unreachable();
}

/* ---- users ---------------------------------------------------------------- */

/*
 * pgsync_meta_relid: the relid of pgsync.name (a table or sequence of the
 * metadata), InvalidOid when it or the schema is missing. Looked up as
 * RangeVarGetRelid looks up a name it is about to use, without its check of
 * the caller's USAGE on the schema (the caller is usually not allowed in
 * pgsync's schema): with AccessShareLock, held to the end of the
 * transaction as a statement reading the table would hold it. Taking the
 * lock takes in the invalidations other backends committed meanwhile, so a
 * DROP and CREATE EXTENSION that committed while this statement ran gives
 * the new relid, never the old one the syscache still had; a name that now
 * names another relation is looked up again.
 */
Oid
pgsync_meta_relid(const char *name)
{
	Oid locked = InvalidOid;

	AcceptInvalidationMessages(); /* a name not found must not be an old miss */
	for (;;)
	{
		Oid nsp = get_namespace_oid("pgsync", true);
		Oid rel = OidIsValid(nsp) ? get_relname_relid(name, nsp) : InvalidOid;

		if (rel == locked)
			return rel;
		if (OidIsValid(locked))
			UnlockRelationOid(locked, AccessShareLock);
		if (!OidIsValid(rel))
			return InvalidOid;
		LockRelationOid(rel, AccessShareLock);
		locked = rel;
	}
}

/*
 * pgsync_meta_owner: the owner of pgsync.sites, who owns all sync metadata. It
 * is asked for every statement pgsync runs as that owner, so it is kept;
 * pgsync_conn_init (every SQL function's first step) forgets it when
 * pgsync.sites is another table (the extension dropped and created again,
 * perhaps by another role).
 */
Oid
pgsync_meta_owner(void)
{
	if (!OidIsValid(meta_owner))
	{
		Oid		  rel = pgsync_meta_relid("sites");
		HeapTuple tup;

		if (!OidIsValid(rel))
			ereport(
				ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("pgsync metadata is missing"),
				 errhint(
					 "Recreate the extension: DROP EXTENSION pgsync; CREATE EXTENSION pgsync.")));
		tup = SearchSysCache1(RELOID, ObjectIdGetDatum(rel));
		if (!HeapTupleIsValid(tup))
			elog(ERROR, "cache lookup failed for relation %u", rel);
		meta_owner = ((Form_pg_class) GETSTRUCT(tup))->relowner;
		meta_owner_of = rel;
		ReleaseSysCache(tup);
	}
	return meta_owner;
}

/* pgsync_as_meta switches to the metadata owner; pgsync_as_caller switches back.
 * An ERROR in between is safe: transaction abort restores the user. */
void
pgsync_as_meta(pgsync_user_save *s)
{
	Oid owner = pgsync_meta_owner();

	GetUserIdAndSecContext(&s->user, &s->sec);
	SetUserIdAndSecContext(owner, s->sec | SECURITY_LOCAL_USERID_CHANGE);
}

void
pgsync_as_caller(const pgsync_user_save *s)
{
	SetUserIdAndSecContext(s->user, s->sec);
}

/* pgsync_plan_keep prepares sql for the rest of the backend's life (SPI_keepplan):
 * the statements pgsync runs on every call are parsed and planned once. */
SPIPlanPtr
pgsync_plan_keep(const char *sql, int nargs, Oid *types)
{
	SPIPlanPtr p = SPI_prepare(sql, nargs, types);

	if (p == NULL)
		elog(ERROR, "pgsync: preparing \"%s\" failed: %s", sql, SPI_result_code_string(SPI_result));
	SPI_keepplan(p);
	return p;
}

/* ---- per-call state --------------------------------------------------- */

/* pgsync_conn_init fills db for one call; SPI must be connected. What a backend
 * keeps of pgsync.sites (this database's site id, the sites it has read)
 * belongs to the table's relid (db->sites_relid): the extension dropped and
 * created again has a new one, and site ids of its own. */
void
pgsync_conn_init(db_conn *db, MemoryContext cxt)
{
	static SPIPlanPtr plan = NULL;
	/* this database's site id: row idx 0, written once by CREATE EXTENSION */
	static Oid		 own_relid = InvalidOid;
	static uint8	 own_site[PGS_SITE_LEN];
	Oid				 relid = pgsync_meta_relid("sites");
	pgsync_user_save us;
	bool			 isnull;
	Datum			 d;
	int				 rc;

	memset(db, 0, sizeof(*db));
	db->cxt = cxt;
	db->call_id = ++call_counter;
	db->sites_relid = relid;
	if (relid != meta_owner_of)
		meta_owner = InvalidOid; /* another extension's: its owner is read again */
	if (OidIsValid(relid) && relid == own_relid)
	{
		memcpy(db->site, own_site, PGS_SITE_LEN);
		return;
	}
	pgsync_as_meta(&us);
	/* prepared once: parsing and planning it cost as much as a small apply */
	if (plan == NULL)
		plan = pgsync_plan_keep("SELECT site FROM pgsync.sites WHERE idx = 0", 0, NULL);
	rc = SPI_execute_plan(plan, NULL, NULL, false, 1);
	pgsync_as_caller(&us);
	if (rc != SPI_OK_SELECT || SPI_processed != 1)
		ereport(
			ERROR,
			(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE), errmsg("pgsync site id is missing"),
			 errhint("Recreate the extension: DROP EXTENSION pgsync; CREATE EXTENSION pgsync.")));
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	memcpy(db->site, DatumGetUUIDP(d)->data, PGS_SITE_LEN);
	SPI_freetuptable(SPI_tuptable);
	/* a CREATE EXTENSION that rolls back takes its relid with it */
	memcpy(own_site, db->site, PGS_SITE_LEN);
	own_relid = relid;
}

/* ---- rejections ----------------------------------------------------------- */

/* pgsync_reject_reset: a new apply starts with no rejections. */
void
pgsync_reject_reset(void)
{
	if (reject_cxt == NULL)
		reject_cxt =
			AllocSetContextCreate(TopMemoryContext, "pgsync rejections", ALLOCSET_SMALL_SIZES);
	else
		MemoryContextReset(reject_cxt);
	rejections = NIL;
}

/* pgsync_reject_add records one refused row of the running apply. */
void
pgsync_reject_add(const char *table, const char *pk_json, const char *sqlstate, const char *message)
{
	MemoryContext	  old;
	pgsync_rejection *r;

	if (reject_cxt == NULL)
		pgsync_reject_reset();
	old = MemoryContextSwitchTo(reject_cxt);
	r = palloc0(sizeof(pgsync_rejection));
	r->table = pstrdup(table);
	r->pk_json = pstrdup(pk_json);
	strlcpy(r->sqlstate, sqlstate, sizeof(r->sqlstate));
	r->message = pstrdup(message);
	rejections = lappend(rejections, r);
	MemoryContextSwitchTo(old);
}

/* pgsync_rejections: the rows the last apply of this backend refused (pgsync_rejection). */
List *
pgsync_rejections(void)
{
	return rejections;
}
