/*
 * sl_network.c — sync_network_*: sync this SQLite database with a
 * pgsync-server over HTTP (protocol: docs/PROTOCOL.md; transport: sl_http.c).
 *
 *   sync_network_init(url [, token])   where to sync; resets the cursors when the url changes
 *   sync_network_set_token(token)      a new bearer token (e.g. after 401)
 *   sync_network_send()                push local changes           -> JSON summary
 *   sync_network_receive()             pull and apply remote changes -> JSON summary
 *   sync_network_sync()                send, then receive            -> JSON summary
 *   sync_network_wait(timeout_ms)      long-poll: apply what arrives -> 'changes', or
 *                                      'timeout' / 'offline' / 'unavailable' at timeout
 *   sync_network_status()              cursors, pending rows, progress, typed last error -> JSON
 *   sync_network_start([options]) / sync_network_stop()   the background syncer
 *                                      (sl_background.c, docs/CLIENT.md)
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
 * Failures (policy in sl_http.c): offline fails at once and changes nothing;
 * transient failures are retried with exponential backoff and jitter. Every
 * failure is recorded in last_error (a JSON object with a stable code,
 * docs/CLIENT.md) and failures for sync_network_status(), and
 * a server whose database was replaced (another site id, or a 409 "cursor
 * ahead of server") makes the client resend and re-pull everything.
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
#include <time.h>

#include <cjson/cJSON.h>

static const char meta_sql[] =
	"CREATE TABLE IF NOT EXISTS sync_network(key TEXT PRIMARY KEY, value) WITHOUT ROWID;";

/* ---- the sync_network table -------------------------------------------------- */

static bool
exec(sl_net *n, const char *sql)
{
	pgs_err ignore;

	if (sql == meta_sql)
	{
		/* once per connection (a background syncer reads its settings often);
		 * the app dropping the tables later is not something we survive */
		if (!n->meta_ready)
			n->meta_ready =
				sqlite3_exec(n->db, sql, NULL, NULL, NULL) == SQLITE_OK && sl_rejected_meta(n->db);
		return n->meta_ready;
	}
	return sl_exec(n->c, sql, &ignore) == PGS_OK; /* a single statement is kept (sl_stmt) */
}

/* kv_text: the value of key as text (sqlite3_free it), or NULL. */
static char *
kv_text(sl_net *n, const char *key)
{
	sqlite3_stmt *st;
	char		 *v = NULL;

	if (sl_stmt_prepare(n->c, "SELECT value FROM sync_network WHERE key = ?1", &st) != SQLITE_OK)
		return NULL;
	sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
	if (sqlite3_step(st) == SQLITE_ROW && sqlite3_column_type(st, 0) != SQLITE_NULL)
		v = sqlite3_mprintf("%s", sqlite3_column_text(st, 0));
	sl_stmt_done(n->c, st);
	return v;
}

static int64_t
kv_int(sl_net *n, const char *key, int64_t def)
{
	char   *v = kv_text(n, key);
	int64_t r = def;

	if (v && *v)
		r = strtoll(v, NULL, 10);
	sqlite3_free(v);
	return r;
}

static bool
kv_set(sl_net *n, const char *key, const char *value)
{
	sqlite3_stmt *st;
	int			  rc;

	if (!value)
	{
		/* a key that is not there costs no write transaction (the progress
		 * row, cleared after every receive, is there only in long ones) */
		char *v = kv_text(n, key);

		if (!v)
			return true;
		sqlite3_free(v);
	}
	if (sl_stmt_prepare(n->c,
						value ? "INSERT OR REPLACE INTO sync_network(key, value) VALUES(?1, ?2)"
							  : "DELETE FROM sync_network WHERE key = ?1",
						&st) != SQLITE_OK)
		return false;
	sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
	if (value)
		sqlite3_bind_text(st, 2, value, -1, SQLITE_STATIC);
	rc = sqlite3_step(st);
	sl_stmt_done(n->c, st);
	return rc == SQLITE_DONE;
}

static bool
kv_set_int(sl_net *n, const char *key, int64_t v)
{
	char buf[24];

	snprintf(buf, sizeof buf, "%lld", (long long) v);
	return kv_set(n, key, buf);
}

static void
free_settings(sl_net_settings *s)
{
	sqlite3_free(s->url);
	sqlite3_free(s->token);
	sqlite3_free(s->server_site);
	sqlite3_free(s->recv_cursor);
	sqlite3_free(s->ca_file);
	memset(s, 0, sizeof *s);
}

static bool
load_settings(sl_net *n, sl_net_settings *s)
{
	/* one read of the table, not one statement per key */
	static const char *const text_keys[] = {"url", "token", "server_site", "recv_cursor",
											"ca_file"};
	static const char *const int_keys[] = {"send_cursor",		"retries",	  "backoff_ms",
										   "backoff_max_ms",	"timeout_ms", "max_payload",
										   "connect_timeout_ms"};
	char   **texts[] = {&s->url, &s->token, &s->server_site, &s->recv_cursor, &s->ca_file};
	int64_t *ints[] = {&s->send_cursor, &s->retries,	 &s->backoff_ms,		&s->backoff_max_ms,
					   &s->timeout_ms,	&s->max_payload, &s->connect_timeout_ms};
	sqlite3_stmt *st;

	memset(s, 0, sizeof *s);
	s->retries = 3;
	s->backoff_ms = 200;
	s->backoff_max_ms = 5000;
	s->connect_timeout_ms = 3000;
	s->timeout_ms = 30000;
	s->max_payload = 256LL << 20;
	if (!exec(n, meta_sql) || !(st = sl_stmt(n->c, "SELECT key, value FROM sync_network")))
		return false;
	while (sqlite3_step(st) == SQLITE_ROW)
	{
		const char *k = (const char *) sqlite3_column_text(st, 0);
		const char *v = (const char *) sqlite3_column_text(st, 1);

		if (!k || !v)
			continue;
		for (size_t i = 0; i < sizeof text_keys / sizeof text_keys[0]; i++)
			if (strcmp(k, text_keys[i]) == 0 && !*texts[i])
				*texts[i] = sqlite3_mprintf("%s", v);
		for (size_t i = 0; i < sizeof int_keys / sizeof int_keys[0]; i++)
			if (strcmp(k, int_keys[i]) == 0 && *v)
				*ints[i] = strtoll(v, NULL, 10);
	}
	sl_stmt_done(n->c, st);
	if (!s->url)
	{
		free_settings(s);
		return false;
	}
	if (s->retries < 0)
		s->retries = 0;
	return true;
}

/* ---- errors ------------------------------------------------------------------- */

static char *now_iso(void);

/*
 * set_error stores last_error as {"code","http_status","message","at"}
 * (docs/CLIENT.md, "Status and errors"); count adds one to failures.
 */
static void
set_error(sl_net *n, const char *code, long status, const char *message, bool count)
{
	cJSON *o = cJSON_CreateObject();
	char  *at = now_iso(), *text;

	cJSON_AddStringToObject(o, "code", code);
	if (status)
		cJSON_AddNumberToObject(o, "http_status", (double) status);
	else
		cJSON_AddNullToObject(o, "http_status");
	cJSON_AddStringToObject(o, "message", message ? message : "");
	cJSON_AddStringToObject(o, "at", at ? at : "");
	sqlite3_free(at);
	text = cJSON_PrintUnformatted(o);
	cJSON_Delete(o);
	if (text)
		kv_set(n, "last_error", text);
	cJSON_free(text);
	if (count)
		kv_set_int(n, "failures", kv_int(n, "failures", 0) + 1);
}

/* sl_net_record_error records a failure of fn (initialized databases only). */
void
sl_net_record_error(sl_net *n, const char *fn, const char *msg)
{
	char *url = kv_text(n, "url");
	char *full = sqlite3_mprintf("%s: %s", fn, msg ? msg : "out of memory");

	if (url)
		set_error(n, n->err_code ? n->err_code : "local", n->err_status, full, true);
	sqlite3_free(url);
	sqlite3_free(full);
}

/* fail raises fn's error and records it for sync_network_status(). */
static void
fail(sqlite3_context *ctx, sl_net *n, const char *fn, const char *fmt, ...)
{
	va_list ap;
	char   *m, *full;

	va_start(ap, fmt);
	m = sqlite3_vmprintf(fmt, ap);
	va_end(ap);
	sl_net_record_error(n, fn, m);
	full = sqlite3_mprintf("%s: %s", fn, m ? m : "out of memory");
	sqlite3_result_error(ctx, full ? full : "sync_network: out of memory", -1);
	sqlite3_free(m);
	sqlite3_free(full);
}

static bool
need_settings(sqlite3_context *ctx, sl_net *n, const char *fn, sl_net_settings *s)
{
	if (load_settings(n, s))
		return true;
	free_settings(s);
	sqlite3_result_error(
		ctx,
		sqlite3_mprintf(
			"%s: no server configured; call sync_network_init('http://host:port') first", fn),
		-1);
	return false;
}

/* ---- small SQL helpers ------------------------------------------------------- */

static bool
query_int(sl_net *n, const char *sql, int64_t *out)
{
	sqlite3_stmt *st;
	bool		  ok = false;

	if (sl_stmt_prepare(n->c, sql, &st) != SQLITE_OK)
		return false;
	if (sqlite3_step(st) == SQLITE_ROW)
	{
		*out = sqlite3_column_int64(st, 0);
		ok = true;
	}
	sl_stmt_done(n->c, st);
	return ok;
}

static char *
now_iso(void)
{
	char	  b[32];
	time_t	  t = time(NULL);
	struct tm tm;

	gmtime_r(&t, &tm);
	strftime(b, sizeof b, "%Y-%m-%dT%H:%M:%SZ", &tm);
	return sqlite3_mprintf("%s", b);
}

/* succeeded clears the failure state; writes only what changed (a background
 * syncer's idle pushes must not make a write transaction each). */
static void
succeeded(sl_net *n)
{
	char *t = now_iso(), *last = kv_text(n, "last_sync"), *err = kv_text(n, "last_error");

	if (!last || !t || strcmp(last, t) != 0)
		kv_set(n, "last_sync", t);
	if (err)
		kv_set(n, "last_error", NULL);
	if (kv_int(n, "failures", 0) != 0)
		kv_set(n, "failures", "0");
	sqlite3_free(t);
	sqlite3_free(last);
	sqlite3_free(err);
}

/*
 * forget_server resets both cursors: the database behind the url is not the
 * one we synced with (another site id, or restored from a backup), so it
 * may lack anything we sent and its versions mean nothing to us. Sending
 * and pulling everything again is safe: merges are idempotent.
 */
static void
forget_server(sl_net *n, sl_net_settings *s, const char *site, const char *why)
{
	char *m = sqlite3_mprintf("server changed (%s): sending and receiving everything again", why);
	char *copy = site ? sqlite3_mprintf("%s", site) : NULL; /* site may be s->server_site */

	set_error(n, "server_replaced", 0, m, false);
	sqlite3_free(m);
	kv_set(n, "send_cursor", "0");
	kv_set(n, "recv_cursor", NULL);
	kv_set(n, "server_site", copy);
	s->send_cursor = 0;
	sqlite3_free(s->recv_cursor);
	s->recv_cursor = NULL;
	sqlite3_free(s->server_site);
	s->server_site = copy;
}

/* ---- progress (docs/CLIENT.md, "Progress") ------------------------------------ */

/* payload_rows: the number of row groups in a payload, -1 if it cannot be read. */
static int64_t
payload_rows(const uint8_t *p, size_t len)
{
	pgs_header	   h;
	const uint8_t *body;
	uint8_t		  *owned = NULL;
	pgs_reader	   r;
	pgs_group	   g;
	bool		   done = false;
	int64_t		   n = 0;
	pgs_err		   err;

	if (pgs_payload_body(p, len, &h, &body, &owned, &err) != PGS_OK)
		return -1;
	if (pgs_reader_open(&r, h.version, body, h.body_len, &err) != PGS_OK)
		n = -1;
	else
	{
		while (!done && pgs_reader_next(&r, &g, &done, &err) == PGS_OK)
			n += !done;
		if (!done)
			n = -1;
		pgs_reader_close(&r);
	}
	pgs_free(owned);
	return n;
}

typedef struct progress
{
	const char *phase;
	int64_t		rows_done;
	int64_t		bytes_done;
	int64_t		rows_total;	 /* -1 = unknown */
	int64_t		bytes_total; /* -1 = unknown */
	char		started_at[32];
} progress;

static void
progress_start(progress *pr, const char *phase)
{
	time_t	  t = time(NULL);
	struct tm tm;

	memset(pr, 0, sizeof *pr);
	pr->phase = phase;
	pr->rows_total = pr->bytes_total = -1;
	gmtime_r(&t, &tm);
	strftime(pr->started_at, sizeof pr->started_at, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

/* progress_store writes the progress row (in the caller's transaction). */
static bool
progress_store(sl_net *n, const progress *pr)
{
	cJSON *o = cJSON_CreateObject();
	char  *v;
	bool   ok = false;

	cJSON_AddStringToObject(o, "phase", pr->phase);
	cJSON_AddNumberToObject(o, "rows_done", (double) pr->rows_done);
	cJSON_AddNumberToObject(o, "bytes_done", (double) pr->bytes_done);
	if (pr->rows_total >= 0)
		cJSON_AddNumberToObject(o, "rows_total", (double) pr->rows_total);
	else
		cJSON_AddNullToObject(o, "rows_total");
	if (pr->bytes_total >= 0)
		cJSON_AddNumberToObject(o, "bytes_total", (double) pr->bytes_total);
	cJSON_AddStringToObject(o, "started_at", pr->started_at);
	if ((v = cJSON_PrintUnformatted(o)) != NULL)
		ok = kv_set(n, "progress", v);
	cJSON_free(v);
	cJSON_Delete(o);
	return ok;
}

/* ---- send ------------------------------------------------------------------- */

/*
 * send_once pushes pending changes once; returns JSON (sqlite3_malloc) or
 * NULL + *msg; *again when a row must go out again at once (PS001).
 */
static char *
send_once(sl_net *n, sl_net_settings *s, bool *again, char **msg)
{
	sqlite3_stmt *st;
	int64_t		  safe, until, applied = 0, nrej = 0, old = s->send_cursor, rows = 0;
	progress	  pr;
	uint8_t		 *payload = NULL;
	size_t		  len = 0;
	sl_net_resp	  r = {0};
	cJSON		 *j = NULL;
	char		 *out = NULL;
	int			  rc;

	*msg = NULL;
	*again = false;
	/* refused rows the app changed since go out whole */
	if (!exec(n, "SAVEPOINT sync_network_whole") || !sl_rejected_before_send(n, s->send_cursor) ||
		!exec(n, "RELEASE sync_network_whole"))
	{
		*msg = sqlite3_mprintf("%s", sqlite3_errmsg(n->db));
		exec(n, "ROLLBACK TO sync_network_whole; RELEASE sync_network_whole");
		return NULL;
	}
	if (!query_int(n, "SELECT sync_db_version()", &safe))
	{
		*msg = sqlite3_mprintf("%s", sqlite3_errmsg(n->db));
		return NULL;
	}
	if (sl_stmt_prepare(n->c, "SELECT sync_payload(?1, ?2)", &st) != SQLITE_OK)
	{
		*msg = sqlite3_mprintf("%s", sqlite3_errmsg(n->db));
		return NULL;
	}
	sqlite3_bind_int64(st, 1, s->send_cursor);
	if (s->server_site)
		sqlite3_bind_text(st, 2, s->server_site, -1, SQLITE_STATIC);
	n->c->pushing = true; /* edits of lives the server knew never go whole */
	rc = sqlite3_step(st);
	n->c->pushing = false;
	if (rc != SQLITE_ROW)
	{
		*msg = sqlite3_mprintf("%s", sqlite3_errmsg(n->db));
		sl_stmt_done(n->c, st);
		return NULL;
	}
	if (sqlite3_column_type(st, 0) == SQLITE_BLOB && sqlite3_column_bytes(st, 0) >= PGS_HEADER_LEN)
	{
		len = (size_t) sqlite3_column_bytes(st, 0);
		/* copy, so that no statement (read lock) stays open during the upload */
		if ((payload = sqlite3_malloc64(len)) != NULL)
			memcpy(payload, sqlite3_column_blob(st, 0), len);
	}
	sl_stmt_done(n->c, st);
	if (len && !payload)
	{
		*msg = sqlite3_mprintf("out of memory copying a payload of %lld bytes", (long long) len);
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
		return sqlite3_mprintf("{\"sent_bytes\":0,\"rows_sent\":0,\"columns_applied\":0,"
							   "\"applied\":0,\"rejected\":0,\"send_cursor\":%lld}",
							   (long long) s->send_cursor);
	}
	if (pgs_payload_until(payload, len, &until, NULL) != PGS_OK ||
		(rows = payload_rows(payload, len)) < 0)
	{
		*msg = sqlite3_mprintf("sync_payload returned bytes that are not a payload");
		goto out;
	}
	/* visible to every connection while the push is in flight */
	progress_start(&pr, "send");
	pr.rows_total = rows;
	pr.bytes_total = (int64_t) len;
	progress_store(n, &pr);
	if (!sl_http_call(n, s, "/v1/push", payload, len, 0, &r, msg))
	{
		kv_set(n, "progress", NULL);
		goto out;
	}
	kv_set(n, "progress", NULL);
	j = cJSON_ParseWithLength((const char *) r.body, r.len);
	if (!cJSON_IsObject(j) || !cJSON_IsNumber(cJSON_GetObjectItemCaseSensitive(j, "applied")))
	{
		*msg = sqlite3_mprintf("the server's answer to a push is not the JSON of docs/PROTOCOL.md");
		goto out;
	}
	applied = (int64_t) cJSON_GetObjectItemCaseSensitive(j, "applied")->valuedouble;
	exec(n, "SAVEPOINT sync_network_send");
	{
		cJSON *site = cJSON_GetObjectItemCaseSensitive(j, "server_site");
		cJSON *rej = cJSON_GetObjectItemCaseSensitive(j, "rejected");

		if (cJSON_IsString(site) && strlen(site->valuestring) == 36 && s->server_site &&
			strcmp(s->server_site, site->valuestring) != 0)
			forget_server(n, s, site->valuestring, "another site id"); /* send all next time */
		else
		{
			if (cJSON_IsString(site) && strlen(site->valuestring) == 36)
				kv_set(n, "server_site", site->valuestring);
			if (until > s->send_cursor)
			{
				kv_set_int(n, "send_cursor", until);
				s->send_cursor = until;
			}
			/* every refused row listed; earlier refusals that went out resolved */
			if (cJSON_IsArray(rej) && !sl_rejected_after_push(n, rej, old, until, &nrej, again))
			{
				*msg = sqlite3_mprintf("recording the server's answer failed: %s",
									   sqlite3_errmsg(n->db));
				exec(n, "ROLLBACK TO sync_network_send; RELEASE sync_network_send");
				goto out;
			}
		}
	}
	succeeded(n);
	if (nrej > 0)
	{
		char *m = sqlite3_mprintf(
			"sync_network_send: the server refused %lld row%s of this push; see "
			"sync_network_rejected, then sync_network_retry() or sync_network_discard()",
			(long long) nrej, nrej == 1 ? "" : "s");

		set_error(n, "rejected", 0, m, false);
		sqlite3_free(m);
	}
	exec(n, "RELEASE sync_network_send");
	/* applied: the server's count of winning column changes (kept for old callers) */
	out = sqlite3_mprintf("{\"sent_bytes\":%lld,\"rows_sent\":%lld,\"columns_applied\":%lld,"
						  "\"applied\":%lld,\"rejected\":%lld,\"send_cursor\":%lld}",
						  (long long) len, (long long) rows, (long long) applied,
						  (long long) applied, (long long) nrej, (long long) s->send_cursor);
out:
	cJSON_Delete(j);
	sl_http_resp_free(&r);
	sqlite3_free(payload);
	return out;
}

/* do_send pushes pending changes (and, once, rows the server asked whole). */
static char *
do_send(sl_net *n, sl_net_settings *s, char **msg)
{
	bool  again;
	char *first;

	n->err_code = NULL;
	n->err_status = 0;
	first = send_once(n, s, &again, msg);

	if (first && again)
	{
		char *second = send_once(n, s, &again, msg);

		if (!second)
			return first; /* the first answer stands; the row goes next time */
		sqlite3_free(first);
		return second;
	}
	return first;
}

/* ---- receive ----------------------------------------------------------------- */

/* What a receive did, in rows and in columns (docs/CLIENT.md, "Counts"). */
typedef struct recv_totals
{
	int64_t	 rows; /* row groups received */
	int64_t	 inserted, updated, deleted, moved_out;
	int64_t	 columns; /* winning column changes + row-life changes (the old "applied") */
	progress pr;
} recv_totals;

/* apply_received merges one pulled payload and moves the cursors, atomically. */
static bool
apply_received(sl_net *n, sl_net_settings *s, const sl_net_resp *r, recv_totals *tot, char **msg)
{
	sqlite3_stmt	*st;
	int64_t			 v0 = 0, v1 = 0;
	char			 cur[24];
	const char		*cursor = r->cursor;
	pgs_apply_stats *a = &n->c->last_apply;
	bool			 own;

	if (!cursor[0])
	{
		int64_t until = 0;

		pgs_payload_until(r->body, r->len, &until, NULL);
		snprintf(cur, sizeof cur, "%lld", (long long) until);
		cursor = cur;
	}
	/* outside the app's transaction, take the write lock first: a deferred
	 * transaction that read before another connection committed could not
	 * write (SQLITE_BUSY_SNAPSHOT, which no busy timeout can wait out) */
	own = sqlite3_get_autocommit(n->db) && exec(n, "BEGIN IMMEDIATE");
	if (!exec(n, "SAVEPOINT sync_network_recv"))
	{
		*msg = sqlite3_mprintf("%s", sqlite3_errmsg(n->db));
		if (own)
			exec(n, "ROLLBACK");
		return false;
	}
	/* the committed counter (nothing of ours is pending inside this savepoint) */
	query_int(n, "SELECT db_version FROM sync_state", &v0);
	if (sl_stmt_prepare(n->c, "SELECT sync_apply_payload(?1)", &st) != SQLITE_OK)
		goto fail;
	sqlite3_bind_blob64(st, 1, r->body, r->len, SQLITE_STATIC);
	memset(a, 0, sizeof *a);
	n->c->protect_capped = true;
	n->c->protect_cap = r->acked;
	if (sqlite3_step(st) != SQLITE_ROW)
	{
		n->c->protect_capped = false;
		*msg = sqlite3_mprintf("applying the server's payload failed: %s", sqlite3_errmsg(n->db));
		sl_stmt_done(n->c, st);
		goto rollback;
	}
	n->c->protect_capped = false;
	sl_stmt_done(n->c, st);
	query_int(n, "SELECT db_version FROM sync_state", &v1);
	if (!kv_set(n, "recv_cursor", cursor) || (r->site[0] && !kv_set(n, "server_site", r->site)))
		goto fail;
	/* nothing was pending: the apply's own version needs no sending back
	 * (read the stored cursor inside the savepoint: another connection of
	 * this app may have moved it) */
	s->send_cursor = kv_int(n, "send_cursor", s->send_cursor);
	if (s->send_cursor == v0 && v1 > v0)
	{
		if (!kv_set_int(n, "send_cursor", v1))
			goto fail;
		s->send_cursor = v1;
	}
	/* progress moves with the chunk: other connections see it at commit */
	tot->pr.rows_done += a->rows;
	tot->pr.bytes_done += (int64_t) r->len;
	if (r->rows_total >= 0)
		tot->pr.rows_total = r->rows_total;
	if (r->more && !progress_store(n, &tot->pr))
		goto fail;
	if (!exec(n, "RELEASE sync_network_recv") || (own && !exec(n, "COMMIT")))
		goto fail;
	tot->rows += a->rows;
	tot->inserted += a->rows_inserted;
	tot->updated += a->rows_updated;
	tot->deleted += a->rows_deleted;
	tot->moved_out += a->rows_forgotten;
	tot->columns += a->won;
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
	if (own && !sqlite3_get_autocommit(n->db))
		exec(n, "ROLLBACK");
	return false;
}

/*
 * sl_net_pull_path: the pull request for the stored cursor (sqlite3_free it),
 * and in *acked the send_cursor as stored now, before the request: the apply
 * of its answer protects the rows pushed after it (sl_protect_load).
 */
char *
sl_net_pull_path(sl_net *n, const sl_net_settings *s, int64_t wait_ms, int64_t *acked)
{
	sqlite3_stmt *st;
	char		  rows[40] = "";
	const char	 *site = n->site;

	/* through sync_site_id() every time: it also checks that the synced
	 * tables are still usable (a renamed table fails here, with what to do) */
	n->site[0] = '\0';
	if (sl_stmt_prepare(n->c, "SELECT sync_site_id()", &st) == SQLITE_OK)
	{
		if (sqlite3_step(st) == SQLITE_ROW && sqlite3_column_bytes(st, 0) == 36)
			memcpy(n->site, sqlite3_column_text(st, 0), 37);
		sl_stmt_done(n->c, st);
	}
	if (!site[0])
		return NULL;
	*acked = kv_int(n, "send_cursor", 0);
	n->pull_gen = sl_recheck_begin(n); /* rows fetched before this request */
	if (n->chunk_rows > 0)
		snprintf(rows, sizeof rows, "&max_rows=%lld", (long long) n->chunk_rows);
	return sqlite3_mprintf("/v1/pull?since=%s&exclude=%s&wait=%lld%s",
						   s->recv_cursor ? s->recv_cursor : "0", site, (long long) wait_ms, rows);
}

/*
 * do_receive pulls until the server has nothing more; the first request may
 * wait (long-poll), or have been made already (first, taken over: freed
 * here). Returns JSON (sqlite3_malloc) or NULL + *msg.
 */
static char *
do_receive(sl_net *n, sl_net_settings *s, int64_t wait_ms, sl_net_resp *first, int64_t *npayloads,
		   char **msg)
{
	recv_totals tot;
	size_t		bytes = 0;
	bool		reset = false, requested = false, gone = false;
	int64_t		gen = first ? first->gen : -1; /* the first request's */

	*npayloads = 0;
	*msg = NULL;
	n->err_code = NULL;
	n->err_status = 0;
	memset(&tot, 0, sizeof tot);
	progress_start(&tot.pr, "receive");
	for (int round = 0; round < 100000; round++)
	{
		sl_net_resp r = {0};
		int64_t		acked = 0;
		char	   *path = sl_net_pull_path(n, s, round == 0 ? wait_ms : 0, &acked);
		bool		more, got;

		if (gen < 0)
			gen = n->pull_gen;
		if (!path)
		{
			*msg = sqlite3_mprintf("%s", sqlite3_errmsg(n->db));
			if (first)
				sl_http_resp_free(first);
			return NULL;
		}
		if (round == 0 && first)
		{
			r = *first; /* the long-poll's answer, a 2xx */
			memset(first, 0, sizeof *first);
			got = true;
		}
		else
		{
			requested |= got = sl_http_call(n, s, path, NULL, 0, round == 0 ? wait_ms : 0, &r, msg);
			r.acked = acked;
		}
		sqlite3_free(path);
		if (!got)
		{
			if (r.status == 410 && !gone && s->recv_cursor)
			{
				/*
				 * Our cursor is older than what the server collected (we were
				 * away longer than its retention): push what is unsent, then
				 * pull a snapshot, whose end forgets the rows the server no
				 * longer has (docs/PROTOCOL.md, 410).
				 */
				char *sent, *smsg = NULL;

				gone = true;
				sl_http_resp_free(&r);
				sqlite3_free(*msg);
				*msg = NULL;
				if (!(sent = do_send(n, s, &smsg)))
				{
					*msg = sqlite3_mprintf("the server collected deletes newer than our cursor "
										   "and pushing our changes first failed: %s",
										   smsg ? smsg : "unknown error");
					sqlite3_free(smsg);
					kv_set(n, "progress", NULL);
					return NULL;
				}
				sqlite3_free(sent);
				kv_set(n, "recv_cursor", NULL);
				sqlite3_free(s->recv_cursor);
				s->recv_cursor = NULL;
				continue;
			}
			if (r.status == 409 && !reset && s->recv_cursor)
			{
				/* our cursor is ahead of the server: its database was restored */
				forget_server(n, s, r.site[0] ? r.site : s->server_site,
							  "cursor ahead of the server");
				reset = true;
				sl_http_resp_free(&r);
				sqlite3_free(*msg);
				*msg = NULL;
				continue;
			}
			sl_http_resp_free(&r);
			kv_set(n, "progress", NULL);
			return NULL;
		}
		if (r.site[0] && s->server_site && strcmp(r.site, s->server_site) != 0 && !reset)
		{
			/* another database answers at this url: start over, discard this answer */
			forget_server(n, s, r.site, "another site id");
			reset = true;
			sl_http_resp_free(&r);
			continue;
		}
		if (r.status == 200)
		{
			if (r.len < PGS_HEADER_LEN || !apply_received(n, s, &r, &tot, msg))
			{
				if (!*msg)
					*msg = sqlite3_mprintf("the server sent %lld bytes that are not a payload",
										   (long long) r.len);
				n->err_code = r.len < PGS_HEADER_LEN ? "server" : "local";
				n->err_status = r.len < PGS_HEADER_LEN ? r.status : 0;
				sl_http_resp_free(&r);
				kv_set(n, "progress", NULL);
				return NULL;
			}
			bytes += r.len;
			(*npayloads)++;
		}
		else if (r.cursor[0] && (!s->recv_cursor || strcmp(r.cursor, s->recv_cursor) != 0))
		{
			kv_set(n, "recv_cursor", r.cursor); /* 204 may move the cursor too */
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
		sl_http_resp_free(&r);
		if (!more)
			break;
	}
	kv_set(n, "progress", NULL);
	/* held changes again; rows fetched before this pull, again; rows this
	 * device lacks, whole (sl_rejected.c) */
	{
		pgs_apply_stats fetched = {0};
		pgs_err			err = {0};
		bool			ok;

		ok = exec(n, "SAVEPOINT sync_network_held") && sl_events_begin(n->c, &err) == PGS_OK &&
			 sl_rejected_after_receive(n) && sl_events_end(n->c, &err) == PGS_OK;
		if (!ok)
		{
			/* the events' error is in err; the others are SQLite's */
			*msg = sqlite3_mprintf("trying held changes again failed: %s",
								   err.msg[0] ? err.msg : sqlite3_errmsg(n->db));
			sl_events_reset(n->c);
			exec(n, "ROLLBACK TO sync_network_held; RELEASE sync_network_held");
			n->err_code = "local";
			return NULL;
		}
		exec(n, "RELEASE sync_network_held");
		if ((gen > 0 && !sl_recheck_fetch(n, s, gen, &fetched, msg)) ||
			!sl_want_fetch(n, s, &fetched, msg))
			return NULL;
		tot.rows += fetched.rows;
		tot.inserted += fetched.rows_inserted;
		tot.updated += fetched.rows_updated;
		tot.deleted += fetched.rows_deleted;
		tot.moved_out += fetched.rows_forgotten;
		tot.columns += fetched.won;
	}
	/* an answer to a request made earlier (the long-poll) says nothing about
	 * the token of now: only a request of this call clears a failure */
	if (!first || requested)
		succeeded(n);
	return sqlite3_mprintf(
		"{\"payloads\":%lld,\"received_bytes\":%lld,\"rows\":%lld,\"rows_changed\":%lld,"
		"\"inserted\":%lld,\"updated\":%lld,\"deleted\":%lld,\"moved_out\":%lld,"
		"\"columns_changed\":%lld,\"applied\":%lld,\"recv_cursor\":\"%s\"%s}",
		(long long) *npayloads, (long long) bytes, (long long) tot.rows,
		(long long) (tot.inserted + tot.updated + tot.deleted + tot.moved_out),
		(long long) tot.inserted, (long long) tot.updated, (long long) tot.deleted,
		(long long) tot.moved_out, (long long) tot.columns, (long long) tot.columns,
		s->recv_cursor ? s->recv_cursor : "0", "");
}

/*
 * fetch_now: the discarded rows' server versions, fetched at once (POST
 * /v1/rows, as a receive does) when the app is not inside a transaction of
 * its own (a request must not run while the app holds the write lock; a
 * background syncer's receive may run beside it: each applies in its own
 * transaction). Offline or refused, the rows stay on the list for the next
 * receive, as before.
 */
static void
fetch_now(sl_net *n)
{
	sl_net_settings s;
	pgs_apply_stats st = {0};
	char		   *msg = NULL;

	if (!sqlite3_get_autocommit(n->db))
		return;
	if (!load_settings(n, &s))
	{
		free_settings(&s);
		return;
	}
	(void) sl_want_fetch(n, &s, &st, &msg);
	sqlite3_free(msg);
	free_settings(&s);
}

/* sync_network_discard([table, key]): sl_sync_network_discard (sl_rejected.c),
 * then the server's versions of what it gave up, at once (fetch_now). */
static void
sync_network_discard(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	sl_net *n = sqlite3_user_data(ctx);

	n->discarded = false;
	sl_sync_network_discard(ctx, argc, argv);
	if (n->discarded)
		fetch_now(n);
	n->discarded = false;
}

/* ---- for the background syncer (sl_background.c) ------------------------------- */

bool
sl_net_load_settings(sl_net *n, sl_net_settings *s)
{
	if (load_settings(n, s))
		return true;
	free_settings(s);
	return false;
}

void
sl_net_free_settings(sl_net_settings *s)
{
	free_settings(s);
}

char *
sl_net_kv_text(sl_net *n, const char *key)
{
	return kv_text(n, key);
}

char *
sl_net_send(sl_net *n, sl_net_settings *s, char **msg)
{
	char *json = do_send(n, s, msg);

	if (!json)
		sl_net_record_error(n, "background send", *msg);
	return json;
}

char *
sl_net_receive(sl_net *n, sl_net_settings *s, int64_t wait_ms, sl_net_resp *first,
			   int64_t *npayloads, char **msg)
{
	char *json = do_receive(n, s, wait_ms, first, npayloads, msg);

	if (!json)
		sl_net_record_error(n, "background receive", *msg);
	return json;
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
	sl_net	   *n = sqlite3_user_data(ctx);
	const char *url = (const char *) sqlite3_value_text(argv[0]);
	char	   *clean, *old;
	size_t		len;

	if (!url || (strncmp(url, "http://", 7) != 0 && strncmp(url, "https://", 8) != 0))
	{
		sqlite3_result_error(ctx,
							 "sync_network_init: url must start with http:// or https://, e.g. "
							 "'https://sync.example.com'",
							 -1);
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
	sl_net		   *n = sqlite3_user_data(ctx);
	sl_net_settings s;

	(void) argc;
	if (!need_settings(ctx, n, "sync_network_set_token", &s))
		return;
	free_settings(&s);
	if (!kv_set(n, "token", (const char *) sqlite3_value_text(argv[0])))
	{
		sqlite3_result_error(ctx, sqlite3_errmsg(n->db), -1);
		return;
	}
	if (n->bg)
		n->bg->kick(n); /* a syncer waiting for a new token tries at once */
	sqlite3_result_int(ctx, 1);
}

static void
sync_network_send(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	sl_net		   *n = sqlite3_user_data(ctx);
	sl_net_settings s;
	char		   *msg, *json;

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
	sl_net		   *n = sqlite3_user_data(ctx);
	sl_net_settings s;
	char		   *msg, *json;
	int64_t			np;

	(void) argc, (void) argv;
	if (!need_settings(ctx, n, "sync_network_receive", &s))
		return;
	if ((json = do_receive(n, &s, 0, NULL, &np, &msg)) != NULL)
		result_json(ctx, json);
	else
		fail(ctx, n, "sync_network_receive", "%s", msg);
	sqlite3_free(msg);
	free_settings(&s);
}

static void
sync_network_sync(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	sl_net		   *n = sqlite3_user_data(ctx);
	sl_net_settings s;
	char		   *msg, *sent, *recv, *send_msg = NULL;
	int64_t			np;

	(void) argc, (void) argv;
	if (!need_settings(ctx, n, "sync_network_sync", &s))
		return;
	/* the receive always runs: a failed send (or a refused row) blocks nothing */
	if (!(sent = do_send(n, &s, &msg)))
	{
		cJSON *e = cJSON_CreateObject();
		char  *txt;

		cJSON_AddStringToObject(e, "error", msg ? msg : "sending failed");
		txt = cJSON_PrintUnformatted(e);
		cJSON_Delete(e);
		sent = txt ? sqlite3_mprintf("%s", txt) : NULL;
		cJSON_free(txt);
		send_msg = msg;
		msg = NULL;
		if (n->unavailable)
			s.retries = 0; /* the server is out of reach: try the receive once */
	}
	if (!(recv = do_receive(n, &s, 0, NULL, &np, &msg)))
		fail(ctx, n, "sync_network_sync", "%s%s%sreceiving failed: %s",
			 send_msg ? "sending failed: " : "", send_msg ? send_msg : "", send_msg ? "; " : "",
			 msg);
	else
	{
		if (send_msg)
		{
			/* recorded for sync_network_status() */
			char *full = sqlite3_mprintf("sync_network_sync: sending failed: %s", send_msg);

			kv_set(n, "last_error", full);
			sqlite3_free(full);
		}
		result_json(ctx,
					sqlite3_mprintf("{\"send\":%s,\"receive\":%s}", sent ? sent : "null", recv));
		sqlite3_free(recv);
	}
	sqlite3_free(sent);
	sqlite3_free(msg);
	sqlite3_free(send_msg);
	free_settings(&s);
}

static int64_t
mono_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/*
 * sync_network_wait(timeout_ms): 'changes' when something was applied,
 * else at the timeout 'timeout', or 'offline' / 'unavailable' when the
 * server could not be reached: it retries with backoff and jitter until
 * the timeout instead of failing at once. With a background syncer for
 * this file, it waits for that syncer's change events instead of pulling.
 */
static void
sync_network_wait(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	sl_net		   *n = sqlite3_user_data(ctx);
	sl_net_settings s;
	char		   *msg = NULL, *json;
	int64_t			timeout = sqlite3_value_int64(argv[0]), np, deadline;
	int				w, attempt = 0;

	(void) argc;
	if (sqlite3_value_type(argv[0]) != SQLITE_INTEGER || timeout < 0)
	{
		sqlite3_result_error(ctx, "sync_network_wait: timeout_ms must be a non-negative integer",
							 -1);
		return;
	}
	if (!need_settings(ctx, n, "sync_network_wait", &s))
		return;
	if ((w = n->bg ? n->bg->wait(n, timeout) : -1) >= 0)
	{
		sqlite3_result_text(ctx, w ? "changes" : "timeout", -1, SQLITE_STATIC);
		free_settings(&s);
		return;
	}
	deadline = mono_ms() + timeout;
	s.retries = 0; /* the backoff is this loop's, bounded by the deadline */
	for (;;)
	{
		int64_t left = deadline - mono_ms();

		if ((json = do_receive(n, &s, left > 0 ? left : 0, NULL, &np, &msg)) != NULL)
		{
			sqlite3_free(json);
			attempt = 0;
			if (np > 0 || deadline - mono_ms() <= 0)
			{
				sqlite3_result_text(ctx, np > 0 ? "changes" : "timeout", -1, SQLITE_STATIC);
				break;
			}
			continue; /* the server answered early (its max_wait_ms): wait on */
		}
		if (!n->unavailable)
		{
			fail(ctx, n, "sync_network_wait", "%s", msg);
			break;
		}
		sl_net_record_error(n, "sync_network_wait", msg);
		sqlite3_free(msg);
		msg = NULL;
		left = deadline - mono_ms();
		if (left <= 0)
		{
			sqlite3_result_text(ctx, n->err_code ? n->err_code : "offline", -1, SQLITE_STATIC);
			break;
		}
		{
			/* backoff_ms * 2^attempt, capped, half fixed and half random */
			int64_t	 d = s.backoff_ms > 0 ? s.backoff_ms : 200;
			uint32_t rnd;

			for (int i = 0; i < attempt && d < s.backoff_max_ms; i++)
				d *= 2;
			if (d > s.backoff_max_ms)
				d = s.backoff_max_ms;
			sqlite3_randomness(sizeof rnd, &rnd);
			d = d / 2 + (int64_t) (rnd % (uint32_t) (d / 2 + 1));
			if (d > left)
				d = left;
			attempt++;
			sqlite3_sleep((int) d);
		}
	}
	sqlite3_free(msg);
	free_settings(&s);
}

/*
 * sl_jwt_exp: the exp claim of a JWT (seconds since 1970), 0 when the
 * token is not a JWT or has none. The signature is not checked: this is for
 * status only; the server decides.
 */
int64_t
sl_jwt_exp(const char *token)
{
	const char *a = token ? strchr(token, '.') : NULL, *b = a ? strchr(a + 1, '.') : NULL;
	uint8_t		buf[4096];
	long		len;
	cJSON	   *j, *exp;
	int64_t		r = 0;

	if (!b || (size_t) (b - a - 1) > sizeof buf * 4 / 3 ||
		(len = pgs_b64url_decode(a + 1, (size_t) (b - a - 1), buf, sizeof buf)) <= 0)
		return 0;
	j = cJSON_ParseWithLength((const char *) buf, (size_t) len);
	exp = cJSON_GetObjectItemCaseSensitive(j, "exp");
	if (cJSON_IsNumber(exp) && exp->valuedouble > 0 && exp->valuedouble < 253402300800.0)
		r = (int64_t) exp->valuedouble;
	cJSON_Delete(j);
	return r;
}

static void
add_time(cJSON *j, const char *name, int64_t t)
{
	char	  b[32];
	time_t	  tt = (time_t) t;
	struct tm tm;

	gmtime_r(&tt, &tm);
	strftime(b, sizeof b, "%Y-%m-%dT%H:%M:%SZ", &tm);
	cJSON_AddStringToObject(j, name, b);
}

/* add_json_kv adds key's stored JSON object (or null); text that is not JSON
 * (an older version's last_error) becomes {"code":"unknown","message":...}. */
static void
add_json_kv(cJSON *j, sl_net *n, const char *key, const char *name)
{
	char  *v = kv_text(n, key);
	cJSON *o = v ? cJSON_Parse(v) : NULL;

	if (v && !cJSON_IsObject(o))
	{
		cJSON_Delete(o);
		o = cJSON_CreateObject();
		cJSON_AddStringToObject(o, "code", "unknown");
		cJSON_AddNullToObject(o, "http_status");
		cJSON_AddStringToObject(o, "message", v);
	}
	cJSON_AddItemToObject(j, name, o ? o : cJSON_CreateNull());
	sqlite3_free(v);
}

static void
sync_network_status(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	sl_net		   *n = sqlite3_user_data(ctx);
	sl_net_settings s;
	cJSON		   *j, *pend, *by;
	char		   *text, *v;
	int64_t			x, pending = 0, exp;
	long			pid = 0;
	const char	   *state;
	pgs_err			err;

	(void) argc, (void) argv;
	if (!need_settings(ctx, n, "sync_network_status", &s))
		return;
	j = cJSON_CreateObject();
	by = cJSON_CreateObject();
	cJSON_AddStringToObject(j, "url", s.url);
	if (query_int(n, "SELECT 1 FROM sync_state", &x))
	{
		sqlite3_stmt *st;

		if (sqlite3_prepare_v2(n->db, "SELECT sync_site_id(), sync_db_version()", -1, &st, NULL) ==
				SQLITE_OK &&
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
				char *sql = sqlite3_mprintf("SELECT count(*) FROM %s WHERE ver > %lld",
											n->c->tables[i]->qclock, (long long) s.send_cursor);

				if (sql && query_int(n, sql, &x))
				{
					pending += x;
					if (x)
						cJSON_AddNumberToObject(by, n->c->tables[i]->name, (double) x);
				}
				sqlite3_free(sql);
			}
	}
	cJSON_AddStringToObject(j, "server_site", s.server_site ? s.server_site : "");
	cJSON_AddNumberToObject(j, "send_cursor", (double) s.send_cursor);
	cJSON_AddStringToObject(j, "recv_cursor", s.recv_cursor ? s.recv_cursor : "0");
	cJSON_AddNumberToObject(j, "pending_rows", (double) pending);
	pend = cJSON_AddObjectToObject(j, "pending");
	cJSON_AddNumberToObject(pend, "rows", (double) pending);
	cJSON_AddItemToObject(pend, "by_table", by);
	v = kv_text(n, "last_sync");
	cJSON_AddItemToObject(j, "last_sync", v ? cJSON_CreateString(v) : cJSON_CreateNull());
	sqlite3_free(v);
	add_json_kv(j, n, "last_error", "last_error");
	cJSON_AddNumberToObject(j, "failures", (double) kv_int(n, "failures", 0));
	add_json_kv(j, n, "progress", "progress");
	cJSON_AddNumberToObject(
		j, "rejected",
		query_int(n, "SELECT count(*) FROM sync_network_rejected WHERE origin = 'server'", &x)
			? (double) x
			: 0);
	cJSON_AddNumberToObject(j, "held",
							query_int(n, "SELECT count(*) FROM sync_held", &x) ? (double) x : 0);
	cJSON_AddBoolToObject(j, "has_token", s.token != NULL);
	if ((exp = sl_jwt_exp(s.token)) > 0)
		add_time(j, "token_expires_at", exp);
	else
		cJSON_AddNullToObject(j, "token_expires_at");
	state = n->bg ? n->bg->state(n, &pid) : "stopped";
	{
		cJSON *bg = cJSON_AddObjectToObject(j, "background");

		cJSON_AddStringToObject(bg, "state", state);
		if (pid)
			cJSON_AddNumberToObject(bg, "pid", (double) pid);
		else
			cJSON_AddNullToObject(bg, "pid");
	}
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
	sl_net *n = arg;

	if (n->curl)
		curl_easy_cleanup(n->curl);
	sqlite3_free(n);
}

static const struct
{
	const char *name;
	int			nargs;
	void (*fn)(sqlite3_context *, int, sqlite3_value **);
} functions[] = {
	{"sync_network_init", 1, sync_network_init},
	{"sync_network_init", 2, sync_network_init},
	{"sync_network_set_token", 1, sync_network_set_token},
	{"sync_network_send", 0, sync_network_send},
	{"sync_network_receive", 0, sync_network_receive},
	{"sync_network_sync", 0, sync_network_sync},
	{"sync_network_wait", 1, sync_network_wait},
	{"sync_network_retry", 0, sl_sync_network_retry},
	{"sync_network_retry", 2, sl_sync_network_retry},
	{"sync_network_discard", 0, sync_network_discard},
	{"sync_network_discard", 2, sync_network_discard},
	{"sync_network_status", 0, sync_network_status},
};

int
sl_network_register(sqlite3 *db, db_conn *c)
{
	static int	 curl_ready = 0;
	const size_t nf = sizeof functions / sizeof functions[0];
	sl_net		*n;

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
		int rc =
			sqlite3_create_function_v2(db, functions[i].name, functions[i].nargs,
									   SQLITE_UTF8 | SQLITE_DIRECTONLY | SQLITE_RESULT_SUBTYPE, n,
									   functions[i].fn, NULL, NULL, i == nf - 1 ? net_free : NULL);

		if (rc != SQLITE_OK)
		{
			if (i < nf - 1)
				net_free(n);
			return rc;
		}
	}
	c->net = n;
	return SQLITE_OK;
}
