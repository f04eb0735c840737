/*
 * pgsync.c — the SQL-callable functions of the pgsync PostgreSQL extension.
 *
 * Each wrapper converts its arguments, sets up one memory context for the
 * core (the core allocates only through pgs_malloc, bound here to palloc in
 * that context, so an ERROR anywhere frees everything), calls one core
 * function and maps a failing pgs_rc through pg_raise(), the one place where
 * core errors become ereport(ERROR).
 *
 * SQL name = C name: sync_apply_payload in SQL is sync_apply_payload here.
 */
#include "pg_internal.h"

#include "access/xact.h"
#include "access/transam.h"
#include "catalog/namespace.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/syscache.h"
#include "utils/uuid.h"

PG_MODULE_MAGIC;

/* Key of the advisory lock that serializes applies (pgsync in ASCII). */
#define PGSYNC_APPLY_LOCK_KEY INT64CONST(0x7067737970706c79)

bool   pg_applying = false;
Oid	   pg_apply_relid = InvalidOid;
Datum *pg_apply_key = NULL;
bool pg_apply_conflict = false;

static MemoryContext core_cxt = NULL;
static MemoryContext reject_cxt = NULL;
static List			*rejections = NIL;
static uint64		 call_counter = 0;
static Oid			 meta_owner = InvalidOid;

typedef struct pg_rejection
{
	char *table;
	char *pk_json;
	char  sqlstate[6];
	char *message;
} pg_rejection;

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

/* pg_core_memory makes the core allocate in cxt until the next call. */
void
pg_core_memory(MemoryContext cxt)
{
	core_cxt = cxt;
}

static void
pgsync_xact_cb(XactEvent event, void *arg)
{
	if (event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_ABORT ||
		event == XACT_EVENT_COMMIT || event == XACT_EVENT_PARALLEL_COMMIT ||
		event == XACT_EVENT_PREPARE)
	{
		pg_applying = false;
		core_cxt = NULL;
		pg_table_release_all();
		pg_device_reset();
	}
}

void _PG_init(void);

/* pgsync.record_interval: see pg_view.c, device_view */
int pg_record_interval = 60;

void
_PG_init(void)
{
	static const pgs_allocator a = {core_malloc, core_realloc, core_free};

	DefineCustomIntVariable(
		"pgsync.record_interval",
		"How often a pull records how far its device has synced (the GC horizon).",
		"A device's acknowledged cursor (pgsync.devices.acked) is written at most once per "
		"interval, and last_seen once a minute; 0 records every pull that moves it. A longer "
		"interval only holds the GC horizon back; every record is a write, which moves "
		"sync_db_version().",
		&pg_record_interval, 60, 0, 86400, PGC_SUSET, GUC_UNIT_S, NULL, NULL, NULL);
	MarkGUCPrefixReserved("pgsync");
	pgs_set_allocator(&a);
	RegisterXactCallback(pgsync_xact_cb, NULL);
	pg_table_cache_setup();
}

/* ---- errors --------------------------------------------------------------- */

/*
 * pg_raise turns a core error into ereport(ERROR); the only mapper from
 * pgs_rc to SQLSTATE.
 */
void
pg_raise(const pgs_err *err)
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

/* pg_meta_owner: the owner of pgsync.sites, who owns all sync metadata. */
Oid
pg_meta_owner(void)
{
	if (!OidIsValid(meta_owner))
	{
		Oid		  nsp = get_namespace_oid("pgsync", false);
		Oid		  rel = get_relname_relid("sites", nsp);
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
		ReleaseSysCache(tup);
	}
	return meta_owner;
}

/* pg_as_meta switches to the metadata owner; pg_as_caller switches back.
 * An ERROR in between is safe: transaction abort restores the user. */
void
pg_as_meta(pg_user_save *s)
{
	Oid owner = pg_meta_owner();

	GetUserIdAndSecContext(&s->user, &s->sec);
	SetUserIdAndSecContext(owner, s->sec | SECURITY_LOCAL_USERID_CHANGE);
}

void
pg_as_caller(const pg_user_save *s)
{
	SetUserIdAndSecContext(s->user, s->sec);
}

/* ---- per-call state --------------------------------------------------- */

/* pg_conn_init fills db for one call; SPI must be connected. */
void
pg_conn_init(db_conn *db, MemoryContext cxt)
{
	pg_user_save us;
	bool		 isnull;
	Datum		 d;
	int			 rc;

	memset(db, 0, sizeof(*db));
	db->cxt = cxt;
	db->call_id = ++call_counter;
	pg_as_meta(&us);
	rc = SPI_execute("SELECT site FROM pgsync.sites WHERE idx = 0", false, 1);
	pg_as_caller(&us);
	if (rc != SPI_OK_SELECT || SPI_processed != 1)
		ereport(
			ERROR,
			(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE), errmsg("pgsync site id is missing"),
			 errhint("Recreate the extension: DROP EXTENSION pgsync; CREATE EXTENSION pgsync.")));
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	memcpy(db->site, DatumGetUUIDP(d)->data, PGS_SITE_LEN);
	SPI_freetuptable(SPI_tuptable);
}

static MemoryContext
call_context(void)
{
	MemoryContext cxt =
		AllocSetContextCreate(CurrentMemoryContext, "pgsync call", ALLOCSET_DEFAULT_SIZES);

	pg_core_memory(cxt);
	return cxt;
}

static void
call_done(MemoryContext cxt)
{
	pg_core_memory(NULL);
	MemoryContextDelete(cxt);
}

/* ---- rejections ----------------------------------------------------------- */

static void
reject_reset(void)
{
	if (reject_cxt == NULL)
		reject_cxt =
			AllocSetContextCreate(TopMemoryContext, "pgsync rejections", ALLOCSET_SMALL_SIZES);
	else
		MemoryContextReset(reject_cxt);
	rejections = NIL;
}

/* pg_reject_add records one refused row of the running apply. */
void
pg_reject_add(const char *table, const char *pk_json, const char *sqlstate, const char *message)
{
	MemoryContext old;
	pg_rejection *r;

	if (reject_cxt == NULL)
		reject_reset();
	old = MemoryContextSwitchTo(reject_cxt);
	r = palloc0(sizeof(pg_rejection));
	r->table = pstrdup(table);
	r->pk_json = pstrdup(pk_json);
	strlcpy(r->sqlstate, sqlstate, sizeof(r->sqlstate));
	r->message = pstrdup(message);
	rejections = lappend(rejections, r);
	MemoryContextSwitchTo(old);
}

/* ---- SQL functions ---------------------------------------------------------- */

PG_FUNCTION_INFO_V1(sync_init);
PG_FUNCTION_INFO_V1(sync_alter);
PG_FUNCTION_INFO_V1(sync_rowclock_drop);
PG_FUNCTION_INFO_V1(sync_cleanup);
PG_FUNCTION_INFO_V1(sync_site_id);
PG_FUNCTION_INFO_V1(sync_db_version);
PG_FUNCTION_INFO_V1(sync_payload);
PG_FUNCTION_INFO_V1(sync_payload_until);
PG_FUNCTION_INFO_V1(sync_payload_cursor);
PG_FUNCTION_INFO_V1(sync_apply_payload);
PG_FUNCTION_INFO_V1(sync_payload_info);
PG_FUNCTION_INFO_V1(sync_rejections);
PG_FUNCTION_INFO_V1(sync_uuid);
PG_FUNCTION_INFO_V1(sync_version);

static void
require_owner(Oid relid)
{
	if (!object_ownercheck(RelationRelationId, relid, GetUserId()))
		ereport(ERROR, (errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
						errmsg("must be owner of table %s", get_rel_name(relid))));
}

/*
 * apply_held: changes held while the table (or a column) was unknown here
 * fill in now: each held fragment leaves pgsync.held and is applied; what
 * still cannot be stored is held again by the apply. SPI connected.
 */
static void
apply_held(Oid relid, MemoryContext cxt)
{
	db_table	*t = pg_table_get(relid, false);
	Oid			 types[1] = {TEXTOID};
	Datum		 vals[1] = {CStringGetTextDatum(t->name)};
	pg_user_save us;
	uint64		 n;
	bytea	   **frags;

	pg_as_meta(&us);
	if (SPI_execute_with_args("DELETE FROM pgsync.held WHERE tbl = $1 RETURNING frag", 1, types,
							  vals, NULL, false, 0) != SPI_OK_DELETE_RETURNING)
		elog(ERROR, "pgsync: reading pgsync.held failed");
	pg_as_caller(&us);
	n = SPI_processed;
	frags = palloc(sizeof(bytea *) * (n + 1));
	for (uint64 i = 0; i < n; i++)
	{
		bool isnull;

		frags[i] = DatumGetByteaPCopy(
			SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1, &isnull));
	}
	SPI_freetuptable(SPI_tuptable);
	for (uint64 i = 0; i < n; i++)
	{
		db_conn			db;
		pgs_apply_stats st;
		pgs_err			err;

		pg_conn_init(&db, cxt);
		pg_applying = true;
		if (pgs_apply(&db, (const uint8_t *) VARDATA(frags[i]), VARSIZE(frags[i]) - VARHDRSZ, true,
					  &st, &err) != PGS_OK)
		{
			pg_applying = false;
			pg_raise(&err);
		}
		pg_applying = false;
	}
}

/*
 * sync_init(tbl regclass, algo text, name text, allow_sequence_keys bool):
 * start syncing a table, or sync its new columns.
 */
Datum
sync_init(PG_FUNCTION_ARGS)
{
	Oid			  relid;
	char		 *algo = PG_ARGISNULL(1) ? "cls" : text_to_cstring(PG_GETARG_TEXT_PP(1));
	char		 *name = PG_NARGS() > 2 && !PG_ARGISNULL(2) ? text_to_cstring(PG_GETARG_TEXT_PP(2))
															: NULL;
	bool		  allow_seq = PG_NARGS() > 3 && !PG_ARGISNULL(3) && PG_GETARG_BOOL(3);
	db_algo		  a;
	MemoryContext cxt;

	if (PG_ARGISNULL(0))
		ereport(ERROR, (errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
						errmsg("sync_init needs a table"), errhint("Pass the table's name.")));
	relid = PG_GETARG_OID(0);

	if (strcmp(algo, "cls") == 0)
		a = DB_ALGO_CLS;
	else if (strcmp(algo, "gset") == 0)
		a = DB_ALGO_GSET;
	else
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("unknown sync algorithm \"%s\"", algo),
				 errhint("Use 'cls' (rows can be updated and deleted) or 'gset' (insert only).")));
	require_owner(relid);
	cxt = call_context();
	SPI_connect();
	pg_table_init(relid, a, get_func_namespace(fcinfo->flinfo->fn_oid), name, allow_seq);
	apply_held(relid, cxt);
	SPI_finish();
	call_done(cxt);
	PG_RETURN_VOID();
}

/* alter_verb: the clause sync_alter runs, or NULL (ADD, DROP, RENAME [COLUMN]) */
static const char *
alter_verb(const char *cmd)
{
	static const char *const verbs[] = {"add", "drop", "rename"};

	while (*cmd == ' ' || *cmd == '\t' || *cmd == '\n')
		cmd++;
	for (int i = 0; i < 3; i++)
	{
		size_t n = strlen(verbs[i]);

		if (pg_strncasecmp(cmd, verbs[i], n) == 0 && (cmd[n] == ' ' || cmd[n] == '\t'))
		{
			const char *rest = cmd + n;

			while (*rest == ' ' || *rest == '\t')
				rest++;
			/* RENAME TO (the table) and ADD/DROP CONSTRAINT are not column changes */
			if (pg_strncasecmp(rest, "constraint", 10) == 0 ||
				(i == 2 && pg_strncasecmp(rest, "to ", 3) == 0))
				return NULL;
			return verbs[i];
		}
	}
	return NULL;
}

/*
 * sync_alter(tbl regclass, command text): ALTER TABLE tbl command, for
 * ADD COLUMN (synced at once), DROP COLUMN, RENAME COLUMN. On Postgres the
 * event trigger keeps the clocks right for a plain ALTER TABLE too; this is
 * the call both engines share (docs/MIGRATIONS.md).
 */
Datum
sync_alter(PG_FUNCTION_ARGS)
{
	Oid			   relid = PG_GETARG_OID(0);
	char		  *cmd = text_to_cstring(PG_GETARG_TEXT_PP(1));
	const char	  *verb = alter_verb(cmd);
	StringInfoData b;
	MemoryContext  cxt;
	db_algo		   algo;

	if (!verb || strchr(cmd, ';'))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("sync_alter cannot run \"%s\"", cmd),
				 errhint("Pass one column change: 'ADD COLUMN name type ...', 'DROP COLUMN name' "
						 "or 'RENAME COLUMN old TO new' (docs/MIGRATIONS.md).")));
	require_owner(relid);
	cxt = call_context();
	SPI_connect();
	algo = pg_table_get(relid, false)->algo; /* a synced table */
	initStringInfo(&b);
	appendStringInfo(&b, "ALTER TABLE %s %s",
					 quote_qualified_identifier(get_namespace_name(get_rel_namespace(relid)),
												get_rel_name(relid)),
					 cmd);
	if (SPI_execute(b.data, false, 0) != SPI_OK_UTILITY)
		elog(ERROR, "pgsync: \"%s\" failed", b.data);
	CommandCounterIncrement();
	if (strcmp(verb, "add") == 0)
	{
		pg_table_init(relid, algo, get_func_namespace(fcinfo->flinfo->fn_oid), NULL, false);
		apply_held(relid, cxt);
	}
	SPI_finish();
	call_done(cxt);
	PG_RETURN_VOID();
}

/* pgsync.rowclock_drop(clk bytea, ncols int, col int): a blob without one column. */
Datum
sync_rowclock_drop(PG_FUNCTION_ARGS)
{
	bytea  *in = PG_GETARG_BYTEA_PP(0);
	pgs_buf out;
	pgs_err err;
	bytea  *res;

	pgs_buf_init(&out);
	if (pgs_rowclock_drop_col((const uint8_t *) VARDATA_ANY(in), VARSIZE_ANY_EXHDR(in),
							  PG_GETARG_INT32(1), PG_GETARG_INT32(2), &out, &err) != PGS_OK)
		pg_raise(&err);
	res = pg_bytea(CurrentMemoryContext, out.p, out.len);
	pgs_buf_free(&out);
	PG_RETURN_BYTEA_P(res);
}

/* sync_cleanup(tbl regclass): stop syncing a table, drop its metadata. */
Datum
sync_cleanup(PG_FUNCTION_ARGS)
{
	Oid relid = PG_GETARG_OID(0);

	require_owner(relid);
	SPI_connect();
	pg_table_cleanup(relid);
	SPI_finish();
	PG_RETURN_VOID();
}

/* sync_site_id(): this database's site id. */
Datum
sync_site_id(PG_FUNCTION_ARGS)
{
	db_conn	   db;
	pg_uuid_t *u = palloc(sizeof(pg_uuid_t));

	SPI_connect();
	pg_conn_init(&db, CurrentMemoryContext);
	memcpy(u->data, db.site, PGS_SITE_LEN);
	SPI_finish();
	PG_RETURN_UUID_P(u);
}

/* sync_db_version(): the newest local version every pull can already see. */
Datum
sync_db_version(PG_FUNCTION_ARGS)
{
	int64_t v;
	pgs_err err;

	SPI_connect();
	if (db_version_safe(NULL, &v, &err) != PGS_OK)
		pg_raise(&err);
	SPI_finish();
	PG_RETURN_INT64(v);
}

/*
 * pg_payload_guard: a payload carries committed changes only: built inside a
 * transaction that changed synced rows it would hand out changes that may
 * still roll back.
 */
void
pg_payload_guard(void)
{
	if (FullTransactionIdIsValid(pg_wrote_xid) &&
		FullTransactionIdEquals(GetTopFullTransactionIdIfAny(), pg_wrote_xid))
		ereport(ERROR, (errcode(ERRCODE_INVALID_TRANSACTION_STATE),
						errmsg("sync_payload cannot run in a transaction that changed synced rows"),
						errhint("Commit first, then call sync_payload in a new transaction.")));
}

/*
 * sync_payload(since bigint, exclude_site uuid): changes in (since, safe],
 * as the caller may see them (privileges and row-level security apply; rows
 * the caller may not see go out as removal candidates).
 */
Datum
sync_payload(PG_FUNCTION_ARGS)
{
	MemoryContext	outer = CurrentMemoryContext;
	MemoryContext	cxt;
	db_conn			db;
	pgs_build_opts	o;
	pgs_build_stats st;
	pgs_buf			out;
	pgs_err			err;
	pgs_rc			rc;
	int64_t			until;
	bytea		   *res = NULL;

	if (PG_ARGISNULL(0))
		ereport(ERROR, (errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED), errmsg("since must not be null"),
						errhint("Pass 0 for everything, or the value of sync_payload_until() of "
								"the last payload.")));
	memset(&o, 0, sizeof(o));
	o.since = PG_GETARG_INT64(0);
	if (o.since < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("since must not be negative")));
	if (!PG_ARGISNULL(1))
		o.exclude_site = PG_GETARG_UUID_P(1)->data;
	/* sync_payload(since, exclude_site, max_rows, cursor): one chunk */
	if (PG_NARGS() > 2 && !PG_ARGISNULL(2))
	{
		int32 m = PG_GETARG_INT32(2);

		if (m < 0)
			ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE),
							errmsg("max_rows must not be negative"),
							errhint("Pass 0 or NULL for no limit.")));
		o.max_rows = (uint32_t) m;
	}
	if (PG_NARGS() > 3 && !PG_ARGISNULL(3))
	{
		bytea *tok = PG_GETARG_BYTEA_PP(3);

		o.after = (const uint8_t *) VARDATA_ANY(tok);
		o.after_len = VARSIZE_ANY_EXHDR(tok);
	}

	pg_payload_guard();
	o.compress = 1;

	cxt = call_context();
	SPI_connect();
	pg_conn_init(&db, cxt);
	if (db_version_safe(&db, &until, &err) != PGS_OK)
		pg_raise(&err);
	pg_gc_check_since(o.since); /* PS410: deletes newer than since were collected */
	if (o.since < until || o.after)
	{
		o.until = until;
		pgs_buf_init(&out);
		/* as the caller: the engine reads clocks as the metadata owner */
		rc = pgs_build(&db, &o, &out, NULL, &st, &err);
		if (rc != PGS_OK)
			pg_raise(&err);
		if (out.oom)
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory building a payload")));
		if (out.len > 0)
		{
			if (out.len > MaxAllocSize - VARHDRSZ)
				ereport(ERROR, (errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
								errmsg("payload of %zu bytes is too large for a bytea", out.len),
								errhint("Pull in smaller steps.")));
			res = pg_bytea(outer, out.p, out.len);
		}
	}
	SPI_finish();
	call_done(cxt);
	if (res == NULL)
		PG_RETURN_NULL();
	PG_RETURN_BYTEA_P(res);
}

/*
 * sync_payload_cursor(payload bytea): the cursor for the next chunk of a
 * chunked pull, NULL when payload is the last chunk (or not a chunk).
 */
Datum
sync_payload_cursor(PG_FUNCTION_ARGS)
{
	bytea		 *p = PG_GETARG_BYTEA_PP(0);
	MemoryContext outer = CurrentMemoryContext;
	MemoryContext cxt;
	db_conn		  db;
	pgs_buf		  tok;
	pgs_err		  err;
	pgs_rc		  rc;
	pg_user_save  us;
	bytea		 *res = NULL;

	cxt = call_context();
	SPI_connect();
	pg_conn_init(&db, cxt);
	pgs_buf_init(&tok);
	pg_as_meta(&us);
	rc = pgs_payload_next_token(&db, (const uint8_t *) VARDATA_ANY(p), VARSIZE_ANY_EXHDR(p), &tok,
								&err);
	pg_as_caller(&us);
	if (rc != PGS_OK)
		pg_raise(&err);
	if (tok.len)
	{
		res = pg_bytea(outer, tok.p, tok.len);
	}
	SPI_finish();
	call_done(cxt);
	if (res == NULL)
		PG_RETURN_NULL();
	PG_RETURN_BYTEA_P(res);
}

/* sync_payload_until(payload bytea): the version to pass as since next. */
Datum
sync_payload_until(PG_FUNCTION_ARGS)
{
	bytea		 *p = PG_GETARG_BYTEA_PP(0);
	MemoryContext cxt = call_context();
	int64_t		  until;
	pgs_err		  err;

	if (pgs_payload_until((const uint8_t *) VARDATA_ANY(p), VARSIZE_ANY_EXHDR(p), &until, &err) !=
		PGS_OK)
		pg_raise(&err);
	call_done(cxt);
	PG_RETURN_INT64(until);
}

/*
 * sync_apply_payload(payload bytea): merge; returns the winning changes.
 *
 * The merge runs in a subtransaction. When a local writer changed a row
 * between the clock read and the clock write of that row (pg_database.c
 * detects it with a compare-and-set on the clock), the subtransaction is
 * rolled back and the whole apply runs again: by then the writer has
 * committed and the retry merges against its clock.
 */
#define APPLY_ATTEMPTS 8

Datum
sync_apply_payload(PG_FUNCTION_ARGS)
{
	bytea		   *p = PG_GETARG_BYTEA_PP(0);
	MemoryContext	outer = CurrentMemoryContext;
	ResourceOwner	owner = CurrentResourceOwner;
	volatile int	attempt;
	volatile bool	done = false;
	volatile bool	careful = false;
	pgs_apply_stats st;

	/* acting for a device (sync_device): the payload must be that device's */
	if (pg_have_device && VARSIZE_ANY_EXHDR(p) >= PGS_HEADER_LEN &&
		memcmp((const uint8_t *) VARDATA_ANY(p) + 8, pg_cur_device, PGS_SITE_LEN) != 0)
	{
		char a[37], b[37];

		pgs_uuid_format((const uint8_t *) VARDATA_ANY(p) + 8, a);
		pgs_uuid_format(pg_cur_device, b);
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("payload was built by device %s, not by this request's device %s", a, b),
				 errhint("A device pushes the payloads it builds itself (sync_payload), with its "
						 "own site id.")));
	}

	/*
	 * Applies are serialized: two payloads touching the same rows in
	 * different orders would otherwise deadlock. Local writers do not take
	 * this lock.
	 */
	DirectFunctionCall1(pg_advisory_xact_lock_int8, Int64GetDatum(PGSYNC_APPLY_LOCK_KEY));
	SPI_connect();
	for (attempt = 1; !done; attempt++)
	{
		MemoryContext cxt = call_context();

		memset(&st, 0, sizeof(st));
		BeginInternalSubTransaction(NULL);
		MemoryContextSwitchTo(outer);
		PG_TRY();
		{
			db_conn db;
			pgs_err err;
			pgs_rc	rc;

			reject_reset();
			pg_apply_conflict = false;
			pg_conn_init(&db, cxt);
			memset(&err, 0, sizeof(err));
			pg_applying = true;
			rc = pgs_apply(&db, (const uint8_t *) VARDATA_ANY(p), VARSIZE_ANY_EXHDR(p), careful,
						   &st, &err);
			pg_applying = false;
			if (rc == PGS_ERR_CAREFUL)
				ereport(ERROR, (errcode(ERRCODE_INTEGRITY_CONSTRAINT_VIOLATION),
								errmsg("a row of the payload failed: applying it carefully")));
			if (rc != PGS_OK)
				pg_raise(&err);
			ReleaseCurrentSubTransaction();
			MemoryContextSwitchTo(outer);
			CurrentResourceOwner = owner;
			done = true;
		}
		PG_CATCH();
		{
			ErrorData *ed;
			bool	   conflict = pg_apply_conflict;

			pg_applying = false;
			MemoryContextSwitchTo(outer);
			ed = CopyErrorData();
			FlushErrorState();
			RollbackAndReleaseCurrentSubTransaction();
			MemoryContextSwitchTo(outer);
			CurrentResourceOwner = owner;
			/*
			 * A local writer raced with a clock write: again, the same way.
			 * A row failed on the fast path: again, each row isolated, so
			 * that it alone is rejected. Anything else is the apply's error.
			 */
			if (conflict && attempt < APPLY_ATTEMPTS)
				;
			else if (!conflict && !careful && pg_row_error(ed->sqlerrcode))
				careful = true;
			else
				ReThrowError(ed);
			FreeErrorData(ed);
			pg_apply_conflict = false;
		}
		PG_END_TRY();
		call_done(cxt);
	}
	SPI_finish();
	if (st.rejected > 0)
		ereport(WARNING, (errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
						  errmsg("%lld rows of the payload were rejected", (long long) st.rejected),
						  errhint("SELECT * FROM sync_rejections() lists them with the reason.")));
	PG_RETURN_INT64(st.won);
}

/* sync_payload_info(payload bytea): the payload as jsonb. */
Datum
sync_payload_info(PG_FUNCTION_ARGS)
{
	bytea		 *p = PG_GETARG_BYTEA_PP(0);
	MemoryContext cxt = call_context();
	char		 *json;
	pgs_err		  err;
	Datum		  res;

	if (pgs_payload_info((const uint8_t *) VARDATA_ANY(p), VARSIZE_ANY_EXHDR(p), &json, &err) !=
		PGS_OK)
		pg_raise(&err);
	res = DirectFunctionCall1(jsonb_in, CStringGetDatum(json));
	call_done(cxt);
	PG_RETURN_DATUM(res);
}

/* sync_rejections(): the rows the last sync_apply_payload refused. */
Datum
sync_rejections(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	ListCell	  *lc;

	InitMaterializedSRF(fcinfo, 0);
	foreach (lc, rejections)
	{
		pg_rejection *r = lfirst(lc);
		Datum		  values[4];
		bool		  nulls[4] = {false, false, false, false};

		values[0] = CStringGetTextDatum(r->table);
		values[1] = DirectFunctionCall1(jsonb_in, CStringGetDatum(r->pk_json));
		values[2] = CStringGetTextDatum(r->sqlstate);
		values[3] = CStringGetTextDatum(r->message);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

/* sync_uuid(): a fresh UUIDv7. */
Datum
sync_uuid(PG_FUNCTION_ARGS)
{
	pg_uuid_t *u = palloc(sizeof(pg_uuid_t));
	pgs_err	   err;

	if (pgs_uuid7(u->data, &err) != PGS_OK)
		pg_raise(&err);
	PG_RETURN_UUID_P(u);
}

/* sync_version(): the extension version. */
Datum
sync_version(PG_FUNCTION_ARGS)
{
	PG_RETURN_TEXT_P(cstring_to_text(PGS_VERSION));
}
