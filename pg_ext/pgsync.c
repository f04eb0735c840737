/*
 * pgsync.c — the SQL-callable functions of the pgsync PostgreSQL extension.
 *
 * Each wrapper converts its arguments, sets up one memory context for the
 * core (the core allocates only through pgs_malloc, bound to palloc in that
 * context by pg_session.c, so an ERROR anywhere frees everything), calls one
 * core function and maps a failing pgs_rc through pgsync_raise() (pg_session.c),
 * the one place where core errors become ereport(ERROR). The top of pg_ext:
 * the other files sit below it, floor by floor: pg_view.c; pg_changes.c;
 * pg_database.c; pg_init.c, pg_lock.c and pg_capture.c; pg_gc.c and
 * pg_table.c; pg_types.c; pg_session.c at the bottom. None calls a file
 * above it.
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
#include "utils/guc.h"
#include "utils/inval.h"
#include "utils/memutils.h"
#include "utils/syscache.h"
#include "utils/uuid.h"

PG_MODULE_MAGIC;

/*
 * pgsync.serialize_applies: every apply takes one global advisory lock until
 * commit, the way applies ran before they ran concurrently. Off by default;
 * there only to measure the difference in one run (bench/server_bench.py).
 */
#define PGSYNC_APPLY_LOCK_KEY INT64CONST(0x7067737970706c79) /* "pgsyaply" */
static bool serialize_applies = false;

static void
pgsync_xact_cb(XactEvent event, void *arg)
{
	if (event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_ABORT ||
		event == XACT_EVENT_COMMIT || event == XACT_EVENT_PARALLEL_COMMIT ||
		event == XACT_EVENT_PREPARE)
	{
		pgsync_applying = false;
		pgsync_core_memory(NULL);
		pgsync_table_release_all();
		pgsync_device_reset();
	}
}

void _PG_init(void);

void
_PG_init(void)
{
	pgsync_session_setup();
	DefineCustomIntVariable(
		"pgsync.record_interval",
		"How often a pull records how far its device has synced (the GC horizon).",
		"A device's acknowledged cursor (pgsync.devices.acked) is written at most once per "
		"interval, and last_seen once a minute; 0 records every pull that moves it. A longer "
		"interval only holds the GC horizon back; every record is a write, which moves "
		"sync_db_version().",
		&pgsync_record_interval, 60, 0, 86400, PGC_SUSET, GUC_UNIT_S, NULL, NULL, NULL);
	RegisterXactCallback(pgsync_xact_cb, NULL);
	pgsync_table_cache_setup();
	pgsync_changes_setup();
	DefineCustomBoolVariable("pgsync.serialize_applies",
							 "Applies run one at a time (one global lock until commit).",
							 "For comparisons only: applies run concurrently without it.",
							 &serialize_applies, false, PGC_SUSET, 0, NULL, NULL, NULL);
	MarkGUCPrefixReserved("pgsync");
}

static MemoryContext
call_context(void)
{
	MemoryContext cxt =
		AllocSetContextCreate(CurrentMemoryContext, "pgsync call", ALLOCSET_DEFAULT_SIZES);

	pgsync_core_memory(cxt);
	return cxt;
}

static void
call_done(MemoryContext cxt)
{
	pgsync_core_memory(NULL);
	MemoryContextDelete(cxt);
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

/* init_table: sync_init's body (also after sync_alter's ADD COLUMN): the
 * metadata and triggers, the clocks of a new table's rows, the watches. */
static void
init_table(Oid relid, db_algo algo, Oid func_nsp, const char *name, bool allow_seq)
{
	if (pgsync_table_init(relid, algo, func_nsp, name, allow_seq))
	{
		pgsync_capture_backfill(relid);
		CacheInvalidateRelcacheByRelid(relid);
	}
	pgsync_watch_refresh(relid);
}

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
	db_table		*t = pgsync_table_get(relid, false);
	Oid				 types[1] = {TEXTOID};
	Datum			 vals[1] = {CStringGetTextDatum(t->name)};
	pgsync_user_save us;
	uint64			 n;
	bytea		   **frags;

	pgsync_as_meta(&us);
	if (SPI_execute_with_args("DELETE FROM pgsync.held WHERE tbl = $1 RETURNING frag", 1, types,
							  vals, NULL, false, 0) != SPI_OK_DELETE_RETURNING)
		elog(ERROR, "pgsync: reading pgsync.held failed");
	pgsync_as_caller(&us);
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

		pgsync_conn_init(&db, cxt);
		pgsync_applying = true;
		if (pgs_apply(&db, (const uint8_t *) VARDATA(frags[i]), VARSIZE(frags[i]) - VARHDRSZ, true,
					  &st, &err) != PGS_OK)
		{
			pgsync_applying = false;
			pgsync_raise(&err);
		}
		pgsync_applying = false;
	}
}

/*
 * sync_init(tbl regclass, algo text, name text, allow_sequence_keys bool):
 * start syncing a table, or sync its new columns.
 */
Datum
sync_init(PG_FUNCTION_ARGS)
{
	Oid	  relid;
	char *algo = PG_ARGISNULL(1) ? "cls" : text_to_cstring(PG_GETARG_TEXT_PP(1));
	char *name = PG_NARGS() > 2 && !PG_ARGISNULL(2) ? text_to_cstring(PG_GETARG_TEXT_PP(2)) : NULL;
	bool  allow_seq = PG_NARGS() > 3 && !PG_ARGISNULL(3) && PG_GETARG_BOOL(3);
	db_algo		  a;
	MemoryContext cxt;

	if (PG_ARGISNULL(0))
		ereport(ERROR, (errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED), errmsg("sync_init needs a table"),
						errhint("Pass the table's name.")));
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
	init_table(relid, a, get_func_namespace(fcinfo->flinfo->fn_oid), name, allow_seq);
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
	algo = pgsync_table_get(relid, false)->algo; /* a synced table */
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
		init_table(relid, algo, get_func_namespace(fcinfo->flinfo->fn_oid), NULL, false);
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
		pgsync_raise(&err);
	res = pgsync_bytea(CurrentMemoryContext, out.p, out.len);
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
	pgsync_table_cleanup(relid);
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
	pgsync_conn_init(&db, CurrentMemoryContext);
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
		pgsync_raise(&err);
	SPI_finish();
	PG_RETURN_INT64(v);
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

	pgsync_payload_guard();
	o.compress = 1;

	cxt = call_context();
	SPI_connect();
	pgsync_conn_init(&db, cxt);
	if (db_version_safe(&db, &until, &err) != PGS_OK)
		pgsync_raise(&err);
	pgsync_gc_check_since(o.since); /* PS410: deletes newer than since were collected */
	if (o.since < until || o.after)
	{
		o.until = until;
		pgs_buf_init(&out);
		/* as the caller: the engine reads clocks as the metadata owner */
		rc = pgs_build(&db, &o, &out, NULL, &st, &err);
		if (rc != PGS_OK)
			pgsync_raise(&err);
		if (out.oom)
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory building a payload")));
		if (out.len > 0)
		{
			if (out.len > MaxAllocSize - VARHDRSZ)
				ereport(ERROR, (errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
								errmsg("payload of %zu bytes is too large for a bytea", out.len),
								errhint("Pull in smaller steps.")));
			res = pgsync_bytea(outer, out.p, out.len);
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
	bytea			*p = PG_GETARG_BYTEA_PP(0);
	MemoryContext	 outer = CurrentMemoryContext;
	MemoryContext	 cxt;
	db_conn			 db;
	pgs_buf			 tok;
	pgs_err			 err;
	pgs_rc			 rc;
	pgsync_user_save us;
	bytea			*res = NULL;

	cxt = call_context();
	SPI_connect();
	pgsync_conn_init(&db, cxt);
	pgs_buf_init(&tok);
	pgsync_as_meta(&us);
	rc = pgs_payload_next_token(&db, (const uint8_t *) VARDATA_ANY(p), VARSIZE_ANY_EXHDR(p), &tok,
								&err);
	pgsync_as_caller(&us);
	if (rc != PGS_OK)
		pgsync_raise(&err);
	if (tok.len)
	{
		res = pgsync_bytea(outer, tok.p, tok.len);
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
		pgsync_raise(&err);
	call_done(cxt);
	PG_RETURN_INT64(until);
}

/*
 * sync_apply_payload(payload bytea): merge; returns the winning changes.
 *
 * Applies run concurrently (pg_lock.c). Each attempt runs in a
 * subtransaction, and is rolled back and run again when:
 *   - a local writer changed a row between the clock read and the clock
 *     write of that row (the compare-and-set in db_clock_put): at once, the
 *     writer has committed by then; at most APPLY_CONFLICTS times;
 *   - it gave way to another transaction writing one of its rows, a lock
 *     wait of the merge was cut short, or it was chosen as a deadlock
 *     victim: after waiting, holding nothing, for what was in the way
 *     (pgsync_apply_wait); at most APPLY_YIELDS times, then 40001;
 *   - a row failed on the fast path: once more in careful mode, where every
 *     row write is isolated and a failing row is rejected alone.
 * None of these errors reaches the caller before the limits.
 */
#define APPLY_CONFLICTS 8
#define APPLY_YIELDS 64

Datum
sync_apply_payload(PG_FUNCTION_ARGS)
{
	bytea		   *p = PG_GETARG_BYTEA_PP(0);
	MemoryContext	outer = CurrentMemoryContext;
	ResourceOwner	owner = CurrentResourceOwner;
	volatile int	conflicts = 0, yields = 0;
	volatile bool	done = false;
	volatile bool	careful = false;
	pgs_apply_stats st;

	/* acting for a device (sync_device): the payload must be that device's */
	if (pgsync_have_device && VARSIZE_ANY_EXHDR(p) >= PGS_HEADER_LEN &&
		memcmp((const uint8_t *) VARDATA_ANY(p) + 8, pgsync_cur_device, PGS_SITE_LEN) != 0)
	{
		char a[37], b[37];

		pgs_uuid_format((const uint8_t *) VARDATA_ANY(p) + 8, a);
		pgs_uuid_format(pgsync_cur_device, b);
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("payload was built by device %s, not by this request's device %s", a, b),
				 errhint("A device pushes the payloads it builds itself (sync_payload), with its "
						 "own site id.")));
	}

	if (serialize_applies)
		DirectFunctionCall1(pg_advisory_xact_lock_int8, Int64GetDatum(PGSYNC_APPLY_LOCK_KEY));
	SPI_connect();
	while (!done)
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
			int		guc;

			pgsync_reject_reset();
			pgsync_apply_conflict = false;
			pgsync_apply_yield_reset();
			pgsync_conn_init(&db, cxt);
			db.lock_wait_ms = PG_LOCK_WAIT_MS;
			memset(&err, 0, sizeof(err));
			guc = NewGUCNestLevel(); /* db_apply_lock sets lock_timeout */
			pgsync_applying = true;
			rc = pgs_apply(&db, (const uint8_t *) VARDATA_ANY(p), VARSIZE_ANY_EXHDR(p), careful,
						   &st, &err);
			pgsync_applying = false;
			AtEOXact_GUC(true, guc);
			if (rc == PGS_ERR_CAREFUL)
				ereport(ERROR, (errcode(ERRCODE_INTEGRITY_CONSTRAINT_VIOLATION),
								errmsg("a row of the payload failed: applying it carefully")));
			if (rc != PGS_OK)
				pgsync_raise(&err);
			ReleaseCurrentSubTransaction();
			MemoryContextSwitchTo(outer);
			CurrentResourceOwner = owner;
			done = true;
		}
		PG_CATCH();
		{
			ErrorData *ed;
			bool	   conflict = pgsync_apply_conflict;
			bool	   yield;

			pgsync_applying = false;
			MemoryContextSwitchTo(outer);
			ed = CopyErrorData();
			FlushErrorState();
			RollbackAndReleaseCurrentSubTransaction();
			MemoryContextSwitchTo(outer);
			CurrentResourceOwner = owner;
			/* 55P03 is ours only while our lock_timeout was in effect */
			yield = pgsync_apply_yield.set || ed->sqlerrcode == ERRCODE_T_R_DEADLOCK_DETECTED ||
					(ed->sqlerrcode == ERRCODE_LOCK_NOT_AVAILABLE && pgsync_apply_yield.armed);
			if (conflict && conflicts < APPLY_CONFLICTS)
				conflicts++; /* again, the same way */
			else if (!conflict && yield && yields < APPLY_YIELDS)
				pgsync_apply_wait(++yields);
			else if (!conflict && yield)
				ereport(ERROR,
						(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
						 errmsg("could not apply the payload: rows it writes stayed busy"),
						 errdetail("%d attempts gave way to other transactions; the last: %s",
								   yields, ed->message),
						 errhint("Apply the payload again.")));
			else if (!conflict && !careful && pgsync_row_error(ed->sqlerrcode))
				careful = true; /* each row isolated, so that it alone is rejected */
			else
				ReThrowError(ed);
			FreeErrorData(ed);
			pgsync_apply_conflict = false;
			pgsync_apply_yield_reset();
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
		pgsync_raise(&err);
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
	foreach (lc, pgsync_rejections())
	{
		pgsync_rejection *r = lfirst(lc);
		Datum			  values[4];
		bool			  nulls[4] = {false, false, false, false};

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
		pgsync_raise(&err);
	PG_RETURN_UUID_P(u);
}

/* sync_version(): the extension version. */
Datum
sync_version(PG_FUNCTION_ARGS)
{
	PG_RETURN_TEXT_P(cstring_to_text(PGS_VERSION));
}
