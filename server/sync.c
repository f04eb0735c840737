/*
 * sync.c — the Postgres side of push and pull.
 *
 * Both act for the device the request names and as the token's role, so
 * that privileges and RLS judge every row, in one transaction:
 *
 * Every request is one transaction and one round trip (libpq pipeline
 * mode, in_transaction below): BEGIN (ISOLATION LEVEL REPEATABLE READ for
 * pulls: one snapshot); SELECT sync_device($device, $principal); SELECT
 * set_config('role', $role, true), set_config('request.jwt.claims', $claims,
 * true); the request's statements; COMMIT. A push's are
 *   SELECT sync_apply_payload($1);
 *   SELECT sync_db_version(), <sync_rejections() as JSON>,
 *          pg_current_xact_id_if_assigned();
 * and then, if anything won, hub_notify: the listener's connection sends
 *   SELECT pg_notify('pgsync_changes', '<xid>');
 * for this and every push that committed while it was sending the last one.
 * A pull's is
 *   SELECT payload, next_cursor, until FROM sync_pull($since, $max_rows, $cursor);
 * sync_pull builds the device's exact view inside Postgres (docs/DESIGN.md,
 * "Visibility"); the server passes bytes through and never reads or writes
 * the payload format. sync_device binds a site id to the principal that
 * first used it and refuses another principal's (403). Every request is
 * idempotent, so a connection that broke under us is retried once on a
 * fresh connection, serialization failures and deadlocks up to 3 times.
 *
 * Group pull (the long-polls one push wakes, work.c groups them): devices
 * of one principal pulling as one role with the same claims, since and
 * generation share one computation, one transaction for all of them (as the
 * first device):
 *   SELECT payload, until, served FROM sync_pull_group($since, $max_rows, $gen, $devices);
 * served[i] says the payload is exactly device i's pull (pg_ext/pg_view.c);
 * the others pull alone. The one place the server looks into a payload is
 * not here: sync_pull_group decides, inside Postgres. Requests without a
 * device (no exclude) have identical inputs, so one sync_pull answers all.
 */
#include "server.h"

#include "core/pgsync.h"

#include <libpq-events.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void
pull_share_unref(pull_share *p)
{
	if (p && atomic_fetch_sub(&p->refs, 1) == 1)
	{
		PQclear(p->res);
		free(p->more);
		free(p);
	}
}

/* share_of: a pull_share owning res (its payload in column 0), or NULL. */
static pull_share *
share_of(PGresult *res, int64_t cursor, int32_t gen)
{
	pull_share *p = calloc(1, sizeof *p);

	if (!p)
		return NULL;
	atomic_init(&p->refs, 1);
	p->res = res;
	p->payload = (const uint8_t *) PQgetvalue(res, 0, 0);
	p->len = (size_t) PQgetlength(res, 0, 0);
	p->cursor = cursor;
	p->gen = gen;
	p->rows_total = -1;
	return p;
}

static bool
sqlstate_is(const char *s, const char *prefix)
{
	return s && strncmp(s, prefix, strlen(prefix)) == 0;
}

/*
 * srv_pg_error maps a failed statement to an HTTP error. Returns true when
 * the connection is gone (the caller retries on another one).
 */
bool
srv_pg_error(PGconn *conn, const PGresult *res, const char *what, srv_error *e)
{
	const char *st = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
	const char *msg = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
	const char *detail = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_DETAIL) : NULL;
	const char *hint = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_HINT) : NULL;
	char		d[640];

	if (!msg)
		msg = PQerrorMessage(conn);
	snprintf(d, sizeof d, "%s%s%s", msg ? msg : "", detail ? " " : "", detail ? detail : "");
	for (char *p = d; *p; p++)
		if (*p == '\n')
			*p = ' ';
	if (PQstatus(conn) != CONNECTION_OK || !st || sqlstate_is(st, "08") || sqlstate_is(st, "57P"))
	{
		srv_fail(e, 503, "database unavailable",
				 "Retry with backoff; the server reconnects by itself.",
				 "PostgreSQL connection lost during %s: %s", what, d);
		return PQstatus(conn) != CONNECTION_OK || !st || sqlstate_is(st, "08") ||
			   sqlstate_is(st, "57P");
	}
	if (sqlstate_is(st, "22023") && strcmp(what, "sync_rows") == 0)
		srv_fail(e, 400, "bad request",
				 "Send {\"rows\": [{\"table\": ..., \"pk\": {...}}]} (docs/PROTOCOL.md).", "%s", d);
	else if (sqlstate_is(st, "PS409"))
		srv_fail(e, 409, "cursor ahead of server",
				 "The server's database was replaced or restored from a backup: pull again from 0 "
				 "and send everything.",
				 "%s", d);
	else if (sqlstate_is(st, "PS410"))
		srv_fail(e, 410, "cursor behind the gc horizon",
				 "Push unsent changes, then pull again from 0 (a snapshot); the SQLite client "
				 "does it by itself.",
				 "%s", d);
	else if ((sqlstate_is(st, "22P03") || sqlstate_is(st, "22023")) &&
			 strstr(d, "continuation token"))
		srv_fail(e, 400, "bad cursor",
				 hint ? hint
					  : "Pass the cursor of the previous chunk unchanged, or pull again "
						"without one.",
				 "%s", d);
	else if (sqlstate_is(st, "22P03") || sqlstate_is(st, "0A000") || sqlstate_is(st, "22023") ||
			 sqlstate_is(st, "22004"))
		srv_fail(e, 400, "malformed payload",
				 hint ? hint : "Send the bytes returned by sync_payload unchanged.", "%s", d);
	else if (sqlstate_is(st, "54000"))
		srv_fail(e, 413, "payload too large",
				 hint ? hint : "Sync more often so that each push is smaller.", "%s", d);
	else if (sqlstate_is(st, "42704") || sqlstate_is(st, "22P02") || sqlstate_is(st, "42703") ||
			 sqlstate_is(st, "22"))
		srv_fail(e, 422, "payload does not match the server schema",
				 hint ? hint
					  : "Migrate the server schema (and call sync_init) before clients use new "
						"tables or columns.",
				 "%s", d);
	else if (sqlstate_is(st, "42501") && strcmp(what, "sync_device") == 0 &&
			 strstr(d, "permission denied for function"))
		srv_fail(e, 500, "server may not act for devices",
				 "The administrator must GRANT EXECUTE ON FUNCTION sync_device(uuid, text) to the "
				 "server's login role (docs/SERVER.md).",
				 "%s", d);
	else if (sqlstate_is(st, "42501") && strcmp(what, "sync_device") == 0 &&
			 strstr(d, "this database's own"))
		srv_fail(e, 403, "site id is the server's own",
				 hint ? hint : "A device needs a site id of its own.", "%s", d);
	else if (sqlstate_is(st, "42501") && strcmp(what, "sync_device") == 0)
		srv_fail(e, 403, "device belongs to another principal",
				 hint ? hint : "Each device keeps its own site id.", "%s", d);
	else if (sqlstate_is(st, "42501"))
		srv_fail(e, 403, "forbidden",
				 hint ? hint : "Ask an administrator for the privileges this request needs.", "%s",
				 d);
	else if (sqlstate_is(st, "40") || sqlstate_is(st, "53") || sqlstate_is(st, "55P03") ||
			 sqlstate_is(st, "57014"))
		srv_fail(e, 503, "database busy", "Retry with backoff.", "%s", d);
	else
	{
		srv_log("ERROR", "%s failed: SQLSTATE %s: %s", what, st, d);
		srv_fail(e, 500, "internal error",
				 hint ? hint : "The server administrator should check the server log.",
				 "%s failed (SQLSTATE %s): %s", what, st, d);
	}
	return false;
}

static bool
retryable(const srv_error *e, const PGresult *r)
{
	const char *st = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;

	(void) e;
	/* serialization failures, deadlocks, and a prepared statement that the
	 * backend does not have (in_transaction stops preparing) */
	return st && (strcmp(st, "40001") == 0 || strcmp(st, "40P01") == 0 || strcmp(st, "26000") == 0);
}

/*
 * One statement of a request (in_transaction). Those with a name are
 * prepared once per connection (in the pipeline of their first use), so
 * that Postgres parses and plans them once: a one-row push spent a quarter
 * of its Postgres time parsing and planning its six statements.
 */
typedef struct stmt
{
	const char		  *sql;
	const char		  *what; /* names it in errors */
	int				   nparams;
	const char *const *vals;
	const int		  *lens; /* NULL: every parameter is text */
	const int		  *fmts;
	int				   binary; /* results in binary */
	int				   prep;   /* 1..31: the prepared statement "pgs<prep>"; 0: not prepared */
} stmt;

#define BODY_MAX 2

/* the prepared statements of the request statements (stmt.prep) */
enum
{
	PREP_DEVICE = 1,
	PREP_ROLE,
	PREP_APPLY,
	PREP_REPORT,
	PREP_PULL,
	PREP_PULL_FIRST,
	PREP_PULL_GROUP,
	PREP_ROWS
};

/*
 * The connection's prepared statements: a bit per stmt.prep, kept as libpq
 * instance data (freed with the connection). Bit 0: prepare nothing on this
 * connection, set when a prepared statement vanished (SQLSTATE 26000): a
 * pooler in transaction mode (PgBouncer before 1.21) hands each transaction
 * to another backend, which has not prepared it.
 */
#define PREP_NONE UINT32_C(1)

static int
prep_event(PGEventId id, void *info, void *pass)
{
	(void) pass;
	if (id == PGEVT_CONNDESTROY)
		free(PQinstanceData(((PGEventConnDestroy *) info)->conn, prep_event));
	return 1;
}

static uint32_t *
prepared_of(PGconn *conn)
{
	uint32_t *have = PQinstanceData(conn, prep_event);

	if (!have && (have = calloc(1, sizeof *have)) != NULL &&
		(!PQregisterEventProc(conn, prep_event, "pgsync-prepared", NULL) ||
		 !PQsetInstanceData(conn, prep_event, have)))
	{
		free(have);
		have = NULL; /* nothing prepared: every statement parsed each time */
	}
	return have;
}

/* stmt_failed maps the error of statement what into e. */
static void
stmt_failed(PGconn *conn, const PGresult *bad, const char *what, bool *broken, bool *retry,
			srv_error *e)
{
	const char *m = bad ? PQresultErrorField(bad, PG_DIAG_MESSAGE_PRIMARY) : NULL;
	const char *st = bad ? PQresultErrorField(bad, PG_DIAG_SQLSTATE) : NULL;

	*broken = srv_pg_error(conn, bad, what, e);
	if (!*broken && st && strcmp(what, "SET ROLE") == 0 &&
		(strcmp(st, "42501") == 0 || strcmp(st, "22023") == 0 || strcmp(st, "42704") == 0))
		srv_fail(e, 500, "server cannot act as the token's role",
				 "The administrator must create the role and GRANT it to the server's login role.",
				 "SET ROLE failed: %s", m ? m : "");
	*retry = retryable(e, bad);
}

/*
 * in_transaction runs a request in one transaction and one round trip
 * (libpq pipeline mode): BEGIN (REPEATABLE READ when snapshot: pulls read one
 * snapshot), sync_device for the device the request names (before the role:
 * only the server's login role may execute it), the token's role and claims,
 * body[0..n), COMMIT. res[i] gets body[i]'s result, for the caller to clear.
 * On failure the first statement that failed names the error in e (Postgres
 * skips the rest), res is cleared, and the transaction is left aborted for
 * pool_release to roll back; anything unexpected on the connection sets
 * *broken, which discards it.
 */
static bool
in_transaction(PGconn *conn, const auth_info *a, const char *device, bool snapshot,
			   const stmt *body, int n, PGresult **res, bool *broken, bool *retry, srv_error *e)
{
	const char *dev[2] = {device, a->principal};
	const char *role[2] = {a->role, a->claims ? a->claims : "{}"};
	stmt		all[3 + BODY_MAX + 1];
	int			nall = 0, first, nres = 0;
	int			res_of[2 * (3 + BODY_MAX + 1)]; /* per result: its statement, or -1 - it
												   for the statement's prepare */
	uint32_t   *have = prepared_of(conn), fresh = 0;
	PGresult   *bad = NULL, *r;
	const char *badwhat = NULL;
	bool		lost = false;

	all[nall++] = (stmt){.sql = snapshot ? "BEGIN ISOLATION LEVEL REPEATABLE READ" : "BEGIN",
						 .what = "BEGIN"};
	if (device)
		all[nall++] = (stmt){.sql = "SELECT sync_device($1::uuid, $2)",
							 .what = "sync_device",
							 .nparams = 2,
							 .vals = dev,
							 .prep = PREP_DEVICE};
	all[nall++] = (stmt){.sql = "SELECT set_config('role', $1, true), "
								"set_config('request.jwt.claims', $2, true)",
						 .what = "SET ROLE",
						 .nparams = 2,
						 .vals = role,
						 .prep = PREP_ROLE};
	first = nall;
	for (int i = 0; i < n && i < BODY_MAX; i++)
		all[nall++] = body[i];
	all[nall++] = (stmt){.sql = "COMMIT", .what = "COMMIT"};
	for (int i = 0; i < n; i++)
		res[i] = NULL;
	if (!PQenterPipelineMode(conn))
	{
		srv_pg_error(conn, NULL, all[0].what, e);
		*broken = true;
		return false;
	}
	for (int i = 0; i < nall; i++)
	{
		char	 name[8];
		uint32_t bit = all[i].prep && have && !(*have & PREP_NONE) ? UINT32_C(1) << all[i].prep : 0;
		int		 sent;

		snprintf(name, sizeof name, "pgs%d", all[i].prep);
		if (bit && !(*have & bit))
		{
			if (!PQsendPrepare(conn, name, all[i].sql, all[i].nparams, NULL))
			{
				srv_pg_error(conn, NULL, all[i].what, e);
				*broken = true;
				return false;
			}
			res_of[nres++] = -1 - i;
		}
		sent = bit ? PQsendQueryPrepared(conn, name, all[i].nparams, all[i].vals, all[i].lens,
										 all[i].fmts, all[i].binary)
				   : PQsendQueryParams(conn, all[i].sql, all[i].nparams, NULL, all[i].vals,
									   all[i].lens, all[i].fmts, all[i].binary);
		if (!sent)
		{
			srv_pg_error(conn, NULL, all[i].what, e);
			*broken = true;
			return false;
		}
		res_of[nres++] = i;
	}
	if (!PQpipelineSync(conn))
	{
		srv_pg_error(conn, NULL, "COMMIT", e);
		*broken = true;
		return false;
	}
	/* each statement: its result, then NULL; the statements after a failed
	 * one come back PGRES_PIPELINE_ABORTED; then the sync */
	for (int k = 0; k < nres && !lost; k++)
	{
		int			   i = res_of[k] < 0 ? -1 - res_of[k] : res_of[k];
		ExecStatusType st;

		if (!(r = PQgetResult(conn)))
		{
			lost = true;
			break;
		}
		st = PQresultStatus(r);
		if (!bad && (st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK))
		{
			if (res_of[k] < 0)
				fresh |= UINT32_C(1) << all[i].prep;
			if (res_of[k] >= 0 && i >= first && i < first + n)
				res[i - first] = r;
			else
				PQclear(r);
		}
		else if (!bad && st != PGRES_PIPELINE_ABORTED)
		{
			bad = r;
			badwhat = all[i].what;
		}
		else
			PQclear(r);
		while ((r = PQgetResult(conn)) != NULL)
		{
			if (PQresultStatus(r) == PGRES_PIPELINE_SYNC)
				lost = true; /* a statement without its results */
			PQclear(r);
		}
	}
	if (!lost)
	{
		r = PQgetResult(conn);
		lost = !r || PQresultStatus(r) != PGRES_PIPELINE_SYNC;
		PQclear(r);
	}
	if (!PQexitPipelineMode(conn))
		lost = true;
	/* a statement prepared stays prepared, whatever came after it (prepared
	 * statements outlive transactions, also aborted ones); one whose prepare
	 * failed or did not run is prepared again next time */
	if (have && !lost)
		*have |= fresh;
	if (!lost && !bad)
		return true;
	for (int i = 0; i < n; i++)
	{
		PQclear(res[i]);
		res[i] = NULL;
	}
	if (have && bad && sqlstate_is(PQresultErrorField(bad, PG_DIAG_SQLSTATE), "26000"))
	{
		static _Atomic bool warned;

		/* retried at once, unprepared on this connection from now on */
		*have |= PREP_NONE;
		if (!atomic_exchange(&warned, true))
			srv_log("WARNING",
					"a prepared statement vanished between transactions (a connection pooler "
					"in transaction mode?): statements on such connections are no longer "
					"prepared");
		PQclear(bad);
		*retry = true;
		*broken = lost;
		return srv_fail(e, 503, "database busy", "Retry with backoff.",
						"A prepared statement vanished; retried without.");
	}
	if (bad)
		stmt_failed(conn, bad, badwhat, broken, retry, e);
	else
		srv_pg_error(conn, NULL, "COMMIT", e);
	if (lost)
		*broken = true;
	PQclear(bad);
	return false;
}

/* ---- push ---------------------------------------------------------------- */

static bool
push_once(PGconn *conn, const auth_info *a, const uint8_t *body, size_t len, push_result *out,
		  bool *broken, bool *retry, srv_error *e)
{
	const char *vals[1] = {(const char *) body};
	int			lens[1] = {(int) len};
	int			fmts[1] = {1};
	/* the xid only if the push wrote (pg_current_xact_id would assign one);
	 * the NOTIFY follows from the listener's connection (hub_notify): one in
	 * the push's transaction would take Postgres' one notify lock in every
	 * push's commit and serialize the commits */
	const stmt q[2] = {
		{.sql = "SELECT sync_apply_payload($1::bytea)",
		 .what = "sync_apply_payload",
		 .nparams = 1,
		 .vals = vals,
		 .lens = lens,
		 .fmts = fmts,
		 .prep = PREP_APPLY},
		{.sql = "SELECT v, j, json_array_length(j), x FROM (SELECT sync_db_version() AS v, "
				"(SELECT coalesce(json_agg(json_build_object('table', r.table_name, 'pk', r.pk, "
				"'code', r.sqlstate, 'message', r.message)), '[]') FROM sync_rejections() r) AS j, "
				"pg_current_xact_id_if_assigned()::text AS x) s",
		 .what = "sync_rejections",
		 .prep = PREP_REPORT}};
	PGresult *r[2];
	char	  origin[37];
	bool	  ok = false;

	{
		uint8_t site[16];

		if (pgs_payload_origin(body, len, site) != PGS_OK)
			return srv_fail(e, 400, "malformed payload",
							"Send the bytes returned by sync_payload unchanged.",
							"The body is not a pgsync payload.");
		pgs_uuid_format(site, origin);
	}
	if (!in_transaction(conn, a, origin, false, q, 2, r, broken, retry, e))
		return false;
	if (PQntuples(r[0]) != 1 || PQgetisnull(r[0], 0, 0))
		srv_fail(e, 500, "internal error", NULL, "sync_apply_payload returned no count.");
	else if (PQntuples(r[1]) != 1 || PQnfields(r[1]) < 4)
		srv_fail(e, 500, "internal error", NULL, "Reading sync_rejections() returned no row.");
	else
	{
		out->applied = strtoll(PQgetvalue(r[0], 0, 0), NULL, 10);
		out->server_version = strtoll(PQgetvalue(r[1], 0, 0), NULL, 10);
		out->nrejected = strtoll(PQgetvalue(r[1], 0, 2), NULL, 10);
		out->xid = out->applied > 0 && !PQgetisnull(r[1], 0, 3)
					   ? strtoll(PQgetvalue(r[1], 0, 3), NULL, 10)
					   : 0;
		free(out->rejected_json);
		ok = (out->rejected_json = strdup(PQgetvalue(r[1], 0, 1))) != NULL ||
			 srv_fail(e, 500, "internal error", NULL, "Out of memory building the response.");
	}
	PQclear(r[0]);
	PQclear(r[1]);
	return ok;
}

bool
push_apply(srv_db *db, const auth_info *a, const uint8_t *body, size_t len, push_result *out,
		   srv_error *e)
{
	memset(out, 0, sizeof *out);
	for (int attempt = 0; attempt < 4; attempt++)
	{
		PGconn *conn = pool_acquire(db, e);
		bool	broken = false, retry = false, ok;

		if (!conn)
			return false;
		ok = push_once(conn, a, body, len, out, &broken, &retry, e);
		pool_release(db, conn, broken);
		if (ok && out->xid > 0)
			hub_notify(db, out->xid);
		if (ok)
			return true;
		/* a lost connection is retried once, a serialization failure 3 times */
		if (!(broken && attempt == 0) && !retry)
			return false;
	}
	return false;
}

/* ---- pull ---------------------------------------------------------------- */

static int64_t
be64(const char *p)
{
	uint64_t v = 0;

	for (int i = 0; i < 8; i++)
		v = (v << 8) | (uint8_t) p[i];
	return (int64_t) v;
}

/*
 * pull_once: the device's view from sync_pull, in one REPEATABLE READ
 * transaction. The cursor of the next chunk is the hex of
 * the sealed cursor sync_pull returns (the server never looks inside).
 * *out is set when there is a payload; *cursor and *gen are the next since
 * and the view's generation.
 */
static bool
pull_once(PGconn *conn, const srv_job *j, pull_share **out, int64_t *cursor, int32_t *gen,
		  bool *broken, bool *retry, srv_error *e)
{
	char		sincebuf[24], rowsbuf[16], genbuf[16];
	const char *vals[4] = {sincebuf, rowsbuf, (const char *) j->sealed, genbuf};
	int			lens[4] = {0, 0, (int) j->sealed_len, 0};
	int			fmts[4] = {0, 0, 1, 0};
	PGresult   *p;
	stmt		q;
	bool		first;

	*out = NULL;
	snprintf(sincebuf, sizeof sincebuf, "%lld", (long long) j->since);
	snprintf(rowsbuf, sizeof rowsbuf, "%u", j->max_rows);
	snprintf(genbuf, sizeof genbuf, "%d", (int) j->gen);
	/* a first sync (from 0) also counts the rows it will send, in the same
	 * snapshot, for the device's progress (X-Pgsync-Rows-Total) */
	first = j->since == 0 && !j->sealed;
	q = (stmt){.sql = first ? "SELECT payload, next_cursor, until, gen, sync_pull_total() "
							  "FROM sync_pull($1::bigint, $2::int, $3::bytea, $4::int)"
							: "SELECT payload, next_cursor, until, gen FROM "
							  "sync_pull($1::bigint, $2::int, $3::bytea, $4::int)",
			   .what = "sync_pull",
			   .nparams = 4,
			   .vals = vals,
			   .lens = lens,
			   .fmts = fmts,
			   .binary = 1,
			   .prep = first ? PREP_PULL_FIRST : PREP_PULL};
	if (!in_transaction(conn, j->auth, j->exclude, true, &q, 1, &p, broken, retry, e))
		return false;
	if (PQntuples(p) != 1 || PQgetlength(p, 0, 2) != 8 || PQgetlength(p, 0, 3) != 4 ||
		(first && PQgetlength(p, 0, 4) != 8))
	{
		PQclear(p);
		return srv_fail(e, 500, "internal error", NULL, "sync_pull returned an unexpected result.");
	}
	*cursor = be64(PQgetvalue(p, 0, 2));
	{
		const uint8_t *g = (const uint8_t *) PQgetvalue(p, 0, 3);

		*gen =
			(int32_t) ((uint32_t) g[0] << 24 | (uint32_t) g[1] << 16 | (uint32_t) g[2] << 8 | g[3]);
	}
	if (PQgetisnull(p, 0, 0))
	{
		PQclear(p);
		return true;
	}
	if (!(*out = share_of(p, *cursor, *gen)))
	{
		PQclear(p);
		return srv_fail(e, 500, "internal error", NULL, "Out of memory.");
	}
	if (first)
		(*out)->rows_total = be64(PQgetvalue(p, 0, 4));
	if (!PQgetisnull(p, 0, 1))
	{
		size_t	tn = (size_t) PQgetlength(p, 0, 1);
		pgs_buf c;

		if (tn == 0 || tn > PGS_MAX_SEALED)
			return srv_fail(e, 500, "internal error",
							"Use shorter primary keys, or pull without max_rows.",
							"A continuation cursor of %zu bytes does not fit the protocol.", tn);
		/* the chunk cursor: this pull's since, the view's generation, the seal */
		pgs_buf_init(&c);
		pgs_cursor_format(&c, j->since, *gen, (const uint8_t *) PQgetvalue(p, 0, 1), tn);
		if (c.oom || !((*out)->more = strdup((const char *) c.p)))
		{
			pgs_buf_free(&c);
			return srv_fail(e, 500, "internal error", NULL, "Out of memory.");
		}
		pgs_buf_free(&c);
	}
	return true;
}

bool
pull_one(srv_job *j, srv_error *e)
{
	j->pull = NULL;
	for (int attempt = 0; attempt < 4; attempt++)
	{
		PGconn	   *conn = pool_acquire(j->db, e);
		bool		broken = false, retry = false, ok;
		pull_share *out = NULL;
		int64_t		cursor = 0;
		int32_t		gen = 0;

		if (!conn)
			return false;
		ok = pull_once(conn, j, &out, &cursor, &gen, &broken, &retry, e);
		pool_release(j->db, conn, broken);
		if (ok)
		{
			j->pull = out;
			j->since = cursor;
			j->gen = gen;
			return true;
		}
		pull_share_unref(out);
		if (!(broken && attempt == 0) && !retry)
			return false;
	}
	return false;
}

/* ---- one pull for several devices ------------------------------------------ */

/*
 * group_once runs SQL sync_pull_group for jobs (same role, claims, principal,
 * since, gen, max_rows; every one with a device). done[i] for the served.
 */
static bool
group_once(PGconn *conn, srv_job **jobs, int n, bool *done, bool *broken, bool *retry, srv_error *e)
{
	const srv_job *lead = jobs[0];
	char		   sincebuf[24], rowsbuf[16], genbuf[16];
	char		  *devices = malloc((size_t) n * 37 + 3), *d;
	const char	  *vals[4] = {sincebuf, rowsbuf, genbuf, devices};
	PGresult	  *p;
	stmt		   q;
	bool		   ok;
	const char	  *served;
	pull_share	  *share = NULL;
	int64_t		   until;
	int			   nserved = 0;

	if (!devices)
		return srv_fail(e, 500, "internal error", NULL, "Out of memory.");
	/* '{uuid,uuid,...}': site ids were checked to be UUIDs (http.c) */
	d = devices;
	*d++ = '{';
	for (int i = 0; i < n; i++)
	{
		memcpy(d, jobs[i]->exclude, 36);
		d += 36;
		*d++ = i + 1 < n ? ',' : '}';
	}
	*d = '\0';
	snprintf(sincebuf, sizeof sincebuf, "%lld", (long long) lead->since);
	snprintf(rowsbuf, sizeof rowsbuf, "%u", lead->max_rows);
	snprintf(genbuf, sizeof genbuf, "%d", (int) lead->gen);
	q = (stmt){.sql = "SELECT payload, until, translate(served::text, '{},', '') FROM "
					  "sync_pull_group($1::bigint, $2::int, $3::int, $4::uuid[])",
			   .what = "sync_pull_group",
			   .nparams = 4,
			   .vals = vals,
			   .binary = 1,
			   .prep = PREP_PULL_GROUP};
	ok = in_transaction(conn, lead->auth, lead->exclude, true, &q, 1, &p, broken, retry, e);
	free(devices);
	if (!ok)
		return false;
	if (PQntuples(p) != 1 || PQgetlength(p, 0, 1) != 8 || PQgetlength(p, 0, 2) != n)
	{
		PQclear(p);
		return srv_fail(e, 500, "internal error", NULL,
						"sync_pull_group returned an unexpected result.");
	}
	until = be64(PQgetvalue(p, 0, 1));
	served = PQgetvalue(p, 0, 2);
	if (!PQgetisnull(p, 0, 0) && !(share = share_of(p, until, lead->gen)))
	{
		PQclear(p);
		return srv_fail(e, 500, "internal error", NULL, "Out of memory.");
	}
	for (int i = 0; i < n; i++)
	{
		done[i] = served[i] == 't';
		if (!done[i])
			continue;
		nserved++;
		jobs[i]->since = until;
		jobs[i]->shared = true;
		if (share)
		{
			if (nserved > 1)
				atomic_fetch_add(&share->refs, 1);
			jobs[i]->pull = share;
		}
	}
	if (!share)
		PQclear(p);
	else if (nserved == 0)
		pull_share_unref(share);
	if (nserved)
		metrics_pull_computed(lead->db, nserved);
	return true;
}

bool
pull_group(srv_db *db, srv_job **jobs, int n, bool *done, srv_error *e)
{
	static _Atomic bool warned;

	memset(done, 0, (size_t) n * sizeof *done);
	if (!jobs[0]->exclude)
	{
		/* no device: the inputs are identical, so is the answer */
		srv_job *lead = jobs[0];

		if (!pull_one(lead, e))
			return false;
		done[0] = true;
		for (int i = 1; i < n; i++)
		{
			jobs[i]->since = lead->since;
			jobs[i]->gen = lead->gen;
			jobs[i]->shared = true;
			if ((jobs[i]->pull = lead->pull) != NULL)
				atomic_fetch_add(&lead->pull->refs, 1);
			done[i] = true;
		}
		lead->shared = n > 1;
		metrics_pull_computed(db, n);
		return true;
	}
	if (atomic_load(&db->no_group))
		return true; /* each pulls alone */
	for (int attempt = 0; attempt < 4; attempt++)
	{
		PGconn *conn = pool_acquire(db, e);
		bool	broken = false, retry = false, ok;

		if (!conn)
			return false;
		ok = group_once(conn, jobs, n, done, &broken, &retry, e);
		pool_release(db, conn, broken);
		if (ok)
			return true;
		if (e->status == 500 && strstr(e->detail, "sync_pull_group") &&
			strstr(e->detail, "does not exist"))
		{
			/* an older pgsync extension: pull one by one */
			atomic_store(&db->no_group, true);
			if (!atomic_exchange(&warned, true))
				srv_log("WARNING",
						"database %s: the pgsync extension has no sync_pull_group(); run ALTER "
						"EXTENSION pgsync UPDATE so that one push to many waiting devices is "
						"pulled once",
						db->name);
			return true;
		}
		if (!(broken && attempt == 0) && !retry)
			return false;
	}
	return false;
}

bool
srv_health(srv_db *db)
{
	srv_error e;
	PGconn	 *c = pool_acquire(db, &e);
	PGresult *res;
	bool	  ok;

	if (!c)
		return false;
	res = PQexec(c, "SELECT 1");
	ok = PQresultStatus(res) == PGRES_TUPLES_OK;
	PQclear(res);
	pool_release(db, c, !ok);
	return ok;
}

/* ---- rows a device lacks ------------------------------------------------- */

static bool
rows_once(PGconn *conn, const auth_info *a, const char *device, const char *json, size_t len,
		  pull_share **out, bool *broken, bool *retry, srv_error *e)
{
	char	   *body = strndup(json, len);
	const char *vals[1] = {body};
	PGresult   *p;
	stmt		q;
	bool		ok;

	if (!body)
		return srv_fail(e, 500, "internal error", NULL, "Out of memory.");
	q = (stmt){.sql = "SELECT sync_rows($1::jsonb)",
			   .what = "sync_rows",
			   .nparams = 1,
			   .vals = vals,
			   .binary = 1,
			   .prep = PREP_ROWS};
	ok = in_transaction(conn, a, device, true, &q, 1, &p, broken, retry, e);
	free(body);
	if (!ok)
		return false;
	if (PQntuples(p) != 1 || PQgetisnull(p, 0, 0))
	{
		PQclear(p);
		return srv_fail(e, 500, "internal error", NULL, "sync_rows returned no payload.");
	}
	if (!(*out = share_of(p, 0, 0)))
	{
		PQclear(p);
		return srv_fail(e, 500, "internal error", NULL, "Out of memory.");
	}
	return true;
}

bool
pull_rows(srv_db *db, const auth_info *a, const char *device, const char *json, size_t len,
		  pull_share **out, srv_error *e)
{
	*out = NULL;
	for (int attempt = 0; attempt < 4; attempt++)
	{
		PGconn *conn = pool_acquire(db, e);
		bool	broken = false, retry = false, ok;

		if (!conn)
			return false;
		ok = rows_once(conn, a, device, json, len, out, &broken, &retry, e);
		pool_release(db, conn, broken);
		if (ok)
			return true;
		pull_share_unref(*out);
		*out = NULL;
		if (!(broken && attempt == 0) && !retry)
			return false;
	}
	return false;
}
