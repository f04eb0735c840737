/*
 * hub.c — change notifications: who hears them and who is woken.
 *
 * Each database has its own hub: a listener and a timer thread, its waiters.
 * The listener thread keeps its own Postgres connection that LISTENs on
 * pgsync_changes (pushes NOTIFY it with their transaction id, from any server
 * process) and, every poll_ms, reads sync_db_version() to catch changes
 * written directly in Postgres, which do not notify. Each heard change bumps
 * the generation counter, raises the announced version, hands the parked
 * long-polls whose cursor is below it back to the workers (all at once, so
 * that work.c pulls those with the same view together) and tells the
 * WebSocket thread, through the hub_ops its starter gave (the hub calls
 * neither by name: it sits below both). After a reconnect it announces unconditionally
 * (notifications may have been missed while it was away).
 *
 * The timer thread finishes long-polls whose wait ran out (204), and asks
 * the workers (ops->reap) to answer jobs that waited too long for a
 * connection (503).
 *
 * Invariants: a parked job's connection stays suspended (work.c suspended it
 * when the request was queued; only work_finish resumes it), and a job is
 * unlinked under `mu` before anyone else touches it, so it is requeued or
 * finished exactly once. A worker records hub_gen() before its pull query;
 * if a notification arrives between that query and hub_park, the job is not
 * parked at all but pulled again (no lost wake-up).
 */
#include "server.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

typedef struct srv_hub
{
	pthread_mutex_t mu;
	pthread_cond_t	timer_cv;
	srv_job		   *head; /* parked long-polls (linked through next/prev) */
	int				nwaiting;
	uint64_t		gen;
	int64_t			announced;
	bool			stopping; /* no new waiters */
	bool			threads_stop;
	bool			listening;
	int				stop_fd;
	pthread_t		listener_tid, timer_tid;
	bool			started;
	const hub_ops  *ops;
} srv_hub;

uint64_t
hub_gen(srv_db *db)
{
	srv_hub *h = db->hub;
	uint64_t g;

	pthread_mutex_lock(&h->mu);
	g = h->gen;
	pthread_mutex_unlock(&h->mu);
	return g;
}

int64_t
hub_version(srv_db *db)
{
	srv_hub *h = db->hub;
	int64_t	 v;

	if (!h)
		return 0;
	pthread_mutex_lock(&h->mu);
	v = h->announced;
	pthread_mutex_unlock(&h->mu);
	return v;
}

int
hub_waiting(srv_db *db)
{
	srv_hub *h = db->hub;
	int		 n;

	if (!h)
		return 0;
	pthread_mutex_lock(&h->mu);
	n = h->nwaiting;
	pthread_mutex_unlock(&h->mu);
	return n;
}

bool
hub_listening(srv_db *db)
{
	srv_hub *h = db->hub;
	bool	 up;

	if (!h)
		return false;
	pthread_mutex_lock(&h->mu);
	up = h->listening;
	pthread_mutex_unlock(&h->mu);
	return up;
}

/* unlink_waiter: mu held, w parked. */
static void
unlink_waiter(srv_hub *h, srv_job *w)
{
	if (w->prev)
		w->prev->next = w->next;
	else
		h->head = w->next;
	if (w->next)
		w->next->prev = w->prev;
	w->prev = w->next = NULL;
	h->nwaiting--;
}

void
hub_park(srv_job *j, uint64_t seen_gen)
{
	srv_hub *h = j->db->hub;

	pthread_mutex_lock(&h->mu);
	if (h->stopping)
	{
		pthread_mutex_unlock(&h->mu);
		h->ops->finish(j); /* nothing new (204) */
		return;
	}
	if (h->gen != seen_gen)
	{
		/* a change was announced while we queried: pull again */
		pthread_mutex_unlock(&h->mu);
		h->ops->requeue(j);
		return;
	}
	j->prev = NULL;
	j->next = h->head;
	if (h->head)
		h->head->prev = j;
	h->head = j;
	h->nwaiting++;
	pthread_cond_signal(&h->timer_cv);
	pthread_mutex_unlock(&h->mu);
}

/* take_all: every parked job, unlinked (mu held). */
static srv_job *
take_all(srv_hub *h)
{
	srv_job *all = h->head;

	h->head = NULL;
	h->nwaiting = 0;
	return all;
}

void
hub_release_all(srv_db *db)
{
	srv_hub *h = db->hub;
	srv_job *all;

	if (!h)
		return;
	pthread_mutex_lock(&h->mu);
	h->stopping = true;
	all = take_all(h);
	pthread_mutex_unlock(&h->mu);
	while (all)
	{
		srv_job *j = all;

		all = j->next;
		j->next = j->prev = NULL;
		h->ops->finish(j);
	}
}

/*
 * announce records a change at version (0 = unknown) and sends the parked
 * long-polls it concerns to the workers, all at once: those with the same
 * view are pulled together (work.c).
 */
static void
announce(srv_db *db, int64_t version)
{
	srv_hub *h = db->hub;
	srv_job *woken = NULL;
	int64_t	 v;

	metrics_notification(db);
	pthread_mutex_lock(&h->mu);
	h->gen++;
	if (version > h->announced)
		h->announced = version;
	v = h->announced;
	for (srv_job *w = h->head, *next; w; w = next)
	{
		next = w->next;
		if (version == 0 || version > w->since)
		{
			unlink_waiter(h, w);
			w->next = woken;
			woken = w;
		}
	}
	pthread_mutex_unlock(&h->mu);
	h->ops->announced(db, v);
	if (woken)
		h->ops->requeue_list(db, woken);
}

/* ---- timer thread ---------------------------------------------------------- */

/* timer_main finishes long-polls whose wait ran out (204) and queued jobs
 * that waited pool_wait_ms for a connection (503). */
static void *
timer_main(void *arg)
{
	srv_db	*db = arg;
	srv_hub *h = db->hub;

	pthread_mutex_lock(&h->mu);
	while (!h->threads_stop)
	{
		int64_t			now = srv_now_ms(), next = now + 1000, q;
		struct timespec ts;
		srv_job		   *expired = NULL;

		for (srv_job *w = h->head, *n; w; w = n)
		{
			n = w->next;
			if (w->deadline <= now)
			{
				unlink_waiter(h, w);
				w->next = expired;
				expired = w;
			}
			else if (w->deadline < next)
				next = w->deadline;
		}
		pthread_mutex_unlock(&h->mu);
		while (expired)
		{
			srv_job *j = expired;

			expired = j->next;
			j->next = NULL;
			h->ops->finish(j);
		}
		if ((q = h->ops->reap(db)) != 0 && q < next)
			next = q;
		/* a job queued from now on expires pool_wait_ms later: look again by then */
		if (next > now + db->c.pool_wait_ms / 2 + 10)
			next = now + db->c.pool_wait_ms / 2 + 10;
		pthread_mutex_lock(&h->mu);
		if (h->threads_stop)
			break;
		now = srv_now_ms();
		if (next <= now)
			continue;
		clock_gettime(CLOCK_REALTIME, &ts);
		ts.tv_sec += (next - now) / 1000;
		ts.tv_nsec += (long) ((next - now) % 1000) * 1000000L;
		if (ts.tv_nsec >= 1000000000L)
		{
			ts.tv_sec++;
			ts.tv_nsec -= 1000000000L;
		}
		pthread_cond_timedwait(&h->timer_cv, &h->mu, &ts);
	}
	pthread_mutex_unlock(&h->mu);
	return NULL;
}

/* ---- listener thread ------------------------------------------------------- */

/* pause_ms sleeps unless asked to stop; false when stopping. */
static bool
pause_ms(srv_hub *h, int ms)
{
	struct pollfd p = {.fd = h->stop_fd, .events = POLLIN};

	return poll(&p, 1, ms) == 0;
}

static PGconn *
listen_connect(srv_db *db, bool *logged_down)
{
	char	  why[256];
	PGconn	 *c = pool_connect(db, why, sizeof why);
	PGresult *r;

	if (!c)
	{
		if (!*logged_down)
			srv_log("WARNING",
					"database %s: notification listener cannot connect (%s); retrying every "
					"second",
					db->name, why);
		*logged_down = true;
		return NULL;
	}
	r = PQexec(c, "LISTEN " SRV_NOTIFY_CHANNEL);
	if (PQresultStatus(r) != PGRES_COMMAND_OK)
	{
		srv_log("WARNING", "database %s: LISTEN failed: %s", db->name, PQresultErrorMessage(r));
		PQclear(r);
		PQfinish(c);
		return NULL;
	}
	PQclear(r);
	if (*logged_down)
		srv_log("LOG", "database %s: notification listener connected again", db->name);
	*logged_down = false;
	pool_learn_site(db, c);
	return c;
}

/* poll_version reads sync_db_version(); -1 when the connection failed. */
static int64_t
poll_version(srv_db *db, PGconn *c)
{
	PGresult *r = PQexec(c, "SELECT sync_db_version()");
	int64_t	  v = -1;

	if (PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1)
		v = strtoll(PQgetvalue(r, 0, 0), NULL, 10);
	else if (PQstatus(c) == CONNECTION_OK)
	{
		static _Thread_local int64_t last_log;

		if (srv_now_ms() - last_log > 60000)
		{
			srv_log("WARNING", "database %s: polling sync_db_version() failed: %s", db->name,
					PQresultErrorMessage(r));
			last_log = srv_now_ms();
		}
		v = 0;
	}
	PQclear(r);
	return v;
}

static void
set_listening(srv_hub *h, bool up)
{
	pthread_mutex_lock(&h->mu);
	h->listening = up;
	pthread_mutex_unlock(&h->mu);
}

static void *
listener_main(void *arg)
{
	srv_db	*db = arg;
	srv_hub *h = db->hub;
	PGconn	*c = NULL;
	bool	 logged_down = false;
	int64_t	 polled = -1, next_poll = 0;
	int		 poll_ms = db->c.poll_ms;

	while (!__atomic_load_n(&h->threads_stop, __ATOMIC_RELAXED))
	{
		struct pollfd p[2];
		int			  timeout, n;

		if (!c)
		{
			if (!(c = listen_connect(db, &logged_down)))
			{
				if (!pause_ms(h, 1000))
					break;
				continue;
			}
			set_listening(h, true);
			polled = -1;
			announce(db, 0); /* we may have missed notifications */
		}
		if (poll_ms > 0 && srv_now_ms() >= next_poll)
		{
			int64_t v = poll_version(db, c);

			next_poll = srv_now_ms() + poll_ms;
			if (v < 0)
			{
				set_listening(h, false);
				PQfinish(c);
				c = NULL;
				continue;
			}
			if (polled >= 0 && v > polled)
				announce(db, v);
			if (v > polled)
				polled = v;
		}
		/* notifications may have arrived with the poll's result */
		PQconsumeInput(c);
		for (PGnotify *nt; (nt = PQnotifies(c)) != NULL; PQfreemem(nt))
			announce(db, strtoll(nt->extra, NULL, 10));
		timeout = poll_ms > 0 ? (int) (next_poll - srv_now_ms()) : 1000;
		if (timeout < 0)
			timeout = 0;
		p[0].fd = PQsocket(c);
		p[0].events = POLLIN;
		p[1].fd = h->stop_fd;
		p[1].events = POLLIN;
		n = poll(p, 2, timeout);
		if (n < 0 && errno != EINTR)
			break;
		if (p[1].revents)
			break;
		if (n > 0 && p[0].revents)
		{
			if (!PQconsumeInput(c) || PQstatus(c) != CONNECTION_OK)
			{
				char why[256];

				snprintf(why, sizeof why, "%s", PQerrorMessage(c));
				for (char *q = why; *q; q++)
					if (*q == '\n' || *q == '\t')
						*q = ' ';
				srv_log("WARNING", "database %s: notification listener lost its connection: %s",
						db->name, why);
				logged_down = true;
				set_listening(h, false);
				PQfinish(c);
				c = NULL;
				continue;
			}
			for (PGnotify *nt; (nt = PQnotifies(c)) != NULL; PQfreemem(nt))
				announce(db, strtoll(nt->extra, NULL, 10));
		}
	}
	if (c)
		PQfinish(c);
	return NULL;
}

bool
hub_start(srv_db *db, const hub_ops *ops)
{
	srv_hub *h = calloc(1, sizeof *h);

	if (!h)
		return false;
	h->ops = ops;
	pthread_mutex_init(&h->mu, NULL);
	pthread_cond_init(&h->timer_cv, NULL);
	db->hub = h;
	h->stop_fd = eventfd(0, EFD_CLOEXEC);
	if (h->stop_fd < 0)
		return false;
	if (pthread_create(&h->timer_tid, NULL, timer_main, db) != 0)
		return false;
	if (pthread_create(&h->listener_tid, NULL, listener_main, db) != 0)
	{
		pthread_mutex_lock(&h->mu);
		h->threads_stop = true;
		pthread_cond_signal(&h->timer_cv);
		pthread_mutex_unlock(&h->mu);
		pthread_join(h->timer_tid, NULL);
		return false;
	}
	h->started = true;
	return true;
}

void
hub_stop(srv_db *db)
{
	srv_hub *h = db->hub;
	uint64_t one = 1;

	if (!h)
		return;
	if (h->started)
	{
		hub_release_all(db);
		pthread_mutex_lock(&h->mu);
		__atomic_store_n(&h->threads_stop, true, __ATOMIC_RELAXED);
		pthread_cond_signal(&h->timer_cv);
		pthread_mutex_unlock(&h->mu);
		if (write(h->stop_fd, &one, sizeof one) < 0)
			srv_log("WARNING", "cannot signal the listener thread: %s", strerror(errno));
		pthread_join(h->timer_tid, NULL);
		pthread_join(h->listener_tid, NULL);
	}
	if (h->stop_fd >= 0)
		close(h->stop_fd);
	pthread_mutex_destroy(&h->mu);
	pthread_cond_destroy(&h->timer_cv);
	free(h);
	db->hub = NULL;
}
