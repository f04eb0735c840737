/*
 * config.c — pgsync-server settings.
 *
 * One table of settings, read in this order, later sources winning:
 * built-in defaults, the file given with --config (lines `key = value`,
 * `#` comments), environment variables PGSYNC_<KEY in upper case>, and
 * command-line options --key=value. Every setting is checked once at start;
 * a bad value stops the server with a message naming the setting and where
 * it came from, never at the first request.
 *
 * Several databases: the file may continue with `[database NAME]` sections.
 * A section holds the per-database settings (marked DB in the table:
 * connection, keys, roles, pool, limits) of one database; what a section
 * does not set it takes from the top level (file, environment, command
 * line), so common values are written once. Server-wide settings (listen,
 * TLS, logs, ...) belong above the first section. Without sections the top
 * level is the only database, exactly as before sections existed.
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
	bool		db; /* per database: off is into srv_dbconf, else srv_config */
	size_t		off;
	long		min;
	long		max;
	const char *help;
} settings[] = {
#define S(key, k, field, min, max, help)                                                           \
	{                                                                                              \
		key, k, false, offsetof(srv_config, field), min, max, help                                 \
	}
#define D(key, k, field, min, max, help)                                                           \
	{                                                                                              \
		key, k, true, offsetof(srv_dbconf, field), min, max, help                                  \
	}
	S("listen", K_STR, listen, 0, 0, "address to bind (default 127.0.0.1)"),
	S("port", K_INT, port, 1, 65535, "TCP port (default 8080)"),
	D("database", K_STR, database, 0, 0, "libpq conninfo or URI of PostgreSQL"),
	D("jwt_secret", K_STR, jwt_secret, 0, 0, "HS256 shared secret"),
	D("jwt_public_key", K_STR, jwt_public_key, 0, 0, "path of the RS256 public key (PEM)"),
	S("jwt_leeway", K_INT, jwt_leeway, 0, 3600, "seconds of clock skew allowed on exp/nbf (30)"),
	S("role_claim", K_STR, role_claim, 0, 0, "claim holding the Postgres role (role)"),
	D("default_role", K_STR, default_role, 0, 0, "role for tokens without the claim (none)"),
	D("allowed_roles", K_ROLES, roles, 0, 0, "comma-separated roles tokens may use"),
	S("database_claim", K_STR, database_claim, 0, 0,
	  "claim naming the token's [database] section (none)"),
	S("max_body", K_SIZE, max_body, 1024, 1L << 30, "largest push body, bytes (64MB)"),
	D("rate_limit", K_DOUBLE, rate_limit, 0, 1000000, "requests/s per token subject, 0 = off (0)"),
	D("rate_burst", K_INT, rate_burst, 1, 1000000, "bucket size of the rate limit (20)"),
	D("pool_size", K_INT, pool_size, 1, 1000, "Postgres connections (8)"),
	S("threads", K_INT, threads, 1, 1000, "HTTP threads (pool_size)"),
	D("pool_wait_ms", K_INT, pool_wait_ms, 0, 600000,
	  "wait for a free connection before 503 (5000)"),
	D("max_queue", K_INT, max_queue, 1, 1000000,
	  "requests waiting for a free connection before 503 (1000)"),
	D("connect_timeout", K_INT, connect_timeout, 1, 600, "seconds to connect to Postgres (3)"),
	D("statement_timeout_ms", K_INT, statement_timeout_ms, 0, INT_MAX,
	  "per statement, 0 = none (30000)"),
	S("max_wait_ms", K_INT, max_wait_ms, 0, 3600000, "cap of a long-poll wait (60000)"),
	D("pull_max_rows", K_INT, pull_max_rows, 0, 10000000,
	  "rows per chunk of a pull when the client sends no max_rows (10000; 0 = one payload)"),
	D("poll_ms", K_INT, poll_ms, 0, 3600000,
	  "sync_db_version() polling period, 0 = off, else at least 50 (1000)"),
	D("gc_interval", K_INT, gc_interval, 0, 31536000,
	  "seconds between tombstone collections (sync_gc), 0 = never (3600)"),
	D("gc_retention_days", K_DOUBLE, gc_retention_days, 0, 36500,
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
#undef D
};

#define NSETTINGS (sizeof settings / sizeof settings[0])

/* where each top-level setting's value came from, for messages and --check-config */
static char *sources[NSETTINGS];

/* [database NAME] sections as read, before the top level is filled in */
typedef struct section
{
	char	   name[SRV_DBNAME_MAX + 1];
	srv_dbconf conf;
	char	  *src[NSETTINGS]; /* "FILE:LINE" of the keys the section sets, else NULL */
} section;

static section *sections;
static int		nsections;

const char *
config_source(const char *key)
{
	for (size_t i = 0; i < NSETTINGS; i++)
		if (strcmp(settings[i].key, key) == 0)
			return sources[i] ? sources[i] : "the default";
	return "the default";
}

static void
dbconf_defaults(srv_dbconf *d)
{
	memset(d, 0, sizeof *d);
	d->database = strdup("");
	d->rate_limit = 0;
	d->rate_burst = 20;
	d->pool_size = 8;
	d->pool_wait_ms = 5000;
	d->max_queue = 1000;
	d->connect_timeout = 3;
	d->statement_timeout_ms = 30000;
	d->poll_ms = 1000;
	d->pull_max_rows = 10000; /* bounded memory for large first syncs */
	d->gc_interval = 3600;
	d->gc_retention_days = 30;
}

void
config_defaults(srv_config *c)
{
	memset(c, 0, sizeof *c);
	c->listen = strdup("127.0.0.1");
	c->port = 8080;
	c->jwt_leeway = 30;
	c->role_claim = strdup("role");
	c->max_body = 64u << 20;
	c->threads = 0; /* = pool_size */
	c->max_wait_ms = 60000;
	c->max_connections = 10000;
	c->ws_ping_s = 30;
	c->log_format = strdup("text");
	dbconf_defaults(&c->base);
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

static void
free_roles(srv_dbconf *d)
{
	for (int i = 0; i < d->nroles; i++)
		free(d->roles[i]);
	d->nroles = 0;
}

static bool
parse_roles(srv_dbconf *d, const char *value, const char *where)
{
	char *copy = strdup(value), *save = NULL;

	free_roles(d);
	for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save))
	{
		char *r = trim(tok);

		if (!*r)
			continue;
		if (strlen(r) > SRV_ROLE_MAX - 1 || d->nroles == SRV_MAX_ROLES)
		{
			fprintf(
				stderr,
				SRV_NAME
				": allowed_roles (%s): role \"%s\" is too long or there are more than %d roles\n",
				where, r, SRV_MAX_ROLES);
			free(copy);
			return false;
		}
		d->roles[d->nroles++] = strdup(r);
	}
	free(copy);
	return true;
}

/* set_value assigns setting s from text into the struct at base. */
static bool
set_value(const struct setting *s, void *base, const char *key, const char *value,
		  const char *where)
{
	void *field = (char *) base + s->off;
	char *end = NULL;

	errno = 0;
	switch (s->k)
	{
		case K_STR:
			free(*(char **) field);
			*(char **) field = *value ? strdup(value) : NULL;
			return true;
		case K_ROLES:
			return parse_roles(base, value, where);
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

static const struct setting *
find_setting(const char *key, size_t *idx)
{
	for (size_t i = 0; i < NSETTINGS; i++)
		if (strcmp(settings[i].key, key) == 0)
		{
			*idx = i;
			return &settings[i];
		}
	return NULL;
}

/* config_set assigns one top-level setting from text; where names the source. */
bool
config_set(srv_config *c, const char *key, const char *value, const char *where)
{
	size_t				  i;
	const struct setting *s = find_setting(key, &i);

	if (!s)
	{
		fprintf(stderr,
				SRV_NAME ": unknown setting \"%s\" (from %s); run " SRV_NAME
						 " --help for the list\n",
				key, where);
		return false;
	}
	free(sources[i]);
	sources[i] = strdup(where);
	return set_value(s, s->db ? (void *) &c->base : (void *) c, key, value, where);
}

/* section_set assigns a setting of the current [database] section. */
static bool
section_set(section *sec, const char *key, const char *value, const char *where)
{
	size_t				  i;
	const struct setting *s = find_setting(key, &i);

	if (!s)
	{
		fprintf(stderr,
				SRV_NAME ": unknown setting \"%s\" (from %s); run " SRV_NAME
						 " --help for the list\n",
				key, where);
		return false;
	}
	if (!s->db)
	{
		fprintf(stderr,
				SRV_NAME ": %s (from %s) is a setting of the whole server, not of [database %s]\n"
						 "HINT: Move it above the first [database] section.\n",
				key, where, sec->name);
		return false;
	}
	free(sec->src[i]);
	sec->src[i] = strdup(where);
	return set_value(s, &sec->conf, key, value, where);
}

static bool
valid_db_name(const char *n)
{
	size_t len = strlen(n);

	if (len == 0 || len > SRV_DBNAME_MAX)
		return false;
	for (const char *p = n; *p; p++)
		if (!isalnum((unsigned char) *p) && *p != '_' && *p != '-' && *p != '.')
			return false;
	return true;
}

/* begin_section handles a "[database NAME]" line (l without the brackets). */
static section *
begin_section(char *l, const char *path, int lineno)
{
	char	*name;
	section *n;

	if (strncmp(l, "database", 8) != 0 || !isspace((unsigned char) l[8]))
	{
		fprintf(stderr,
				SRV_NAME ": %s:%d: unknown section [%s]\n"
						 "HINT: The only sections are [database NAME], one per database.\n",
				path, lineno, l);
		return NULL;
	}
	name = trim(l + 8);
	if (!valid_db_name(name))
	{
		fprintf(stderr,
				SRV_NAME ": %s:%d: invalid database name \"%s\"\n"
						 "HINT: Use 1 to %d letters, digits, '_', '-' or '.': it appears in URLs "
						 "(/db/NAME/v1/...), tokens and metrics.\n",
				path, lineno, name, SRV_DBNAME_MAX);
		return NULL;
	}
	for (int i = 0; i < nsections; i++)
		if (strcmp(sections[i].name, name) == 0)
		{
			fprintf(stderr, SRV_NAME ": %s:%d: [database %s] appears twice\n", path, lineno, name);
			return NULL;
		}
	if (nsections == SRV_MAX_DBS ||
		!(n = realloc(sections, sizeof(section) * (size_t) (nsections + 1))))
	{
		fprintf(stderr, SRV_NAME ": %s:%d: more than %d [database] sections\n", path, lineno,
				SRV_MAX_DBS);
		return NULL;
	}
	sections = n;
	n = &sections[nsections++];
	memset(n, 0, sizeof *n);
	snprintf(n->name, sizeof n->name, "%s", name);
	return n;
}

bool
config_load_file(srv_config *c, const char *path)
{
	FILE	*f = fopen(path, "r");
	char	 line[4096];
	int		 lineno = 0;
	bool	 ok = true;
	section *sec = NULL;

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
		if (*l == '[')
		{
			size_t n = strlen(l);

			if (l[n - 1] != ']')
			{
				fprintf(stderr, SRV_NAME ": %s:%d: expected [database NAME]\n", path, lineno);
				ok = false;
				break;
			}
			l[n - 1] = '\0';
			/* settings that follow go to sections[nsections - 1] */
			ok = (sec = begin_section(trim(l + 1), path, lineno)) != NULL;
			continue;
		}
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
			ok = sec ? section_set(&sections[nsections - 1], trim(l), v, where)
					 : config_set(c, trim(l), v, where);
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

/* copy_field copies setting s from src to dst (strings and roles deep). */
static void
copy_field(const struct setting *s, srv_dbconf *dst, const srv_dbconf *src)
{
	const void *from = (const char *) src + s->off;
	void	   *to = (char *) dst + s->off;

	switch (s->k)
	{
		case K_STR:
			free(*(char **) to);
			*(char **) to = *(char *const *) from ? strdup(*(char *const *) from) : NULL;
			break;
		case K_ROLES:
			free_roles(dst);
			for (int r = 0; r < src->nroles; r++)
				dst->roles[r] = strdup(src->roles[r]);
			dst->nroles = src->nroles;
			break;
		case K_INT:
			*(int *) to = *(const int *) from;
			break;
		case K_SIZE:
			*(size_t *) to = *(const size_t *) from;
			break;
		case K_DOUBLE:
			*(double *) to = *(const double *) from;
			break;
		case K_BOOL:
			*(bool *) to = *(const bool *) from;
			break;
	}
}

static void
dbconf_free(srv_dbconf *d)
{
	for (size_t i = 0; i < NSETTINGS; i++)
		if (settings[i].db && settings[i].k == K_STR)
		{
			free(*(char **) ((char *) d + settings[i].off));
			*(char **) ((char *) d + settings[i].off) = NULL;
		}
	free_roles(d);
	free(d->jwt_public_pem);
	d->jwt_public_pem = NULL;
}

/* db_source: where db's value of setting i came from. */
static const char *
db_source(const srv_config *c, int db, size_t i)
{
	if (c->sections && db < nsections && sections[db].src[i])
		return sections[db].src[i];
	return sources[i] ? sources[i] : "the default";
}

/* check_db checks one database's settings and loads its key file. */
static bool
check_db(srv_config *c, srv_db *db)
{
	srv_dbconf		 *d = &db->c;
	char			  why[256], where[SRV_DBNAME_MAX + 32] = "";
	char			 *err = NULL;
	size_t			  i = 0;
	PQconninfoOption *opts;

	if (c->sections)
		snprintf(where, sizeof where, "[database %s] ", db->name);
	if (!(opts = PQconninfoParse(d->database ? d->database : "", &err)))
	{
		find_setting("database", &i);
		fprintf(stderr,
				SRV_NAME ": %sdatabase (from %s) is not a libpq connection string: %s"
						 "HINT: Write key=value pairs (host=db dbname=app user=...) or a URI "
						 "(postgresql://user@db/app).\n",
				where, db_source(c, db->index, i), err ? err : "out of memory\n");
		PQfreemem(err);
		return false;
	}
	PQconninfoFree(opts);
	if (!d->jwt_secret && !d->jwt_public_key)
	{
		fprintf(stderr,
				SRV_NAME ": %sno JWT key configured\n"
						 "HINT: set jwt_secret (HS256) and/or jwt_public_key (RS256 PEM "
						 "file); every /v1 request needs a token.\n",
				where);
		return false;
	}
	if (d->jwt_secret && strcmp(d->jwt_secret, SRV_EXAMPLE_SECRET) == 0)
	{
		find_setting("jwt_secret", &i);
		fprintf(stderr,
				SRV_NAME
				": %sjwt_secret (from %s) is the example value of pgsync-server.conf.example\n"
				"DETAIL: Anyone who read the example could sign tokens for this server.\n"
				"HINT: Set jwt_secret to the HS256 secret your identity provider signs "
				"tokens with (generate one with: openssl rand -base64 48), or remove it and "
				"use jwt_public_key.\n",
				where, db_source(c, db->index, i));
		return false;
	}
	if (d->jwt_secret && strlen(d->jwt_secret) < 32)
	{
		fprintf(stderr,
				SRV_NAME ": %sjwt_secret is shorter than 32 bytes\n"
						 "HINT: HS256 secrets need at least 256 bits; generate one with: "
						 "openssl rand -base64 48\n",
				where);
		return false;
	}
	if (d->jwt_public_key)
	{
		free(d->jwt_public_pem);
		d->jwt_public_pem = srv_read_file(d->jwt_public_key, why, sizeof why);
		if (!d->jwt_public_pem)
		{
			fprintf(stderr, SRV_NAME ": %scould not read jwt_public_key \"%s\": %s\n", where,
					d->jwt_public_key, why);
			return false;
		}
		if (!strstr(d->jwt_public_pem, "-----BEGIN PUBLIC KEY-----"))
		{
			fprintf(stderr,
					SRV_NAME
					": %sjwt_public_key \"%s\" is not a PEM public key\n"
					"HINT: export it with: openssl rsa -in private.pem -pubout -out public.pem\n",
					where, d->jwt_public_key);
			return false;
		}
	}
	if (d->nroles == 0)
	{
		fprintf(stderr,
				SRV_NAME
				": %sallowed_roles is empty\n"
				"HINT: list the Postgres roles tokens may act as, e.g. allowed_roles = app_user.\n",
				where);
		return false;
	}
	if (d->default_role)
	{
		bool found = false;

		for (int r = 0; r < d->nroles; r++)
			found |= strcmp(d->roles[r], d->default_role) == 0;
		if (!found)
		{
			fprintf(stderr, SRV_NAME ": %sdefault_role \"%s\" is not in allowed_roles\n", where,
					d->default_role);
			return false;
		}
	}
	if (d->poll_ms > 0 && d->poll_ms < 50)
	{
		find_setting("poll_ms", &i);
		fprintf(stderr,
				SRV_NAME
				": %sinvalid value %d for poll_ms (from %s): expected 0 (off) or at least 50\n",
				where, d->poll_ms, db_source(c, db->index, i));
		return false;
	}
	if (!(d->gc_retention_days > 0))
	{
		find_setting("gc_retention_days", &i);
		fprintf(stderr,
				SRV_NAME
				": %sinvalid value %g for gc_retention_days (from %s): expected a positive "
				"number of days (fractions allowed)\n"
				"HINT: a device silent longer than this is made to re-sync from a "
				"snapshot; 30 is a good start.\n",
				where, d->gc_retention_days, db_source(c, db->index, i));
		return false;
	}
	free(db->dbname);
	db->dbname = database_name(d->database);
	return true;
}

/* same_key: a token signed for one database would verify for the other. */
static bool
same_key(const srv_dbconf *a, const srv_dbconf *b)
{
	return (a->jwt_secret && b->jwt_secret && strcmp(a->jwt_secret, b->jwt_secret) == 0) ||
		   (a->jwt_public_pem && b->jwt_public_pem &&
			strcmp(a->jwt_public_pem, b->jwt_public_pem) == 0);
}

/* build_dbs makes cfg.dbs: each section over the top level, or the top level alone. */
static bool
build_dbs(srv_config *c)
{
	int n = nsections ? nsections : 1;

	c->sections = nsections > 0;
	c->dbs = calloc((size_t) n, sizeof(srv_db));
	if (!c->dbs)
		return false;
	c->ndbs = n;
	for (int k = 0; k < n; k++)
	{
		srv_db *db = &c->dbs[k];

		db->index = k;
		pthread_mutex_init(&db->site_mu, NULL);
		dbconf_defaults(&db->c);
		for (size_t i = 0; i < NSETTINGS; i++)
			if (settings[i].db)
				copy_field(&settings[i], &db->c,
						   c->sections && sections[k].src[i] ? &sections[k].conf : &c->base);
		if (c->sections)
			snprintf(db->name, sizeof db->name, "%s", sections[k].name);
	}
	return true;
}

/* config_finish checks the combination and loads the key files. */
bool
config_finish(srv_config *c)
{
	if (!c->log_format ||
		(strcmp(c->log_format, "text") != 0 && strcmp(c->log_format, "json") != 0))
	{
		fprintf(stderr,
				SRV_NAME ": invalid value \"%s\" for log_format (from %s): expected text or json\n",
				c->log_format ? c->log_format : "", config_source("log_format"));
		return false;
	}
	srv_log_set_json(strcmp(c->log_format, "json") == 0);
	if (c->max_wait_ms > 0 && c->max_wait_ms / 1000 + 10 > 3600)
		c->max_wait_ms = 3590 * 1000;
	if (!build_dbs(c))
	{
		fprintf(stderr, SRV_NAME ": out of memory\n");
		return false;
	}
	for (int k = 0; k < c->ndbs; k++)
	{
		srv_db *db = &c->dbs[k];

		if (!check_db(c, db))
			return false;
		if (!c->sections)
			snprintf(db->name, sizeof db->name, "%s", db->dbname);
	}
	if (c->threads == 0)
	{
		c->threads = 0;
		for (int k = 0; k < c->ndbs; k++)
			c->threads += c->dbs[k].c.pool_size;
		if (c->threads > 64)
			c->threads = 64;
	}
	/* several databases behind one key: a token must say which it is for */
	if (c->ndbs > 1 && !c->database_claim)
		for (int a = 0; a < c->ndbs; a++)
			for (int b = a + 1; b < c->ndbs; b++)
				if (same_key(&c->dbs[a].c, &c->dbs[b].c))
				{
					fprintf(stderr,
							SRV_NAME
							": [database %s] and [database %s] accept tokens signed with the same "
							"key, and database_claim is not set\n"
							"DETAIL: A token issued for one database would open the other "
							"(/db/%s/v1/... and /db/%s/v1/...).\n"
							"HINT: Set database_claim (e.g. database_claim = db) so that tokens "
							"name their database, or give each [database] section its own "
							"jwt_secret or jwt_public_key.\n",
							c->dbs[a].name, c->dbs[b].name, c->dbs[a].name, c->dbs[b].name);
					return false;
				}
	return true;
}

void
config_free(srv_config *c)
{
	for (size_t i = 0; i < NSETTINGS; i++)
		if (!settings[i].db && settings[i].k == K_STR)
		{
			free(*(char **) ((char *) c + settings[i].off));
			*(char **) ((char *) c + settings[i].off) = NULL;
		}
	dbconf_free(&c->base);
	for (int k = 0; k < c->ndbs; k++)
	{
		dbconf_free(&c->dbs[k].c);
		free(c->dbs[k].dbname);
		pthread_mutex_destroy(&c->dbs[k].site_mu);
	}
	free(c->dbs);
	c->dbs = NULL;
	c->ndbs = 0;
	for (int k = 0; k < nsections; k++)
	{
		dbconf_free(&sections[k].conf);
		for (size_t i = 0; i < NSETTINGS; i++)
			free(sections[k].src[i]);
	}
	free(sections);
	sections = NULL;
	nsections = 0;
	for (size_t i = 0; i < NSETTINGS; i++)
	{
		free(sources[i]);
		sources[i] = NULL;
	}
}

void
config_usage(void)
{
	printf("usage: " SRV_NAME " [--config FILE] [--KEY=VALUE ...] [--check-config]\n"
		   "       " SRV_NAME " --version | --help\n\n"
		   "  --check-config  read and check every setting and file, print them, exit\n"
		   "                  (0: valid, 2: not); does not connect to PostgreSQL\n\n"
		   "Settings (file: key = value; environment: PGSYNC_KEY; command line: --key=value).\n"
		   "Those marked DB may also be set per database in [database NAME] sections of the\n"
		   "file (docs/SERVER.md, \"Several databases\"):\n");
	for (size_t i = 0; i < NSETTINGS; i++)
		printf("  %-22s %s%s\n", settings[i].key, settings[i].db ? "DB  " : "    ",
			   settings[i].help);
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

static void
print_value(const struct setting *st, const void *base, const srv_dbconf *d)
{
	const void *field = (const char *) base + st->off;

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
			for (int r = 0; r < d->nroles; r++)
				printf("%s%s", r ? "," : "", d->roles[r]);
			break;
	}
}

void
config_print_checked(const srv_config *c)
{
	printf(SRV_NAME " %s: configuration is valid\n\n", PGS_VERSION);
	for (size_t i = 0; i < NSETTINGS; i++)
	{
		const struct setting *st = &settings[i];

		if (st->db && c->sections)
			continue; /* shown per database below */
		printf("  %-22s ", st->key);
		print_value(st, st->db ? (const void *) &c->dbs[0].c : (const void *) c, &c->dbs[0].c);
		printf("  (from %s)\n", sources[i] ? sources[i] : "the default");
	}
	if (c->sections)
		for (int k = 0; k < c->ndbs; k++)
		{
			const srv_db *db = &c->dbs[k];

			printf("\n  [database %s]  requests: /db/%s/v1/...%s%s%s\n", db->name, db->name,
				   c->database_claim ? ", or /v1/... with a token whose " : "",
				   c->database_claim ? c->database_claim : "",
				   c->database_claim ? " claim names it" : "");
			for (size_t i = 0; i < NSETTINGS; i++)
			{
				const struct setting *st = &settings[i];

				if (!st->db)
					continue;
				printf("  %-22s ", st->key);
				print_value(st, &db->c, &db->c);
				printf("  (from %s)\n", db_source(c, k, i));
			}
		}
}
