/*
 * sl_network.h — the network client of the SQLite extension: sync with a
 * pgsync-server over HTTP (docs/PROTOCOL.md).
 *
 *   sl_network.c   the sync_network_* SQL functions, cursors, send/receive
 *   sl_http.c      one HTTP exchange with libcurl: timeouts, retries with
 *                  backoff and jitter, the protocol's headers and errors
 *   sl_background.c  sync_network_start/stop: the background syncer thread
 *   sl_events.c    change events, counters, sync_network_pending
 * Design: docs/CLIENT.md.
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

/*
 * Per connection: the database handle and a reused curl handle (keep-alive).
 * err_code/err_status classify the last failure (docs/CLIENT.md, "Status and
 * errors"); perform, when set (the background syncer's connection), runs a
 * transfer so that a stop can abort it.
 */
/*
 * What the network client asks of the background syncer (sl_background.c),
 * given by whoever starts both (sqlitesync.c): the syncer sits above the
 * client (it runs its sends and receives) and the client never calls it by
 * name. NULL until the syncer's functions are registered.
 */
typedef struct sl_bg_ops
{
	int (*wait)(struct sl_net *n, int64_t timeout_ms); /* 1 events, 0 timeout, -1 none */
	const char *(*state)(struct sl_net *n, long *pid); /* "running", "standby", "stopped" */
	void (*kick)(struct sl_net *n);					   /* settings changed: sync now */
} sl_bg_ops;

typedef struct sl_net
{
	sqlite3	   *db;
	db_conn	   *c;
	CURL	   *curl;
	char		curl_err[CURL_ERROR_SIZE];
	bool		unavailable; /* the last call failed: offline, or the server busy or down */
	const char *err_code;	 /* static string, NULL = no classified failure */
	long		err_status;
	CURLcode (*perform)(void *arg, CURL *c);
	void			*perform_arg;
	int64_t			 chunk_rows; /* rows per pulled chunk (0: the server's pull_max_rows) */
	bool			 discarded;	 /* sl_sync_network_discard gave rows up: fetch them */
	int64_t			 pull_gen;	 /* the last pull request's recheck generation */
	bool			 background; /* the syncer's own connection */
	bool			 meta_ready; /* sync_network and its companions exist */
	char			 site[40];	 /* sync_site_id(), once known */
	const sl_bg_ops *bg;		 /* the background syncer's side, or NULL */
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
	int64_t	 rows_total; /* X-Pgsync-Rows-Total, -1 when absent */
	int64_t	 acked;		 /* a pull's: the send_cursor when it was requested */
	int64_t	 gen;		 /* a pull's: its recheck generation (sl_recheck_begin) */
} sl_net_resp;

/* What a request needs until its transfer ends. */
typedef struct sl_http_req
{
	char			  *url;
	char			  *auth;
	struct curl_slist *headers;
} sl_http_req;

/*
 * sl_http_call makes one request (POST when body is set, GET otherwise) to
 * s->url + path, retrying transient failures. True with r filled on a 2xx;
 * false with *msg (sqlite3_malloc'd, says what to do) otherwise. r is owned
 * by the caller: sl_http_resp_free it in every case.
 */
bool sl_http_call(sl_net *n, const sl_net_settings *s, const char *path, const uint8_t *body,
				  size_t len, int64_t wait_ms, sl_net_resp *r, char **msg);
void sl_http_resp_free(sl_net_resp *r);
/* The pieces of sl_http_call, for a transfer run elsewhere (the long-poll of
 * the background syncer): set up a handle, then classify its outcome. */
bool sl_http_prepare(CURL *c, char *errbuf, const sl_net_settings *s, const char *path,
					 const uint8_t *body, size_t len, int64_t wait_ms, sl_net_resp *r,
					 sl_http_req *q, char **msg);
bool sl_http_outcome(sl_net *n, CURL *c, const char *errbuf, const sl_net_settings *s, CURLcode rc,
					 sl_net_resp *r, bool *transient, char **msg);
void sl_http_req_free(sl_http_req *q);

/* ---- sl_network.c, for sl_background.c ---- */

bool  sl_net_load_settings(sl_net *n, sl_net_settings *s); /* false before sync_network_init */
void  sl_net_free_settings(sl_net_settings *s);
char *sl_net_kv_text(sl_net *n, const char *key); /* sqlite3_free it */
/* sl_net_send / sl_net_receive: one push / every chunk of a pull; JSON
 * summary (sqlite3_malloc) or NULL + *msg, the failure recorded for status.
 * first: an answer to GET /v1/pull already fetched (the long-poll), or NULL. */
char   *sl_net_send(sl_net *n, sl_net_settings *s, char **msg);
char   *sl_net_receive(sl_net *n, sl_net_settings *s, int64_t wait_ms, sl_net_resp *first,
					   int64_t *npayloads, char **msg);
void	sl_net_record_error(sl_net *n, const char *fn, const char *msg);
char   *sl_net_pull_path(sl_net *n, const sl_net_settings *s, int64_t wait_ms,
						 int64_t *acked); /* sqlite3_free */
int64_t sl_jwt_exp(const char *token);	  /* the token's exp claim, 0 when none */

/* ---- sl_background.c ---- */

/* sl_background_register adds sync_network_start/stop to db, and gives n
 * the syncer's side (n->bg); attach sets the extension up on the syncer's
 * own connection (sl_attach: the entry point's, passed down). */
int	 sl_background_register(sqlite3 *db, db_conn *c, sl_net *n,
							int (*attach)(sqlite3 *db, char **errmsg, db_conn **out));
void sl_background_closing(db_conn *c); /* the connection closes: stop what it started */
void sl_background_committed(db_conn *c, int64_t ver); /* commit hook: wake the syncer */

/* ---- sl_events.c ---- */

int sl_pending_register(sqlite3 *db, db_conn *c);

/* ---- sl_rejected.c: rejections, retry, discard, rows fetched whole ---- */

bool	sl_rejected_meta(sqlite3 *db);
bool	sl_rejected_before_send(sl_net *n, int64_t send_cursor);
bool	sl_rejected_after_push(sl_net *n, const cJSON *rejected, int64_t old_cursor, int64_t until,
							   int64_t *nrej, bool *again);
bool	sl_rejected_after_receive(sl_net *n);
bool	sl_want_fetch(sl_net *n, const sl_net_settings *s, pgs_apply_stats *sum, char **msg);
int64_t sl_recheck_begin(sl_net *n); /* a pull begins: its generation */
bool	sl_recheck_fetch(sl_net *n, const sl_net_settings *s, int64_t gen, pgs_apply_stats *sum,
						 char **msg); /* the pull of gen got to its end */
void	sl_sync_network_retry(sqlite3_context *ctx, int argc, sqlite3_value **argv);
void	sl_sync_network_discard(sqlite3_context *ctx, int argc, sqlite3_value **argv);

#endif
