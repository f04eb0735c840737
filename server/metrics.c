/*
 * metrics.c — request counters and latency histograms for GET /metrics.
 *
 * Everything is a relaxed atomic in a fixed array indexed by endpoint and
 * status class, so recording costs a few atomic adds and needs no lock; the
 * rendering reads the arrays without stopping writers (Prometheus tolerates
 * a counter read mid-request). Statuses outside the table are counted as
 * "other". Durations are kept in microseconds. Every database has its own
 * set. A server with [database] sections renders each with a
 * database="NAME" label (last, after the others); requests that reach no
 * database (an unknown route, /metrics) are counted with database="". A
 * server with one database renders exactly what it did before sections
 * existed: no database label, so dashboards and alerts keep working.
 */
#include "server.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const ep_names[EP_COUNT] = {"push", "pull",	  "longpoll", "ws",
											   "rows", "healthz", "metrics",  "other"};
static const int		 statuses[] = {101, 200, 204, 400, 401, 403, 404, 405,
									   409, 410, 413, 422, 426, 429, 500, 503};

#define NSTATUS (sizeof statuses / sizeof statuses[0])
/* upper bounds of the histogram buckets, in microseconds */
static const int64_t bounds[] = {500,	  1000,		2500,	  5000,	   10000,	25000,
								 50000,	  100000,	250000,	  500000,  1000000, 2500000,
								 5000000, 10000000, 30000000, 60000000};

#define NBOUNDS (sizeof bounds / sizeof bounds[0])

typedef struct srv_metrics
{
	atomic_ullong requests[EP_COUNT][NSTATUS + 1];
	atomic_ullong hist[EP_COUNT][NBOUNDS + 1];
	atomic_ullong hist_sum_us[EP_COUNT];
	atomic_ullong bytes_in, bytes_out, applied, rejected, notifications, rate_limited;
	atomic_ullong pulls_computed, pulls_answered, ws_payloads;
} srv_metrics;

static srv_metrics nodb; /* requests without a database */

static srv_metrics *
of(srv_db *db)
{
	return db && db->m ? db->m : &nodb;
}

bool
metrics_init(srv_db *db)
{
	db->m = calloc(1, sizeof(srv_metrics));
	return db->m != NULL;
}

void
metrics_free(srv_db *db)
{
	free(db->m);
	db->m = NULL;
}

const char *
metrics_endpoint_name(srv_endpoint ep)
{
	return ep >= 0 && ep < EP_COUNT ? ep_names[ep] : "other";
}

void
metrics_request(srv_db *db, srv_endpoint ep, int status, int64_t usec)
{
	size_t		 s = NSTATUS, b = NBOUNDS;
	srv_metrics *m = of(db);

	if (ep < 0 || ep >= EP_COUNT)
		ep = EP_OTHER;
	for (size_t i = 0; i < NSTATUS; i++)
		if (statuses[i] == status)
			s = i;
	if (usec < 0)
		usec = 0;
	for (size_t i = 0; i < NBOUNDS; i++)
		if (usec <= bounds[i])
		{
			b = i;
			break;
		}
	atomic_fetch_add_explicit(&m->requests[ep][s], 1, memory_order_relaxed);
	atomic_fetch_add_explicit(&m->hist[ep][b], 1, memory_order_relaxed);
	atomic_fetch_add_explicit(&m->hist_sum_us[ep], (unsigned long long) usec, memory_order_relaxed);
}

void
metrics_bytes(srv_db *db, uint64_t in, uint64_t out)
{
	atomic_fetch_add_explicit(&of(db)->bytes_in, in, memory_order_relaxed);
	atomic_fetch_add_explicit(&of(db)->bytes_out, out, memory_order_relaxed);
}

void
metrics_changes(srv_db *db, int64_t a, int64_t r)
{
	atomic_fetch_add_explicit(&of(db)->applied, (unsigned long long) (a > 0 ? a : 0),
							  memory_order_relaxed);
	atomic_fetch_add_explicit(&of(db)->rejected, (unsigned long long) (r > 0 ? r : 0),
							  memory_order_relaxed);
}

void
metrics_notification(srv_db *db)
{
	atomic_fetch_add_explicit(&of(db)->notifications, 1, memory_order_relaxed);
}

void
metrics_ws_payload(srv_db *db)
{
	atomic_fetch_add_explicit(&of(db)->ws_payloads, 1, memory_order_relaxed);
}

void
metrics_rate_limited(srv_db *db)
{
	atomic_fetch_add_explicit(&of(db)->rate_limited, 1, memory_order_relaxed);
}

void
metrics_pull_computed(srv_db *db, int answered)
{
	atomic_fetch_add_explicit(&of(db)->pulls_computed, 1, memory_order_relaxed);
	atomic_fetch_add_explicit(&of(db)->pulls_answered, (unsigned long long) answered,
							  memory_order_relaxed);
}

typedef struct out
{
	char  *p;
	size_t len, cap;
	bool   oom;
} out;

static void put(out *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void
put(out *o, const char *fmt, ...)
{
	va_list ap;
	int		n;

	if (o->oom)
		return;
	for (;;)
	{
		va_start(ap, fmt);
		n = vsnprintf(o->p + o->len, o->cap - o->len, fmt, ap);
		va_end(ap);
		if (n < 0)
		{
			o->oom = true;
			return;
		}
		if ((size_t) n < o->cap - o->len)
		{
			o->len += (size_t) n;
			return;
		}
		{
			size_t cap = o->cap * 2 + (size_t) n;
			char  *p = realloc(o->p, cap);

			if (!p)
			{
				o->oom = true;
				return;
			}
			o->p = p;
			o->cap = cap;
		}
	}
}

static unsigned long long
get(atomic_ullong *a)
{
	return atomic_load_explicit(a, memory_order_relaxed);
}

/* label: ,database="NAME" after other labels (lone: {database="NAME"}), or
 * nothing with one database. */
static const char *
label(char *buf, size_t n, const char *name, bool lone)
{
	if (!cfg.sections)
		return "";
	snprintf(buf, n, lone ? "{database=\"%s\"}" : ",database=\"%s\"", name);
	return buf;
}

/* counter: one line per database of the counter at offset off of srv_metrics. */
static void
counter(out *o, const char *name, const char *help, size_t off)
{
	char lb[SRV_DBNAME_MAX + 20];

	put(o, "# HELP %s %s\n# TYPE %s counter\n", name, help, name);
	for (int d = 0; d < cfg.ndbs; d++)
		put(o, "%s%s %llu\n", name, label(lb, sizeof lb, cfg.dbs[d].name, true),
			get((atomic_ullong *) ((char *) cfg.dbs[d].m + off)));
}

char *
metrics_render(const srv_gauges *g, size_t *len)
{
	out			 o = {.p = malloc(16384), .cap = 16384};
	int			 nm = cfg.ndbs + 1;
	srv_metrics *ms[SRV_MAX_DBS + 1];
	const char	*names[SRV_MAX_DBS + 1];
	char		 lb[SRV_DBNAME_MAX + 20];

	if (!o.p)
		return NULL;
	o.p[0] = '\0';
	for (int d = 0; d < cfg.ndbs; d++)
	{
		ms[d] = of(&cfg.dbs[d]);
		names[d] = cfg.dbs[d].name;
	}
	ms[cfg.ndbs] = &nodb;
	names[cfg.ndbs] = "";
	if (!cfg.sections)
		nm = 1; /* one database: everything is counted there */
	put(&o, "# HELP pgsync_requests_total HTTP requests by endpoint and status.\n"
			"# TYPE pgsync_requests_total counter\n");
	for (int d = 0; d < nm; d++)
		for (int e = 0; e < EP_COUNT; e++)
			for (size_t s = 0; s <= NSTATUS; s++)
			{
				unsigned long long v = get(&ms[d]->requests[e][s]);

				if (!v)
					continue;
				if (s < NSTATUS)
					put(&o, "pgsync_requests_total{endpoint=\"%s\",status=\"%d\"%s} %llu\n",
						ep_names[e], statuses[s], label(lb, sizeof lb, names[d], false), v);
				else
					put(&o, "pgsync_requests_total{endpoint=\"%s\",status=\"other\"%s} %llu\n",
						ep_names[e], label(lb, sizeof lb, names[d], false), v);
			}
	put(&o,
		"# HELP pgsync_request_duration_seconds Request duration (long-polls include the wait).\n"
		"# TYPE pgsync_request_duration_seconds histogram\n");
	for (int d = 0; d < nm; d++)
		for (int e = 0; e < EP_COUNT; e++)
		{
			unsigned long long cum = 0;

			if (d == cfg.ndbs && e != EP_OTHER && e != EP_METRICS && e != EP_HEALTHZ)
				continue; /* only these reach no database */
			if (d < cfg.ndbs && cfg.sections && e == EP_METRICS)
				continue; /* /metrics is the server's */
			for (size_t b = 0; b <= NBOUNDS; b++)
			{
				cum += get(&ms[d]->hist[e][b]);
				if (b < NBOUNDS)
					put(&o,
						"pgsync_request_duration_seconds_bucket{endpoint=\"%s\",le=\"%g\"%s} "
						"%llu\n",
						ep_names[e], (double) bounds[b] / 1e6,
						label(lb, sizeof lb, names[d], false), cum);
				else
					put(&o,
						"pgsync_request_duration_seconds_bucket{endpoint=\"%s\",le=\"+Inf\"%s} "
						"%llu\n",
						ep_names[e], label(lb, sizeof lb, names[d], false), cum);
			}
			put(&o, "pgsync_request_duration_seconds_sum{endpoint=\"%s\"%s} %.6f\n", ep_names[e],
				label(lb, sizeof lb, names[d], false), (double) get(&ms[d]->hist_sum_us[e]) / 1e6);
			put(&o, "pgsync_request_duration_seconds_count{endpoint=\"%s\"%s} %llu\n", ep_names[e],
				label(lb, sizeof lb, names[d], false), cum);
		}
	counter(&o, "pgsync_payload_bytes_in_total", "Payload bytes received by pushes.",
			offsetof(srv_metrics, bytes_in));
	counter(&o, "pgsync_payload_bytes_out_total", "Payload bytes sent by pulls.",
			offsetof(srv_metrics, bytes_out));
	counter(&o, "pgsync_changes_applied_total", "Changes that won the merge on the server.",
			offsetof(srv_metrics, applied));
	counter(&o, "pgsync_changes_rejected_total",
			"Rows refused by row-level security or privileges.", offsetof(srv_metrics, rejected));
	counter(&o, "pgsync_notifications_total",
			"Change notifications heard (NOTIFY or version poll).",
			offsetof(srv_metrics, notifications));
	counter(&o, "pgsync_rate_limited_total", "Requests refused with 429.",
			offsetof(srv_metrics, rate_limited));
	counter(&o, "pgsync_pulls_computed_total",
			"Pulls computed by Postgres (one may answer many waiting devices).",
			offsetof(srv_metrics, pulls_computed));
	counter(&o, "pgsync_pulls_answered_total", "Pull requests answered by those computations.",
			offsetof(srv_metrics, pulls_answered));
	counter(&o, "pgsync_websocket_payloads_total",
			"Payloads sent to WebSocket subscribers (their bytes are in bytes_out).",
			offsetof(srv_metrics, ws_payloads));
	put(&o, "# HELP pgsync_clients_connected Clients holding a connection open.\n"
			"# TYPE pgsync_clients_connected gauge\n");
	for (int d = 0; d < cfg.ndbs; d++)
	{
		put(&o, "pgsync_clients_connected{kind=\"longpoll\"%s} %d\n",
			label(lb, sizeof lb, names[d], false), g[d].longpoll);
		put(&o, "pgsync_clients_connected{kind=\"websocket\"%s} %d\n",
			label(lb, sizeof lb, names[d], false), g[d].websocket);
	}
	put(&o, "# HELP pgsync_pg_pool_connections Pooled Postgres connections by state.\n"
			"# TYPE pgsync_pg_pool_connections gauge\n");
	for (int d = 0; d < cfg.ndbs; d++)
	{
		int idle = g[d].idle, busy = g[d].busy, closed = g[d].closed;

		label(lb, sizeof lb, names[d], false);
		put(&o,
			"pgsync_pg_pool_connections{state=\"idle\"%s} %d\n"
			"pgsync_pg_pool_connections{state=\"busy\"%s} %d\n"
			"pgsync_pg_pool_connections{state=\"closed\"%s} %d\n",
			cfg.sections ? lb : "", idle, cfg.sections ? lb : "", busy, cfg.sections ? lb : "",
			closed);
	}
	put(&o, "# HELP pgsync_queued_requests Requests waiting for a Postgres connection.\n"
			"# TYPE pgsync_queued_requests gauge\n");
	for (int d = 0; d < cfg.ndbs; d++)
		put(&o, "pgsync_queued_requests%s %d\n", label(lb, sizeof lb, names[d], true), g[d].queued);
	put(&o, "# HELP pgsync_server_version Highest change version announced to this process.\n"
			"# TYPE pgsync_server_version gauge\n");
	for (int d = 0; d < cfg.ndbs; d++)
		put(&o, "pgsync_server_version%s %lld\n", label(lb, sizeof lb, names[d], true),
			(long long) g[d].version);
	if (o.oom)
	{
		free(o.p);
		return NULL;
	}
	*len = o.len;
	return o.p;
}
