/*
 * gc.c — each database's tombstone collection schedule (docs/DESIGN.md,
 * "Tombstone GC with a horizon"; docs/SERVER.md, gc_interval and
 * gc_retention_days).
 *
 * Every database (each [database NAME] section, or the only one) with
 * gc_interval > 0 has one thread with its own Postgres connection (not a
 * pool slot: a long collection never makes a request wait) that runs
 *     SELECT sync_gc(make_interval(secs => gc_retention_days * 86400))
 * every gc_interval seconds, the first run one interval after start-up, and
 * logs what it collected. The databases' schedules are independent: one
 * database's slow collection or outage delays no other's. Any number of
 * server processes may run it: the collection is safe to run concurrently
 * (the second one finds the tables busy or nothing left). A failure is
 * logged and retried at the next interval; the connection is opened again
 * after an error. At shutdown a collection in progress is cancelled (it
 * rolls back; the next run starts over).
 */
#include "server.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct srv_gc
{
	pthread_mutex_t mu;
	pthread_cond_t	cv;
	bool			stopping;
	pthread_t		tid;
	PGcancel	   *cancel; /* of the running collection, under mu; NULL between runs */
} srv_gc;

/* run_once: one sync_gc; conn is closed and NULLed when it broke. */
static void
run_once(srv_db *db, PGconn **conn)
{
	srv_gc	   *g = db->gc;
	char		why[256] = "";
	char		secs[64];
	const char *params[1] = {secs};
	PGresult   *res;
	bool		stopping;

	if (!*conn && !(*conn = pool_connect(db, why, sizeof why)))
	{
		srv_log("WARNING",
				"database %s: gc: cannot connect to PostgreSQL (%s); trying again in %d s",
				db->name, why, db->c.gc_interval);
		return;
	}
	/* a large collection may take longer than a request's statement_timeout */
	PQclear(PQexec(*conn, "SET statement_timeout = 0"));
	snprintf(secs, sizeof secs, "%.3f", db->c.gc_retention_days * 86400.0);
	pthread_mutex_lock(&g->mu);
	g->cancel = g->stopping ? NULL : PQgetCancel(*conn);
	pthread_mutex_unlock(&g->mu);
	if (!g->cancel)
		return; /* stopping, or out of memory: the next run tries again */
	res = PQexecParams(*conn,
					   "SELECT sync_gc(pg_catalog.make_interval(secs => $1::pg_catalog.float8))"
					   "::text",
					   1, NULL, params, NULL, NULL, 0);
	pthread_mutex_lock(&g->mu);
	PQfreeCancel(g->cancel);
	g->cancel = NULL;
	stopping = g->stopping;
	pthread_mutex_unlock(&g->mu);
	if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1)
		srv_log("LOG", "database %s: gc: %s", db->name, PQgetvalue(res, 0, 0));
	else if (stopping)
		srv_log("LOG", "database %s: gc: collection cancelled by the shutdown", db->name);
	else
	{
		char *msg = strdup(PQresultErrorMessage(res));
		char *nl;

		while (msg && (nl = strrchr(msg, '\n')) && nl[1] == '\0')
			*nl = '\0';
		srv_log("WARNING", "database %s: gc: sync_gc failed: %s%s", db->name,
				msg ? msg : "out of memory",
				PQstatus(*conn) == CONNECTION_OK
					? " (the server's login role needs EXECUTE on sync_gc(interval) and "
					  "pgsync 0.2 or later: docs/SERVER.md, gc_interval)"
					: "");
		free(msg);
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
	srv_db *db = arg;
	srv_gc *g = db->gc;
	PGconn *conn = NULL;

	pthread_mutex_lock(&g->mu);
	while (!g->stopping)
	{
		struct timespec until;

		clock_gettime(CLOCK_REALTIME, &until);
		until.tv_sec += db->c.gc_interval;
		while (!g->stopping && pthread_cond_timedwait(&g->cv, &g->mu, &until) != ETIMEDOUT)
			;
		if (g->stopping)
			break;
		pthread_mutex_unlock(&g->mu);
		run_once(db, &conn);
		pthread_mutex_lock(&g->mu);
	}
	pthread_mutex_unlock(&g->mu);
	if (conn)
		PQfinish(conn);
	return NULL;
}

bool
gc_start(srv_db *db)
{
	srv_gc *g;
	int		rc;

	if (db->c.gc_interval <= 0)
		return true; /* collection is off for this database */
	if (!(g = calloc(1, sizeof *g)))
		return false;
	pthread_mutex_init(&g->mu, NULL);
	pthread_cond_init(&g->cv, NULL);
	db->gc = g;
	if ((rc = pthread_create(&g->tid, NULL, gc_main, db)) != 0)
	{
		srv_log("FATAL", "database %s: gc: cannot start the collection thread: %s", db->name,
				strerror(rc));
		pthread_cond_destroy(&g->cv);
		pthread_mutex_destroy(&g->mu);
		free(g);
		db->gc = NULL;
		return false;
	}
	return true;
}

void
gc_stop(srv_db *db)
{
	srv_gc *g = db->gc;
	char	err[256];

	if (!g)
		return;
	pthread_mutex_lock(&g->mu);
	g->stopping = true;
	if (g->cancel)
		PQcancel(g->cancel, err, sizeof err); /* a running sync_gc rolls back */
	pthread_cond_signal(&g->cv);
	pthread_mutex_unlock(&g->mu);
	pthread_join(g->tid, NULL);
	pthread_cond_destroy(&g->cv);
	pthread_mutex_destroy(&g->mu);
	free(g);
	db->gc = NULL;
}
