/*
 * pg_view.c — a device's exact view (docs/DESIGN.md, "Visibility"):
 * device identity, what decides a view beyond the rows (fingerprints, the
 * visibility log, watched tables), sealed chunk cursors, and sync_pull.
 *
 *   sync_device(device, principal)   the server says which device and
 *                                    principal the transaction acts for; the
 *                                    first principal to present a site id
 *                                    owns it (pgsync.devices)
 *   sync_pull(since, max_rows, cursor) that device's view, in one snapshot
 *   sync_watch / sync_visibility_changed, sync_vis_trigger, sync_on_ddl_end:
 *                                    keep pgsync.vis_log, which makes pulls
 *                                    send snapshots of tables whose
 *                                    visibility may have changed while their
 *                                    rows did not
 *
 * The device and principal live in backend memory for one transaction only
 * (pgsync_xact_cb clears them), set by a function only the server's login
 * role may execute: a role acting through SET ROLE cannot claim another
 * device. Every metadata read or write here runs as the metadata owner.
 */
#include "pg_internal.h"

#include "access/xact.h"
#include "catalog/pg_namespace.h"
#include "catalog/pg_type.h"
#include "commands/event_trigger.h"
#include "commands/trigger.h"
#include "common/hmac.h"
#include "common/sha2.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rls.h"
#include "utils/uuid.h"

#include <cjson/cJSON.h>
#define XXH_STATIC_LINKING_ONLY /* XXH3_state_t on the stack */
#include <xxhash.h>

bool	pgsync_have_device = false;
uint8_t pgsync_cur_device[PGS_SITE_LEN];
char	pgsync_cur_principal[256];

PG_FUNCTION_INFO_V1(sync_device);
PG_FUNCTION_INFO_V1(sync_pull);
PG_FUNCTION_INFO_V1(sync_pull_total);
PG_FUNCTION_INFO_V1(sync_pull_group);
PG_FUNCTION_INFO_V1(sync_watch);
PG_FUNCTION_INFO_V1(sync_visibility_changed);
PG_FUNCTION_INFO_V1(sync_vis_trigger);
PG_FUNCTION_INFO_V1(sync_on_ddl_end);

/* ---- small SPI helpers (SPI connected, as the metadata owner) ----------- */

static int
meta_exec(const char *sql, int nargs, Oid *types, Datum *vals, bool read_only, long limit)
{
	pgsync_user_save us;
	int				 rc;

	pgsync_as_meta(&us);
	rc = SPI_execute_with_args(sql, nargs, types, vals, NULL, read_only, limit);
	pgsync_as_caller(&us);
	if (rc < 0)
		elog(ERROR, "pgsync: \"%s\" failed: %s", sql, SPI_result_code_string(rc));
	return rc;
}

static Datum
uuid_datum(const uint8_t *site)
{
	pg_uuid_t *u = palloc(sizeof(pg_uuid_t));

	memcpy(u->data, site, PGS_SITE_LEN);
	return UUIDPGetDatum(u);
}

static int64
current_xid8(void)
{
	return (int64) U64FromFullTransactionId(GetTopFullTransactionId());
}

/* ---- the visibility log ------------------------------------------------- */

/* pgsync_vis_bump: something that may change who sees relid commits with this
 * transaction (once per transaction and table). */
void
pgsync_vis_bump(Oid relid)
{
	static FullTransactionId last_xid = {0};
	static Oid				 last_rel = InvalidOid;
	FullTransactionId		 x = GetTopFullTransactionId();
	Oid						 types[2] = {OIDOID, INT8OID};
	Datum					 vals[2];

	if (FullTransactionIdEquals(x, last_xid) && last_rel == relid)
		return;
	vals[0] = ObjectIdGetDatum(relid);
	vals[1] = Int64GetDatum(current_xid8());
	meta_exec("INSERT INTO pgsync.vis_log (tbl, ver) SELECT $1, $2 WHERE NOT EXISTS "
			  "(SELECT 1 FROM pgsync.vis_log WHERE tbl = $1 AND ver = $2)",
			  2, types, vals, false, 0);
	last_xid = x;
	last_rel = relid;
}

/* pgsync_vis_changed_in: does relid have a log row with since < ver <= until? */
bool
pgsync_vis_changed_in(Oid relid, int64 since, int64 until)
{
	static SPIPlanPtr plan = NULL;
	Oid				  types[3] = {OIDOID, INT8OID, INT8OID};
	Datum			  vals[3];
	pgsync_user_save  us;
	bool			  yes;

	if (until <= since)
		return false;
	vals[0] = ObjectIdGetDatum(relid);
	vals[1] = Int64GetDatum(since);
	vals[2] = Int64GetDatum(until);
	pgsync_as_meta(&us); /* also for the prepare: names resolve as the owner */
	if (plan == NULL)
		plan = pgsync_plan_keep(
			"SELECT 1 FROM pgsync.vis_log WHERE tbl = $1 AND ver > $2 AND ver <= $3 "
			"LIMIT 1",
			3, types);
	if (SPI_execute_plan(plan, vals, NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "pgsync: reading pgsync.vis_log failed");
	pgsync_as_caller(&us);
	yes = SPI_processed > 0;
	SPI_freetuptable(SPI_tuptable);
	return yes;
}

/*
 * pgsync_watch_refresh: what the policies of synced table relid read (pg_depend
 * of its policies: other relations, or itself as a range table entry of a
 * subquery), recorded as automatic watches, each with its statement trigger.
 * Declared watches (sync_watch) stay. Triggers of tables no longer watched
 * are dropped.
 */
void
pgsync_watch_refresh(Oid relid)
{
	/* every read here sees the command's own writes (read_only = false: a new
	 * command id), the policy just created and the watches just written */
	Oid	  types[1] = {OIDOID};
	Datum vals[1] = {ObjectIdGetDatum(relid)};

	meta_exec("DELETE FROM pgsync.watches WHERE tbl = $1::pg_catalog.regclass AND auto", 1, types,
			  vals, false, 0);
	meta_exec("INSERT INTO pgsync.watches (tbl, depends_on, auto) "
			  "SELECT DISTINCT $1::pg_catalog.regclass, d.refobjid::pg_catalog.regclass, true "
			  "FROM pg_catalog.pg_policy p JOIN pg_catalog.pg_depend d "
			  "  ON d.classid = 'pg_catalog.pg_policy'::pg_catalog.regclass AND d.objid = p.oid "
			  " AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.deptype = 'n' "
			  "JOIN pg_catalog.pg_class c ON c.oid = d.refobjid AND c.relkind IN ('r', 'p') "
			  "WHERE p.polrelid = $1 AND (d.refobjid <> $1 OR d.refobjsubid = 0) "
			  "ON CONFLICT DO NOTHING",
			  1, types, vals, false, 0);
	/* a statement trigger on every watched table, none on the others */
	meta_exec(
		"SELECT pg_catalog.format('CREATE TRIGGER pgsync_vis AFTER INSERT OR UPDATE OR DELETE "
		"OR TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION %I.sync_vis_trigger()', "
		"w.depends_on, (SELECT n.nspname FROM pg_catalog.pg_proc f JOIN "
		"pg_catalog.pg_namespace n ON n.oid = f.pronamespace WHERE f.proname = "
		"'sync_vis_trigger' LIMIT 1)) "
		"FROM (SELECT DISTINCT depends_on FROM pgsync.watches) w WHERE NOT EXISTS "
		"(SELECT 1 FROM pg_catalog.pg_trigger t WHERE t.tgrelid = w.depends_on AND t.tgname = "
		"'pgsync_vis')",
		0, NULL, NULL, false, 0);
	{
		uint64 n = SPI_processed;
		char **ddl = palloc(sizeof(char *) * (n + 1));

		for (uint64 i = 0; i < n; i++)
			ddl[i] = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1);
		for (uint64 i = 0; i < n; i++)
			meta_exec(ddl[i], 0, NULL, NULL, false, 0);
	}
	meta_exec("SELECT pg_catalog.format('DROP TRIGGER pgsync_vis ON %s', t.tgrelid::pg_catalog."
			  "regclass) FROM pg_catalog.pg_trigger t WHERE t.tgname = 'pgsync_vis' AND NOT EXISTS "
			  "(SELECT 1 FROM pgsync.watches w WHERE w.depends_on = t.tgrelid)",
			  0, NULL, NULL, false, 0);
	{
		uint64 n = SPI_processed;
		char **ddl = palloc(sizeof(char *) * (n + 1));

		for (uint64 i = 0; i < n; i++)
			ddl[i] = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1);
		for (uint64 i = 0; i < n; i++)
			meta_exec(ddl[i], 0, NULL, NULL, false, 0);
	}
}

/* sync_vis_trigger: statement trigger of a watched table. */
Datum
sync_vis_trigger(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	Oid			 types[1] = {OIDOID};
	Datum		 vals[1];
	Oid			*tbls;
	uint64		 n;

	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR, (errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
						errmsg("sync_vis_trigger must be called as a trigger")));
	SPI_connect();
	vals[0] = ObjectIdGetDatum(RelationGetRelid(td->tg_relation));
	meta_exec("SELECT tbl::pg_catalog.oid FROM pgsync.watches WHERE depends_on = $1", 1, types,
			  vals, true, 0);
	n = SPI_processed;
	tbls = palloc(sizeof(Oid) * (n + 1));
	for (uint64 i = 0; i < n; i++)
	{
		bool isnull;

		tbls[i] = DatumGetObjectId(
			SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1, &isnull));
	}
	for (uint64 i = 0; i < n; i++)
		pgsync_vis_bump(tbls[i]);
	SPI_finish();
	return PointerGetDatum(NULL);
}

/* sync_watch(tbl, depends_on): a dependency pgsync cannot see. */
Datum
sync_watch(PG_FUNCTION_ARGS)
{
	Oid	  tbl = PG_GETARG_OID(0), dep = PG_GETARG_OID(1);
	Oid	  types[2] = {OIDOID, OIDOID};
	Datum vals[2] = {ObjectIdGetDatum(tbl), ObjectIdGetDatum(dep)};

	if (!object_ownercheck(RelationRelationId, tbl, GetUserId()))
		ereport(ERROR, (errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
						errmsg("must be owner of table %s", get_rel_name(tbl))));
	SPI_connect();
	if (pgsync_table_get(tbl, true) == NULL)
		ereport(ERROR, (errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
						errmsg("table %s is not synced", get_rel_name(tbl)),
						errhint("Call sync_init first.")));
	meta_exec("INSERT INTO pgsync.watches (tbl, depends_on, auto) VALUES ($1, $2, false) "
			  "ON CONFLICT (tbl, depends_on) DO UPDATE SET auto = false",
			  2, types, vals, false, 0);
	pgsync_watch_refresh(tbl);
	pgsync_vis_bump(tbl);
	SPI_finish();
	PG_RETURN_VOID();
}

/* sync_visibility_changed(tbl): bump by hand. */
Datum
sync_visibility_changed(PG_FUNCTION_ARGS)
{
	Oid tbl = PG_GETARG_OID(0);

	if (!object_ownercheck(RelationRelationId, tbl, GetUserId()))
		ereport(ERROR, (errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
						errmsg("must be owner of table %s", get_rel_name(tbl))));
	SPI_connect();
	pgsync_vis_bump(tbl);
	SPI_finish();
	PG_RETURN_VOID();
}

/* result_oids: the first column of the last SPI result, as oids (palloc'd). */
static Oid *
result_oids(uint64 *n)
{
	Oid *rels = palloc(sizeof(Oid) * (SPI_processed + 1));

	*n = SPI_processed;
	for (uint64 i = 0; i < *n; i++)
	{
		bool isnull;

		rels[i] = DatumGetObjectId(
			SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1, &isnull));
	}
	return rels;
}

/*
 * sync_on_ddl_end: schema, policy, RLS and privilege changes of synced
 * tables. ALTER TABLE: renamed, dropped and retyped columns are recorded or
 * refused (pgsync_table_reconcile), and the table is logged when its row-level
 * security switched (pgsync.tables.rls remembers). Policies: refresh the
 * table's watches and log it.
 * GRANT, REVOKE, DROP POLICY: every synced table (they are rare, and the
 * command does not always say which table).
 */
Datum
sync_on_ddl_end(PG_FUNCTION_ARGS)
{
	EventTriggerData *ev = (EventTriggerData *) fcinfo->context;
	const char		 *tag;
	Oid				 *rels;
	uint64			  n;

	if (!CALLED_AS_EVENT_TRIGGER(fcinfo))
		elog(ERROR, "sync_on_ddl_end must be called as an event trigger");
	tag = GetCommandTagName(ev->tag);
	SPI_connect();
	if (strcmp(tag, "GRANT") == 0 || strcmp(tag, "REVOKE") == 0 || strcmp(tag, "DROP POLICY") == 0)
		meta_exec("SELECT tbl::pg_catalog.oid FROM pgsync.tables", 0, NULL, NULL, false, 0);
	else if (strcmp(tag, "ALTER TABLE") == 0)
	{
		/* renamed, dropped or retyped synced columns first (pg_table.c) */
		meta_exec("SELECT DISTINCT t.tbl::pg_catalog.oid FROM "
				  "pg_catalog.pg_event_trigger_ddl_commands() c "
				  "JOIN pgsync.tables t ON t.tbl::pg_catalog.oid = c.objid",
				  0, NULL, NULL, false, 0);
		rels = result_oids(&n);
		for (uint64 i = 0; i < n; i++)
			pgsync_table_reconcile(rels[i]);
		meta_exec("SELECT t.tbl::pg_catalog.oid FROM pg_catalog.pg_event_trigger_ddl_commands() c "
				  "JOIN pgsync.tables t ON t.tbl::pg_catalog.oid = c.objid "
				  "JOIN pg_catalog.pg_class r ON r.oid = c.objid "
				  "WHERE t.rls IS DISTINCT FROM (CASE WHEN NOT r.relrowsecurity THEN 'off' WHEN "
				  "r.relforcerowsecurity THEN 'forced' ELSE 'on' END)",
				  0, NULL, NULL, false, 0);
	}
	else
		meta_exec("SELECT DISTINCT t.tbl::pg_catalog.oid FROM "
				  "pg_catalog.pg_event_trigger_ddl_commands() c "
				  "JOIN pg_catalog.pg_policy p ON p.oid = c.objid "
				  "JOIN pgsync.tables t ON t.tbl::pg_catalog.oid = p.polrelid",
				  0, NULL, NULL, false, 0);
	rels = result_oids(&n);
	for (uint64 i = 0; i < n; i++)
	{
		Oid	  types[1] = {OIDOID};
		Datum vals[1] = {ObjectIdGetDatum(rels[i])};

		pgsync_watch_refresh(rels[i]);
		pgsync_vis_bump(rels[i]);
		meta_exec("UPDATE pgsync.tables t SET rls = (SELECT CASE WHEN NOT r.relrowsecurity THEN "
				  "'off' WHEN r.relforcerowsecurity THEN 'forced' ELSE 'on' END FROM "
				  "pg_catalog.pg_class r WHERE r.oid = $1) WHERE t.tbl::pg_catalog.oid = $1",
				  1, types, vals, false, 0);
	}
	SPI_finish();
	PG_RETURN_NULL();
}

/* ---- access of the caller to a table ------------------------------------ */

/*
 * pgsync_table_access: FULL when the caller may SELECT every synced column and
 * RLS does not apply to it, RLS when it may and RLS applies, NONE otherwise.
 */
db_access
pgsync_table_access(db_table *t)
{
	Oid user = GetUserId();
	Oid nsp = get_rel_namespace(t->relid);

	if (object_aclcheck(NamespaceRelationId, nsp, user, ACL_USAGE) != ACLCHECK_OK &&
		pg_class_aclcheck(t->relid, user, ACL_SELECT) == ACLCHECK_OK)
	{
		const char *role = GetUserNameFromId(user, false), *schema = get_namespace_name(nsp);

		ereport(ERROR, (errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
						errmsg("role %s may read synced table %s but not use its schema %s", role,
							   t->name, schema),
						errhint("GRANT USAGE ON SCHEMA %s TO %s;", quote_identifier(schema),
								quote_identifier(role))));
	}

	if (pg_class_aclcheck(t->relid, user, ACL_SELECT) != ACLCHECK_OK)
	{
		for (int i = 0; i < t->npk; i++)
			if (pg_attribute_aclcheck(t->relid, t->pk[i].attnum, user, ACL_SELECT) != ACLCHECK_OK)
				return DB_ACCESS_NONE;
		for (int i = 0; i < t->ncols; i++)
			if (pg_attribute_aclcheck(t->relid, t->cols[i].attnum, user, ACL_SELECT) != ACLCHECK_OK)
				return DB_ACCESS_NONE;
	}
	return check_enable_rls(t->relid, InvalidOid, true) == RLS_ENABLED ? DB_ACCESS_RLS
																	   : DB_ACCESS_FULL;
}

pgs_rc
db_table_view(db_conn *db, db_table *t, bool view, int64_t since, int64_t until, db_access *access,
			  bool *snapshot, pgs_err *err)
{
	*access = pgsync_table_access(t);
	*snapshot = view && pgsync_vis_changed_in(t->relid, since, until);
	return PGS_OK;
}

/* ---- devices ------------------------------------------------------------ */

/*
 * device_owner: the principal a device (site id) is bound to, palloc'd, or
 * NULL when it is not bound yet. SPI connected. Prepared once: a push asks
 * it at least once, and parsing and planning it cost more than reading it.
 */
static char *
device_owner(const uint8_t *site)
{
	static SPIPlanPtr plan = NULL;
	Oid				  types[1] = {UUIDOID};
	Datum			  vals[1];
	pgsync_user_save  us;
	char			 *owner = NULL;

	vals[0] = uuid_datum(site);
	pgsync_as_meta(&us); /* also for the prepare: names resolve as the owner */
	if (plan == NULL)
		plan = pgsync_plan_keep("SELECT principal FROM pgsync.devices WHERE site = $1", 1, types);
	if (SPI_execute_plan(plan, vals, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "pgsync: reading pgsync.devices failed");
	pgsync_as_caller(&us);
	if (SPI_processed == 1)
		owner = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	SPI_freetuptable(SPI_tuptable);
	return owner;
}

/*
 * sync_device(device, principal): bind on first use, refuse another
 * principal's device, and remember both for this transaction.
 */
Datum
sync_device(PG_FUNCTION_ARGS)
{
	pg_uuid_t *dev = PG_GETARG_UUID_P(0);
	char	  *principal = text_to_cstring(PG_GETARG_TEXT_PP(1));
	Oid		   types[2] = {UUIDOID, TEXTOID};
	Datum	   vals[2];
	db_conn	   db;
	char	   u[37];
	char	  *owner;

	if (strlen(principal) == 0 || strlen(principal) >= sizeof pgsync_cur_principal)
		ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						errmsg("principal must be 1 to %d bytes long",
							   (int) sizeof pgsync_cur_principal - 1)));
	pgs_uuid_format(dev->data, u);
	SPI_connect();
	pgsync_conn_init(&db, CurrentMemoryContext);
	if (memcmp(db.site, dev->data, PGS_SITE_LEN) == 0)
		ereport(ERROR, (errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
						errmsg("site id %s is this database's own", u),
						errhint("A device needs a site id of its own; sqlitesync makes one.")));
	if (memcmp(PGS_SITE_CANON, dev->data, PGS_SITE_LEN) == 0)
		ereport(ERROR, (errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
						errmsg("site id %s stamps canonical forms, not a device's changes", u),
						errhint("A device needs a site id of its own; sqlitesync makes one.")));
	vals[0] = UUIDPGetDatum(dev);
	vals[1] = CStringGetTextDatum(principal);
	if (!(owner = device_owner(dev->data)))
	{
		meta_exec("INSERT INTO pgsync.devices (site, principal) VALUES ($1, $2) "
				  "ON CONFLICT (site) DO NOTHING",
				  2, types, vals, false, 0);
		owner = device_owner(dev->data);
	}
	if (!owner)
		elog(ERROR, "pgsync: could not record device %s", u);
	if (strcmp(owner, principal) != 0)
		ereport(ERROR, (errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
						errmsg("device %s belongs to another principal", u),
						errdetail("A site id belongs to the principal that first synced with it."),
						errhint("Each device keeps its own site id (sync_site_id()); a copied "
								"database must get a new one.")));
	SPI_finish();
	memcpy(pgsync_cur_device, dev->data, PGS_SITE_LEN);
	strlcpy(pgsync_cur_principal, principal, sizeof pgsync_cur_principal);
	pgsync_have_device = true;
	PG_RETURN_VOID();
}

/* pgsync_device_reset: the transaction ended. */
void
pgsync_device_reset(void)
{
	pgsync_have_device = false;
	pgsync_cur_principal[0] = '\0';
}

pgs_rc
db_site_check(db_conn *db, uint32_t idx, pgs_err *err)
{
	const uint8_t *site;
	const char	  *owner;
	pgs_rc		   rc;
	bool		   refuse = false;

	if (!pgsync_have_device)
		return PGS_OK; /* not acting for a device: direct SQL, as before */
	if (idx == 0)
		refuse = true; /* a device cannot write in this database's name */
	else
	{
		if ((rc = db_site_lookup(db, idx, &site, err)) != PGS_OK)
			return rc;
		if (memcmp(site, pgsync_cur_device, PGS_SITE_LEN) == 0)
			return PGS_OK;
		owner = device_owner(site);
		refuse = owner && strcmp(owner, pgsync_cur_principal) != 0;
	}
	if (!refuse)
		return PGS_OK;
	pgs_fail(err, PGS_ERR_PERMISSION, "change attributed to another principal's device",
			 "A device may only write changes stamped with its own site id or one of its "
			 "principal's devices.",
			 NULL);
	pgs_err_code(err, PGS_CODE_FOREIGN_SITE);
	return PGS_ERR_PERMISSION;
}

/* ---- fingerprints -------------------------------------------------------- */

static int
cmp_str(const void *a, const void *b)
{
	return strcmp(*(char *const *) a, *(char *const *) b);
}

/*
 * claims_canonical: the claims that may decide a view, in a stable form:
 * every claim but the times and the token id, sorted by name.
 */
static void
claims_canonical(XXH3_state_t *st)
{
	const char *raw = GetConfigOption("request.jwt.claims", true, false);
	cJSON	   *j, *it;
	char	  **names;
	int			n = 0;

	if (!raw || !*raw)
		return;
	j = cJSON_Parse(raw);
	if (!cJSON_IsObject(j))
	{
		XXH3_64bits_update(st, raw, strlen(raw));
		cJSON_Delete(j);
		return;
	}
	names = palloc(sizeof(char *) * (cJSON_GetArraySize(j) + 1));
	cJSON_ArrayForEach(it, j)
	{
		if (strcmp(it->string, "exp") == 0 || strcmp(it->string, "iat") == 0 ||
			strcmp(it->string, "nbf") == 0 || strcmp(it->string, "jti") == 0)
			continue;
		names[n++] = it->string;
	}
	qsort(names, n, sizeof(char *), cmp_str);
	for (int i = 0; i < n; i++)
	{
		char *v = cJSON_PrintUnformatted(cJSON_GetObjectItemCaseSensitive(j, names[i]));

		XXH3_64bits_update(st, names[i], strlen(names[i]) + 1);
		if (v)
			XXH3_64bits_update(st, v, strlen(v) + 1);
		cJSON_free(v);
	}
	cJSON_Delete(j);
}

/*
 * fingerprint: what decides the caller's view besides the rows: its role,
 * the roles it is a member of (role grants are not seen by event triggers),
 * the claims, and its access to every synced table.
 */
static uint64
fingerprint(db_conn *db)
{
	XXH3_state_t st;
	Oid			 user = GetUserId();
	db_table   **tables;
	int			 ntables;
	pgs_err		 err;

	XXH3_64bits_reset(&st);
	XXH3_64bits_update(&st, &user, sizeof user);
	if (SPI_execute("WITH RECURSIVE m(r) AS (SELECT current_user::pg_catalog.regrole::pg_catalog."
					"oid UNION SELECT a.roleid FROM pg_catalog.pg_auth_members a JOIN m ON "
					"a.member = m.r) SELECT pg_catalog.string_agg(r::pg_catalog.text, ',' ORDER BY "
					"r) FROM m",
					true, 1) == SPI_OK_SELECT &&
		SPI_processed == 1)
	{
		char *m = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);

		if (m)
			XXH3_64bits_update(&st, m, strlen(m));
	}
	claims_canonical(&st);
	if (db_tables(db, &tables, &ntables, &err) == PGS_OK)
		for (int i = 0; i < ntables; i++)
		{
			db_access a = pgsync_table_access(tables[i]);

			XXH3_64bits_update(&st, &tables[i]->relid, sizeof(Oid));
			XXH3_64bits_update(&st, &a, sizeof a);
		}
	return XXH3_64bits_digest(&st);
}

/*
 * STALE_SQL(since, interval): the device's record (pgsync.devices v) is due:
 * last_seen older than a minute, or acked behind since and older than
 * pgsync.record_interval (0: whenever acked moved). Records are writes, and a
 * write moves every cursor: written on every pull they would spread the
 * cursors of parked long-polls, and one push would no longer be pulled once
 * for all of them (shared fan-out pulls).
 */
#define STALE_SQL(s, i)                                                                            \
	"(last_seen < now() - interval '1 minute' OR (acked < $" #s                                    \
	" AND last_seen <= now() - make_interval(secs => $" #i ")))"

/*
 * device_view: record this pull for the device (acked = since: what the
 * device holds, for the GC horizon; see STALE_SQL) and say whether every table
 * must be a snapshot: what decides the device's view (its fingerprint)
 * changed now, or changed since the pull whose generation the device last
 * saw (seen_gen, carried in its cursor: a device that did not apply the
 * snapshot comes back with the old generation and gets it again).
 */
static bool
device_view(db_conn *db, int64 since, int32 seen_gen, int32 *gen)
{
	Oid	   types[5] = {UUIDOID, BYTEAOID, INT8OID, INT4OID, INT4OID};
	Datum  vals[5];
	uint64 fp = fingerprint(db);
	bytea *fpb = pgsync_bytea(CurrentMemoryContext, &fp, sizeof fp);
	bool   changed, isnull, stale;
	int32  cur;

	vals[0] = uuid_datum(pgsync_cur_device);
	vals[1] = PointerGetDatum(fpb);
	vals[2] = Int64GetDatum(since);
	vals[3] = Int32GetDatum(0);
	vals[4] = Int32GetDatum(pgsync_record_interval);
	meta_exec("SELECT fingerprint IS DISTINCT FROM $2, fp_gen, " STALE_SQL(
				  3, 5) " FROM pgsync.devices WHERE site = $1",
			  5, types, vals, true, 1);
	if (SPI_processed != 1)
	{
		*gen = 0;
		return true; /* unknown device (sync_device not called?): start over */
	}
	changed = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	cur = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
	stale = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3, &isnull));
	if (changed)
		cur = cur == PG_INT32_MAX ? 1 : cur + 1;
	if (changed || stale)
	{
		/*
		 * last_seen at least once a minute, acked (the GC horizon,
		 * docs/DESIGN.md) once it moved and record_interval passed. Losing
		 * this write in a crash only holds the horizon back: no commit flush.
		 */
		(void) set_config_option("synchronous_commit", "off", PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_LOCAL, true, 0, false);
		vals[3] = Int32GetDatum(cur);
		meta_exec("UPDATE pgsync.devices SET fingerprint = $2, fp_gen = $4, last_seen = now(), "
				  "acked = greatest(acked, $3) WHERE site = $1",
				  4, types, vals, false, 0);
	}
	*gen = cur;
	return changed || seen_gen != cur;
}

/* ---- sealed cursors ------------------------------------------------------ */

/*
 * A chunk cursor handed to a client: 1 | nonce[16] | token XOR keystream |
 * tag[16]. The keystream is HMAC-SHA-256(secret, "k" | nonce | counter); the
 * tag HMAC-SHA-256(secret, "t" | device | nonce | ciphertext), truncated. The
 * client learns nothing of the key it holds (it may be a row it cannot see)
 * and cannot forge, alter or borrow another device's cursor.
 */
#define SEAL_VERSION 1
#define SEAL_NONCE 16
#define SEAL_TAG 16
#define SEAL_OVERHEAD (1 + SEAL_NONCE + SEAL_TAG)

static void
secret_get(uint8_t **key, size_t *len)
{
	static uint8_t cached[64];
	static size_t  cached_len = 0;

	if (!cached_len)
	{
		bytea *b;
		bool   isnull;

		meta_exec("SELECT secret FROM pgsync.secret WHERE id = 1", 0, NULL, NULL, true, 1);
		if (SPI_processed != 1)
			ereport(ERROR, (errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
							errmsg("pgsync cursor secret is missing"),
							errhint("Recreate the extension.")));
		b = DatumGetByteaPP(
			SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
		cached_len = Min(VARSIZE_ANY_EXHDR(b), sizeof cached);
		memcpy(cached, VARDATA_ANY(b), cached_len);
	}
	*key = cached;
	*len = cached_len;
}

static void
hmac(const uint8_t *key, size_t klen, const uint8_t *const *parts, const size_t *lens, int nparts,
	 uint8_t out[PG_SHA256_DIGEST_LENGTH])
{
	pg_hmac_ctx *ctx = pg_hmac_create(PG_SHA256);

	if (!ctx || pg_hmac_init(ctx, key, klen) < 0)
		elog(ERROR, "pgsync: HMAC failed");
	for (int i = 0; i < nparts; i++)
		if (pg_hmac_update(ctx, parts[i], lens[i]) < 0)
			elog(ERROR, "pgsync: HMAC failed");
	if (pg_hmac_final(ctx, out, PG_SHA256_DIGEST_LENGTH) < 0)
		elog(ERROR, "pgsync: HMAC failed");
	pg_hmac_free(ctx);
}

static void
keystream_xor(const uint8_t *key, size_t klen, const uint8_t *nonce, uint8_t *p, size_t n)
{
	uint8_t block[PG_SHA256_DIGEST_LENGTH];

	for (uint32 ctr = 0; (size_t) ctr * sizeof block < n; ctr++)
	{
		const uint8_t *parts[3] = {(const uint8_t *) "k", nonce, (const uint8_t *) &ctr};
		size_t		   lens[3] = {1, SEAL_NONCE, sizeof ctr};
		size_t		   off = (size_t) ctr * sizeof block;

		hmac(key, klen, parts, lens, 3, block);
		for (size_t i = 0; i < sizeof block && off + i < n; i++)
			p[off + i] ^= block[i];
	}
}

static void
tag_of(const uint8_t *key, size_t klen, const uint8_t *nonce, const uint8_t *ct, size_t n,
	   uint8_t out[SEAL_TAG])
{
	static const uint8_t nodev[PGS_SITE_LEN] = {0};
	uint8_t				 full[PG_SHA256_DIGEST_LENGTH];
	const uint8_t		*parts[4] = {(const uint8_t *) "t",
								 pgsync_have_device ? pgsync_cur_device : nodev, nonce, ct};
	size_t				 lens[4] = {1, PGS_SITE_LEN, SEAL_NONCE, n};

	hmac(key, klen, parts, lens, 4, full);
	memcpy(out, full, SEAL_TAG);
}

/* pgsync_cursor_seal: the client's form of a core continuation token. */
bytea *
pgsync_cursor_seal(MemoryContext cxt, const uint8_t *tok, size_t len)
{
	uint8_t *key, *p;
	size_t	 klen;
	bytea	*out = MemoryContextAlloc(cxt, VARHDRSZ + SEAL_OVERHEAD + len);

	secret_get(&key, &klen);
	SET_VARSIZE(out, VARHDRSZ + SEAL_OVERHEAD + len);
	p = (uint8_t *) VARDATA(out);
	p[0] = SEAL_VERSION;
	if (!pg_strong_random(p + 1, SEAL_NONCE))
		elog(ERROR, "pgsync: no random bytes for a cursor");
	memcpy(p + 1 + SEAL_NONCE, tok, len);
	keystream_xor(key, klen, p + 1, p + 1 + SEAL_NONCE, len);
	tag_of(key, klen, p + 1, p + 1 + SEAL_NONCE, len, p + 1 + SEAL_NONCE + len);
	return out;
}

/* pgsync_cursor_open: the token inside a sealed cursor (palloc'd), or ERROR. */
uint8_t *
pgsync_cursor_open(const uint8_t *p, size_t len, size_t *tok_len)
{
	uint8_t *key, *tok;
	size_t	 klen, n;
	uint8_t	 tag[SEAL_TAG];

	if (len < SEAL_OVERHEAD + 1 || len > SEAL_OVERHEAD + PGS_MAX_TOKEN || p[0] != SEAL_VERSION)
		goto bad;
	secret_get(&key, &klen);
	n = len - SEAL_OVERHEAD;
	tag_of(key, klen, p + 1, p + 1 + SEAL_NONCE, n, tag);
	if (timingsafe_bcmp(tag, p + 1 + SEAL_NONCE + n, SEAL_TAG) != 0)
		goto bad;
	tok = palloc(n);
	memcpy(tok, p + 1 + SEAL_NONCE, n);
	keystream_xor(key, klen, p + 1, tok, n);
	*tok_len = n;
	return tok;
bad:
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_BINARY_REPRESENTATION), errmsg("invalid continuation token"),
			 errdetail("The cursor was not made by this database for this device, or it was "
					   "altered."),
			 errhint("Pass the cursor of the previous chunk unchanged, or restart the pull "
					 "without one.")));
	return NULL;
}

/*
 * pull_until: the safe version a pull of changes after since reaches; ERROR
 * PS409 when since is newer than anything this database handed out (it was
 * replaced or restored), PS410 when deletes newer than since were collected.
 */
static int64_t
pull_until(db_conn *db, int64_t since)
{
	int64_t until;
	pgs_err err;

	if (db_version_safe(db, &until, &err) != PGS_OK)
		pgsync_raise(&err);
	if (since > until)
		ereport(ERROR,
				(errcode(MAKE_SQLSTATE('P', 'S', '4', '0', '9')), errmsg("cursor ahead of server"),
				 errdetail("since=%lld is newer than anything this database has handed out "
						   "(%lld).",
						   (long long) since, (long long) until),
				 errhint("The database was replaced or restored from a backup: pull again from 0 "
						 "and send everything.")));
	pgsync_gc_check_since(since);
	return until;
}

/* ---- sync_pull ------------------------------------------------------------ */

/*
 * sync_pull(since, max_rows, cursor) -> (payload, next_cursor, until): the
 * device's view. Everything is read in the statement's snapshot (read-only
 * SPI); clocks as the metadata owner, rows as the caller.
 */
Datum
sync_pull(PG_FUNCTION_ARGS)
{
	MemoryContext	outer = CurrentMemoryContext;
	MemoryContext	cxt;
	TupleDesc		tupdesc;
	Datum			values[4];
	bool			nulls[4] = {true, true, false, false};
	int32			gen = 0, seen_gen = PG_NARGS() > 3 && !PG_ARGISNULL(3) ? PG_GETARG_INT32(3) : 0;
	db_conn			db;
	pgs_build_opts	o;
	pgs_build_stats st;
	pgs_buf			out, next;
	pgs_err			err;
	int64_t			until;
	uint8_t		   *tok = NULL;
	size_t			tok_len = 0;

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "sync_pull must return a record");
	if (PG_ARGISNULL(0) || PG_GETARG_INT64(0) < 0)
		ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("since must be 0 or more"),
						errhint("Pass 0 the first time, then the until of the previous pull.")));
	memset(&o, 0, sizeof o);
	o.since = PG_GETARG_INT64(0);
	if (!PG_ARGISNULL(1))
	{
		if (PG_GETARG_INT32(1) < 0)
			ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE),
							errmsg("max_rows must not be negative")));
		o.max_rows = (uint32_t) PG_GETARG_INT32(1);
	}
	pgsync_payload_guard();
	cxt = AllocSetContextCreate(CurrentMemoryContext, "pgsync pull", ALLOCSET_DEFAULT_SIZES);
	pgsync_core_memory(cxt);
	SPI_connect();
	pgsync_conn_init(&db, cxt);
	if (!PG_ARGISNULL(2))
	{
		bytea *c = PG_GETARG_BYTEA_PP(2);

		tok = pgsync_cursor_open((const uint8_t *) VARDATA_ANY(c), VARSIZE_ANY_EXHDR(c), &tok_len);
		o.after = tok;
		o.after_len = tok_len;
		if (!o.max_rows)
			o.max_rows = 10000;
	}
	until = pull_until(&db, o.since);
	o.until = until;
	o.view = true;
	o.compress = 1;
	if (pgsync_have_device)
	{
		bool all = device_view(&db, o.since, seen_gen, &gen);

		o.exclude_site = pgsync_cur_device;
		if (!o.after)
			o.snapshot_all = all; /* later chunks: pinned in the token */
	}
	pgs_buf_init(&out);
	pgs_buf_init(&next);
	if (o.since < o.until || o.after || o.snapshot_all)
	{
		/* as the caller: the engine reads clocks as the metadata owner */
		pgs_rc rc = pgs_build(&db, &o, &out, &next, &st, &err);

		if (rc != PGS_OK)
			pgsync_raise(&err);
	}
	if (out.len)
	{
		int64_t pu;

		values[0] = PointerGetDatum(pgsync_bytea(outer, out.p, out.len));
		nulls[0] = false;
		if (pgs_payload_until(out.p, out.len, &pu, &err) != PGS_OK)
			pgsync_raise(&err);
		values[2] = Int64GetDatum(pu);
	}
	else
		values[2] = Int64GetDatum(o.until);
	if (next.len)
	{
		values[1] = PointerGetDatum(pgsync_cursor_seal(outer, next.p, next.len));
		nulls[1] = false;
	}
	values[3] = Int32GetDatum(gen);
	SPI_finish();
	pgsync_core_memory(NULL);
	MemoryContextSwitchTo(outer);
	MemoryContextDelete(cxt);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/*
 * sync_pull_total() -> bigint: the rows a pull from 0 sends the caller,
 * counted as the caller (privileges and RLS apply) in the statement's
 * snapshot: every visible row of every synced table it may read (a pull
 * from 0 is a snapshot of every table: live visible rows, no tombstones).
 * O(visible rows); the server calls it once per first sync.
 */
Datum
sync_pull_total(PG_FUNCTION_ARGS)
{
	Oid	 *relids;
	int	  n;
	int64 total = 0;

	SPI_connect();
	n = pgsync_table_list(&relids);
	for (int i = 0; i < n; i++)
	{
		db_table *t = pgsync_table_get(relids[i], true);
		char	 *sql;
		bool	  isnull;

		if (!t || t->npk < 1 || pgsync_table_access(t) == DB_ACCESS_NONE)
			continue;
		/* count a key column: column privileges may be all the caller has */
		sql = psprintf("SELECT count(%s) FROM %s", quote_identifier(t->pk[0].name), t->q_base);
		if (SPI_execute(sql, true, 0) == SPI_OK_SELECT && SPI_processed == 1)
			total += DatumGetInt64(
				SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
		pfree(sql);
	}
	SPI_finish();
	PG_RETURN_INT64(total);
}

/* ---- one pull for many devices ------------------------------------------- */

/* payload_sites: the site dictionary of a payload (palloc'd, *n ids of 16 bytes). */
static uint8_t *
payload_sites(const uint8_t *p, size_t len, uint32_t *n)
{
	pgs_header	   h;
	const uint8_t *body;
	uint8_t		  *owned = NULL, *out;
	pgs_reader	   r;
	pgs_err		   err;

	if (pgs_payload_body(p, len, &h, &body, &owned, &err) != PGS_OK ||
		pgs_reader_open(&r, h.version, body, h.body_len, &err) != PGS_OK)
		pgsync_raise(&err);
	*n = r.nsites;
	out = palloc((size_t) r.nsites * 16 + 1);
	memcpy(out, r.sites, (size_t) r.nsites * 16);
	pgs_reader_close(&r);
	pgs_free(owned);
	return out;
}

/*
 * sync_pull_group(since, max_rows, seen_gen, devices) -> (payload, until,
 * served): one pull for several devices of the principal bound by
 * sync_device, pulling as the caller (one role, one set of claims) with the
 * same since and seen_gen, e.g. the long-polls one push wakes.
 *
 * served[i] says that payload (NULL: nothing new) and until are exactly what
 * sync_pull would have returned to devices[i], its gen being seen_gen
 * (only the random salt of removal candidates may differ), and that its
 * pull was recorded as sync_pull records it. That holds when the device
 * belongs to the principal, what decides its view has not changed
 * (fingerprint and generation: no snapshot of every table is due), and no
 * change, whole row or removal candidate in the payload carries its site id
 * (sync_pull would have left its own changes out), and no row left out as
 * unseen was made by it (its sync_pull would send that row's removal
 * candidate: core/build.c, unseen). The payload is built once without a
 * device, so only the device's own changes can make it differ, and they
 * would all put the device's site in the payload's site dictionary or in
 * the unseen sites. A chunked result (more than max_rows rows) serves nobody: chunk
 * cursors are sealed for one device. Devices not served pull alone.
 */
Datum
sync_pull_group(PG_FUNCTION_ARGS)
{
	MemoryContext	outer = CurrentMemoryContext;
	MemoryContext	cxt;
	TupleDesc		tupdesc;
	Datum			values[3];
	bool			nulls[3] = {true, false, false};
	int32			seen_gen = PG_ARGISNULL(2) ? 0 : PG_GETARG_INT32(2);
	ArrayType	   *arr;
	Datum		   *elems, *out_served;
	bool		   *elem_nulls, *served, *is_stale;
	int				n, nstale = 0;
	Datum		   *stale;
	db_conn			db;
	pgs_build_opts	o;
	pgs_build_stats st;
	pgs_buf			out, next, unseen;
	pgs_err			err;
	int64_t			until;
	uint64			fp;

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "sync_pull_group must return a record");
	if (!pgsync_have_device)
		ereport(ERROR, (errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
						errmsg("sync_pull_group needs the principal bound by sync_device"),
						errhint("The sync server calls sync_device(device, principal) in the "
								"same transaction first.")));
	if (PG_ARGISNULL(0) || PG_GETARG_INT64(0) < 0 || PG_ARGISNULL(3))
		ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						errmsg("since must be 0 or more and devices not NULL")));
	memset(&o, 0, sizeof o);
	o.since = PG_GETARG_INT64(0);
	if (!PG_ARGISNULL(1))
	{
		if (PG_GETARG_INT32(1) < 0)
			ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE),
							errmsg("max_rows must not be negative")));
		o.max_rows = (uint32_t) PG_GETARG_INT32(1);
	}
	arr = PG_GETARG_ARRAYTYPE_P(3);
	deconstruct_array(arr, UUIDOID, UUID_LEN, false, TYPALIGN_CHAR, &elems, &elem_nulls, &n);
	if (n > 100000)
		ereport(ERROR, (errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
						errmsg("sync_pull_group takes at most 100000 devices")));
	served = palloc0(sizeof(bool) * (n + 1));
	is_stale = palloc0(sizeof(bool) * (n + 1));
	stale = palloc(sizeof(Datum) * (n + 1));
	pgsync_payload_guard();
	cxt = AllocSetContextCreate(CurrentMemoryContext, "pgsync pull group", ALLOCSET_DEFAULT_SIZES);
	pgsync_core_memory(cxt);
	SPI_connect();
	pgsync_conn_init(&db, cxt);
	until = pull_until(&db, o.since); /* one answer for the whole group: they share since */
	o.until = until;
	o.view = true;
	o.compress = 1;
	/* which devices would get no snapshot of every table (device_view) */
	fp = fingerprint(&db);
	{
		Oid	  types[6] = {UUIDARRAYOID, TEXTOID, BYTEAOID, INT4OID, INT8OID, INT4OID};
		Datum vals[6];

		vals[0] = PointerGetDatum(arr);
		vals[1] = CStringGetTextDatum(pgsync_cur_principal);
		vals[2] = PointerGetDatum(pgsync_bytea(CurrentMemoryContext, &fp, sizeof fp));
		vals[3] = Int32GetDatum(seen_gen);
		vals[4] = Int64GetDatum(o.since);
		vals[5] = Int32GetDatum(pgsync_record_interval);
		/* stale as in device_view */
		meta_exec(
			"SELECT d.i::int4, " STALE_SQL(
				5,
				6) " FROM unnest($1) WITH ORDINALITY AS d(site, i) JOIN pgsync.devices v ON v.site "
				   "= d.site WHERE v.principal = $2 AND v.fingerprint = $3 AND v.fp_gen = $4",
			6, types, vals, true, 0);
		for (uint64 r = 0; r < SPI_processed; r++)
		{
			bool  isnull;
			int32 i = DatumGetInt32(
				SPI_getbinval(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 1, &isnull));

			if (i >= 1 && i <= n && !elem_nulls[i - 1])
			{
				served[i - 1] = true;
				is_stale[i - 1] = DatumGetBool(
					SPI_getbinval(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 2, &isnull));
			}
		}
	}
	pgs_buf_init(&out);
	pgs_buf_init(&next);
	pgs_buf_init(&unseen);
	o.unseen_sites = &unseen;
	if (o.since < o.until)
	{
		pgs_rc rc = pgs_build(&db, &o, &out, &next, &st, &err);

		if (rc != PGS_OK)
			pgsync_raise(&err);
	}
	/* rows left out as no one's: the device that made one gets it alone */
	for (int i = 0; i < n; i++)
		if (pgs_site_listed(unseen.p, unseen.len / PGS_SITE_LEN, DatumGetUUIDP(elems[i])->data))
			served[i] = false;
	if (next.len)
		memset(served, 0, sizeof(bool) * n);
	else if (out.len)
	{
		uint32_t nsites;
		uint8_t *sites = payload_sites(out.p, out.len, &nsites);

		for (int i = 0; i < n; i++)
			if (pgs_site_listed(sites, nsites, DatumGetUUIDP(elems[i])->data))
				served[i] = false;
	}
	/* record the pulls of the served devices the way device_view does */
	for (int i = 0; i < n; i++)
		if (served[i] && is_stale[i])
			stale[nstale++] = elems[i];
	if (nstale)
	{
		Oid	  types[2] = {UUIDARRAYOID, INT8OID};
		Datum vals[2];

		vals[0] = PointerGetDatum(
			construct_array(stale, nstale, UUIDOID, UUID_LEN, false, TYPALIGN_CHAR));
		vals[1] = Int64GetDatum(o.since);
		/* bookkeeping for the GC horizon: losing it in a crash only holds it back */
		(void) set_config_option("synchronous_commit", "off", PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_LOCAL, true, 0, false);
		meta_exec("UPDATE pgsync.devices SET last_seen = now(), acked = greatest(acked, $2) "
				  "WHERE site = ANY($1)",
				  2, types, vals, false, 0);
	}
	if (out.len && !next.len)
	{
		int64_t pu;

		values[0] = PointerGetDatum(pgsync_bytea(outer, out.p, out.len));
		nulls[0] = false;
		if (pgs_payload_until(out.p, out.len, &pu, &err) != PGS_OK)
			pgsync_raise(&err);
		values[1] = Int64GetDatum(pu);
	}
	else
		values[1] = Int64GetDatum(o.until);
	out_served = MemoryContextAlloc(outer, sizeof(Datum) * (n + 1));
	for (int i = 0; i < n; i++)
		out_served[i] = BoolGetDatum(served[i]);
	MemoryContextSwitchTo(outer);
	values[2] = PointerGetDatum(construct_array(out_served, n, BOOLOID, 1, true, TYPALIGN_CHAR));
	SPI_finish();
	pgsync_core_memory(NULL);
	MemoryContextSwitchTo(outer);
	MemoryContextDelete(cxt);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/* ---- rows a device asks for ------------------------------------------------ */

/* json_key: the key of t named by a JSON object {col: value} (strings and numbers). */
static bool
json_key(db_table *t, cJSON *o, pgs_value *pk)
{
	if (!cJSON_IsObject(o))
		return false;
	for (int i = 0; i < t->npk; i++)
	{
		cJSON *v = cJSON_GetObjectItemCaseSensitive(o, t->pk_names[i]);

		if (cJSON_IsString(v))
			pk[i] = (pgs_value){.type = PGS_TEXT,
								.len = (uint32_t) strlen(v->valuestring),
								.v.p = (const uint8_t *) v->valuestring};
		else if (cJSON_IsNumber(v) && v->valuedouble == (double) (int64) v->valuedouble)
			pk[i] = (pgs_value){.type = PGS_INT, .v.i = (int64) v->valuedouble};
		else if (cJSON_IsNumber(v))
			pk[i] = (pgs_value){.type = PGS_REAL, .v.r = v->valuedouble};
		else if (cJSON_IsBool(v))
			pk[i] = (pgs_value){.type = PGS_INT, .v.i = cJSON_IsTrue(v) ? 1 : 0};
		else
			return false;
	}
	return true;
}

#define ROWS_MAX 10000

PG_FUNCTION_INFO_V1(sync_rows);

/*
 * sync_rows(keys jsonb): a payload of the rows a receiver lacks, whole, as
 * the caller may see them; each key it may not see (or that is gone, or in
 * a table not synced here) comes back ABSENT, so the receiver forgets it.
 * keys: [{"table": "notes", "pk": {"id": "n1"}}, ...], at most 10000.
 */
Datum
sync_rows(PG_FUNCTION_ARGS)
{
	char		 *keys = DatumGetCString(DirectFunctionCall1(jsonb_out, PG_GETARG_DATUM(0)));
	MemoryContext outer = CurrentMemoryContext, cxt;
	cJSON		 *j = cJSON_Parse(keys), *it;
	pgs_row_ref	 *rows;
	uint32		  n = 0;
	db_conn		  db;
	pgs_buf		  out;
	pgs_err		  err;
	bytea		 *res;

	if (!cJSON_IsArray(j) || cJSON_GetArraySize(j) > ROWS_MAX)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("keys must be a JSON array of at most %d {\"table\", \"pk\"} objects",
						ROWS_MAX)));
	pgsync_payload_guard();
	cxt = AllocSetContextCreate(CurrentMemoryContext, "pgsync rows", ALLOCSET_DEFAULT_SIZES);
	pgsync_core_memory(cxt);
	SPI_connect();
	pgsync_conn_init(&db, cxt);
	rows = palloc(sizeof(pgs_row_ref) * (cJSON_GetArraySize(j) + 1));
	cJSON_ArrayForEach(it, j)
	{
		cJSON	  *tn = cJSON_GetObjectItemCaseSensitive(it, "table");
		db_table  *t;
		pgs_value *pk;

		if (!cJSON_IsString(tn))
			ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE),
							errmsg("every key needs a \"table\" name")));
		if (db_table_find(&db, (const uint8_t *) tn->valuestring, strlen(tn->valuestring), &t,
						  &err) != PGS_OK)
			continue; /* not synced here: nothing to send */
		pk = palloc(sizeof(pgs_value) * t->npk);
		if (!json_key(t, cJSON_GetObjectItemCaseSensitive(it, "pk"), pk))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("key of table \"%s\" is not an object of its key columns", t->name)));
		rows[n].t = t;
		rows[n].pk = pk;
		n++;
	}
	pgs_buf_init(&out);
	if (pgs_build_rows(&db, rows, n, &out, &err) != PGS_OK)
		pgsync_raise(&err);
	res = pgsync_bytea(outer, out.p, out.len);
	SPI_finish();
	pgsync_core_memory(NULL);
	cJSON_Delete(j);
	MemoryContextSwitchTo(outer);
	MemoryContextDelete(cxt);
	PG_RETURN_BYTEA_P(res);
}
