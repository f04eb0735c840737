/*
 * main.c — pgsync-server start-up and shutdown.
 *
 * Start: settings, the connection pool (Postgres may still be down: the
 * server starts anyway and answers 503 until it is back), the hub (LISTEN
 * and long-poll timers), the WebSocket thread, then the HTTP daemon last so
 * that no request arrives before its dependencies exist. Stop (SIGTERM or
 * SIGINT) in the reverse order: stop accepting, release every parked
 * long-poll and WebSocket (libmicrohttpd must not be stopped with suspended
 * connections), stop the daemon, the hub, close the pool.
 */
#include "server.h"

#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

int64_t
srv_now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t
srv_wall_s(void)
{
	return (int64_t) time(NULL);
}

void
srv_log(const char *level, const char *fmt, ...)
{
	char			ts[32], msg[1024];
	struct timespec now;
	struct tm		tm;
	va_list			ap;

	clock_gettime(CLOCK_REALTIME, &now);
	gmtime_r(&now.tv_sec, &tm);
	strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%S", &tm);
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	/* one write per line so that lines of several threads do not mix */
	fprintf(stderr, "%s.%03ldZ %s %s\n", ts, now.tv_nsec / 1000000, level, msg);
}

bool
srv_fail(srv_error *e, int status, const char *error, const char *hint, const char *detail_fmt, ...)
{
	va_list ap;

	e->status = status;
	e->retry_after = status == 503 ? 1 : 0;
	snprintf(e->error, sizeof e->error, "%s", error);
	snprintf(e->hint, sizeof e->hint, "%s", hint ? hint : "");
	e->detail[0] = '\0';
	if (detail_fmt)
	{
		va_start(ap, detail_fmt);
		vsnprintf(e->detail, sizeof e->detail, detail_fmt, ap);
		va_end(ap);
	}
	return false;
}

static void
raise_fd_limit(void)
{
	struct rlimit rl;

	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max)
	{
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (rlim_t) cfg.max_connections + 64)
	{
		srv_log("WARNING",
				"open file limit %lu is below max_connections %d + 64; "
				"raise it (ulimit -n) or lower max_connections",
				(unsigned long) rl.rlim_cur, cfg.max_connections);
		cfg.max_connections = rl.rlim_cur > 128 ? (int) rl.rlim_cur - 64 : 64;
	}
}

int
main(int argc, char **argv)
{
	sigset_t set;
	int		 sig = 0;

	config_defaults(&cfg);
	for (int i = 1; i < argc; i++)
		if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h"))
		{
			config_usage();
			return 0;
		}
	for (int i = 1; i < argc; i++)
		if (!strcmp(argv[i], "--config") || !strncmp(argv[i], "--config=", 9))
		{
			const char *path = argv[i][8] == '=' ? argv[i] + 9 : (i + 1 < argc ? argv[++i] : NULL);

			if (!path || !config_load_file(&cfg, path))
				return path ? 2 : (fprintf(stderr, SRV_NAME ": --config needs a file name\n"), 2);
		}
	if (!config_load_env(&cfg))
		return 2;
	for (int i = 1; i < argc; i++)
	{
		char		key[64];
		const char *eq;

		if (!strcmp(argv[i], "--config"))
		{
			i++;
			continue;
		}
		if (!strncmp(argv[i], "--config=", 9))
			continue;
		if (strncmp(argv[i], "--", 2) != 0 || !(eq = strchr(argv[i], '=')) ||
			eq - argv[i] - 2 >= (long) sizeof key)
		{
			fprintf(stderr,
					SRV_NAME ": unexpected argument \"%s\"; options are --key=value (see --help)\n",
					argv[i]);
			return 2;
		}
		memcpy(key, argv[i] + 2, (size_t) (eq - argv[i] - 2));
		key[eq - argv[i] - 2] = '\0';
		for (char *k = key; *k; k++)
			if (*k == '-')
				*k = '_';
		if (!config_set(&cfg, key, eq + 1, "the command line"))
			return 2;
	}
	if (!config_finish(&cfg))
		return 2;

	/* every thread inherits this mask; main collects the signals below */
	sigemptyset(&set);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGHUP);
	pthread_sigmask(SIG_BLOCK, &set, NULL);
	signal(SIGPIPE, SIG_IGN);
	raise_fd_limit();

	if (!pool_start() || !hub_start() || !ws_start() || !http_start())
	{
		srv_log("FATAL", "start-up failed");
		return 1;
	}
	srv_log("LOG", SRV_NAME " listening on %s:%d (pool %d, threads %d, roles %d)", cfg.listen,
			cfg.port, cfg.pool_size, cfg.threads, cfg.nroles);

	for (;;)
	{
		if (sigwait(&set, &sig) != 0)
			continue;
		if (sig == SIGHUP)
		{
			srv_log("LOG", "SIGHUP ignored: restart the process to change settings");
			continue;
		}
		break;
	}
	srv_log("LOG", "received %s, shutting down", sig == SIGINT ? "SIGINT" : "SIGTERM");
	http_stop(); /* releases long-polls and WebSockets first */
	hub_stop();
	pool_stop();
	ratelimit_stop();
	config_free(&cfg);
	srv_log("LOG", "stopped");
	return 0;
}
