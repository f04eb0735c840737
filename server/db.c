/*
 * db.c — the databases this server fronts (cfg.dbs, from config.c): lookup
 * by name, and the start and stop of each one's parts in dependency order.
 *
 * Each database owns its metrics, connection pool, worker threads,
 * notification hub and tombstone collection (gc.c); nothing of one waits on
 * another's, so one database's outage or overload stalls only its own
 * requests. Start: metrics, pool
 * (Postgres may still be down: it answers 503 until it is back), workers,
 * hub, gc. Stop in the reverse order, after http.c stopped accepting requests.
 */
#include "server.h"

#include <string.h>

srv_db *
db_find(const char *name, size_t n)
{
	for (int i = 0; i < cfg.ndbs; i++)
		if (strlen(cfg.dbs[i].name) == n && memcmp(cfg.dbs[i].name, name, n) == 0)
			return &cfg.dbs[i];
	return NULL;
}

/* what each hub does with the jobs it hands back (hub.c sits below both) */
static const hub_ops hub_to_workers = {
	.finish = work_finish,
	.requeue = work_requeue,
	.requeue_list = work_requeue_list,
	.reap = work_reap,
	.announced = ws_broadcast,
};

bool
db_start_all(void)
{
	for (int i = 0; i < cfg.ndbs; i++)
	{
		srv_db *db = &cfg.dbs[i];

		if (!metrics_init(db) || !pool_start(db) || !work_start(db) ||
			!hub_start(db, &hub_to_workers) || !gc_start(db))
		{
			srv_log("FATAL", "cannot start the threads of database %s", db->name);
			return false;
		}
	}
	return true;
}

/* db_stop_all: workers, hubs, pools; after work_quiesce and http_stop. */
void
db_stop_all(void)
{
	for (int i = 0; i < cfg.ndbs; i++)
	{
		gc_stop(&cfg.dbs[i]);
		hub_stop(&cfg.dbs[i]);
		work_stop(&cfg.dbs[i]);
		pool_stop(&cfg.dbs[i]);
		metrics_free(&cfg.dbs[i]);
	}
}
