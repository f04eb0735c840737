/*
 * ratelimit.c — token buckets, one per token subject (or client address).
 *
 * Each bucket holds up to rate_burst tokens and refills at rate_limit tokens
 * per second; a request takes one. Buckets live in a chained hash table
 * under one mutex (a request touches it once, for a few hundred
 * nanoseconds). Memory is bounded: past MAX_BUCKETS entries, buckets that
 * have refilled completely (idle clients) are dropped, which loses nothing
 * since a full bucket is the same as no bucket. The limit is per server
 * process; with N processes behind a balancer a subject gets up to N times
 * the rate, which is the usual trade-off of a stateless service. Each
 * database has its own rate and buckets (the key includes the database).
 */
#include "server.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NBUCKETS 4096
#define MAX_BUCKETS 100000

typedef struct bucket
{
	struct bucket	 *next;
	const srv_dbconf *c; /* the database's rate_limit and rate_burst */
	double			  tokens;
	int64_t			  last_ms;
	char			  key[];
} bucket;

static bucket		  *table[NBUCKETS];
static long			   nentries;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

static unsigned
hash(const char *s)
{
	unsigned h = 2166136261u;

	for (; *s; s++)
		h = (h ^ (unsigned char) *s) * 16777619u;
	return h % NBUCKETS;
}

static void
refill(bucket *b, int64_t now)
{
	b->tokens += (double) (now - b->last_ms) * b->c->rate_limit / 1000.0;
	if (b->tokens > b->c->rate_burst)
		b->tokens = b->c->rate_burst;
	b->last_ms = now;
}

/* prune drops every full (idle) bucket; mu held. */
static void
prune(int64_t now)
{
	for (int i = 0; i < NBUCKETS; i++)
		for (bucket **pp = &table[i]; *pp;)
		{
			refill(*pp, now);
			if ((*pp)->tokens >= (*pp)->c->rate_burst)
			{
				bucket *dead = *pp;

				*pp = dead->next;
				free(dead);
				nentries--;
			}
			else
				pp = &(*pp)->next;
		}
}

bool
ratelimit_take(const srv_db *db, const char *subject, int *retry_after)
{
	int64_t	 now;
	unsigned h;
	bucket	*b;
	bool	 ok;
	char	 key[SRV_DBNAME_MAX + 240];

	*retry_after = 0;
	if (db->c.rate_limit <= 0)
		return true;
	snprintf(key, sizeof key, "%d/%s", db->index, subject);
	now = srv_now_ms();
	h = hash(key);
	pthread_mutex_lock(&mu);
	for (b = table[h]; b && strcmp(b->key, key) != 0; b = b->next)
		;
	if (!b)
	{
		if (nentries >= MAX_BUCKETS)
			prune(now);
		b = malloc(sizeof *b + strlen(key) + 1);
		if (!b)
		{
			pthread_mutex_unlock(&mu);
			return true; /* fail open: better than refusing everyone */
		}
		strcpy(b->key, key);
		b->c = &db->c;
		b->tokens = db->c.rate_burst;
		b->last_ms = now;
		b->next = table[h];
		table[h] = b;
		nentries++;
	}
	refill(b, now);
	ok = b->tokens >= 1.0;
	if (ok)
		b->tokens -= 1.0;
	else
	{
		double s = (1.0 - b->tokens) / db->c.rate_limit;

		*retry_after = s < 1 ? 1 : (int) (s + 0.999);
	}
	pthread_mutex_unlock(&mu);
	return ok;
}

void
ratelimit_stop(void)
{
	pthread_mutex_lock(&mu);
	for (int i = 0; i < NBUCKETS; i++)
		while (table[i])
		{
			bucket *b = table[i];

			table[i] = b->next;
			free(b);
		}
	nentries = 0;
	pthread_mutex_unlock(&mu);
}
