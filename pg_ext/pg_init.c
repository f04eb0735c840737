/*
 * pg_init.c — sync_init, sync_cleanup and the schema changes of synced
 * tables (docs/MIGRATIONS.md): recording a table in pgsync.tables, creating
 * its clock table and capture triggers, adding columns, and the DDL event
 * trigger that reconciles renames and drops (pgsync_table_reconcile). The
 * per-backend cache and the plans are pg_table.c's, below this file.
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
 * pgsync_table_init: sync_init's body. Creates the clock table and the
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
		seq =
			DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull)) &&
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
	Relation		 rel = table_open(t->relid, AccessShareLock);
	TupleDesc		 td = RelationGetDescr(rel);
	StringInfoData	 names, atts, types;
	int				 added = 0;
	pgsync_user_save us;

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

		pgsync_as_meta(&us);
		if (SPI_execute_with_args("UPDATE pgsync.tables SET cols = cols || $2::text[], "
								  "col_attnums = col_attnums || $3::int2[], "
								  "col_types = col_types || $4::oid[] WHERE tbl = $1::regclass",
								  4, at, v, NULL, false, 0) != SPI_OK_UPDATE ||
			SPI_execute_with_args("DELETE FROM pgsync.column_history WHERE tbl = $1::regclass "
								  "AND name = ANY ($2::text[])",
								  2, at, v, NULL, false, 0) != SPI_OK_DELETE)
			elog(ERROR, "pgsync: recording the new columns failed");
		pgsync_as_caller(&us);
	}
	CacheInvalidateRelcacheByRelid(t->relid);
	CommandCounterIncrement();
	pgsync_table_reload(t->relid);
}

bool
pgsync_table_init(Oid relid, db_algo algo, Oid func_nsp, const char *want_name, bool allow_seq_keys)
{
	Relation		 rel;
	Oid				 pkidx;
	Relation		 idx;
	TupleDesc		 td;
	char			*nsp, *relname, *name, *clockname;
	StringInfoData	 b, pkarr, colarr, pkdef, pkatts, colatts, coltypes;
	int				 npk, i, j, ncols = 0;
	AttrNumber		*pkatt;
	pgsync_user_save us;
	db_table		*t;

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
						errdetail("Replicas name a row by its primary key, and the same key must "
								  "mean the same row on every device."),
						errhint("Add a primary key that is unique across devices, e.g. id uuid "
								"PRIMARY KEY DEFAULT sync_uuid() (ALTER TABLE ... ADD PRIMARY "
								"KEY).")));
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

		if (!pgsync_kind_pk_ok(pgsync_type_kind(getBaseType(a->atttypid))))
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
	t = pgsync_table_get(relid, true);
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
		return false; /* idempotent */
	}
	{
		Oid	  types[1] = {TEXTOID};
		Datum v[1] = {CStringGetTextDatum(name)};

		pgsync_as_meta(&us);
		if (SPI_execute_with_args("SELECT tbl::pg_catalog.text FROM pgsync.tables WHERE name = $1",
								  1, types, v, NULL, true, 1) != SPI_OK_SELECT)
			elog(ERROR, "pgsync: reading pgsync.tables failed");
		pgsync_as_caller(&us);
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
	pgsync_as_meta(&us);
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
		Oid	  types[9] = {TEXTOID, OIDOID,	TEXTOID, TEXTOID, TEXTOID,
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
	pgsync_as_caller(&us);

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

	return true; /* new: its rows need clocks (pgsync_capture_backfill) */
}

/* pgsync_table_cleanup: sync_cleanup's body. */
void
pgsync_table_cleanup(Oid relid)
{
	db_table		*t = pgsync_table_get(relid, true);
	StringInfoData	 b;
	pgsync_user_save us;
	Oid				 types[1] = {OIDOID};
	Datum			 v[1];

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
	pgsync_as_meta(&us);
	resetStringInfo(&b);
	appendStringInfo(&b, "DROP TABLE IF EXISTS %s", t->q_clock);
	exec_sql(b.data, SPI_OK_UTILITY);
	v[0] = ObjectIdGetDatum(relid);
	if (SPI_execute_with_args("DELETE FROM pgsync.tables WHERE tbl = $1::regclass", 1, types, v,
							  NULL, false, 0) != SPI_OK_DELETE)
		elog(ERROR, "pgsync: removing the table failed");
	pgsync_as_caller(&us);
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
	pgsync_user_save us;
	int				 rc;

	pgsync_as_meta(&us);
	rc = SPI_execute_with_args(sql, nargs, types, vals, NULL, false, 0);
	pgsync_as_caller(&us);
	if (rc != expect)
		elog(ERROR, "pgsync: \"%s\" failed: %s", sql, SPI_result_code_string(rc));
}

/* kind_of: how values of a type travel, or -1 for a type that is gone.
 * smallint, integer and bigint all travel as INTEGER (docs/TYPES.md): one
 * form, so a change among them keeps every replica's values readable (a
 * value out of the narrower range is that row's own fate, 22003). */
static int
kind_of(Oid typid)
{
	pgsync_kind k;

	if (!OidIsValid(typid) || !SearchSysCacheExists1(TYPEOID, ObjectIdGetDatum(typid)))
		return -1;
	k = pgsync_type_kind(getBaseType(typid));
	return (int) (k == PGK_INT2 || k == PGK_INT4 ? PGK_INT8 : k);
}

/*
 * pgsync_table_reconcile: the DDL event trigger's check of an ALTER TABLE of a
 * synced table, in the same transaction. Supported: RENAME COLUMN (the
 * column travels under its new name, its former name is kept in
 * pgsync.column_history so that older replicas still match it), DROP COLUMN
 * (its stamp leaves every clock blob; payloads that still carry it are
 * ignored), a type change that keeps how values travel (varchar(10) to
 * text; smallint, integer and bigint among each other), RENAME TO and SET SCHEMA (the name in
 * payloads stays). Refused with the supported way: a change of the primary key, a rename of a key
 * column, a type change that changes how values travel.
 */
void
pgsync_table_reconcile(Oid relid)
{
	Oid				 at[1] = {OIDOID};
	Datum			 av[1] = {ObjectIdGetDatum(relid)};
	pgsync_user_save us;
	HeapTuple		 tup;
	TupleDesc		 std, td;
	bool			 isnull;
	char			*name, *q_clock;
	int				 npk, ncols, n, natts;
	int16			*pkatt, *colatt;
	Oid				*coltyp;
	char		   **pknames, **colnames;
	Relation		 rel;
	Oid				 pkidx;
	bool			 changed = false;
	StringInfoData	 b;

	pgsync_as_meta(&us);
	if (SPI_execute_with_args("SELECT name, pk_cols, pk_attnums, cols, col_attnums, col_types, "
							  "clock::pg_catalog.text FROM pgsync.tables WHERE tbl = $1",
							  1, at, av, NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "pgsync: reading pgsync.tables failed");
	pgsync_as_caller(&us);
	if (SPI_processed == 0)
		return;
	tup = SPI_tuptable->vals[0];
	std = SPI_tuptable->tupdesc;
	name = SPI_getvalue(tup, std, 1);
	q_clock = SPI_getvalue(tup, std, 7);
	(void) SPI_getbinval(tup, std, 3, &isnull);
	if (isnull)
		return; /* recorded by a build that did not keep attnums */
	pgsync_text_array_elem(SPI_getbinval(tup, std, 2, &isnull), -1, &npk);
	pknames = palloc(sizeof(char *) * (npk + 1));
	for (int i = 0; i < npk; i++)
		pknames[i] = pgsync_text_array_elem(SPI_getbinval(tup, std, 2, &isnull), i, &n);
	pkatt = int2_array(SPI_getbinval(tup, std, 3, &isnull), &n);
	pgsync_text_array_elem(SPI_getbinval(tup, std, 4, &isnull), -1, &ncols);
	colnames = palloc(sizeof(char *) * (ncols + 1));
	for (int i = 0; i < ncols; i++)
		colnames[i] = pgsync_text_array_elem(SPI_getbinval(tup, std, 4, &isnull), i, &n);
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
		Form_pg_attribute a =
			colatt[i] >= 1 && colatt[i] <= natts ? TupleDescAttr(td, colatt[i] - 1) : NULL;
		Oid	  ht[3] = {OIDOID, TEXTOID, TEXTOID};
		Datum hv[3];

		hv[0] = ObjectIdGetDatum(relid);
		hv[1] = CStringGetTextDatum(colnames[i]);
		if (!a || a->attisdropped)
		{
			Oid	  dt[2] = {INT4OID, INT4OID};
			Datum dv[2] = {Int32GetDatum(ncols), Int32GetDatum(i)};

			resetStringInfo(&b);
			appendStringInfo(&b, "UPDATE %s SET clk = pgsync.rowclock_drop(clk, $1, $2)", q_clock);
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
			meta_sql("UPDATE pgsync.column_history SET now = $3 WHERE tbl = $1 AND now = $2", 3, ht,
					 hv, SPI_OK_UPDATE);
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
	pgsync_table_reload(relid);
}
