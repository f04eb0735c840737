/*
 * server.h — private declarations of pgsync-server, the HTTP sync service in
 * front of PostgreSQL (docs/PROTOCOL.md is the contract, docs/SERVER.md the
 * operator's guide).
 *
 * One concern per file:
 *   main.c       start-up, signals, orderly shutdown, --version, --check-config
 *   config.c     settings from defaults, a config file, the environment, argv;
 *                [database NAME] sections
 *   db.c         the databases: lookup, start and stop of their parts
 *   log.c        log lines (text or JSON), clocks, srv_fail
 *   tls.c        TLS certificate and key for libmicrohttpd (GnuTLS)
 *   http.c       libmicrohttpd glue: routing, bodies, limits, JSON errors
 *   work.c       per-database job queue and worker threads; shared pulls
 *   sync.c       push and pull: the per-request Postgres transactions
 *   pool.c       the libpq connection pool (health, reconnect, fail fast)
 *   auth.c       JWT verification (HS256/RS256), role allow-list
 *   ratelimit.c  token buckets per token subject or client address
 *   hub.c        LISTEN/NOTIFY + version polling; wakes long-polls and ws
 *   ws.c         RFC 6455 WebSocket server side for /v1/ws
 *   metrics.c    counters and histograms, Prometheus text rendering
 *
 * Threads: libmicrohttpd's pool (parse requests, check tokens, send
 * answers; never wait for Postgres), and per database: pool_size worker
 * threads (work.c: they run the Postgres transactions, one connection
 * each), the listener thread (LISTEN connection, version polling) and the
 * timer thread (long-poll deadlines, queue expiry) of hub.c; the ws thread
 * (owns every upgraded socket) and the main thread (waits for a signal).
 * A database's load or outage stalls only its own threads.
 */
#ifndef PGSYNC_SERVER_H
#define PGSYNC_SERVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <pthread.h>

#include <libpq-fe.h>

#define SRV_NAME "pgsync-server"
#define SRV_PROTOCOL "1"
#define SRV_NOTIFY_CHANNEL "pgsync_changes"
#define SRV_MAX_ROLES 64
#define SRV_ROLE_MAX 64 /* NAMEDATALEN */

/* ---- config.c ------------------------------------------------------------ */

/*
 * The settings of one database: the top-level ones (the only database, or
 * every [database NAME] section's defaults) and each section's own.
 */
typedef struct srv_dbconf
{
	char  *database;	   /* libpq conninfo or URI */
	char  *jwt_secret;	   /* HS256 key; NULL = HS256 off */
	char  *jwt_public_key; /* RS256 public key PEM path; NULL = off */
	char  *jwt_public_pem; /* its contents, loaded at start */
	char  *default_role;   /* role for tokens without the claim, or NULL */
	char  *roles[SRV_MAX_ROLES];
	int	   nroles;
	double rate_limit; /* requests per second per subject; 0 = off */
	int	   rate_burst;
	int	   pool_size;
	int	   pool_wait_ms;	/* how long a request waits for a connection */
	int	   max_queue;		/* requests waiting for a connection before 503 (0 = 64 x pool) */
	int	   connect_timeout; /* seconds, libpq connect_timeout */
	int	   statement_timeout_ms;
	int pull_max_rows;	/* rows per chunk of a pull when the client asks for none (0 = one payload)
						 */
	int	   poll_ms;		/* sync_db_version() polling period */
	int	   gc_interval; /* seconds between sync_gc runs, 0 = never */
	double gc_retention_days; /* silent devices stop holding the horizon back */
} srv_dbconf;

#define SRV_MAX_DBS 256
#define SRV_MAX_ROWS 10000000		 /* the largest max_rows a pull may ask for */
#define SRV_CHUNK_ROWS_DEFAULT 10000 /* rows per chunk of a chunk cursor without max_rows */
#define SRV_DBNAME_MAX 63

typedef struct srv_config
{
	char	  *listen; /* address to bind, default 127.0.0.1 */
	int		   port;
	int		   jwt_leeway; /* seconds of clock skew allowed on exp/nbf */
	char	  *role_claim;
	char	  *database_claim; /* claim naming the token's database, or NULL */
	size_t	   max_body;
	int		   threads;
	int		   max_wait_ms; /* long-poll cap */
	int		   max_connections;
	int		   ws_ping_s;
	bool	   log_requests;
	char	  *log_format; /* "text" or "json" */
	char	  *tls_cert;   /* PEM certificate (chain) path; NULL = plain HTTP */
	char	  *tls_key;	   /* PEM private key path */
	srv_dbconf base;	   /* top-level per-database settings */
	/* [database NAME] sections, in file order; none: one database from base */
	struct srv_db *dbs;
	int			   ndbs;
	bool		   sections; /* dbs come from [database] sections */
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

/* ---- db.c: the databases this server fronts -------------------------------- */

struct srv_pool;
struct srv_hub;
struct srv_work;
struct srv_metrics;
struct srv_gc;

/*
 * One database: its settings, and what it owns alone so that one database's
 * load or outage never waits on another's: connection pool, worker threads
 * and their queue (work.c), notification listener and long-poll timers
 * (hub.c), WebSocket counters and metrics.
 */
typedef struct srv_db
{
	char				name[SRV_DBNAME_MAX + 1]; /* section name, or the Postgres database */
	char			   *dbname; /* the Postgres database it connects to (derived), for logs */
	int					index;	/* in cfg.dbs */
	srv_dbconf			c;
	struct srv_pool	   *pool;
	struct srv_hub	   *hub;
	struct srv_work	   *work;
	struct srv_metrics *m;
	struct srv_gc	   *gc; /* its sync_gc schedule (gc.c), NULL when gc_interval = 0 */
	char				server_site[37]; /* under site_mu; "" until known */
	pthread_mutex_t		site_mu;
	_Atomic long long	ws_version; /* newest version announced to its WebSockets */
	_Atomic int			ws_clients;
	_Atomic bool		no_group; /* its pgsync has no sync_pull_group: pull one by one */
} srv_db;

/* db_find: the database called name (length n), or NULL. */
srv_db *db_find(const char *name, size_t n);
bool	db_start_all(void);
void	db_stop_all(void);

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

/* ---- gc.c: each database's tombstone collection (sync_gc every gc_interval) */

bool gc_start(srv_db *db);
void gc_stop(srv_db *db);

/* ---- pool.c -------------------------------------------------------------- */

bool pool_start(srv_db *db);
void pool_stop(srv_db *db);
/* pool_acquire: a healthy connection, or NULL with a 503 in e. */
PGconn *pool_acquire(srv_db *db, srv_error *e);
/* pool_release gives a connection back; broken = close it (reconnect later). */
void pool_release(srv_db *db, PGconn *conn, bool broken);
void pool_counts(srv_db *db, int *idle, int *busy, int *broken);
/* pool_down: Postgres refused the last connection attempt (for /healthz). */
bool pool_down(srv_db *db);
/* pool_connect opens one connection with the database's settings (the hub's). */
PGconn *pool_connect(srv_db *db, char *why, size_t whylen);
/* pool_server_site: db's site id text ("" until known), copied into out[37]. */
void pool_server_site(srv_db *db, char out[37]);
/* pool_learn_site reads sync_site_id() on conn once; harmless to repeat. */
void pool_learn_site(srv_db *db, PGconn *conn);

/* ---- auth.c -------------------------------------------------------------- */

typedef struct auth_info
{
	char	role[SRV_ROLE_MAX + 1];
	char   *claims;			/* JSON text of every claim (malloc) */
	char   *canon;			/* the claims that decide a view, canonical (malloc): sharing key */
	char	subject[160];	/* rate-limit identity */
	char	principal[200]; /* owner of the devices it syncs: sub, else "role:<role>" */
	int64_t exp;			/* 0 = no expiry */
} auth_info;

/* auth_check verifies a bearer token with db's keys and roles; 401/403 in e on failure. */
bool auth_check(const srv_db *db, const char *token, auth_info *out, srv_error *e);
/* auth_peek_claim: the string claim `name` of a token, NOT verified (to pick
 * the database whose key verifies it); false when absent. */
bool auth_peek_claim(const char *token, const char *name, char *out, size_t outlen);
/* auth_claim_string: the verified string claim `name`, or NULL (malloc'd). */
char *auth_claim_string(const auth_info *a, const char *name);
/* auth_copy: dst gets its own copy of src (auth_free it); false when out of memory. */
bool auth_copy(auth_info *dst, const auth_info *src);
void auth_free(auth_info *a);

/* ---- ratelimit.c --------------------------------------------------------- */

/* ratelimit_take: true when key may make a request to db now, else seconds to wait. */
bool ratelimit_take(const srv_db *db, const char *key, int *retry_after);
void ratelimit_stop(void);

/* ---- sync.c -------------------------------------------------------------- */

typedef struct push_result
{
	int64_t applied;
	int64_t nrejected;
	int64_t server_version;
	int64_t xid;		   /* the push's transaction (0: it applied nothing), for hub_notify */
	char   *rejected_json; /* JSON array text (malloc) */
} push_result;

/*
 * A pull's answer. One object may answer many requests (a shared pull,
 * work.c): it is reference-counted, and each HTTP response holds a
 * reference until libmicrohttpd has sent it.
 */
typedef struct pull_share
{
	_Atomic int	   refs;
	PGresult	  *res;		/* owns payload */
	const uint8_t *payload; /* never NULL */
	size_t		   len;
	int64_t		   cursor;	   /* next since */
	int32_t		   gen;		   /* generation of the device's view (in the cursor) */
	char		  *more;	   /* chunked: the cursor text of the next chunk (malloc), or NULL */
	int64_t		   rows_total; /* first chunk of a pull from 0: sync_pull_total(), else -1 */
} pull_share;

void pull_share_unref(pull_share *p);

/* srv_job.state */
enum
{
	JS_NEW = 0,
	JS_QUEUED,
	JS_RUNNING,
	JS_DONE
};

typedef enum job_kind
{
	JOB_PUSH,
	JOB_PULL,
	JOB_ROWS,
	JOB_HEALTH
} job_kind;

/*
 * srv_job: one request's database work. http.c fills the arguments and
 * submits it (work.c); a worker thread of the request's database runs it,
 * parks a long-poll that found nothing (hub.c), and resumes the request's
 * connection once the answer is in. A job is owned by exactly one of: the
 * HTTP handler, the queue, a worker, the hub's waiter list.
 */
typedef struct srv_job
{
	/* arguments (http.c) */
	job_kind			   kind;
	srv_db				  *db;
	struct MHD_Connection *conn;
	const auth_info		  *auth;
	const uint8_t		  *body; /* push: payload; rows: the JSON of the keys */
	size_t				   len;
	int64_t				   since;
	int32_t				   gen;
	const uint8_t		  *sealed; /* chunk cursor's sealed part, or NULL */
	size_t				   sealed_len;
	uint32_t			   max_rows;
	const char			  *exclude;	 /* the device's site id text, or NULL */
	int64_t				   deadline; /* long-poll end (srv_now_ms), 0 = no wait */
	/* answer (work.c, hub.c), read by http.c after the resume */
	bool		failed;
	srv_error	e;
	push_result push;
	pull_share *pull;	/* NULL: nothing new, answer 204 with since and gen */
	bool		shared; /* answered by a pull computed once for several devices */
	bool		health_ok;
	/* who hears the answer: NULL resumes conn (http.c); else called, from a
	 * worker or the thread that failed the job, instead (ws.c's subscriptions,
	 * whose jobs have no connection) */
	void (*on_done)(struct srv_job *j);
	/* work.c and hub.c */
	struct srv_job *next, *prev;
	int64_t			queued_ms;
	bool			noshare; /* a shared pull could not answer it: pull alone */
	int				state;
} srv_job;

bool push_apply(srv_db *db, const auth_info *a, const uint8_t *body, size_t len, push_result *out,
				srv_error *e);
/* pull_one: the pull of one job (SQL sync_pull) (j->since, gen, exclude, max_rows, sealed);
 * j->pull is set when there is a payload, else j->since/j->gen move on. */
bool pull_one(srv_job *j, srv_error *e);
/*
 * pull_group answers n pulls that share role, claims, since, gen and
 * max_rows (and none has a chunk cursor) with one computation where that is
 * exact (docs/SERVER.md, "Fan-out"). Jobs it answered get done[i] = true
 * (with j->pull or an empty answer); the others must pull alone. False with
 * e when the database failed (every job fails with it).
 */
bool pull_group(srv_db *db, srv_job **jobs, int n, bool *done, srv_error *e);
/* pull_rows: the rows a device lacks, whole (body: the JSON of POST /v1/rows). */
bool pull_rows(srv_db *db, const auth_info *a, const char *device, const char *json, size_t len,
			   pull_share **out, srv_error *e);
bool srv_health(srv_db *db);
/* srv_pg_error maps a failed PGresult to an HTTP error; true if the
 * connection itself is broken (retry elsewhere). */
bool srv_pg_error(PGconn *conn, const PGresult *res, const char *what, srv_error *e);

/* ---- work.c -------------------------------------------------------------- */

bool work_start(srv_db *db);
/* work_quiesce: refuse new jobs, answer the queued ones (503) and wait up to
 * wait_ms for running ones; false when some are still running. */
bool work_quiesce(srv_db *db, int wait_ms);
void work_stop(srv_db *db);
/* work_submit suspends j->conn (if any) and queues j; false (nothing
 * suspended) with a 503 in e when the queue is full or the server is stopping. */
bool work_submit(srv_job *j, srv_error *e);
/* work_requeue: a parked long-poll (still suspended) pulls again (hub.c). */
void work_requeue(srv_job *j);
void work_requeue_list(srv_db *db, srv_job *list);
/* work_finish: j has its answer; resume its connection (or call j->on_done). */
void work_finish(srv_job *j);
/* work_reap answers queued jobs older than pool_wait_ms (503); returns the
 * srv_now_ms() at which the next one expires, or 0. */
int64_t work_reap(srv_db *db);
int		work_queued(srv_db *db);

/* ---- hub.c --------------------------------------------------------------- */

/*
 * What the hub does with the jobs it hands back, given by its starter
 * (db.c: work.c's functions and ws.c's broadcast): the hub sits below the
 * workers and the WebSocket thread and calls neither by name.
 */
typedef struct hub_ops
{
	void (*finish)(srv_job *j);						 /* answered (204) */
	void (*requeue)(srv_job *j);					 /* pull again */
	void (*requeue_list)(srv_db *db, srv_job *list); /* pull these again, together */
	int64_t (*reap)(srv_db *db);					 /* time out queued jobs; next deadline */
	void (*announced)(srv_db *db, int64_t version);	 /* a change was heard */
} hub_ops;

bool hub_start(srv_db *db, const hub_ops *ops);
void hub_stop(srv_db *db);
/* hub_gen: the notification counter; read it before querying, pass it on. */
uint64_t hub_gen(srv_db *db);
/*
 * hub_park: the pull of j found nothing new; j waits (its connection stays
 * suspended) until a version above j->since is announced, then it is
 * requeued, or until j->deadline, then it is finished (204). If a
 * notification arrived since seen_gen it is requeued at once.
 */
void hub_park(srv_job *j, uint64_t seen_gen);
/* hub_release_all finishes every parked long-poll (204); none park after. */
void	hub_release_all(srv_db *db);
int64_t hub_version(srv_db *db); /* highest version announced so far */
int		hub_waiting(srv_db *db);
bool	hub_listening(srv_db *db); /* the LISTEN connection is up */
/*
 * hub_notify: a push committed transaction v; the listener NOTIFYs every
 * server of it, one NOTIFY at a time for all of this process's pushes (the
 * newest v stands for those that came meanwhile).
 */
void hub_notify(srv_db *db, int64_t v);

/* ---- ws.c ---------------------------------------------------------------- */

bool ws_start(void);
void ws_stop(void);
struct MHD_Response;
/* ws_ticket: what an upgraded socket takes from its request; http.c keeps
 * it in the request, which outlives the upgrade (ws.c copies the token). */
typedef struct ws_ticket
{
	srv_db			*db;
	const auth_info *auth;
} ws_ticket;
/* ws_upgrade builds the 101 response for GET /v1/ws, or fails with e. */
bool ws_upgrade(struct MHD_Connection *conn, const ws_ticket *t, struct MHD_Response **resp,
				srv_error *e);
void ws_broadcast(srv_db *db, int64_t version);
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

/* Every recording function takes the request's database, or NULL for
 * requests that have none (an unknown route, /metrics). */
bool		metrics_init(srv_db *db);
void		metrics_free(srv_db *db);
const char *metrics_endpoint_name(srv_endpoint ep); /* "push", "pull", ... */
void		metrics_request(srv_db *db, srv_endpoint ep, int status, int64_t usec);
void		metrics_bytes(srv_db *db, uint64_t in, uint64_t out);
void		metrics_changes(srv_db *db, int64_t applied, int64_t rejected);
void		metrics_notification(srv_db *db);
void		metrics_rate_limited(srv_db *db);
void		metrics_ws_payload(srv_db *db); /* a payload sent to a WebSocket subscriber */
void		metrics_pull_computed(srv_db *db, int answered); /* one Postgres pull, n answers */
/* The gauges of one database at the time of a scrape (read by the caller). */
typedef struct srv_gauges
{
	int		longpoll, websocket; /* clients holding a connection open */
	int		idle, busy, closed;	 /* pooled Postgres connections */
	int		queued;				 /* requests waiting for a connection */
	int64_t version;			 /* highest version announced */
} srv_gauges;

/* metrics_render returns malloc'd Prometheus text; g has one entry per database. */
char *metrics_render(const srv_gauges *g, size_t *len);

/* ---- http.c -------------------------------------------------------------- */

bool http_start(void);
/* http_stop: false when a database still holds requests (see http.c). */
bool http_stop(void);

#endif /* PGSYNC_SERVER_H */
