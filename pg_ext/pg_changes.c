/*
 * pg_changes.c — the database.h cursors on PostgreSQL: the changes of a
 * table since a version (db_changes_*: by the ver index for few rows, by
 * key for a chunked or keyed read, every row for a snapshot), and every key
 * of a table (db_keys_*), as the caller may see them. The rest of the seam
 * is pg_database.c.
 */
#include "pg_internal.h"

#include "access/genam.h"
#include "access/nbtree.h"
#include "access/relscan.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_am.h"
#include "catalog/pg_type.h"
#include "miscadmin.h"
#include "nodes/nodeFuncs.h"
#include "nodes/pathnodes.h"
#include "optimizer/optimizer.h"
#include "optimizer/plancat.h"
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

#define FETCH_BATCH 1000
/* a walk of the clock key index (clock_walk) skips at most WALK_GAP entries
 * between two wanted keys before it descends again; after WALK_PROBE keys of
 * a batch it descends for every further key when it skipped more than
 * WALK_SPARSE entries per key (a descent from the root costs about as much
 * as skipping 20 to 30 entries of a leaf) */
#define WALK_GAP 64
#define WALK_PROBE 32
#define WALK_SPARSE 24

/* ---- change enumeration -------------------------------------------------- */

/*
 * Four ways to read, chosen by the caller's access (db_table_view) and
 * whether the table goes out as a snapshot:
 *
 *   full, changes    clock rows above since joined to their base rows, as the
 *                    metadata owner (the caller may see every row anyway)
 *   full, snapshot   live clock rows joined to their base rows
 *   rls, changes     clock rows above since as the metadata owner; their base
 *                    rows probed in batches of FETCH_BATCH keys as the caller:
 *                    a row the probe does not return is not visible (HIDDEN)
 *   rls, snapshot    the caller's base rows in the base key order; their clock
 *                    rows read in batches as the metadata owner: by a walk
 *                    of the clock table's key index (clock_walk) when it can
 *                    be read directly, else by a keyed SELECT
 *
 * Every query is read-only SPI, so all of them read the statement's
 * snapshot: rows, visibility and until (db_version_safe) agree.
 */
typedef struct probe_hit
{
	size_t off; /* key bytes in keys */
	size_t len;
	uint64 row; /* tuple of the probe */
} probe_hit;

struct db_cursor
{
	db_conn		  *db;
	db_table	  *t;
	int			   how; /* 0 full join, 1 rls changes, 2 rls snapshot, 3 keys */
	bool		   snapshot;
	Portal		   portal;
	SPITupleTable *tt;
	uint64		   pos;
	uint64		   n;
	bool		   eof;
	MemoryContext  row_cxt;
	MemoryContext  batch_cxt;
	pgs_value	  *pk;
	pgs_value	  *cols;
	/* rls: the probe of the current batch, sorted by encoded key */
	SPITupleTable *probe;
	probe_hit	  *hits;
	uint64		   nhits;
	pgs_buf		   keys;
	/* rls snapshot: the walk of the clock key index, and the clock row of
	 * each base row of the batch (NULL: none), in the clock table's layout */
	struct clock_walk *walk;
	HeapTuple		  *clock_of;
};

/*
 * clock_walk: the clock rows of a batch of keys read through the clock
 * table's key index in one forward walk instead of one descent per key.
 * The keys of the caller's visible rows often lie close together in key
 * order (one in ten of all keys in bench/pg_bench_pull.py), and with the
 * keyed SELECT (a nested loop, one descent from the root per key) the clock
 * rows were 57 % of a first pull under RLS (perf). The walk compares the
 * index entries with the wanted keys in the index's own order (its btree
 * comparison procedures and collations: the equality of the keyed SELECT
 * it replaces; the batch is sorted that way first when the base key order
 * differs) and reads the heap only for the entries it wants. Sparse keys
 * (WALK_GAP, WALK_SPARSE) get a descent each, as before, without the
 * executor. A descent positions by the first key column, and only towards
 * keys the walk has not passed. Rows are read in the statement's snapshot, the one
 * read-only SPI queries use, and the heap through index_fetch_heap (HOT
 * chains, versions this snapshot does not see).
 */
typedef struct clock_walk
{
	Relation		rel;
	Relation		idx;
	IndexScanDesc	scan;
	TupleTableSlot *slot;
	Snapshot		snap;
	MemoryContext	cxt; /* the scan's: it allocates at its first rescan */
	int				nk;
	FmgrInfo	   *cmp[INDEX_MAX_KEYS]; /* BTORDER_PROC of each key column */
	Oid				coll[INDEX_MAX_KEYS];
	RegProcedure	ge_proc; /* >= of the first key column: where a descent starts */
	bool			have;	 /* an index entry was read and not yet consumed */
	bool			eof;	 /* the walk ran past the last entry */
} clock_walk;

/* walk_open: a walk of t's clock key index, or NULL when the keyed SELECT
 * must do (no direct access, no MVCC snapshot, an unusual clock table). */
static clock_walk *
walk_open(db_table *t, MemoryContext cxt)
{
	clock_walk	 *w;
	TupleDesc	  ctd;
	Snapshot	  snap;
	Oid			  op;
	MemoryContext old;

	if (!ActiveSnapshotSet() || !pgsync_clock_direct(t))
		return NULL;
	snap = GetActiveSnapshot();
	if (!IsMVCCSnapshot(snap))
		return NULL;
	old = MemoryContextSwitchTo(cxt);
	w = palloc0(sizeof(clock_walk));
	w->cxt = cxt;
	w->rel = table_open(t->clock_relid, AccessShareLock);
	ctd = RelationGetDescr(w->rel);
	/* the layout pgsync_clock_lookup_direct reads: key columns, cl, ver, clk */
	if (ctd->natts < t->npk + 3 || TupleDescAttr(ctd, t->npk)->attisdropped ||
		TupleDescAttr(ctd, t->npk + 2)->attisdropped ||
		strcmp(NameStr(TupleDescAttr(ctd, t->npk)->attname), "cl") != 0 ||
		strcmp(NameStr(TupleDescAttr(ctd, t->npk + 2)->attname), "clk") != 0)
	{
		table_close(w->rel, NoLock);
		MemoryContextSwitchTo(old);
		return NULL;
	}
	w->idx = index_open(t->pk_index, AccessShareLock);
	w->nk = t->npk;
	for (int i = 0; i < w->nk; i++)
	{
		w->cmp[i] = index_getprocinfo(w->idx, i + 1, BTORDER_PROC);
		w->coll[i] = w->idx->rd_indcollation[i];
	}
	op = get_opfamily_member(w->idx->rd_opfamily[0], w->idx->rd_opcintype[0],
							 w->idx->rd_opcintype[0], BTGreaterEqualStrategyNumber);
	if (!OidIsValid(op))
	{
		index_close(w->idx, NoLock);
		table_close(w->rel, NoLock);
		MemoryContextSwitchTo(old);
		return NULL;
	}
	w->ge_proc = get_opcode(op);
	w->snap = RegisterSnapshot(snap);
	w->scan = index_beginscan(w->rel, w->idx, w->snap, NULL, 1, 0);
	w->scan->xs_want_itup = true; /* the entries' keys, compared before the heap */
	w->slot = table_slot_create(w->rel, NULL);
	MemoryContextSwitchTo(old);
	return w;
}

static void
walk_close(clock_walk *w)
{
	index_endscan(w->scan);
	ExecDropSingleTupleTableSlot(w->slot);
	UnregisterSnapshot(w->snap);
	index_close(w->idx, NoLock);
	table_close(w->rel, NoLock);
}

/* walk_cmp: the current index entry's key against key k, in index order:
 * 0 equal, -1/1 when the first columns differ, -2/2 when a later one does. */
static int
walk_cmp(clock_walk *w, const Datum *k)
{
	IndexScanDesc s = w->scan;

	for (int i = 0; i < w->nk; i++)
	{
		bool  isnull;
		Datum d = index_getattr(s->xs_itup, i + 1, s->xs_itupdesc, &isnull);
		int32 r;

		if (isnull)
			return 2; /* key columns are NOT NULL: never equal */
		r = DatumGetInt32(FunctionCall2Coll(w->cmp[i], w->coll[i], d, k[i]));
		if (r != 0)
			return (r < 0 ? -1 : 1) * (i == 0 ? 1 : 2);
	}
	return 0;
}

/* walk_first_differs: do keys a and b differ in their first column? */
static bool
walk_first_differs(clock_walk *w, const Datum *a, const Datum *b)
{
	return DatumGetInt32(FunctionCall2Coll(w->cmp[0], w->coll[0], a[0], b[0])) != 0;
}

/* walk_seek: descend again, to the first entry whose first column is >= k's. */
static void
walk_seek(clock_walk *w, const Datum *k)
{
	ScanKeyData	  sk;
	MemoryContext old = MemoryContextSwitchTo(w->cxt);

	ScanKeyEntryInitialize(&sk, 0, 1, BTGreaterEqualStrategyNumber, InvalidOid, w->coll[0],
						   w->ge_proc, k[0]);
	index_rescan(w->scan, &sk, 1, NULL, 0);
	MemoryContextSwitchTo(old);
	w->have = false;
	w->eof = false;
}

static clock_walk *walk_sort_w;
static Datum	  *walk_sort_keys;

static int
walk_sort_cmp(const void *a, const void *b)
{
	const Datum *x = walk_sort_keys + (size_t) * (const int *) a * walk_sort_w->nk;
	const Datum *y = walk_sort_keys + (size_t) * (const int *) b * walk_sort_w->nk;

	for (int i = 0; i < walk_sort_w->nk; i++)
	{
		int32 r =
			DatumGetInt32(FunctionCall2Coll(walk_sort_w->cmp[i], walk_sort_w->coll[i], x[i], y[i]));

		if (r != 0)
			return r;
	}
	return 0;
}

/*
 * walk_batch: c->clock_of[r] = the clock row of base row r of the batch (a
 * copy in the batch context), NULL when it has none (written with capture
 * off).
 */
static void
walk_batch(db_cursor *c)
{
	clock_walk	 *w = c->walk;
	uint64		  n = c->n;
	MemoryContext old = MemoryContextSwitchTo(c->batch_cxt);
	int			 *order = palloc(sizeof(int) * (n + 1));
	Datum		 *keys = palloc(sizeof(Datum) * (n * w->nk + 1));
	bool		  sorted = true, descend = false;
	uint64		  j = 0, skipped = 0;
	int			  gap = 0;

	c->clock_of = palloc0(sizeof(HeapTuple) * (n + 1));
	for (uint64 r = 0; r < n; r++)
	{
		order[r] = (int) r;
		for (int i = 0; i < w->nk; i++)
		{
			bool isnull;

			keys[r * w->nk + i] = SPI_getbinval(c->tt->vals[r], c->tt->tupdesc, i + 1, &isnull);
		}
	}
	/* the base key order is the index's unless their collations differ */
	walk_sort_w = w;
	walk_sort_keys = keys;
	for (uint64 r = 1; r < n && sorted; r++)
		sorted = walk_sort_cmp(&order[r - 1], &order[r]) < 0;
	if (!sorted)
		qsort(order, n, sizeof(int), walk_sort_cmp);
	if (n > 0)
		walk_seek(w, keys + (size_t) order[0] * w->nk);
	while (j < n)
	{
		const Datum *k = keys + (size_t) order[j] * w->nk;
		int			 r;

		if (!w->have)
		{
			MemoryContext o2;
			bool		  got;

			if (w->eof)
				break;
			o2 = MemoryContextSwitchTo(w->cxt);
			got = index_getnext_tid(w->scan, ForwardScanDirection) != NULL;
			MemoryContextSwitchTo(o2);
			if (!got)
			{
				w->eof = true;
				break; /* no entry left: the remaining keys have no clock row */
			}
			w->have = true;
		}
		r = walk_cmp(w, k);
		if (r < 0)
		{
			/* the entry of a row the batch does not want; a descent (which
			 * positions by the first column) only when it moves forward */
			w->have = false;
			skipped++;
			if (++gap > WALK_GAP && r == -1)
			{
				walk_seek(w, k);
				gap = 0;
			}
			continue;
		}
		w->have = r == 0 ? false : w->have;
		if (r == 0 && !index_fetch_heap(w->scan, w->slot))
			continue; /* a version this snapshot does not see: the next entry may be */
		if (r == 0)
			c->clock_of[order[j]] = ExecCopySlotHeapTuple(w->slot);
		/* else key k has no clock row */
		j++;
		gap = 0;
		/*
		 * Sparse keys: after WALK_PROBE keys, when the walk skipped more
		 * than WALK_SPARSE entries per key, every further key of the batch
		 * starts with a descent (the keyed SELECT's cost, without its
		 * executor): walking would cost more than descending.
		 */
		if (descend || (j == WALK_PROBE && skipped > (uint64) WALK_SPARSE * WALK_PROBE))
		{
			descend = true;
			if (j < n && walk_first_differs(w, k, keys + (size_t) order[j] * w->nk))
				walk_seek(w, keys + (size_t) order[j] * w->nk);
		}
	}
	MemoryContextSwitchTo(old);
}

static int
cmp_hit_keys(const uint8_t *base, const probe_hit *a, const uint8_t *k, size_t klen)
{
	int c = memcmp(base + a->off, k, Min(a->len, klen));

	return c ? c : (a->len < klen ? -1 : a->len > klen);
}

static const uint8_t *qsort_keys;

static int
cmp_hits(const void *x, const void *y)
{
	const probe_hit *b = y;

	return cmp_hit_keys(qsort_keys, x, qsort_keys + b->off, b->len);
}

/* encode_tuple_key: the key of tuple tup (key columns first) as payload bytes. */
static void
encode_tuple_key(db_table *t, HeapTuple tup, TupleDesc td, pgs_buf *out, pgs_value *scratch)
{
	for (int i = 0; i < t->npk; i++)
	{
		bool  isnull;
		Datum d = SPI_getbinval(tup, td, i + 1, &isnull);

		pgsync_datum_value(&t->pk[i], d, isnull, &scratch[i]);
	}
	pgs_key_encode(out, (uint32_t) t->npk, scratch);
}

/*
 * probe_batch: the rows of the other side for the keys of c->tt (base rows
 * as the caller, or clock rows as the metadata owner), indexed by key.
 */
static void
probe_batch(db_cursor *c, bool clock)
{
	db_table		*t = c->t;
	Datum			*arrays = palloc(sizeof(Datum) * t->npk);
	uint64			 n = 0;
	pgsync_user_save us;
	int				 rc;
	MemoryContext	 old = MemoryContextSwitchTo(c->batch_cxt);

	for (int i = 0; i < t->npk; i++)
	{
		Datum *elems = palloc(sizeof(Datum) * (c->n + 1));
		int16  typlen;
		bool   typbyval;
		char   typalign;

		n = 0;
		for (uint64 r = 0; r < c->n; r++)
		{
			bool isnull;

			/* rls changes: only live clock rows can have a visible row */
			if (!clock)
			{
				int64 cl = DatumGetInt64(
					SPI_getbinval(c->tt->vals[r], c->tt->tupdesc, t->npk + 1, &isnull));

				if ((cl & 1) == 0)
					continue;
			}
			elems[n++] = SPI_getbinval(c->tt->vals[r], c->tt->tupdesc, i + 1, &isnull);
		}
		get_typlenbyvalalign(t->pk[i].basetyp, &typlen, &typbyval, &typalign);
		arrays[i] = PointerGetDatum(
			construct_array(elems, (int) n, t->pk[i].basetyp, typlen, typbyval, typalign));
	}
	MemoryContextSwitchTo(old);
	if (c->probe)
		SPI_freetuptable(c->probe);
	c->probe = NULL;
	c->nhits = 0;
	c->keys.len = 0;
	if (n == 0)
		return;
	if (clock)
		pgsync_as_meta(&us);
	rc = SPI_execute_plan(pgsync_plan_probe(t, clock), arrays, NULL, true, 0);
	if (clock)
		pgsync_as_caller(&us);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "pgsync: probing rows of %s failed", t->name);
	c->probe = SPI_tuptable;
	old = MemoryContextSwitchTo(c->batch_cxt);
	c->hits = palloc(sizeof(probe_hit) * (SPI_processed + 1));
	for (uint64 r = 0; r < SPI_processed; r++)
	{
		size_t off = c->keys.len;

		encode_tuple_key(t, c->probe->vals[r], c->probe->tupdesc, &c->keys, c->pk);
		c->hits[r] = (probe_hit){off, c->keys.len - off, r};
	}
	MemoryContextSwitchTo(old);
	c->nhits = SPI_processed;
	if (c->keys.oom)
		elog(ERROR, "pgsync: out of memory probing rows");
	qsort_keys = c->keys.p;
	qsort(c->hits, c->nhits, sizeof(probe_hit), cmp_hits);
}

/* probe_find: the probe tuple of the key of tuple tup, or NULL. */
static HeapTuple
probe_find(db_cursor *c, HeapTuple tup, TupleDesc td)
{
	pgs_buf	  k;
	uint64	  lo = 0, hi = c->nhits;
	HeapTuple found = NULL;

	if (!c->probe)
		return NULL;
	pgs_buf_init(&k);
	encode_tuple_key(c->t, tup, td, &k, c->pk);
	while (lo < hi)
	{
		uint64 mid = (lo + hi) / 2;
		int	   r = cmp_hit_keys(c->keys.p, &c->hits[mid], k.p, k.len);

		if (r == 0)
		{
			found = c->probe->vals[c->hits[mid].row];
			break;
		}
		if (r < 0)
			lo = mid + 1;
		else
			hi = mid;
	}
	pgs_buf_free(&k);
	return found;
}

/*
 * ---- the key order of an rls snapshot -------------------------------------
 *
 * An rls snapshot chunk reads the caller's rows in key order after a key.
 * When an index has the key columns right after columns that the caller's
 * policies pin to one value each (owner = the claim: an equality in the
 * security quals ANDed at the top, the other side free of the table's
 * columns and of volatile functions), a scan of it reads exactly the rows
 * the policy lets through, in key order: a subsequence, in the same order,
 * of what a walk of the key index reads before filtering, so it never costs
 * more. The planner cannot see that: it costs the heap access of such an
 * index by its first column's correlation (none for an owner column) and
 * the key walk's by the key's (UUIDv7 keys follow the insertion order), and
 * for a fast start both cost about a descent. It took the key walk for most
 * chunks of a pull (read 10 rows for each it sent, bench/pg_bench_pull.py)
 * and for every chunk once the plan was generic. So while such a read is
 * planned, and only when such an index exists, the indexes that merely walk
 * the key (those whose first columns are the key) are not offered to it.
 */
static get_relation_info_hook_type prev_relation_info = NULL;
static Oid						   steer_relid = InvalidOid;

/* qual_pins: does the security qual q (or an ANDed part of it) pin column
 * attno of relation varno with an equality of opfamily opf, collation coll? */
static bool
qual_pins(Node *q, Index varno, AttrNumber attno, Oid opf, Oid coll)
{
	if (q == NULL)
		return false;
	if (IsA(q, List))
	{
		ListCell *lc;

		foreach (lc, (List *) q)
			if (qual_pins(lfirst(lc), varno, attno, opf, coll))
				return true;
		return false;
	}
	if (is_andclause(q))
		return qual_pins((Node *) ((BoolExpr *) q)->args, varno, attno, opf, coll);
	if (IsA(q, OpExpr) && list_length(((OpExpr *) q)->args) == 2)
	{
		OpExpr *op = (OpExpr *) q;

		for (int side = 0; side < 2; side++)
		{
			Node *v = strip_implicit_coercions(list_nth(op->args, side));
			Node *other = list_nth(op->args, 1 - side);

			if (IsA(v, Var) && ((Var *) v)->varno == varno && ((Var *) v)->varlevelsup == 0 &&
				((Var *) v)->varattno == attno && !contain_var_clause(other) &&
				!contain_volatile_functions(other) &&
				get_op_opfamily_strategy(op->opno, opf) == BTEqualStrategyNumber &&
				(op->inputcollid == coll || !OidIsValid(coll)))
				return true;
		}
	}
	return false;
}

static void
steer_relation_info(PlannerInfo *root, Oid relid, bool inhparent, RelOptInfo *rel)
{
	RangeTblEntry *rte;
	Relation	   r;
	Oid			   pkoid;
	Relation	   pk;
	int			   npk;
	bool		   pinned_index = false;
	ListCell	  *lc;

	if (prev_relation_info)
		prev_relation_info(root, relid, inhparent, rel);
	if (relid != steer_relid || inhparent || root->query_level != 1)
		return;
	rte = root->simple_rte_array[rel->relid];
	if (rte->securityQuals == NIL)
		return;
	r = table_open(relid, NoLock);
	pkoid = RelationGetPrimaryKeyIndex(r, false);
	table_close(r, NoLock);
	if (!OidIsValid(pkoid))
		return;
	pk = index_open(pkoid, NoLock);
	npk = pk->rd_index->indnkeyatts;
	foreach (lc, rel->indexlist)
	{
		IndexOptInfo *ix = lfirst(lc);
		int			  m = ix->nkeycolumns - npk, k;

		if (ix->relam != BTREE_AM_OID || m < 1 || ix->indpred != NIL || ix->indexoid == pkoid)
			continue;
		/* the key columns last, in the key index's order */
		for (k = 0; k < npk; k++)
			if (ix->indexkeys[m + k] != pk->rd_index->indkey.values[k] ||
				ix->opfamily[m + k] != pk->rd_opfamily[k] ||
				ix->indexcollations[m + k] != pk->rd_indcollation[k] || ix->reverse_sort[m + k] ||
				ix->nulls_first[m + k])
				break;
		if (k < npk)
			continue;
		/* every column before them pinned by the policies */
		for (k = 0; k < m; k++)
			if (ix->indexkeys[k] == 0 ||
				!qual_pins((Node *) rte->securityQuals, rel->relid, ix->indexkeys[k],
						   ix->opfamily[k], ix->indexcollations[k]))
				break;
		if (k == m)
		{
			pinned_index = true;
			break;
		}
	}
	if (pinned_index)
	{
		List *keep = NIL;

		foreach (lc, rel->indexlist)
		{
			IndexOptInfo *ix = lfirst(lc);
			int			  k;

			/* a walk of the key: the key columns first, in the key's order */
			for (k = 0; k < npk && k < ix->nkeycolumns; k++)
				if (ix->indexkeys[k] != pk->rd_index->indkey.values[k])
					break;
			if (k < npk || ix->relam != BTREE_AM_OID)
				keep = lappend(keep, ix);
		}
		rel->indexlist = keep;
	}
	index_close(pk, NoLock);
}

/* pgsync_changes_setup: once per backend (_PG_init). */
void
pgsync_changes_setup(void)
{
	prev_relation_info = get_relation_info_hook;
	get_relation_info_hook = steer_relation_info;
}

static void
cursor_open(db_cursor *c, SPIPlanPtr plan, Datum *args, bool as_meta, bool fast_start)
{
	pgsync_user_save us;

	if (as_meta)
		pgsync_as_meta(&us);
	/* an rls snapshot read is planned (here, at open) with the key order
	 * steered to an index the policies pin (steer_relation_info) */
	if (c->how == 2)
		steer_relid = c->t->relid;
	PG_TRY();
	{
		if (!fast_start)
			c->portal = SPI_cursor_open(NULL, plan, args, NULL, true);
		else
		{
			/* planned at open: a chunk reads a small fraction of the rows */
			int level = NewGUCNestLevel();

			(void) set_config_option("cursor_tuple_fraction", "0.0001", PGC_USERSET, PGC_S_SESSION,
									 GUC_ACTION_SAVE, true, 0, false);
			c->portal = SPI_cursor_open(NULL, plan, args, NULL, true);
			AtEOXact_GUC(true, level);
		}
	}
	PG_FINALLY();
	{
		steer_relid = InvalidOid;
	}
	PG_END_TRY();
	if (as_meta)
		pgsync_as_caller(&us);
	if (c->portal == NULL)
		elog(ERROR, "pgsync: opening the rows of %s failed", c->t->name);
}

/*
 * changed_keys: when at most PG_KEYED_MAX rows of t changed since args[0]
 * (after the key in args[2..], order 2), their keys as one array per key
 * column in arrays[], and true. An incremental pull then reads exactly
 * those rows (PGR_CHANGES_IN, PGR_CLOCKS_IN), whatever the planner
 * believes of the table: the keys come from the ver index (sequential scans
 * are off while it is planned: right after a bulk load the clock table has
 * no statistics, and the planner would guess a third of it changed and walk
 * the whole table in key order, for every idle device's poll). More changes
 * than that: false, and the key-order walk reads them chunk by chunk.
 */
static bool
changed_keys(db_table *t, Datum *args, int order, Datum *arrays)
{
	pgsync_user_save us;
	SPIPlanPtr		 plan;
	int				 rc, level;
	uint64			 n;

	pgsync_as_meta(&us);
	level = NewGUCNestLevel();
	(void) set_config_option("enable_seqscan", "off", PGC_USERSET, PGC_S_SESSION, GUC_ACTION_SAVE,
							 true, 0, false);
	plan = pgsync_plan_read(t, PGR_CHANGED_KEYS, order == 2 ? 2 : 0);
	rc = SPI_execute_plan(plan, args, NULL, true, 0);
	AtEOXact_GUC(true, level);
	pgsync_as_caller(&us);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "pgsync: reading the changed keys of %s failed", t->name);
	n = SPI_processed;
	if (n > PG_KEYED_MAX)
	{
		SPI_freetuptable(SPI_tuptable);
		return false;
	}
	for (int i = 0; i < t->npk; i++)
	{
		Datum *elems = palloc(sizeof(Datum) * (n + 1));
		int16  typlen;
		bool   typbyval, isnull;
		char   typalign;

		for (uint64 r = 0; r < n; r++)
			elems[r] = SPI_getbinval(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, i + 1, &isnull);
		get_typlenbyvalalign(t->pk[i].basetyp, &typlen, &typbyval, &typalign);
		arrays[i] = PointerGetDatum(
			construct_array(elems, (int) n, t->pk[i].basetyp, typlen, typbyval, typalign));
	}
	SPI_freetuptable(SPI_tuptable);
	return true;
}

pgs_rc
db_changes_open(db_conn *db, db_table *t, int64_t since, int64_t until, bool by_key,
				const pgs_value *after_pk, db_access access, bool snapshot, db_cursor **out,
				pgs_err *err)
{
	db_cursor		*c = MemoryContextAllocZero(db->cxt, sizeof(db_cursor));
	Datum			*args = palloc(sizeof(Datum) * (2 * t->npk + 2));
	int				 order = !by_key ? 0 : after_pk ? 2 : 1;
	pgsync_read_kind kind;

	c->db = db;
	c->t = t;
	c->row_cxt = AllocSetContextCreate(db->cxt, "pgsync changes", ALLOCSET_DEFAULT_SIZES);
	c->batch_cxt = AllocSetContextCreate(db->cxt, "pgsync batch", ALLOCSET_DEFAULT_SIZES);
	c->pk = MemoryContextAllocZero(db->cxt, sizeof(pgs_value) * t->npk);
	c->cols = MemoryContextAllocZero(db->cxt, sizeof(pgs_value) * Max(t->ncols, 1));
	pgs_buf_init(&c->keys);
	args[0] = Int64GetDatum(since);
	args[1] = Int64GetDatum(until);
	if (order == 2)
	{
		/* a token's key: converted (and checked) like a payload's key */
		Datum *k = pgsync_pk_datums(t, after_pk, 0);

		memcpy(args + 2, k, sizeof(Datum) * t->npk);
	}
	if (access == DB_ACCESS_RLS)
	{
		c->how = snapshot ? 2 : 1;
		kind = snapshot ? PGR_BASE : PGR_CLOCKS;
	}
	else
		kind = snapshot ? PGR_SNAPSHOT : PGR_CHANGES;
	c->snapshot = snapshot;
	if (c->how == 2)
		c->walk = walk_open(t, db->cxt);
	if (!snapshot && changed_keys(t, args, order, args + 2 + (order == 2 ? t->npk : 0)))
		kind = kind == PGR_CLOCKS ? PGR_CLOCKS_IN : PGR_CHANGES_IN;
	/* the rls snapshot reads the base table as the caller, all else as the owner */
	cursor_open(c, pgsync_plan_read(t, kind, order), args, c->how != 2,
				order > 0 && kind != PGR_CHANGES_IN && kind != PGR_CLOCKS_IN);
	*out = c;
	return PGS_OK;
}

/* fetch: the next batch of the cursor (and its probe); false at the end. */
static bool
fetch(db_cursor *c)
{
	pgsync_user_save us;

	if (c->tt)
		SPI_freetuptable(c->tt);
	c->tt = NULL;
	if (c->eof)
		return false;
	MemoryContextReset(c->batch_cxt);
	c->hits = NULL;
	c->clock_of = NULL;
	if (c->how != 2)
		pgsync_as_meta(&us);
	SPI_cursor_fetch(c->portal, true, FETCH_BATCH);
	if (c->how != 2)
		pgsync_as_caller(&us);
	c->tt = SPI_tuptable;
	c->n = SPI_processed;
	c->pos = 0;
	if (c->n < FETCH_BATCH)
		c->eof = true;
	if (c->n == 0)
		return false;
	if (c->how == 2 && c->walk)
		walk_batch(c);
	else if (c->how == 1 || c->how == 2)
		probe_batch(c, c->how == 2);
	return true;
}

pgs_rc
db_changes_next(db_cursor *c, bool *done, const pgs_value **pk, int64_t *cl, const uint8_t **blob,
				size_t *blob_len, bool *alive, const pgs_value **cols, db_vis *vis, pgs_err *err)
{
	db_table	 *t = c->t;
	MemoryContext old;

	for (;;)
	{
		HeapTuple tup, row = NULL, clk;
		TupleDesc td, rtd = NULL, ctd;
		bool	  isnull;
		bool	  exists;
		int		  i, first_col, blob_col = t->npk + 2;
		bytea	 *b;

		if (c->tt == NULL || c->pos >= c->n)
		{
			if (!fetch(c))
			{
				*done = true;
				return PGS_OK;
			}
			if (c->n == 0)
				continue;
		}
		tup = c->tt->vals[c->pos++];
		td = c->tt->tupdesc;
		MemoryContextReset(c->row_cxt);
		old = MemoryContextSwitchTo(c->row_cxt);
		clk = tup;
		ctd = td;
		if (c->how == 2)
		{
			/* a visible base row: its clock from the walk or the probe */
			if (c->walk)
			{
				clk = c->clock_of[c->pos - 1];
				ctd = RelationGetDescr(c->walk->rel);
				blob_col = t->npk + 3; /* the clock table's layout: cl, ver, clk */
			}
			else
			{
				clk = probe_find(c, tup, td);
				ctd = clk ? c->probe->tupdesc : NULL;
			}
			if (!clk)
			{
				MemoryContextSwitchTo(old);
				continue; /* written with capture off: not synced */
			}
			row = tup;
			rtd = td;
		}
		*cl = DatumGetInt64(SPI_getbinval(clk, ctd, t->npk + 1, &isnull));
		if (c->how == 0)
		{
			exists = DatumGetBool(SPI_getbinval(tup, td, t->npk + 3, &isnull));
			row = tup;
			rtd = td;
			first_col = t->npk + 4;
			*vis = c->snapshot ? DB_VIS_WHOLE : DB_VIS_CHANGES;
			if ((*cl & 1) && !exists)
			{
				/* clock says alive but the row is gone (written with capture off) */
				MemoryContextSwitchTo(old);
				continue;
			}
		}
		else if (c->how == 1)
		{
			row = (*cl & 1) ? probe_find(c, tup, td) : NULL;
			rtd = c->probe ? c->probe->tupdesc : NULL;
			exists = row != NULL;
			first_col = t->npk + 1;
			*vis = exists ? DB_VIS_WHOLE : DB_VIS_HIDDEN;
		}
		else
		{
			exists = true;
			first_col = t->npk + 1;
			*vis = DB_VIS_WHOLE;
			if ((*cl & 1) == 0)
			{
				MemoryContextSwitchTo(old);
				continue; /* a live row with a tombstone clock: capture was off */
			}
		}
		for (i = 0; i < t->npk; i++)
		{
			Datum d = SPI_getbinval(clk, ctd, i + 1, &isnull);

			pgsync_datum_value(&t->pk[i], d, isnull, &c->pk[i]);
		}
		b = DatumGetByteaPP(SPI_getbinval(clk, ctd, blob_col, &isnull));
		*blob = (const uint8_t *) VARDATA_ANY(b);
		*blob_len = VARSIZE_ANY_EXHDR(b);
		*alive = (*cl & 1) && exists;
		if (*alive)
			for (i = 0; i < t->ncols; i++)
			{
				Datum d = SPI_getbinval(row, rtd, first_col + i, &isnull);

				pgsync_datum_value(&t->cols[i], d, isnull, &c->cols[i]);
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
	pgsync_user_save us;

	if (c->tt)
		SPI_freetuptable(c->tt);
	if (c->probe)
		SPI_freetuptable(c->probe);
	if (c->walk)
		walk_close(c->walk);
	if (c->how != 2)
		pgsync_as_meta(&us);
	SPI_cursor_close(c->portal);
	if (c->how != 2)
		pgsync_as_caller(&us);
	pgs_buf_free(&c->keys);
	MemoryContextDelete(c->row_cxt);
	MemoryContextDelete(c->batch_cxt);
}

/* db_keys_open: the keys of live clock rows (as the metadata owner). */
pgs_rc
db_keys_open(db_conn *db, db_table *t, db_cursor **out, pgs_err *err)
{
	db_cursor *c = MemoryContextAllocZero(db->cxt, sizeof(db_cursor));
	Datum	   args[2] = {Int64GetDatum(0), Int64GetDatum(0)};

	c->db = db;
	c->t = t;
	c->how = 3;
	c->row_cxt = AllocSetContextCreate(db->cxt, "pgsync keys", ALLOCSET_DEFAULT_SIZES);
	c->batch_cxt = AllocSetContextCreate(db->cxt, "pgsync batch", ALLOCSET_DEFAULT_SIZES);
	c->pk = MemoryContextAllocZero(db->cxt, sizeof(pgs_value) * t->npk);
	c->cols = MemoryContextAllocZero(db->cxt, sizeof(pgs_value));
	pgs_buf_init(&c->keys);
	cursor_open(c, pgsync_plan_read(t, PGR_KEYS, 0), args, true, false);
	*out = c;
	return PGS_OK;
}

pgs_rc
db_keys_next(db_cursor *c, bool *done, const pgs_value **pk, int64_t *cl, pgs_err *err)
{
	HeapTuple	  tup;
	bool		  isnull;
	MemoryContext old;

	if (c->tt == NULL || c->pos >= c->n)
	{
		if (!fetch(c) || c->n == 0)
		{
			*done = true;
			return PGS_OK;
		}
	}
	tup = c->tt->vals[c->pos++];
	MemoryContextReset(c->row_cxt);
	old = MemoryContextSwitchTo(c->row_cxt);
	for (int i = 0; i < c->t->npk; i++)
		pgsync_datum_value(&c->t->pk[i], SPI_getbinval(tup, c->tt->tupdesc, i + 1, &isnull), isnull,
						   &c->pk[i]);
	*cl = DatumGetInt64(SPI_getbinval(tup, c->tt->tupdesc, c->t->npk + 1, &isnull));
	MemoryContextSwitchTo(old);
	*pk = c->pk;
	*done = false;
	return PGS_OK;
}
