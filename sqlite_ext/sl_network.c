/*
 * sl_network.c — sync_network_*: sync this SQLite database with a
 * pgsync-server over HTTP (protocol: docs/PROTOCOL.md), with libcurl.
 *
 *   sync_network_init(url [, token])   where to sync; resets the cursors when the url changes
 *   sync_network_set_token(token)      a new bearer token (e.g. after 401)
 *   sync_network_send()                push local changes           -> JSON summary
 *   sync_network_receive()             pull and apply remote changes -> JSON summary
 *   sync_network_sync()                send, then receive            -> JSON summary
 *   sync_network_wait(timeout_ms)      long-poll: apply what arrives, 1; or 0 at timeout
 *   sync_network_status()              cursors, pending rows, last error -> JSON
 *
 * State lives in the database itself, so a restarted app resumes:
 * sync_network(key, value) holds the url, token, cursors and tuning, and
 * sync_network_rejected lists rows the server refused (row-level security).
 *
 * Invariants that make "nothing lost, nothing duplicated" hold:
 *   - send_cursor is the highest local db_version the server acknowledged.
 *     It moves only after a 200 to the push, to the pushed payload's until;
 *     a push whose answer was lost is sent again (apply is idempotent).
 *   - recv_cursor moves in the same local transaction as the apply of the
 *     payload it came with: a crash keeps both or neither.
 *   - Pushes exclude the server's site id, and a receive with nothing
 *     pending (send_cursor = db_version) also moves send_cursor past the
 *     version of the apply, so received changes are not echoed back.
 *
 * Failures: no connection (offline, server down) fails at once with a clear
 * error and changes nothing; transient failures (timeouts, resets, 429, 5xx)
 * are retried `retries` times with exponential backoff and full jitter.
 * Every failure is recorded in last_error/failures for sync_network_status().
 *
 * Everything goes through the same SQL functions an application would call
 * (sync_payload, sync_apply_payload, ...), on the connection's own handle.
 * Calls block the connection for the duration of the HTTP exchange; use a
 * dedicated connection (and WAL) for syncing in interactive apps.
 */
#include "sl_network.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <curl/curl.h>

#define CURSOR_MAX 128

typedef struct net
{
	sqlite3    *db;
	db_conn    *c;
	CURL	   *curl;
	char		curl_err[CURL_ERROR_SIZE];
} net;

typedef struct settings
{
	char	   *url;
	char	   *token;
	char	   *server_site;
	char	   *recv_cursor;
	int64_t		send_cursor;
	int64_t		retries;
	int64_t		backoff_ms;
	int64_t		backoff_max_ms;
	int64_t		connect_timeout_ms;
	int64_t		timeout_ms;
	int64_t		max_payload;
} settings;

typedef struct resp
{
	long		status;
	uint8_t    *body;
	size_t		len;
	size_t		cap;
	size_t		max;
	bool		overflow;
	char		cursor[CURSOR_MAX + 1];
	char		site[40];
	bool		more;
	long		retry_after;
} resp;

static const char meta_sql[] =
	"CREATE TABLE IF NOT EXISTS sync_network(key TEXT PRIMARY KEY, value) WITHOUT ROWID;"
	"CREATE TABLE IF NOT EXISTS sync_network_rejected("
	"  id INTEGER PRIMARY KEY, at TEXT NOT NULL, tbl TEXT, pk TEXT, code TEXT, message TEXT);";

/* ---- the sync_network table -------------------------------------------------- */

static bool
exec(net *n, const char *sql)
{
	return sqlite3_exec(n->db, sql, NULL, NULL, NULL) == SQLITE_OK;
}

/* kv_text: the value of key as text (sqlite3_free it), or NULL. */
static char *
kv_text(net *n, const char *key)
{
	sqlite3_stmt *st;
	char	   *v = NULL;

	if (sqlite3_prepare_v2(n->db, "SELECT value FROM sync_network WHERE key = ?1", -1, &st, NULL) != SQLITE_OK)
		return NULL;
	sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
	if (sqlite3_step(st) == SQLITE_ROW && sqlite3_column_type(st, 0) != SQLITE_NULL)
		v = sqlite3_mprintf("%s", sqlite3_column_text(st, 0));
	sqlite3_finalize(st);
	return v;
}

static int64_t
kv_int(net *n, const char *key, int64_t def)
{
	char	   *v = kv_text(n, key);
	int64_t		r = def;

	if (v && *v)
		r = strtoll(v, NULL, 10);
	sqlite3_free(v);
	return r;
}

static bool
kv_set(net *n, const char *key, const char *value)
{
	sqlite3_stmt *st;
	int			rc;

	if (sqlite3_prepare_v2(n->db, value ? "INSERT OR REPLACE INTO sync_network(key, value) VALUES(?1, ?2)"
						   : "DELETE FROM sync_network WHERE key = ?1", -1, &st, NULL) != SQLITE_OK)
		return false;
	sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
	if (value)
		sqlite3_bind_text(st, 2, value, -1, SQLITE_STATIC);
	rc = sqlite3_step(st);
	sqlite3_finalize(st);
	return rc == SQLITE_DONE;
}

static bool
kv_set_int(net *n, const char *key, int64_t v)
{
	char		buf[24];

	snprintf(buf, sizeof buf, "%lld", (long long) v);
	return kv_set(n, key, buf);
}

static void
free_settings(settings *s)
{
	sqlite3_free(s->url);
	sqlite3_free(s->token);
	sqlite3_free(s->server_site);
	sqlite3_free(s->recv_cursor);
	memset(s, 0, sizeof *s);
}

static bool
load_settings(net *n, settings *s)
{
	memset(s, 0, sizeof *s);
	if (!exec(n, meta_sql) || !(s->url = kv_text(n, "url")))
		return false;
	s->token = kv_text(n, "token");
	s->server_site = kv_text(n, "server_site");
	s->recv_cursor = kv_text(n, "recv_cursor");
	s->send_cursor = kv_int(n, "send_cursor", 0);
	s->retries = kv_int(n, "retries", 3);
	s->backoff_ms = kv_int(n, "backoff_ms", 200);
	s->backoff_max_ms = kv_int(n, "backoff_max_ms", 5000);
	s->connect_timeout_ms = kv_int(n, "connect_timeout_ms", 3000);
	s->timeout_ms = kv_int(n, "timeout_ms", 30000);
	s->max_payload = kv_int(n, "max_payload", 256LL << 20);
	if (s->retries < 0)
		s->retries = 0;
	return true;
}

/* ---- errors ------------------------------------------------------------------- */

/* fail raises fn's error and records it for sync_network_status(). */
static void
fail(sqlite3_context *ctx, net *n, const char *fn, const char *fmt, ...)
{
	va_list		ap;
	char	   *m,
			   *full,
			   *url;

	va_start(ap, fmt);
	m = sqlite3_vmprintf(fmt, ap);
	va_end(ap);
	full = sqlite3_mprintf("%s: %s", fn, m ? m : "out of memory");
	if ((url = kv_text(n, "url")) != NULL)	/* initialized: record it */
	{
		kv_set(n, "last_error", full);
		kv_set_int(n, "failures", kv_int(n, "failures", 0) + 1);
	}
	sqlite3_result_error(ctx, full ? full : "sync_network: out of memory", -1);
	sqlite3_free(url);
	sqlite3_free(m);
	sqlite3_free(full);
}

static bool
need_settings(sqlite3_context *ctx, net *n, const char *fn, settings *s)
{
	if (load_settings(n, s))
		return true;
	free_settings(s);
	sqlite3_result_error(ctx, sqlite3_mprintf("%s: no server configured; call sync_network_init('http://host:port') first", fn), -1);
	return false;
}

/* ---- HTTP -------------------------------------------------------------------- */

static size_t
on_body(char *p, size_t size, size_t nmemb, void *ud)
{
	resp	   *r = ud;
	size_t		n = size * nmemb;

	if (r->len + n > r->max)
	{
		r->overflow = true;
		return 0;
	}
	if (r->len + n > r->cap)
	{
		size_t		cap = r->cap ? r->cap : 16384;
		uint8_t    *b;

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
	size_t		k = strlen(name),
				e;

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
	resp	   *r = ud;
	size_t		n = size * nmemb;
	char		v[CURSOR_MAX + 1];

	if (n >= 5 && strncmp(p, "HTTP/", 5) == 0)
	{
		/* a new response (after 100 Continue): forget the previous headers */
		r->cursor[0] = r->site[0] = '\0';
		r->more = false;
		r->retry_after = 0;
	}
	else if (header_value(p, n, "X-Pgsync-Cursor", v, sizeof v))
	{
		bool		ok = v[0] != '\0';

		for (char *c = v; *c; c++)
			ok &= (*c >= '0' && *c <= '9') || (*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') ||
				*c == '.' || *c == '_' || *c == ':' || *c == '-';
		if (ok)
			strcpy(r->cursor, v);
	}
	else if (header_value(p, n, "X-Pgsync-Site", v, sizeof v) && strlen(v) == 36)
		strcpy(r->site, v);
	else if (header_value(p, n, "X-Pgsync-More", v, sizeof v))
		r->more = strcmp(v, "1") == 0;
	else if (header_value(p, n, "Retry-After", v, sizeof v))
		r->retry_after = strtol(v, NULL, 10);
	return n;
}

static void
resp_free(resp *r)
{
	sqlite3_free(r->body);
	memset(r, 0, sizeof *r);
}

/* server_error renders a JSON error body as "error: detail hint". */
static char *
server_error(const resp *r)
{
	cJSON	   *j = r->len ? cJSON_ParseWithLength((const char *) r->body, r->len) : NULL;
	cJSON	   *e = cJSON_GetObjectItemCaseSensitive(j, "error"),
			   *d = cJSON_GetObjectItemCaseSensitive(j, "detail"),
			   *h = cJSON_GetObjectItemCaseSensitive(j, "hint");
	char	   *m;

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
backoff(const settings *s, int attempt, long retry_after_s)
{
	int64_t		d = s->backoff_ms;
	uint32_t	rnd;

	for (int i = 0; i < attempt && d < s->backoff_max_ms; i++)
		d *= 2;
	if (d > s->backoff_max_ms)
		d = s->backoff_max_ms;
	sqlite3_randomness(sizeof rnd, &rnd);
	d = d / 2 + (d > 1 ? (int64_t) (rnd % (uint32_t) (d / 2 + 1)) : 0);	/* jitter */
	if (retry_after_s > 0 && retry_after_s * 1000 > d)
		d = retry_after_s * 1000 < s->backoff_max_ms ? retry_after_s * 1000 : s->backoff_max_ms;
	if (d > 0)
		usleep((useconds_t) d * 1000);
}

/*
 * http_call makes one request with retries. Returns true with r filled
 * (status 2xx); false with *msg (sqlite3_malloc'd) saying what failed.
 */
static bool
http_call(net *n, const settings *s, const char *path, const uint8_t *body, size_t len,
		  int64_t wait_ms, resp *r, char **msg)
{
	char	   *url = sqlite3_mprintf("%s%s", s->url, path);
	char	   *auth = s->token ? sqlite3_mprintf("Authorization: Bearer %s", s->token) : NULL;
	bool		ok = false;

	*msg = NULL;
	if (!n->curl && !(n->curl = curl_easy_init()))
	{
		*msg = sqlite3_mprintf("cannot initialize libcurl");
		goto out;
	}
	for (int attempt = 0;; attempt++)
	{
		struct curl_slist *h = NULL;
		CURLcode	rc;
		bool		transient;

		resp_free(r);
		r->max = (size_t) s->max_payload;
		curl_easy_reset(n->curl);
		if (auth)
			h = curl_slist_append(h, auth);
		if (body)
			h = curl_slist_append(h, "Content-Type: application/octet-stream");
		curl_easy_setopt(n->curl, CURLOPT_URL, url);
		curl_easy_setopt(n->curl, CURLOPT_HTTPHEADER, h);
		curl_easy_setopt(n->curl, CURLOPT_NOSIGNAL, 1L);
		curl_easy_setopt(n->curl, CURLOPT_ERRORBUFFER, n->curl_err);
		curl_easy_setopt(n->curl, CURLOPT_CONNECTTIMEOUT_MS, (long) s->connect_timeout_ms);
		curl_easy_setopt(n->curl, CURLOPT_TIMEOUT_MS, (long) (s->timeout_ms + wait_ms));
		curl_easy_setopt(n->curl, CURLOPT_TCP_KEEPALIVE, 1L);
		curl_easy_setopt(n->curl, CURLOPT_USERAGENT, "sqlitesync/" PGS_VERSION);
		curl_easy_setopt(n->curl, CURLOPT_WRITEFUNCTION, on_body);
		curl_easy_setopt(n->curl, CURLOPT_WRITEDATA, r);
		curl_easy_setopt(n->curl, CURLOPT_HEADERFUNCTION, on_header);
		curl_easy_setopt(n->curl, CURLOPT_HEADERDATA, r);
		if (body)
		{
			curl_easy_setopt(n->curl, CURLOPT_POST, 1L);
			curl_easy_setopt(n->curl, CURLOPT_POSTFIELDS, (const char *) body);
			curl_easy_setopt(n->curl, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t) len);
		}
		n->curl_err[0] = '\0';
		rc = curl_easy_perform(n->curl);
		curl_slist_free_all(h);
		sqlite3_free(*msg);
		*msg = NULL;
		if (rc == CURLE_OK)
		{
			curl_easy_getinfo(n->curl, CURLINFO_RESPONSE_CODE, &r->status);
			if (r->status >= 200 && r->status < 300)
			{
				ok = true;
				break;
			}
			*msg = server_error(r);
			if (r->status == 401)
			{
				char	   *m = sqlite3_mprintf("%s Call sync_network_set_token() with a fresh token.", *msg);

				sqlite3_free(*msg);
				*msg = m;
			}
			transient = r->status == 429 || r->status == 502 || r->status == 503 || r->status == 504;
		}
		else if (rc == CURLE_COULDNT_CONNECT || rc == CURLE_COULDNT_RESOLVE_HOST ||
				 rc == CURLE_COULDNT_RESOLVE_PROXY)
		{
			*msg = sqlite3_mprintf("server unreachable (%s); the device is offline or the server is down. "
								   "Nothing was lost: local changes stay pending and the next sync sends them.",
								   n->curl_err[0] ? n->curl_err : curl_easy_strerror(rc));
			break;				/* offline: fail fast */
		}
		else if (rc == CURLE_WRITE_ERROR && r->overflow)
		{
			*msg = sqlite3_mprintf("the server's answer is larger than max_payload (%lld bytes); "
								   "raise it: UPDATE sync_network SET value = ... WHERE key = 'max_payload'",
								   (long long) s->max_payload);
			break;
		}
		else
		{
			*msg = sqlite3_mprintf("transfer failed (%s)", n->curl_err[0] ? n->curl_err : curl_easy_strerror(rc));
			transient = true;
		}
		if (!transient || attempt >= s->retries)
		{
			if (transient)
			{
				char	   *m = sqlite3_mprintf("%s after %d attempts; nothing was lost, sync again later", *msg, attempt + 1);

				sqlite3_free(*msg);
				*msg = m;
			}
			break;
		}
		backoff(s, attempt, r->retry_after);
	}
out:
	sqlite3_free(url);
	sqlite3_free(auth);
	if (!ok && !*msg)
		*msg = sqlite3_mprintf("out of memory");
	return ok;
}

/* ---- small SQL helpers ------------------------------------------------------- */

static bool
query_int(net *n, const char *sql, int64_t *out)
{
	sqlite3_stmt *st;
	bool		ok = false;

	if (sqlite3_prepare_v2(n->db, sql, -1, &st, NULL) != SQLITE_OK)
		return false;
	if (sqlite3_step(st) == SQLITE_ROW)
	{
		*out = sqlite3_column_int64(st, 0);
		ok = true;
	}
	sqlite3_finalize(st);
	return ok;
}

static int64_t
le64(const uint8_t *p)
{
	uint64_t	v = 0;

	for (int i = 7; i >= 0; i--)
		v = (v << 8) | p[i];
	return (int64_t) v;
}

static char *
now_iso(void)
{
	char		b[32];
	time_t		t = time(NULL);
	struct tm	tm;

	gmtime_r(&t, &tm);
	strftime(b, sizeof b, "%Y-%m-%dT%H:%M:%SZ", &tm);
	return sqlite3_mprintf("%s", b);
}

static void
succeeded(net *n)
{
	char	   *t = now_iso();

	kv_set(n, "last_sync", t);
	kv_set(n, "last_error", NULL);
	kv_set(n, "failures", "0");
	sqlite3_free(t);
}

/* ---- send ------------------------------------------------------------------- */

/* do_send pushes pending changes; returns JSON (sqlite3_malloc) or NULL + *msg. */
static char *
do_send(net *n, settings *s, char **msg)
{
	sqlite3_stmt *st;
	int64_t		safe,
				until,
				applied = 0,
				nrej = 0;
	uint8_t    *payload = NULL;
	size_t		len = 0;
	resp		r = {0};
	cJSON	   *j = NULL,
			   *rej;
	char	   *out = NULL;

	*msg = NULL;
	if (!query_int(n, "SELECT sync_db_version()", &safe))
	{
		*msg = sqlite3_mprintf("%s", sqlite3_errmsg(n->db));
		return NULL;
	}
	if (sqlite3_prepare_v2(n->db, "SELECT sync_payload(?1, ?2)", -1, &st, NULL) != SQLITE_OK)
	{
		*msg = sqlite3_mprintf("%s", sqlite3_errmsg(n->db));
		return NULL;
	}
	sqlite3_bind_int64(st, 1, s->send_cursor);
	if (s->server_site)
		sqlite3_bind_text(st, 2, s->server_site, -1, SQLITE_STATIC);
	if (sqlite3_step(st) != SQLITE_ROW)
	{
		*msg = sqlite3_mprintf("%s", sqlite3_errmsg(n->db));
		sqlite3_finalize(st);
		return NULL;
	}
	if (sqlite3_column_type(st, 0) == SQLITE_BLOB && sqlite3_column_bytes(st, 0) >= 56)
	{
		len = (size_t) sqlite3_column_bytes(st, 0);
		/* copy, so that no statement (read lock) stays open during the upload */
		if ((payload = sqlite3_malloc64(len)) != NULL)
			memcpy(payload, sqlite3_column_blob(st, 0), len);
	}
	sqlite3_finalize(st);
	if (len && !payload)
	{
		*msg = sqlite3_mprintf("out of memory copying a payload of %zu bytes", len);
		return NULL;
	}
	if (!payload)
	{
		/* nothing to send up to safe (or all of it came from the server) */
		if (safe > s->send_cursor)
		{
			kv_set_int(n, "send_cursor", safe);
			s->send_cursor = safe;
		}
		succeeded(n);
		return sqlite3_mprintf("{\"sent_bytes\":0,\"applied\":0,\"rejected\":0,\"send_cursor\":%lld}",
							   (long long) s->send_cursor);
	}
	until = le64(payload + 32);
	if (!http_call(n, s, "/v1/push", payload, len, 0, &r, msg))
		goto out;
	j = cJSON_ParseWithLength((const char *) r.body, r.len);
	if (!cJSON_IsObject(j) || !cJSON_IsNumber(cJSON_GetObjectItemCaseSensitive(j, "applied")))
	{
		*msg = sqlite3_mprintf("the server's answer to a push is not the JSON of docs/PROTOCOL.md");
		goto out;
	}
	applied = (int64_t) cJSON_GetObjectItemCaseSensitive(j, "applied")->valuedouble;
	exec(n, "SAVEPOINT sync_network_send");
	rej = cJSON_GetObjectItemCaseSensitive(j, "rejected");
	if (cJSON_IsArray(rej))
	{
		cJSON	   *it;

		cJSON_ArrayForEach(it, rej)
		{
			cJSON	   *pk = cJSON_GetObjectItemCaseSensitive(it, "pk");
			char	   *pktext = pk ? cJSON_PrintUnformatted(pk) : NULL;
			cJSON	   *t = cJSON_GetObjectItemCaseSensitive(it, "table"),
					   *code = cJSON_GetObjectItemCaseSensitive(it, "code"),
					   *m = cJSON_GetObjectItemCaseSensitive(it, "message");
			char	   *sql = sqlite3_mprintf("INSERT INTO sync_network_rejected(at, tbl, pk, code, message) "
											  "VALUES(strftime('%%Y-%%m-%%dT%%H:%%M:%%SZ','now'), %Q, %Q, %Q, %Q)",
											  cJSON_IsString(t) ? t->valuestring : NULL, pktext,
											  cJSON_IsString(code) ? code->valuestring : NULL,
											  cJSON_IsString(m) ? m->valuestring : NULL);

			exec(n, sql);
			sqlite3_free(sql);
			cJSON_free(pktext);
			nrej++;
		}
	}
	{
		cJSON	   *site = cJSON_GetObjectItemCaseSensitive(j, "server_site");

		if (cJSON_IsString(site) && strlen(site->valuestring) == 36)
			kv_set(n, "server_site", site->valuestring);
	}
	if (until > s->send_cursor)
	{
		kv_set_int(n, "send_cursor", until);
		s->send_cursor = until;
	}
	succeeded(n);
	exec(n, "RELEASE sync_network_send");
	out = sqlite3_mprintf("{\"sent_bytes\":%zu,\"applied\":%lld,\"rejected\":%lld,\"send_cursor\":%lld}",
						  len, (long long) applied, (long long) nrej, (long long) s->send_cursor);
out:
	cJSON_Delete(j);
	resp_free(&r);
	sqlite3_free(payload);
	return out;
}

/* ---- receive ----------------------------------------------------------------- */

/* apply_received merges one pulled payload and moves the cursors, atomically. */
static bool
apply_received(net *n, settings *s, const resp *r, int64_t *won, char **msg)
{
	sqlite3_stmt *st;
	int64_t		v0 = 0,
				v1 = 0;
	char		cur[24];
	const char *cursor = r->cursor;

	if (!cursor[0])
	{
		snprintf(cur, sizeof cur, "%lld", (long long) le64(r->body + 32));
		cursor = cur;
	}
	if (!exec(n, "SAVEPOINT sync_network_recv"))
	{
		*msg = sqlite3_mprintf("%s", sqlite3_errmsg(n->db));
		return false;
	}
	query_int(n, "SELECT sync_db_version()", &v0);
	if (sqlite3_prepare_v2(n->db, "SELECT sync_apply_payload(?1)", -1, &st, NULL) != SQLITE_OK)
		goto fail;
	sqlite3_bind_blob64(st, 1, r->body, r->len, SQLITE_STATIC);
	if (sqlite3_step(st) != SQLITE_ROW)
	{
		*msg = sqlite3_mprintf("applying the server's payload failed: %s", sqlite3_errmsg(n->db));
		sqlite3_finalize(st);
		goto rollback;
	}
	*won += sqlite3_column_int64(st, 0);
	sqlite3_finalize(st);
	query_int(n, "SELECT sync_db_version()", &v1);
	if (!kv_set(n, "recv_cursor", cursor) ||
		(r->site[0] && !kv_set(n, "server_site", r->site)))
		goto fail;
	/* nothing was pending: the apply's own version needs no sending back */
	if (s->send_cursor == v0 && v1 > v0)
	{
		if (!kv_set_int(n, "send_cursor", v1))
			goto fail;
		s->send_cursor = v1;
	}
	if (!exec(n, "RELEASE sync_network_recv"))
		goto fail;
	sqlite3_free(s->recv_cursor);
	s->recv_cursor = sqlite3_mprintf("%s", cursor);
	if (r->site[0])
	{
		sqlite3_free(s->server_site);
		s->server_site = sqlite3_mprintf("%s", r->site);
	}
	return true;
fail:
	*msg = sqlite3_mprintf("%s", sqlite3_errmsg(n->db));
rollback:
	exec(n, "ROLLBACK TO sync_network_recv");
	exec(n, "RELEASE sync_network_recv");
	return false;
}

/*
 * do_receive pulls until the server has nothing more; the first request may
 * wait (long-poll). Returns JSON (sqlite3_malloc) or NULL + *msg.
 */
static char *
do_receive(net *n, settings *s, int64_t wait_ms, int64_t *npayloads, char **msg)
{
	char		site[40] = "";
	sqlite3_stmt *st;
	int64_t		won = 0;
	size_t		bytes = 0;

	*npayloads = 0;
	*msg = NULL;
	if (sqlite3_prepare_v2(n->db, "SELECT sync_site_id()", -1, &st, NULL) == SQLITE_OK)
	{
		if (sqlite3_step(st) == SQLITE_ROW && sqlite3_column_bytes(st, 0) == 36)
			memcpy(site, sqlite3_column_text(st, 0), 37);
		sqlite3_finalize(st);
	}
	if (!site[0])
	{
		*msg = sqlite3_mprintf("%s", sqlite3_errmsg(n->db));
		return NULL;
	}
	for (int round = 0; round < 100000; round++)
	{
		resp		r = {0};
		char	   *path = sqlite3_mprintf("/v1/pull?since=%s&exclude=%s&wait=%lld",
										   s->recv_cursor ? s->recv_cursor : "0", site,
										   (long long) (round == 0 ? wait_ms : 0));
		bool		more;

		if (!http_call(n, s, path, NULL, 0, round == 0 ? wait_ms : 0, &r, msg))
		{
			sqlite3_free(path);
			resp_free(&r);
			return NULL;
		}
		sqlite3_free(path);
		if (r.status == 200)
		{
			if (r.len < 56 || !apply_received(n, s, &r, &won, msg))
			{
				if (!*msg)
					*msg = sqlite3_mprintf("the server sent %zu bytes that are not a payload", r.len);
				resp_free(&r);
				return NULL;
			}
			bytes += r.len;
			(*npayloads)++;
		}
		else if (r.cursor[0] && (!s->recv_cursor || strcmp(r.cursor, s->recv_cursor) != 0))
		{
			kv_set(n, "recv_cursor", r.cursor);	/* 204 may move the cursor too */
			sqlite3_free(s->recv_cursor);
			s->recv_cursor = sqlite3_mprintf("%s", r.cursor);
		}
		if (r.site[0] && (!s->server_site || strcmp(r.site, s->server_site) != 0))
		{
			kv_set(n, "server_site", r.site);
			sqlite3_free(s->server_site);
			s->server_site = sqlite3_mprintf("%s", r.site);
		}
		more = r.status == 200 && r.more;
		resp_free(&r);
		if (!more)
			break;
	}
	succeeded(n);
	return sqlite3_mprintf("{\"payloads\":%lld,\"received_bytes\":%zu,\"applied\":%lld,\"recv_cursor\":\"%s\"}",
						   (long long) *npayloads, bytes, (long long) won, s->recv_cursor ? s->recv_cursor : "0");
}

/* ---- SQL functions ------------------------------------------------------------ */

static void
result_json(sqlite3_context *ctx, char *json)
{
	sqlite3_result_text(ctx, json, -1, sqlite3_free);
	sqlite3_result_subtype(ctx, 'J');
}

static void
sync_network_init(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	net		   *n = sqlite3_user_data(ctx);
	const char *url = (const char *) sqlite3_value_text(argv[0]);
	char	   *clean,
			   *old;
	size_t		len;

	if (!url || (strncmp(url, "http://", 7) != 0 && strncmp(url, "https://", 8) != 0))
	{
		sqlite3_result_error(ctx, "sync_network_init: url must start with http:// or https://, e.g. 'https://sync.example.com'", -1);
		return;
	}
	len = strlen(url);
	while (len && url[len - 1] == '/')
		len--;
	clean = sqlite3_mprintf("%.*s", (int) len, url);
	if (!clean || !exec(n, meta_sql) || !exec(n, "SAVEPOINT sync_network_init"))
	{
		sqlite3_free(clean);
		sqlite3_result_error(ctx, sqlite3_errmsg(n->db), -1);
		return;
	}
	old = kv_text(n, "url");
	if (!old || strcmp(old, clean) != 0)
	{
		/* another server: it has none of our changes, and other cursors */
		kv_set(n, "send_cursor", "0");
		kv_set(n, "recv_cursor", NULL);
		kv_set(n, "server_site", NULL);
	}
	kv_set(n, "url", clean);
	if (argc > 1)
		kv_set(n, "token", (const char *) sqlite3_value_text(argv[1]));
	exec(n, "RELEASE sync_network_init");
	sqlite3_free(old);
	sqlite3_free(clean);
	sqlite3_result_int(ctx, 1);
}

static void
sync_network_set_token(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	net		   *n = sqlite3_user_data(ctx);
	settings	s;

	(void) argc;
	if (!need_settings(ctx, n, "sync_network_set_token", &s))
		return;
	free_settings(&s);
	if (!kv_set(n, "token", (const char *) sqlite3_value_text(argv[0])))
	{
		sqlite3_result_error(ctx, sqlite3_errmsg(n->db), -1);
		return;
	}
	sqlite3_result_int(ctx, 1);
}

static void
sync_network_send(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	net		   *n = sqlite3_user_data(ctx);
	settings	s;
	char	   *msg,
			   *json;

	(void) argc, (void) argv;
	if (!need_settings(ctx, n, "sync_network_send", &s))
		return;
	if ((json = do_send(n, &s, &msg)) != NULL)
		result_json(ctx, json);
	else
		fail(ctx, n, "sync_network_send", "%s", msg);
	sqlite3_free(msg);
	free_settings(&s);
}

static void
sync_network_receive(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	net		   *n = sqlite3_user_data(ctx);
	settings	s;
	char	   *msg,
			   *json;
	int64_t		np;

	(void) argc, (void) argv;
	if (!need_settings(ctx, n, "sync_network_receive", &s))
		return;
	if ((json = do_receive(n, &s, 0, &np, &msg)) != NULL)
		result_json(ctx, json);
	else
		fail(ctx, n, "sync_network_receive", "%s", msg);
	sqlite3_free(msg);
	free_settings(&s);
}

static void
sync_network_sync(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	net		   *n = sqlite3_user_data(ctx);
	settings	s;
	char	   *msg,
			   *sent,
			   *recv;
	int64_t		np;

	(void) argc, (void) argv;
	if (!need_settings(ctx, n, "sync_network_sync", &s))
		return;
	if (!(sent = do_send(n, &s, &msg)))
		fail(ctx, n, "sync_network_sync", "sending failed: %s", msg);
	else if (!(recv = do_receive(n, &s, 0, &np, &msg)))
		fail(ctx, n, "sync_network_sync", "local changes were sent, but receiving failed: %s", msg);
	else
	{
		result_json(ctx, sqlite3_mprintf("{\"send\":%s,\"receive\":%s}", sent, recv));
		sqlite3_free(recv);
	}
	sqlite3_free(sent);
	sqlite3_free(msg);
	free_settings(&s);
}

static void
sync_network_wait(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	net		   *n = sqlite3_user_data(ctx);
	settings	s;
	char	   *msg,
			   *json;
	int64_t		timeout = sqlite3_value_int64(argv[0]),
				np;

	(void) argc;
	if (sqlite3_value_type(argv[0]) != SQLITE_INTEGER || timeout < 0)
	{
		sqlite3_result_error(ctx, "sync_network_wait: timeout_ms must be a non-negative integer", -1);
		return;
	}
	if (!need_settings(ctx, n, "sync_network_wait", &s))
		return;
	if ((json = do_receive(n, &s, timeout, &np, &msg)) != NULL)
		sqlite3_result_int(ctx, np > 0);
	else
		fail(ctx, n, "sync_network_wait", "%s", msg);
	sqlite3_free(json);
	sqlite3_free(msg);
	free_settings(&s);
}

static void
sync_network_status(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	net		   *n = sqlite3_user_data(ctx);
	settings	s;
	cJSON	   *j;
	char	   *text,
			   *v;
	int64_t		x,
				pending = 0;
	pgs_err		err;

	(void) argc, (void) argv;
	if (!need_settings(ctx, n, "sync_network_status", &s))
		return;
	j = cJSON_CreateObject();
	cJSON_AddStringToObject(j, "url", s.url);
	if (query_int(n, "SELECT 1 FROM sync_state", &x))
	{
		sqlite3_stmt *st;

		if (sqlite3_prepare_v2(n->db, "SELECT sync_site_id(), sync_db_version()", -1, &st, NULL) == SQLITE_OK &&
			sqlite3_step(st) == SQLITE_ROW)
		{
			cJSON_AddStringToObject(j, "site_id", (const char *) sqlite3_column_text(st, 0));
			cJSON_AddNumberToObject(j, "db_version", (double) sqlite3_column_int64(st, 1));
		}
		sqlite3_finalize(st);
		/* rows whose clock moved past the acknowledged version */
		if (sl_load(n->c, &err) == PGS_OK)
			for (int i = 0; i < n->c->ntables; i++)
			{
				char	   *sql = sqlite3_mprintf("SELECT count(*) FROM %s WHERE ver > %lld",
												  n->c->tables[i]->qclock, (long long) s.send_cursor);

				if (sql && query_int(n, sql, &x))
					pending += x;
				sqlite3_free(sql);
			}
	}
	cJSON_AddStringToObject(j, "server_site", s.server_site ? s.server_site : "");
	cJSON_AddNumberToObject(j, "send_cursor", (double) s.send_cursor);
	cJSON_AddStringToObject(j, "recv_cursor", s.recv_cursor ? s.recv_cursor : "0");
	cJSON_AddNumberToObject(j, "pending_rows", (double) pending);
	v = kv_text(n, "last_sync");
	cJSON_AddItemToObject(j, "last_sync", v ? cJSON_CreateString(v) : cJSON_CreateNull());
	sqlite3_free(v);
	v = kv_text(n, "last_error");
	cJSON_AddItemToObject(j, "last_error", v ? cJSON_CreateString(v) : cJSON_CreateNull());
	sqlite3_free(v);
	cJSON_AddNumberToObject(j, "failures", (double) kv_int(n, "failures", 0));
	cJSON_AddNumberToObject(j, "rejected", query_int(n, "SELECT count(*) FROM sync_network_rejected", &x) ? (double) x : 0);
	cJSON_AddBoolToObject(j, "has_token", s.token != NULL);
	text = cJSON_PrintUnformatted(j);
	cJSON_Delete(j);
	if (text)
	{
		result_json(ctx, sqlite3_mprintf("%s", text));
		cJSON_free(text);
	}
	else
		sqlite3_result_error_nomem(ctx);
	free_settings(&s);
}

/* ---- registration ------------------------------------------------------------ */

static void
net_free(void *arg)
{
	net		   *n = arg;

	if (n->curl)
		curl_easy_cleanup(n->curl);
	sqlite3_free(n);
}

static const struct
{
	const char *name;
	int			nargs;
	void		(*fn) (sqlite3_context *, int, sqlite3_value **);
}			functions[] =
{
	{"sync_network_init", 1, sync_network_init},
	{"sync_network_init", 2, sync_network_init},
	{"sync_network_set_token", 1, sync_network_set_token},
	{"sync_network_send", 0, sync_network_send},
	{"sync_network_receive", 0, sync_network_receive},
	{"sync_network_sync", 0, sync_network_sync},
	{"sync_network_wait", 1, sync_network_wait},
	{"sync_network_status", 0, sync_network_status},
};

int
sl_network_register(sqlite3 *db, db_conn *c)
{
	static int	curl_ready = 0;
	const size_t nf = sizeof functions / sizeof functions[0];
	net		   *n;

	if (!curl_ready)
	{
		if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
			return SQLITE_ERROR;
		curl_ready = 1;
	}
	if (!(n = sqlite3_malloc(sizeof *n)))
		return SQLITE_NOMEM;
	memset(n, 0, sizeof *n);
	n->db = db;
	n->c = c;
	for (size_t i = 0; i < nf; i++)
	{
		/* network calls have side effects: never from triggers or views */
		int			rc = sqlite3_create_function_v2(db, functions[i].name, functions[i].nargs,
													SQLITE_UTF8 | SQLITE_DIRECTONLY, n,
													functions[i].fn, NULL, NULL,
													i == nf - 1 ? net_free : NULL);

		if (rc != SQLITE_OK)
		{
			if (i < nf - 1)
				net_free(n);
			return rc;
		}
	}
	return SQLITE_OK;
}
