/*
 * work.c — each database's job queue and worker threads.
 *
 * Why: libmicrohttpd's threads each serve many connections, so a handler
 * that waited for Postgres would stall every other connection of its
 * thread, whatever database they are for. Handlers therefore never touch
 * Postgres: a request that needs its database suspends its connection and
 * becomes a job on that database's queue; one of the database's workers
 * (pool_size threads, one pooled connection each) runs it and resumes the
 * connection, whose handler then sends the answer. A database that is slow
 * or down holds only its own workers and queue: its requests wait at most
 * pool_wait_ms in the queue (then 503), and at most max_queue of them wait
 * (beyond, 503 at once), while every other database is served as usual.
 *
 * Shared pulls. When a worker takes a pull, it also takes every queued pull
 * with the same role, canonical claims (auth.c), principal, since,
 * generation and max_rows and no chunk cursor, and runs them as one
 * (sync_pull_group): the long-polls one push wakes are queued together, so
 * a thousand of them cost one pull plus one batched device check instead of
 * a thousand pulls. Pulls the group could not answer exactly run alone,
 * queued again at the front so that idle workers take them in parallel.
 *
 * Invariants: a job is on the queue, running in one worker, parked in the
 * hub, or finished, never two of these; its connection is suspended from
 * work_submit until work_finish, which is the last touch of the job (the
 * handler may free it as soon as the connection resumes).
 */
#include "server.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <microhttpd.h>

#define MAX_GROUP 4096 /* pulls answered by one shared computation */

typedef struct srv_work
{
	pthread_mutex_t mu;
	pthread_cond_t	cv;		 /* a job was queued, or stop */
	pthread_cond_t	idle_cv; /* a worker finished a job */
	srv_job		   *head, *tail;
	int				nqueued;
	int				nrunning;
	bool			stopping; /* no new jobs */
	pthread_t	   *tids;
	int				nthreads;
} srv_work;

static void
unlink_job(srv_work *w, srv_job *j)
{
	if (j->prev)
		j->prev->next = j->next;
	else
		w->head = j->next;
	if (j->next)
		j->next->prev = j->prev;
	else
		w->tail = j->prev;
	j->next = j->prev = NULL;
	w->nqueued--;
}

/* enqueue: mu held. */
static void
enqueue(srv_work *w, srv_job *j, bool front)
{
	j->state = JS_QUEUED;
	j->queued_ms = srv_now_ms();
	if (front)
	{
		j->prev = NULL;
		j->next = w->head;
		if (w->head)
			w->head->prev = j;
		else
			w->tail = j;
		w->head = j;
	}
	else
	{
		j->next = NULL;
		j->prev = w->tail;
		if (w->tail)
			w->tail->next = j;
		else
			w->head = j;
		w->tail = j;
	}
	w->nqueued++;
}

void
work_finish(srv_job *j)
{
	j->state = JS_DONE;
	if (j->on_done)
		j->on_done(j); /* last touch, as below */
	else
		MHD_resume_connection(j->conn); /* last touch: the handler may free j now */
}

static void
finish_busy(srv_job *j, const char *error, const char *fmt_detail)
{
	srv_fail(&j->e, 503, error, "Retry with backoff; operators can raise pool_size.", "%s",
			 fmt_detail);
	j->failed = true;
	work_finish(j);
}

bool
work_submit(srv_job *j, srv_error *e)
{
	srv_work *w = j->db->work;

	pthread_mutex_lock(&w->mu);
	if (w->stopping)
	{
		pthread_mutex_unlock(&w->mu);
		return srv_fail(e, 503, "server shutting down", "Retry in a moment.", NULL);
	}
	if (w->nqueued >= j->db->c.max_queue)
	{
		pthread_mutex_unlock(&w->mu);
		return srv_fail(e, 503, "server busy", "Retry with backoff; operators can raise pool_size.",
						"%d requests already wait for a Postgres connection of database %s.",
						j->db->c.max_queue, j->db->name);
	}
	if (j->conn)
		MHD_suspend_connection(j->conn);
	enqueue(w, j, false);
	pthread_cond_signal(&w->cv);
	pthread_mutex_unlock(&w->mu);
	return true;
}

void
work_requeue(srv_job *j)
{
	j->next = NULL;
	work_requeue_list(j->db, j);
}

/*
 * work_requeue_list queues every job of a list (linked through next) under
 * one lock, so that the first worker to wake sees them all and pulls those
 * with the same view together.
 */
void
work_requeue_list(srv_db *db, srv_job *list)
{
	srv_work *w = db->work;
	bool	  stopping;

	pthread_mutex_lock(&w->mu);
	stopping = w->stopping;
	if (!stopping)
		while (list)
		{
			srv_job *j = list;

			list = j->next;
			enqueue(w, j, false);
		}
	pthread_cond_broadcast(&w->cv);
	pthread_mutex_unlock(&w->mu);
	while (list)
	{
		srv_job *j = list;

		list = j->next;
		j->next = NULL;
		j->pull = NULL; /* a long-poll at shutdown: nothing new (204) */
		work_finish(j);
	}
}

int64_t
work_reap(srv_db *db)
{
	srv_work *w = db->work;
	srv_job	 *expired = NULL;
	int64_t	  now = srv_now_ms(), next = 0;
	char	  detail[200];

	if (!w)
		return 0;
	pthread_mutex_lock(&w->mu);
	for (srv_job *j = w->head, *n; j; j = n)
	{
		int64_t at = j->queued_ms + db->c.pool_wait_ms;

		n = j->next;
		if (at <= now)
		{
			unlink_job(w, j);
			j->next = expired;
			expired = j;
		}
		else if (!next || at < next)
			next = at;
	}
	pthread_mutex_unlock(&w->mu);
	snprintf(detail, sizeof detail,
			 "All %d Postgres connections of database %s stayed busy for %d ms.", db->c.pool_size,
			 db->name, db->c.pool_wait_ms);
	while (expired)
	{
		srv_job *j = expired;

		expired = j->next;
		j->next = NULL;
		finish_busy(j, "server busy", detail);
	}
	return next;
}

int
work_queued(srv_db *db)
{
	srv_work *w = db->work;
	int		  n;

	if (!w)
		return 0;
	pthread_mutex_lock(&w->mu);
	n = w->nqueued;
	pthread_mutex_unlock(&w->mu);
	return n;
}

/* ---- running jobs ------------------------------------------------------------ */

/* same_pull: b may share the computation of a's pull. */
static bool
same_pull(const srv_job *a, const srv_job *b)
{
	return b->kind == JOB_PULL && !b->noshare && !b->sealed && b->since == a->since &&
		   b->gen == a->gen && b->max_rows == a->max_rows && !b->exclude == !a->exclude &&
		   strcmp(b->auth->role, a->auth->role) == 0 &&
		   strcmp(b->auth->principal, a->auth->principal) == 0 &&
		   strcmp(b->auth->canon, a->auth->canon) == 0;
}

/* after_pull: answered, or parked until something is announced. */
static void
after_pull(srv_job *j, uint64_t seen_gen)
{
	j->noshare = false;
	if (j->pull)
	{
		work_finish(j);
		return;
	}
	j->sealed = NULL; /* a chunk always has a payload: the chunked pull is over */
	j->sealed_len = 0;
	if (j->deadline == 0 || srv_now_ms() >= j->deadline)
		work_finish(j);
	else
		hub_park(j, seen_gen);
}

static void
run_one(srv_job *j)
{
	srv_db	*db = j->db;
	uint64_t g;

	switch (j->kind)
	{
		case JOB_PUSH:
			j->failed = !push_apply(db, j->auth, j->body, j->len, &j->push, &j->e);
			break;
		case JOB_ROWS:
			j->failed = !pull_rows(db, j->auth, j->exclude, (const char *) j->body, j->len,
								   &j->pull, &j->e);
			break;
		case JOB_HEALTH:
			j->health_ok = srv_health(db);
			break;
		case JOB_PULL:
			g = hub_gen(db); /* before the query: a change during it is not lost */
			if (!pull_one(j, &j->e))
			{
				j->failed = true;
				break;
			}
			metrics_pull_computed(db, 1);
			after_pull(j, g);
			return;
	}
	work_finish(j);
}

static void
run_group(srv_db *db, srv_job **jobs, int n, bool *done)
{
	srv_work *w = db->work;
	srv_error e;
	uint64_t  g = hub_gen(db);

	if (!pull_group(db, jobs, n, done, &e))
	{
		for (int i = 0; i < n; i++)
		{
			jobs[i]->e = e;
			jobs[i]->failed = true;
			work_finish(jobs[i]);
		}
		return;
	}
	pthread_mutex_lock(&w->mu);
	for (int i = n - 1; i >= 0; i--)
		if (!done[i])
		{
			jobs[i]->noshare = true;
			if (w->stopping)
				done[i] = true; /* finished below with a 503 */
			else
				enqueue(w, jobs[i], true);
		}
	pthread_cond_broadcast(&w->cv);
	pthread_mutex_unlock(&w->mu);
	for (int i = 0; i < n; i++)
		if (done[i] && jobs[i]->noshare)
			finish_busy(jobs[i], "server shutting down", "The server is stopping.");
		else if (done[i])
			after_pull(jobs[i], g);
}

static void *
worker_main(void *arg)
{
	srv_db	 *db = arg;
	srv_work *w = db->work;
	srv_job **batch = malloc(sizeof(srv_job *) * MAX_GROUP);
	bool	 *done = malloc(sizeof(bool) * MAX_GROUP);

	if (!batch || !done)
	{
		srv_log("FATAL", "database %s: out of memory starting a worker", db->name);
		free(batch);
		free(done);
		return NULL;
	}
	pthread_mutex_lock(&w->mu);
	for (;;)
	{
		srv_job *j;
		int		 n = 0;

		while (!w->head && !w->stopping)
			pthread_cond_wait(&w->cv, &w->mu);
		if (!w->head)
			break;
		j = w->head;
		unlink_job(w, j);
		j->state = JS_RUNNING;
		batch[n++] = j;
		if (j->kind == JOB_PULL && !j->noshare && !j->sealed)
			for (srv_job *k = w->head, *next; k && n < MAX_GROUP; k = next)
			{
				next = k->next;
				if (same_pull(j, k))
				{
					unlink_job(w, k);
					k->state = JS_RUNNING;
					batch[n++] = k;
				}
			}
		w->nrunning++;
		pthread_mutex_unlock(&w->mu);
		if (n == 1)
			run_one(j);
		else
			run_group(db, batch, n, done);
		pthread_mutex_lock(&w->mu);
		w->nrunning--;
		pthread_cond_broadcast(&w->idle_cv);
	}
	pthread_mutex_unlock(&w->mu);
	free(batch);
	free(done);
	return NULL;
}

bool
work_start(srv_db *db)
{
	srv_work *w = calloc(1, sizeof *w);

	if (!w)
		return false;
	pthread_mutex_init(&w->mu, NULL);
	pthread_cond_init(&w->cv, NULL);
	pthread_cond_init(&w->idle_cv, NULL);
	w->tids = calloc((size_t) db->c.pool_size, sizeof(pthread_t));
	db->work = w;
	if (!w->tids)
		return false;
	for (int i = 0; i < db->c.pool_size; i++)
	{
		if (pthread_create(&w->tids[i], NULL, worker_main, db) != 0)
			return false;
		w->nthreads++;
	}
	return true;
}

bool
work_quiesce(srv_db *db, int wait_ms)
{
	srv_work	   *w = db->work;
	srv_job		   *queued;
	struct timespec until;
	bool			idle;

	if (!w)
		return true;
	pthread_mutex_lock(&w->mu);
	w->stopping = true;
	queued = w->head;
	w->head = w->tail = NULL;
	w->nqueued = 0;
	pthread_cond_broadcast(&w->cv);
	pthread_mutex_unlock(&w->mu);
	while (queued)
	{
		srv_job *j = queued;

		queued = j->next;
		j->next = j->prev = NULL;
		finish_busy(j, "server shutting down", "The server is stopping.");
	}
	clock_gettime(CLOCK_REALTIME, &until);
	until.tv_sec += wait_ms / 1000;
	until.tv_nsec += (long) (wait_ms % 1000) * 1000000L;
	if (until.tv_nsec >= 1000000000L)
	{
		until.tv_sec++;
		until.tv_nsec -= 1000000000L;
	}
	pthread_mutex_lock(&w->mu);
	while (w->nrunning > 0 && pthread_cond_timedwait(&w->idle_cv, &w->mu, &until) == 0)
		;
	idle = w->nrunning == 0;
	pthread_mutex_unlock(&w->mu);
	return idle;
}

void
work_stop(srv_db *db)
{
	srv_work *w = db->work;

	if (!w)
		return;
	pthread_mutex_lock(&w->mu);
	w->stopping = true;
	pthread_cond_broadcast(&w->cv);
	pthread_mutex_unlock(&w->mu);
	for (int i = 0; i < w->nthreads; i++)
		pthread_join(w->tids[i], NULL);
	free(w->tids);
	pthread_mutex_destroy(&w->mu);
	pthread_cond_destroy(&w->cv);
	pthread_cond_destroy(&w->idle_cv);
	free(w);
	db->work = NULL;
}
