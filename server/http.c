/*
 * http.c — the libmicrohttpd side: routes, request bodies, limits, and the
 * JSON error responses of docs/PROTOCOL.md.
 *
 * libmicrohttpd runs an epoll thread pool; each request is handled by the
 * thread that owns its connection, which blocks on Postgres (so there are
 * about as many threads as pooled connections). A long-poll that finds
 * nothing new is *suspended* (hub.c) instead of holding a thread: a parked
 * request costs a socket and a few hundred bytes. When resumed, the handler
 * runs again and either pulls again or answers 204.
 *
 * Order of checks for /v1 routes, before any body is read: route and
 * method (404/405), token (401/403), rate limit (429), declared body size
 * (413). A chunked body that grows past max_body is discarded and answered
 * with 413 at its end (libmicrohttpd only lets a response be queued before
 * or after the upload), or the connection is cut past 4 x max_body.
 */
#include "server.h"

#include "../core/pgsync.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
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
	int32_t		 gen;		 /* generation of the device's view, from the cursor */
	uint8_t		*sealed;	 /* chunked pull: the sealed token of a chunk cursor (malloc) */
	size_t		 sealed_len;
	uint32_t	 max_rows;	/* chunked pull: rows per chunk, 0 = one payload */
	char		 exclude[37];
	bool		 has_exclude;
	int64_t		 deadline; /* long-poll end, srv_now_ms(); 0 = no wait */
	hub_waiter	*w;
	char		 method[12]; /* for the request log line */
	char		 path[160];
	char		 error[160]; /* the error answered, if any, and its detail */
	char		 detail[640];
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
add_site(struct MHD_Response *resp)
{
	const char *site = sync_server_site();

	if (site[0])
		MHD_add_response_header(resp, "X-Pgsync-Site", site);
}

static void
free_pull(void *cls)
{
	pull_result *p = cls;

	pull_result_free(p);
	free(p);
}

static enum MHD_Result
send_cursor(struct MHD_Connection *conn, req *r, int64_t cursor, int32_t gen, pull_result *pr)
{
	struct MHD_Response *resp;
	char				 num[48];
	char				*cur = num;
	bool				 more = pr && pr->more;
	pgs_buf				 text;

	pgs_buf_init(&text);
	pgs_cursor_format(&text, cursor, gen, NULL, 0);
	snprintf(num, sizeof num, "%s", text.p ? (const char *) text.p : "0");
	pgs_buf_free(&text);
	if (more && !(cur = strdup(pr->more)))
	{
		pull_result_free(pr);
		return MHD_NO;
	}
	if (pr && pr->payload)
	{
		pull_result *keep = malloc(sizeof *keep);

		if (!keep)
		{
			pull_result_free(pr);
			if (cur != num)
				free(cur);
			return MHD_NO;
		}
		*keep = *pr;
		metrics_bytes(0, keep->len);
		resp = MHD_create_response_from_buffer_with_free_callback_cls(
			keep->len, (void *) keep->payload, free_pull, keep);
		if (!resp)
		{
			free_pull(keep);
			if (cur != num)
				free(cur);
			return MHD_NO;
		}
		MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/octet-stream");
	}
	else
		resp = MHD_create_response_from_buffer(0, (void *) "", MHD_RESPMEM_PERSISTENT);
	if (!resp)
	{
		if (cur != num)
			free(cur);
		return MHD_NO;
	}
	MHD_add_response_header(resp, "X-Pgsync-Cursor", cur);
	MHD_add_response_header(resp, "X-Pgsync-More", more ? "1" : "0");
	if (pr && pr->payload && pr->rows_total >= 0)
	{
		char total[24];

		snprintf(total, sizeof total, "%lld", (long long) pr->rows_total);
		MHD_add_response_header(resp, "X-Pgsync-Rows-Total", total);
	}
	if (cur != num)
		free(cur);
	add_site(resp);
	return queue(conn, r, pr && pr->payload ? 200 : 204, resp);
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

/* authorize: token, then rate limit; false with the response queued. */
static bool
authorize(struct MHD_Connection *conn, req *r, enum MHD_Result *ret)
{
	const char *h =
		MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
	const char *token = NULL;
	srv_error	e;
	int			retry;
	char		ip[64];

	if (h && strncasecmp(h, "Bearer ", 7) == 0)
		for (token = h + 7; *token == ' '; token++)
			;
	else if (!h && r->ep == EP_WS)
		token = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "access_token");
	if (h && !token)
		srv_fail(&e, 401, "invalid token", "Send Authorization: Bearer <token>.",
				 "The Authorization header does not use the Bearer scheme.");
	if (token && auth_check(token, &r->auth, &e))
	{
		if (!ratelimit_take(r->auth.subject, &retry))
			goto limited;
		return true;
	}
	client_addr(conn, ip, sizeof ip);
	if (!token && !h)
		srv_fail(
			&e, 401, "missing token",
			"Send Authorization: Bearer <token> with a token signed by your identity provider.",
			"The request has no bearer token.");
	if (!ratelimit_take(ip, &retry))
		goto limited;
	*ret = send_error(conn, r, &e);
	return false;
limited:
	metrics_rate_limited();
	srv_fail(&e, 429, "rate limit exceeded", "Slow down and retry after the delay in Retry-After.",
			 "This client may make %g requests per second (burst %d).", cfg.rate_limit,
			 cfg.rate_burst);
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

static enum MHD_Result
do_push(struct MHD_Connection *conn, req *r)
{
	push_result pr;
	srv_error	e;
	char	   *json;
	const char *site;

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
	metrics_bytes(r->len, 0);
	if (!sync_push(&r->auth, r->body, r->len, &pr, &e))
		return send_error(conn, r, &e);
	metrics_changes(pr.applied, pr.nrejected);
	site = sync_server_site();
	if (asprintf(
			&json,
			"{\"applied\":%lld,\"rejected\":%s,\"server_version\":%lld,\"server_site\":\"%s\"}",
			(long long) pr.applied, pr.rejected_json, (long long) pr.server_version, site) < 0)
		json = NULL;
	free(pr.rejected_json);
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
	pull_result pr;
	srv_error	e;
	bool		ok;

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
	ok = sync_rows(&r->auth, excl && *excl ? excl : NULL, keys, strlen(keys), &pr, &e);
	cJSON_free(keys);
	if (!ok)
		return send_error(conn, r, &e);
	return send_cursor(conn, r, 0, 0, &pr);
}

/* do_pull pulls; parks the request when nothing is new and it may wait. */
static enum MHD_Result
do_pull(struct MHD_Connection *conn, req *r)
{
	for (;;)
	{
		uint64_t	g = hub_gen();
		pull_result pr;
		srv_error	e;
		bool		parked;

		if (!sync_pull(&r->auth, r->since, r->gen, r->has_exclude ? r->exclude : NULL,
					   r->max_rows, r->sealed, r->sealed_len, &pr, &e))
			return send_error(conn, r, &e);
		if (pr.payload)
			return send_cursor(conn, r, pr.cursor, pr.gen, &pr);
		if (r->sealed)
		{
			/* a chunk always has a payload; the pull is over */
			free(r->sealed);
			r->sealed = NULL;
			r->sealed_len = 0;
		}
		r->since = pr.cursor;
		r->gen = pr.gen;
		pull_result_free(&pr);
		if (r->deadline == 0 || srv_now_ms() >= r->deadline)
			return send_cursor(conn, r, r->since, r->gen, NULL);
		r->w = hub_suspend(conn, r->w, g, r->since, r->deadline, &parked);
		if (!r->w)
			return send_cursor(conn, r, r->since, r->gen, NULL);
		if (parked)
			return MHD_YES; /* resumed by hub.c: we run again */
	}
}

static enum MHD_Result
do_healthz(struct MHD_Connection *conn, req *r)
{
	srv_error e;
	PGconn	 *c = pool_acquire(&e);
	PGresult *res;
	char	 *json;
	bool	  ok;

	if (!c)
	{
		if (asprintf(&json, "{\"status\":\"unavailable\",\"postgres\":\"down\",\"detail\":\"%s\"}",
					 "connection failed") < 0)
			return MHD_NO;
		return send_json(conn, r, 503, json);
	}
	res = PQexec(c, "SELECT 1");
	ok = PQresultStatus(res) == PGRES_TUPLES_OK;
	PQclear(res);
	pool_release(c, !ok);
	if (asprintf(&json,
				 "{\"status\":\"%s\",\"postgres\":\"%s\",\"server_site\":\"%s\",\"version\":%lld}",
				 ok ? "ok" : "unavailable", ok ? "ok" : "down", sync_server_site(),
				 (long long) hub_version()) < 0)
		return MHD_NO;
	return send_json(conn, r, ok ? 200 : 503, json);
}

static enum MHD_Result
do_metrics(struct MHD_Connection *conn, req *r)
{
	size_t				 len;
	char				*text = metrics_render(&len);
	struct MHD_Response *resp;

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
		{"/v1/push", "POST", EP_PUSH},	 {"/v1/pull", "GET", EP_PULL},	  {"/v1/ws", "GET", EP_WS},
		{"/v1/rows", "POST", EP_ROWS},
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
	int rc = route(r, url, method);

	if (rc == 404)
	{
		*ret = fail(conn, r, 404, "not found", "See docs/PROTOCOL.md for the routes.",
					"No route for %s %s.", method, url);
		return false;
	}
	if (rc == 405)
	{
		*ret =
			fail(conn, r, 405, "method not allowed", NULL, "%s is not allowed on %s.", method, url);
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
		int64_t		mrv = cfg.pull_max_rows;

		r->since = 0;
		if (mr && (!parse_int(mr, 10000000, &mrv) || mrv < 1))
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
					r->max_rows = 10000; /* a chunk cursor without max_rows */
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
		if (r->ep == EP_PUSH || r->ep == EP_ROWS)
			return MHD_YES; /* the body follows */
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
			if (r->w)
			{
				hub_wake s = hub_result(r->w);

				if (s == HUB_WAITING)
					return MHD_YES; /* spurious call while parked */
				if (s != HUB_CHANGED)
					return send_cursor(conn, r, r->since, r->gen, NULL);
			}
			return do_pull(conn, r);
		case EP_WS:
		{
			struct MHD_Response *resp = NULL;
			srv_error			 e;

			if (!ws_upgrade(conn, &r->auth, &resp, &e))
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
		.database = cfg.dbname,
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
	metrics_request(r->ep, r->status ? r->status : 499, now_us() - r->t0_us);
	if (cfg.log_requests)
		log_request(conn, r, toe);
	hub_forget(r->w);
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
		MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t) 65536, MHD_OPTION_NOTIFY_COMPLETED, completed,
		NULL, MHD_OPTION_END);
	if (!daemon_)
	{
		srv_log("FATAL", "cannot listen on %s:%d (address in use, or not permitted)", cfg.listen,
				cfg.port);
		return false;
	}
	return true;
}

/* http_stop: stop accepting, release parked requests and WebSockets, stop. */
void
http_stop(void)
{
	MHD_socket fd;

	if (!daemon_)
		return;
	fd = MHD_quiesce_daemon(daemon_);
	if (fd != MHD_INVALID_SOCKET)
		close(fd);
	hub_release_all();
	ws_stop();
	usleep(100 * 1000); /* let resumed long-polls answer */
	MHD_stop_daemon(daemon_);
	daemon_ = NULL;
}
