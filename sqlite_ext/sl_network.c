/*
 * sl_network.c — sync_network_*: sync this SQLite database with a
 * pgsync-server over HTTP (protocol: docs/PROTOCOL.md; transport: sl_http.c).
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
 * Failures (policy in sl_http.c): offline fails at once and changes nothing;
 * transient failures are retried with exponential backoff and jitter. Every
 * failure is recorded in last_error/failures for sync_network_status(), and
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
	if (sql == meta_sql)
		return sqlite3_exec(n->db, sql, NULL, NULL, NULL) == SQLITE_OK && sl_rejected_meta(n->db);
	return sqlite3_exec(n->db, sql, NULL, NULL, NULL) == SQLITE_OK;
}

/* kv_text: the value of key as text (sqlite3_free it), or NULL. */
static char *
kv_text(sl_net *n, const char *key)
{
	sqlite3_stmt *st;
	char		 *v = NULL;

	if (sqlite3_prepare_v2(n->db, "SELECT value FROM sync_network WHERE key = ?1", -1, &st, NULL) !=
		SQLITE_OK)
		return NULL;
	sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
	if (sqlite3_step(st) == SQLITE_ROW && sqlite3_column_type(st, 0) != SQLITE_NULL)
		v = sqlite3_mprintf("%s", sqlite3_column_text(st, 0));
	sqlite3_finalize(st);
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

	if (sqlite3_prepare_v2(n->db,
						   value ? "INSERT OR REPLACE INTO sync_network(key, value) VALUES(?1, ?2)"
								 : "DELETE FROM sync_network WHERE key = ?1",
						   -1, &st, NULL) != SQLITE_OK)
		return false;
	sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
	if (value)
		sqlite3_bind_text(st, 2, value, -1, SQLITE_STATIC);
	rc = sqlite3_step(st);
	sqlite3_finalize(st);
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
	s->ca_file = kv_text(n, "ca_file");
	if (s->retries < 0)
		s->retries = 0;
	return true;
}

/* ---- errors ------------------------------------------------------------------- */

/* fail raises fn's error and records it for sync_network_status(). */
static void
fail(sqlite3_context *ctx, sl_net *n, const char *fn, const char *fmt, ...)
{
	va_list ap;
	char   *m, *full, *url;

	va_start(ap, fmt);
	m = sqlite3_vmprintf(fmt, ap);
	va_end(ap);
	full = sqlite3_mprintf("%s: %s", fn, m ? m : "out of memory");
	if ((url = kv_text(n, "url")) != NULL) /* initialized: record it */
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

static void
succeeded(sl_net *n)
{
	char *t = now_iso();

	kv_set(n, "last_sync", t);
	kv_set(n, "last_error", NULL);
	kv_set(n, "failures", "0");
	sqlite3_free(t);
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

	kv_set(n, "last_error", m);
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

/* ---- send ------------------------------------------------------------------- */

/*
 * send_once pushes pending changes once; returns JSON (sqlite3_malloc) or
 * NULL + *msg; *again when a row must go out again at once (PS001).
 */
static char *
send_once(sl_net *n, sl_net_settings *s, bool *again, char **msg)
{
	sqlite3_stmt *st;
	int64_t		  safe, until, applied = 0, nrej = 0, old = s->send_cursor;
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
	if (sqlite3_prepare_v2(n->db, "SELECT sync_payload(?1, ?2)", -1, &st, NULL) != SQLITE_OK)
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
		return sqlite3_mprintf(
			"{\"sent_bytes\":0,\"applied\":0,\"rejected\":0,\"send_cursor\":%lld}",
			(long long) s->send_cursor);
	}
	if (pgs_payload_until(payload, len, &until, NULL) != PGS_OK)
	{
		*msg = sqlite3_mprintf("sync_payload returned bytes that are not a payload");
		goto out;
	}
	if (!sl_http_call(n, s, "/v1/push", payload, len, 0, &r, msg))
		goto out;
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
	exec(n, "RELEASE sync_network_send");
	out = sqlite3_mprintf(
		"{\"sent_bytes\":%lld,\"applied\":%lld,\"rejected\":%lld,\"send_cursor\":%lld}",
		(long long) len, (long long) applied, (long long) nrej, (long long) s->send_cursor);
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
	char *first = send_once(n, s, &again, msg);

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

/* apply_received merges one pulled payload and moves the cursors, atomically. */
static bool
apply_received(sl_net *n, sl_net_settings *s, const sl_net_resp *r, int64_t *won, char **msg)
{
	sqlite3_stmt *st;
	int64_t		  v0 = 0, v1 = 0;
	char		  cur[24];
	const char	 *cursor = r->cursor;

	if (!cursor[0])
	{
		int64_t until = 0;

		pgs_payload_until(r->body, r->len, &until, NULL);
		snprintf(cur, sizeof cur, "%lld", (long long) until);
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
do_receive(sl_net *n, sl_net_settings *s, int64_t wait_ms, int64_t *npayloads, char **msg)
{
	char		  site[40] = "";
	sqlite3_stmt *st;
	int64_t		  won = 0;
	size_t		  bytes = 0;
	bool		  reset = false, gone = false;

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
		sl_net_resp r = {0};
		char	   *path = sqlite3_mprintf("/v1/pull?since=%s&exclude=%s&wait=%lld",
									   s->recv_cursor ? s->recv_cursor : "0", site,
										   (long long) (round == 0 ? wait_ms : 0));
		bool		more;

		if (!sl_http_call(n, s, path, NULL, 0, round == 0 ? wait_ms : 0, &r, msg))
		{
			sqlite3_free(path);
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
			return NULL;
		}
		sqlite3_free(path);
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
			if (r.len < 56 || !apply_received(n, s, &r, &won, msg))
			{
				if (!*msg)
					*msg = sqlite3_mprintf("the server sent %lld bytes that are not a payload",
										   (long long) r.len);
				sl_http_resp_free(&r);
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
	/* held changes again; rows this device lacks, whole */
	{
		int64_t fetched = 0;

		if (!sl_rejected_after_receive(n))
		{
			*msg = sqlite3_mprintf("trying held changes again failed: %s", sqlite3_errmsg(n->db));
			return NULL;
		}
		if (!sl_want_fetch(n, s, &fetched, msg))
			return NULL;
	}
	succeeded(n);
	return sqlite3_mprintf(
		"{\"payloads\":%lld,\"received_bytes\":%lld,\"applied\":%lld,\"recv_cursor\":\"%s\"}",
		(long long) *npayloads, (long long) bytes, (long long) won,
		s->recv_cursor ? s->recv_cursor : "0");
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
	if (!(recv = do_receive(n, &s, 0, &np, &msg)))
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
		result_json(ctx, sqlite3_mprintf("{\"send\":%s,\"receive\":%s}", sent ? sent : "null", recv));
		sqlite3_free(recv);
	}
	sqlite3_free(sent);
	sqlite3_free(msg);
	sqlite3_free(send_msg);
	free_settings(&s);
}

static void
sync_network_wait(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	sl_net		   *n = sqlite3_user_data(ctx);
	sl_net_settings s;
	char		   *msg, *json;
	int64_t			timeout = sqlite3_value_int64(argv[0]), np;

	(void) argc;
	if (sqlite3_value_type(argv[0]) != SQLITE_INTEGER || timeout < 0)
	{
		sqlite3_result_error(ctx, "sync_network_wait: timeout_ms must be a non-negative integer",
							 -1);
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
	sl_net		   *n = sqlite3_user_data(ctx);
	sl_net_settings s;
	cJSON		   *j;
	char		   *text, *v;
	int64_t			x, pending = 0;
	pgs_err			err;

	(void) argc, (void) argv;
	if (!need_settings(ctx, n, "sync_network_status", &s))
		return;
	j = cJSON_CreateObject();
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
	cJSON_AddNumberToObject(
		j, "rejected",
		query_int(n, "SELECT count(*) FROM sync_network_rejected WHERE origin = 'server'", &x)
			? (double) x
			: 0);
	cJSON_AddNumberToObject(
		j, "held", query_int(n, "SELECT count(*) FROM sync_held", &x) ? (double) x : 0);
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
	{"sync_network_discard", 0, sl_sync_network_discard},
	{"sync_network_discard", 2, sl_sync_network_discard},
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
		int rc = sqlite3_create_function_v2(db, functions[i].name, functions[i].nargs,
											SQLITE_UTF8 | SQLITE_DIRECTONLY, n, functions[i].fn,
											NULL, NULL, i == nf - 1 ? net_free : NULL);

		if (rc != SQLITE_OK)
		{
			if (i < nf - 1)
				net_free(n);
			return rc;
		}
	}
	return SQLITE_OK;
}
