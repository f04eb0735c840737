/*
 * log.c — the server's log lines, its clocks, and srv_fail (the helper that
 * fills an HTTP error).
 *
 * Every event is one line on stderr (systemd's journal, docker and runit
 * collect it), written with a single write(2) so that lines of several
 * threads never interleave. Two shapes, chosen by log_format:
 *
 *   text  2026-12-01T08:43:00.123Z LOG message
 *         2026-12-01T08:43:00.123Z LOG request GET /v1/pull status=200 ms=2.1 role=app_user ...
 *   json  {"ts":"2026-12-01T08:43:00.123Z","level":"LOG","msg":"message"}
 *         {"ts":"…","level":"LOG","msg":"request","method":"GET","path":"/v1/pull",…}
 *
 * Levels follow PostgreSQL's: LOG, WARNING, ERROR, FATAL. Request lines say
 * what happened (method, path, route, status, duration) and why (the error
 * and its detail, as sent to the client), for whom (role, client address)
 * and where (database). A line is at most SRV_LOG_MAX bytes; longer text is
 * cut, never split.
 */
#include "server.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define SRV_LOG_MAX 4096

static bool log_json;

void
srv_log_set_json(bool json)
{
	log_json = json;
}

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

/* ---- building one line ------------------------------------------------------ */

typedef struct line
{
	char   buf[SRV_LOG_MAX];
	size_t len;
} line;

static void
put(line *l, const char *s, size_t n)
{
	if (n > sizeof l->buf - 1 - l->len)
		n = sizeof l->buf - 1 - l->len; /* keep room for the newline */
	memcpy(l->buf + l->len, s, n);
	l->len += n;
}

static void
puts_(line *l, const char *s)
{
	put(l, s, strlen(s));
}

static void putf(line *l, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void
putf(line *l, const char *fmt, ...)
{
	char	tmp[SRV_LOG_MAX];
	va_list ap;
	int		n;

	va_start(ap, fmt);
	n = vsnprintf(tmp, sizeof tmp, fmt, ap);
	va_end(ap);
	if (n > 0)
		put(l, tmp, (size_t) n < sizeof tmp ? (size_t) n : sizeof tmp - 1);
}

/* put_json_str appends s as a JSON string (quotes included). */
static void
put_json_str(line *l, const char *s)
{
	puts_(l, "\"");
	for (const unsigned char *p = (const unsigned char *) s; *p; p++)
	{
		if (*p == '"' || *p == '\\')
		{
			char esc[2] = {'\\', (char) *p};

			put(l, esc, 2);
		}
		else if (*p < 0x20 || *p == 0x7f)
			putf(l, "\\u%04x", *p);
		else
			put(l, (const char *) p, 1);
	}
	puts_(l, "\"");
}

/* put_text_value appends a key=value value, quoted when it needs to be. */
static void
put_text_value(line *l, const char *s)
{
	bool plain = *s != '\0';

	for (const unsigned char *p = (const unsigned char *) s; *p && plain; p++)
		plain = *p > 0x20 && *p != 0x7f && *p != '"' && *p != '\\' && *p != '=';
	if (plain)
	{
		puts_(l, s);
		return;
	}
	put_json_str(l, s); /* the same escapes read well in text */
}

static void
begin(line *l, const char *level)
{
	char			ts[32];
	struct timespec now;
	struct tm		tm;

	l->len = 0;
	clock_gettime(CLOCK_REALTIME, &now);
	gmtime_r(&now.tv_sec, &tm);
	strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%S", &tm);
	if (log_json)
		putf(l, "{\"ts\":\"%s.%03ldZ\",\"level\":\"%s\",\"msg\":", ts, now.tv_nsec / 1000000,
			 level);
	else
		putf(l, "%s.%03ldZ %s ", ts, now.tv_nsec / 1000000, level);
}

/* field appends key=value (text) or ,"key":"value" (json); NULL or "" is left out. */
static void
field(line *l, const char *key, const char *value)
{
	if (!value || !*value)
		return;
	if (log_json)
	{
		putf(l, ",\"%s\":", key);
		put_json_str(l, value);
	}
	else
	{
		putf(l, " %s=", key);
		put_text_value(l, value);
	}
}

static void
field_num(line *l, const char *key, const char *num)
{
	if (log_json)
		putf(l, ",\"%s\":%s", key, num);
	else
		putf(l, " %s=%s", key, num);
}

static void
finish(line *l)
{
	ssize_t w;
	size_t	off = 0;

	if (log_json)
		puts_(l, "}");
	l->buf[l->len++] = '\n';
	while (off < l->len && (w = write(STDERR_FILENO, l->buf + off, l->len - off)) > 0)
		off += (size_t) w;
}

/* ---- the two kinds of lines -------------------------------------------------- */

void
srv_log(const char *level, const char *fmt, ...)
{
	char	msg[SRV_LOG_MAX];
	line	l;
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	begin(&l, level);
	if (log_json)
		put_json_str(&l, msg);
	else
		puts_(&l, msg);
	finish(&l);
}

void
srv_log_request(const srv_request_log *r)
{
	line l;
	char num[32];

	begin(&l, r->status >= 500 ? "WARNING" : "LOG");
	if (log_json)
	{
		puts_(&l, "\"request\"");
		field(&l, "method", r->method);
		field(&l, "path", r->path);
	}
	else
	{
		/* the request line first, as an access log reads */
		puts_(&l, "request ");
		put_text_value(&l, r->method ? r->method : "?");
		puts_(&l, " ");
		put_text_value(&l, r->path ? r->path : "?");
	}
	field(&l, "route", r->route);
	snprintf(num, sizeof num, "%d", r->status);
	field_num(&l, "status", num);
	snprintf(num, sizeof num, "%.1f", r->ms);
	field_num(&l, "ms", num);
	field(&l, "role", r->role);
	field(&l, "database", r->database);
	field(&l, "client", r->client);
	field(&l, "error", r->error);
	field(&l, "detail", r->detail);
	if (r->closed_early)
		field(&l, "note", "the client closed the connection before the answer was sent");
	finish(&l);
}
