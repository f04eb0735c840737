/*
 * metrics.c — request counters and latency histograms for GET /metrics.
 *
 * Everything is a relaxed atomic in a fixed array indexed by endpoint and
 * status class, so recording costs a few atomic adds and needs no lock; the
 * rendering reads the arrays without stopping writers (Prometheus tolerates
 * a counter read mid-request). Statuses outside the table are counted as
 * "other". Durations are kept in microseconds.
 */
#include "server.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const ep_names[EP_COUNT] = {"push",	  "pull",	 "longpoll", "ws", "rows",
											   "healthz", "metrics", "other"};
static const int		 statuses[] = {101, 200, 204, 400, 401, 403, 404, 405,
									   409, 410, 413, 422, 426, 429, 500, 503};

#define NSTATUS (sizeof statuses / sizeof statuses[0])
/* upper bounds of the histogram buckets, in microseconds */
static const int64_t bounds[] = {500,	  1000,		2500,	  5000,	   10000,	25000,
								 50000,	  100000,	250000,	  500000,  1000000, 2500000,
								 5000000, 10000000, 30000000, 60000000};

#define NBOUNDS (sizeof bounds / sizeof bounds[0])

static atomic_ullong requests[EP_COUNT][NSTATUS + 1];
static atomic_ullong hist[EP_COUNT][NBOUNDS + 1];
static atomic_ullong hist_sum_us[EP_COUNT];
static atomic_ullong bytes_in, bytes_out, applied, rejected, notifications, rate_limited;

const char *
metrics_endpoint_name(srv_endpoint ep)
{
	return ep >= 0 && ep < EP_COUNT ? ep_names[ep] : "other";
}

void
metrics_request(srv_endpoint ep, int status, int64_t usec)
{
	size_t s = NSTATUS, b = NBOUNDS;

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
	atomic_fetch_add_explicit(&requests[ep][s], 1, memory_order_relaxed);
	atomic_fetch_add_explicit(&hist[ep][b], 1, memory_order_relaxed);
	atomic_fetch_add_explicit(&hist_sum_us[ep], (unsigned long long) usec, memory_order_relaxed);
}

void
metrics_bytes(uint64_t in, uint64_t out)
{
	atomic_fetch_add_explicit(&bytes_in, in, memory_order_relaxed);
	atomic_fetch_add_explicit(&bytes_out, out, memory_order_relaxed);
}

void
metrics_changes(int64_t a, int64_t r)
{
	atomic_fetch_add_explicit(&applied, (unsigned long long) (a > 0 ? a : 0), memory_order_relaxed);
	atomic_fetch_add_explicit(&rejected, (unsigned long long) (r > 0 ? r : 0),
							  memory_order_relaxed);
}

void
metrics_notification(void)
{
	atomic_fetch_add_explicit(&notifications, 1, memory_order_relaxed);
}

void
metrics_rate_limited(void)
{
	atomic_fetch_add_explicit(&rate_limited, 1, memory_order_relaxed);
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

char *
metrics_render(size_t *len)
{
	out o = {.p = malloc(16384), .cap = 16384};
	int idle, busy, closed;

	if (!o.p)
		return NULL;
	o.p[0] = '\0';
	put(&o, "# HELP pgsync_requests_total HTTP requests by endpoint and status.\n"
			"# TYPE pgsync_requests_total counter\n");
	for (int e = 0; e < EP_COUNT; e++)
		for (size_t s = 0; s <= NSTATUS; s++)
		{
			unsigned long long v = get(&requests[e][s]);

			if (!v)
				continue;
			if (s < NSTATUS)
				put(&o, "pgsync_requests_total{endpoint=\"%s\",status=\"%d\"} %llu\n", ep_names[e],
					statuses[s], v);
			else
				put(&o, "pgsync_requests_total{endpoint=\"%s\",status=\"other\"} %llu\n",
					ep_names[e], v);
		}
	put(&o,
		"# HELP pgsync_request_duration_seconds Request duration (long-polls include the wait).\n"
		"# TYPE pgsync_request_duration_seconds histogram\n");
	for (int e = 0; e < EP_COUNT; e++)
	{
		unsigned long long cum = 0;

		for (size_t b = 0; b <= NBOUNDS; b++)
		{
			cum += get(&hist[e][b]);
			if (b < NBOUNDS)
				put(&o, "pgsync_request_duration_seconds_bucket{endpoint=\"%s\",le=\"%g\"} %llu\n",
					ep_names[e], (double) bounds[b] / 1e6, cum);
			else
				put(&o,
					"pgsync_request_duration_seconds_bucket{endpoint=\"%s\",le=\"+Inf\"} %llu\n",
					ep_names[e], cum);
		}
		put(&o, "pgsync_request_duration_seconds_sum{endpoint=\"%s\"} %.6f\n", ep_names[e],
			(double) get(&hist_sum_us[e]) / 1e6);
		put(&o, "pgsync_request_duration_seconds_count{endpoint=\"%s\"} %llu\n", ep_names[e], cum);
	}
	put(&o,
		"# HELP pgsync_payload_bytes_in_total Payload bytes received by pushes.\n"
		"# TYPE pgsync_payload_bytes_in_total counter\npgsync_payload_bytes_in_total %llu\n",
		get(&bytes_in));
	put(&o,
		"# HELP pgsync_payload_bytes_out_total Payload bytes sent by pulls.\n"
		"# TYPE pgsync_payload_bytes_out_total counter\npgsync_payload_bytes_out_total %llu\n",
		get(&bytes_out));
	put(&o,
		"# HELP pgsync_changes_applied_total Changes that won the merge on the server.\n"
		"# TYPE pgsync_changes_applied_total counter\npgsync_changes_applied_total %llu\n",
		get(&applied));
	put(&o,
		"# HELP pgsync_changes_rejected_total Rows refused by row-level security or privileges.\n"
		"# TYPE pgsync_changes_rejected_total counter\npgsync_changes_rejected_total %llu\n",
		get(&rejected));
	put(&o,
		"# HELP pgsync_notifications_total Change notifications heard (NOTIFY or version poll).\n"
		"# TYPE pgsync_notifications_total counter\npgsync_notifications_total %llu\n",
		get(&notifications));
	put(&o,
		"# HELP pgsync_rate_limited_total Requests refused with 429.\n"
		"# TYPE pgsync_rate_limited_total counter\npgsync_rate_limited_total %llu\n",
		get(&rate_limited));
	put(&o,
		"# HELP pgsync_clients_connected Clients holding a connection open.\n"
		"# TYPE pgsync_clients_connected gauge\n"
		"pgsync_clients_connected{kind=\"longpoll\"} "
		"%d\npgsync_clients_connected{kind=\"websocket\"} %d\n",
		hub_waiting(), ws_clients());
	pool_counts(&idle, &busy, &closed);
	put(&o,
		"# HELP pgsync_pg_pool_connections Pooled Postgres connections by state.\n"
		"# TYPE pgsync_pg_pool_connections gauge\n"
		"pgsync_pg_pool_connections{state=\"idle\"} %d\npgsync_pg_pool_connections{state=\"busy\"} "
		"%d\n"
		"pgsync_pg_pool_connections{state=\"closed\"} %d\n",
		idle, busy, closed);
	put(&o,
		"# HELP pgsync_server_version Highest change version announced to this process.\n"
		"# TYPE pgsync_server_version gauge\npgsync_server_version %lld\n",
		(long long) hub_version());
	if (o.oom)
	{
		free(o.p);
		return NULL;
	}
	*len = o.len;
	return o.p;
}
