/*
 * config.c — pgsync-server settings.
 *
 * One table of settings, read in this order, later sources winning:
 * built-in defaults, the file given with --config (lines `key = value`,
 * `#` comments), environment variables PGSYNC_<KEY in upper case>, and
 * command-line options --key=value. Every setting is checked once at start;
 * a bad value stops the server with a message naming the setting and where
 * it came from, never at the first request.
 */
#include "server.h"

#include "../core/pgsync.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

srv_config cfg;

typedef enum kind
{
	K_STR,
	K_INT,
	K_SIZE,
	K_DOUBLE,
	K_BOOL,
	K_ROLES
} kind;

static const struct setting
{
	const char *key;
	kind		k;
	size_t		off;
	long		min;
	long		max;
	const char *help;
} settings[] = {
#define S(key, k, field, min, max, help)                                                           \
	{                                                                                              \
		key, k, offsetof(srv_config, field), min, max, help                                        \
	}
	S("listen", K_STR, listen, 0, 0, "address to bind (default 127.0.0.1)"),
	S("port", K_INT, port, 1, 65535, "TCP port (default 8080)"),
	S("database", K_STR, database, 0, 0, "libpq conninfo or URI of PostgreSQL"),
	S("jwt_secret", K_STR, jwt_secret, 0, 0, "HS256 shared secret"),
	S("jwt_public_key", K_STR, jwt_public_key, 0, 0, "path of the RS256 public key (PEM)"),
	S("jwt_leeway", K_INT, jwt_leeway, 0, 3600, "seconds of clock skew allowed on exp/nbf (30)"),
	S("role_claim", K_STR, role_claim, 0, 0, "claim holding the Postgres role (role)"),
	S("default_role", K_STR, default_role, 0, 0, "role for tokens without the claim (none)"),
	S("allowed_roles", K_ROLES, roles, 0, 0, "comma-separated roles tokens may use"),
	S("max_body", K_SIZE, max_body, 1024, 1L << 30, "largest push body, bytes (64MB)"),
	S("rate_limit", K_DOUBLE, rate_limit, 0, 1000000, "requests/s per token subject, 0 = off (0)"),
	S("rate_burst", K_INT, rate_burst, 1, 1000000, "bucket size of the rate limit (20)"),
	S("pool_size", K_INT, pool_size, 1, 1000, "Postgres connections (8)"),
	S("threads", K_INT, threads, 1, 1000, "HTTP worker threads (pool_size)"),
	S("pool_wait_ms", K_INT, pool_wait_ms, 0, 600000,
	  "wait for a free connection before 503 (5000)"),
	S("connect_timeout", K_INT, connect_timeout, 1, 600, "seconds to connect to Postgres (3)"),
	S("statement_timeout_ms", K_INT, statement_timeout_ms, 0, INT_MAX,
	  "per statement, 0 = none (30000)"),
	S("max_wait_ms", K_INT, max_wait_ms, 0, 3600000, "cap of a long-poll wait (60000)"),
	S("pull_max_rows", K_INT, pull_max_rows, 0, 10000000,
	  "rows per chunk of a pull when the client sends no max_rows (10000; 0 = one payload)"),
	S("poll_ms", K_INT, poll_ms, 0, 3600000,
	  "sync_db_version() polling period, 0 = off, else at least 50 (1000)"),
	S("gc_interval", K_INT, gc_interval, 0, 31536000,
	  "seconds between tombstone collections (sync_gc), 0 = never (3600)"),
	S("gc_retention_days", K_DOUBLE, gc_retention_days, 0, 36500,
	  "a device silent longer stops holding the GC horizon back (30)"),
	S("max_connections", K_INT, max_connections, 16, 1000000,
	  "HTTP + WebSocket connections (10000)"),
	S("ws_ping_s", K_INT, ws_ping_s, 1, 3600, "WebSocket ping period (30)"),
	S("log_requests", K_BOOL, log_requests, 0, 0, "one log line per request (false)"),
	S("log_format", K_STR, log_format, 0, 0, "text or json: the shape of log lines (text)"),
	S("tls_cert", K_STR, tls_cert, 0, 0,
	  "PEM certificate (chain) file: serve HTTPS, TLS 1.2+ (none: plain HTTP)"),
	S("tls_key", K_STR, tls_key, 0, 0, "PEM private key file of tls_cert"),
#undef S
};

#define NSETTINGS (sizeof settings / sizeof settings[0])

/* where each setting's value came from, for messages and --check-config */
static char *sources[NSETTINGS];

const char *
config_source(const char *key)
{
	for (size_t i = 0; i < NSETTINGS; i++)
		if (strcmp(settings[i].key, key) == 0)
			return sources[i] ? sources[i] : "the default";
	return "the default";
}

void
config_defaults(srv_config *c)
{
	memset(c, 0, sizeof *c);
	c->listen = strdup("127.0.0.1");
	c->port = 8080;
	c->database = strdup("");
	c->jwt_leeway = 30;
	c->role_claim = strdup("role");
	c->max_body = 64u << 20;
	c->rate_limit = 0;
	c->rate_burst = 20;
	c->pool_size = 8;
	c->threads = 0; /* = pool_size */
	c->pool_wait_ms = 5000;
	c->connect_timeout = 3;
	c->statement_timeout_ms = 30000;
	c->max_wait_ms = 60000;
	c->poll_ms = 1000;
	c->gc_interval = 3600;
	c->gc_retention_days = 30;
	c->pull_max_rows = 10000; /* bounded memory for large first syncs */
	c->max_connections = 10000;
	c->ws_ping_s = 30;
	c->log_format = strdup("text");
}

static char *
trim(char *s)
{
	char *e;

	while (isspace((unsigned char) *s))
		s++;
	e = s + strlen(s);
	while (e > s && isspace((unsigned char) e[-1]))
		*--e = '\0';
	return s;
}

static bool
parse_roles(srv_config *c, const char *value, const char *where)
{
	char *copy = strdup(value), *save = NULL;

	for (int i = 0; i < c->nroles; i++)
		free(c->roles[i]);
	c->nroles = 0;
	for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save))
	{
		char *r = trim(tok);

		if (!*r)
			continue;
		if (strlen(r) > SRV_ROLE_MAX - 1 || c->nroles == SRV_MAX_ROLES)
		{
			fprintf(
				stderr,
				SRV_NAME
				": allowed_roles (%s): role \"%s\" is too long or there are more than %d roles\n",
				where, r, SRV_MAX_ROLES);
			free(copy);
			return false;
		}
		c->roles[c->nroles++] = strdup(r);
	}
	free(copy);
	return true;
}

/* config_set assigns one setting from text; where names the source. */
bool
config_set(srv_config *c, const char *key, const char *value, const char *where)
{
	for (size_t i = 0; i < NSETTINGS; i++)
	{
		const struct setting *s = &settings[i];
		void				 *field = (char *) c + s->off;
		char				 *end = NULL;

		if (strcmp(s->key, key) != 0)
			continue;
		free(sources[i]);
		sources[i] = strdup(where);
		errno = 0;
		switch (s->k)
		{
			case K_STR:
				free(*(char **) field);
				*(char **) field = *value ? strdup(value) : NULL;
				return true;
			case K_ROLES:
				return parse_roles(c, value, where);
			case K_BOOL:
				if (!strcmp(value, "1") || !strcasecmp(value, "true") || !strcasecmp(value, "on") ||
					!strcasecmp(value, "yes"))
					*(bool *) field = true;
				else if (!strcmp(value, "0") || !strcasecmp(value, "false") ||
						 !strcasecmp(value, "off") || !strcasecmp(value, "no"))
					*(bool *) field = false;
				else
					break;
				return true;
			case K_DOUBLE:
			{
				double d = strtod(value, &end);

				if (errno || end == value || *end || d < s->min || d > s->max)
					break;
				*(double *) field = d;
				return true;
			}
			case K_INT:
			case K_SIZE:
			{
				long long v = strtoll(value, &end, 10);

				if (errno || end == value)
					break;
				if (s->k == K_SIZE && *end)
				{
					/* 64MB, 512k, 1G */
					switch (toupper((unsigned char) *end))
					{
						case 'K':
							v <<= 10;
							break;
						case 'M':
							v <<= 20;
							break;
						case 'G':
							v <<= 30;
							break;
						default:
							v = -1;
					}
					end++;
					if (toupper((unsigned char) *end) == 'B')
						end++;
				}
				if (*end || v < s->min || v > s->max)
					break;
				if (s->k == K_SIZE)
					*(size_t *) field = (size_t) v;
				else
					*(int *) field = (int) v;
				return true;
			}
		}
		fprintf(stderr, SRV_NAME ": invalid value \"%s\" for %s (from %s): expected %s", value, key,
				where, s->help);
		if (s->k == K_INT || s->k == K_SIZE)
			fprintf(stderr, ", between %ld and %ld", s->min, s->max);
		fputc('\n', stderr);
		return false;
	}
	fprintf(stderr,
			SRV_NAME ": unknown setting \"%s\" (from %s); run " SRV_NAME " --help for the list\n",
			key, where);
	return false;
}

bool
config_load_file(srv_config *c, const char *path)
{
	FILE *f = fopen(path, "r");
	char  line[4096];
	int	  lineno = 0;
	bool  ok = true;

	if (!f)
	{
		fprintf(stderr, SRV_NAME ": could not open config file \"%s\": %s\n", path,
				strerror(errno));
		return false;
	}
	while (ok && fgets(line, sizeof line, f))
	{
		char *l = trim(line), *eq, where[600];

		lineno++;
		if (!*l || *l == '#')
			continue;
		eq = strchr(l, '=');
		if (!eq)
		{
			fprintf(stderr, SRV_NAME ": %s:%d: expected key = value\n", path, lineno);
			ok = false;
			break;
		}
		*eq = '\0';
		{
			char  *v = trim(eq + 1);
			size_t n = strlen(v);

			if (n >= 2 && ((v[0] == '"' && v[n - 1] == '"') || (v[0] == '\'' && v[n - 1] == '\'')))
			{
				v[n - 1] = '\0';
				v++;
			}
			snprintf(where, sizeof where, "%s:%d", path, lineno);
			ok = config_set(c, trim(l), v, where);
		}
	}
	fclose(f);
	return ok;
}

bool
config_load_env(srv_config *c)
{
	for (size_t i = 0; i < NSETTINGS; i++)
	{
		char		name[64] = "PGSYNC_";
		const char *v;
		size_t		n = strlen(name);

		for (const char *k = settings[i].key; *k && n < sizeof name - 1; k++)
			name[n++] = (char) toupper((unsigned char) *k);
		name[n] = '\0';
		if ((v = getenv(name)) != NULL && !config_set(c, settings[i].key, v, name))
			return false;
	}
	return true;
}

/* srv_read_file: a whole file of at most 1 MB as a malloc'd string, or NULL + why. */
char *
srv_read_file(const char *path, char *why, size_t whylen)
{
	FILE *f = fopen(path, "rb");
	char *buf;
	long  n;

	if (!f)
	{
		snprintf(why, whylen, "%s", strerror(errno));
		return NULL;
	}
	if (fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0 || n > (1 << 20) ||
		fseek(f, 0, SEEK_SET) != 0)
	{
		snprintf(why, whylen, "not a readable file under 1 MB");
		fclose(f);
		return NULL;
	}
	buf = malloc((size_t) n + 1);
	if (buf && fread(buf, 1, (size_t) n, f) != (size_t) n)
	{
		free(buf);
		buf = NULL;
		snprintf(why, whylen, "read error");
	}
	if (buf)
		buf[n] = '\0';
	fclose(f);
	return buf;
}

/*
 * database_name: the database the conninfo or URI connects to, as libpq
 * would pick it (dbname, else PGDATABASE, else the user name), for log
 * lines. Returns malloc'd text.
 */
static char *
database_name(const char *conninfo)
{
	PQconninfoOption *opts = PQconninfoParse(conninfo ? conninfo : "", NULL);
	const char		 *db = NULL, *user = NULL;
	char			 *out;

	for (PQconninfoOption *o = opts; o && o->keyword; o++)
	{
		if (strcmp(o->keyword, "dbname") == 0 && o->val && *o->val)
			db = o->val;
		if (strcmp(o->keyword, "user") == 0 && o->val && *o->val)
			user = o->val;
	}
	if (!db)
		db = getenv("PGDATABASE");
	if (!db || !*db)
		db = user ? user : getenv("PGUSER");
	if (!db || !*db)
	{
		struct passwd *pw = getpwuid(geteuid());

		db = pw ? pw->pw_name : "?";
	}
	out = strdup(db);
	PQconninfoFree(opts);
	return out;
}

/* config_finish checks the combination and loads the key files. */
bool
config_finish(srv_config *c)
{
	char why[256];

	if (c->threads == 0)
		c->threads = c->pool_size;
	if (!c->jwt_secret && !c->jwt_public_key)
	{
		fprintf(stderr, SRV_NAME ": no JWT key configured\n"
								 "HINT: set jwt_secret (HS256) and/or jwt_public_key (RS256 PEM "
								 "file); every /v1 request needs a token.\n");
		return false;
	}
	if (c->jwt_secret && strcmp(c->jwt_secret, SRV_EXAMPLE_SECRET) == 0)
	{
		fprintf(stderr,
				SRV_NAME
				": jwt_secret (from %s) is the example value of pgsync-server.conf.example\n"
				"DETAIL: Anyone who read the example could sign tokens for this server.\n"
				"HINT: Set jwt_secret to the HS256 secret your identity provider signs "
				"tokens with (generate one with: openssl rand -base64 48), or remove it and "
				"use jwt_public_key.\n",
				config_source("jwt_secret"));
		return false;
	}
	if (c->jwt_secret && strlen(c->jwt_secret) < 32)
	{
		fprintf(stderr, SRV_NAME ": jwt_secret is shorter than 32 bytes\n"
								 "HINT: HS256 secrets need at least 256 bits; generate one with: "
								 "openssl rand -base64 48\n");
		return false;
	}
	if (c->jwt_public_key)
	{
		free(c->jwt_public_pem);
		c->jwt_public_pem = srv_read_file(c->jwt_public_key, why, sizeof why);
		if (!c->jwt_public_pem)
		{
			fprintf(stderr, SRV_NAME ": could not read jwt_public_key \"%s\": %s\n",
					c->jwt_public_key, why);
			return false;
		}
		if (!strstr(c->jwt_public_pem, "-----BEGIN PUBLIC KEY-----"))
		{
			fprintf(stderr,
					SRV_NAME
					": jwt_public_key \"%s\" is not a PEM public key\n"
					"HINT: export it with: openssl rsa -in private.pem -pubout -out public.pem\n",
					c->jwt_public_key);
			return false;
		}
	}
	if (c->nroles == 0)
	{
		fprintf(
			stderr, SRV_NAME
			": allowed_roles is empty\n"
			"HINT: list the Postgres roles tokens may act as, e.g. allowed_roles = app_user.\n");
		return false;
	}
	if (c->default_role)
	{
		bool found = false;

		for (int i = 0; i < c->nroles; i++)
			found |= strcmp(c->roles[i], c->default_role) == 0;
		if (!found)
		{
			fprintf(stderr, SRV_NAME ": default_role \"%s\" is not in allowed_roles\n",
					c->default_role);
			return false;
		}
	}
	if (c->poll_ms > 0 && c->poll_ms < 50)
	{
		fprintf(stderr,
				SRV_NAME
				": invalid value %d for poll_ms (from %s): expected 0 (off) or at least 50\n",
				c->poll_ms, config_source("poll_ms"));
		return false;
	}
	if (!(c->gc_retention_days > 0))
	{
		fprintf(stderr,
				SRV_NAME ": invalid value %g for gc_retention_days (from %s): expected a positive "
						 "number of days (fractions allowed)\n"
						 "HINT: a device silent longer than this is made to re-sync from a "
						 "snapshot; 30 is a good start.\n",
				c->gc_retention_days, config_source("gc_retention_days"));
		return false;
	}
	if (c->max_wait_ms > 0 && c->max_wait_ms / 1000 + 10 > 3600)
		c->max_wait_ms = 3590 * 1000;
	if (!c->log_format ||
		(strcmp(c->log_format, "text") != 0 && strcmp(c->log_format, "json") != 0))
	{
		fprintf(stderr,
				SRV_NAME ": invalid value \"%s\" for log_format (from %s): expected text or json\n",
				c->log_format ? c->log_format : "", config_source("log_format"));
		return false;
	}
	srv_log_set_json(strcmp(c->log_format, "json") == 0);
	free(c->dbname);
	c->dbname = database_name(c->database);
	return tls_load(c);
}

void
config_free(srv_config *c)
{
	for (size_t i = 0; i < NSETTINGS; i++)
		if (settings[i].k == K_STR)
		{
			free(*(char **) ((char *) c + settings[i].off));
			*(char **) ((char *) c + settings[i].off) = NULL;
		}
	for (int i = 0; i < c->nroles; i++)
		free(c->roles[i]);
	c->nroles = 0;
	free(c->jwt_public_pem);
	c->jwt_public_pem = NULL;
	free(c->dbname);
	c->dbname = NULL;
	for (size_t i = 0; i < NSETTINGS; i++)
	{
		free(sources[i]);
		sources[i] = NULL;
	}
	tls_free();
}

void
config_usage(void)
{
	printf("usage: " SRV_NAME " [--config FILE] [--KEY=VALUE ...] [--check-config]\n"
		   "       " SRV_NAME " --version | --help\n\n"
		   "  --check-config  read and check every setting and file, print them, exit\n"
		   "                  (0: valid, 2: not); does not connect to PostgreSQL\n\n"
		   "Settings (file: key = value; environment: PGSYNC_KEY; command line: --key=value):\n");
	for (size_t i = 0; i < NSETTINGS; i++)
		printf("  %-22s %s\n", settings[i].key, settings[i].help);
}

/* print_conninfo prints a conninfo or URI as key=value pairs, password hidden. */
static void
print_conninfo(const char *conninfo)
{
	char			 *err = NULL;
	PQconninfoOption *opts = PQconninfoParse(conninfo ? conninfo : "", &err);
	bool			  any = false;

	if (!opts)
	{
		printf("(not parseable: %s)", err ? err : "out of memory");
		PQfreemem(err);
		return;
	}
	for (PQconninfoOption *o = opts; o->keyword; o++)
		if (o->val && *o->val)
		{
			printf("%s%s=%s", any ? " " : "", o->keyword,
				   strcmp(o->keyword, "password") == 0 ? "********" : o->val);
			any = true;
		}
	if (!any)
		printf("(libpq defaults: PGHOST, PGDATABASE, ... or the local socket)");
	PQconninfoFree(opts);
}

void
config_print_checked(const srv_config *c)
{
	printf(SRV_NAME " %s: configuration is valid\n\n", PGS_VERSION);
	for (size_t i = 0; i < NSETTINGS; i++)
	{
		const struct setting *st = &settings[i];
		const void			 *field = (const char *) c + st->off;

		printf("  %-22s ", st->key);
		switch (st->k)
		{
			case K_STR:
			{
				const char *v = *(char *const *) field;

				if (strcmp(st->key, "database") == 0)
					print_conninfo(v);
				else if (!v)
					printf("(none)");
				else if (strcmp(st->key, "jwt_secret") == 0)
					printf("(set, %zu bytes)", strlen(v));
				else
					printf("%s", v);
				break;
			}
			case K_INT:
				printf("%d", *(const int *) field);
				break;
			case K_SIZE:
				printf("%zu", *(const size_t *) field);
				break;
			case K_DOUBLE:
				printf("%g", *(const double *) field);
				break;
			case K_BOOL:
				printf("%s", *(const bool *) field ? "true" : "false");
				break;
			case K_ROLES:
				for (int r = 0; r < c->nroles; r++)
					printf("%s%s", r ? "," : "", c->roles[r]);
				break;
		}
		printf("  (from %s)\n", sources[i] ? sources[i] : "the default");
	}
	printf("\n  TLS: %s\n",
		   tls_enabled() ? tls_summary() : "off: plain HTTP (terminate TLS at a proxy)");
	printf("  Not checked: that PostgreSQL is reachable and has the pgsync extension "
		   "(GET /healthz on the running server answers that).\n");
}
