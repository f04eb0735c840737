/*
 * util.c — errors, allocator hooks, growable buffers and varints.
 *
 * Varints are unsigned LEB128: seven bits per byte, least significant group
 * first, high bit set on every byte but the last. A 64-bit value takes at
 * most ten bytes; the tenth may only hold the value's top bit, and a varint
 * longer than needed for its value is still accepted (it decodes the same).
 */
#include "pgsync.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- errors ---- */

static void
copy_str(char *dst, size_t cap, const char *src)
{
	if (!src)
	{
		dst[0] = '\0';
		return;
	}
	snprintf(dst, cap, "%s", src);
}

pgs_rc
pgs_fail(pgs_err *err, pgs_rc rc, const char *msg, const char *detail, const char *hint)
{
	if (err)
	{
		err->rc = rc;
		err->code[0] = '\0';
		copy_str(err->msg, sizeof err->msg, msg);
		copy_str(err->detail, sizeof err->detail, detail);
		copy_str(err->hint, sizeof err->hint, hint);
	}
	return rc;
}

pgs_rc
pgs_failf(pgs_err *err, pgs_rc rc, const char *hint, const char *fmt, ...)
{
	if (err)
	{
		va_list ap;

		va_start(ap, fmt);
		vsnprintf(err->msg, sizeof err->msg, fmt, ap);
		va_end(ap);
		err->rc = rc;
		err->code[0] = '\0';
		err->detail[0] = '\0';
		copy_str(err->hint, sizeof err->hint, hint);
	}
	return rc;
}

void
pgs_err_code(pgs_err *err, const char *code)
{
	if (err)
		copy_str(err->code, sizeof err->code, code);
}

void
pgs_err_detailf(pgs_err *err, const char *fmt, ...)
{
	va_list ap;

	if (!err)
		return;
	va_start(ap, fmt);
	vsnprintf(err->detail, sizeof err->detail, fmt, ap);
	va_end(ap);
}

/* utf8_char: length of the valid UTF-8 sequence at p (no NUL), 0 if invalid */
static size_t
utf8_char(const uint8_t *p, size_t len)
{
	uint32_t c;
	size_t	 n;

	if (len == 0 || p[0] == 0)
		return 0;
	if (p[0] < 0x80)
		return 1;
	if (p[0] >= 0xc2 && p[0] <= 0xdf)
		n = 2, c = p[0] & 0x1f;
	else if (p[0] >= 0xe0 && p[0] <= 0xef)
		n = 3, c = p[0] & 0x0f;
	else if (p[0] >= 0xf0 && p[0] <= 0xf4)
		n = 4, c = p[0] & 0x07;
	else
		return 0;
	if (len < n)
		return 0;
	for (size_t i = 1; i < n; i++)
	{
		if ((p[i] & 0xc0) != 0x80)
			return 0;
		c = c << 6 | (p[i] & 0x3f);
	}
	if ((n == 3 && (c < 0x800 || (c >= 0xd800 && c <= 0xdfff))) ||
		(n == 4 && (c < 0x10000 || c > 0x10ffff)))
		return 0;
	return n;
}

bool
pgs_utf8_valid(const uint8_t *p, size_t len)
{
	while (len > 0)
	{
		size_t n = utf8_char(p, len);

		if (n == 0)
			return false;
		p += n;
		len -= n;
	}
	return true;
}

const char *
pgs_name_for_msg(char out[72], const uint8_t *name, size_t len)
{
	size_t o = 0;

	while (len > 0 && o < 60)
	{
		size_t n = utf8_char(name, len);

		if (n == 0)
		{
			out[o++] = '?';
			n = 1;
		}
		else if (o + n > 60)
			break;
		else
		{
			memcpy(out + o, name, n);
			o += n;
		}
		name += n;
		len -= n;
	}
	if (len > 0)
	{
		memcpy(out + o, "...", 3);
		o += 3;
	}
	out[o] = '\0';
	return out;
}

/* ---- memory ---- */

static pgs_allocator alloc = {malloc, realloc, free};

void
pgs_set_allocator(const pgs_allocator *a)
{
	if (a)
		alloc = *a;
	else
	{
		alloc.malloc_fn = malloc;
		alloc.realloc_fn = realloc;
		alloc.free_fn = free;
	}
}

void *
pgs_malloc(size_t n)
{
	return alloc.malloc_fn(n ? n : 1);
}

void *
pgs_realloc(void *p, size_t n)
{
	if (!p)
		return pgs_malloc(n);
	return alloc.realloc_fn(p, n ? n : 1);
}

void
pgs_free(void *p)
{
	if (p)
		alloc.free_fn(p);
}

/* ---- buffers ---- */

void
pgs_buf_init(pgs_buf *b)
{
	memset(b, 0, sizeof *b);
}

void
pgs_buf_free(pgs_buf *b)
{
	pgs_free(b->p);
	pgs_buf_init(b);
}

bool
pgs_buf_reserve(pgs_buf *b, size_t extra)
{
	size_t	 need;
	size_t	 cap;
	uint8_t *p;

	if (b->oom)
		return false;
	if (extra > SIZE_MAX - b->len)
	{
		b->oom = true;
		return false;
	}
	need = b->len + extra;
	if (need <= b->cap)
		return true;
	cap = b->cap ? b->cap : 256;
	while (cap < need)
		cap = cap > SIZE_MAX / 2 ? need : cap * 2;
	p = pgs_realloc(b->p, cap);
	if (!p)
	{
		b->oom = true;
		return false;
	}
	b->p = p;
	b->cap = cap;
	return true;
}

void
pgs_buf_put(pgs_buf *b, const void *src, size_t n)
{
	if (n == 0 || !pgs_buf_reserve(b, n))
		return;
	memcpy(b->p + b->len, src, n);
	b->len += n;
}

void
pgs_buf_u8(pgs_buf *b, uint8_t v)
{
	if (!pgs_buf_reserve(b, 1))
		return;
	b->p[b->len++] = v;
}

void
pgs_buf_varint(pgs_buf *b, uint64_t v)
{
	if (!pgs_buf_reserve(b, PGS_VARINT_MAX))
		return;
	b->len += pgs_varint_put(b->p + b->len, v);
}

void
pgs_buf_svarint(pgs_buf *b, int64_t v)
{
	pgs_buf_varint(b, pgs_zigzag(v));
}

/* ---- varints ---- */

int
pgs_varint_put(uint8_t *out, uint64_t v)
{
	int n = 0;

	while (v >= 0x80)
	{
		out[n++] = (uint8_t) (v | 0x80);
		v >>= 7;
	}
	out[n++] = (uint8_t) v;
	return n;
}

int
pgs_varint_get(const uint8_t *p, const uint8_t *end, uint64_t *v)
{
	uint64_t r = 0;
	int		 shift = 0;
	int		 n = 0;

	/* fast path: one byte */
	if (p < end && p[0] < 0x80)
	{
		*v = p[0];
		return 1;
	}
	while (p + n < end && n < PGS_VARINT_MAX)
	{
		uint8_t byte = p[n++];

		if (n == PGS_VARINT_MAX && byte > 1)
			return 0; /* would overflow 64 bits */
		r |= (uint64_t) (byte & 0x7f) << shift;
		if (byte < 0x80)
		{
			*v = r;
			return n;
		}
		shift += 7;
	}
	return 0; /* truncated or too long */
}

long
pgs_b64url_decode(const char *in, size_t n, uint8_t *out, size_t cap)
{
	uint32_t acc = 0;
	int		 bits = 0;
	size_t	 k = 0;

	for (size_t i = 0; i < n; i++)
	{
		int c = (unsigned char) in[i], v;

		if (c >= 'A' && c <= 'Z')
			v = c - 'A';
		else if (c >= 'a' && c <= 'z')
			v = c - 'a' + 26;
		else if (c >= '0' && c <= '9')
			v = c - '0' + 52;
		else if (c == '-' || c == '+')
			v = 62;
		else if (c == '_' || c == '/')
			v = 63;
		else if (c == '=')
			break;
		else
			return -1;
		acc = (acc << 6) | (uint32_t) v;
		bits += 6;
		if (bits >= 8)
		{
			bits -= 8;
			if (k >= cap)
				return -1;
			out[k++] = (uint8_t) (acc >> bits);
		}
	}
	return (long) k;
}

bool
pgs_site_listed(const uint8_t *list, size_t n, const uint8_t *site)
{
	for (size_t k = 0; k < n; k++)
		if (memcmp(list + PGS_SITE_LEN * k, site, PGS_SITE_LEN) == 0)
			return true;
	return false;
}
