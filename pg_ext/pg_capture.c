/*
 * pg_capture.c — recording local edits: the sync_capture row trigger, local
 * versions and the hybrid logical clock.
 *
 * Versions. The local version of a change is the 64-bit id (xid8) of the
 * top-level transaction that made it: unique per transaction and handed out
 * in start order, like the counter SQLite uses. Postgres commits out of that
 * order, so a pull may only hand out versions below the oldest transaction
 * still running: db_version_safe() is pg_snapshot_xmin(pg_current_snapshot())
 * - 1. Every transaction with a smaller xid has ended, so no change at or
 * below that point can appear later (see docs/PG.md, "pull ordering").
 *
 * HLC. One stamp per transaction (pgsync_txn_tick), advanced past the persisted
 * floor (sequence pgsync.hlc, non-transactional, so writers never block on
 * it) and past this backend's last stamp.
 *
 * Trigger. AFTER ROW on INSERT/UPDATE/DELETE (plus BEFORE TRUNCATE, refused).
 * How a write changes the row's clock is the core's (core/local.c,
 * pgs_local_edit); here is only the I/O, and the fast path of the insert of
 * a key never seen (its fresh blob cached per transaction, written straight
 * into the clock table's heap and indexes). A key without a clock row starts
 * its life above the table's GC floor (pg_gc.c, pgs_local_above_floor). A
 * key change is a delete of the old key plus an insert of the new one.
 * Writes of sync_apply_payload are not captured (pgsync_applying), except what
 * they cause elsewhere (applying_this_row).
 */
#include "pg_internal.h"

#include "access/genam.h"
#include "access/heapam.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/index.h"
#include "catalog/pg_am.h"
#include "executor/tuptable.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/datum.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"

PG_FUNCTION_INFO_V1(sync_capture);

static FullTransactionId tick_xid = {0};
FullTransactionId		 pgsync_wrote_xid = {0}; /* the transaction changed synced rows */
static uint64_t			 tick_hlc = 0;
static uint64_t			 backend_hlc = 0;

#define HLC_PERSIST_SLACK ((uint64_t) 1000 << PGS_HLC_LOGICAL_BITS) /* 1 s */

/* pgsync_txn_version: the local version of this transaction (assigns an xid). */
int64_t
pgsync_txn_version(void)
{
	return (int64_t) U64FromFullTransactionId(GetTopFullTransactionId());
}

/*
 * The persisted HLC floor is the sequence pgsync.hlc, read and raised with
 * the functions behind pg_sequence_last_value() and setval() (a push reads
 * it, and usually raises it, once: a statement each cost more than the
 * apply of a row). As the metadata owner, who owns the sequence.
 */
static Oid
hlc_seq(void)
{
	Oid seq = pgsync_meta_relid("hlc");

	if (!OidIsValid(seq))
		ereport(ERROR, (errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
						errmsg("pgsync sequence pgsync.hlc is missing"),
						errhint("Recreate the extension: DROP EXTENSION pgsync; CREATE EXTENSION "
								"pgsync.")));
	return seq;
}

static uint64_t
hlc_read(Oid seq)
{
	LOCAL_FCINFO(fcinfo, 1);
	Datum d;

	InitFunctionCallInfoData(*fcinfo, NULL, 1, InvalidOid, NULL, NULL);
	fcinfo->args[0].value = ObjectIdGetDatum(seq);
	fcinfo->args[0].isnull = false;
	d = pg_sequence_last_value(fcinfo);
	if (!fcinfo->isnull)
		return (uint64_t) DatumGetInt64(d);
	/* NULL: never set (START 0), or, on PostgreSQL 18, a role without the
	 * right to read it, which must not read as a floor of 0 */
	if (pg_class_aclcheck(seq, GetUserId(), ACL_SELECT | ACL_USAGE) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("the owner of pgsync's metadata cannot read the sequence pgsync.hlc"),
				 errhint("GRANT SELECT, USAGE ON SEQUENCE pgsync.hlc to the owner of "
						 "pgsync.sites, or recreate the extension.")));
	return 0;
}

/* pgsync_hlc_floor reads the persisted HLC. */
uint64_t
pgsync_hlc_floor(void)
{
	pgsync_user_save us;
	uint64_t		 v;

	pgsync_as_meta(&us);
	v = hlc_read(hlc_seq());
	pgsync_as_caller(&us);
	return v;
}

/*
 * hlc_persist raises the floor to h unless it is there already. Reading and
 * setting are two steps, so a backend raising it to less at the same time
 * may set its smaller value after ours; reading again after setting, and
 * setting again while it is below h, leaves the larger value (a backend
 * only sets what it read to be too low, so the rounds end; the floor below
 * h for a moment is harmless: a local edit always restamps above the stamps
 * it replaces, core/local.c).
 */
static void
hlc_persist(uint64_t h)
{
	pgsync_user_save us;
	Oid				 seq;

	pgsync_as_meta(&us);
	seq = hlc_seq();
	/* ends: a backend that reads its value or more is done for good, so with
	 * n raising at once the k-th largest sets at most k times */
	while (hlc_read(seq) < h)
		DirectFunctionCall2(setval_oid, ObjectIdGetDatum(seq), Int64GetDatum((int64) h));
	pgsync_as_caller(&us);
}

/* pgsync_txn_tick: this transaction's HLC stamp. SPI connected. */
uint64_t
pgsync_txn_tick(void)
{
	FullTransactionId x = GetTopFullTransactionId();
	uint64_t		  floor_hlc;
	uint64_t		  tick;

	if (FullTransactionIdEquals(x, tick_xid))
		return tick_hlc;
	floor_hlc = pgsync_hlc_floor();
	tick = pgs_hlc_tick(Max(backend_hlc, floor_hlc), pgs_now_ms());
	backend_hlc = tick;
	if (tick > floor_hlc + HLC_PERSIST_SLACK)
		hlc_persist(tick);
	tick_xid = x;
	tick_hlc = tick;
	return tick;
}

/* pgsync_hlc_observe advances the HLC past a received stamp. */
void
pgsync_hlc_observe(uint64_t hlc)
{
	if (hlc > backend_hlc)
		backend_hlc = hlc;
	hlc_persist(hlc);
}

/*
 * pgsync_capture_fresh: the clock blob of a row born in this transaction (all
 * columns stamped with the transaction's tick and version). Cached in t.
 */
void
pgsync_capture_fresh(db_table *t, uint8_t **blob, size_t *len)
{
	FullTransactionId x = GetTopFullTransactionId();

	if (t->fresh_blob == NULL || !FullTransactionIdEquals(t->fresh_xid, x))
	{
		pgs_stamp	*st = palloc0(sizeof(pgs_stamp) * Max(t->ncols, 1));
		pgs_rowclock rc = {.ncols = t->ncols, .cols = st};
		pgs_buf		 b;

		/* the insert of a key never seen, by the core's rules */
		(void) pgs_local_edit(&rc, false, PGS_LOCAL_INSERT, t->algo, NULL, pgsync_txn_version(),
							  pgsync_txn_tick());
		pgs_buf_init(&b);
		pgs_rowclock_encode(&rc, &b);
		if (b.oom)
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory encoding a row clock")));
		if (t->fresh_bytea)
			pfree(t->fresh_bytea);
		t->fresh_bytea = pgsync_bytea(t->cxt, b.p, b.len);
		t->fresh_blob = (uint8_t *) VARDATA(t->fresh_bytea);
		t->fresh_len = b.len;
		t->fresh_xid = x;
		pgs_buf_free(&b);
	}
	*blob = t->fresh_blob;
	*len = t->fresh_len;
}

/* ---- clock rows -------------------------------------------------------- */

typedef struct clock_row
{
	bool		 found;
	pgs_rowclock rc;
} clock_row;

static void
clock_read(db_table *t, Datum *pk, clock_row *r)
{
	pgsync_user_save us;
	int				 rc;

	memset(r, 0, sizeof(*r));
	r->rc.ncols = t->ncols;
	r->rc.cols = palloc0(sizeof(pgs_stamp) * Max(t->ncols, 1));
	{
		int64	cl;
		bytea  *clk;
		int		f = pgsync_clock_lookup_direct(t, pk, &cl, &clk);
		pgs_err err;

		if (f == 0)
			return;
		if (f == 1)
		{
			if (pgs_rowclock_decode((const uint8_t *) VARDATA(clk), VARSIZE(clk) - VARHDRSZ, &r->rc,
									&err) != PGS_OK)
				ereport(
					ERROR,
					(errcode(ERRCODE_DATA_CORRUPTED),
					 errmsg("clock row of table %s is corrupt: %s", t->name, err.msg),
					 errhint(
						 "Call sync_cleanup and sync_init on the table to rebuild its clocks.")));
			r->rc.cl = cl;
			r->found = true;
			return;
		}
	}
	pgsync_as_meta(&us);
	rc = SPI_execute_plan(pgsync_plan_clock_get(t), pk, NULL, false, 1);
	pgsync_as_caller(&us);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "reading the clock of %s failed", t->name);
	if (SPI_processed == 1)
	{
		HeapTuple tup = SPI_tuptable->vals[0];
		TupleDesc td = SPI_tuptable->tupdesc;
		bool	  isnull;
		int64	  cl = DatumGetInt64(SPI_getbinval(tup, td, 1, &isnull));
		bytea	 *clk = DatumGetByteaPP(SPI_getbinval(tup, td, 2, &isnull));
		pgs_err	  err;

		if (pgs_rowclock_decode((const uint8_t *) VARDATA_ANY(clk), VARSIZE_ANY_EXHDR(clk), &r->rc,
								&err) != PGS_OK)
			ereport(
				ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("clock row of table %s is corrupt: %s", t->name, err.msg),
				 errhint("Call sync_cleanup and sync_init on the table to rebuild its clocks.")));
		r->rc.cl = cl;
		r->found = true;
	}
	SPI_freetuptable(SPI_tuptable);
}

static void
clock_write(db_table *t, Datum *pk, pgs_rowclock *rc)
{
	pgs_buf			 b;
	bytea			*blob;
	Datum			*v = palloc(sizeof(Datum) * (t->npk + 3));
	pgsync_user_save us;
	int				 r;

	pgs_buf_init(&b);
	pgs_rowclock_encode(rc, &b);
	if (b.oom)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory encoding a row clock")));
	blob = pgsync_bytea(CurrentMemoryContext, b.p, b.len);
	pgs_buf_free(&b);
	memcpy(v, pk, sizeof(Datum) * t->npk);
	v[t->npk] = Int64GetDatum(rc->cl);
	v[t->npk + 1] = Int64GetDatum(pgs_rowclock_max_ver(rc));
	v[t->npk + 2] = PointerGetDatum(blob);
	pgsync_as_meta(&us);
	r = SPI_execute_plan(pgsync_plan_clock_upsert(t), v, NULL, false, 0);
	pgsync_as_caller(&us);
	if (r != SPI_OK_INSERT)
		elog(ERROR, "writing the clock of %s failed", t->name);
}

/*
 * local_edit: the clock change of a local write by the core's rules
 * (core/local.c): read the clock row, apply, write. A grow-only table's
 * refusal is raised by sync_capture before it gets here.
 */
static void
local_edit(db_table *t, Datum *pk, clock_row *r, pgs_local_op op, const bool *changed)
{
	clock_read(t, pk, r);
	if (pgs_local_edit(&r->rc, r->found, op, t->algo, changed, pgsync_txn_version(),
					   op == PGS_LOCAL_DELETE ? 0 : pgsync_txn_tick()) == PGS_LOCAL_WRITE)
	{
		if (!r->found) /* a key without a clock: its life starts above the GC floor (pg_gc.c) */
			pgs_local_above_floor(&r->rc, pgsync_gc_lock_floor(t));
		clock_write(t, pk, &r->rc);
	}
}

/*
 * direct_setup decides once per cache entry whether fresh clock rows may be
 * inserted straight into the heap and indexes: every index of the clock table
 * must be a plain, valid btree on columns (what sync_init creates).
 */
static int
list_index_of_oid(List *l, Oid o)
{
	ListCell *lc;

	foreach (lc, l)
		if (lfirst_oid(lc) == o)
			return foreach_current_index(lc);
	return 0;
}

static bool
direct_setup(db_table *t, Relation rel)
{
	List	 *ids;
	ListCell *lc;
	Relation  pi;
	int		  i;

	if (t->direct_state != 0)
		return t->direct_state > 0;
	t->direct_state = -1;
	t->pk_index = RelationGetPrimaryKeyIndex(rel, false);
	if (!OidIsValid(t->pk_index))
		return false;
	ids = RelationGetIndexList(rel);
	foreach (lc, ids)
	{
		Relation ir = index_open(lfirst_oid(lc), AccessShareLock);
		bool	 ok = ir->rd_index->indisready && ir->rd_index->indisvalid &&
				  ir->rd_rel->relam == BTREE_AM_OID && RelationGetIndexExpressions(ir) == NIL &&
				  RelationGetIndexPredicate(ir) == NIL;

		index_close(ir, AccessShareLock);
		if (!ok)
			return false;
	}
	t->nindexes = list_length(ids);
	t->index_info = MemoryContextAllocZero(t->cxt, sizeof(IndexInfo *) * (t->nindexes + 1));
	i = 0;
	foreach (lc, ids)
	{
		Relation	  ir = index_open(lfirst_oid(lc), AccessShareLock);
		MemoryContext old = MemoryContextSwitchTo(t->cxt);

		t->index_info[i++] = BuildIndexInfo(ir);
		MemoryContextSwitchTo(old);
		index_close(ir, AccessShareLock);
	}
	pi = index_open(t->pk_index, AccessShareLock);
	t->eq_proc = MemoryContextAlloc(t->cxt, sizeof(RegProcedure) * t->npk);
	t->eq_coll = MemoryContextAlloc(t->cxt, sizeof(Oid) * t->npk);
	for (i = 0; i < t->npk; i++)
	{
		Oid op;

		if (pi->rd_index->indnkeyatts != t->npk || pi->rd_index->indkey.values[i] != i + 1)
			break;
		op = get_opfamily_member(pi->rd_opfamily[i], pi->rd_opcintype[i], pi->rd_opcintype[i],
								 BTEqualStrategyNumber);
		if (!OidIsValid(op))
			break;
		t->eq_proc[i] = get_opcode(op);
		t->eq_coll[i] = pi->rd_indcollation[i];
	}
	index_close(pi, AccessShareLock);
	if (i < t->npk)
		return false;
	t->direct_state = 1;
	return true;
}

/* pgsync_clock_direct: whether the clock table of t may be read and written
 * through its key index directly (t->pk_index, t->eq_proc: direct_setup). */
bool
pgsync_clock_direct(db_table *t)
{
	Relation rel;
	bool	 ok;

	if (t->direct_state != 0)
		return t->direct_state > 0;
	rel = table_open(t->clock_relid, AccessShareLock);
	ok = direct_setup(t, rel);
	table_close(rel, NoLock);
	return ok;
}

/* index_key_values: the key columns of index ir taken from a clock row. */
static void
index_key_values(Relation ir, const Datum *values, Datum *iv)
{
	int k;

	for (k = 0; k < ir->rd_index->indnatts; k++)
		iv[k] = values[ir->rd_index->indkey.values[k] - 1];
}

/*
 * pgsync_clock_insert_direct inserts the clock row of a key never seen,
 * bypassing the executor (the insert-heavy path costs one heap insert and
 * the index inserts). Returns false, having written nothing,
 * when a clock row for pk exists (committed or in progress) or the fast path
 * does not apply; the caller then takes the SPI path.
 */
bool
pgsync_clock_insert_direct(db_table *t, Datum *pk, int64 cl, int64 ver, bytea *clk)
{
	Relation  rel = table_open(t->clock_relid, RowExclusiveLock);
	Relation  pi;
	Datum	  iv[INDEX_MAX_KEYS];
	bool	  in[INDEX_MAX_KEYS] = {false};
	Datum	 *values;
	bool	 *nulls;
	HeapTuple tup;
	List	 *ids;
	ListCell *lc;

	if (!direct_setup(t, rel) || list_length(ids = RelationGetIndexList(rel)) != t->nindexes)
	{
		table_close(rel, NoLock);
		return false;
	}
	pi = index_open(t->pk_index, RowExclusiveLock);

	values = palloc(sizeof(Datum) * (t->npk + 3));
	nulls = palloc0(sizeof(bool) * (t->npk + 3));
	memcpy(values, pk, sizeof(Datum) * t->npk);
	values[t->npk] = Int64GetDatum(cl);
	values[t->npk + 1] = Int64GetDatum(ver);
	values[t->npk + 2] = PointerGetDatum(clk);
	tup = heap_form_tuple(RelationGetDescr(rel), values, nulls);
	simple_heap_insert(rel, tup);

	/*
	 * The key index first, in UNIQUE_CHECK_PARTIAL mode: it reports a
	 * possible duplicate (a clock row of this key exists or is being
	 * written) instead of raising. Then our tuple is deleted again (the
	 * index entry points to a dead tuple, as after any aborted insert) and
	 * the caller takes the SPI path, which waits and merges properly.
	 */
	index_key_values(pi, values, iv);
	if (!index_insert(pi, iv, in, &tup->t_self, rel, UNIQUE_CHECK_PARTIAL, false,
					  t->index_info[list_index_of_oid(ids, t->pk_index)]))
	{
		CommandCounterIncrement(); /* our tuple must be visible to delete it */
		simple_heap_delete(rel, &tup->t_self);
		index_close(pi, NoLock);
		table_close(rel, NoLock);
		heap_freetuple(tup);
		return false;
	}
	foreach (lc, ids)
	{
		Oid		 ioid = lfirst_oid(lc);
		Relation ir;

		if (ioid == t->pk_index)
			continue;
		ir = index_open(ioid, RowExclusiveLock);
		index_key_values(ir, values, iv);
		index_insert(ir, iv, in, &tup->t_self, rel,
					 ir->rd_index->indisunique ? UNIQUE_CHECK_YES : UNIQUE_CHECK_NO, false,
					 t->index_info[foreach_current_index(lc)]);
		index_close(ir, NoLock);
	}
	index_close(pi, NoLock);
	table_close(rel, NoLock);
	heap_freetuple(tup);
	return true;
}

/*
 * pgsync_clock_lookup_direct reads the clock row of pk through the key index
 * with a fresh snapshot (this transaction's earlier writes included), like
 * the SPI SELECT it replaces but without executor start-up. Returns -1 when
 * the direct path does not apply, else whether the row was found; *clk is a
 * copy in CurrentMemoryContext.
 */
int
pgsync_clock_lookup_direct(db_table *t, Datum *pk, int64 *cl, bytea **clk)
{
	Relation		rel = table_open(t->clock_relid, AccessShareLock);
	Relation		pi;
	ScanKeyData		keys[INDEX_MAX_KEYS];
	IndexScanDesc	scan;
	TupleTableSlot *slot;
	Snapshot		snap;
	bool			found;
	int				i;

	if (!direct_setup(t, rel))
	{
		table_close(rel, NoLock);
		return -1;
	}
	pi = index_open(t->pk_index, AccessShareLock);
	for (i = 0; i < t->npk; i++)
		ScanKeyEntryInitialize(&keys[i], 0, i + 1, BTEqualStrategyNumber, InvalidOid, t->eq_coll[i],
							   t->eq_proc[i], pk[i]);
	CommandCounterIncrement();
	snap = RegisterSnapshot(GetTransactionSnapshot());
	scan = index_beginscan(rel, pi, snap, NULL, t->npk, 0);
	index_rescan(scan, keys, t->npk, NULL, 0);
	slot = table_slot_create(rel, NULL);
	found = index_getnext_slot(scan, ForwardScanDirection, slot);
	if (found)
	{
		bool isnull;

		*cl = DatumGetInt64(slot_getattr(slot, t->npk + 1, &isnull));
		*clk = DatumGetByteaPCopy(slot_getattr(slot, t->npk + 3, &isnull));
	}
	index_endscan(scan);
	ExecDropSingleTupleTableSlot(slot);
	UnregisterSnapshot(snap);
	index_close(pi, NoLock);
	table_close(rel, NoLock);
	return found ? 1 : 0;
}

/* capture_insert: a row with key pk appeared (or re-appeared). */
static void
capture_insert(db_table *t, Datum *pk)
{
	clock_row r;

	/* common case: a key never seen */
	{
		uint8_t			*blob;
		size_t			 len;
		bytea			*bb;
		Datum			*vals = palloc(sizeof(Datum) * (t->npk + 3));
		pgsync_user_save us;
		int				 rc;
		int64			 cl1 = pgsync_gc_life(t, false); /* 1, or above the GC floor */

		pgsync_capture_fresh(t, &blob, &len);
		if (pgsync_clock_insert_direct(t, pk, cl1, pgsync_txn_version(), t->fresh_bytea))
			return;
		bb = t->fresh_bytea; /* pgsync_capture_fresh keeps the blob as a bytea */
		memcpy(vals, pk, sizeof(Datum) * t->npk);
		vals[t->npk] = Int64GetDatum(cl1);
		vals[t->npk + 1] = Int64GetDatum(pgsync_txn_version());
		vals[t->npk + 2] = PointerGetDatum(bb);
		pgsync_as_meta(&us);
		rc = SPI_execute_plan(pgsync_plan_clock_insnew(t), vals, NULL, false, 0);
		pgsync_as_caller(&us);
		if (rc != SPI_OK_INSERT)
			elog(ERROR, "writing the clock of %s failed", t->name);
		if (SPI_processed == 1)
			return;
	}

	local_edit(t, pk, &r, PGS_LOCAL_INSERT, NULL);
}

/* capture_delete: the row with key pk is gone. */
static void
capture_delete(db_table *t, Datum *pk)
{
	clock_row r;

	local_edit(t, pk, &r, PGS_LOCAL_DELETE, NULL);
}

/* capture_update: columns with changed[i] were written. */
static void
capture_update(db_table *t, Datum *pk, const bool *changed)
{
	clock_row r;

	local_edit(t, pk, &r, PGS_LOCAL_UPDATE, changed);
}

static void
get_pk(db_table *t, HeapTuple tup, TupleDesc td, Datum *pk)
{
	int	 i;
	bool isnull;

	for (i = 0; i < t->npk; i++)
	{
		pk[i] = heap_getattr(tup, t->pk[i].attnum, td, &isnull);
		if (isnull)
			elog(ERROR, "pgsync: null primary key in table %s", t->name);
	}
}

/*
 * applying_this_row: is the trigger's row the one sync_apply_payload is
 * writing (its clock is the apply's)? A row the write changes elsewhere (a
 * cascaded delete, a trigger's write to another synced row) is captured
 * like any local write, so that it reaches the other replicas.
 */
static bool
applying_this_row(TriggerData *td)
{
	Oid		  relid = RelationGetRelid(td->tg_relation);
	db_table *t;
	bool	  same_row = true;

	if (!OidIsValid(pgsync_apply_relid))
		return true; /* held changes, or a write outside do_write: the apply's */
	if (relid != pgsync_apply_relid || !pgsync_apply_key)
		return false;
	if ((t = pgsync_table_cached(relid)) == NULL)
		return true;
	for (int i = 0; i < t->npk && same_row; i++)
	{
		bool  isnull;
		Datum d = heap_getattr(td->tg_trigtuple, t->pk[i].attnum, RelationGetDescr(td->tg_relation),
							   &isnull);

		same_row =
			!isnull && datum_image_eq(d, pgsync_apply_key[i], t->pk[i].typbyval, t->pk[i].typlen);
	}
	t->busy--;
	return same_row;
}

static bool
same(pgsync_col *c, HeapTuple a, HeapTuple b, TupleDesc td)
{
	bool  na, nb;
	Datum da = heap_getattr(a, c->attnum, td, &na);
	Datum db = heap_getattr(b, c->attnum, td, &nb);

	if (na || nb)
		return na == nb;
	return datum_image_eq(da, db, c->typbyval, c->typlen);
}

/* sync_capture(): the trigger installed by sync_init. */
Datum
sync_capture(PG_FUNCTION_ARGS)
{
	TriggerData *td;
	db_table	*t;
	TupleDesc	 desc;
	Datum		*pk;

	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR, (errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
						errmsg("sync_capture() must be called as a trigger")));
	td = (TriggerData *) fcinfo->context;
	if (TRIGGER_FIRED_BY_TRUNCATE(td->tg_event))
	{
		if (!pgsync_applying)
			ereport(ERROR, (errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
							errmsg("cannot truncate synced table \"%s\"",
								   RelationGetRelationName(td->tg_relation)),
							errhint("Use DELETE so the deletions reach the other replicas, or call "
									"sync_cleanup first.")));
		return PointerGetDatum(NULL);
	}
	if (!TRIGGER_FIRED_FOR_ROW(td->tg_event) || !TRIGGER_FIRED_AFTER(td->tg_event))
		ereport(ERROR, (errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
						errmsg("sync_capture() must be an AFTER ROW trigger")));
	if (pgsync_applying && applying_this_row(td))
		return PointerGetDatum(NULL);
	pgsync_wrote_xid = GetTopFullTransactionId();

	/* fast path without SPI: insert of a new key, entry and fresh blob ready */
	if (TRIGGER_FIRED_BY_INSERT(td->tg_event) &&
		(t = pgsync_table_cached(RelationGetRelid(td->tg_relation))) != NULL)
	{
		FullTransactionId x = GetTopFullTransactionIdIfAny();
		bool			  done = false;

		if (t->fresh_bytea && FullTransactionIdEquals(t->fresh_xid, x))
		{
			pk = palloc(sizeof(Datum) * t->npk);
			get_pk(t, td->tg_trigtuple, RelationGetDescr(td->tg_relation), pk);
			done = pgsync_clock_insert_direct(t, pk, 1, pgsync_txn_version(), t->fresh_bytea);
		}
		t->busy--;
		if (done)
			return PointerGetDatum(NULL);
	}

	SPI_connect();
	pgsync_core_memory(CurrentMemoryContext);
	t = pgsync_table_get(RelationGetRelid(td->tg_relation), false);
	desc = RelationGetDescr(td->tg_relation);
	pk = palloc(sizeof(Datum) * t->npk);

	if (t->algo == DB_ALGO_GSET && !TRIGGER_FIRED_BY_INSERT(td->tg_event))
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("cannot %s rows of table %s: it is synced as insert-only (gset)",
						TRIGGER_FIRED_BY_UPDATE(td->tg_event) ? "update" : "delete", t->name),
				 errhint("Rows of a gset table are never updated or deleted; sync the table with "
						 "algorithm 'cls' to allow it.")));

	if (TRIGGER_FIRED_BY_INSERT(td->tg_event))
	{
		get_pk(t, td->tg_trigtuple, desc, pk);
		capture_insert(t, pk);
	}
	else if (TRIGGER_FIRED_BY_DELETE(td->tg_event))
	{
		get_pk(t, td->tg_trigtuple, desc, pk);
		capture_delete(t, pk);
	}
	else
	{
		HeapTuple oldt = td->tg_trigtuple;
		HeapTuple newt = td->tg_newtuple;
		bool	  keychange = false;
		bool	  any = false;
		bool	 *changed = palloc0(sizeof(bool) * Max(t->ncols, 1));
		int		  i;

		for (i = 0; i < t->npk; i++)
			keychange |= !same(&t->pk[i], oldt, newt, desc);
		if (keychange)
		{
			get_pk(t, oldt, desc, pk);
			capture_delete(t, pk);
			get_pk(t, newt, desc, pk);
			capture_insert(t, pk);
		}
		else
		{
			for (i = 0; i < t->ncols; i++)
			{
				changed[i] = !same(&t->cols[i], oldt, newt, desc);
				any |= changed[i];
			}
			if (any)
			{
				get_pk(t, newt, desc, pk);
				capture_update(t, pk, changed);
			}
		}
	}
	t->busy--;
	pgsync_core_memory(NULL);
	SPI_finish();
	return PointerGetDatum(NULL);
}

/*
 * pgsync_payload_guard: a payload carries committed changes only: built inside a
 * transaction that changed synced rows it would hand out changes that may
 * still roll back.
 */
void
pgsync_payload_guard(void)
{
	if (FullTransactionIdIsValid(pgsync_wrote_xid) &&
		FullTransactionIdEquals(GetTopFullTransactionIdIfAny(), pgsync_wrote_xid))
		ereport(ERROR, (errcode(ERRCODE_INVALID_TRANSACTION_STATE),
						errmsg("sync_payload cannot run in a transaction that changed synced rows"),
						errhint("Commit first, then call sync_payload in a new transaction.")));
}

/*
 * pgsync_capture_backfill: sync_init of a new table: every existing row gets a
 * fresh clock of this transaction (life 1, every column stamped now), and
 * the clock table its statistics (pulls plan on them).
 */
void
pgsync_capture_backfill(Oid relid)
{
	db_table		*t = pgsync_table_get(relid, false);
	StringInfoData	 b;
	uint8_t			*blob;
	size_t			 len;
	Oid				 types[2] = {INT8OID, BYTEAOID};
	Datum			 v[2];
	pgsync_user_save us;

	pgsync_capture_fresh(t, &blob, &len);
	v[0] = Int64GetDatum(pgsync_txn_version());
	v[1] = PointerGetDatum(t->fresh_bytea); /* pgsync_capture_fresh keeps the blob as a bytea */
	initStringInfo(&b);
	appendStringInfo(&b, "INSERT INTO %s (", t->q_clock);
	pgsync_pk_list(&b, t, NULL);
	appendStringInfoString(&b, ", cl, ver, clk) SELECT ");
	pgsync_pk_list(&b, t, NULL);
	appendStringInfo(&b, ", 1, $1, $2 FROM %s ON CONFLICT DO NOTHING", t->q_base);
	pgsync_as_meta(&us);
	if (SPI_execute_with_args(b.data, 2, types, v, NULL, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "pgsync: backfilling the clock table failed");
	resetStringInfo(&b);
	appendStringInfo(&b, "ANALYZE %s", t->q_clock);
	if (SPI_execute(b.data, false, 0) != SPI_OK_UTILITY)
		elog(ERROR, "pgsync: \"%s\" failed", b.data);
	pgsync_as_caller(&us);
	pfree(b.data);
}
