/*
 * main.c — pgsync-server start-up and shutdown.
 *
 * Start: settings, then per database (db.c) its connection pool (Postgres
 * may still be down: the server starts anyway and answers 503 until it is
 * back), workers and hub (LISTEN and long-poll timers), the WebSocket
 * thread, then the HTTP daemon last so that no request arrives before its
 * dependencies exist. Stop (SIGTERM or SIGINT) in the reverse order: stop
 * accepting, finish every parked long-poll, queued request and WebSocket
 * (libmicrohttpd must not be stopped with suspended connections), stop the
 * daemon, the databases' hubs, workers and pools.
 *
 * --version prints ours and the libraries'; --check-config reads and checks
 * every setting and file exactly as a start would, prints the result and
 * exits (0 valid, 2 not) without connecting to anything.
 */
#include "server.h"

#include "../core/pgsync.h"

#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include <gnutls/gnutls.h>
#include <microhttpd.h>

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

/* print_version: ours, and the libraries that decide behaviour in the field. */
static void
print_version(void)
{
	printf(SRV_NAME " %s (sync protocol %s)\n", PGS_VERSION, SRV_PROTOCOL);
	printf("libmicrohttpd %s (TLS %s), libpq %d, GnuTLS %s\n", MHD_get_version(),
		   MHD_is_feature_supported(MHD_FEATURE_TLS) == MHD_YES ? "available" : "not available",
		   PQlibVersion(), gnutls_check_version(NULL));
}

int
main(int argc, char **argv)
{
	sigset_t set;
	int		 sig = 0;

	bool check_only = false;

	config_defaults(&cfg);
	for (int i = 1; i < argc; i++)
	{
		if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h"))
		{
			config_usage();
			return 0;
		}
		if (!strcmp(argv[i], "--version") || !strcmp(argv[i], "-V"))
		{
			print_version();
			return 0;
		}
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
		if (!strcmp(argv[i], "--check-config"))
		{
			check_only = true;
			continue;
		}
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
	/* settings first, then what they name (the TLS files: tls.c reads them) */
	if (!config_finish(&cfg) || !tls_load(&cfg))
		return 2;
	if (check_only)
	{
		config_print_checked(&cfg);
		printf("\n  TLS: %s\n",
			   tls_enabled() ? tls_summary() : "off: plain HTTP (terminate TLS at a proxy)");
		printf("  Not checked: that PostgreSQL is reachable and has the pgsync extension "
			   "(GET /healthz on the running server answers that).\n");
		tls_free();
		config_free(&cfg);
		return 0;
	}

	/* every thread inherits this mask; main collects the signals below */
	sigemptyset(&set);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGHUP);
	pthread_sigmask(SIG_BLOCK, &set, NULL);
	signal(SIGPIPE, SIG_IGN);
	raise_fd_limit();

	if (!db_start_all() || !ws_start() || !http_start())
	{
		srv_log("FATAL", "start-up failed: see the messages above");
		return 1;
	}
	if (!cfg.sections)
		srv_log("LOG",
				SRV_NAME
				" %s listening on %s://%s%s%s:%d (%s; database %s, pool %d, threads %d, roles %d)",
				PGS_VERSION, tls_enabled() ? "https" : "http", strchr(cfg.listen, ':') ? "[" : "",
				cfg.listen, strchr(cfg.listen, ':') ? "]" : "", cfg.port,
				tls_enabled() ? tls_summary() : "plain HTTP", cfg.dbs[0].dbname,
				cfg.dbs[0].c.pool_size, cfg.threads, cfg.dbs[0].c.nroles);
	else
	{
		srv_log("LOG", SRV_NAME " %s listening on %s://%s%s%s:%d (%s; %d databases, threads %d)",
				PGS_VERSION, tls_enabled() ? "https" : "http", strchr(cfg.listen, ':') ? "[" : "",
				cfg.listen, strchr(cfg.listen, ':') ? "]" : "", cfg.port,
				tls_enabled() ? tls_summary() : "plain HTTP", cfg.ndbs, cfg.threads);
		for (int i = 0; i < cfg.ndbs; i++)
			srv_log("LOG", "database %s: /db/%s/v1/... -> Postgres database %s (pool %d, roles %d)",
					cfg.dbs[i].name, cfg.dbs[i].name, cfg.dbs[i].dbname, cfg.dbs[i].c.pool_size,
					cfg.dbs[i].c.nroles);
	}

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
	if (!http_stop()) /* releases long-polls, queued requests and WebSockets first */
	{
		srv_log("LOG", "stopped (a database did not answer)");
		_exit(0);
	}
	db_stop_all();
	ratelimit_stop();
	tls_free();
	config_free(&cfg);
	srv_log("LOG", "stopped");
	return 0;
}
