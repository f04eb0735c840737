/*
 * http.c — the libmicrohttpd side: routes, request bodies, limits, and the
 * JSON error responses of docs/PROTOCOL.md.
 *
 * libmicrohttpd runs an epoll thread pool; each thread serves many
 * connections, so a handler here never waits for Postgres: a request that
 * needs its database suspends its connection and becomes a job of that
 * database's workers (work.c), which resume it once the answer is in; the
 * handler then runs again and sends it. A long-poll that finds nothing new
 * stays suspended, parked in the hub (hub.c): it costs a socket and a few
 * hundred bytes, no thread.
 *
 * Which database: /db/NAME/v1/... names it in the path; /v1/... takes the
 * database named by the token's database_claim, or the only one. When
 * database_claim is set, every token must carry it and it must name the
 * request's database (403 otherwise), so a token of one tenant never opens
 * another's, whatever the path says. /healthz is the server's (and, with
 * one database, that database's); /db/NAME/healthz is the database's.
 *
 * Order of checks for /v1 routes, before any body is read: database (404),
 * route and method (404/405), token (401/403), rate limit (429), declared
 * body size (413). A chunked body that grows past max_body is discarded and answered
 * with 413 at its end (libmicrohttpd only lets a response be queued before
 * or after the upload), or the connection is cut past 4 x max_body.
 */
#include "server.h"

#include "../core/pgsync.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <microhttpd.h>

typedef struct req
{
	srv_endpoint ep;
	srv_db		*db;		/* NULL until known (several databases) */
	bool		 submitted; /* job handed to the workers */
	srv_job		 job;
	int64_t		 t0_us;
	int			 status;
	bool		 ready; /* checks done, body may follow */
	auth_info	 auth;
	uint8_t		*body;
	size_t		 len;
	size_t		 cap;
	size_t		 discarded;
	bool		 too_big;
	int64_t		 since;
	int32_t		 gen;	 /* generation of the device's view, from the cursor */
	uint8_t		*sealed; /* chunked pull: the sealed token of a chunk cursor (malloc) */
	size_t		 sealed_len;
	uint32_t	 max_rows; /* chunked pull: rows per chunk, 0 = one payload */
	char		 exclude[37];
	bool		 has_exclude;
	int64_t		 deadline;	 /* long-poll end, srv_now_ms(); 0 = no wait */
	char		 method[12]; /* for the request log line */
	char		 path[160];
	char		 error[160]; /* the error answered, if any, and its detail */
	char		 detail[640];
	ws_ticket	 ws; /* GET /v1/ws: what the upgraded socket takes (ws.c) */
} req;

static struct MHD_Daemon *daemon_;

static int64_t
now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t) ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* ---- responses ------------------------------------------------------------ */

static enum MHD_Result
queue(struct MHD_Connection *conn, req *r, int status, struct MHD_Response *resp)
{
	enum MHD_Result ret;

	if (!resp)
		return MHD_NO;
	MHD_add_response_header(resp, "X-Pgsync-Protocol", SRV_PROTOCOL);
	MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
	ret = MHD_queue_response(conn, (unsigned) status, resp);
	MHD_destroy_response(resp);
	r->status = status;
	return ret;
}

static enum MHD_Result
send_json(struct MHD_Connection *conn, req *r, int status, char *json)
{
	struct MHD_Response *resp;

	if (!json)
		return MHD_NO;
	resp = MHD_create_response_from_buffer(strlen(json), json, MHD_RESPMEM_MUST_FREE);
	if (!resp)
	{
		free(json);
		return MHD_NO;
	}
	MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
	return queue(conn, r, status, resp);
}

static enum MHD_Result
send_error(struct MHD_Connection *conn, req *r, const srv_error *e)
{
	cJSON				*j = cJSON_CreateObject();
	char				*text;
	struct MHD_Response *resp;
	char				 ra[16];

	cJSON_AddStringToObject(j, "error", e->error);
	cJSON_AddStringToObject(j, "detail", e->detail);
	cJSON_AddStringToObject(j, "hint", e->hint);
	snprintf(r->error, sizeof r->error, "%s", e->error);
	snprintf(r->detail, sizeof r->detail, "%s", e->detail);
	text = cJSON_PrintUnformatted(j);
	cJSON_Delete(j);
	if (!text)
		return MHD_NO;
	resp = MHD_create_response_from_buffer(strlen(text), text, MHD_RESPMEM_MUST_COPY);
	cJSON_free(text);
	if (!resp)
		return MHD_NO;
	MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
	if (e->retry_after > 0)
	{
		snprintf(ra, sizeof ra, "%d", e->retry_after);
		MHD_add_response_header(resp, MHD_HTTP_HEADER_RETRY_AFTER, ra);
	}
	if (e->status == 401)
		MHD_add_response_header(resp, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer realm=\"pgsync\"");
	if (e->status == 426)
		MHD_add_response_header(resp, "Sec-WebSocket-Version", "13");
	if (e->status == 405)
		MHD_add_response_header(resp, MHD_HTTP_HEADER_ALLOW,
								r->ep == EP_PUSH || r->ep == EP_ROWS ? "POST" : "GET");
	if (e->status == 413)
		MHD_add_response_header(resp, MHD_HTTP_HEADER_CONNECTION, "close");
	return queue(conn, r, e->status, resp);
}

static enum MHD_Result fail(struct MHD_Connection *conn, req *r, int status, const char *error,
							const char *hint, const char *fmt, ...)
	__attribute__((format(printf, 6, 7)));

static enum MHD_Result
fail(struct MHD_Connection *conn, req *r, int status, const char *error, const char *hint,
	 const char *fmt, ...)
{
	srv_error e;
	va_list	  ap;

	srv_fail(&e, status, error, hint, NULL);
	if (fmt)
	{
		va_start(ap, fmt);
		vsnprintf(e.detail, sizeof e.detail, fmt, ap);
		va_end(ap);
	}
	return send_error(conn, r, &e);
}

static void
add_site(srv_db *db, struct MHD_Response *resp)
{
	char site[37];

	pool_server_site(db, site);
	if (site[0])
		MHD_add_response_header(resp, "X-Pgsync-Site", site);
}

static void
free_share(void *cls)
{
	pull_share_unref(cls);
}

/*
 * send_cursor answers a pull: 200 with the payload of p (its reference
 * passes to the response), or 204 with cursor and gen when p is NULL.
 */
static enum MHD_Result
send_cursor(struct MHD_Connection *conn, req *r, int64_t cursor, int32_t gen, pull_share *p)
{
	struct MHD_Response *resp;
	char				 num[48];
	pgs_buf				 text;

	if (p)
	{
		cursor = p->cursor;
		gen = p->gen;
	}
	pgs_buf_init(&text);
	pgs_cursor_format(&text, cursor, gen, NULL, 0);
	snprintf(num, sizeof num, "%s", text.p ? (const char *) text.p : "0");
	pgs_buf_free(&text);
	if (p)
	{
		metrics_bytes(r->db, 0, p->len);
		resp = MHD_create_response_from_buffer_with_free_callback_cls(p->len, (void *) p->payload,
																	  free_share, p);
		if (!resp)
		{
			pull_share_unref(p);
			return MHD_NO;
		}
		MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/octet-stream");
	}
	else
		resp = MHD_create_response_from_buffer(0, (void *) "", MHD_RESPMEM_PERSISTENT);
	if (!resp)
		return MHD_NO;
	MHD_add_response_header(resp, "X-Pgsync-Cursor", p && p->more ? p->more : num);
	MHD_add_response_header(resp, "X-Pgsync-More", p && p->more ? "1" : "0");
	if (p && p->rows_total >= 0)
	{
		char total[24];

		snprintf(total, sizeof total, "%lld", (long long) p->rows_total);
		MHD_add_response_header(resp, "X-Pgsync-Rows-Total", total);
	}
	add_site(r->db, resp);
	return queue(conn, r, p ? 200 : 204, resp);
}

/* ---- request checks ------------------------------------------------------- */

static void
client_addr(struct MHD_Connection *conn, char *out, size_t n)
{
	const union MHD_ConnectionInfo *ci =
		MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);

	snprintf(out, n, "ip:?");
	if (!ci || !ci->client_addr)
		return;
	if (ci->client_addr->sa_family == AF_INET)
		inet_ntop(AF_INET, &((const struct sockaddr_in *) ci->client_addr)->sin_addr, out + 3,
				  (socklen_t) (n - 3));
	else if (ci->client_addr->sa_family == AF_INET6)
		inet_ntop(AF_INET6, &((const struct sockaddr_in6 *) ci->client_addr)->sin6_addr, out + 3,
				  (socklen_t) (n - 3));
}

/* databases_list: "a, b, c" for messages. */
static void
databases_list(char *out, size_t n)
{
	size_t len = 0;

	out[0] = '\0';
	for (int i = 0; i < cfg.ndbs && len + 1 < n; i++)
		len += (size_t) snprintf(out + len, n - len, "%s%s", i ? ", " : "", cfg.dbs[i].name);
}

/*
 * pick_db: the request's database when the path did not name it: the one
 * the token's database_claim names (read before verification only to pick
 * the key that verifies it), or the only one. False with e.
 */
static bool
pick_db(req *r, const char *token, srv_error *e)
{
	char name[SRV_DBNAME_MAX + 1], list[512];

	if (r->db)
		return true;
	if (cfg.database_claim && token &&
		auth_peek_claim(token, cfg.database_claim, name, sizeof name))
	{
		if (!(r->db = db_find(name, strlen(name))))
			return srv_fail(e, 403, "unknown database",
							"Ask your identity provider for a token of a database this server "
							"fronts.",
							"The token's %s claim names \"%.64s\", which is not a database of "
							"this server.",
							cfg.database_claim, name);
		return true;
	}
	if (cfg.ndbs == 1)
	{
		r->db = &cfg.dbs[0];
		return true;
	}
	databases_list(list, sizeof list);
	if (cfg.database_claim)
		return srv_fail(e, 403, "token names no database",
						"Use a token with the database claim, or a url /db/NAME/...",
						"This server fronts several databases (%s) and the token has no \"%s\" "
						"claim.",
						list, cfg.database_claim);
	return srv_fail(e, 404, "which database?", "Use a url /db/NAME/... (docs/SERVER.md).",
					"This server fronts several databases: %s.", list);
}

/* authorize: database, token, then rate limit; false with the response queued. */
static bool
authorize(struct MHD_Connection *conn, req *r, enum MHD_Result *ret)
{
	const char *h =
		MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
	const char *token = NULL;
	srv_error	e;
	int			retry;
	char		ip[64];
	srv_db	   *limit_db;

	if (h && strncasecmp(h, "Bearer ", 7) == 0)
		for (token = h + 7; *token == ' '; token++)
			;
	else if (!h && r->ep == EP_WS)
		token = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "access_token");
	if (h && !token)
		srv_fail(&e, 401, "invalid token", "Send Authorization: Bearer <token>.",
				 "The Authorization header does not use the Bearer scheme.");
	else if (!token)
		srv_fail(
			&e, 401, "missing token",
			"Send Authorization: Bearer <token> with a token signed by your identity provider.",
			"The request has no bearer token.");
	else if (pick_db(r, token, &e) && auth_check(r->db, token, &r->auth, &e))
	{
		char *claim = cfg.database_claim ? auth_claim_string(&r->auth, cfg.database_claim) : NULL;
		bool  ok = true;

		if (cfg.database_claim && !claim)
			ok = srv_fail(&e, 403, "token names no database",
						  "Use a token with the database claim of the database it is for.",
						  "The token has no \"%s\" claim.", cfg.database_claim);
		else if (claim && strcmp(claim, r->db->name) != 0)
			ok = srv_fail(&e, 403, "token is for another database",
						  "Use a token issued for this database.",
						  "The token's %s claim names \"%.64s\"; this request is for database "
						  "\"%s\".",
						  cfg.database_claim, claim, r->db->name);
		free(claim);
		if (ok)
		{
			if (!ratelimit_take(r->db, r->auth.subject, &retry))
				goto limited;
			return true;
		}
		r->auth.role[0] = '\0'; /* not acting as it: keep it out of the log line */
	}
	client_addr(conn, ip, sizeof ip);
	limit_db = r->db ? r->db : &cfg.dbs[0];
	if (!ratelimit_take(limit_db, ip, &retry))
		goto limited;
	*ret = send_error(conn, r, &e);
	return false;
limited:
	limit_db = r->db ? r->db : &cfg.dbs[0];
	metrics_rate_limited(r->db);
	srv_fail(&e, 429, "rate limit exceeded", "Slow down and retry after the delay in Retry-After.",
			 "This client may make %g requests per second (burst %d).", limit_db->c.rate_limit,
			 limit_db->c.rate_burst);
	e.retry_after = retry;
	*ret = send_error(conn, r, &e);
	return false;
}

static bool
valid_uuid(const char *s)
{
	if (strlen(s) != 36)
		return false;
	for (int i = 0; i < 36; i++)
	{
		bool dash = i == 8 || i == 13 || i == 18 || i == 23;

		if (dash ? s[i] != '-'
				 : !((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f') ||
					 (s[i] >= 'A' && s[i] <= 'F')))
			return false;
	}
	return true;
}

static bool
parse_int(const char *s, int64_t max, int64_t *out)
{
	int64_t v = 0;

	if (!s || !*s || strlen(s) > 19)
		return false;
	for (; *s; s++)
	{
		if (*s < '0' || *s > '9')
			return false;
		v = v * 10 + (*s - '0');
	}
	if (v > max)
		return false;
	*out = v;
	return true;
}

/* ---- handlers --------------------------------------------------------------- */

/* submit hands r's job to its database's workers; answers 503 when it cannot. */
static enum MHD_Result
submit(struct MHD_Connection *conn, req *r, job_kind kind)
{
	srv_error e;

	r->job.kind = kind;
	r->job.db = r->db;
	r->job.conn = conn;
	r->job.auth = &r->auth;
	if (!work_submit(&r->job, &e))
		return send_error(conn, r, &e);
	r->submitted = true;
	return MHD_YES; /* work.c resumes the connection: the handler runs again */
}

static enum MHD_Result
do_push(struct MHD_Connection *conn, req *r)
{
	if (r->too_big)
		return fail(conn, r, 413, "payload too large",
					"Sync more often so that each push is smaller.",
					"The body exceeds the server's limit of %zu bytes.", cfg.max_body);
	if (r->len == 0)
		return fail(conn, r, 400, "empty body",
					"Send the payload returned by sync_payload as the body.",
					"POST /v1/push needs a payload.");
	{
		/* header, lengths and checksum, before spending a Postgres round trip */
		pgs_header h;
		pgs_err	   perr;

		if (pgs_payload_header(r->body, r->len, &h, &perr) != PGS_OK)
			return fail(conn, r, 400, "malformed payload",
						"Send the bytes returned by sync_payload unchanged.", "%s%s%s", perr.msg,
						perr.detail[0] ? ": " : "", perr.detail);
	}
	metrics_bytes(r->db, r->len, 0);
	r->job.body = r->body;
	r->job.len = r->len;
	return submit(conn, r, JOB_PUSH);
}

static enum MHD_Result
push_answer(struct MHD_Connection *conn, req *r)
{
	push_result *pr = &r->job.push;
	char		*json;
	char		 site[37];

	metrics_changes(r->db, pr->applied, pr->nrejected);
	pool_server_site(r->db, site);
	if (asprintf(
			&json,
			"{\"applied\":%lld,\"rejected\":%s,\"server_version\":%lld,\"server_site\":\"%s\"}",
			(long long) pr->applied, pr->rejected_json, (long long) pr->server_version, site) < 0)
		json = NULL;
	return send_json(conn, r, 200, json);
}

/*
 * do_rows: POST /v1/rows?exclude=<site>, body {"rows": [{"table", "pk"}]}:
 * the rows a device lacks, whole, as the token's role may see them.
 */
static enum MHD_Result
do_rows(struct MHD_Connection *conn, req *r)
{
	const char *excl = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "exclude");
	cJSON	   *j, *rows;
	char	   *keys;

	if (r->too_big)
		return fail(conn, r, 413, "request too large", "Ask for fewer rows at a time.",
					"The body exceeds the server's limit of %zu bytes.", cfg.max_body);
	if (excl && *excl && !valid_uuid(excl))
		return fail(conn, r, 400, "bad site id", "Pass the client's sync_site_id().",
					"exclude=\"%.64s\" is not a UUID.", excl);
	j = cJSON_ParseWithLength((const char *) r->body, r->len);
	rows = cJSON_GetObjectItemCaseSensitive(j, "rows");
	if (!cJSON_IsArray(rows))
	{
		cJSON_Delete(j);
		return fail(conn, r, 400, "bad request",
					"Send {\"rows\": [{\"table\": ..., \"pk\": {...}}]} (docs/PROTOCOL.md).",
					"The body is not the JSON of POST /v1/rows.");
	}
	keys = cJSON_PrintUnformatted(rows);
	cJSON_Delete(j);
	if (!keys)
		return MHD_NO;
	/* the keys replace the body: the job reads them from there */
	free(r->body);
	r->body = (uint8_t *) strdup(keys);
	cJSON_free(keys);
	if (!r->body)
		return MHD_NO;
	r->len = strlen((const char *) r->body);
	if (excl && *excl)
	{
		memcpy(r->exclude, excl, 37);
		r->has_exclude = true;
	}
	r->job.body = r->body;
	r->job.len = r->len;
	r->job.exclude = r->has_exclude ? r->exclude : NULL;
	return submit(conn, r, JOB_ROWS);
}

/* do_pull pulls; work.c parks the request when nothing is new and it may wait. */
static enum MHD_Result
do_pull(struct MHD_Connection *conn, req *r)
{
	srv_job *j = &r->job;

	j->since = r->since;
	j->gen = r->gen;
	j->sealed = r->sealed;
	j->sealed_len = r->sealed_len;
	j->max_rows = r->max_rows;
	j->exclude = r->has_exclude ? r->exclude : NULL;
	j->deadline = r->deadline;
	return submit(conn, r, JOB_PULL);
}

/* answer sends the answer of a finished job. */
static enum MHD_Result
answer(struct MHD_Connection *conn, req *r)
{
	srv_job	   *j = &r->job;
	pull_share *p = j->pull;
	char	   *json;

	j->pull = NULL; /* passes to the response */
	if (j->failed)
	{
		pull_share_unref(p);
		return send_error(conn, r, &j->e);
	}
	switch (j->kind)
	{
		case JOB_PUSH:
			return push_answer(conn, r);
		case JOB_PULL:
			return send_cursor(conn, r, j->since, j->gen, p);
		case JOB_ROWS:
			return send_cursor(conn, r, 0, 0, p);
		case JOB_HEALTH:
		{
			char site[37];

			pool_server_site(r->db, site);
			if (asprintf(&json,
						 "{\"status\":\"%s\",\"postgres\":\"%s\",\"server_site\":\"%s\","
						 "\"version\":%lld,\"database\":\"%s\"}",
						 j->health_ok ? "ok" : "unavailable", j->health_ok ? "ok" : "down", site,
						 (long long) hub_version(r->db), r->db->name) < 0)
				return MHD_NO;
			return send_json(conn, r, j->health_ok ? 200 : 503, json);
		}
	}
	return MHD_NO;
}

/*
 * do_healthz: one database (the path's, or the only one): a query on it,
 * through its workers. The server with several databases: at once, from
 * what each database's pool and listener last saw; 200 while the process
 * serves, even when a database is down (a balancer must not take every
 * tenant away for one).
 */
static enum MHD_Result
do_healthz(struct MHD_Connection *conn, req *r)
{
	cJSON *j, *dbs;
	char  *text;
	bool   all = true;

	if (r->db || cfg.ndbs == 1)
	{
		if (!r->db)
			r->db = &cfg.dbs[0];
		return submit(conn, r, JOB_HEALTH);
	}
	j = cJSON_CreateObject();
	dbs = cJSON_AddObjectToObject(j, "databases");
	for (int i = 0; i < cfg.ndbs; i++)
	{
		bool   up = !pool_down(&cfg.dbs[i]) && hub_listening(&cfg.dbs[i]);
		cJSON *d = cJSON_AddObjectToObject(dbs, cfg.dbs[i].name);

		cJSON_AddStringToObject(d, "postgres", up ? "ok" : "down");
		cJSON_AddNumberToObject(d, "version", (double) hub_version(&cfg.dbs[i]));
		all &= up;
	}
	cJSON_AddStringToObject(j, "status", all ? "ok" : "degraded");
	text = cJSON_PrintUnformatted(j);
	cJSON_Delete(j);
	if (!text)
		return MHD_NO;
	{
		char *copy = strdup(text); /* send_json frees with free() */

		cJSON_free(text);
		return send_json(conn, r, 200, copy);
	}
}

static enum MHD_Result
do_metrics(struct MHD_Connection *conn, req *r)
{
	size_t				 len;
	srv_gauges			 g[SRV_MAX_DBS];
	char				*text;
	struct MHD_Response *resp;

	/* the gauges are read here, where every part is in reach (metrics.c
	 * only counts and prints) */
	for (int d = 0; d < cfg.ndbs; d++)
	{
		srv_db *db = &cfg.dbs[d];

		g[d].longpoll = hub_waiting(db);
		g[d].websocket = atomic_load(&db->ws_clients);
		pool_counts(db, &g[d].idle, &g[d].busy, &g[d].closed);
		g[d].queued = work_queued(db);
		g[d].version = hub_version(db);
	}
	text = metrics_render(g, &len);

	if (!text)
		return MHD_NO;
	resp = MHD_create_response_from_buffer(len, text, MHD_RESPMEM_MUST_FREE);
	if (!resp)
	{
		free(text);
		return MHD_NO;
	}
	MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/plain; version=0.0.4");
	return queue(conn, r, 200, resp);
}

/* route sets r->ep; 0 ok, 404 unknown, 405 wrong method. */
static int
route(req *r, const char *url, const char *method)
{
	static const struct
	{
		const char	*path;
		const char	*method;
		srv_endpoint ep;
	} routes[] = {
		{"/v1/push", "POST", EP_PUSH},	 {"/v1/pull", "GET", EP_PULL},
		{"/v1/ws", "GET", EP_WS},		 {"/v1/rows", "POST", EP_ROWS},
		{"/healthz", "GET", EP_HEALTHZ}, {"/metrics", "GET", EP_METRICS},
	};

	r->ep = EP_OTHER;
	for (size_t i = 0; i < sizeof routes / sizeof routes[0]; i++)
		if (strcmp(url, routes[i].path) == 0)
		{
			r->ep = routes[i].ep;
			if (strcmp(method, routes[i].method) == 0 ||
				(strcmp(method, "HEAD") == 0 && strcmp(routes[i].method, "GET") == 0))
				return 0;
			return 405;
		}
	return 404;
}

/* first_call runs every check that needs no body; false = answered. */
static bool
first_call(struct MHD_Connection *conn, req *r, const char *url, const char *method,
		   enum MHD_Result *ret)
{
	int rc;

	if (cfg.ndbs == 1)
		r->db = &cfg.dbs[0];
	if (strncmp(url, "/db/", 4) == 0)
	{
		/* /db/NAME/rest: the database named in the path */
		const char *name = url + 4, *slash = strchr(name, '/');
		srv_db	   *db = slash ? db_find(name, (size_t) (slash - name)) : NULL;

		if (!db)
		{
			char list[512];

			databases_list(list, sizeof list);
			r->db = NULL;
			*ret = fail(conn, r, 404, "unknown database",
						"Use /db/NAME/v1/... with one of the databases this server fronts.",
						"No database \"%.*s\" here; the databases are: %s.",
						(int) (slash ? slash - name : (long) strnlen(name, 64)), name, list);
			return false;
		}
		r->db = db;
		url = slash;
	}
	rc = route(r, url, method);
	if (rc == 404)
	{
		*ret = fail(conn, r, 404, "not found", "See docs/PROTOCOL.md for the routes.",
					"No route for %s %s.", method, r->path);
		return false;
	}
	if (rc == 405)
	{
		*ret = fail(conn, r, 405, "method not allowed", NULL, "%s is not allowed on %s.", method,
					r->path);
		return false;
	}
	if (r->ep == EP_HEALTHZ || r->ep == EP_METRICS)
		return true;
	if (!authorize(conn, r, ret))
		return false;
	if (r->ep == EP_PUSH || r->ep == EP_ROWS)
	{
		const char *cl =
			MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
		int64_t n;

		if (cl && parse_int(cl, INT64_MAX / 2, &n) && (uint64_t) n > cfg.max_body)
		{
			*ret = fail(conn, r, 413, "payload too large",
						"Sync more often so that each push is smaller.",
						"The body of %lld bytes exceeds the server's limit of %zu bytes.",
						(long long) n, cfg.max_body);
			return false;
		}
	}
	if (r->ep == EP_PULL)
	{
		const char *since = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "since");
		const char *excl = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "exclude");
		const char *wait = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "wait");
		int64_t		w = 0;

		const char *mr = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "max_rows");
		int64_t		mrv = r->db->c.pull_max_rows;

		r->since = 0;
		if (mr && (!parse_int(mr, SRV_MAX_ROWS, &mrv) || mrv < 1))
		{
			*ret = fail(conn, r, 400, "bad max_rows", "Pass a number of rows from 1 to 10000000.",
						"max_rows=\"%.64s\" is not a row count.", mr);
			return false;
		}
		r->max_rows = (uint32_t) mrv;
		if (since)
		{
			pgs_cursor c;
			uint8_t	  *buf = malloc(PGS_MAX_SEALED);

			if (!buf || !pgs_cursor_parse(since, &c, buf))
			{
				free(buf);
				*ret = fail(conn, r, 400, "bad cursor",
							"Pass back the X-Pgsync-Cursor of the last pull, or 0.",
							"since=\"%.64s\" is not a cursor this server handed out.", since);
				return false;
			}
			r->since = c.since;
			r->gen = c.gen;
			if (c.sealed)
			{
				r->sealed = buf;
				r->sealed_len = c.sealed_len;
				if (!r->max_rows)
					r->max_rows = SRV_CHUNK_ROWS_DEFAULT;
			}
			else
				free(buf);
		}
		if (excl && *excl)
		{
			if (!valid_uuid(excl))
			{
				*ret = fail(conn, r, 400, "bad site id", "Pass the client's sync_site_id().",
							"exclude=\"%.64s\" is not a UUID.", excl);
				return false;
			}
			memcpy(r->exclude, excl, 37);
			r->has_exclude = true;
		}
		if (wait && !parse_int(wait, INT64_MAX, &w))
		{
			*ret = fail(conn, r, 400, "bad wait", NULL,
						"wait=\"%.64s\" is not a number of milliseconds.", wait);
			return false;
		}
		if (w > cfg.max_wait_ms)
			w = cfg.max_wait_ms;
		if (w > 0)
		{
			r->ep = EP_LONGPOLL;
			r->deadline = srv_now_ms() + w;
		}
	}
	return true;
}

static enum MHD_Result
handler(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
		const char *version, const char *upload_data, size_t *upload_data_size, void **con_cls)
{
	req			   *r = *con_cls;
	enum MHD_Result ret = MHD_YES;

	(void) cls, (void) version;
	if (!r)
	{
		if (!(r = calloc(1, sizeof *r)))
			return MHD_NO;
		r->t0_us = now_us();
		snprintf(r->method, sizeof r->method, "%s", method);
		snprintf(r->path, sizeof r->path, "%s", url);
		*con_cls = r;
		if (!first_call(conn, r, url, method, &ret))
			return ret;
		r->ready = true;
		/*
		 * Work starts at the next call, once libmicrohttpd has read the whole
		 * request (a body, or none): an answer queued before that closes the
		 * connection (Connection: close), which a fan-out to many kept-alive
		 * clients pays for in teardown.
		 */
		if (r->ep != EP_WS && r->ep != EP_METRICS)
			return MHD_YES;
	}
	if (r->submitted)
	{
		/* resumed by work.c: the answer is in */
		if (r->job.state != JS_DONE)
			return MHD_YES;
		return answer(conn, r);
	}
	switch (r->ep)
	{
		case EP_PUSH:
		case EP_ROWS:
			if (*upload_data_size)
			{
				size_t n = *upload_data_size;

				*upload_data_size = 0;
				if (r->too_big || r->len + n > cfg.max_body)
				{
					r->too_big = true;
					r->discarded += n;
					return r->discarded > 4 * cfg.max_body ? MHD_NO : MHD_YES;
				}
				if (r->len + n > r->cap)
				{
					size_t	 cap = r->cap ? r->cap : 65536;
					uint8_t *b;

					while (cap < r->len + n)
						cap *= 2;
					if (cap > cfg.max_body)
						cap = cfg.max_body;
					if (!(b = realloc(r->body, cap)))
						return MHD_NO;
					r->body = b;
					r->cap = cap;
				}
				memcpy(r->body + r->len, upload_data, n);
				r->len += n;
				return MHD_YES;
			}
			return r->ep == EP_PUSH ? do_push(conn, r) : do_rows(conn, r);
		case EP_PULL:
		case EP_LONGPOLL:
			if (*upload_data_size)
			{
				*upload_data_size = 0; /* a GET with a body: ignore it */
				return MHD_YES;
			}
			return do_pull(conn, r);
		case EP_WS:
		{
			struct MHD_Response *resp = NULL;
			srv_error			 e;

			r->ws.db = r->db;
			r->ws.auth = &r->auth;
			if (!ws_upgrade(conn, &r->ws, &resp, &e))
				return send_error(conn, r, &e);
			return queue(conn, r, MHD_HTTP_SWITCHING_PROTOCOLS, resp);
		}
		case EP_HEALTHZ:
			return do_healthz(conn, r);
		case EP_METRICS:
			return do_metrics(conn, r);
		default:
			return MHD_NO;
	}
}

/* log_request writes the request's log line: what, for whom, how it ended and why. */
static void
log_request(struct MHD_Connection *conn, const req *r, enum MHD_RequestTerminationCode toe)
{
	char			ip[64];
	srv_request_log l = {
		.method = r->method,
		.path = r->path,
		.route = metrics_endpoint_name(r->ep),
		.status = r->status ? r->status : 499,
		.ms = (double) (now_us() - r->t0_us) / 1000.0,
		.role = r->auth.role,
		.database = r->db ? r->db->name : NULL,
		.client = ip + 3, /* after "ip:" */
		.error = r->error,
		.detail = r->detail,
		.closed_early = toe != MHD_REQUEST_TERMINATED_COMPLETED_OK,
	};

	client_addr(conn, ip, sizeof ip);
	srv_log_request(&l);
}

static void
completed(void *cls, struct MHD_Connection *conn, void **con_cls,
		  enum MHD_RequestTerminationCode toe)
{
	req *r = *con_cls;

	(void) cls, (void) conn;
	if (!r)
		return;
	metrics_request(r->db, r->ep, r->status ? r->status : 499, now_us() - r->t0_us);
	if (cfg.log_requests)
		log_request(conn, r, toe);
	pull_share_unref(r->job.pull);
	free(r->job.push.rejected_json);
	auth_free(&r->auth);
	free(r->body);
	free(r->sealed);
	free(r);
	*con_cls = NULL;
}

/* mhd_log: libmicrohttpd's messages, at most 10 a second (garbage input
 * must not flood the log). */
static void
mhd_log(void *cls, const char *fmt, va_list ap)
{
	static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
	static int64_t		   second;
	static int			   count;
	static int			   dropped;
	char				   msg[512];
	size_t				   n;
	int64_t				   now = srv_now_ms() / 1000;
	int					   skipped = 0;
	bool				   show;

	(void) cls;
	pthread_mutex_lock(&mu);
	if (now != second)
	{
		skipped = dropped;
		second = now;
		count = dropped = 0;
	}
	show = ++count <= 10;
	if (!show)
		dropped++;
	pthread_mutex_unlock(&mu);
	if (skipped)
		srv_log("LOG", "libmicrohttpd: %d more messages suppressed", skipped);
	if (!show)
		return;
	vsnprintf(msg, sizeof msg, fmt, ap);
	n = strlen(msg);
	while (n && msg[n - 1] == '\n')
		msg[--n] = '\0';
	srv_log("LOG", "libmicrohttpd: %s", msg);
}

bool
http_start(void)
{
	struct sockaddr_in6 a6;
	struct sockaddr_in	a4;
	struct sockaddr	   *sa;
	unsigned flags = MHD_USE_EPOLL_INTERNAL_THREAD | MHD_ALLOW_SUSPEND_RESUME | MHD_ALLOW_UPGRADE |
					 MHD_USE_ERROR_LOG;

	memset(&a4, 0, sizeof a4);
	memset(&a6, 0, sizeof a6);
	if (inet_pton(AF_INET, cfg.listen, &a4.sin_addr) == 1)
	{
		a4.sin_family = AF_INET;
		a4.sin_port = htons((uint16_t) cfg.port);
		sa = (struct sockaddr *) &a4;
	}
	else if (inet_pton(AF_INET6, cfg.listen, &a6.sin6_addr) == 1)
	{
		a6.sin6_family = AF_INET6;
		a6.sin6_port = htons((uint16_t) cfg.port);
		sa = (struct sockaddr *) &a6;
		flags |= MHD_USE_IPv6;
	}
	else
	{
		srv_log("FATAL", "listen = \"%s\" is not a numeric IPv4 or IPv6 address", cfg.listen);
		return false;
	}
	if (tls_enabled())
		flags |= MHD_USE_TLS; /* certificate, key, TLS 1.2+: tls.c */
	daemon_ = MHD_start_daemon(
		flags, (uint16_t) cfg.port, NULL, NULL, handler, NULL, MHD_OPTION_EXTERNAL_LOGGER, mhd_log,
		NULL, MHD_OPTION_ARRAY, tls_mhd_options(), MHD_OPTION_SOCK_ADDR, sa,
		MHD_OPTION_THREAD_POOL_SIZE, (unsigned) cfg.threads, MHD_OPTION_CONNECTION_LIMIT,
		(unsigned) cfg.max_connections, MHD_OPTION_CONNECTION_TIMEOUT, (unsigned) 120,
		MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t) 32768, MHD_OPTION_NOTIFY_COMPLETED, completed,
		NULL, MHD_OPTION_END);
	if (!daemon_)
	{
		srv_log("FATAL", "cannot listen on %s:%d (address in use, or not permitted)", cfg.listen,
				cfg.port);
		return false;
	}
	return true;
}

/*
 * http_stop: stop accepting; finish parked long-polls (204) and queued jobs
 * (503); wait up to 5 s for the jobs Postgres is running; close
 * WebSockets; stop. False when a database still holds requests (it does
 * not answer): libmicrohttpd must not stop with suspended connections, so
 * the caller exits without the rest of the orderly stop.
 */
bool
http_stop(void)
{
	MHD_socket fd;
	int64_t	   until = srv_now_ms() + 5000;
	bool	   clean = true;

	if (!daemon_)
		return true;
	fd = MHD_quiesce_daemon(daemon_);
	if (fd != MHD_INVALID_SOCKET)
		close(fd);
	for (int i = 0; i < cfg.ndbs; i++)
		hub_release_all(&cfg.dbs[i]);
	for (int i = 0; i < cfg.ndbs; i++)
	{
		int64_t left = until - srv_now_ms();

		if (!work_quiesce(&cfg.dbs[i], left > 0 ? (int) left : 0))
		{
			srv_log("WARNING",
					"database %s does not answer: stopping without waiting for its requests",
					cfg.dbs[i].name);
			clean = false;
		}
	}
	ws_stop();
	if (!clean)
		return false;
	usleep(100 * 1000); /* let resumed requests answer */
	MHD_stop_daemon(daemon_);
	daemon_ = NULL;
	return true;
}
