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
		if (!OidIsValid(relid) || t->relid == relid || t->clock_relid == relid)
			t->valid = false;
	}
}

/* pg_table_cache_setup creates the cache and registers the invalidation hook. */
void
pg_table_cache_setup(void)
{
	HASHCTL ctl;

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = sizeof(Oid);
	ctl.entrysize = sizeof(db_table);
	table_cache = hash_create("pgsync tables", 32, &ctl, HASH_ELEM | HASH_BLOBS);
	CacheRegisterRelcacheCallback(table_inval, (Datum) 0);
}

/* pg_table_release_all: at transaction end no call holds an entry. */
void
pg_table_release_all(void)
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
		HASH_SEQ_STATUS st;
		pg_merge_plan  *m;

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

static char *
text_array_elem(Datum arr, int i, int *n)
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
col_resolve(db_table *t, pg_col *c, const char *name)
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
	pg_col_setup(c, typid, typmod);
	c->coll = coll;
}

/* table_load builds entry t (relid set) from pgsync.tables. SPI connected. */
static bool
table_load(db_table *t)
{
	static SPIPlanPtr plan = NULL;
	Oid				  argt[1] = {OIDOID};
	Datum			  arg[1];
	pg_user_save	  us;
	HeapTuple		  tup;
	TupleDesc		  td;
	bool			  isnull;
	MemoryContext	  old;
	Datum			  pkarr, colarr;
	char			 *algo;
	int				  i, n;

	arg[0] = ObjectIdGetDatum(t->relid);
	pg_as_meta(&us);
	if (plan == NULL)
	{
		plan = SPI_prepare("SELECT name, clock::oid, algo, pk_cols, cols "
						   "FROM pgsync.tables WHERE tbl = $1",
						   1, argt);
		if (plan == NULL)
			elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
		SPI_keepplan(plan);
	}
	if (SPI_execute_plan(plan, arg, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "reading pgsync.tables failed");
	pg_as_caller(&us);
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

	t->q_base = quote_qualified_identifier(get_namespace_name(get_rel_namespace(t->relid)),
										   get_rel_name(t->relid));
	t->q_clock = quote_qualified_identifier(get_namespace_name(get_rel_namespace(t->clock_relid)),
											get_rel_name(t->clock_relid));
	if (get_rel_name(t->clock_relid) == NULL)
		ereport(ERROR, (errcode(ERRCODE_UNDEFINED_TABLE),
						errmsg("clock table of synced table %s is missing", t->name),
						errhint("Call sync_cleanup and sync_init on the table again.")));

	text_array_elem(pkarr, -1, &t->npk);
	text_array_elem(colarr, -1, &t->ncols);
	t->pk = palloc0(sizeof(pg_col) * t->npk);
	t->cols = palloc0(sizeof(pg_col) * Max(t->ncols, 1));
	t->pk_names = palloc0(sizeof(char *) * t->npk);
	t->col_names = palloc0(sizeof(char *) * Max(t->ncols, 1));
	t->pk_types = palloc0(sizeof(Oid) * t->npk);
	t->row_types = palloc0(sizeof(Oid) * (t->npk + t->ncols));
	for (i = 0; i < t->npk; i++)
	{
		col_resolve(t, &t->pk[i], text_array_elem(pkarr, i, &n));
		t->pk_names[i] = t->pk[i].name;
		t->pk_types[i] = t->pk[i].typid;
		t->row_types[i] = t->pk[i].typid;
	}
	for (i = 0; i < t->ncols; i++)
	{
		col_resolve(t, &t->cols[i], text_array_elem(colarr, i, &n));
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
	pg_user_save	  us;
	MemoryContext	  old;
	uint64			  n;
	char			**names;
	int				 *cols;

	pg_as_meta(&us);
	if (plan == NULL)
	{
		plan = SPI_prepare("SELECT name, now FROM pgsync.column_history WHERE tbl = $1 ORDER BY name",
						   1, argt);
		if (plan == NULL)
			elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
		SPI_keepplan(plan);
	}
	if (SPI_execute_plan(plan, arg, NULL, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "reading pgsync.column_history failed");
	pg_as_caller(&us);
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
 * pg_table_get returns the cache entry of a synced table (busy until the end
 * of the transaction), or NULL / ERROR when relid is not synced. SPI must be
 * connected.
 */
db_table *
pg_table_get(Oid relid, bool missing_ok)
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
	memset(((char *) t) + sizeof(Oid), 0, sizeof(db_table) - sizeof(Oid));
	t->relid = relid;
	t->valid = true;
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
 * pg_table_reload: rebuild the entry of relid from its metadata now, in
 * place (its address stays, its busy count too), for a call that changed
 * the metadata and goes on using the table (sync_init after ADD COLUMN,
 * then the held values of the new columns). Nothing else may hold pointers
 * into the old entry's columns. SPI connected.
 */
void
pg_table_reload(Oid relid)
{
	db_table *t = hash_search(table_cache, &relid, HASH_FIND, NULL);
	int		  busy;

	if (t == NULL)
		return;
	busy = t->busy;
	table_free(t);
	memset(((char *) t) + sizeof(Oid), 0, sizeof(db_table) - sizeof(Oid));
	t->relid = relid;
	t->valid = true;
	if (!table_load(t))
	{
		table_free(t);
		hash_search(table_cache, &relid, HASH_REMOVE, NULL);
		return;
	}
	t->busy = busy;
}

/* pg_table_cached: the entry if cached and valid (busy++), else NULL; no SPI. */
db_table *
pg_table_cached(Oid relid)
{
	db_table *t = hash_search(table_cache, &relid, HASH_FIND, NULL);

	if (t == NULL || !t->valid)
		return NULL;
	t->busy++;
	return t;
}

/* pg_table_list returns the relids of all synced tables, by name. */
int
pg_table_list(Oid **relids)
{
	pg_user_save us;
	uint64		 i;
	bool		 isnull;

	pg_as_meta(&us);
	if (SPI_execute("SELECT tbl::oid FROM pgsync.tables ORDER BY name", false, 0) != SPI_OK_SELECT)
		elog(ERROR, "reading pgsync.tables failed");
	pg_as_caller(&us);
	*relids = palloc(sizeof(Oid) * (SPI_processed + 1));
	for (i = 0; i < SPI_processed; i++)
		(*relids)[i] = DatumGetObjectId(
			SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1, &isnull));
	i = SPI_processed;
	SPI_freetuptable(SPI_tuptable);
	return (int) i;
}

/* pg_table_by_name: the relid of the synced table with this payload name. */
Oid
pg_table_by_name(const char *name, size_t len)
{
	static SPIPlanPtr plan = NULL;
	Oid				  argt[1] = {TEXTOID};
	Datum			  arg[1];
	pg_user_save	  us;
	Oid				  res = InvalidOid;
	bool			  isnull;

	arg[0] = PointerGetDatum(cstring_to_text_with_len(name, (int) len));
	pg_as_meta(&us);
	if (plan == NULL)
	{
		plan = SPI_prepare("SELECT tbl::oid FROM pgsync.tables WHERE name = $1", 1, argt);
		if (plan == NULL)
			elog(ERROR, "SPI_prepare failed");
		SPI_keepplan(plan);
	}
	if (SPI_execute_plan(plan, arg, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "reading pgsync.tables failed");
	pg_as_caller(&us);
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

static void
pk_list(StringInfo b, db_table *t, const char *alias)
{
	int i;

	for (i = 0; i < t->npk; i++)
		appendStringInfo(b, "%s%s%s%s", i ? ", " : "", alias ? alias : "", alias ? "." : "",
						 quote_identifier(t->pk[i].name));
}

static SPIPlanPtr
keep(const char *sql, int n, Oid *types)
{
	SPIPlanPtr p = SPI_prepare(sql, n, types);

	if (p == NULL)
		elog(ERROR, "pgsync: preparing \"%s\" failed: %s", sql, SPI_result_code_string(SPI_result));
	SPI_keepplan(p);
	return p;
}

/* pg_plan_clock_get: SELECT cl, clk FROM clock WHERE pk = $1.. */
SPIPlanPtr
pg_plan_clock_get(db_table *t)
{
	if (t->p_clock_get == NULL)
	{
		StringInfoData b;

		initStringInfo(&b);
		appendStringInfo(&b, "SELECT cl, clk FROM %s WHERE ", t->q_clock);
		where_pk(&b, t, NULL, 1);
		t->p_clock_get = keep(b.data, t->npk, t->pk_types);
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
	pk_list(&b, t, NULL);
	appendStringInfoString(&b, ", cl, ver, clk) VALUES (");
	for (i = 0; i < t->npk + 3; i++)
		appendStringInfo(&b, "%s$%d", i ? ", " : "", i + 1);
	appendStringInfoString(&b, ") ");
	if (strcmp(conflict, "update") == 0)
	{
		appendStringInfoString(&b, "ON CONFLICT (");
		pk_list(&b, t, NULL);
		appendStringInfoString(
			&b, ") DO UPDATE SET cl = EXCLUDED.cl, ver = EXCLUDED.ver, clk = EXCLUDED.clk");
	}
	else
		appendStringInfoString(&b, "ON CONFLICT DO NOTHING");
	return keep(b.data, t->npk + 3, types);
}

/* pg_plan_clock_upsert: INSERT (pk.., cl, ver, clk) ON CONFLICT DO UPDATE. */
SPIPlanPtr
pg_plan_clock_upsert(db_table *t)
{
	if (t->p_clock_upsert == NULL)
		t->p_clock_upsert = clock_insert_plan(t, " AS c", "update");
	return t->p_clock_upsert;
}

/* pg_plan_clock_insnew: INSERT (pk.., cl, ver, clk) ON CONFLICT DO NOTHING. */
SPIPlanPtr
pg_plan_clock_insnew(db_table *t)
{
	if (t->p_clock_insnew == NULL)
		t->p_clock_insnew = clock_insert_plan(t, "", "nothing");
	return t->p_clock_insnew;
}

/*
 * pg_plan_clock_cas: UPDATE the clock row of pk ($1..) to cl, ver, clk
 * ($n+1..$n+3) only if it still has cl and clk $n+4, $n+5.
 */
SPIPlanPtr
pg_plan_clock_cas(db_table *t)
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
		t->p_clock_cas = keep(b.data, n + 5, types);
	}
	return t->p_clock_cas;
}

/* pg_plan_row_replace: INSERT all columns ON CONFLICT DO UPDATE all columns. */
SPIPlanPtr
pg_plan_row_replace(db_table *t)
{
	if (t->p_row_replace == NULL)
	{
		StringInfoData b;
		int			   i;

		initStringInfo(&b);
		appendStringInfo(&b, "INSERT INTO %s (", t->q_base);
		pk_list(&b, t, NULL);
		for (i = 0; i < t->ncols; i++)
			appendStringInfo(&b, ", %s", quote_identifier(t->cols[i].name));
		appendStringInfoString(&b, ") VALUES (");
		for (i = 0; i < t->npk + t->ncols; i++)
			appendStringInfo(&b, "%s$%d", i ? ", " : "", i + 1);
		appendStringInfoString(&b, ") ON CONFLICT (");
		pk_list(&b, t, NULL);
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
		t->p_row_replace = keep(b.data, t->npk + t->ncols, t->row_types);
	}
	return t->p_row_replace;
}

/* pg_plan_row_delete: DELETE FROM base WHERE pk = $1.. */
SPIPlanPtr
pg_plan_row_delete(db_table *t)
{
	if (t->p_row_delete == NULL)
	{
		StringInfoData b;

		initStringInfo(&b);
		appendStringInfo(&b, "DELETE FROM %s WHERE ", t->q_base);
		where_pk(&b, t, NULL, 1);
		t->p_row_delete = keep(b.data, t->npk, t->pk_types);
	}
	return t->p_row_delete;
}

/* clock_coll: the collation of clock key column i (pg_table_init's rule). */
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
 * pg_plan_read: the reads of builds and key scans (pg_internal.h). Key order
 * is the clock table's key index (COLLATE "C"), except for PGR_BASE, which
 * walks the base table's key index in its own collation.
 */
SPIPlanPtr
pg_plan_read(db_table *t, pg_read_kind kind, int order)
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
		pk_list(&b, t, a);
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
			pk_list(&b, t, a);
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
			pk_list(&b, t, a);
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
 * pg_plan_probe: the rows of a batch of keys, given as one array per key
 * column: base rows with their columns (run as the caller: privileges and
 * row-level security decide), or clock rows (as the metadata owner).
 */
SPIPlanPtr
pg_plan_probe(db_table *t, bool clock)
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
		pk_list(&b, t, a);
		if (clock)
			appendStringInfo(&b, ", c.cl, c.clk FROM %s c", t->q_clock);
		else
		{
			for (i = 0; i < t->ncols; i++)
				appendStringInfo(&b, ", b.%s", quote_identifier(t->cols[i].name));
			appendStringInfo(&b, " FROM %s b", t->q_base);
		}
		keys_join(&b, t, a, types, 1);
		*slot = keep(b.data, t->npk, types);
	}
	return *slot;
}

/* pg_plan_row_exists: SELECT 1 FROM base WHERE pk = $1.. (as the owner). */
SPIPlanPtr
pg_plan_row_exists(db_table *t)
{
	if (t->p_row_exists == NULL)
	{
		StringInfoData b;

		initStringInfo(&b);
		appendStringInfo(&b, "SELECT 1 FROM %s WHERE ", t->q_base);
		where_pk(&b, t, NULL, 1);
		t->p_row_exists = keep(b.data, t->npk, t->pk_types);
	}
	return t->p_row_exists;
}

/*
 * pg_table_merge_plan: UPDATE of the columns cols[0..n) and the INSERT ..
 * ON CONFLICT used when the row is absent. Cached per column set; returns
 * NULL-free plans. Parameters: pk.., then the n column values.
 */
pg_merge_plan *
pg_table_merge_plan(db_table *t, int n, const int *cols)
{
	char		   key[64];
	StringInfoData k;
	pg_merge_plan *m;
	bool		   found;
	Oid			  *types;
	StringInfoData b;
	int			   i;
	MemoryContext  old;

	initStringInfo(&k);
	for (i = 0; i < n; i++)
		appendStringInfo(&k, "%d,", cols[i]);
	if (t->merge_plans == NULL)
	{
		HASHCTL ctl;

		memset(&ctl, 0, sizeof(ctl));
		ctl.keysize = sizeof(key);
		ctl.entrysize = sizeof(pg_merge_plan);
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
		m = palloc0(sizeof(pg_merge_plan));
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
	m->upd = keep(b.data, t->npk + n, types);

	resetStringInfo(&b);
	appendStringInfo(&b, "INSERT INTO %s (", t->q_base);
	pk_list(&b, t, NULL);
	for (i = 0; i < n; i++)
		appendStringInfo(&b, ", %s", quote_identifier(t->cols[cols[i]].name));
	appendStringInfoString(&b, ") VALUES (");
	for (i = 0; i < t->npk + n; i++)
		appendStringInfo(&b, "%s$%d", i ? ", " : "", i + 1);
	appendStringInfoString(&b, ") ON CONFLICT (");
	pk_list(&b, t, NULL);
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
	m->ins = keep(b.data, t->npk + n, types);
	return m;
}

/* ---- sync_init / sync_cleanup ----------------------------------------- */

static void
exec_sql(const char *sql, int expect)
{
	int rc = SPI_execute(sql, false, 0);

	if (rc != expect)
		elog(ERROR, "pgsync: \"%s\" failed: %s", sql, SPI_result_code_string(rc));
}

/* array_elem appends s as a quoted element of a text[] literal. */
static void
array_elem(StringInfo b, const char *s)
{
	appendStringInfoChar(b, '"');
	for (; *s; s++)
	{
		if (*s == '"' || *s == '\\')
			appendStringInfoChar(b, '\\');
		appendStringInfoChar(b, *s);
	}
	appendStringInfoChar(b, '"');
}

/*
 * pg_table_init: sync_init's body. Creates the clock table and the
 * triggers, records the table and backfills a clock row for every existing
 * row. Idempotent; SPI connected, caller owns the table.
 */
/*
 * key_from_sequence: whether key column a of relid is filled by a sequence
 * (identity, serial, or a nextval() default): such keys collide between
 * replicas (docs/PG.md).
 */
static bool
key_from_sequence(Oid relid, Form_pg_attribute a)
{
	Oid	  types[2] = {OIDOID, INT2OID};
	Datum v[2] = {ObjectIdGetDatum(relid), Int16GetDatum(a->attnum)};
	bool  isnull, seq = false;

	if (a->attidentity != '\0')
		return true;
	if (!a->atthasdef)
		return false;
	if (SPI_execute_with_args("SELECT pg_catalog.pg_get_expr(adbin, adrelid) ~ 'nextval\\(' "
							  "FROM pg_catalog.pg_attrdef WHERE adrelid = $1 AND adnum = $2",
							  2, types, v, NULL, true, 1) == SPI_OK_SELECT &&
		SPI_processed == 1)
		seq = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull)) &&
			  !isnull;
	return seq;
}

/*
 * append_new_columns: sync_init after ALTER TABLE ... ADD COLUMN. The new
 * columns join the end of the clock blobs' column order; existing rows keep
 * their clocks, the new cells unstamped (the column's default stays local
 * until someone writes it: docs/MIGRATIONS.md), so nothing is re-sent.
 * Values held for those columns are applied by sync_init right after.
 */
static void
append_new_columns(db_table *t)
{
	Relation	   rel = table_open(t->relid, AccessShareLock);
	TupleDesc	   td = RelationGetDescr(rel);
	StringInfoData names, atts, types;
	int			   added = 0;
	pg_user_save   us;

	initStringInfo(&names);
	initStringInfo(&atts);
	initStringInfo(&types);
	for (int i = 0; i < td->natts; i++)
	{
		Form_pg_attribute a = TupleDescAttr(td, i);
		bool			  known = false;

		if (a->attisdropped || a->attgenerated)
			continue;
		for (int k = 0; k < t->npk && !known; k++)
			known = t->pk[k].attnum == a->attnum;
		for (int k = 0; k < t->ncols && !known; k++)
			known = t->cols[k].attnum == a->attnum;
		if (known)
			continue;
		appendStringInfoString(&names, added ? "," : "{");
		appendStringInfoString(&atts, added ? "," : "{");
		appendStringInfoString(&types, added ? "," : "{");
		array_elem(&names, NameStr(a->attname));
		appendStringInfo(&atts, "%d", (int) a->attnum);
		appendStringInfo(&types, "%u", a->atttypid);
		added++;
	}
	table_close(rel, AccessShareLock);
	if (!added)
		return;
	appendStringInfoChar(&names, '}');
	appendStringInfoChar(&atts, '}');
	appendStringInfoChar(&types, '}');
	{
		Oid	  at[4] = {OIDOID, TEXTOID, TEXTOID, TEXTOID};
		Datum v[4] = {ObjectIdGetDatum(t->relid), CStringGetTextDatum(names.data),
					  CStringGetTextDatum(atts.data), CStringGetTextDatum(types.data)};

		pg_as_meta(&us);
		if (SPI_execute_with_args("UPDATE pgsync.tables SET cols = cols || $2::text[], "
								  "col_attnums = col_attnums || $3::int2[], "
								  "col_types = col_types || $4::oid[] WHERE tbl = $1::regclass",
								  4, at, v, NULL, false, 0) != SPI_OK_UPDATE ||
			SPI_execute_with_args("DELETE FROM pgsync.column_history WHERE tbl = $1::regclass "
								  "AND name = ANY ($2::text[])",
								  2, at, v, NULL, false, 0) != SPI_OK_DELETE)
			elog(ERROR, "pgsync: recording the new columns failed");
		pg_as_caller(&us);
	}
	CacheInvalidateRelcacheByRelid(t->relid);
	CommandCounterIncrement();
	pg_table_reload(t->relid);
}

void
pg_table_init(Oid relid, db_algo algo, Oid func_nsp, const char *want_name, bool allow_seq_keys)
{
	Relation	   rel;
	Oid			   pkidx;
	Relation	   idx;
	TupleDesc	   td;
	char		  *nsp, *relname, *name, *clockname;
	StringInfoData b, pkarr, colarr, pkdef, pkatts, colatts, coltypes;
	int			   npk, i, j, ncols = 0;
	AttrNumber	  *pkatt;
	pg_user_save   us;
	db_table	  *t;

	rel = table_open(relid, ShareRowExclusiveLock);
	if (rel->rd_rel->relkind != RELKIND_RELATION)
		ereport(ERROR, (errcode(ERRCODE_WRONG_OBJECT_TYPE),
						errmsg("\"%s\" is not a plain table", RelationGetRelationName(rel)),
						errhint("pgsync syncs ordinary tables; partitioned tables, views and "
								"foreign tables are not supported.")));
	if (rel->rd_rel->relpersistence == RELPERSISTENCE_TEMP)
		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg("temporary table \"%s\" cannot be synced", RelationGetRelationName(rel))));
	pkidx = RelationGetPrimaryKeyIndex(rel, false);
	if (!OidIsValid(pkidx))
		ereport(ERROR, (errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
						errmsg("table \"%s\" has no primary key", RelationGetRelationName(rel)),
						errhint("pgsync identifies rows by their primary key: add one (ALTER TABLE "
								"... ADD PRIMARY KEY).")));
	nsp = get_namespace_name(RelationGetNamespace(rel));
	relname = pstrdup(RelationGetRelationName(rel));
	/* the name in payloads: the table's own, whatever its schema (docs/PG.md) */
	name = want_name ? pstrdup(want_name) : relname;
	if (name[0] == '\0' || strlen(name) > PGS_MAX_NAME)
		ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						errmsg("\"%s\" cannot be a table's name in payloads", name),
						errhint("Pass a name of 1 to %d bytes.", PGS_MAX_NAME)));
	clockname = psprintf("%s__sync_clock", relname);
	if (strlen(clockname) >= NAMEDATALEN)
		ereport(ERROR, (errcode(ERRCODE_NAME_TOO_LONG),
						errmsg("table name \"%s\" is too long to sync", relname),
						errhint("The clock table name (table name + \"__sync_clock\") must fit in "
								"%d bytes; rename the table.",
								NAMEDATALEN - 1)));

	idx = index_open(pkidx, AccessShareLock);
	npk = idx->rd_index->indnkeyatts;
	pkatt = palloc(sizeof(AttrNumber) * npk);
	for (i = 0; i < npk; i++)
		pkatt[i] = idx->rd_index->indkey.values[i];
	index_close(idx, AccessShareLock);

	td = RelationGetDescr(rel);
	initStringInfo(&pkarr);
	initStringInfo(&colarr);
	initStringInfo(&pkdef);
	initStringInfo(&pkatts);
	initStringInfo(&colatts);
	initStringInfo(&coltypes);
	appendStringInfoString(&pkarr, "{");
	appendStringInfoString(&colarr, "{");
	appendStringInfoString(&pkatts, "{");
	appendStringInfoString(&colatts, "{");
	appendStringInfoString(&coltypes, "{");
	for (i = 0; i < npk; i++)
	{
		Form_pg_attribute a = TupleDescAttr(td, pkatt[i] - 1);
		const char		 *an = NameStr(a->attname);
		Oid				  coll;

		if (!pg_kind_pk_ok(pg_type_kind(getBaseType(a->atttypid))))
			ereport(
				ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("primary key column \"%s\" has type %s, which pgsync cannot use in a key",
						an, format_type_be(a->atttypid)),
				 errhint("Key columns may be integers, text, varchar, bytea, boolean, uuid, date, "
						 "timestamp or timestamptz.")));
		if (strcmp(an, "cl") == 0 || strcmp(an, "ver") == 0 || strcmp(an, "clk") == 0)
			ereport(
				ERROR,
				(errcode(ERRCODE_DUPLICATE_COLUMN),
				 errmsg("primary key column \"%s\" clashes with a clock table column", an),
				 errhint(
					 "Rename the key column; \"cl\", \"ver\" and \"clk\" are used by pgsync.")));
		if (!allow_seq_keys && key_from_sequence(relid, a))
			ereport(
				ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("primary key column \"%s\" of table %s is generated by a sequence", an,
						RelationGetRelationName(rel)),
				 errdetail("Every replica generates the same ids (1, 2, 3, ...): two different "
						   "rows made on two replicas would have one key and merge into one."),
				 errhint("Use a key that is unique across devices: uuid PRIMARY KEY DEFAULT "
						 "sync_uuid() (or text DEFAULT sync_uuid()::text). If only this database "
						 "ever inserts rows, pass allow_sequence_keys => true.")));
		if (i)
		{
			appendStringInfoChar(&pkarr, ',');
			appendStringInfoChar(&pkatts, ',');
		}
		array_elem(&pkarr, an);
		appendStringInfo(&pkatts, "%d", (int) a->attnum);
		appendStringInfo(&pkdef, "%s %s", quote_identifier(an),
						 format_type_with_typemod(a->atttypid, a->atttypmod));
		/*
		 * Clock keys of a deterministic collation use COLLATE "C": the same
		 * equality (bytewise), cheaper comparisons in the clock's key index.
		 */
		coll = a->attcollation;
		if (OidIsValid(coll) && get_collation_isdeterministic(coll))
			appendStringInfoString(&pkdef, " COLLATE pg_catalog.\"C\"");
		else if (OidIsValid(coll) && coll != get_typcollation(a->atttypid))
			appendStringInfo(&pkdef, " COLLATE %s", generate_collation_name(coll));
		appendStringInfoString(&pkdef, " NOT NULL, ");
	}
	for (i = 0; i < td->natts; i++)
	{
		Form_pg_attribute a = TupleDescAttr(td, i);
		bool			  iskey = false;

		if (a->attisdropped || a->attgenerated)
			continue;
		for (j = 0; j < npk; j++)
			iskey |= pkatt[j] == a->attnum;
		if (iskey)
			continue;
		if (ncols)
		{
			appendStringInfoChar(&colarr, ',');
			appendStringInfoChar(&colatts, ',');
			appendStringInfoChar(&coltypes, ',');
		}
		array_elem(&colarr, NameStr(a->attname));
		appendStringInfo(&colatts, "%d", (int) a->attnum);
		appendStringInfo(&coltypes, "%u", a->atttypid);
		ncols++;
	}
	appendStringInfoString(&pkarr, "}");
	appendStringInfoString(&colarr, "}");
	appendStringInfoString(&pkatts, "}");
	appendStringInfoString(&colatts, "}");
	appendStringInfoString(&coltypes, "}");
	table_close(rel, NoLock);

	/* already synced? */
	t = pg_table_get(relid, true);
	if (t != NULL)
	{

		if (t->algo != algo)
			ereport(ERROR, (errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
							errmsg("table %s is already synced with algorithm \"%s\"", t->name,
								   t->algo == DB_ALGO_GSET ? "gset" : "cls"),
							errhint("Call sync_cleanup first to change the algorithm.")));
		if (want_name && strcmp(want_name, t->name) != 0)
			ereport(ERROR, (errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
							errmsg("table %s is already synced as \"%s\"", relname, t->name),
							errhint("A table's name in payloads cannot change; call sync_init "
									"without a name.")));
		append_new_columns(t);
		pg_watch_refresh(relid);
		return; /* idempotent */
	}
	{
		Oid	  types[1] = {TEXTOID};
		Datum v[1] = {CStringGetTextDatum(name)};

		pg_as_meta(&us);
		if (SPI_execute_with_args("SELECT tbl::pg_catalog.text FROM pgsync.tables WHERE name = $1",
								  1, types, v, NULL, true, 1) != SPI_OK_SELECT)
			elog(ERROR, "pgsync: reading pgsync.tables failed");
		pg_as_caller(&us);
		if (SPI_processed > 0)
			ereport(ERROR,
					(errcode(ERRCODE_DUPLICATE_OBJECT),
					 errmsg("table %s is already synced as \"%s\"",
							SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1), name),
					 errdetail("Payloads name tables without their schema; two synced tables "
							   "cannot share a name."),
					 errhint("Give this one another name in payloads: sync_init('%s.%s', name => "
							 "'%s_%s'); its SQLite replicas then call their table %s_%s.",
							 nsp, relname, nsp, relname, nsp, relname)));
	}

	/* clock table and metadata, as the metadata owner */
	initStringInfo(&b);
	pg_as_meta(&us);
	appendStringInfo(&b,
					 "CREATE TABLE %s (%scl bigint NOT NULL, ver bigint NOT NULL, clk bytea NOT "
					 "NULL, PRIMARY KEY (",
					 quote_qualified_identifier(nsp, clockname), pkdef.data);
	for (i = 0; i < npk; i++)
		appendStringInfo(&b, "%s%s", i ? ", " : "",
						 quote_identifier(NameStr(TupleDescAttr(td, pkatt[i] - 1)->attname)));
	appendStringInfoString(&b, "))");
	exec_sql(b.data, SPI_OK_UTILITY);
	resetStringInfo(&b);
	appendStringInfo(&b, "CREATE INDEX ON %s (ver)", quote_qualified_identifier(nsp, clockname));
	exec_sql(b.data, SPI_OK_UTILITY);

	{
		Oid	  types[9] = {TEXTOID, OIDOID, TEXTOID, TEXTOID, TEXTOID,
						  TEXTOID, TEXTOID, TEXTOID, TEXTOID};
		Datum v[9];

		v[0] = CStringGetTextDatum(name);
		v[1] = ObjectIdGetDatum(relid);
		v[2] = CStringGetTextDatum(quote_qualified_identifier(nsp, clockname));
		v[3] = CStringGetTextDatum(algo == DB_ALGO_GSET ? "gset" : "cls");
		v[4] = CStringGetTextDatum(pkarr.data);
		v[5] = CStringGetTextDatum(colarr.data);
		v[6] = CStringGetTextDatum(pkatts.data);
		v[7] = CStringGetTextDatum(colatts.data);
		v[8] = CStringGetTextDatum(coltypes.data);
		if (SPI_execute_with_args(
				"INSERT INTO pgsync.tables (name, tbl, clock, algo, pk_cols, cols, rls, "
				"pk_attnums, col_attnums, col_types) "
				"SELECT $1, $2::regclass, $3::regclass, $4, $5::text[], $6::text[], "
				"CASE WHEN NOT r.relrowsecurity THEN 'off' WHEN r.relforcerowsecurity THEN "
				"'forced' ELSE 'on' END, $7::int2[], $8::int2[], $9::oid[] "
				"FROM pg_catalog.pg_class r WHERE r.oid = $2",
				9, types, v, NULL, false, 0) != SPI_OK_INSERT)
			elog(ERROR, "pgsync: recording the table failed");
		/* a table synced again after sync_cleanup starts without former names */
		if (SPI_execute_with_args("DELETE FROM pgsync.column_history WHERE tbl = $1::regclass", 1,
								  types + 1, v + 1, NULL, false, 0) != SPI_OK_DELETE)
			elog(ERROR, "pgsync: clearing the column history failed");
	}
	pg_as_caller(&us);

	/* triggers, as the caller (the table owner) */
	resetStringInfo(&b);
	appendStringInfo(&b,
					 "CREATE TRIGGER pgsync_capture AFTER INSERT OR UPDATE OR DELETE ON %s "
					 "FOR EACH ROW EXECUTE FUNCTION %s.sync_capture()",
					 quote_qualified_identifier(nsp, relname),
					 quote_identifier(get_namespace_name(func_nsp)));
	exec_sql(b.data, SPI_OK_UTILITY);
	resetStringInfo(&b);
	appendStringInfo(&b,
					 "CREATE TRIGGER pgsync_truncate BEFORE TRUNCATE ON %s "
					 "FOR EACH STATEMENT EXECUTE FUNCTION %s.sync_capture()",
					 quote_qualified_identifier(nsp, relname),
					 quote_identifier(get_namespace_name(func_nsp)));
	exec_sql(b.data, SPI_OK_UTILITY);
	CommandCounterIncrement();

	/* backfill: every existing row gets a fresh clock of this transaction */
	t = pg_table_get(relid, false);
	{
		uint8_t *blob;
		size_t	 len;
		bytea	*bb;
		Oid		 types[2] = {INT8OID, BYTEAOID};
		Datum	 v[2];

		pg_capture_fresh(t, &blob, &len);
		bb = t->fresh_bytea; /* pg_capture_fresh keeps the blob as a bytea */
		v[0] = Int64GetDatum(pg_txn_version());
		v[1] = PointerGetDatum(bb);
		resetStringInfo(&b);
		appendStringInfo(&b, "INSERT INTO %s (", t->q_clock);
		pk_list(&b, t, NULL);
		appendStringInfoString(&b, ", cl, ver, clk) SELECT ");
		pk_list(&b, t, NULL);
		appendStringInfo(&b, ", 1, $1, $2 FROM %s ON CONFLICT DO NOTHING", t->q_base);
		pg_as_meta(&us);
		if (SPI_execute_with_args(b.data, 2, types, v, NULL, false, 0) != SPI_OK_INSERT)
			elog(ERROR, "pgsync: backfilling the clock table failed");
		/* statistics now, not at autovacuum's first visit: pulls plan on them */
		resetStringInfo(&b);
		appendStringInfo(&b, "ANALYZE %s", t->q_clock);
		exec_sql(b.data, SPI_OK_UTILITY);
		pg_as_caller(&us);
	}
	pg_watch_refresh(relid);
	CacheInvalidateRelcacheByRelid(relid);
}

/* pg_table_cleanup: sync_cleanup's body. */
void
pg_table_cleanup(Oid relid)
{
	db_table	  *t = pg_table_get(relid, true);
	StringInfoData b;
	pg_user_save   us;
	Oid			   types[1] = {OIDOID};
	Datum		   v[1];

	if (t == NULL)
	{
		ereport(NOTICE,
				(errmsg("table %s is not synced, nothing to clean up", get_rel_name(relid))));
		return;
	}
	initStringInfo(&b);
	appendStringInfo(&b, "DROP TRIGGER IF EXISTS pgsync_capture ON %s", t->q_base);
	exec_sql(b.data, SPI_OK_UTILITY);
	resetStringInfo(&b);
	appendStringInfo(&b, "DROP TRIGGER IF EXISTS pgsync_truncate ON %s", t->q_base);
	exec_sql(b.data, SPI_OK_UTILITY);
	pg_as_meta(&us);
	resetStringInfo(&b);
	appendStringInfo(&b, "DROP TABLE IF EXISTS %s", t->q_clock);
	exec_sql(b.data, SPI_OK_UTILITY);
	v[0] = ObjectIdGetDatum(relid);
	if (SPI_execute_with_args("DELETE FROM pgsync.tables WHERE tbl = $1::regclass", 1, types, v,
							  NULL, false, 0) != SPI_OK_DELETE)
		elog(ERROR, "pgsync: removing the table failed");
	pg_as_caller(&us);
	t->valid = false;
	CacheInvalidateRelcacheByRelid(relid);
}

/* ---- schema changes of synced tables (docs/MIGRATIONS.md) ---------------- */

static int16 *
int2_array(Datum d, int *n)
{
	ArrayType *a = DatumGetArrayTypeP(d);
	Datum	  *elems;
	bool	  *nulls;
	int16	  *out;

	deconstruct_array(a, INT2OID, 2, true, TYPALIGN_SHORT, &elems, &nulls, n);
	out = palloc(sizeof(int16) * (*n + 1));
	for (int i = 0; i < *n; i++)
		out[i] = DatumGetInt16(elems[i]);
	return out;
}

static Oid *
oid_array(Datum d, int *n)
{
	ArrayType *a = DatumGetArrayTypeP(d);
	Datum	  *elems;
	bool	  *nulls;
	Oid		  *out;

	deconstruct_array(a, OIDOID, sizeof(Oid), true, TYPALIGN_INT, &elems, &nulls, n);
	out = palloc(sizeof(Oid) * (*n + 1));
	for (int i = 0; i < *n; i++)
		out[i] = DatumGetObjectId(elems[i]);
	return out;
}

static void
meta_sql(const char *sql, int nargs, Oid *types, Datum *vals, int expect)
{
	pg_user_save us;
	int			 rc;

	pg_as_meta(&us);
	rc = SPI_execute_with_args(sql, nargs, types, vals, NULL, false, 0);
	pg_as_caller(&us);
	if (rc != expect)
		elog(ERROR, "pgsync: \"%s\" failed: %s", sql, SPI_result_code_string(rc));
}

/* kind_of: how values of a type travel, or -1 for a type that is gone */
static int
kind_of(Oid typid)
{
	if (!OidIsValid(typid) || !SearchSysCacheExists1(TYPEOID, ObjectIdGetDatum(typid)))
		return -1;
	return (int) pg_type_kind(getBaseType(typid));
}

/*
 * pg_table_reconcile: the DDL event trigger's check of an ALTER TABLE of a
 * synced table, in the same transaction. Supported: RENAME COLUMN (the
 * column travels under its new name, its former name is kept in
 * pgsync.column_history so that older replicas still match it), DROP COLUMN
 * (its stamp leaves every clock blob; payloads that still carry it are
 * ignored), a type change that keeps how values travel (varchar(10) to
 * text, integer to bigint), RENAME TO and SET SCHEMA (the name in payloads
 * stays). Refused with the supported way: a change of the primary key, a
 * rename of a key column, a type change that changes how values travel.
 */
void
pg_table_reconcile(Oid relid)
{
	Oid			   at[1] = {OIDOID};
	Datum		   av[1] = {ObjectIdGetDatum(relid)};
	pg_user_save   us;
	HeapTuple	   tup;
	TupleDesc	   std, td;
	bool		   isnull;
	char		  *name, *q_clock;
	int			   npk, ncols, n, natts;
	int16		  *pkatt, *colatt;
	Oid			  *coltyp;
	char		 **pknames, **colnames;
	Relation	   rel;
	Oid			   pkidx;
	bool		   changed = false;
	StringInfoData b;

	pg_as_meta(&us);
	if (SPI_execute_with_args("SELECT name, pk_cols, pk_attnums, cols, col_attnums, col_types, "
							  "clock::pg_catalog.text FROM pgsync.tables WHERE tbl = $1",
							  1, at, av, NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "pgsync: reading pgsync.tables failed");
	pg_as_caller(&us);
	if (SPI_processed == 0)
		return;
	tup = SPI_tuptable->vals[0];
	std = SPI_tuptable->tupdesc;
	name = SPI_getvalue(tup, std, 1);
	q_clock = SPI_getvalue(tup, std, 7);
	(void) SPI_getbinval(tup, std, 3, &isnull);
	if (isnull)
		return; /* recorded by a build that did not keep attnums */
	text_array_elem(SPI_getbinval(tup, std, 2, &isnull), -1, &npk);
	pknames = palloc(sizeof(char *) * (npk + 1));
	for (int i = 0; i < npk; i++)
		pknames[i] = text_array_elem(SPI_getbinval(tup, std, 2, &isnull), i, &n);
	pkatt = int2_array(SPI_getbinval(tup, std, 3, &isnull), &n);
	text_array_elem(SPI_getbinval(tup, std, 4, &isnull), -1, &ncols);
	colnames = palloc(sizeof(char *) * (ncols + 1));
	for (int i = 0; i < ncols; i++)
		colnames[i] = text_array_elem(SPI_getbinval(tup, std, 4, &isnull), i, &n);
	colatt = int2_array(SPI_getbinval(tup, std, 5, &isnull), &n);
	coltyp = oid_array(SPI_getbinval(tup, std, 6, &isnull), &n);

	rel = table_open(relid, AccessShareLock);
	td = RelationGetDescr(rel);
	natts = td->natts;

	/* the key: same columns, same names */
	pkidx = RelationGetPrimaryKeyIndex(rel, false);
	{
		bool same = OidIsValid(pkidx);

		if (same)
		{
			Relation idx = index_open(pkidx, AccessShareLock);

			same = idx->rd_index->indnkeyatts == npk;
			for (int i = 0; same && i < npk; i++)
				same = idx->rd_index->indkey.values[i] == pkatt[i];
			index_close(idx, AccessShareLock);
		}
		if (!same)
			ereport(ERROR,
					(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
					 errmsg("the primary key of synced table %s cannot change", name),
					 errdetail("Every replica identifies the table's rows by that key."),
					 errhint("Create a new table with the new key, sync_init it, copy the rows and "
							 "drop the old table (docs/MIGRATIONS.md).")));
		for (int i = 0; i < npk; i++)
			if (strcmp(NameStr(TupleDescAttr(td, pkatt[i] - 1)->attname), pknames[i]) != 0)
				ereport(ERROR,
						(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
						 errmsg("key column \"%s\" of synced table %s cannot be renamed",
								pknames[i], name),
						 errdetail("Payloads name key columns; every replica must use one name."),
						 errhint("Keep the key column's name (docs/MIGRATIONS.md).")));
	}

	/* the columns, last first: a drop moves the later ones down */
	initStringInfo(&b);
	for (int i = ncols - 1; i >= 0; i--)
	{
		Form_pg_attribute a = colatt[i] >= 1 && colatt[i] <= natts
								  ? TupleDescAttr(td, colatt[i] - 1)
								  : NULL;
		Oid				  ht[3] = {OIDOID, TEXTOID, TEXTOID};
		Datum			  hv[3];

		hv[0] = ObjectIdGetDatum(relid);
		hv[1] = CStringGetTextDatum(colnames[i]);
		if (!a || a->attisdropped)
		{
			Oid	  dt[2] = {INT4OID, INT4OID};
			Datum dv[2] = {Int32GetDatum(ncols), Int32GetDatum(i)};

			resetStringInfo(&b);
			appendStringInfo(&b,
							 "UPDATE %s SET clk = pgsync.rowclock_drop(clk, $1, $2)", q_clock);
			meta_sql(b.data, 2, dt, dv, SPI_OK_UPDATE);
			meta_sql("INSERT INTO pgsync.column_history (tbl, name, now) VALUES ($1, $2, NULL) "
					 "ON CONFLICT (tbl, name) DO UPDATE SET now = NULL, at = now()",
					 2, ht, hv, SPI_OK_INSERT);
			meta_sql("UPDATE pgsync.column_history SET now = NULL WHERE tbl = $1 AND now = $2", 2,
					 ht, hv, SPI_OK_UPDATE);
			memmove(colnames + i, colnames + i + 1, sizeof(char *) * (ncols - i - 1));
			memmove(colatt + i, colatt + i + 1, sizeof(int16) * (ncols - i - 1));
			memmove(coltyp + i, coltyp + i + 1, sizeof(Oid) * (ncols - i - 1));
			ncols--;
			changed = true;
			continue;
		}
		if (strcmp(NameStr(a->attname), colnames[i]) != 0)
		{
			hv[2] = CStringGetTextDatum(NameStr(a->attname));
			meta_sql("UPDATE pgsync.column_history SET now = $3 WHERE tbl = $1 AND now = $2", 3,
					 ht, hv, SPI_OK_UPDATE);
			meta_sql("INSERT INTO pgsync.column_history (tbl, name, now) VALUES ($1, $2, $3) "
					 "ON CONFLICT (tbl, name) DO UPDATE SET now = $3, at = now()",
					 3, ht, hv, SPI_OK_INSERT);
			/* renamed back to a former name: it is its name again */
			meta_sql("DELETE FROM pgsync.column_history WHERE tbl = $1 AND name = $3", 3, ht, hv,
					 SPI_OK_DELETE);
			colnames[i] = pstrdup(NameStr(a->attname));
			changed = true;
		}
		if (a->atttypid != coltyp[i])
		{
			int was = kind_of(coltyp[i]), is = kind_of(a->atttypid);

			if (was >= 0 && was != is)
				ereport(ERROR,
						(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
						 errmsg("the type of synced column \"%s\" of table %s cannot change to %s",
								NameStr(a->attname), name, format_type_be(a->atttypid)),
						 errdetail("Its values would travel in another form (docs/TYPES.md): "
								   "older replicas would receive values they cannot read."),
						 errhint("Add a new column of the new type, copy the values, and drop the "
								 "old column (docs/MIGRATIONS.md).")));
			coltyp[i] = a->atttypid;
			changed = true;
		}
	}
	table_close(rel, AccessShareLock);
	if (!changed)
		return;
	{
		StringInfoData cn, ca, ct;
		Oid			   ut[4] = {OIDOID, TEXTOID, TEXTOID, TEXTOID};
		Datum		   uv[4];

		initStringInfo(&cn);
		initStringInfo(&ca);
		initStringInfo(&ct);
		appendStringInfoChar(&cn, '{');
		appendStringInfoChar(&ca, '{');
		appendStringInfoChar(&ct, '{');
		for (int i = 0; i < ncols; i++)
		{
			if (i)
			{
				appendStringInfoChar(&cn, ',');
				appendStringInfoChar(&ca, ',');
				appendStringInfoChar(&ct, ',');
			}
			array_elem(&cn, colnames[i]);
			appendStringInfo(&ca, "%d", (int) colatt[i]);
			appendStringInfo(&ct, "%u", coltyp[i]);
		}
		appendStringInfoChar(&cn, '}');
		appendStringInfoChar(&ca, '}');
		appendStringInfoChar(&ct, '}');
		uv[0] = ObjectIdGetDatum(relid);
		uv[1] = CStringGetTextDatum(cn.data);
		uv[2] = CStringGetTextDatum(ca.data);
		uv[3] = CStringGetTextDatum(ct.data);
		meta_sql("UPDATE pgsync.tables SET cols = $2::text[], col_attnums = $3::int2[], "
				 "col_types = $4::oid[] WHERE tbl = $1::regclass",
				 4, ut, uv, SPI_OK_UPDATE);
	}
	CacheInvalidateRelcacheByRelid(relid);
	CommandCounterIncrement();
	/* later writes of this transaction capture the new column list */
	pg_table_reload(relid);
}
