/*
 * hub.c — change notifications: who hears them and who is woken.
 *
 * The listener thread keeps its own Postgres connection that LISTENs on
 * pgsync_changes (pushes NOTIFY it with their transaction id, from any server
 * process) and, every poll_ms, reads sync_db_version() to catch changes
 * written directly in Postgres, which do not notify. Each heard change bumps
 * the generation counter, raises the announced version, wakes the parked
 * long-polls whose cursor is below it and tells the WebSocket thread. After
 * a reconnect it announces unconditionally (notifications may have been
 * missed while it was away).
 *
 * The timer thread resumes long-polls whose wait ran out.
 *
 * Invariant: a waiter is on the list exactly while its connection is
 * suspended, and both suspending and resuming happen under `mu`, so a
 * connection is never resumed twice or resumed before it was suspended
 * (undefined behaviour in libmicrohttpd). A request records hub_gen()
 * before its pull query; if a notification arrives between that query and
 * hub_suspend, the request is not parked at all (no lost wake-up).
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

#include <microhttpd.h>

struct hub_waiter
{
	struct MHD_Connection *conn;
	int64_t				   cursor;
	int64_t				   deadline;
	hub_wake			   state;
	bool				   linked;
	hub_waiter			  *prev, *next;
};

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t  timer_cv = PTHREAD_COND_INITIALIZER;
static hub_waiter	  *head;
static int			   nwaiting;
static uint64_t		   gen;
static int64_t		   announced;
static bool			   stopping; /* no new waiters */
static bool			   threads_stop;
static int			   stop_fd = -1;
static pthread_t	   listener_tid, timer_tid;
static bool			   started;

uint64_t
hub_gen(void)
{
	uint64_t g;

	pthread_mutex_lock(&mu);
	g = gen;
	pthread_mutex_unlock(&mu);
	return g;
}

int64_t
hub_version(void)
{
	int64_t v;

	pthread_mutex_lock(&mu);
	v = announced;
	pthread_mutex_unlock(&mu);
	return v;
}

int
hub_waiting(void)
{
	int n;

	pthread_mutex_lock(&mu);
	n = nwaiting;
	pthread_mutex_unlock(&mu);
	return n;
}

static void
unlink_waiter(hub_waiter *w)
{
	if (w->prev)
		w->prev->next = w->next;
	else
		head = w->next;
	if (w->next)
		w->next->prev = w->prev;
	w->prev = w->next = NULL;
	w->linked = false;
	nwaiting--;
}

/* wake resumes w with state s; mu held, w linked. */
static void
wake(hub_waiter *w, hub_wake s)
{
	w->state = s;
	unlink_waiter(w);
	MHD_resume_connection(w->conn);
}

hub_waiter *
hub_suspend(struct MHD_Connection *conn, hub_waiter *w, uint64_t seen_gen, int64_t cursor,
			int64_t deadline_ms, bool *parked)
{
	*parked = false;
	if (!w && !(w = calloc(1, sizeof *w)))
		return NULL;
	pthread_mutex_lock(&mu);
	if (stopping)
	{
		pthread_mutex_unlock(&mu);
		free(w);
		return NULL;
	}
	w->conn = conn;
	w->cursor = cursor;
	w->deadline = deadline_ms;
	if (gen != seen_gen)
	{
		w->state = HUB_CHANGED; /* missed while we queried: go again */
		pthread_mutex_unlock(&mu);
		return w;
	}
	w->state = HUB_WAITING;
	w->prev = NULL;
	w->next = head;
	if (head)
		head->prev = w;
	head = w;
	w->linked = true;
	nwaiting++;
	*parked = true;
	MHD_suspend_connection(conn);
	pthread_cond_signal(&timer_cv);
	pthread_mutex_unlock(&mu);
	return w;
}

hub_wake
hub_result(hub_waiter *w)
{
	hub_wake s;

	pthread_mutex_lock(&mu);
	s = w->state;
	pthread_mutex_unlock(&mu);
	return s;
}

void
hub_forget(hub_waiter *w)
{
	if (!w)
		return;
	pthread_mutex_lock(&mu);
	if (w->linked)
		unlink_waiter(w); /* not expected: MHD completes only resumed requests */
	pthread_mutex_unlock(&mu);
	free(w);
}

void
hub_release_all(void)
{
	pthread_mutex_lock(&mu);
	stopping = true;
	while (head)
		wake(head, HUB_SHUTDOWN);
	pthread_mutex_unlock(&mu);
}

/* announce records a change at version (0 = unknown) and wakes whom it concerns. */
static void
announce(int64_t version)
{
	int64_t v;

	metrics_notification();
	pthread_mutex_lock(&mu);
	gen++;
	if (version > announced)
		announced = version;
	v = announced;
	for (hub_waiter *w = head, *next; w; w = next)
	{
		next = w->next;
		if (version == 0 || version > w->cursor)
			wake(w, HUB_CHANGED);
	}
	pthread_mutex_unlock(&mu);
	ws_broadcast(v);
}

/* ---- timer thread ---------------------------------------------------------- */

static void *
timer_main(void *arg)
{
	(void) arg;
	pthread_mutex_lock(&mu);
	while (!threads_stop)
	{
		int64_t			now = srv_now_ms(), next = now + 1000;
		struct timespec ts;

		for (hub_waiter *w = head, *n; w; w = n)
		{
			n = w->next;
			if (w->deadline <= now)
				wake(w, HUB_TIMEOUT);
			else if (w->deadline < next)
				next = w->deadline;
		}
		clock_gettime(CLOCK_REALTIME, &ts);
		ts.tv_sec += (next - now) / 1000;
		ts.tv_nsec += (long) ((next - now) % 1000) * 1000000L;
		if (ts.tv_nsec >= 1000000000L)
		{
			ts.tv_sec++;
			ts.tv_nsec -= 1000000000L;
		}
		pthread_cond_timedwait(&timer_cv, &mu, &ts);
	}
	pthread_mutex_unlock(&mu);
	return NULL;
}

/* ---- listener thread ------------------------------------------------------- */

/* pause_ms sleeps unless asked to stop; false when stopping. */
static bool
pause_ms(int ms)
{
	struct pollfd p = {.fd = stop_fd, .events = POLLIN};

	return poll(&p, 1, ms) == 0;
}

static PGconn *
listen_connect(bool *logged_down)
{
	char	  why[256];
	PGconn	 *c = pool_connect(why, sizeof why);
	PGresult *r;

	if (!c)
	{
		if (!*logged_down)
			srv_log("WARNING", "notification listener cannot connect (%s); retrying every second",
					why);
		*logged_down = true;
		return NULL;
	}
	r = PQexec(c, "LISTEN " SRV_NOTIFY_CHANNEL);
	if (PQresultStatus(r) != PGRES_COMMAND_OK)
	{
		srv_log("WARNING", "LISTEN failed: %s", PQresultErrorMessage(r));
		PQclear(r);
		PQfinish(c);
		return NULL;
	}
	PQclear(r);
	if (*logged_down)
		srv_log("LOG", "notification listener connected again");
	*logged_down = false;
	sync_learn_site(c);
	return c;
}

/* poll_version reads sync_db_version(); -1 when the connection failed. */
static int64_t
poll_version(PGconn *c)
{
	PGresult *r = PQexec(c, "SELECT sync_db_version()");
	int64_t	  v = -1;

	if (PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1)
		v = strtoll(PQgetvalue(r, 0, 0), NULL, 10);
	else if (PQstatus(c) == CONNECTION_OK)
	{
		static int64_t last_log;

		if (srv_now_ms() - last_log > 60000)
		{
			srv_log("WARNING", "polling sync_db_version() failed: %s", PQresultErrorMessage(r));
			last_log = srv_now_ms();
		}
		v = 0;
	}
	PQclear(r);
	return v;
}

static void *
listener_main(void *arg)
{
	PGconn *c = NULL;
	bool	logged_down = false;
	int64_t polled = -1, next_poll = 0;

	(void) arg;
	while (!threads_stop)
	{
		struct pollfd p[2];
		int			  timeout, n;

		if (!c)
		{
			if (!(c = listen_connect(&logged_down)))
			{
				if (!pause_ms(1000))
					break;
				continue;
			}
			polled = -1;
			announce(0); /* we may have missed notifications */
		}
		if (cfg.poll_ms > 0 && srv_now_ms() >= next_poll)
		{
			int64_t v = poll_version(c);

			next_poll = srv_now_ms() + cfg.poll_ms;
			if (v < 0)
			{
				PQfinish(c);
				c = NULL;
				continue;
			}
			if (polled >= 0 && v > polled)
				announce(v);
			if (v > polled)
				polled = v;
		}
		/* notifications may have arrived with the poll's result */
		PQconsumeInput(c);
		for (PGnotify *nt; (nt = PQnotifies(c)) != NULL; PQfreemem(nt))
			announce(strtoll(nt->extra, NULL, 10));
		timeout = cfg.poll_ms > 0 ? (int) (next_poll - srv_now_ms()) : 1000;
		if (timeout < 0)
			timeout = 0;
		p[0].fd = PQsocket(c);
		p[0].events = POLLIN;
		p[1].fd = stop_fd;
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
				srv_log("WARNING", "notification listener lost its connection: %s", why);
				logged_down = true;
				PQfinish(c);
				c = NULL;
				continue;
			}
			for (PGnotify *nt; (nt = PQnotifies(c)) != NULL; PQfreemem(nt))
				announce(strtoll(nt->extra, NULL, 10));
		}
	}
	if (c)
		PQfinish(c);
	return NULL;
}

bool
hub_start(void)
{
	stop_fd = eventfd(0, EFD_CLOEXEC);
	if (stop_fd < 0)
		return false;
	if (pthread_create(&timer_tid, NULL, timer_main, NULL) != 0)
		return false;
	if (pthread_create(&listener_tid, NULL, listener_main, NULL) != 0)
		return false;
	started = true;
	return true;
}

void
hub_stop(void)
{
	uint64_t one = 1;

	if (!started)
		return;
	hub_release_all();
	pthread_mutex_lock(&mu);
	threads_stop = true;
	pthread_cond_signal(&timer_cv);
	pthread_mutex_unlock(&mu);
	if (write(stop_fd, &one, sizeof one) < 0)
		srv_log("WARNING", "cannot signal the listener thread: %s", strerror(errno));
	pthread_join(timer_tid, NULL);
	pthread_join(listener_tid, NULL);
	close(stop_fd);
	started = false;
}
