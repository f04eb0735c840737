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
 * Each database has a pool of its own (its pool_size); the worker threads
 * of work.c are as many as its slots, so in practice an acquire finds a
 * free slot at once and the waiting happens in the job queue.
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

typedef struct srv_pool
{
	slot		   *slots;
	int				nslots;
	pthread_mutex_t mu;
	pthread_cond_t	freed;
	int64_t			down_until;
	int64_t			down_logged; /* when "cannot connect" was last logged */
	char			down_why[256];
} srv_pool;

static void
quiet(void *arg, const char *message)
{
	(void) arg, (void) message;
}

/* pool_connect opens one connection; NULL with the reason in why. */
PGconn *
pool_connect(srv_db *db, char *why, size_t whylen)
{
	char		ct[16], opts[64];
	const char *keys[] = {"dbname", "connect_timeout", "application_name", "options", NULL};
	const char *vals[] = {db->c.database ? db->c.database : "", ct, SRV_NAME, opts, NULL};
	PGconn	   *conn;

	snprintf(ct, sizeof ct, "%d", db->c.connect_timeout);
	snprintf(opts, sizeof opts, "-c statement_timeout=%d", db->c.statement_timeout_ms);
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
pool_start(srv_db *db)
{
	char	  why[256];
	PGconn	 *first;
	srv_pool *p = calloc(1, sizeof *p);

	if (!p)
		return false;
	pthread_mutex_init(&p->mu, NULL);
	pthread_cond_init(&p->freed, NULL);
	p->nslots = db->c.pool_size;
	p->slots = calloc((size_t) p->nslots, sizeof(slot));
	if (!p->slots)
	{
		free(p);
		return false;
	}
	db->pool = p;
	/* one eager connection: fail loudly on a wrong conninfo, but start anyway */
	first = pool_connect(db, why, sizeof why);
	if (first)
	{
		p->slots[0].conn = first;
		pool_learn_site(db, first);
	}
	else
	{
		p->down_logged = srv_now_ms();
		srv_log("WARNING",
				"database %s: cannot connect to Postgres yet (%s); answering 503 until it is "
				"reachable",
				db->name, why);
	}
	return true;
}

void
pool_stop(srv_db *db)
{
	srv_pool *p = db->pool;

	if (!p)
		return;
	pthread_mutex_lock(&p->mu);
	for (int i = 0; i < p->nslots; i++)
		if (p->slots[i].conn && !p->slots[i].busy)
		{
			PQfinish(p->slots[i].conn);
			p->slots[i].conn = NULL;
		}
	pthread_mutex_unlock(&p->mu);
	free(p->slots);
	pthread_mutex_destroy(&p->mu);
	pthread_cond_destroy(&p->freed);
	free(p);
	db->pool = NULL;
}

static void
give_back(srv_pool *p, slot *s)
{
	pthread_mutex_lock(&p->mu);
	s->busy = false;
	pthread_cond_signal(&p->freed);
	pthread_mutex_unlock(&p->mu);
}

bool
pool_down(srv_db *db)
{
	srv_pool *p = db->pool;
	bool	  down;

	pthread_mutex_lock(&p->mu);
	down = p->down_logged != 0;
	pthread_mutex_unlock(&p->mu);
	return down;
}

PGconn *
pool_acquire(srv_db *db, srv_error *e)
{
	struct timespec until;
	slot		   *s = NULL;
	int64_t			now;
	char			why[256];
	srv_pool	   *p = db->pool;

	clock_gettime(CLOCK_REALTIME, &until);
	until.tv_sec += db->c.pool_wait_ms / 1000;
	until.tv_nsec += (long) (db->c.pool_wait_ms % 1000) * 1000000L;
	if (until.tv_nsec >= 1000000000L)
	{
		until.tv_sec++;
		until.tv_nsec -= 1000000000L;
	}
	pthread_mutex_lock(&p->mu);
	for (;;)
	{
		/* prefer a slot that already holds a connection */
		for (int i = 0; i < p->nslots && !s; i++)
			if (!p->slots[i].busy && p->slots[i].conn)
				s = &p->slots[i];
		for (int i = 0; i < p->nslots && !s; i++)
			if (!p->slots[i].busy)
				s = &p->slots[i];
		if (s)
			break;
		if (pthread_cond_timedwait(&p->freed, &p->mu, &until) != 0)
		{
			pthread_mutex_unlock(&p->mu);
			srv_fail(e, 503, "server busy", "Retry after a moment; operators can raise pool_size.",
					 "All %d Postgres connections stayed busy for %d ms.", p->nslots,
					 db->c.pool_wait_ms);
			return NULL;
		}
	}
	s->busy = true;
	now = srv_now_ms();
	if (!s->conn && now < p->down_until)
	{
		snprintf(why, sizeof why, "%s", p->down_why);
		pthread_mutex_unlock(&p->mu);
		give_back(p, s);
		srv_fail(e, 503, "database unavailable",
				 "Retry with backoff; the server reconnects by itself.",
				 "PostgreSQL is not reachable: %s", why);
		return NULL;
	}
	pthread_mutex_unlock(&p->mu);

	if (s->conn && PQstatus(s->conn) != CONNECTION_OK)
	{
		PQfinish(s->conn);
		s->conn = NULL;
	}
	if (!s->conn)
	{
		s->conn = pool_connect(db, why, sizeof why);
		if (!s->conn)
		{
			pthread_mutex_lock(&p->mu);
			if (!p->down_logged || srv_now_ms() - p->down_logged > 30000)
			{
				srv_log("WARNING",
						"database %s: cannot connect to Postgres: %s (answering 503 until it is "
						"back)",
						db->name, why);
				p->down_logged = srv_now_ms();
			}
			p->down_until = srv_now_ms() + 1000;
			snprintf(p->down_why, sizeof p->down_why, "%s", why);
			pthread_mutex_unlock(&p->mu);
			give_back(p, s);
			srv_fail(e, 503, "database unavailable",
					 "Retry with backoff; the server reconnects by itself.",
					 "PostgreSQL is not reachable: %s", why);
			return NULL;
		}
		pthread_mutex_lock(&p->mu);
		if (p->down_logged)
			srv_log("LOG", "database %s: connected to Postgres again", db->name);
		p->down_until = 0;
		p->down_logged = 0;
		pthread_mutex_unlock(&p->mu);
		pool_learn_site(db, s->conn);
	}
	return s->conn;
}

void
pool_release(srv_db *db, PGconn *conn, bool broken)
{
	slot	 *s = NULL;
	srv_pool *p = db->pool;

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
	pthread_mutex_lock(&p->mu);
	for (int i = 0; i < p->nslots && !s; i++)
		if (p->slots[i].conn == conn)
			s = &p->slots[i];
	if (s && broken)
		s->conn = NULL;
	if (s)
	{
		s->busy = false;
		pthread_cond_signal(&p->freed);
	}
	pthread_mutex_unlock(&p->mu);
	if (broken || !s)
		PQfinish(conn);
}

void
pool_counts(srv_db *db, int *idle, int *busy, int *broken)
{
	srv_pool *p = db->pool;

	*idle = *busy = *broken = 0;
	if (!p)
		return;
	pthread_mutex_lock(&p->mu);
	for (int i = 0; i < p->nslots; i++)
	{
		if (p->slots[i].busy)
			(*busy)++;
		else if (p->slots[i].conn)
			(*idle)++;
		else
			(*broken)++;
	}
	pthread_mutex_unlock(&p->mu);
}

/* ---- the server's site id, learned by the first connection ---------------- */

void
pool_server_site(srv_db *db, char out[37])
{
	pthread_mutex_lock(&db->site_mu);
	memcpy(out, db->server_site, 37);
	pthread_mutex_unlock(&db->site_mu);
}

void
pool_learn_site(srv_db *db, PGconn *conn)
{
	PGresult *r;

	pthread_mutex_lock(&db->site_mu);
	if (db->server_site[0])
	{
		pthread_mutex_unlock(&db->site_mu);
		return;
	}
	pthread_mutex_unlock(&db->site_mu);
	r = PQexec(conn, "SELECT sync_site_id()::text");
	if (PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1 && PQgetlength(r, 0, 0) == 36)
	{
		pthread_mutex_lock(&db->site_mu);
		memcpy(db->server_site, PQgetvalue(r, 0, 0), 36);
		db->server_site[36] = '\0';
		pthread_mutex_unlock(&db->site_mu);
	}
	else
		srv_log("WARNING", "database %s: cannot read sync_site_id(): %s", db->name,
				PQresultErrorMessage(r));
	PQclear(r);
}
