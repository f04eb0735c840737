/*
 * cursor.c — pull cursors in the text form clients store and send back
 * (docs/PROTOCOL.md, "Cursors"; grammar in pgsync.h). The one place that
 * writes and parses them: the server hands them out and reads them, the
 * SQLite client only stores them. Parsing distrusts its input: digits are
 * bounded before they can overflow, hex is checked byte by byte, the length
 * is capped by PGS_MAX_CURSOR.
 */
#include "pgsync.h"

#include <stdio.h>
#include <string.h>

static bool
parse_num(const char **p, uint64_t max, uint64_t *out)
{
	uint64_t v = 0;
	int		 n = 0;

	while (**p >= '0' && **p <= '9' && n < 20)
	{
		uint64_t d = (uint64_t) (**p - '0');

		if (v > (max - d) / 10)
			return false;
		v = v * 10 + d;
		(*p)++;
		n++;
	}
	*out = v;
	return n > 0;
}

/* hex_digit: the value of a lower-case hex digit, else -1 (NUL included). */
static int
hex_digit(char ch)
{
	if (ch >= '0' && ch <= '9')
		return ch - '0';
	if (ch >= 'a' && ch <= 'f')
		return ch - 'a' + 10;
	return -1;
}

bool
pgs_cursor_parse(const char *s, pgs_cursor *c, uint8_t *buf)
{
	uint64_t v = 0, g = 0;
	bool	 chunk;

	memset(c, 0, sizeof *c);
	if (!s || strlen(s) > PGS_MAX_CURSOR)
		return false;
	chunk = *s == 'c';
	if (chunk)
		s++;
	if (!parse_num(&s, INT64_MAX, &v))
		return false;
	c->since = (int64_t) v;
	if (*s == '.')
	{
		s++;
		if (!parse_num(&s, INT32_MAX, &g))
			return false;
		c->gen = (int32_t) g;
	}
	if (!chunk)
		return *s == '\0';
	if (*s++ != '.')
		return false;
	for (size_t n = 0;; n++)
	{
		int hi, lo;

		if (s[0] == '\0')
		{
			c->sealed = buf;
			c->sealed_len = n;
			return n > 0;
		}
		if (n >= PGS_MAX_SEALED)
			return false;
		hi = hex_digit(s[0]);
		lo = hex_digit(s[1]);
		if (hi < 0 || lo < 0)
			return false;
		buf[n] = (uint8_t) (hi << 4 | lo);
		s += 2;
	}
}

void
pgs_cursor_format(pgs_buf *out, int64_t since, int32_t gen, const uint8_t *sealed,
				  size_t sealed_len)
{
	static const char hx[] = "0123456789abcdef";
	char			  num[48];
	int				  n;

	out->len = 0;
	n = sealed ? snprintf(num, sizeof num, "c%lld.%d.", (long long) since, (int) gen)
		: gen  ? snprintf(num, sizeof num, "%lld.%d", (long long) since, (int) gen)
			   : snprintf(num, sizeof num, "%lld", (long long) since);
	pgs_buf_put(out, num, (size_t) n);
	for (size_t i = 0; sealed && i < sealed_len; i++)
	{
		pgs_buf_u8(out, (uint8_t) hx[sealed[i] >> 4]);
		pgs_buf_u8(out, (uint8_t) hx[sealed[i] & 15]);
	}
	pgs_buf_u8(out, 0);
	if (!out->oom)
		out->len--; /* the NUL is there but not counted */
}
