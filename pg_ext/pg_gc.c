/*
 * pg_gc.c — tombstone GC with a horizon on Postgres (docs/DESIGN.md,
 * "Tombstone GC with a horizon").
 *
 *   sync_gc(retention)   collect every synced table's tombstones at or below
 *                        the horizon: the oldest acknowledged cursor of the
 *                        devices seen within retention, and never above
 *                        db_version_safe(). Returns what it collected (jsonb).
 *   pgsync_gc_check_since    a pull from below what was collected is refused
 *                        (PS410, HTTP 410): the device re-syncs from a snapshot
 *   db_table_floor,      the floors: the largest cl collected per table. Local
 *   pgsync_gc_life           lives of keys without a clock start above it; an
 *                        apply refuses first lives at or below it (PS005)
 *
 * Invariants. pgsync.gc.horizon is at least the ver of every tombstone ever
 * collected (monotone), so since >= horizon means "has seen every collected
 * delete". A table is collected under SHARE ROW EXCLUSIVE on its clock
 * table, which excludes every writer (ROW EXCLUSIVE) and no reader; GC takes
 * it without waiting, so it never holds one lock while waiting for another.
 * Writers take ROW EXCLUSIVE before they read a floor (pgsync_gc_lock_floor), so
 * a floor cannot change under a running writer; a floor change invalidates
 * the clock table's relcache entry, which drops the cached floor.
 */
#include "pg_internal.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "miscadmin.h"
#include "storage/lmgr.h"
#include "utils/builtins.h"
#include "utils/inval.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

PG_FUNCTION_INFO_V1(sync_gc);

#define GC_LOCK_TRIES 100	   /* conditional lock attempts per table ... */
#define GC_LOCK_SLEEP_US 10000 /* ... 10 ms apart: about a second */

static int
gc_exec(const char *sql, int nargs, Oid *types, Datum *vals, bool read_only)
{
	pgsync_user_save us;
	int				 rc;

	pgsync_as_meta(&us);
	rc = SPI_execute_with_args(sql, nargs, types, vals, NULL, read_only, 0);
	pgsync_as_caller(&us);
	if (rc < 0)
		elog(ERROR, "pgsync: \"%s\" failed: %s", sql, SPI_result_code_string(rc));
	return rc;
}

static int64
first_int8(int col, int64 def)
{
	bool  isnull;
	Datum d;

	if (SPI_processed < 1)
		return def;
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, col, &isnull);
	return isnull ? def : DatumGetInt64(d);
}

/*
 * pgsync_gc_lock_floor: the floor of t, with t's clock table locked ROW
 * EXCLUSIVE for the rest of the transaction (no collection can raise it
 * until then). Read once per cache entry; SPI must be connected.
 */
int64
pgsync_gc_lock_floor(db_table *t)
{
	LockRelationOid(t->clock_relid, RowExclusiveLock); /* processes invalidations */
	if (!t->gc_floor_known || !t->valid)
	{
		Oid	  types[1] = {TEXTOID};
		Datum vals[1] = {CStringGetTextDatum(t->name)};

		gc_exec("SELECT floor FROM pgsync.gc_floor WHERE tbl = $1", 1, types, vals, true);
		t->gc_floor = first_int8(1, 0);
		SPI_freetuptable(SPI_tuptable);
		t->gc_floor_known = true;
	}
	return t->gc_floor;
}

/*
 * pgsync_gc_life: the causal length a local write gives a key of t without a
 * clock row: the first life (odd) or, for del, the first delete (even)
 * above the floor.
 */
int64
pgsync_gc_life(db_table *t, bool del)
{
	int64 f = pgsync_gc_lock_floor(t);

	f += f & 1;
	return del ? f + 2 : f + 1;
}

pgs_rc
db_table_floor(db_conn *db, db_table *t, int64_t *floor, pgs_err *err)
{
	*floor = pgsync_gc_lock_floor(t);
	return PGS_OK;
}

/*
 * pgsync_gc_check_since: a pull from since, which is older than a delete this
 * database collected, would miss it: refuse it (PS410) so that the device
 * re-syncs from a snapshot. since 0 is a snapshot already.
 */
void
pgsync_gc_check_since(int64 since)
{
	int64 h;

	if (since <= 0)
		return;
	gc_exec("SELECT horizon FROM pgsync.gc WHERE id = 1", 0, NULL, NULL, true);
	h = first_int8(1, 0);
	SPI_freetuptable(SPI_tuptable);
	if (since < h)
		ereport(ERROR,
				(errcode(MAKE_SQLSTATE('P', 'S', '4', '1', '0')),
				 errmsg("cursor behind the gc horizon"),
				 errdetail("since=%lld is older than deletes this database has collected (up to "
						   "%lld): the device was away longer than the retention, or restored "
						   "from an old copy.",
						   (long long) since, (long long) h),
				 errhint("Push unsent changes, then pull again from 0 (a snapshot); the SQLite "
						 "client does it by itself.")));
}

/* lock_clock: SHARE ROW EXCLUSIVE on t's clock table without ever waiting on it. */
static bool
lock_clock(db_table *t)
{
	for (int i = 0; i < GC_LOCK_TRIES; i++)
	{
		if (ConditionalLockRelationOid(t->clock_relid, ShareRowExclusiveLock))
			return true;
		CHECK_FOR_INTERRUPTS();
		pg_usleep(GC_LOCK_SLEEP_US);
	}
	return false;
}

/*
 * sync_gc(retention interval) -> jsonb
 *   {"horizon": H, "safe": S, "devices": n, "collected": n,
 *    "tables": {"t": {"collected": n, "floor": f}}, "busy": ["t", ...]}
 */
Datum
sync_gc(PG_FUNCTION_ARGS)
{
	Interval	  *retention = PG_GETARG_INTERVAL_P(0);
	MemoryContext  outer = CurrentMemoryContext, cxt;
	db_conn		   db;
	db_table	 **tables;
	int			   ntables;
	pgs_err		   err;
	int64_t		   safe;
	int64		   h, devices, total = 0, maxver = 0;
	Oid			   types[2] = {INTERVALOID, INT8OID};
	Datum		   vals[2];
	StringInfoData js, busy;
	Datum		   res;

	if (retention->month < 0 || retention->day < 0 || retention->time < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("retention must not be negative"),
				 errhint("Pass how long a silent device keeps holding the horizon back, "
						 "e.g. '30 days'.")));
	cxt = AllocSetContextCreate(CurrentMemoryContext, "pgsync gc", ALLOCSET_DEFAULT_SIZES);
	pgsync_core_memory(cxt);
	SPI_connect();
	pgsync_conn_init(&db, cxt);
	if (db_version_safe(&db, &safe, &err) != PGS_OK)
		pgsync_raise(&err);
	/* the oldest cursor of the devices that still sync; acked 0: never pulled */
	vals[0] = IntervalPGetDatum(retention);
	gc_exec("SELECT min(acked), count(*) FROM pgsync.devices WHERE acked > 0 AND last_seen >= "
			"pg_catalog.now() - $1",
			1, types, vals, true);
	h = first_int8(1, safe);
	devices = first_int8(2, 0);
	SPI_freetuptable(SPI_tuptable);
	if (h > safe)
		h = safe;
	if (db_tables(&db, &tables, &ntables, &err) != PGS_OK)
		pgsync_raise(&err);
	{
		MemoryContext o = MemoryContextSwitchTo(outer); /* outlives SPI_finish */

		initStringInfo(&js);
		initStringInfo(&busy);
		MemoryContextSwitchTo(o);
	}
	appendStringInfo(&js, "{\"tables\": {");
	for (int i = 0; i < ntables; i++)
	{
		db_table *t = tables[i];
		char	 *sql;
		int64	  n, maxcl, mv;
		Oid		  ftypes[2] = {TEXTOID, INT8OID};
		Datum	  fvals[2];

		if (!lock_clock(t))
		{
			if (busy.len)
				appendStringInfoString(&busy, ", ");
			escape_json(&busy, t->name);
			continue;
		}
		/* the WHERE holds the row's own state: a row revived since is kept */
		sql = psprintf("WITH d AS (DELETE FROM %s WHERE cl %% 2 = 0 AND ver <= $1 RETURNING cl, "
					   "ver) SELECT count(*), max(cl), max(ver) FROM d",
					   t->q_clock);
		vals[0] = Int64GetDatum(h);
		types[0] = INT8OID;
		gc_exec(sql, 1, types, vals, false);
		n = first_int8(1, 0);
		maxcl = first_int8(2, 0);
		mv = first_int8(3, 0);
		SPI_freetuptable(SPI_tuptable);
		if (maxcl > 0)
		{
			fvals[0] = CStringGetTextDatum(t->name);
			fvals[1] = Int64GetDatum(maxcl);
			gc_exec("INSERT INTO pgsync.gc_floor (tbl, floor) VALUES ($1, $2) ON CONFLICT (tbl) "
					"DO UPDATE SET floor = greatest(pgsync.gc_floor.floor, excluded.floor)",
					2, ftypes, fvals, false);
			CacheInvalidateRelcacheByRelid(t->clock_relid); /* cached floors */
		}
		if (mv > maxver)
			maxver = mv;
		total += n;
		fvals[0] = CStringGetTextDatum(t->name);
		gc_exec("SELECT floor FROM pgsync.gc_floor WHERE tbl = $1", 1, ftypes, fvals, false);
		if (i > 0 && js.data[js.len - 1] != '{')
			appendStringInfoString(&js, ", ");
		escape_json(&js, t->name);
		appendStringInfo(&js, ": {\"collected\": %lld, \"floor\": %lld}", (long long) n,
						 (long long) first_int8(1, 0));
		SPI_freetuptable(SPI_tuptable);
	}
	/* the recorded horizon: every collected tombstone's ver is at or below it */
	vals[0] = Int64GetDatum(maxver);
	vals[1] = Int64GetDatum(total);
	types[0] = INT8OID;
	types[1] = INT8OID;
	gc_exec("UPDATE pgsync.gc SET horizon = greatest(horizon, $1), last_run = pg_catalog.now(), "
			"collected = collected + $2 WHERE id = 1",
			2, types, vals, false);
	appendStringInfo(&js,
					 "}, \"horizon\": %lld, \"safe\": %lld, \"devices\": %lld, \"collected\": "
					 "%lld, \"busy\": [%s]}",
					 (long long) h, (long long) safe, (long long) devices, (long long) total,
					 busy.data);
	SPI_finish();
	pgsync_core_memory(NULL);
	MemoryContextSwitchTo(outer);
	res = DirectFunctionCall1(jsonb_in, CStringGetDatum(js.data));
	MemoryContextDelete(cxt);
	PG_RETURN_DATUM(res);
}
