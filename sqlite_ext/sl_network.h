/*
 * sl_network.h — the network client of the SQLite extension: sync with a
 * pgsync-server over HTTP (docs/PROTOCOL.md).
 *
 *   sl_network.c   the sync_network_* SQL functions, cursors, send/receive
 *   sl_http.c      one HTTP exchange with libcurl: timeouts, retries with
 *                  backoff and jitter, the protocol's headers and errors
 */
#ifndef SL_NETWORK_H
#define SL_NETWORK_H

#include "sl_internal.h"

#include <cjson/cJSON.h>
#include <curl/curl.h>

/*
 * sl_network_register adds the sync_network_* SQL functions to db; c is the
 * connection's sqlitesync state. Returns an SQLite result code.
 */
int sl_network_register(sqlite3 *db, db_conn *c);

/* ---- private to sl_network.c and sl_http.c ---- */

#define SL_CURSOR_MAX PGS_MAX_CURSOR /* the server's cursors (core/cursor.c) */

/* Per connection: the database handle and a reused curl handle (keep-alive). */
typedef struct sl_net
{
	sqlite3 *db;
	db_conn *c;
	CURL	*curl;
	char	 curl_err[CURL_ERROR_SIZE];
	bool	 unavailable; /* the last call failed: offline, or the server busy or down */
} sl_net;

/* The sync_network table, read at the start of each call. */
typedef struct sl_net_settings
{
	char   *url;
	char   *token;
	char   *server_site;
	char   *recv_cursor;
	int64_t send_cursor;
	int64_t retries;
	int64_t backoff_ms;
	int64_t backoff_max_ms;
	int64_t connect_timeout_ms;
	int64_t timeout_ms;
	int64_t max_payload;
	char   *ca_file; /* PEM CA file for https, NULL = the system's store */
} sl_net_settings;

/* One HTTP answer: status, body (bounded by max_payload) and our headers. */
typedef struct sl_net_resp
{
	long	 status;
	uint8_t *body;
	size_t	 len;
	size_t	 cap;
	size_t	 max;
	bool	 overflow;
	char	 cursor[SL_CURSOR_MAX + 1];
	char	 site[40];
	bool	 more;
	long	 retry_after;
} sl_net_resp;

/*
 * sl_http_call makes one request (POST when body is set, GET otherwise) to
 * s->url + path, retrying transient failures. True with r filled on a 2xx;
 * false with *msg (sqlite3_malloc'd, says what to do) otherwise. r is owned
 * by the caller: sl_http_resp_free it in every case.
 */
bool sl_http_call(sl_net *n, const sl_net_settings *s, const char *path, const uint8_t *body,
				  size_t len, int64_t wait_ms, sl_net_resp *r, char **msg);
void sl_http_resp_free(sl_net_resp *r);

/* ---- sl_rejected.c: rejections, retry, discard, rows fetched whole ---- */

bool sl_rejected_meta(sqlite3 *db);
bool sl_rejected_before_send(sl_net *n, int64_t send_cursor);
bool sl_rejected_after_push(sl_net *n, const cJSON *rejected, int64_t old_cursor,
							int64_t until, int64_t *nrej, bool *again);
bool sl_rejected_after_receive(sl_net *n);
bool sl_want_fetch(sl_net *n, const sl_net_settings *s, int64_t *rows, char **msg);
void sl_sync_network_retry(sqlite3_context *ctx, int argc, sqlite3_value **argv);
void sl_sync_network_discard(sqlite3_context *ctx, int argc, sqlite3_value **argv);

#endif
