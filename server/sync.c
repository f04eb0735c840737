/*
 * sync.c — the Postgres side of push and pull.
 *
 * Push, 3 round trips, role and claims first so that RLS judges every row:
 *   BEGIN; SET LOCAL ROLE "r"; SELECT set_config('request.jwt.claims', c, true);
 *   SELECT sync_apply_payload($1);
 *   SELECT sync_db_version(), <sync_rejections() as JSON>,
 *          pg_notify('pgsync_changes', pg_current_xact_id()::text);  -- if anything won
 *   COMMIT;
 * Pull, 1 round trip when nothing is new (autocommit, as the server's login
 * role, to which sync_payload is granted; it reads every synced row):
 *   SELECT s.v, sync_payload($since[, $exclude])
 *     FROM (SELECT sync_db_version() AS v OFFSET 0) s;
 * then filter.c drops the rows the token's role may not SELECT.
 *
 * The cursor of an empty pull is the safe version read *before* the payload
 * was built (the OFFSET 0 fence orders the two): the payload would have held
 * every change up to it, so nothing is skipped. A since above the safe
 * version means the database was replaced or restored (409). Every request
 * is idempotent, so a connection that broke under us is retried once on a
 * fresh connection, serialization failures and deadlocks up to 3 times.
 */
#include "server.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "filter.h"

static pthread_mutex_t site_mu = PTHREAD_MUTEX_INITIALIZER;
static char			   server_site[37];

const char *
sync_server_site(void)
{
	static __thread char copy[37];

	pthread_mutex_lock(&site_mu);
	memcpy(copy, server_site, sizeof copy);
	pthread_mutex_unlock(&site_mu);
	return copy;
}

void
sync_learn_site(PGconn *conn)
{
	PGresult *r;

	pthread_mutex_lock(&site_mu);
	if (server_site[0])
	{
		pthread_mutex_unlock(&site_mu);
		return;
	}
	pthread_mutex_unlock(&site_mu);
	r = PQexec(conn, "SELECT sync_site_id()::text");
	if (PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1 && PQgetlength(r, 0, 0) == 36)
	{
		pthread_mutex_lock(&site_mu);
		memcpy(server_site, PQgetvalue(r, 0, 0), 36);
		server_site[36] = '\0';
		pthread_mutex_unlock(&site_mu);
	}
	else
		srv_log("WARNING", "cannot read sync_site_id(): %s", PQresultErrorMessage(r));
	PQclear(r);
}

static bool
sqlstate_is(const char *s, const char *prefix)
{
	return s && strncmp(s, prefix, strlen(prefix)) == 0;
}

/*
 * sync_pg_error maps a failed statement to an HTTP error. Returns true when
 * the connection is gone (the caller retries on another one).
 */
bool
sync_pg_error(PGconn *conn, const PGresult *res, const char *what, srv_error *e)
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
	if (sqlstate_is(st, "22P03") || sqlstate_is(st, "0A000") || sqlstate_is(st, "22023") ||
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
	else if (sqlstate_is(st, "42501") && strcmp(what, "sync_payload") == 0)
		srv_fail(e, 500, "server may not read changes",
				 "The administrator must GRANT EXECUTE ON FUNCTION sync_payload(bigint, uuid) "
				 "and sync_payload(bigint, uuid, integer, bytea) to the server's login role.",
				 "%s", d);
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
	return st && (strcmp(st, "40001") == 0 || strcmp(st, "40P01") == 0);
}

/* exec_ok runs sql, expects tuples or a command; maps errors into e. */
static PGresult *
checked(PGconn *conn, PGresult *r, const char *what, bool *broken, bool *retry, srv_error *e)
{
	ExecStatusType s = PQresultStatus(r);

	if (s == PGRES_TUPLES_OK || s == PGRES_COMMAND_OK)
		return r;
	*broken = sync_pg_error(conn, r, what, e);
	*retry = retryable(e, r);
	PQclear(r);
	return NULL;
}

/*
 * sync_begin_as opens a transaction as the token's role with its claims, in one
 * round trip: BEGIN; SET LOCAL ROLE "r"; SELECT set_config(...).
 */
bool
sync_begin_as(PGconn *conn, const auth_info *a, bool *broken, bool *retry, srv_error *e)
{
	char *role = PQescapeIdentifier(conn, a->role, strlen(a->role));
	char *claims =
		PQescapeLiteral(conn, a->claims ? a->claims : "{}", strlen(a->claims ? a->claims : "{}"));
	char	 *sql;
	PGresult *r;
	bool	  ok = false;

	if (!role || !claims ||
		asprintf(&sql,
				 "BEGIN; SET LOCAL ROLE %s; SELECT set_config('request.jwt.claims', %s, true)",
				 role, claims) < 0)
	{
		PQfreemem(role);
		PQfreemem(claims);
		srv_fail(e, 500, "internal error", NULL, "Out of memory preparing the request.");
		return false;
	}
	r = PQexec(conn, sql);
	free(sql);
	if (PQresultStatus(r) == PGRES_TUPLES_OK)
		ok = true;
	else
	{
		const char *st = PQresultErrorField(r, PG_DIAG_SQLSTATE);

		*broken = sync_pg_error(conn, r, "SET ROLE", e);
		if (!*broken && st &&
			(strcmp(st, "42501") == 0 || strcmp(st, "22023") == 0 || strcmp(st, "42704") == 0))
			srv_fail(
				e, 500, "server cannot act as the token's role",
				"The administrator must create the role and GRANT it to the server's login role.",
				"SET ROLE %s failed: %s", role, PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY));
		*retry = false;
	}
	PQclear(r);
	PQfreemem(role);
	PQfreemem(claims);
	return ok;
}

/*
 * exec_multi sends several statements in one round trip (simple protocol)
 * and returns the result of statement `keep` (0-based); every other result
 * is checked and freed. NULL with e filled on any failure.
 */
static PGresult *
exec_multi(PGconn *conn, const char *sql, int keep, const char *what, bool *broken, bool *retry,
		   srv_error *e)
{
	PGresult *r, *kept = NULL, *bad = NULL;
	int		  i = 0;

	if (!PQsendQuery(conn, sql))
	{
		*broken = sync_pg_error(conn, NULL, what, e);
		return NULL;
	}
	while ((r = PQgetResult(conn)) != NULL)
	{
		ExecStatusType st = PQresultStatus(r);

		if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK && !bad)
			bad = r;
		else if (i == keep && !bad)
			kept = r;
		else
			PQclear(r);
		i++;
	}
	if (bad || !kept)
	{
		*broken = sync_pg_error(conn, bad, what, e);
		*retry = retryable(e, bad);
		PQclear(bad);
		PQclear(kept);
		return NULL;
	}
	return kept;
}

static int64_t
le64(const uint8_t *p)
{
	uint64_t v = 0;

	for (int i = 7; i >= 0; i--)
		v = (v << 8) | p[i];
	return (int64_t) v;
}

/* ---- push ---------------------------------------------------------------- */

static bool
push_once(PGconn *conn, const auth_info *a, const uint8_t *body, size_t len, push_result *out,
		  bool *broken, bool *retry, srv_error *e)
{
	const char *vals[1] = {(const char *) body};
	int			lens[1] = {(int) len};
	int			fmts[1] = {1};
	PGresult   *r;
	char		sql[640];

	/* 3 round trips: begin as the role; apply; report + notify + commit */
	if (!sync_begin_as(conn, a, broken, retry, e))
		return false;
	r = checked(
		conn,
		PQexecParams(conn, "SELECT sync_apply_payload($1::bytea)", 1, NULL, vals, lens, fmts, 0),
		"sync_apply_payload", broken, retry, e);
	if (!r)
		return false;
	if (PQntuples(r) != 1 || PQgetisnull(r, 0, 0))
	{
		PQclear(r);
		return srv_fail(e, 500, "internal error", NULL, "sync_apply_payload returned no count.");
	}
	out->applied = strtoll(PQgetvalue(r, 0, 0), NULL, 10);
	PQclear(r);
	snprintf(sql, sizeof sql,
			 "SELECT v, j, json_array_length(j), %s FROM (SELECT sync_db_version() AS v, "
			 "(SELECT coalesce(json_agg(json_build_object('table', x.table_name, 'pk', x.pk, "
			 "'code', x.sqlstate, 'message', x.message)), '[]') FROM sync_rejections() x) AS j) s; "
			 "COMMIT",
			 out->applied > 0 ? "pg_notify('" SRV_NOTIFY_CHANNEL "', pg_current_xact_id()::text)"
							  : "NULL");
	if (!(r = exec_multi(conn, sql, 0, "sync_rejections", broken, retry, e)))
		return false;
	if (PQntuples(r) != 1 || PQnfields(r) < 3)
	{
		PQclear(r);
		return srv_fail(e, 500, "internal error", NULL,
						"Reading sync_rejections() returned no row.");
	}
	out->server_version = strtoll(PQgetvalue(r, 0, 0), NULL, 10);
	out->nrejected = strtoll(PQgetvalue(r, 0, 2), NULL, 10);
	free(out->rejected_json);
	out->rejected_json = strdup(PQgetvalue(r, 0, 1));
	PQclear(r);
	return out->rejected_json != NULL ||
		   srv_fail(e, 500, "internal error", NULL, "Out of memory building the response.");
}

bool
sync_push(const auth_info *a, const uint8_t *body, size_t len, push_result *out, srv_error *e)
{
	memset(out, 0, sizeof *out);
	for (int attempt = 0; attempt < 4; attempt++)
	{
		PGconn *conn = pool_acquire(e);
		bool	broken = false, retry = false, ok;

		if (!conn)
			return false;
		ok = push_once(conn, a, body, len, out, &broken, &retry, e);
		pool_release(conn, broken);
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
 * pull_once: one round trip when nothing is new. The safe version is read
 * in a subquery fenced with OFFSET 0, so it is evaluated before the payload
 * is built (the cursor of an empty pull must not pass anything unbuilt).
 */
static bool
pull_once(PGconn *conn, const auth_info *a, int64_t since, const char *exclude, uint32_t max_rows,
		  const char *token_hex, pull_result *out, bool *broken, bool *retry, srv_error *e)
{
	char		sincebuf[24], rowsbuf[16];
	char	   *tokbuf = NULL;
	const char *vals[4] = {sincebuf, exclude, rowsbuf, NULL};
	PGresult   *r, *p;
	int64_t		safe;
	bool		chunked = max_rows > 0 || token_hex;

	snprintf(sincebuf, sizeof sincebuf, "%lld", (long long) since);
	snprintf(rowsbuf, sizeof rowsbuf, "%u", max_rows);
	if (token_hex)
	{
		/* bytea input in hex form; sync_payload validates the token */
		if (asprintf(&tokbuf, "\\x%s", token_hex) < 0)
			return srv_fail(e, 500, "internal error", NULL, "Out of memory.");
		vals[3] = tokbuf;
	}
	if (chunked)
		/* one chunk and the cursor of the next one (NULL after the last) */
		p = checked(conn,
					PQexecParams(conn,
								 "SELECT s.v, q.p, sync_payload_cursor(q.p) FROM "
								 "(SELECT sync_db_version() AS v OFFSET 0) s, LATERAL "
								 "(SELECT sync_payload($1::bigint, $2::uuid, $3::int, $4::bytea) "
								 "AS p OFFSET 0) q",
								 4, NULL, vals, NULL, NULL, 1),
					"sync_payload", broken, retry, e);
	else
		p = checked(conn,
					PQexecParams(conn,
								 exclude ? "SELECT s.v, sync_payload($1::bigint, $2::uuid) FROM "
										   "(SELECT sync_db_version() AS v OFFSET 0) s"
										 : "SELECT s.v, sync_payload($1::bigint) FROM (SELECT "
										   "sync_db_version() AS v OFFSET 0) s",
								 exclude ? 2 : 1, NULL, vals, NULL, NULL, 1),
					"sync_payload", broken, retry, e);
	free(tokbuf);
	if (!p)
		return false;
	if (PQntuples(p) != 1 || PQgetlength(p, 0, 0) != 8)
	{
		PQclear(p);
		return srv_fail(e, 500, "internal error", NULL,
						"sync_db_version() returned an unexpected result.");
	}
	safe = be64(PQgetvalue(p, 0, 0));
	if (since > safe)
	{
		PQclear(p);
		return srv_fail(e, 409, "cursor ahead of server",
						"The server's database was replaced or restored from a backup: pull again "
						"from 0 and send everything.",
						"since=%lld is newer than anything this database has handed out (%lld).",
						(long long) since, (long long) safe);
	}
	out->cursor = safe > since ? safe : since;
	if (PQgetisnull(p, 0, 1))
	{
		PQclear(p);
		return true;
	}
	{
		const uint8_t *b = (const uint8_t *) PQgetvalue(p, 0, 1);
		size_t		   n = (size_t) PQgetlength(p, 0, 1);

		if (n < 56 || memcmp(b, "PGSY", 4) != 0)
		{
			PQclear(p);
			return srv_fail(e, 500, "internal error", NULL,
							"sync_payload returned %zu bytes that are not a payload.", n);
		}
		out->cursor = le64(b + 32);
		out->res = p;
		out->payload = b;
		out->len = n;
		if (chunked && !PQgetisnull(p, 0, 2))
		{
			const uint8_t	 *t = (const uint8_t *) PQgetvalue(p, 0, 2);
			size_t			  tn = (size_t) PQgetlength(p, 0, 2);
			static const char hx[] = "0123456789abcdef";

			if (tn == 0 || tn > SRV_MAX_TOKEN)
				return srv_fail(e, 500, "internal error",
								"Use shorter primary keys, or pull without max_rows.",
								"A continuation token of %zu bytes does not fit in a cursor.", tn);
			if (!(out->more = malloc(2 * tn + 2)))
				return srv_fail(e, 500, "internal error", NULL, "Out of memory.");
			out->more[0] = 'c';
			for (size_t i = 0; i < tn; i++)
			{
				out->more[1 + 2 * i] = hx[t[i] >> 4];
				out->more[2 + 2 * i] = hx[t[i] & 15];
			}
			out->more[1 + 2 * tn] = '\0';
		}
	}
	if (cfg.pull_filter)
	{
		filter_result f;

		if (!filter_payload(conn, a, out->payload, out->len, &f, broken, e))
			return false;
		if (f.changed)
		{
			PQclear(out->res);
			out->res = NULL;
			out->owned = f.payload;
			out->payload = f.payload;
			out->len = f.len;
		}
		if (f.in_txn)
		{
			if (!(r = checked(conn, PQexec(conn, "COMMIT"), "COMMIT", broken, retry, e)))
				return false;
			PQclear(r);
		}
	}
	return true;
}

void
pull_result_free(pull_result *r)
{
	PQclear(r->res);
	free(r->owned);
	free(r->more);
	memset(r, 0, sizeof *r);
}

bool
sync_pull(const auth_info *a, int64_t since, const char *exclude, uint32_t max_rows,
		  const char *token_hex, pull_result *out, srv_error *e)
{
	memset(out, 0, sizeof *out);
	for (int attempt = 0; attempt < 4; attempt++)
	{
		PGconn *conn = pool_acquire(e);
		bool	broken = false, retry = false, ok;

		if (!conn)
			return false;
		ok = pull_once(conn, a, since, exclude, max_rows, token_hex, out, &broken, &retry, e);
		pool_release(conn, broken);
		if (ok)
			return true;
		pull_result_free(out);
		if (!(broken && attempt == 0) && !retry)
			return false;
	}
	return false;
}
