/*
 * server.h — private declarations of pgsync-server, the HTTP sync service in
 * front of PostgreSQL (docs/PROTOCOL.md is the contract, docs/SERVER.md the
 * operator's guide).
 *
 * One concern per file:
 *   main.c       start-up, signals, orderly shutdown, --version, --check-config
 *   config.c     settings from defaults, a config file, the environment, argv
 *   log.c        log lines (text or JSON), clocks, srv_fail
 *   tls.c        TLS certificate and key for libmicrohttpd (GnuTLS)
 *   http.c       libmicrohttpd glue: routing, bodies, limits, JSON errors
 *   sync.c       push and pull: the per-request Postgres transactions
 *   pool.c       the libpq connection pool (health, reconnect, fail fast)
 *   auth.c       JWT verification (HS256/RS256), role allow-list
 *   ratelimit.c  token buckets per token subject or client address
 *   hub.c        LISTEN/NOTIFY + version polling; wakes long-polls and ws
 *   ws.c         RFC 6455 WebSocket server side for /v1/ws
 *   metrics.c    counters and histograms, Prometheus text rendering
 *
 * Threads: libmicrohttpd's pool (request handlers; they block on Postgres,
 * so there are about as many of them as pooled connections), the hub thread
 * (owns the LISTEN connection, the long-poll timers), the ws thread (owns
 * every upgraded socket) and the main thread (waits for a signal).
 */
#ifndef PGSYNC_SERVER_H
#define PGSYNC_SERVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <libpq-fe.h>

#define SRV_NAME "pgsync-server"
#define SRV_PROTOCOL "1"
#define SRV_NOTIFY_CHANNEL "pgsync_changes"
#define SRV_MAX_ROLES 64
#define SRV_ROLE_MAX 64 /* NAMEDATALEN */

/* ---- config.c ------------------------------------------------------------ */

typedef struct srv_config
{
	char  *listen; /* address to bind, default 127.0.0.1 */
	int	   port;
	char  *database;	   /* libpq conninfo or URI */
	char  *jwt_secret;	   /* HS256 key; NULL = HS256 off */
	char  *jwt_public_key; /* RS256 public key PEM path; NULL = off */
	char  *jwt_public_pem; /* its contents, loaded at start */
	int	   jwt_leeway;	   /* seconds of clock skew allowed on exp/nbf */
	char  *role_claim;
	char  *default_role; /* role for tokens without the claim, or NULL */
	char  *roles[SRV_MAX_ROLES];
	int	   nroles;
	size_t max_body;
	double rate_limit; /* requests per second per subject; 0 = off */
	int	   rate_burst;
	int	   pool_size;
	int	   threads;
	int	   pool_wait_ms;	/* how long a request waits for a connection */
	int	   connect_timeout; /* seconds, libpq connect_timeout */
	int	   statement_timeout_ms;
	int	   max_wait_ms; /* long-poll cap */
	int pull_max_rows;	/* rows per chunk of a pull when the client asks for none (0 = one payload)
						 */
	int	  poll_ms;		/* sync_db_version() polling period */
	int	   gc_interval;		  /* seconds between sync_gc runs, 0 = never */
	double gc_retention_days; /* silent devices stop holding the horizon back */
	int	  max_connections;
	int	  ws_ping_s;
	bool  log_requests;
	char *log_format; /* "text" or "json" */
	char *tls_cert;	  /* PEM certificate (chain) path; NULL = plain HTTP */
	char *tls_key;	  /* PEM private key path */
	char *dbname;	  /* the database `database` names, for log lines (derived) */
} srv_config;

/* The jwt_secret of pgsync-server.conf.example: refused at start. */
#define SRV_EXAMPLE_SECRET "change-me-to-at-least-32-random-bytes-please"

extern srv_config cfg;

void config_defaults(srv_config *c);
/* config_load_file/env/args return false with a message on stderr. */
bool  config_load_file(srv_config *c, const char *path);
bool  config_load_env(srv_config *c);
bool  config_set(srv_config *c, const char *key, const char *value, const char *where);
bool  config_finish(srv_config *c);
void  config_free(srv_config *c);
void  config_usage(void);
char *srv_read_file(const char *path, char *why, size_t whylen);
/* config_source: where key's value came from ("default", "PGSYNC_PORT", "FILE:LINE", ...). */
const char *config_source(const char *key);
/* config_print_checked prints the settings in effect (--check-config). */
void config_print_checked(const srv_config *c);

/* ---- log.c: log lines, clocks --------------------------------------------- */

/* srv_log writes one line: level is LOG, WARNING, ERROR or FATAL. */
void srv_log(const char *level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void srv_log_set_json(bool json); /* log_format = json */

/* One answered request (log_requests); NULL or "" fields are left out. */
typedef struct srv_request_log
{
	const char *method;
	const char *path;
	const char *route; /* endpoint name: push, pull, longpoll, ws, healthz, metrics, other */
	int			status;
	double		ms;
	const char *role;
	const char *database;
	const char *client; /* address */
	const char *error;	/* what the client was told, and why */
	const char *detail;
	bool		closed_early; /* the client went away before the answer */
} srv_request_log;

void	srv_log_request(const srv_request_log *r);
int64_t srv_now_ms(void); /* monotonic milliseconds */
int64_t srv_wall_s(void); /* Unix seconds */

/* ---- tls.c ---------------------------------------------------------------- */

struct MHD_OptionItem;

/* tls_load reads and checks tls_cert/tls_key (both or neither); false with a
 * message on stderr. Called by config_finish. */
bool tls_load(const srv_config *c);
bool tls_enabled(void);
/* tls_mhd_options: items for MHD_OPTION_ARRAY (only MHD_OPTION_END without TLS). */
const struct MHD_OptionItem *tls_mhd_options(void);
const char					*tls_summary(void); /* "TLS 1.2+, certificate ... valid until ..." */
void						 tls_free(void);

/* ---- errors -------------------------------------------------------------- */

typedef struct srv_error
{
	int	 status;	  /* HTTP status */
	int	 retry_after; /* seconds, 0 = no header */
	char error[160];
	char detail[640];
	char hint[320];
} srv_error;

/* srv_fail fills e and returns false (so handlers can `return srv_fail(...)`). */
bool srv_fail(srv_error *e, int status, const char *error, const char *hint, const char *detail_fmt,
			  ...) __attribute__((format(printf, 5, 6)));

/* ---- pool.c -------------------------------------------------------------- */

/* gc.c: the tombstone collection schedule (sync_gc every gc_interval). */
bool gc_start(void);
void gc_stop(void);

bool pool_start(void);
void pool_stop(void);
/* pool_acquire: a healthy connection, or NULL with a 503 in e. */
PGconn *pool_acquire(srv_error *e);
/* pool_release gives a connection back; broken = close it (reconnect later). */
void pool_release(PGconn *conn, bool broken);
void pool_counts(int *idle, int *busy, int *broken);
/* pool_connect opens one connection with the server's settings (the hub's). */
PGconn *pool_connect(char *why, size_t whylen);

/* ---- auth.c -------------------------------------------------------------- */

typedef struct auth_info
{
	char	role[SRV_ROLE_MAX + 1];
	char   *claims;		  /* JSON text of every claim (malloc) */
	char	subject[160];	/* rate-limit identity */
	char	principal[200]; /* owner of the devices it syncs: sub, else "role:<role>" */
	int64_t exp;		  /* 0 = no expiry */
} auth_info;

/* auth_check verifies a bearer token; 401/403 in e on failure. */
bool auth_check(const char *token, auth_info *out, srv_error *e);
void auth_free(auth_info *a);

/* ---- ratelimit.c --------------------------------------------------------- */

/* ratelimit_take: true when key may make a request now, else seconds to wait. */
bool ratelimit_take(const char *key, int *retry_after);
void ratelimit_stop(void);

/* ---- sync.c -------------------------------------------------------------- */

typedef struct push_result
{
	int64_t applied;
	int64_t nrejected;
	int64_t server_version;
	char   *rejected_json; /* JSON array text (malloc) */
} push_result;

typedef struct pull_result
{
	PGresult	  *res;		/* owns payload, or NULL */
	const uint8_t *payload; /* NULL = nothing new */
	size_t		   len;
	int64_t		   cursor; /* next since */
	int32_t		   gen;	   /* generation of the device's view (in the cursor) */
	char		  *more;   /* chunked: the cursor text of the next chunk (malloc), or NULL */
} pull_result;

bool sync_push(const auth_info *a, const uint8_t *body, size_t len, push_result *out, srv_error *e);
/* sync_pull: max_rows > 0 chunks the pull; sealed (NULL for the first chunk)
 * is the sealed continuation of a chunk cursor (pgs_cursor_parse). */
bool sync_pull(const auth_info *a, int64_t since, int32_t gen, const char *exclude,
			   uint32_t max_rows, const uint8_t *sealed, size_t sealed_len, pull_result *out,
			   srv_error *e);
void pull_result_free(pull_result *r);
/* sync_rows: the rows a device lacks, whole (body: the JSON of POST /v1/rows). */
bool sync_rows(const auth_info *a, const char *device, const char *json, size_t len,
			   pull_result *out, srv_error *e);
/* sync_server_site: the server's site id text ("" until known). */
const char *sync_server_site(void);
/* sync_learn_site reads sync_site_id() on conn once; harmless to repeat. */
void sync_learn_site(PGconn *conn);
/* sync_pg_error maps a failed PGresult to an HTTP error; true if the
 * connection itself is broken (retry elsewhere). */
bool sync_pg_error(PGconn *conn, const PGresult *res, const char *what, srv_error *e);

/* ---- hub.c --------------------------------------------------------------- */

struct MHD_Connection;
typedef struct hub_waiter hub_waiter;

typedef enum hub_wake
{
	HUB_WAITING = 0,
	HUB_CHANGED, /* a notification arrived: pull again */
	HUB_TIMEOUT,
	HUB_SHUTDOWN
} hub_wake;

bool hub_start(void);
void hub_stop(void);
/* hub_gen: the notification counter; read it before querying, pass it on. */
uint64_t hub_gen(void);
/*
 * hub_suspend parks conn (call it from conn's access handler) until a
 * version above cursor is announced or deadline_ms passes. If a notification
 * arrived since seen_gen, it does not suspend and the waiter is already
 * HUB_CHANGED. Returns NULL when shutting down or out of memory.
 */
hub_waiter *hub_suspend(struct MHD_Connection *conn, hub_waiter *w, uint64_t seen_gen,
						int64_t cursor, int64_t deadline_ms, bool *parked);
/* hub_release_all resumes every parked request (HUB_SHUTDOWN); no new ones. */
void	 hub_release_all(void);
hub_wake hub_result(hub_waiter *w);
void	 hub_forget(hub_waiter *w); /* request over: free the waiter */
int64_t	 hub_version(void);			/* highest version announced so far */
int		 hub_waiting(void);

/* ---- ws.c ---------------------------------------------------------------- */

bool ws_start(void);
void ws_stop(void);
struct MHD_Response;
/* ws_upgrade builds the 101 response for GET /v1/ws, or fails with e. */
bool ws_upgrade(struct MHD_Connection *conn, const auth_info *a, struct MHD_Response **resp,
				srv_error *e);
void ws_broadcast(int64_t version);
int	 ws_clients(void);
/* ws_accept_key computes Sec-WebSocket-Accept (29 bytes incl. NUL). */
void ws_accept_key(const char *key, char out[29]);

/* ---- metrics.c ----------------------------------------------------------- */

typedef enum srv_endpoint
{
	EP_PUSH = 0,
	EP_PULL,
	EP_LONGPOLL,
	EP_WS,
	EP_ROWS,
	EP_HEALTHZ,
	EP_METRICS,
	EP_OTHER,
	EP_COUNT
} srv_endpoint;

const char *metrics_endpoint_name(srv_endpoint ep); /* "push", "pull", ... */
void		metrics_request(srv_endpoint ep, int status, int64_t usec);
void		metrics_bytes(uint64_t in, uint64_t out);
void		metrics_changes(int64_t applied, int64_t rejected);
void		metrics_notification(void);
void		metrics_rate_limited(void);
/* metrics_render returns malloc'd Prometheus text. */
char *metrics_render(size_t *len);

/* ---- http.c -------------------------------------------------------------- */

bool http_start(void);
void http_stop(void);

#endif /* PGSYNC_SERVER_H */
