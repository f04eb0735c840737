/*
 * sl_http.c — one HTTP exchange of the network client, with libcurl.
 *
 * Failure policy (docs/PROTOCOL.md, "Errors"):
 *   - no connection at all (refused, unresolvable): fail at once, the
 *     device is offline or the server down; nothing is retried or lost;
 *   - transient (timeouts, resets, empty replies, 429, 502, 503, 504):
 *     retried `retries` times, waiting backoff_ms * 2^attempt capped at
 *     backoff_max_ms, with jitter (half fixed, half random) so that many
 *     devices do not retry in step; Retry-After is honoured up to the cap;
 *   - any other answer (400, 401, 403, 413, 422, ...): fail at once with
 *     the server's error, detail and hint.
 * Bodies are bounded by max_payload; connect and transfer timeouts come from
 * the settings (a long-poll adds its wait to the transfer timeout).
 *
 * TLS (https:// urls): the certificate chain and host name are always
 * verified, against the system's CA store or the ca_file setting (a PEM
 * file, for private CAs and self-signed test setups); TLS 1.2 or newer. A
 * certificate that is not accepted fails at once with what to do.
 */
#include "sl_network.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include <cjson/cJSON.h>

static size_t
on_body(char *p, size_t size, size_t nmemb, void *ud)
{
	sl_net_resp *r = ud;
	size_t		 n = size * nmemb;

	if (r->len + n > r->max)
	{
		r->overflow = true;
		return 0;
	}
	if (r->len + n > r->cap)
	{
		size_t	 cap = r->cap ? r->cap : 16384;
		uint8_t *b;

		while (cap < r->len + n)
			cap *= 2;
		if (!(b = sqlite3_realloc64(r->body, cap)))
			return 0;
		r->body = b;
		r->cap = cap;
	}
	memcpy(r->body + r->len, p, n);
	r->len += n;
	return n;
}

/* header_value returns the value of "Name: value\r\n" if line is that header. */
static bool
header_value(const char *line, size_t n, const char *name, char *out, size_t outlen)
{
	size_t k = strlen(name), e;

	if (n <= k + 1 || strncasecmp(line, name, k) != 0 || line[k] != ':')
		return false;
	line += k + 1;
	n -= k + 1;
	while (n && (*line == ' ' || *line == '\t'))
		line++, n--;
	for (e = n; e && (line[e - 1] == '\r' || line[e - 1] == '\n' || line[e - 1] == ' '); e--)
		;
	if (e >= outlen)
		return false;
	memcpy(out, line, e);
	out[e] = '\0';
	return true;
}

static size_t
on_header(char *p, size_t size, size_t nmemb, void *ud)
{
	sl_net_resp *r = ud;
	size_t		 n = size * nmemb;
	char		 v[SL_CURSOR_MAX + 1];

	if (n >= 5 && strncmp(p, "HTTP/", 5) == 0)
	{
		/* a new response (after 100 Continue): forget the previous headers */
		r->cursor[0] = r->site[0] = '\0';
		r->more = false;
		r->retry_after = 0;
		r->rows_total = -1;
	}
	else if (header_value(p, n, "X-Pgsync-Cursor", v, sizeof v))
	{
		bool ok = v[0] != '\0';

		for (char *c = v; *c; c++)
			ok &= (*c >= '0' && *c <= '9') || (*c >= 'a' && *c <= 'z') ||
				  (*c >= 'A' && *c <= 'Z') || *c == '.' || *c == '_' || *c == ':' || *c == '-';
		if (ok)
			strcpy(r->cursor, v);
	}
	else if (header_value(p, n, "X-Pgsync-Site", v, sizeof v) && strlen(v) == 36)
		strcpy(r->site, v);
	else if (header_value(p, n, "X-Pgsync-More", v, sizeof v))
		r->more = strcmp(v, "1") == 0;
	else if (header_value(p, n, "Retry-After", v, sizeof v))
		r->retry_after = strtol(v, NULL, 10);
	else if (header_value(p, n, "X-Pgsync-Rows-Total", v, sizeof v) && v[0] >= '0' && v[0] <= '9')
		r->rows_total = strtoll(v, NULL, 10);
	return n;
}

void
sl_http_resp_free(sl_net_resp *r)
{
	sqlite3_free(r->body);
	memset(r, 0, sizeof *r);
}

/* server_error renders a JSON error body as "error: detail hint". */
static char *
server_error(const sl_net_resp *r)
{
	cJSON *j = r->len ? cJSON_ParseWithLength((const char *) r->body, r->len) : NULL;
	cJSON *e = cJSON_GetObjectItemCaseSensitive(j, "error"),
		  *d = cJSON_GetObjectItemCaseSensitive(j, "detail"),
		  *h = cJSON_GetObjectItemCaseSensitive(j, "hint");
	char *m;

	if (cJSON_IsString(e))
		m = sqlite3_mprintf("server answered %ld (%s)%s%s%s%s", r->status, e->valuestring,
							cJSON_IsString(d) && *d->valuestring ? ": " : "",
							cJSON_IsString(d) ? d->valuestring : "",
							cJSON_IsString(h) && *h->valuestring ? " " : "",
							cJSON_IsString(h) ? h->valuestring : "");
	else
		m = sqlite3_mprintf("server answered HTTP %ld", r->status);
	cJSON_Delete(j);
	return m;
}

static void
backoff(const sl_net_settings *s, int attempt, long retry_after_s)
{
	int64_t	 d = s->backoff_ms;
	uint32_t rnd;

	for (int i = 0; i < attempt && d < s->backoff_max_ms; i++)
		d *= 2;
	if (d > s->backoff_max_ms)
		d = s->backoff_max_ms;
	sqlite3_randomness(sizeof rnd, &rnd);
	d = d / 2 + (d > 1 ? (int64_t) (rnd % (uint32_t) (d / 2 + 1)) : 0); /* jitter */
	if (retry_after_s > 0 && retry_after_s * 1000 > d)
		d = retry_after_s * 1000 < s->backoff_max_ms ? retry_after_s * 1000 : s->backoff_max_ms;
	if (d > 0)
		usleep((useconds_t) d * 1000);
}

/*
 * set_options prepares n->curl for one attempt; the first option libcurl
 * refuses is returned (never ignored: a refused CAINFO or SSLVERSION
 * would silently weaken TLS).
 */
static CURLcode
set_options(CURL *c, char *errbuf, const sl_net_settings *s, const char *url, struct curl_slist *h,
			const uint8_t *body, size_t len, int64_t wait_ms, sl_net_resp *r)
{
	CURLcode rc = CURLE_OK;

#define SET(opt, val)                                                                              \
	do                                                                                             \
	{                                                                                              \
		if ((rc = curl_easy_setopt(c, opt, val)) != CURLE_OK)                                      \
			return rc;                                                                             \
	} while (0)
	SET(CURLOPT_URL, url);
	SET(CURLOPT_PROTOCOLS_STR, "http,https");
	SET(CURLOPT_HTTPHEADER, h);
	SET(CURLOPT_NOSIGNAL, 1L);
	SET(CURLOPT_ERRORBUFFER, errbuf);
	SET(CURLOPT_CONNECTTIMEOUT_MS, (long) s->connect_timeout_ms);
	SET(CURLOPT_TIMEOUT_MS, (long) (s->timeout_ms + wait_ms));
	SET(CURLOPT_TCP_KEEPALIVE, 1L);
	SET(CURLOPT_USERAGENT, "sqlitesync/" PGS_VERSION);
	SET(CURLOPT_WRITEFUNCTION, on_body);
	SET(CURLOPT_WRITEDATA, r);
	SET(CURLOPT_HEADERFUNCTION, on_header);
	SET(CURLOPT_HEADERDATA, r);
	if (strncmp(url, "https://", 8) == 0)
	{
		/* libcurl's defaults, stated: verify the chain and the host name */
		SET(CURLOPT_SSL_VERIFYPEER, 1L);
		SET(CURLOPT_SSL_VERIFYHOST, 2L);
		SET(CURLOPT_SSLVERSION, (long) CURL_SSLVERSION_TLSv1_2);
		if (s->ca_file && *s->ca_file)
			SET(CURLOPT_CAINFO, s->ca_file);
	}
	if (body)
	{
		SET(CURLOPT_POST, 1L);
		SET(CURLOPT_POSTFIELDS, (const char *) body);
		SET(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t) len);
	}
#undef SET
	return rc;
}

void
sl_http_req_free(sl_http_req *q)
{
	curl_slist_free_all(q->headers);
	sqlite3_free(q->url);
	sqlite3_free(q->auth);
	q->headers = NULL;
	q->url = q->auth = NULL;
}

/*
 * sl_http_prepare sets up handle c for one request to s->url + path (POST
 * when body is set). q holds what must outlive the transfer; free it with
 * sl_http_req_free after the transfer. False with *msg on failure.
 */
bool
sl_http_prepare(CURL *c, char *errbuf, const sl_net_settings *s, const char *path,
				const uint8_t *body, size_t len, int64_t wait_ms, sl_net_resp *r, sl_http_req *q,
				char **msg)
{
	CURLcode rc;

	memset(q, 0, sizeof *q);
	sl_http_resp_free(r);
	r->max = (size_t) s->max_payload;
	r->rows_total = -1;
	curl_easy_reset(c);
	q->url = sqlite3_mprintf("%s%s", s->url, path);
	q->auth = s->token ? sqlite3_mprintf("Authorization: Bearer %s", s->token) : NULL;
	if (q->auth)
		q->headers = curl_slist_append(q->headers, q->auth);
	if (body)
		q->headers = curl_slist_append(q->headers, "Content-Type: application/octet-stream");
	if (!q->url || (s->token && !q->auth) || ((q->auth || body) && !q->headers))
	{
		*msg = sqlite3_mprintf("out of memory building the request");
		sl_http_req_free(q);
		return false;
	}
	if ((rc = set_options(c, errbuf, s, q->url, q->headers, body, len, wait_ms, r)) != CURLE_OK)
	{
		*msg = sqlite3_mprintf("cannot set up the HTTP request: %s (libcurl %s)",
							   curl_easy_strerror(rc), curl_version_info(CURLVERSION_NOW)->version);
		sl_http_req_free(q);
		return false;
	}
	errbuf[0] = '\0';
	return true;
}

static void
set_code(sl_net *n, const char *code, long status)
{
	n->err_code = code;
	n->err_status = status;
}

/*
 * sl_http_outcome classifies a finished transfer (rc from libcurl, r with
 * the answer): true on a 2xx; else *msg (what went wrong, what to do),
 * n->err_code / err_status (docs/CLIENT.md, "Status and errors") and
 * *transient (worth retrying).
 */
bool
sl_http_outcome(sl_net *n, CURL *c, const char *errbuf, const sl_net_settings *s, CURLcode rc,
				sl_net_resp *r, bool *transient, char **msg)
{
	const char *why = errbuf && errbuf[0] ? errbuf : curl_easy_strerror(rc);

	*transient = false;
	*msg = NULL;
	n->unavailable = false;
	set_code(n, NULL, 0);
	if (rc == CURLE_OK)
	{
		curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &r->status);
		if (r->status >= 200 && r->status < 300)
			return true;
		*msg = server_error(r);
		*transient = r->status == 429 || r->status == 502 || r->status == 503 || r->status == 504;
		n->unavailable = *transient;
		if (r->status == 401)
		{
			bool  expired = r->len && memmem(r->body, r->len, "token expired", 13) != NULL;
			char *m = sqlite3_mprintf("%s Call sync_network_set_token() with a fresh token.", *msg);

			sqlite3_free(*msg);
			*msg = m;
			set_code(n, expired ? "token_expired" : "unauthorized", 401);
		}
		else if (*transient)
			set_code(n, "unavailable", r->status);
		else if (r->status == 403)
			set_code(n, "forbidden", 403);
		else if (r->status == 422)
			set_code(n, "schema", 422);
		else if (r->status >= 400 && r->status < 500)
			set_code(n, "bad_request", r->status);
		else
			set_code(n, "server", r->status);
		return false;
	}
	if (rc == CURLE_COULDNT_CONNECT || rc == CURLE_COULDNT_RESOLVE_HOST ||
		rc == CURLE_COULDNT_RESOLVE_PROXY)
	{
		*msg = sqlite3_mprintf(
			"server unreachable (%s); the device is offline or the server is down. "
			"Nothing was lost: local changes stay pending and the next sync sends them.",
			why);
		n->unavailable = true;
		set_code(n, "offline", 0);
	}
	else if (rc == CURLE_SSL_CACERT_BADFILE)
	{
		*msg = sqlite3_mprintf("cannot use the CA file ca_file = '%s' (%s); fix the path: "
							   "INSERT OR REPLACE INTO sync_network(key, value) VALUES "
							   "('ca_file', '/path/to/ca.pem')",
							   s->ca_file ? s->ca_file : "", why);
		set_code(n, "tls", 0);
	}
	else if (rc == CURLE_PEER_FAILED_VERIFICATION || rc == CURLE_SSL_ISSUER_ERROR)
	{
		*msg = sqlite3_mprintf(
			"the server's TLS certificate was not accepted (%s). Check that the url names a "
			"host the certificate is for; if the server uses a private CA or a self-signed "
			"certificate, name its CA file: INSERT OR REPLACE INTO sync_network(key, value) "
			"VALUES ('ca_file', '/path/to/ca.pem')",
			why);
		set_code(n, "tls", 0);
	}
	else if (rc == CURLE_WRITE_ERROR && r->overflow)
	{
		*msg = sqlite3_mprintf("the server's answer is larger than max_payload (%lld bytes); "
							   "raise it: INSERT OR REPLACE INTO sync_network(key, value) "
							   "VALUES ('max_payload', ...)",
							   (long long) s->max_payload);
		set_code(n, "bad_request", 0);
	}
	else if (rc == CURLE_ABORTED_BY_CALLBACK)
	{
		*msg = sqlite3_mprintf("the transfer was stopped (sync_network_stop, or the process "
							   "exits); nothing was lost");
		set_code(n, "stopped", 0);
	}
	else
	{
		*msg = sqlite3_mprintf("transfer failed (%s)%s", why,
							   rc == CURLE_GOT_NOTHING && strncmp(s->url, "http://", 7) == 0
								   ? " (if the server serves HTTPS, use an https:// url)"
								   : "");
		*transient = true;
		n->unavailable = true;
		set_code(n, "offline", 0);
	}
	return false;
}

/*
 * perform runs one transfer: with curl_easy_perform, or, on a background
 * syncer's connection, through its multi handle so that a stop aborts it
 * at once (n->perform).
 */
static CURLcode
perform(sl_net *n, CURL *c)
{
	return n->perform ? n->perform(n->perform_arg, c) : curl_easy_perform(c);
}

/*
 * sl_http_call makes one request with retries. Returns true with r filled
 * (status 2xx); false with *msg (sqlite3_malloc'd) saying what failed.
 */
bool
sl_http_call(sl_net *n, const sl_net_settings *s, const char *path, const uint8_t *body, size_t len,
			 int64_t wait_ms, sl_net_resp *r, char **msg)
{
	bool ok = false;

	*msg = NULL;
	if (!n->curl && !(n->curl = curl_easy_init()))
	{
		*msg = sqlite3_mprintf("cannot initialize libcurl");
		set_code(n, "local", 0);
		return false;
	}
	for (int attempt = 0;; attempt++)
	{
		sl_http_req q;
		CURLcode	rc;
		bool		transient;

		sqlite3_free(*msg);
		*msg = NULL;
		if (!sl_http_prepare(n->curl, n->curl_err, s, path, body, len, wait_ms, r, &q, msg))
		{
			set_code(n, "local", 0);
			break; /* a libcurl without https, or out of memory: retrying changes nothing */
		}
		rc = perform(n, n->curl);
		sl_http_req_free(&q);
		if ((ok = sl_http_outcome(n, n->curl, n->curl_err, s, rc, r, &transient, msg)))
			break;
		if (n->err_code && strcmp(n->err_code, "offline") == 0 && rc != CURLE_OK &&
			(rc == CURLE_COULDNT_CONNECT || rc == CURLE_COULDNT_RESOLVE_HOST ||
			 rc == CURLE_COULDNT_RESOLVE_PROXY))
			break; /* offline: fail fast */
		if (!transient || attempt >= s->retries)
		{
			if (transient)
			{
				char *m =
					sqlite3_mprintf("%s after %d attempt%s; nothing was lost, sync again later",
									*msg, attempt + 1, attempt ? "s" : "");

				sqlite3_free(*msg);
				*msg = m;
			}
			break;
		}
		backoff(s, attempt, r->retry_after);
	}
	if (!ok && !*msg)
		*msg = sqlite3_mprintf("out of memory");
	return ok;
}
