/*
 * pool.c — a fixed pool of libpq connections shared by the request threads.
 *
 * Invariants: a slot is either free or lent to exactly one request; a lent
 * connection always comes back through pool_release (sync.c releases on
 * every path), which rolls back anything left open, so a connection never
 * returns to the pool inside a transaction or with SET ROLE applied. A
 * connection that failed is closed and its slot reconnects lazily on the
 * next acquire; while Postgres is down, acquires fail fast with 503 for one
 * second after each failed connect instead of every request paying the
 * connect timeout. Connections are opened with statement_timeout and an
 * application_name, and with notices silenced (sync_apply_payload's
 * "rows were rejected" WARNING is read through sync_rejections() instead).
 */
#include "server.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct slot
{
	PGconn *conn;
	bool	busy;
} slot;

static slot			  *slots;
static int			   nslots;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t  freed = PTHREAD_COND_INITIALIZER;
static int64_t		   down_until;
static int64_t		   down_logged; /* when "cannot connect" was last logged */
static char			   down_why[256];

static void
quiet(void *arg, const char *message)
{
	(void) arg, (void) message;
}

/* pool_connect opens one connection; NULL with the reason in why. */
PGconn *
pool_connect(char *why, size_t whylen)
{
	char		ct[16], opts[64];
	const char *keys[] = {"dbname", "connect_timeout", "application_name", "options", NULL};
	const char *vals[] = {cfg.database ? cfg.database : "", ct, SRV_NAME, opts, NULL};
	PGconn	   *conn;

	snprintf(ct, sizeof ct, "%d", cfg.connect_timeout);
	snprintf(opts, sizeof opts, "-c statement_timeout=%d", cfg.statement_timeout_ms);
	conn = PQconnectdbParams(keys, vals, 1);
	if (!conn)
	{
		snprintf(why, whylen, "out of memory");
		return NULL;
	}
	if (PQstatus(conn) != CONNECTION_OK)
	{
		char *nl;

		snprintf(why, whylen, "%s", PQerrorMessage(conn));
		while ((nl = strrchr(why, '\n')) && nl[1] == '\0')
			*nl = '\0';
		for (nl = why; *nl; nl++)
			if (*nl == '\n' || *nl == '\t')
				*nl = ' ';
		PQfinish(conn);
		return NULL;
	}
	PQsetNoticeProcessor(conn, quiet, NULL);
	return conn;
}

bool
pool_start(void)
{
	char	why[256];
	PGconn *first;

	nslots = cfg.pool_size;
	slots = calloc((size_t) nslots, sizeof(slot));
	if (!slots)
		return false;
	/* one eager connection: fail loudly on a wrong conninfo, but start anyway */
	first = pool_connect(why, sizeof why);
	if (first)
	{
		slots[0].conn = first;
		sync_learn_site(first);
	}
	else
		srv_log("WARNING",
				"cannot connect to Postgres yet (%s); answering 503 until it is reachable", why);
	return true;
}

void
pool_stop(void)
{
	pthread_mutex_lock(&mu);
	for (int i = 0; i < nslots; i++)
		if (slots[i].conn && !slots[i].busy)
		{
			PQfinish(slots[i].conn);
			slots[i].conn = NULL;
		}
	pthread_mutex_unlock(&mu);
	free(slots);
	slots = NULL;
	nslots = 0;
}

static void
give_back(slot *s)
{
	pthread_mutex_lock(&mu);
	s->busy = false;
	pthread_cond_signal(&freed);
	pthread_mutex_unlock(&mu);
}

PGconn *
pool_acquire(srv_error *e)
{
	struct timespec until;
	slot		   *s = NULL;
	int64_t			now;
	char			why[256];

	clock_gettime(CLOCK_REALTIME, &until);
	until.tv_sec += cfg.pool_wait_ms / 1000;
	until.tv_nsec += (long) (cfg.pool_wait_ms % 1000) * 1000000L;
	if (until.tv_nsec >= 1000000000L)
	{
		until.tv_sec++;
		until.tv_nsec -= 1000000000L;
	}
	pthread_mutex_lock(&mu);
	for (;;)
	{
		/* prefer a slot that already holds a connection */
		for (int i = 0; i < nslots && !s; i++)
			if (!slots[i].busy && slots[i].conn)
				s = &slots[i];
		for (int i = 0; i < nslots && !s; i++)
			if (!slots[i].busy)
				s = &slots[i];
		if (s)
			break;
		if (pthread_cond_timedwait(&freed, &mu, &until) != 0)
		{
			pthread_mutex_unlock(&mu);
			srv_fail(e, 503, "server busy", "Retry after a moment; operators can raise pool_size.",
					 "All %d Postgres connections stayed busy for %d ms.", nslots,
					 cfg.pool_wait_ms);
			return NULL;
		}
	}
	s->busy = true;
	now = srv_now_ms();
	if (!s->conn && now < down_until)
	{
		snprintf(why, sizeof why, "%s", down_why);
		pthread_mutex_unlock(&mu);
		give_back(s);
		srv_fail(e, 503, "database unavailable",
				 "Retry with backoff; the server reconnects by itself.",
				 "PostgreSQL is not reachable: %s", why);
		return NULL;
	}
	pthread_mutex_unlock(&mu);

	if (s->conn && PQstatus(s->conn) != CONNECTION_OK)
	{
		PQfinish(s->conn);
		s->conn = NULL;
	}
	if (!s->conn)
	{
		s->conn = pool_connect(why, sizeof why);
		if (!s->conn)
		{
			pthread_mutex_lock(&mu);
			if (!down_logged || srv_now_ms() - down_logged > 30000)
			{
				srv_log("WARNING",
						"cannot connect to Postgres: %s (answering 503 until it is back)", why);
				down_logged = srv_now_ms();
			}
			down_until = srv_now_ms() + 1000;
			snprintf(down_why, sizeof down_why, "%s", why);
			pthread_mutex_unlock(&mu);
			give_back(s);
			srv_fail(e, 503, "database unavailable",
					 "Retry with backoff; the server reconnects by itself.",
					 "PostgreSQL is not reachable: %s", why);
			return NULL;
		}
		pthread_mutex_lock(&mu);
		if (down_logged)
			srv_log("LOG", "connected to Postgres again");
		down_until = 0;
		down_logged = 0;
		pthread_mutex_unlock(&mu);
		sync_learn_site(s->conn);
	}
	return s->conn;
}

void
pool_release(PGconn *conn, bool broken)
{
	slot *s = NULL;

	if (!conn)
		return;
	/* never hand on a connection inside a transaction (SET LOCAL ROLE!) */
	if (!broken && PQtransactionStatus(conn) != PQTRANS_IDLE)
	{
		PGresult *r = PQexec(conn, "ROLLBACK");

		PQclear(r);
		broken = PQtransactionStatus(conn) != PQTRANS_IDLE;
	}
	if (PQstatus(conn) != CONNECTION_OK)
		broken = true;
	pthread_mutex_lock(&mu);
	for (int i = 0; i < nslots && !s; i++)
		if (slots[i].conn == conn)
			s = &slots[i];
	if (s && broken)
		s->conn = NULL;
	if (s)
	{
		s->busy = false;
		pthread_cond_signal(&freed);
	}
	pthread_mutex_unlock(&mu);
	if (broken || !s)
		PQfinish(conn);
}

void
pool_counts(int *idle, int *busy, int *broken)
{
	*idle = *busy = *broken = 0;
	pthread_mutex_lock(&mu);
	for (int i = 0; i < nslots; i++)
	{
		if (slots[i].busy)
			(*busy)++;
		else if (slots[i].conn)
			(*idle)++;
		else
			(*broken)++;
	}
	pthread_mutex_unlock(&mu);
}
