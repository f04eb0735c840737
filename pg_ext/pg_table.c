/*
 * pg_table.c — synced tables: metadata, the per-backend cache and plans.
 *
 * pgsync.tables records, per synced table, its payload name, the base and
 * clock relations (regclass, so renames keep working), the algorithm and
 * the column lists at sync_init time. The order of cols is the column order
 * of the row clock blob and must never change for an initialized table.
 *
 * Each backend caches one struct db_table per base relation in
 * CacheMemoryContext with its prepared SPI plans. A relcache invalidation of
 * the base or clock relation (ALTER TABLE, sync_init/sync_cleanup elsewhere)
 * marks the entry invalid; it is rebuilt on next use once no call of this
 * transaction holds it (busy == 0), so a pointer handed to the core never
 * dangles.
 */
#include "pg_internal.h"

#include "access/genam.h"
#include "access/table.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "catalog/pg_index.h"
#include "catalog/pg_type.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/relcache.h"
#include "utils/syscache.h"
#include "utils/ruleutils.h"

static HTAB *table_cache = NULL;

static void load_history(db_table *t);

static void
table_inval(Datum arg, Oid relid)
{
	HASH_SEQ_STATUS st;
	db_table	   *t;

	if (table_cache == NULL)
		return;
	hash_seq_init(&st, table_cache);
	while ((t = hash_seq_search(&st)) != NULL)
	{
		/* the extension dropped (pgsync.tables with it) also when the
		 * table's triggers were dropped by hand before: nothing else then
		 * invalidates the base or clock table */
		if (!OidIsValid(relid) || t->relid == relid || t->clock_relid == relid ||
			t->meta_relid == relid)
			t->valid = false;
	}
}

/* pgsync_table_cache_setup creates the cache and registers the invalidation hook. */
void
pgsync_table_cache_setup(void)
{
	HASHCTL ctl;

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = sizeof(Oid);
	ctl.entrysize = sizeof(db_table);
	table_cache = hash_create("pgsync tables", 32, &ctl, HASH_ELEM | HASH_BLOBS);
	CacheRegisterRelcacheCallback(table_inval, (Datum) 0);
}

/* pgsync_table_release_all: at transaction end no call holds an entry. */
void
pgsync_table_release_all(void)
{
	HASH_SEQ_STATUS st;
	db_table	   *t;

	if (table_cache == NULL)
		return;
	hash_seq_init(&st, table_cache);
	while ((t = hash_seq_search(&st)) != NULL)
		t->busy = 0;
}

static void
free_plan(SPIPlanPtr *p)
{
	if (*p)
		SPI_freeplan(*p);
	*p = NULL;
}

static void
table_free(db_table *t)
{
	free_plan(&t->p_clock_get);
	free_plan(&t->p_clock_upsert);
	free_plan(&t->p_clock_insnew);
	free_plan(&t->p_clock_cas);
	free_plan(&t->p_row_replace);
	free_plan(&t->p_row_delete);
	for (int k = 0; k < PGR_NKINDS; k++)
		for (int o = 0; o < 3; o++)
			free_plan(&t->p_read[k][o]);
	free_plan(&t->p_probe_base);
	free_plan(&t->p_probe_clock);
	free_plan(&t->p_row_exists);
	if (t->merge_plans)
	{
		HASH_SEQ_STATUS	   st;
		pgsync_merge_plan *m;

		hash_seq_init(&st, t->merge_plans);
		while ((m = hash_seq_search(&st)) != NULL)
		{
			free_plan(&m->upd);
			free_plan(&m->ins);
		}
	}
	if (t->cxt)
		MemoryContextDelete(t->cxt);
	t->cxt = NULL;
	t->merge_plans = NULL;
}

/* table_clear makes t an empty, valid entry of relid, to be loaded (its
 * hash key stays; what pgsync.tables it is read from is noted first) */
static void
table_clear(db_table *t, Oid relid)
{
	memset(((char *) t) + sizeof(Oid), 0, sizeof(db_table) - sizeof(Oid));
	t->relid = relid;
	t->valid = true;
	t->meta_relid = pgsync_meta_relid("tables");
}

char *
pgsync_text_array_elem(Datum arr, int i, int *n)
{
	ArrayType *a = DatumGetArrayTypeP(arr);
	Datum	  *elems;
	bool	  *nulls;
	int		   cnt;

	deconstruct_array(a, TEXTOID, -1, false, TYPALIGN_INT, &elems, &nulls, &cnt);
	*n = cnt;
	if (i < 0 || i >= cnt)
		return NULL;
	return TextDatumGetCString(elems[i]);
}

static void
col_resolve(db_table *t, pgsync_col *c, const char *name)
{
	Oid	  typid;
	int32 typmod;
	Oid	  coll;

	c->name = pstrdup(name);
	c->attnum = get_attnum(t->relid, name);
	if (c->attnum == InvalidAttrNumber)
		ereport(ERROR, (errcode(ERRCODE_UNDEFINED_COLUMN),
						errmsg("column \"%s\" of synced table %s no longer exists", name, t->name),
						errhint("Synced columns cannot be dropped or renamed; restore the column, "
								"or call sync_cleanup and sync_init again.")));
	get_atttypetypmodcoll(t->relid, c->attnum, &typid, &typmod, &coll);
	pgsync_col_setup(c, typid, typmod);
	c->coll = coll;
}

/* table_load builds entry t (relid set) from pgsync.tables. SPI connected. */
static bool
table_load(db_table *t)
{
	static SPIPlanPtr plan = NULL;
	Oid				  argt[1] = {OIDOID};
	Datum			  arg[1];
	pgsync_user_save  us;
	HeapTuple		  tup;
	TupleDesc		  td;
	bool			  isnull;
	MemoryContext	  old;
	Datum			  pkarr, colarr;
	char			 *algo;
	int				  i, n;

	arg[0] = ObjectIdGetDatum(t->relid);
	pgsync_as_meta(&us);
	if (plan == NULL)
		plan = pgsync_plan_keep("SELECT name, clock::oid, algo, pk_cols, cols "
								"FROM pgsync.tables WHERE tbl = $1",
								1, argt);
	if (SPI_execute_plan(plan, arg, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "reading pgsync.tables failed");
	pgsync_as_caller(&us);
	if (SPI_processed == 0)
		return false;

	t->cxt = AllocSetContextCreate(CacheMemoryContext, "pgsync table", ALLOCSET_SMALL_SIZES);
	old = MemoryContextSwitchTo(t->cxt);
	tup = SPI_tuptable->vals[0];
	td = SPI_tuptable->tupdesc;
	t->name = TextDatumGetCString(SPI_getbinval(tup, td, 1, &isnull));
	t->clock_relid = DatumGetObjectId(SPI_getbinval(tup, td, 2, &isnull));
	algo = TextDatumGetCString(SPI_getbinval(tup, td, 3, &isnull));
	t->algo = strcmp(algo, "gset") == 0 ? DB_ALGO_GSET : DB_ALGO_CLS;
	pkarr = SPI_getbinval(tup, td, 4, &isnull);
	colarr = SPI_getbinval(tup, td, 5, &isnull);

	/* checked before quoting (a NULL name would crash it): a table dropped while
	 * event triggers were off (single-user mode) leaves its entry behind */
	if (get_rel_name(t->relid) == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE), errmsg("synced table %s is missing", t->name),
				 errhint("It was dropped while pgsync's event triggers were off: delete its row "
						 "from pgsync.tables and drop its clock table.")));
	if (get_rel_name(t->clock_relid) == NULL)
		ereport(ERROR, (errcode(ERRCODE_UNDEFINED_TABLE),
						errmsg("clock table of synced table %s is missing", t->name),
						errhint("Call sync_cleanup and sync_init on the table again.")));
	t->q_base = quote_qualified_identifier(get_namespace_name(get_rel_namespace(t->relid)),
										   get_rel_name(t->relid));
	t->q_clock = quote_qualified_identifier(get_namespace_name(get_rel_namespace(t->clock_relid)),
											get_rel_name(t->clock_relid));

	pgsync_text_array_elem(pkarr, -1, &t->npk);
	pgsync_text_array_elem(colarr, -1, &t->ncols);
	t->pk = palloc0(sizeof(pgsync_col) * t->npk);
	t->cols = palloc0(sizeof(pgsync_col) * Max(t->ncols, 1));
	t->pk_names = palloc0(sizeof(char *) * t->npk);
	t->col_names = palloc0(sizeof(char *) * Max(t->ncols, 1));
	t->pk_types = palloc0(sizeof(Oid) * t->npk);
	t->row_types = palloc0(sizeof(Oid) * (t->npk + t->ncols));
	for (i = 0; i < t->npk; i++)
	{
		col_resolve(t, &t->pk[i], pgsync_text_array_elem(pkarr, i, &n));
		t->pk_names[i] = t->pk[i].name;
		t->pk_types[i] = t->pk[i].typid;
		t->row_types[i] = t->pk[i].typid;
	}
	for (i = 0; i < t->ncols; i++)
	{
		col_resolve(t, &t->cols[i], pgsync_text_array_elem(colarr, i, &n));
		t->col_names[i] = t->cols[i].name;
		t->row_types[t->npk + i] = t->cols[i].typid;
	}
	t->info.name = t->name;
	t->info.algo = t->algo;
	t->info.npk = t->npk;
	t->info.ncols = t->ncols;
	t->info.pk_names = t->pk_names;
	t->info.col_names = t->col_names;
	t->fresh_xid = InvalidFullTransactionId;
	t->fresh_blob = NULL;
	MemoryContextSwitchTo(old);
	SPI_freetuptable(SPI_tuptable);
	load_history(t);
	return true;
}

/* load_history: the table's former column names (pgsync.column_history). */
static void
load_history(db_table *t)
{
	static SPIPlanPtr plan = NULL;
	Oid				  argt[1] = {OIDOID};
	Datum			  arg[1] = {ObjectIdGetDatum(t->relid)};
	pgsync_user_save  us;
	MemoryContext	  old;
	uint64			  n;
	char			**names;
	int				 *cols;

	pgsync_as_meta(&us);
	if (plan == NULL)
		plan = pgsync_plan_keep(
			"SELECT name, now FROM pgsync.column_history WHERE tbl = $1 ORDER BY name", 1, argt);
	if (SPI_execute_plan(plan, arg, NULL, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "reading pgsync.column_history failed");
	pgsync_as_caller(&us);
	n = SPI_processed;
	if (n == 0)
		return;
	old = MemoryContextSwitchTo(t->cxt);
	names = palloc(sizeof(char *) * n);
	cols = palloc(sizeof(int) * n);
	for (uint64 i = 0; i < n; i++)
	{
		char *now = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 2);

		names[i] = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1);
		cols[i] = -1;
		for (int c = 0; now && c < t->ncols; c++)
			if (strcmp(t->cols[c].name, now) == 0)
				cols[i] = c;
	}
	t->info.nhist = (int) n;
	t->info.hist_names = (const char *const *) names;
	t->info.hist_cols = cols;
	MemoryContextSwitchTo(old);
	SPI_freetuptable(SPI_tuptable);
}

/*
 * pgsync_table_get returns the cache entry of a synced table (busy until the end
 * of the transaction), or NULL / ERROR when relid is not synced. SPI must be
 * connected.
 */
db_table *
pgsync_table_get(Oid relid, bool missing_ok)
{
	db_table *t;
	bool	  found;

	t = hash_search(table_cache, &relid, HASH_ENTER, &found);
	if (found && (t->valid || t->busy > 0))
	{
		t->busy++;
		return t;
	}
	if (found)
		table_free(t);
	table_clear(t, relid);
	PG_TRY();
	{
		found = table_load(t);
	}
	PG_CATCH();
	{
		table_free(t);
		hash_search(table_cache, &relid, HASH_REMOVE, NULL);
		PG_RE_THROW();
	}
	PG_END_TRY();
	if (!found)
	{
		hash_search(table_cache, &relid, HASH_REMOVE, NULL);
		if (missing_ok)
			return NULL;
		ereport(ERROR, (errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
						errmsg("table %s is not synced", get_rel_name(relid)),
						errhint("Call sync_init('%s') first.", get_rel_name(relid))));
	}
	t->busy++;
	return t;
}

/*
 * pgsync_table_reload: rebuild the entry of relid from its metadata now, in
 * place (its address stays, its busy count too), for a call that changed
 * the metadata and goes on using the table (sync_init after ADD COLUMN,
 * then the held values of the new columns). Nothing else may hold pointers
 * into the old entry's columns. SPI connected.
 */
void
pgsync_table_reload(Oid relid)
{
	db_table *t = hash_search(table_cache, &relid, HASH_FIND, NULL);
	int		  busy;

	if (t == NULL)
		return;
	busy = t->busy;
	table_free(t);
	table_clear(t, relid);
	if (!table_load(t))
	{
		table_free(t);
		hash_search(table_cache, &relid, HASH_REMOVE, NULL);
		return;
	}
	t->busy = busy;
}

/* pgsync_table_cached: the entry if cached and valid (busy++), else NULL; no SPI. */
db_table *
pgsync_table_cached(Oid relid)
{
	db_table *t = hash_search(table_cache, &relid, HASH_FIND, NULL);

	if (t == NULL || !t->valid)
		return NULL;
	t->busy++;
	return t;
}

/* pgsync_table_list returns the relids of all synced tables, by name. */
int
pgsync_table_list(Oid **relids)
{
	pgsync_user_save us;
	uint64			 i;
	bool			 isnull;

	pgsync_as_meta(&us);
	if (SPI_execute("SELECT tbl::oid FROM pgsync.tables ORDER BY name", false, 0) != SPI_OK_SELECT)
		elog(ERROR, "reading pgsync.tables failed");
	pgsync_as_caller(&us);
	*relids = palloc(sizeof(Oid) * (SPI_processed + 1));
	for (i = 0; i < SPI_processed; i++)
		(*relids)[i] = DatumGetObjectId(
			SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1, &isnull));
	i = SPI_processed;
	SPI_freetuptable(SPI_tuptable);
	return (int) i;
}

/* pgsync_table_by_name: the relid of the synced table with this payload name. */
Oid
pgsync_table_by_name(const char *name, size_t len)
{
	static SPIPlanPtr plan = NULL;
	Oid				  argt[1] = {TEXTOID};
	Datum			  arg[1];
	pgsync_user_save  us;
	Oid				  res = InvalidOid;
	bool			  isnull;
	HASH_SEQ_STATUS	  st;
	db_table		 *t;

	/*
	 * A valid entry of the cache says what pgsync.tables said when it was
	 * loaded, and stays valid until its table's relcache entry is
	 * invalidated: sync_init and sync_cleanup, which insert and delete the
	 * row (names never change), create or drop the table's triggers, which
	 * does that, also in other backends once they have read the
	 * invalidations of committed transactions.
	 */
	AcceptInvalidationMessages();
	if (table_cache != NULL)
	{
		hash_seq_init(&st, table_cache);
		while ((t = hash_seq_search(&st)) != NULL)
			if (t->valid && t->name && strlen(t->name) == len && memcmp(t->name, name, len) == 0)
			{
				hash_seq_term(&st);
				return t->relid;
			}
	}
	arg[0] = PointerGetDatum(cstring_to_text_with_len(name, (int) len));
	pgsync_as_meta(&us);
	if (plan == NULL)
		plan = pgsync_plan_keep("SELECT tbl::oid FROM pgsync.tables WHERE name = $1", 1, argt);
	if (SPI_execute_plan(plan, arg, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "reading pgsync.tables failed");
	pgsync_as_caller(&us);
	if (SPI_processed == 1)
		res = DatumGetObjectId(
			SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	SPI_freetuptable(SPI_tuptable);
	return res;
}

/* ---- plans ------------------------------------------------------------- */

/* where_pk appends "alias.pk1 = $first AND ..." */
static void
where_pk(StringInfo b, db_table *t, const char *alias, int first)
{
	int i;

	for (i = 0; i < t->npk; i++)
		appendStringInfo(b, "%s%s%s%s OPERATOR(pg_catalog.=) $%d", i ? " AND " : "",
						 alias ? alias : "", alias ? "." : "", quote_identifier(t->pk[i].name),
						 first + i);
}

void
pgsync_pk_list(StringInfo b, const db_table *t, const char *alias)
{
	int i;

	for (i = 0; i < t->npk; i++)
		appendStringInfo(b, "%s%s%s%s", i ? ", " : "", alias ? alias : "", alias ? "." : "",
						 quote_identifier(t->pk[i].name));
}

/* pgsync_plan_clock_get: SELECT cl, clk FROM clock WHERE pk = $1.. */
SPIPlanPtr
pgsync_plan_clock_get(db_table *t)
{
	if (t->p_clock_get == NULL)
	{
		StringInfoData b;

		initStringInfo(&b);
		appendStringInfo(&b, "SELECT cl, clk FROM %s WHERE ", t->q_clock);
		where_pk(&b, t, NULL, 1);
		t->p_clock_get = pgsync_plan_keep(b.data, t->npk, t->pk_types);
	}
	return t->p_clock_get;
}

/* clock_insert_plan: INSERT (pk.., cl, ver, clk) VALUES ($1..) followed by conflict. */
static SPIPlanPtr
clock_insert_plan(db_table *t, const char *alias, const char *conflict)
{
	StringInfoData b;
	Oid			  *types = palloc(sizeof(Oid) * (t->npk + 3));
	int			   i;

	memcpy(types, t->pk_types, sizeof(Oid) * t->npk);
	types[t->npk] = INT8OID;
	types[t->npk + 1] = INT8OID;
	types[t->npk + 2] = BYTEAOID;
	initStringInfo(&b);
	appendStringInfo(&b, "INSERT INTO %s%s (", t->q_clock, alias);
	pgsync_pk_list(&b, t, NULL);
	appendStringInfoString(&b, ", cl, ver, clk) VALUES (");
	for (i = 0; i < t->npk + 3; i++)
		appendStringInfo(&b, "%s$%d", i ? ", " : "", i + 1);
	appendStringInfoString(&b, ") ");
	if (strcmp(conflict, "update") == 0)
	{
		appendStringInfoString(&b, "ON CONFLICT (");
		pgsync_pk_list(&b, t, NULL);
		appendStringInfoString(
			&b, ") DO UPDATE SET cl = EXCLUDED.cl, ver = EXCLUDED.ver, clk = EXCLUDED.clk");
	}
	else
		appendStringInfoString(&b, "ON CONFLICT DO NOTHING");
	return pgsync_plan_keep(b.data, t->npk + 3, types);
}

/* pgsync_plan_clock_upsert: INSERT (pk.., cl, ver, clk) ON CONFLICT DO UPDATE. */
SPIPlanPtr
pgsync_plan_clock_upsert(db_table *t)
{
	if (t->p_clock_upsert == NULL)
		t->p_clock_upsert = clock_insert_plan(t, " AS c", "update");
	return t->p_clock_upsert;
}

/* pgsync_plan_clock_insnew: INSERT (pk.., cl, ver, clk) ON CONFLICT DO NOTHING. */
SPIPlanPtr
pgsync_plan_clock_insnew(db_table *t)
{
	if (t->p_clock_insnew == NULL)
		t->p_clock_insnew = clock_insert_plan(t, "", "nothing");
	return t->p_clock_insnew;
}

/*
 * pgsync_plan_clock_cas: UPDATE the clock row of pk ($1..) to cl, ver, clk
 * ($n+1..$n+3) only if it still has cl and clk $n+4, $n+5.
 */
SPIPlanPtr
pgsync_plan_clock_cas(db_table *t)
{
	if (t->p_clock_cas == NULL)
	{
		StringInfoData b;
		Oid			  *types = palloc(sizeof(Oid) * (t->npk + 5));
		int			   n = t->npk;

		memcpy(types, t->pk_types, sizeof(Oid) * n);
		types[n] = INT8OID;
		types[n + 1] = INT8OID;
		types[n + 2] = BYTEAOID;
		types[n + 3] = INT8OID;
		types[n + 4] = BYTEAOID;
		initStringInfo(&b);
		appendStringInfo(&b, "UPDATE %s SET cl = $%d, ver = $%d, clk = $%d WHERE ", t->q_clock,
						 n + 1, n + 2, n + 3);
		where_pk(&b, t, NULL, 1);
		appendStringInfo(&b,
						 " AND cl OPERATOR(pg_catalog.=) $%d AND clk OPERATOR(pg_catalog.=) $%d",
						 n + 4, n + 5);
		t->p_clock_cas = pgsync_plan_keep(b.data, n + 5, types);
	}
	return t->p_clock_cas;
}

/* pgsync_plan_row_replace: INSERT all columns ON CONFLICT DO UPDATE all columns. */
SPIPlanPtr
pgsync_plan_row_replace(db_table *t)
{
	if (t->p_row_replace == NULL)
	{
		StringInfoData b;
		int			   i;

		initStringInfo(&b);
		appendStringInfo(&b, "INSERT INTO %s (", t->q_base);
		pgsync_pk_list(&b, t, NULL);
		for (i = 0; i < t->ncols; i++)
			appendStringInfo(&b, ", %s", quote_identifier(t->cols[i].name));
		appendStringInfoString(&b, ") VALUES (");
		for (i = 0; i < t->npk + t->ncols; i++)
			appendStringInfo(&b, "%s$%d", i ? ", " : "", i + 1);
		appendStringInfoString(&b, ") ON CONFLICT (");
		pgsync_pk_list(&b, t, NULL);
		if (t->ncols == 0)
			appendStringInfoString(&b, ") DO NOTHING");
		else
		{
			appendStringInfoString(&b, ") DO UPDATE SET ");
			for (i = 0; i < t->ncols; i++)
				appendStringInfo(&b, "%s%s = EXCLUDED.%s", i ? ", " : "",
								 quote_identifier(t->cols[i].name),
								 quote_identifier(t->cols[i].name));
		}
		t->p_row_replace = pgsync_plan_keep(b.data, t->npk + t->ncols, t->row_types);
	}
	return t->p_row_replace;
}

/* pgsync_plan_row_delete: DELETE FROM base WHERE pk = $1.. */
SPIPlanPtr
pgsync_plan_row_delete(db_table *t)
{
	if (t->p_row_delete == NULL)
	{
		StringInfoData b;

		initStringInfo(&b);
		appendStringInfo(&b, "DELETE FROM %s WHERE ", t->q_base);
		where_pk(&b, t, NULL, 1);
		t->p_row_delete = pgsync_plan_keep(b.data, t->npk, t->pk_types);
	}
	return t->p_row_delete;
}

/* clock_coll: the collation of clock key column i (pgsync_table_init's rule). */
static const char *
clock_coll(db_table *t, int i)
{
	Oid coll = t->pk[i].coll;

	if (!OidIsValid(coll))
		return NULL;
	if (get_collation_isdeterministic(coll))
		return "pg_catalog.\"C\"";
	return generate_collation_name(coll);
}

/* base_coll: the collation of base key column i, or NULL. */
static const char *
base_coll(db_table *t, int i)
{
	return OidIsValid(t->pk[i].coll) ? generate_collation_name(t->pk[i].coll) : NULL;
}

/*
 * keys_join: " JOIN ROWS FROM (unnest($first), ...) AS k(k0, ...) ON
 * alias.key = k.k0 ...": the rows (of the clock, alias "c", or of the base
 * table, "b") of the keys in one array per key column; their types go to
 * types[first - 1 ...].
 */
static void
keys_join(StringInfo b, db_table *t, const char *alias, Oid *types, int first)
{
	bool clock = strcmp(alias, "c") == 0;

	appendStringInfoString(b, " JOIN ROWS FROM (");
	for (int i = 0; i < t->npk; i++)
	{
		Oid arr = get_array_type(t->pk[i].basetyp);

		if (!OidIsValid(arr))
			elog(ERROR, "pgsync: no array type for key column %s of %s", t->pk[i].name, t->name);
		types[first - 1 + i] = arr;
		appendStringInfo(b, "%spg_catalog.unnest($%d)", i ? ", " : "", first + i);
	}
	appendStringInfoString(b, ") AS k(");
	for (int i = 0; i < t->npk; i++)
		appendStringInfo(b, "%sk%d", i ? ", " : "", i);
	appendStringInfoString(b, ") ON ");
	for (int i = 0; i < t->npk; i++)
	{
		/* in the collation of the side whose key index the join uses */
		const char *coll = clock ? clock_coll(t, i) : base_coll(t, i);

		appendStringInfo(b, "%s%s.%s OPERATOR(pg_catalog.=) (k.k%d%s%s)", i ? " AND " : "", alias,
						 quote_identifier(t->pk[i].name), i, coll ? " COLLATE " : "",
						 coll ? coll : "");
	}
}

/*
 * pgsync_plan_read: the reads of builds and key scans (pg_internal.h). Key order
 * is the clock table's key index (COLLATE "C"), except for PGR_BASE, which
 * walks the base table's key index in its own collation.
 */
SPIPlanPtr
pgsync_plan_read(db_table *t, pgsync_read_kind kind, int order)
{
	SPIPlanPtr *slot = &t->p_read[kind][order];
	const char *a = kind == PGR_BASE ? "b" : "c";

	if (*slot == NULL)
	{
		StringInfoData b;
		bool		   in = kind == PGR_CHANGES_IN || kind == PGR_CLOCKS_IN;
		int			   nargs = (order == 2 ? 2 + t->npk : 2) + (in ? t->npk : 0);
		Oid			  *types = palloc(sizeof(Oid) * (2 + 2 * t->npk));
		int			   i;
		SPIPlanPtr	   p;

		types[0] = types[1] = INT8OID;
		for (i = 0; i < t->npk; i++)
			types[2 + i] = t->pk_types[i];
		initStringInfo(&b);
		appendStringInfoString(&b, "SELECT ");
		pgsync_pk_list(&b, t, a);
		switch (kind)
		{
			case PGR_CHANGES:
			case PGR_CHANGES_IN:
			case PGR_SNAPSHOT:
				appendStringInfo(&b, ", c.cl, c.clk, b.%s IS NOT NULL",
								 quote_identifier(t->pk[0].name));
				for (i = 0; i < t->ncols; i++)
					appendStringInfo(&b, ", b.%s", quote_identifier(t->cols[i].name));
				appendStringInfo(&b, " FROM %s c", t->q_clock);
				if (in)
					keys_join(&b, t, "c", types, order == 2 ? 3 + t->npk : 3);
				/* a snapshot carries tombstones too: a receiver that re-inserts a
				 * deleted key must know the life it ended (causal length) */
				appendStringInfo(&b, " LEFT JOIN %s b ON ", t->q_base);
				for (i = 0; i < t->npk; i++)
				{
					/* clock keys compare bytewise (COLLATE "C"): join in the base's
					 * collation so that the base table's key index is used */
					const char *bc = base_coll(t, i);

					appendStringInfo(&b, "%sb.%s OPERATOR(pg_catalog.=) (c.%s%s%s)",
									 i ? " AND " : "", quote_identifier(t->pk[i].name),
									 quote_identifier(t->pk[i].name), bc ? " COLLATE " : "",
									 bc ? bc : "");
				}
				break;
			case PGR_CLOCKS:
			case PGR_CLOCKS_IN:
			case PGR_KEYS:
				appendStringInfo(&b, ", c.cl, c.clk FROM %s c", t->q_clock);
				if (in)
					keys_join(&b, t, "c", types, order == 2 ? 3 + t->npk : 3);
				break;
			case PGR_CHANGED_KEYS:
				appendStringInfo(&b, " FROM %s c", t->q_clock);
				break;
			case PGR_BASE:
				for (i = 0; i < t->ncols; i++)
					appendStringInfo(&b, ", b.%s", quote_identifier(t->cols[i].name));
				appendStringInfo(&b, " FROM %s b", t->q_base);
				break;
		}
		/*
		 * No upper bound on the row's ver: a row whose newest stamp is past
		 * until (a later transaction committed before this snapshot) may
		 * still hold stamps <= until, which this payload must carry.
		 */
		appendStringInfoString(&b, " WHERE $2 IS NOT NULL");
		if (kind == PGR_CHANGES || kind == PGR_CLOCKS || kind == PGR_CHANGED_KEYS || in)
			appendStringInfoString(&b, " AND c.ver > $1");
		else if (kind == PGR_KEYS)
			appendStringInfoString(&b, " AND c.cl % 2 = 1 AND $1 IS NOT NULL");
		else
			appendStringInfoString(&b, " AND $1 IS NOT NULL");
		if (order == 2)
		{
			appendStringInfoString(&b, " AND (");
			pgsync_pk_list(&b, t, a);
			appendStringInfoString(&b, ") > (");
			for (i = 0; i < t->npk; i++)
				appendStringInfo(&b, "%s$%d", i ? ", " : "", i + 3);
			appendStringInfoChar(&b, ')');
		}
		if (kind == PGR_CHANGED_KEYS)
			appendStringInfo(&b, " LIMIT %d", PG_KEYED_MAX + 1);
		else if (order > 0)
		{
			appendStringInfoString(&b, " ORDER BY ");
			pgsync_pk_list(&b, t, a);
		}
		else if (kind == PGR_CHANGES || kind == PGR_CHANGES_IN)
			appendStringInfoString(&b, " ORDER BY c.ver");
		/*
		 * A chunk reads max_rows rows of a possibly huge range: plan for a
		 * fast start (key index scan + nested loop), never a sort of the
		 * whole rest of the table per chunk (pg_database.c also lowers
		 * cursor_tuple_fraction while the cursor is opened).
		 */
		p = SPI_prepare_cursor(b.data, nargs, types,
							   order && !in && kind != PGR_CHANGED_KEYS ? CURSOR_OPT_FAST_PLAN : 0);
		if (p == NULL)
			elog(ERROR, "pgsync: preparing \"%s\" failed: %s", b.data,
				 SPI_result_code_string(SPI_result));
		SPI_keepplan(p);
		*slot = p;
	}
	return *slot;
}

/*
 * pgsync_plan_probe: the rows of a batch of keys, given as one array per key
 * column: base rows with their columns (run as the caller: privileges and
 * row-level security decide), or clock rows (as the metadata owner).
 */
SPIPlanPtr
pgsync_plan_probe(db_table *t, bool clock)
{
	SPIPlanPtr *slot = clock ? &t->p_probe_clock : &t->p_probe_base;

	if (*slot == NULL)
	{
		StringInfoData b;
		Oid			  *types = palloc(sizeof(Oid) * t->npk);
		const char	  *a = clock ? "c" : "b";
		int			   i;

		initStringInfo(&b);
		appendStringInfoString(&b, "SELECT ");
		pgsync_pk_list(&b, t, a);
		if (clock)
			appendStringInfo(&b, ", c.cl, c.clk FROM %s c", t->q_clock);
		else
		{
			for (i = 0; i < t->ncols; i++)
				appendStringInfo(&b, ", b.%s", quote_identifier(t->cols[i].name));
			appendStringInfo(&b, " FROM %s b", t->q_base);
		}
		keys_join(&b, t, a, types, 1);
		*slot = pgsync_plan_keep(b.data, t->npk, types);
	}
	return *slot;
}

/* pgsync_plan_row_exists: SELECT 1 FROM base WHERE pk = $1.. (as the owner). */
SPIPlanPtr
pgsync_plan_row_exists(db_table *t)
{
	if (t->p_row_exists == NULL)
	{
		StringInfoData b;

		initStringInfo(&b);
		appendStringInfo(&b, "SELECT 1 FROM %s WHERE ", t->q_base);
		where_pk(&b, t, NULL, 1);
		t->p_row_exists = pgsync_plan_keep(b.data, t->npk, t->pk_types);
	}
	return t->p_row_exists;
}

/*
 * pgsync_table_merge_plan: UPDATE of the columns cols[0..n) and the INSERT ..
 * ON CONFLICT used when the row is absent. Cached per column set; returns
 * NULL-free plans. Parameters: pk.., then the n column values.
 */
pgsync_merge_plan *
pgsync_table_merge_plan(db_table *t, int n, const int *cols)
{
	char			   key[64];
	StringInfoData	   k;
	pgsync_merge_plan *m;
	bool			   found;
	Oid				  *types;
	StringInfoData	   b;
	int				   i;
	MemoryContext	   old;

	initStringInfo(&k);
	for (i = 0; i < n; i++)
		appendStringInfo(&k, "%d,", cols[i]);
	if (t->merge_plans == NULL)
	{
		HASHCTL ctl;

		memset(&ctl, 0, sizeof(ctl));
		ctl.keysize = sizeof(key);
		ctl.entrysize = sizeof(pgsync_merge_plan);
		ctl.hcxt = t->cxt;
		t->merge_plans =
			hash_create("pgsync merge plans", 16, &ctl, HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);
	}
	memset(key, 0, sizeof(key));
	if (k.len < (int) sizeof(key) && t->nmerge_plans < 256)
	{
		strlcpy(key, k.data, sizeof(key));
		m = hash_search(t->merge_plans, key, HASH_ENTER, &found);
		if (found && m->upd && m->ins)
			return m;
		m->upd = m->ins = NULL;
		m->cols_key = NULL;
		t->nmerge_plans++;
	}
	else
	{
		/* too many or too wide: a one-off entry the caller frees */
		m = palloc0(sizeof(pgsync_merge_plan));
		m->cols_key = pstrdup("");
	}

	old = MemoryContextSwitchTo(t->cxt);
	types = palloc(sizeof(Oid) * (t->npk + n));
	MemoryContextSwitchTo(old);
	memcpy(types, t->pk_types, sizeof(Oid) * t->npk);
	for (i = 0; i < n; i++)
		types[t->npk + i] = t->cols[cols[i]].typid;

	initStringInfo(&b);
	appendStringInfo(&b, "UPDATE %s SET ", t->q_base);
	for (i = 0; i < n; i++)
		appendStringInfo(&b, "%s%s = $%d", i ? ", " : "", quote_identifier(t->cols[cols[i]].name),
						 t->npk + i + 1);
	appendStringInfoString(&b, " WHERE ");
	where_pk(&b, t, NULL, 1);
	m->upd = pgsync_plan_keep(b.data, t->npk + n, types);

	resetStringInfo(&b);
	appendStringInfo(&b, "INSERT INTO %s (", t->q_base);
	pgsync_pk_list(&b, t, NULL);
	for (i = 0; i < n; i++)
		appendStringInfo(&b, ", %s", quote_identifier(t->cols[cols[i]].name));
	appendStringInfoString(&b, ") VALUES (");
	for (i = 0; i < t->npk + n; i++)
		appendStringInfo(&b, "%s$%d", i ? ", " : "", i + 1);
	appendStringInfoString(&b, ") ON CONFLICT (");
	pgsync_pk_list(&b, t, NULL);
	if (n == 0)
		appendStringInfoString(&b, ") DO NOTHING");
	else
	{
		appendStringInfoString(&b, ") DO UPDATE SET ");
		for (i = 0; i < n; i++)
			appendStringInfo(&b, "%s%s = EXCLUDED.%s", i ? ", " : "",
							 quote_identifier(t->cols[cols[i]].name),
							 quote_identifier(t->cols[cols[i]].name));
	}
	m->ins = pgsync_plan_keep(b.data, t->npk + n, types);
	return m;
}
