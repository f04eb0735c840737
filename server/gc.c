/*
 * gc.c — the tombstone collection schedule (docs/DESIGN.md, "Tombstone GC
 * with a horizon"; docs/SERVER.md, gc_interval and gc_retention_days).
 *
 * One thread with its own Postgres connection (not a pool slot: a long
 * collection never makes a request wait) runs
 *     SELECT sync_gc(make_interval(secs => gc_retention_days * 86400))
 * every gc_interval seconds, the first run one interval after start-up, and
 * logs what it collected. Any number of server processes may run it: the
 * collection is safe to run concurrently (the second one finds the tables
 * busy or nothing left). A failure is logged and retried at the next
 * interval; the connection is opened again after an error.
 */
#include "server.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t  cv = PTHREAD_COND_INITIALIZER;
static bool			   stopping;
static bool			   started;
static pthread_t	   tid;

/* run_once: one sync_gc; conn is closed and NULLed when it broke. */
static void
run_once(PGconn **conn)
{
	char		why[256] = "";
	char		secs[64];
	const char *params[1] = {secs};
	PGresult   *res;

	if (!*conn && !(*conn = pool_connect(why, sizeof why)))
	{
		srv_log("WARNING", "gc: cannot connect to PostgreSQL (%s); trying again in %d s", why,
				cfg.gc_interval);
		return;
	}
	/* a large collection may take longer than a request's statement_timeout */
	PQclear(PQexec(*conn, "SET statement_timeout = 0"));
	snprintf(secs, sizeof secs, "%.3f", cfg.gc_retention_days * 86400.0);
	res = PQexecParams(*conn,
					   "SELECT sync_gc(pg_catalog.make_interval(secs => $1::pg_catalog.float8))"
					   "::text",
					   1, NULL, params, NULL, NULL, 0);
	if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1)
		srv_log("LOG", "gc: %s", PQgetvalue(res, 0, 0));
	else
	{
		srv_log("WARNING", "gc: sync_gc failed: %s%s", PQresultErrorMessage(res),
				PQstatus(*conn) == CONNECTION_OK
					? " (the server's login role needs EXECUTE on sync_gc(interval): "
					  "docs/SERVER.md)"
					: "");
		if (PQstatus(*conn) != CONNECTION_OK)
		{
			PQfinish(*conn);
			*conn = NULL;
		}
	}
	PQclear(res);
}

static void *
gc_main(void *arg)
{
	PGconn *conn = NULL;

	(void) arg;
	pthread_mutex_lock(&mu);
	while (!stopping)
	{
		struct timespec until;

		clock_gettime(CLOCK_REALTIME, &until);
		until.tv_sec += cfg.gc_interval;
		while (!stopping && pthread_cond_timedwait(&cv, &mu, &until) != ETIMEDOUT)
			;
		if (stopping)
			break;
		pthread_mutex_unlock(&mu);
		run_once(&conn);
		pthread_mutex_lock(&mu);
	}
	pthread_mutex_unlock(&mu);
	if (conn)
		PQfinish(conn);
	return NULL;
}

bool
gc_start(void)
{
	if (cfg.gc_interval <= 0)
		return true; /* collection is off */
	if (pthread_create(&tid, NULL, gc_main, NULL) != 0)
	{
		srv_log("FATAL", "gc: cannot start the collection thread: %s", strerror(errno));
		return false;
	}
	started = true;
	return true;
}

void
gc_stop(void)
{
	if (!started)
		return;
	pthread_mutex_lock(&mu);
	stopping = true;
	pthread_cond_signal(&cv);
	pthread_mutex_unlock(&mu);
	pthread_join(tid, NULL); /* a running sync_gc finishes first */
	started = false;
}
