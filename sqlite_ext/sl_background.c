/*
 * sl_background.c — sync by itself: a syncer thread per database file
 * (design: docs/CLIENT.md, "Threads and connections").
 *
 *   sync_network_start([options_json])  start the syncer of this database file
 *                                       -> {"started", "state", "pid", "active_pid"}
 *   sync_network_stop()                 stop it (this process) -> {"stopped"}
 *
 * options_json (every key optional, integers in milliseconds unless said):
 *   debounce_ms (5)   wait after a local commit, so that bursts go out together
 *   poll_ms (100)     how often PRAGMA data_version is read (other processes' commits)
 *   interval_ms (60000)  full send + receive, whatever happened (safety net)
 *   wait_ms (25000)   long-poll wait of GET /v1/pull
 *   retry_min_ms (250), retry_max_ms (30000)  backoff after failures (with jitter)
 *   chunk_rows (2000) rows per pulled chunk, so that no write transaction is long
 *   gc_ms (3600000)   how often sync_gc() collects the tombstones the server
 *                     acknowledged (sl_gc.c), after a successful push; 0 = never
 *
 * Invariants:
 *   - the syncer uses only its own connection, on its own thread; the app's
 *     connections are never touched from it. Cross-thread calls: wake-ups
 *     (mutex + curl_multi_wakeup) and, on stop, sqlite3_interrupt of the
 *     syncer's connection, made under the syncer's mutex;
 *   - one syncer per file and process (the registry, keyed by the path
 *     SQLite resolved) and per file across processes (flock on
 *     <db>-sync.lock, released by the kernel when the holder dies);
 *   - a syncer stops, and is joined, on sync_network_stop(), when the
 *     connection that started it closes, and at exit (atexit): no thread,
 *     no lock and no open transaction survives it;
 *   - every state change it makes is one of sl_network.c's transactions
 *     (a chunk with its cursor, a push's cursor), so interrupting it at
 *     any point loses nothing.
 */
#include "sl_network.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

typedef struct bg_opts
{
	int64_t debounce_ms;
	int64_t poll_ms;
	int64_t interval_ms;
	int64_t wait_ms;
	int64_t retry_min_ms;
	int64_t retry_max_ms;
	int64_t chunk_rows;
	int64_t gc_ms;
} bg_opts;

static const struct
{
	const char *name;
	size_t		off;
	int64_t		def, min, max;
} opt_defs[] = {
	{"debounce_ms", offsetof(bg_opts, debounce_ms), 5, 0, 60000},
	{"poll_ms", offsetof(bg_opts, poll_ms), 100, 10, 3600000},
	{"interval_ms", offsetof(bg_opts, interval_ms), 60000, 100, 86400000},
	{"wait_ms", offsetof(bg_opts, wait_ms), 25000, 0, 600000},
	{"retry_min_ms", offsetof(bg_opts, retry_min_ms), 250, 1, 3600000},
	{"retry_max_ms", offsetof(bg_opts, retry_max_ms), 30000, 1, 86400000},
	{"chunk_rows", offsetof(bg_opts, chunk_rows), 2000, 0, 10000000},
	{"gc_ms", offsetof(bg_opts, gc_ms), 3600000, 0, 2592000000},
};

typedef struct syncer
{
	struct syncer *next;
	char		  *path;	  /* the database file, as SQLite resolved it */
	char		  *lock_path; /* path + "-sync.lock" */
	db_conn		  *owner;	  /* the connection that started it */
	bg_opts		   o;
	pthread_t	   thread;
	int			   refs; /* lookups in progress (under reg_mu) */
	/* under mu: */
	pthread_mutex_t mu;
	pthread_cond_t	cv;
	bool			stop;
	bool			woken;		/* a local commit: push */
	bool			kicked;		/* settings changed: try now */
	int64_t			want_ver;	/* highest version a local commit announced */
	uint64_t		events;		/* bumped when a receive applied something */
	const char	   *state;		/* "running" or "standby" */
	long			active_pid; /* the holder of the lock, while in standby */
	sqlite3		   *db;			/* the syncer's connection while open */
	/* the thread's own: */
	CURLM *multi; /* the long-poll */
	CURLM *mreq;  /* every other request (so that stop aborts it) */
	int	   lock_fd;
} syncer;

static pthread_mutex_t reg_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t  reg_cv = PTHREAD_COND_INITIALIZER;
static syncer		  *reg_head;
static int			   reg_count; /* read without the lock by the commit hook (atomic) */
/* sets the extension up on a syncer's own connection (sl_attach, given at
 * registration: the same function for every connection of the process) */
static int (*attach_fn)(sqlite3 *db, char **errmsg, db_conn **out);

static int64_t
mono_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- the lock file ------------------------------------------------------------- */

/*
 * lock_try: the exclusive lock on y's lock file: 1 with y->lock_fd set, 0
 * when another process holds it (*holder its pid), -1 when the file cannot
 * be opened (errno).
 */
static int
lock_try(syncer *y, long *holder)
{
	int	 fd = open(y->lock_path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
	char b[32];

	*holder = 0;
	if (fd < 0)
		return -1;
	if (flock(fd, LOCK_EX | LOCK_NB) == 0)
	{
		int n = snprintf(b, sizeof b, "%ld\n", (long) getpid());

		if (ftruncate(fd, 0) == 0 && pwrite(fd, b, (size_t) n, 0) != n)
			(void) 0; /* the pid is only for messages */
		y->lock_fd = fd;
		return 1;
	}
	{
		ssize_t k = pread(fd, b, sizeof b - 1, 0);

		if (k > 0)
		{
			b[k] = '\0';
			*holder = strtol(b, NULL, 10);
		}
	}
	close(fd);
	return 0;
}

static void
lock_release(syncer *y)
{
	if (y->lock_fd >= 0)
	{
		flock(y->lock_fd, LOCK_UN);
		close(y->lock_fd);
		y->lock_fd = -1;
	}
}

/* lock_probe: is the lock of path's syncer held (by some process)? *pid the holder. */
static bool
lock_probe(const char *path, long *pid)
{
	char *lp = sqlite3_mprintf("%s-sync.lock", path);
	int	  fd = lp ? open(lp, O_RDONLY | O_CLOEXEC) : -1;
	bool  held = false;

	*pid = 0;
	sqlite3_free(lp);
	if (fd < 0)
		return false;
	if (flock(fd, LOCK_SH | LOCK_NB) == 0)
		flock(fd, LOCK_UN);
	else if (errno == EWOULDBLOCK)
	{
		char	b[32];
		ssize_t k = pread(fd, b, sizeof b - 1, 0);

		held = true;
		if (k > 0)
		{
			b[k] = '\0';
			*pid = strtol(b, NULL, 10);
		}
	}
	close(fd);
	return held;
}

/* ---- the registry ---------------------------------------------------------------- */

static const char *
db_path(sqlite3 *db)
{
	const char *p = sqlite3_db_filename(db, "main");

	return p && *p ? p : NULL;
}

/* find: the syncer of path, with a reference (release it), or NULL. */
static syncer *
find(const char *path)
{
	syncer *y;

	if (!path)
		return NULL;
	pthread_mutex_lock(&reg_mu);
	for (y = reg_head; y && strcmp(y->path, path) != 0; y = y->next)
		;
	if (y)
		y->refs++;
	pthread_mutex_unlock(&reg_mu);
	return y;
}

static void
release(syncer *y)
{
	pthread_mutex_lock(&reg_mu);
	if (--y->refs == 0)
		pthread_cond_broadcast(&reg_cv);
	pthread_mutex_unlock(&reg_mu);
}

static void
wake(syncer *y)
{
	if (y->multi)
		curl_multi_wakeup(y->multi);
	if (y->mreq)
		curl_multi_wakeup(y->mreq);
	pthread_cond_broadcast(&y->cv);
}

static bool
stopping(syncer *y)
{
	bool s;

	pthread_mutex_lock(&y->mu);
	s = y->stop;
	pthread_mutex_unlock(&y->mu);
	return s;
}

/* sleep_ms waits up to ms, less when the syncer is stopped or woken. */
static void
sleep_ms(syncer *y, int64_t ms)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	ts.tv_sec += ms / 1000;
	ts.tv_nsec += (ms % 1000) * 1000000;
	if (ts.tv_nsec >= 1000000000)
	{
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000;
	}
	pthread_mutex_lock(&y->mu);
	if (!y->stop && !y->kicked)
		pthread_cond_timedwait(&y->cv, &y->mu, &ts);
	pthread_mutex_unlock(&y->mu);
}

static void
syncer_free(syncer *y)
{
	if (y->multi)
		curl_multi_cleanup(y->multi);
	if (y->mreq)
		curl_multi_cleanup(y->mreq);
	lock_release(y);
	pthread_mutex_destroy(&y->mu);
	pthread_cond_destroy(&y->cv);
	free(y->path);
	free(y->lock_path);
	free(y);
}

/*
 * stop_syncer stops y, joins its thread and frees it. y must be in the
 * registry; the caller holds no lock.
 */
static void
stop_syncer(syncer *y)
{
	pthread_mutex_lock(&reg_mu);
	for (syncer **p = &reg_head; *p; p = &(*p)->next)
		if (*p == y)
		{
			*p = y->next;
			__atomic_sub_fetch(&reg_count, 1, __ATOMIC_SEQ_CST);
			break;
		}
	pthread_mutex_unlock(&reg_mu);
	pthread_mutex_lock(&y->mu);
	y->stop = true;
	if (y->db)
		sqlite3_interrupt(y->db);
	wake(y);
	pthread_mutex_unlock(&y->mu);
	pthread_join(y->thread, NULL);
	pthread_mutex_lock(&reg_mu);
	while (y->refs > 0)
		pthread_cond_wait(&reg_cv, &reg_mu);
	pthread_mutex_unlock(&reg_mu);
	if (y->owner)
		y->owner->started_syncer = false;
	syncer_free(y);
}

static void
stop_all(void)
{
	for (;;)
	{
		syncer *y;

		pthread_mutex_lock(&reg_mu);
		if ((y = reg_head) != NULL)
			y->refs++;
		pthread_mutex_unlock(&reg_mu);
		if (!y)
			return;
		release(y);
		stop_syncer(y);
	}
}

/* In a forked child no syncer thread exists: forget them, drop the locks. */
static void
after_fork_child(void)
{
	for (syncer *y = reg_head; y; y = y->next)
		if (y->lock_fd >= 0)
			close(y->lock_fd); /* the parent's descriptor stays locked, not ours */
	reg_head = NULL;
	reg_count = 0;
	pthread_mutex_init(&reg_mu, NULL);
}

/*
 * pin_and_register: the first start keeps the extension loaded for the life
 * of the process (a thread or an atexit handler must not outlive the code)
 * and installs the exit and fork handlers. False with *why on failure.
 */
static bool
pin_and_register(const char **why)
{
	static bool done = false;
	Dl_info		info;

	if (done)
		return true;
	if (!dladdr((void *) &pin_and_register, &info) || !info.dli_fname ||
		!dlopen(info.dli_fname, RTLD_NOW | RTLD_NODELETE))
	{
		*why = "cannot keep the extension loaded (dladdr/dlopen failed)";
		return false;
	}
	if (atexit(stop_all) != 0 || pthread_atfork(NULL, NULL, after_fork_child) != 0)
	{
		*why = "cannot install the exit handler";
		return false;
	}
	done = true;
	return true;
}

/* ---- the syncer thread ----------------------------------------------------------- */

/* bg_perform: one transfer through y->mreq; a stop aborts it at once. */
static CURLcode
bg_perform(void *arg, CURL *c)
{
	syncer	*y = arg;
	CURLcode rc = CURLE_OK;
	int		 running = 1;
	CURLMsg *m;
	int		 left;

	if (curl_multi_add_handle(y->mreq, c) != CURLM_OK)
		return CURLE_FAILED_INIT;
	while (running)
	{
		if (stopping(y))
		{
			rc = CURLE_ABORTED_BY_CALLBACK;
			break;
		}
		if (curl_multi_perform(y->mreq, &running) != CURLM_OK)
		{
			rc = CURLE_FAILED_INIT;
			break;
		}
		if (running)
			curl_multi_poll(y->mreq, NULL, 0, 1000, NULL);
	}
	while ((m = curl_multi_info_read(y->mreq, &left)) != NULL)
		if (m->msg == CURLMSG_DONE && m->easy_handle == c && rc == CURLE_OK)
			rc = m->data.result;
	curl_multi_remove_handle(y->mreq, c);
	return rc;
}

/* busy: the syncer's connection waits for the app's writers, but not past a stop. */
static int
busy(void *arg, int count)
{
	syncer *y = arg;

	if (stopping(y) || count > 2000)
		return 0;
	sqlite3_sleep(5);
	return 1;
}

static int64_t
q_int(sqlite3 *db, const char *sql, int64_t def)
{
	sqlite3_stmt *st;
	int64_t		  v = def;

	if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK)
		return def;
	if (sqlite3_step(st) == SQLITE_ROW)
		v = sqlite3_column_int64(st, 0);
	sqlite3_finalize(st);
	return v;
}

/* The long-poll in flight. */
typedef struct longpoll
{
	CURL		   *h;
	bool			active;
	sl_net_resp		r;
	sl_http_req		q;
	sl_net_settings s; /* the settings it was made with */
	char			err[CURL_ERROR_SIZE];
} longpoll;

static void
lp_cancel(syncer *y, longpoll *lp)
{
	if (lp->active)
	{
		curl_multi_remove_handle(y->multi, lp->h);
		lp->active = false;
	}
	sl_http_req_free(&lp->q);
	sl_http_resp_free(&lp->r);
	sl_net_free_settings(&lp->s);
}

static bool
lp_start(syncer *y, sl_net *n, longpoll *lp)
{
	char   *path, *msg = NULL;
	int64_t acked = 0;

	lp_cancel(y, lp);
	if (!lp->h && !(lp->h = curl_easy_init()))
		return false;
	if (!sl_net_load_settings(n, &lp->s))
		return false;
	if (!(path = sl_net_pull_path(n, &lp->s, y->o.wait_ms, &acked)))
		return false;
	if (!sl_http_prepare(lp->h, lp->err, &lp->s, path, NULL, 0, y->o.wait_ms, &lp->r, &lp->q, &msg))
	{
		sqlite3_free(path);
		sqlite3_free(msg);
		return false;
	}
	sqlite3_free(path);
	lp->r.acked = acked;
	lp->r.gen = n->pull_gen;
	if (curl_multi_add_handle(y->multi, lp->h) != CURLM_OK)
		return false;
	lp->active = true;
	return true;
}

/* The retry schedule of the thread. */
typedef struct schedule
{
	int		failures;
	int64_t next_try;	   /* monotonic ms; 0 = now */
	char   *blocked_token; /* auth failed with this token: wait for another */
} schedule;

static void
failed(syncer *y, sl_net *n, schedule *sc, const sl_net_settings *s, long retry_after_s)
{
	int64_t	 d = y->o.retry_min_ms;
	uint32_t rnd;

	for (int i = 0; i < sc->failures && d < y->o.retry_max_ms; i++)
		d *= 2;
	if (d > y->o.retry_max_ms)
		d = y->o.retry_max_ms;
	sqlite3_randomness(sizeof rnd, &rnd);
	d = d / 2 + (int64_t) (rnd % (uint32_t) (d / 2 + 1)); /* half fixed, half random */
	if (retry_after_s > 0 && retry_after_s * 1000 > d)
		d = retry_after_s * 1000 < y->o.retry_max_ms ? retry_after_s * 1000 : y->o.retry_max_ms;
	sc->failures++;
	sc->next_try = mono_ms() + d;
	if (n->err_code &&
		(strcmp(n->err_code, "token_expired") == 0 || strcmp(n->err_code, "unauthorized") == 0))
	{
		/* retrying cannot help: wait for a new token (or the capped backoff) */
		free(sc->blocked_token);
		sc->blocked_token = strdup(s->token ? s->token : "");
		sc->next_try = mono_ms() + y->o.retry_max_ms;
	}
	else if (n->err_code && strcmp(n->err_code, "offline") != 0 &&
			 strcmp(n->err_code, "unavailable") != 0 && strcmp(n->err_code, "local") != 0)
		sc->next_try = mono_ms() + y->o.retry_max_ms; /* an administrator must act */
}

static void
succeeded(schedule *sc)
{
	sc->failures = 0;
	sc->next_try = 0;
	free(sc->blocked_token);
	sc->blocked_token = NULL;
}

/* changed: did the receive summary json report rows changed here? */
static bool
changed(const char *json)
{
	cJSON *j = json ? cJSON_Parse(json) : NULL;
	cJSON *r = cJSON_GetObjectItemCaseSensitive(j, "rows_changed");
	bool   yes = cJSON_IsNumber(r) && r->valuedouble > 0;

	cJSON_Delete(j);
	return yes;
}

static void
announce_events(syncer *y)
{
	pthread_mutex_lock(&y->mu);
	y->events++;
	pthread_cond_broadcast(&y->cv);
	pthread_mutex_unlock(&y->mu);
}

/*
 * device_gc: sync_gc() on the syncer's connection: the tombstones the server
 * acknowledged (sl_gc.c). A failure (the app holding a write lock, say) is
 * recorded like any other and tried again at the next gc_ms.
 */
static void
device_gc(sl_net *n)
{
	sqlite3_stmt *st;
	int			  rc = SQLITE_ERROR;

	if (sl_stmt_prepare(n->c, "SELECT sync_gc()", &st) == SQLITE_OK)
		rc = sqlite3_step(st);
	if (rc != SQLITE_ROW)
		sl_net_record_error(n, "background sync_gc", sqlite3_errmsg(n->db));
	sl_stmt_done(n->c, st);
}

/* run: the loop of a syncer that holds the lock, on its own connection. */
static void
run(syncer *y, sl_net *n)
{
	sqlite3		 *db = n->db;
	sqlite3_stmt *dv_st = NULL;
	longpoll	  lp;
	schedule	  sc = {0};
	bool		  need_push = true, need_pull = true;
	int64_t		  now = mono_ms(), push_at = 0, burst = 0, next_poll = now + y->o.poll_ms,
			next_safety = now + y->o.interval_ms, next_gc = now + y->o.gc_ms, dv = -1;

	memset(&lp, 0, sizeof lp);
	if (sqlite3_prepare_v2(db, "PRAGMA data_version", -1, &dv_st, NULL) == SQLITE_OK &&
		sqlite3_step(dv_st) == SQLITE_ROW)
		dv = sqlite3_column_int64(dv_st, 0);
	sqlite3_reset(dv_st);
	while (!stopping(y))
	{
		sl_net_settings s;
		bool			woken, kicked, have_settings;
		int64_t			want, timeout;

		now = mono_ms();
		pthread_mutex_lock(&y->mu);
		woken = y->woken;
		kicked = y->kicked;
		want = y->want_ver;
		y->woken = y->kicked = false;
		pthread_mutex_unlock(&y->mu);
		if (woken)
		{
			/* debounce: a burst of commits goes out as one push */
			if (!burst)
				burst = now;
			push_at = now + y->o.debounce_ms;
			if (push_at > burst + 10 * y->o.debounce_ms)
				push_at = burst + 10 * y->o.debounce_ms;
			need_push = true;
		}
		if (kicked)
		{
			sc.next_try = 0;
			need_push = need_pull = true;
		}
		if (now >= next_poll)
		{
			int64_t v = dv;

			next_poll = now + y->o.poll_ms;
			if (dv_st && sqlite3_step(dv_st) == SQLITE_ROW)
				v = sqlite3_column_int64(dv_st, 0);
			sqlite3_reset(dv_st);
			if (v != dv)
			{
				/* another connection or process committed */
				dv = v;
				if (!need_push)
					push_at = now;
				need_push = true;
				if (sc.blocked_token)
				{
					char *t = sl_net_kv_text(n, "token");

					if (!t || strcmp(t, sc.blocked_token) != 0)
					{
						sc.next_try = 0;
						need_pull = true;
					}
					sqlite3_free(t);
				}
			}
		}
		if (now >= next_safety)
		{
			need_push = need_pull = true;
			next_safety = now + y->o.interval_ms;
		}
		/* settings are read only when there is something to do (idle costs nothing) */
		have_settings = now >= sc.next_try &&
						((need_push && now >= push_at) || need_pull || !lp.active) &&
						sl_net_load_settings(n, &s);
		if (have_settings)
			s.retries = 0; /* the backoff is this loop's */
		if (have_settings)
		{
			if (need_push && now >= push_at)
			{
				int64_t dbv = q_int(db, "SELECT db_version FROM sync_state", 0);

				if (dbv < want && now - burst < 1000 && burst)
					push_at = now + 5; /* that commit is not visible yet */
				else
				{
					char *msg = NULL, *json = sl_net_send(n, &s, &msg);

					if (json)
					{
						need_push = false;
						burst = 0;
						succeeded(&sc);
					}
					else if (!stopping(y))
						failed(y, n, &sc, &s, 0);
					sqlite3_free(json);
					sqlite3_free(msg);
				}
			}
			if (need_pull && now >= sc.next_try && !stopping(y))
			{
				char   *msg = NULL, *json;
				int64_t np = 0;

				lp_cancel(y, &lp);
				json = sl_net_receive(n, &s, 0, NULL, &np, &msg);
				if (json)
				{
					need_pull = false;
					succeeded(&sc);
					if (changed(json))
						announce_events(y);
				}
				else if (!stopping(y))
					failed(y, n, &sc, &s, 0);
				sqlite3_free(json);
				sqlite3_free(msg);
			}
			if (!lp.active && sc.next_try <= mono_ms() && !need_pull && !stopping(y))
				lp_start(y, n, &lp);
		}
		if (have_settings)
			sl_net_free_settings(&s);
		/* the device's tombstone GC, when nothing waits to be pushed (what the
		 * server acknowledged is what it collects) */
		if (y->o.gc_ms > 0 && mono_ms() >= next_gc && !need_push && !stopping(y))
		{
			device_gc(n);
			next_gc = mono_ms() + y->o.gc_ms;
		}
		/* sleep until the next thing to do; the long-poll, a commit or a stop wakes us */
		now = mono_ms();
		timeout = next_poll - now;
		if (next_safety - now < timeout)
			timeout = next_safety - now;
		if (y->o.gc_ms > 0 && !need_push && next_gc - now < timeout)
			timeout = next_gc - now; /* with a push pending, the push's success runs it */
		if (sc.next_try > now && sc.next_try - now < timeout)
			timeout = sc.next_try - now;
		if (need_push && push_at > now && push_at - now < timeout && sc.next_try <= now)
			timeout = push_at - now;
		if (need_push && push_at <= now && sc.next_try <= now)
			timeout = 0;
		if (timeout < 0)
			timeout = 0;
		{
			int		 running = 0, left;
			CURLMsg *m;

			curl_multi_poll(y->multi, NULL, 0, (int) timeout, NULL);
			curl_multi_perform(y->multi, &running);
			while ((m = curl_multi_info_read(y->multi, &left)) != NULL)
			{
				bool  transient, ok;
				char *msg = NULL;

				if (m->msg != CURLMSG_DONE || m->easy_handle != lp.h || !lp.active)
					continue;
				curl_multi_remove_handle(y->multi, lp.h);
				lp.active = false;
				sl_http_req_free(&lp.q);
				ok = sl_http_outcome(n, lp.h, lp.err, &lp.s, m->data.result, &lp.r, &transient,
									 &msg);
				if (ok && sl_net_load_settings(n, &s))
				{
					/* the server's answer: a payload to apply (and the chunks after
					 * it), or a 204 that may move the cursor */
					int64_t np = 0;
					char   *json;

					sqlite3_free(msg);
					msg = NULL;
					s.retries = 0;
					json = sl_net_receive(n, &s, 0, &lp.r, &np, &msg);
					if (json)
					{
						succeeded(&sc);
						need_pull = false;
						if (changed(json))
							announce_events(y);
					}
					else if (!stopping(y))
						failed(y, n, &sc, &s, 0);
					sqlite3_free(json);
					sl_net_free_settings(&s);
				}
				else if (!stopping(y))
				{
					/* 409, 410, 401, offline...: the next receive handles it (and records it) */
					if (!ok)
						sl_net_record_error(n, "background receive", msg);
					failed(y, n, &sc, &lp.s, lp.r.retry_after);
					need_pull = !ok && (lp.r.status == 409 || lp.r.status == 410);
				}
				sqlite3_free(msg);
				sl_http_resp_free(&lp.r);
				sl_net_free_settings(&lp.s);
				break; /* lp's message handled; the handle is free again */
			}
		}
	}
	lp_cancel(y, &lp);
	if (lp.h)
		curl_easy_cleanup(lp.h);
	free(sc.blocked_token);
	sqlite3_finalize(dv_st);
}

static void *
bg_main(void *arg)
{
	syncer	*y = arg;
	sigset_t all;
	sqlite3 *db = NULL;
	db_conn *c = NULL;
	char	*err = NULL;

	/* signals are the app's: never delivered to this thread */
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL);
	while (y->lock_fd < 0 && !stopping(y))
	{
		long holder = 0;

		if (lock_try(y, &holder) == 1)
			break;
		pthread_mutex_lock(&y->mu);
		y->state = "standby";
		y->active_pid = holder;
		pthread_mutex_unlock(&y->mu);
		sleep_ms(y, 1000);
		pthread_mutex_lock(&y->mu);
		y->kicked = false;
		pthread_mutex_unlock(&y->mu);
	}
	if (stopping(y))
		goto out;
	pthread_mutex_lock(&y->mu);
	y->state = "running";
	y->active_pid = 0;
	pthread_mutex_unlock(&y->mu);
	if (sqlite3_open_v2(y->path, &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL) !=
			SQLITE_OK ||
		!attach_fn || attach_fn(db, &err, &c) != SQLITE_OK || !c || !c->net)
	{
		/* recorded for sync_network_status() through the next app call: nothing
		 * else can report from here; stopped so that status says so */
		sqlite3_free(err);
		goto out;
	}
	sqlite3_busy_handler(db, busy, y);
	if (q_int(db, "SELECT journal_mode = 'wal' FROM pragma_journal_mode", 0))
		sqlite3_exec(db, "PRAGMA synchronous = NORMAL", NULL, NULL,
					 NULL); /* a lost commit is pulled or pushed again */
	c->net->background = true;
	c->net->perform = bg_perform;
	c->net->perform_arg = y;
	c->net->chunk_rows = y->o.chunk_rows;
	pthread_mutex_lock(&y->mu);
	y->db = db;
	pthread_mutex_unlock(&y->mu);
	run(y, c->net);
out:
	pthread_mutex_lock(&y->mu);
	y->db = NULL;
	pthread_mutex_unlock(&y->mu);
	if (db)
		sqlite3_close(db);
	lock_release(y);
	pthread_mutex_lock(&y->mu);
	y->state = "stopped";
	pthread_cond_broadcast(&y->cv);
	pthread_mutex_unlock(&y->mu);
	return NULL;
}

/* ---- SQL functions ------------------------------------------------------------------ */

/* parse_options fills o from options_json; false with the error set on ctx. */
static bool
parse_options(sqlite3_context *ctx, sqlite3_value *v, bg_opts *o)
{
	cJSON *j, *it;

	for (size_t i = 0; i < sizeof opt_defs / sizeof opt_defs[0]; i++)
		*(int64_t *) ((char *) o + opt_defs[i].off) = opt_defs[i].def;
	if (!v || sqlite3_value_type(v) == SQLITE_NULL)
		return true;
	j = sqlite3_value_type(v) == SQLITE_TEXT ? cJSON_Parse((const char *) sqlite3_value_text(v))
											 : NULL;
	if (!cJSON_IsObject(j))
	{
		cJSON_Delete(j);
		sqlite3_result_error(ctx,
							 "sync_network_start: options must be a JSON object, e.g. "
							 "'{\"debounce_ms\": 10}'",
							 -1);
		return false;
	}
	cJSON_ArrayForEach(it, j)
	{
		size_t i;
		char  *m;

		for (i = 0; i < sizeof opt_defs / sizeof opt_defs[0]; i++)
			if (strcmp(it->string, opt_defs[i].name) == 0)
				break;
		if (i == sizeof opt_defs / sizeof opt_defs[0])
		{
			m = sqlite3_mprintf(
				"sync_network_start: unknown option \"%s\"; the options are debounce_ms, "
				"poll_ms, interval_ms, wait_ms, retry_min_ms, retry_max_ms, chunk_rows and gc_ms",
				it->string);
			sqlite3_result_error(ctx, m, -1);
			sqlite3_free(m);
			cJSON_Delete(j);
			return false;
		}
		if (!cJSON_IsNumber(it) || it->valuedouble != (double) (int64_t) it->valuedouble ||
			it->valuedouble < (double) opt_defs[i].min ||
			it->valuedouble > (double) opt_defs[i].max)
		{
			m = sqlite3_mprintf("sync_network_start: option \"%s\" must be an integer from %lld "
								"to %lld (default %lld)",
								it->string, (long long) opt_defs[i].min,
								(long long) opt_defs[i].max, (long long) opt_defs[i].def);
			sqlite3_result_error(ctx, m, -1);
			sqlite3_free(m);
			cJSON_Delete(j);
			return false;
		}
		*(int64_t *) ((char *) o + opt_defs[i].off) = (int64_t) it->valuedouble;
	}
	cJSON_Delete(j);
	if (o->retry_min_ms > o->retry_max_ms)
	{
		sqlite3_result_error(ctx, "sync_network_start: retry_min_ms must not exceed retry_max_ms",
							 -1);
		return false;
	}
	return true;
}

static void
sync_network_start(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	sl_net		   *n = sqlite3_user_data(ctx);
	const char	   *path = db_path(n->db), *why = NULL;
	sl_net_settings s;
	bg_opts			o;
	syncer		   *y;
	cJSON		   *j;
	long			holder = 0;
	int				got;

	if (!parse_options(ctx, argc > 0 ? argv[0] : NULL, &o))
		return;
	if (!sqlite3_threadsafe())
	{
		sqlite3_result_error(ctx,
							 "sync_network_start: this SQLite library was built single-threaded "
							 "(SQLITE_THREADSAFE=0); background sync needs a thread. Use a build "
							 "with threads, or call sync_network_sync() yourself",
							 -1);
		return;
	}
	if (!path)
	{
		sqlite3_result_error(ctx,
							 "sync_network_start: this database is in memory or temporary; "
							 "background sync needs a database file (its own connection opens "
							 "the same file)",
							 -1);
		return;
	}
	if (!sl_net_load_settings(n, &s))
	{
		sqlite3_result_error(ctx,
							 "sync_network_start: no server configured; call "
							 "sync_network_init('http://host:port', token) first",
							 -1);
		return;
	}
	sl_net_free_settings(&s);
	if ((y = find(path)) != NULL)
	{
		/* one per file: say who runs it */
		j = cJSON_CreateObject();
		cJSON_AddBoolToObject(j, "started", false);
		pthread_mutex_lock(&y->mu);
		cJSON_AddStringToObject(j, "state", y->state);
		cJSON_AddNumberToObject(j, "pid", (double) getpid());
		if (y->active_pid)
			cJSON_AddNumberToObject(j, "active_pid", (double) y->active_pid);
		pthread_mutex_unlock(&y->mu);
		release(y);
		sl_result_json(ctx, j);
		return;
	}
	if (!pin_and_register(&why))
	{
		char *m = sqlite3_mprintf("sync_network_start: %s", why);

		sqlite3_result_error(ctx, m, -1);
		sqlite3_free(m);
		return;
	}
	if (!(y = calloc(1, sizeof *y)) || !(y->path = strdup(path)) ||
		asprintf(&y->lock_path, "%s-sync.lock", path) < 0)
	{
		if (y)
		{
			y->lock_path = NULL;
			free(y->path);
			free(y);
		}
		sqlite3_result_error_nomem(ctx);
		return;
	}
	y->o = o;
	y->lock_fd = -1;
	y->owner = n->c;
	pthread_mutex_init(&y->mu, NULL);
	pthread_cond_init(&y->cv, NULL);
	y->multi = curl_multi_init();
	y->mreq = curl_multi_init();
	if ((got = lock_try(y, &holder)) < 0)
	{
		char *m = sqlite3_mprintf("sync_network_start: cannot open the lock file %s (%s); the "
								  "directory of the database must be writable",
								  y->lock_path, strerror(errno));

		syncer_free(y);
		sqlite3_result_error(ctx, m, -1);
		sqlite3_free(m);
		return;
	}
	y->state = got ? "running" : "standby";
	y->active_pid = holder;
	if (!y->multi || !y->mreq || pthread_create(&y->thread, NULL, bg_main, y) != 0)
	{
		syncer_free(y);
		sqlite3_result_error(ctx,
							 "sync_network_start: cannot start the syncer thread (out of "
							 "memory or threads)",
							 -1);
		return;
	}
	pthread_mutex_lock(&reg_mu);
	y->next = reg_head;
	reg_head = y;
	__atomic_add_fetch(&reg_count, 1, __ATOMIC_SEQ_CST);
	pthread_mutex_unlock(&reg_mu);
	n->c->started_syncer = true;
	j = cJSON_CreateObject();
	cJSON_AddBoolToObject(j, "started", true);
	cJSON_AddStringToObject(j, "state", got ? "running" : "standby");
	cJSON_AddNumberToObject(j, "pid", (double) getpid());
	if (holder)
		cJSON_AddNumberToObject(j, "active_pid", (double) holder);
	sl_result_json(ctx, j);
}

static void
sync_network_stop(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	sl_net *n = sqlite3_user_data(ctx);
	syncer *y = find(db_path(n->db));
	cJSON  *j;
	long	pid = 0;

	(void) argc, (void) argv;
	if (y)
	{
		release(y);
		stop_syncer(y);
		j = cJSON_CreateObject();
		cJSON_AddBoolToObject(j, "stopped", true);
		sl_result_json(ctx, j);
		return;
	}
	if (db_path(n->db) && lock_probe(db_path(n->db), &pid))
	{
		char *m = sqlite3_mprintf(
			"sync_network_stop: the background syncer of this database runs in another process "
			"(pid %ld); call sync_network_stop() there, or end that process",
			pid);

		sqlite3_result_error(ctx, m, -1);
		sqlite3_free(m);
		return;
	}
	j = cJSON_CreateObject();
	cJSON_AddBoolToObject(j, "stopped", false); /* none was running */
	sl_result_json(ctx, j);
}

/* ---- hooks for the rest of the extension ----------------------------------------------- */

void
sl_background_committed(db_conn *c, int64_t ver)
{
	syncer *y;

	if (__atomic_load_n(&reg_count, __ATOMIC_SEQ_CST) == 0 || (c->net && c->net->background))
		return;
	if (!(y = find(db_path(c->db))))
		return;
	pthread_mutex_lock(&y->mu);
	if (ver > y->want_ver)
		y->want_ver = ver;
	y->woken = true;
	if (y->multi)
		curl_multi_wakeup(y->multi);
	pthread_mutex_unlock(&y->mu);
	release(y);
}

static void
sl_background_kick(sl_net *n)
{
	syncer *y = __atomic_load_n(&reg_count, __ATOMIC_SEQ_CST) ? find(db_path(n->db)) : NULL;

	if (!y)
		return;
	pthread_mutex_lock(&y->mu);
	y->kicked = true;
	wake(y);
	pthread_mutex_unlock(&y->mu);
	release(y);
}

void
sl_background_closing(db_conn *c)
{
	if (!c->started_syncer)
		return;
	for (;;)
	{
		syncer *y;

		pthread_mutex_lock(&reg_mu);
		for (y = reg_head; y && y->owner != c; y = y->next)
			;
		if (y)
			y->refs++;
		pthread_mutex_unlock(&reg_mu);
		if (!y)
			break;
		release(y);
		stop_syncer(y);
	}
	c->started_syncer = false;
}

/* events_mark: the app connection's view of the syncer's progress, for a wait
 * on a syncer of another process: max(seq) of the events, or the cursor. */
static char *
events_mark(sl_net *n)
{
	sqlite3_stmt *st;
	char		 *m = NULL;

	if (sl_stmt_prepare(
			n->c,
			"SELECT coalesce((SELECT max(seq) FROM sync_network_changes), '') || ':' "
			"|| coalesce((SELECT value FROM sync_network WHERE key = 'recv_cursor'), '')",
			&st) != SQLITE_OK &&
		sl_stmt_prepare(n->c, "SELECT value FROM sync_network WHERE key = 'recv_cursor'", &st) !=
			SQLITE_OK)
		return NULL;
	if (sqlite3_step(st) == SQLITE_ROW)
		m = sqlite3_mprintf("%s", sqlite3_column_text(st, 0));
	sl_stmt_done(n->c, st);
	return m;
}

static int
sl_background_wait(sl_net *n, int64_t timeout_ms)
{
	const char *path = db_path(n->db);
	syncer	   *y = find(path);
	int64_t		deadline = mono_ms() + timeout_ms;
	long		pid;

	if (y)
	{
		uint64_t e0;
		int		 r = 0;

		pthread_mutex_lock(&y->mu);
		e0 = y->events;
		while (!y->stop && y->events == e0 && strcmp(y->state, "stopped") != 0)
		{
			int64_t			left = deadline - mono_ms();
			struct timespec ts;

			if (left <= 0)
				break;
			clock_gettime(CLOCK_REALTIME, &ts);
			ts.tv_sec += left / 1000;
			ts.tv_nsec += (left % 1000) * 1000000;
			if (ts.tv_nsec >= 1000000000)
			{
				ts.tv_sec++;
				ts.tv_nsec -= 1000000000;
			}
			pthread_cond_timedwait(&y->cv, &y->mu, &ts);
		}
		r = y->events != e0;
		pthread_mutex_unlock(&y->mu);
		release(y);
		return r;
	}
	if (path && lock_probe(path, &pid))
	{
		/* the syncer runs in another process: watch what it records */
		char *m0 = events_mark(n);
		int	  r = 0;

		while (mono_ms() < deadline)
		{
			char *m;

			sqlite3_sleep(50);
			m = events_mark(n);
			r = m && m0 && strcmp(m, m0) != 0;
			sqlite3_free(m);
			if (r)
				break;
		}
		sqlite3_free(m0);
		return r;
	}
	return -1;
}

static const char *
sl_background_state(sl_net *n, long *pid)
{
	const char *path = db_path(n->db);
	syncer	   *y = find(path);

	*pid = 0;
	if (y)
	{
		const char *st;

		pthread_mutex_lock(&y->mu);
		st = y->state;
		*pid = y->active_pid ? y->active_pid : (long) getpid();
		pthread_mutex_unlock(&y->mu);
		release(y);
		return st;
	}
	if (path && lock_probe(path, pid))
		return "running";
	return "stopped";
}

static const sl_bg_ops ops = {
	.wait = sl_background_wait,
	.state = sl_background_state,
	.kick = sl_background_kick,
};

int
sl_background_register(sqlite3 *db, db_conn *c, sl_net *n,
					   int (*attach)(sqlite3 *db, char **errmsg, db_conn **out))
{
	int rc;

	(void) c;
	attach_fn = attach;
	n->bg = &ops;
	rc = sqlite3_create_function_v2(db, "sync_network_start", 0,
									SQLITE_UTF8 | SQLITE_DIRECTONLY | SQLITE_RESULT_SUBTYPE, n,
									sync_network_start, NULL, NULL, NULL);
	if (rc == SQLITE_OK)
		rc = sqlite3_create_function_v2(db, "sync_network_start", 1,
										SQLITE_UTF8 | SQLITE_DIRECTONLY | SQLITE_RESULT_SUBTYPE, n,
										sync_network_start, NULL, NULL, NULL);
	if (rc == SQLITE_OK)
		rc = sqlite3_create_function_v2(db, "sync_network_stop", 0,
										SQLITE_UTF8 | SQLITE_DIRECTONLY | SQLITE_RESULT_SUBTYPE, n,
										sync_network_stop, NULL, NULL, NULL);
	return rc;
}
