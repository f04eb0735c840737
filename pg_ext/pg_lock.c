/*
 * pg_lock.c — how concurrent applies, and applies and local writers, share
 * rows (docs/PG.md, "Concurrency").
 *
 * There is no global lock. Two rules keep applies apart from each other and
 * from local writers without deadlocks and without losing a change:
 *
 * 1. Applies queue for the rows they share. db_apply_lock, called by the
 *    core before the first write, takes per payload table a table-level
 *    advisory lock (shared; exclusive for a payload with more rows than
 *    PG_LOCK_ROWS_MAX, which then takes no row locks) and per row an
 *    exclusive advisory lock on (table, key hash), all in one global order:
 *    tables by oid, then rows by hash. Nobody waits for these locks while
 *    holding row locks of an apply (rule 2; local writers never take them),
 *    so two applies that share rows wait for each other here, in that
 *    order, and never deadlock. Rows found later (local keys matched by
 *    removal candidates) are locked without waiting: taken, or the apply
 *    gives way.
 *
 * 2. An apply never waits for another transaction while it holds locks that
 *    transaction may be waiting for. Before it writes a row it looks for a
 *    transaction writing that row (a dirty-snapshot probe of the base key
 *    index: a local writer always writes the base row, its clock row comes
 *    from the capture trigger in the same transaction); if there is one, it
 *    gives way (ERROR 55P03, the writer's xid recorded). Nothing else writes
 *    a clock row alone during a merge (sync_gc takes SHARE ROW EXCLUSIVE on
 *    the clock table without waiting, which the apply's ROW EXCLUSIVE
 *    excludes; other applies queue at rule 1); an administrator's direct
 *    write of one is met as a lock wait, below. Every other lock wait while it merges is cut
 *    short by lock_timeout = PG_LOCK_WAIT_MS: a row merely locked (SELECT
 *    ... FOR UPDATE, a foreign-key check of a concurrent child insert), a
 *    parent row, a user trigger. sync_apply_payload then rolls the attempt
 *    back, which releases every lock it took, waits for what blocked it while
 *    holding nothing (pgsync_apply_wait), and applies again.
 *
 *    So a local transaction can only meet an apply in a deadlock if the apply
 *    waits, and an apply's wait lasts at most PG_LOCK_WAIT_MS: a cycle through
 *    an apply is broken by the apply, before the local transaction's own
 *    deadlock check (deadlock_timeout) runs, unless that check falls inside
 *    the same millisecond. That is possible only when the apply's wait is one
 *    the probe cannot see (a merely locked row) and the local transaction had
 *    already waited deadlock_timeout - 1 ms for the apply.
 *
 * 3. A writer that committed between the apply's clock read and its row
 *    write is caught by the compare-and-set on the clock row
 *    (pg_database.c, db_clock_put): the attempt runs again.
 *
 * Versions need no lock: they are transaction ids (pg_capture.c).
 */
#include "pg_internal.h"

#include "access/genam.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_class.h"
#include "common/pg_prng.h"
#include "executor/tuptable.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/latch.h"
#include "storage/lmgr.h"
#include "storage/lock.h"
#include "storage/procarray.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"

/* advisory lock tags: (database, table oid, key hash, kind); user advisory
 * locks use kinds 1 and 2, so ours never meet them */
#define LOCK_KIND_TABLE 0x7073
#define LOCK_KIND_ROW 0x7072

pgsync_yield pgsync_apply_yield;

/* the row the running apply writes (for a lock wait that timed out) */
static db_table		   *cur_t;
static const pgs_value *cur_pk;

typedef struct lock_row
{
	Oid		  relid;
	uint32	  hash;
	db_table *t;
} lock_row;

typedef struct lock_table
{
	Oid	 relid;
	bool coarse; /* exclusive table lock, no row locks */
} lock_table;

struct pgsync_locks
{
	bool		taken; /* the first db_apply_lock of this attempt ran */
	int			nfine; /* row locks held */
	int			ntables;
	int			tables_cap;
	lock_table *tables;
};

static int
cmp_rows(const void *x, const void *y)
{
	const lock_row *a = x, *b = y;

	if (a->relid != b->relid)
		return a->relid < b->relid ? -1 : 1;
	return a->hash < b->hash ? -1 : a->hash > b->hash;
}

static void
row_tag(LOCKTAG *tag, Oid relid, uint32 hash)
{
	SET_LOCKTAG_ADVISORY(*tag, MyDatabaseId, relid, hash, LOCK_KIND_ROW);
}

static void
table_tag(LOCKTAG *tag, Oid relid)
{
	SET_LOCKTAG_ADVISORY(*tag, MyDatabaseId, relid, 0, LOCK_KIND_TABLE);
}

static lock_table *
find_table(struct pgsync_locks *lk, Oid relid)
{
	for (int i = 0; i < lk->ntables; i++)
		if (lk->tables[i].relid == relid)
			return &lk->tables[i];
	return NULL;
}

static lock_table *
add_table(db_conn *db, struct pgsync_locks *lk, Oid relid, bool coarse)
{
	if (lk->ntables == lk->tables_cap)
	{
		int			cap = lk->tables_cap ? lk->tables_cap * 2 : 8;
		lock_table *n = MemoryContextAlloc(db->cxt, sizeof(lock_table) * cap);

		if (lk->ntables)
			memcpy(n, lk->tables, sizeof(lock_table) * lk->ntables);
		lk->tables = n;
		lk->tables_cap = cap;
	}
	lk->tables[lk->ntables] = (lock_table){relid, coarse};
	return &lk->tables[lk->ntables++];
}

/* give_way_tag: a row lock another apply holds; wait for it between attempts. */
pg_noreturn static void
give_way_tag(const LOCKTAG *tag, LOCKMODE mode, db_table *t)
{
	pgsync_apply_yield.set = true;
	pgsync_apply_yield.tag = *tag;
	pgsync_apply_yield.tag_mode = mode;
	pgsync_apply_yield.have_tag = true;
	ereport(ERROR, (errcode(ERRCODE_LOCK_NOT_AVAILABLE),
					errmsg("rows of table %s are being applied by another transaction", t->name),
					errhint("sync_apply_payload waits for it and applies again.")));
	pg_unreachable();
}

/* take: one lock; late ones only if free at once. */
static void
take(const LOCKTAG *tag, LOCKMODE mode, bool late, db_table *t)
{
	if (LockAcquire(tag, mode, false, late) == LOCKACQUIRE_NOT_AVAIL)
		give_way_tag(tag, mode, t);
}

/* arm: from now on every lock wait of this attempt is cut short. */
static void
arm(int ms)
{
	char v[32];

	snprintf(v, sizeof v, "%dms", ms);
	(void) set_config_option("lock_timeout", v, PGC_USERSET, PGC_S_SESSION, GUC_ACTION_SAVE, true,
							 0, false);
	pgsync_apply_yield.armed = true;
}

/*
 * db_apply_lock: rule 1 above. The first call of an attempt waits for the
 * locks (it holds no row lock yet); later calls take only locks that are
 * free at once.
 */
pgs_rc
db_apply_lock(db_conn *db, const db_lock_key *keys, uint32_t n, pgs_err *err)
{
	struct pgsync_locks *lk = db->locks;
	lock_row			*rows = palloc(sizeof(lock_row) * (n + 1));
	uint32				 m = 0;
	bool				 late;

	if (lk == NULL)
		lk = db->locks = MemoryContextAllocZero(db->cxt, sizeof(struct pgsync_locks));
	late = lk->taken;
	for (uint32 i = 0; i < n; i++)
		rows[i] =
			(lock_row){keys[i].t->relid, (uint32) (keys[i].hash ^ (keys[i].hash >> 32)), keys[i].t};
	qsort(rows, n, sizeof(lock_row), cmp_rows);
	for (uint32 i = 0; i < n; i++)
		if (m == 0 || cmp_rows(&rows[m - 1], &rows[i]) != 0)
			rows[m++] = rows[i];

	if (!late)
	{
		/* tables: relation locks first (so that no DDL wait falls in the
		 * merge), then the table-level advisory locks, then the rows */
		for (uint32 i = 0; i < m;)
		{
			uint32 j = i;

			while (j < m && rows[j].relid == rows[i].relid)
				j++;
			LockRelationOid(rows[i].t->relid, RowExclusiveLock);
			LockRelationOid(rows[i].t->clock_relid, RowExclusiveLock);
			add_table(db, lk, rows[i].relid, false);
			i = j;
		}
		/* too many rows: the largest tables take one exclusive lock instead */
		{
			uint32 *count = palloc0(sizeof(uint32) * lk->ntables);
			uint32	total = m;

			for (uint32 i = 0, k = 0; i < m; i++)
			{
				while (lk->tables[k].relid != rows[i].relid)
					k++;
				count[k]++;
			}
			while (total > PG_LOCK_ROWS_MAX)
			{
				int big = -1;

				for (int k = 0; k < lk->ntables; k++)
					if (!lk->tables[k].coarse && (big < 0 || count[k] > count[big]))
						big = k;
				lk->tables[big].coarse = true;
				total -= count[big];
			}
			pfree(count);
		}
		for (int k = 0; k < lk->ntables; k++)
		{
			LOCKTAG tag;

			table_tag(&tag, lk->tables[k].relid);
			take(&tag, lk->tables[k].coarse ? ExclusiveLock : ShareLock, false, NULL);
		}
		for (uint32 i = 0; i < m; i++)
		{
			LOCKTAG tag;

			if (find_table(lk, rows[i].relid)->coarse)
				continue;
			row_tag(&tag, rows[i].relid, rows[i].hash);
			take(&tag, ExclusiveLock, false, rows[i].t);
			lk->nfine++;
		}
		lk->taken = true;
		if (db->lock_wait_ms > 0)
			arm(db->lock_wait_ms);
	}
	else
	{
		for (uint32 i = 0; i < m; i++)
		{
			lock_table *lt = find_table(lk, rows[i].relid);
			LOCKTAG		tag;

			if (lt == NULL)
			{
				LockRelationOid(rows[i].t->relid, RowExclusiveLock);
				LockRelationOid(rows[i].t->clock_relid, RowExclusiveLock);
				lt = add_table(db, lk, rows[i].relid, false);
				table_tag(&tag, lt->relid);
				take(&tag, ShareLock, true, rows[i].t);
			}
			if (lt->coarse)
				continue;
			if (lk->nfine >= PG_LOCK_ROWS_MAX)
			{
				/* our own share lock does not conflict with our exclusive one */
				table_tag(&tag, lt->relid);
				take(&tag, ExclusiveLock, true, rows[i].t);
				lt->coarse = true;
				continue;
			}
			row_tag(&tag, rows[i].relid, rows[i].hash);
			take(&tag, ExclusiveLock, true, rows[i].t);
			lk->nfine++;
		}
	}
	pfree(rows);
	return PGS_OK;
}

/* ---- who writes a row ------------------------------------------------------ */

/*
 * writer_of: the transaction (not ours) that is inserting, updating or
 * deleting the row of relation relid whose primary-key columns attnums[]
 * (in t's key order) have the values pk[], or InvalidTransactionId. Reads
 * the key index with a dirty snapshot, the way a unique check does.
 */
static TransactionId
writer_of(Oid relid, db_table *t, const AttrNumber *attnums, Datum *pk)
{
	Relation		rel = table_open(relid, AccessShareLock);
	Oid				pkoid = RelationGetPrimaryKeyIndex(rel, false);
	Relation		ir;
	ScanKeyData		keys[INDEX_MAX_KEYS];
	SnapshotData	dirty;
	IndexScanDesc	scan;
	TupleTableSlot *slot;
	TransactionId	found = InvalidTransactionId;
	int				nk;

	if (!OidIsValid(pkoid))
	{
		table_close(rel, NoLock);
		return InvalidTransactionId;
	}
	ir = index_open(pkoid, AccessShareLock);
	nk = ir->rd_index->indnkeyatts;
	for (int k = 0; k < nk; k++)
	{
		int i;
		Oid op;

		for (i = 0; i < t->npk && attnums[i] != ir->rd_index->indkey.values[k]; i++)
			;
		op = i < t->npk ? get_opfamily_member(ir->rd_opfamily[k], ir->rd_opcintype[k],
											  ir->rd_opcintype[k], BTEqualStrategyNumber)
						: InvalidOid;
		if (!OidIsValid(op))
		{
			index_close(ir, NoLock);
			table_close(rel, NoLock);
			return InvalidTransactionId;
		}
		ScanKeyEntryInitialize(&keys[k], 0, k + 1, BTEqualStrategyNumber, InvalidOid,
							   ir->rd_indcollation[k], get_opcode(op), pk[i]);
	}
	InitDirtySnapshot(dirty);
	scan = index_beginscan(rel, ir, &dirty, NULL, nk, 0);
	index_rescan(scan, keys, nk, NULL, 0);
	slot = table_slot_create(rel, NULL);
	while (index_getnext_slot(scan, ForwardScanDirection, slot))
	{
		TransactionId x = TransactionIdIsValid(dirty.xmin) ? dirty.xmin : dirty.xmax;

		if (TransactionIdIsValid(x))
		{
			found = x;
			break;
		}
	}
	index_endscan(scan);
	ExecDropSingleTupleTableSlot(slot);
	index_close(ir, NoLock);
	table_close(rel, NoLock);
	return found;
}

/* key_datums: the key values as Datums of the key columns' types (they
 * converted already when the apply read the row's clock). */
static Datum *
key_datums(db_table *t, const pgs_value *pk)
{
	Datum *d = palloc(sizeof(Datum) * t->npk);

	for (int i = 0; i < t->npk; i++)
	{
		bool isnull;

		d[i] = pgsync_value_datum(&t->pk[i], &pk[i], &isnull, t, pk);
	}
	return d;
}

/* row_writer: a transaction writing the base row of pk, or (clock_too) its clock row. */
static TransactionId
row_writer(db_table *t, Datum *pk, bool clock_too)
{
	AttrNumber	 *cols = palloc(sizeof(AttrNumber) * t->npk);
	TransactionId x;

	for (int i = 0; i < t->npk; i++)
		cols[i] = t->pk[i].attnum;
	x = writer_of(t->relid, t, cols, pk);
	if (!TransactionIdIsValid(x) && clock_too)
	{
		/* the clock table's key columns come first, in key order */
		for (int i = 0; i < t->npk; i++)
			cols[i] = (AttrNumber) (i + 1);
		x = writer_of(t->clock_relid, t, cols, pk);
	}
	pfree(cols);
	return x;
}

/*
 * pgsync_lock_row: the apply is about to write row pk of t:
 * remembered for a lock wait that times out, and, when another transaction
 * is writing the row, the apply gives way (rule 2) instead of waiting while
 * it holds its other rows.
 */
void
pgsync_lock_row(db_conn *db, db_table *t, const pgs_value *pk)
{
	TransactionId x;

	cur_t = t;
	cur_pk = pk;
	if (db->lock_wait_ms <= 0)
		return; /* not inside sync_apply_payload's retry loop: wait as usual */
	x = row_writer(t, key_datums(t, pk), false);
	if (!TransactionIdIsValid(x))
		return;
	pgsync_apply_yield.set = true;
	pgsync_apply_yield.xid = x;
	ereport(ERROR, (errcode(ERRCODE_LOCK_NOT_AVAILABLE),
					errmsg("row %s of table %s is being written by another transaction",
						   pgsync_pk_text(t, pk), t->name),
					errhint("sync_apply_payload waits for it and applies again.")));
}

/* pgsync_lock_clock: the apply is about to write the clock row of pk. */
void
pgsync_lock_clock(db_table *t, const pgs_value *pk)
{
	cur_t = t;
	cur_pk = pk;
}

/* ---- between attempts ------------------------------------------------------ */

void
pgsync_apply_yield_reset(void)
{
	memset(&pgsync_apply_yield, 0, sizeof(pgsync_apply_yield));
	cur_t = NULL;
	cur_pk = NULL;
}

/* owner_of: the owner of relation relid. */
static Oid
owner_of(Oid relid)
{
	HeapTuple tup = SearchSysCache1(RELOID, ObjectIdGetDatum(relid));
	Oid		  o;

	if (!HeapTupleIsValid(tup))
		return InvalidOid;
	o = ((Form_pg_class) GETSTRUCT(tup))->relowner;
	ReleaseSysCache(tup);
	return o;
}

/*
 * wait_locked: wait until nobody holds a lock on the base row of pk that a
 * write would wait for (a row merely locked is invisible to the probe), by
 * locking it in a subtransaction that is then rolled back. As the table's
 * owner, past row-level security, like a foreign-key check. Any error (the
 * owner may not lock it) is swallowed: the caller backs off instead.
 */
static void
wait_locked(db_table *t, Datum *pk)
{
	MemoryContext  cxt = CurrentMemoryContext;
	ResourceOwner  owner = CurrentResourceOwner;
	Oid			   relowner = owner_of(t->relid);
	StringInfoData b;
	Oid			   save_user;
	int			   save_sec;

	if (!OidIsValid(relowner))
		return;
	initStringInfo(&b);
	appendStringInfo(&b, "SELECT 1 FROM %s WHERE ", t->q_base);
	for (int i = 0; i < t->npk; i++)
		appendStringInfo(&b, "%s%s OPERATOR(pg_catalog.=) $%d", i ? " AND " : "",
						 quote_identifier(t->pk[i].name), i + 1);
	appendStringInfoString(&b, " FOR UPDATE");
	GetUserIdAndSecContext(&save_user, &save_sec);
	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(cxt);
	PG_TRY();
	{
		SetUserIdAndSecContext(relowner,
							   save_sec | SECURITY_LOCAL_USERID_CHANGE | SECURITY_NOFORCE_RLS);
		(void) SPI_execute_with_args(b.data, t->npk, t->pk_types, pk, NULL, false, 1);
		SetUserIdAndSecContext(save_user, save_sec);
	}
	PG_CATCH();
	{
		SetUserIdAndSecContext(save_user, save_sec);
		MemoryContextSwitchTo(cxt);
		FlushErrorState();
	}
	PG_END_TRY();
	/* the lock was only a way to wait: let it go */
	RollbackAndReleaseCurrentSubTransaction();
	MemoryContextSwitchTo(cxt);
	CurrentResourceOwner = owner;
}

static void
backoff(int round)
{
	long ms = 1L << Min(round, 6); /* 2 ms .. 64 ms, plus as much jitter */

	ms += (long) pg_prng_uint64_range(&pg_global_prng_state, 0, (uint64) ms);
	(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, ms,
					 PG_WAIT_EXTENSION);
	ResetLatch(MyLatch);
	CHECK_FOR_INTERRUPTS();
}

/*
 * pgsync_apply_wait: the attempt gave way (or was cut short, or was chosen as a
 * deadlock victim) and has been rolled back: it holds no lock of its own
 * any more. Wait for what blocked it, then the caller applies again: for
 * the writer it gave way to, for the other apply's row lock, or for the
 * row it was writing when the wait timed out; when there is nothing to
 * wait for (the blocker was elsewhere: a parent row, a trigger), back off
 * for a while that grows with round. SPI connected.
 */
void
pgsync_apply_wait(int round)
{
	TimestampTz t0 = GetCurrentTimestamp();

	if (TransactionIdIsValid(pgsync_apply_yield.xid))
	{
		if (TransactionIdIsInProgress(pgsync_apply_yield.xid))
			XactLockTableWait(pgsync_apply_yield.xid, NULL, NULL, XLTW_None);
	}
	else if (pgsync_apply_yield.have_tag)
	{
		(void) LockAcquire(&pgsync_apply_yield.tag, pgsync_apply_yield.tag_mode, false, false);
		LockRelease(&pgsync_apply_yield.tag, pgsync_apply_yield.tag_mode, false);
	}
	else if (cur_t && cur_pk)
	{
		Datum		 *keys = key_datums(cur_t, cur_pk);
		TransactionId x = row_writer(cur_t, keys, true);

		if (TransactionIdIsValid(x))
			XactLockTableWait(x, NULL, NULL, XLTW_None);
		else
			wait_locked(cur_t, keys);
	}
	/* nothing was in the way any more (or it was elsewhere): back off */
	if (TimestampDifferenceExceeds(t0, GetCurrentTimestamp(), 1) == false)
		backoff(round);
	pgsync_apply_yield_reset();
}
