/*
 * clock.c — replica identity (UUIDv7), the hybrid logical clock, and the
 * compact row clock blob.
 *
 * HLC. A stamp is a uint64: Unix milliseconds << 16 | logical counter. A local
 * write takes pgs_hlc_tick(last) = max(now, last + 1); a local write of a cell
 * additionally takes max(tick, cell's stamp + 1) (done by the engines), so an
 * edit made after seeing another edit of the same cell always beats it, even
 * when the wall clock went backwards.
 *
 * Clock skew policy. A remote stamp far in the future (a device with a wrong
 * clock) is accepted as it is for the merge: refusing it would block that
 * device's changes forever, and rewriting it would break convergence. What we
 * refuse is to let it drag our own clock: pgs_hlc_receive advances the local
 * HLC only up to now + PGS_HLC_MAX_DRIFT_MS (5 minutes). The consequence,
 * documented in docs/DESIGN.md: a cell written with a future stamp wins
 * concurrent edits until the real time passes it, but any later local edit of
 * that very cell still beats it (cell stamp + 1). Stamps past year ~6400
 * (physical part >= 2^47 ms) or equal to 0 are malformed and refused, and
 * never made here: a wall clock past that range is ignored (the clock then
 * moves logically), and a persisted clock past it (written by a build
 * without this rule) is repaired by the engines (sl_clock.c).
 *
 * Row clock blob (stored beside each row, never sent as is):
 *   varint cl_ver, varint cl_site,
 *   then runs until the end: varint start_delta (first column - end of the
 *   previous run), varint count (>= 1), varint ver, 8-byte LE hlc, varint site.
 * A run is a range of consecutive columns with the same stamp; a freshly
 * inserted row has one run, so its blob is about 18 bytes whatever its width.
 */
#include "pgsync.h"

#include <errno.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

pgs_rc
pgs_uuid7(uint8_t out[16], pgs_err *err)
{
	uint64_t ms = pgs_now_ms();
	size_t	 got = 0;

	while (got < 10)
	{
		ssize_t n = getrandom(out + 6 + got, 10 - got, 0);

		if (n < 0)
		{
			if (errno == EINTR)
				continue;
			return pgs_fail(err, PGS_ERR_DB, "could not read random bytes for a UUID",
							strerror(errno), NULL);
		}
		got += (size_t) n;
	}
	for (int i = 0; i < 6; i++)
		out[i] = (uint8_t) (ms >> (40 - 8 * i));
	out[6] = (uint8_t) (0x70 | (out[6] & 0x0f)); /* version 7 */
	out[8] = (uint8_t) (0x80 | (out[8] & 0x3f)); /* RFC 4122 variant */
	return PGS_OK;
}

uint64_t
pgs_random64(void)
{
	uint64_t v = 0;
	size_t	 got = 0;

	while (got < sizeof v)
	{
		ssize_t n = getrandom((uint8_t *) &v + got, sizeof v - got, 0);

		if (n < 0 && errno != EINTR)
			return v ^ pgs_now_ms(); /* no entropy source: still unpredictable enough */
		if (n > 0)
			got += (size_t) n;
	}
	return v;
}

void
pgs_uuid_format(const uint8_t u[16], char out[37])
{
	static const char hex[] = "0123456789abcdef";
	int				  o = 0;

	for (int i = 0; i < 16; i++)
	{
		if (i == 4 || i == 6 || i == 8 || i == 10)
			out[o++] = '-';
		out[o++] = hex[u[i] >> 4];
		out[o++] = hex[u[i] & 15];
	}
	out[o] = '\0';
}

static int
hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

bool
pgs_uuid_parse(const char *s, size_t len, uint8_t out[16])
{
	int b = 0;

	if (len != 36)
		return false;
	for (size_t i = 0; i < 36;)
	{
		int hi, lo;

		if (i == 8 || i == 13 || i == 18 || i == 23)
		{
			if (s[i] != '-')
				return false;
			i++;
			continue;
		}
		hi = hexval(s[i]);
		lo = hexval(s[i + 1]);
		if (hi < 0 || lo < 0)
			return false;
		out[b++] = (uint8_t) (hi << 4 | lo);
		i += 2;
	}
	return b == 16;
}

uint64_t
pgs_now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (uint64_t) ts.tv_sec * 1000 + (uint64_t) ts.tv_nsec / 1000000;
}

uint64_t
pgs_hlc_tick(uint64_t last, uint64_t now_ms)
{
	uint64_t now = now_ms <= PGS_HLC_MAX_MS ? pgs_hlc_from_ms(now_ms) : 0;
	uint64_t next = now > last ? now : last + 1;

	return next > PGS_HLC_MAX || next < last ? PGS_HLC_MAX : next;
}

uint64_t
pgs_hlc_receive(uint64_t last, uint64_t remote, uint64_t now_ms)
{
	uint64_t bound = pgs_hlc_from_ms(now_ms + PGS_HLC_MAX_DRIFT_MS);

	if (remote > bound)
		remote = bound;
	return remote > last ? remote : last;
}

bool
pgs_hlc_valid(uint64_t hlc)
{
	return hlc != 0 && (hlc >> PGS_HLC_LOGICAL_BITS) < (UINT64_C(1) << 47);
}

/* ---- row clock blob ---- */

int64_t
pgs_rowclock_max_ver(const pgs_rowclock *rc)
{
	int64_t v = rc->cl_ver;

	for (int i = 0; i < rc->ncols; i++)
		if (rc->cols[i].hlc && rc->cols[i].ver > v)
			v = rc->cols[i].ver;
	return v;
}

static bool
same_stamp(const pgs_stamp *a, const pgs_stamp *b)
{
	return a->hlc == b->hlc && a->ver == b->ver && a->site == b->site;
}

void
pgs_rowclock_encode(const pgs_rowclock *rc, pgs_buf *out)
{
	int		 prev_end = 0;
	uint8_t *p;

	/* room for the worst case once: two varints, then per run four and the HLC */
	if (!pgs_buf_reserve(out, (size_t) PGS_VARINT_MAX * (2 + 4 * (size_t) rc->ncols) +
								  8 * (size_t) rc->ncols))
		return;
	p = out->p + out->len;
	p += pgs_varint_put(p, (uint64_t) rc->cl_ver);
	p += pgs_varint_put(p, rc->cl_site);
	for (int i = 0; i < rc->ncols;)
	{
		const pgs_stamp *s = &rc->cols[i];
		int				 j = i + 1;

		if (s->hlc == 0)
		{
			i++;
			continue;
		}
		while (j < rc->ncols && same_stamp(&rc->cols[j], s))
			j++;
		p += pgs_varint_put(p, (uint64_t) (i - prev_end));
		p += pgs_varint_put(p, (uint64_t) (j - i));
		p += pgs_varint_put(p, (uint64_t) s->ver);
		for (int k = 0; k < 8; k++)
			*p++ = (uint8_t) (s->hlc >> (8 * k));
		p += pgs_varint_put(p, s->site);
		prev_end = j;
		i = j;
	}
	out->len = (size_t) (p - out->p);
}

pgs_rc
pgs_rowclock_decode(const uint8_t *p, size_t len, pgs_rowclock *rc, pgs_err *err)
{
	const uint8_t *end = p + len;
	uint64_t	   u, start, count, ver, site;
	uint64_t	   pos = 0;
	int			   n;

	for (int i = 0; i < rc->ncols; i++)
		rc->cols[i].hlc = 0, rc->cols[i].ver = 0, rc->cols[i].site = 0;
	if (!(n = pgs_varint_get(p, end, &u)) || u > INT64_MAX)
		goto bad;
	rc->cl_ver = (int64_t) u;
	p += n;
	if (!(n = pgs_varint_get(p, end, &u)) || u > UINT32_MAX)
		goto bad;
	rc->cl_site = (uint32_t) u;
	p += n;
	while (p < end)
	{
		uint64_t hlc = 0;

		if (!(n = pgs_varint_get(p, end, &start)))
			goto bad;
		p += n;
		if (!(n = pgs_varint_get(p, end, &count)) || count == 0)
			goto bad;
		p += n;
		if (!(n = pgs_varint_get(p, end, &ver)) || ver > INT64_MAX)
			goto bad;
		p += n;
		if (end - p < 8)
			goto bad;
		for (int k = 0; k < 8; k++)
			hlc |= (uint64_t) p[k] << (8 * k);
		p += 8;
		if (!(n = pgs_varint_get(p, end, &site)) || site > UINT32_MAX)
			goto bad;
		p += n;
		if (start > (uint64_t) rc->ncols || count > (uint64_t) rc->ncols ||
			pos + start + count > (uint64_t) rc->ncols)
			return pgs_fail(err, PGS_ERR_DB, "row clock has more columns than the table",
							"The table lost columns since sync_init was called.",
							"Call sync_init again after changing a synced table's columns.");
		pos += start;
		for (uint64_t k = 0; k < count; k++, pos++)
		{
			rc->cols[pos].hlc = hlc;
			rc->cols[pos].ver = (int64_t) ver;
			rc->cols[pos].site = (uint32_t) site;
		}
	}
	return PGS_OK;
bad:
	return pgs_fail(err, PGS_ERR_DB, "corrupt row clock",
					"A clock row of a synced table cannot be decoded.",
					"Run PRAGMA integrity_check; if the database is sound, report this as a bug.");
}

pgs_rc
pgs_rowclock_drop_col(const uint8_t *p, size_t len, int ncols, int col, pgs_buf *out, pgs_err *err)
{
	pgs_stamp	*st;
	pgs_rowclock rc;
	pgs_rc		 r;

	if (ncols <= 0 || col < 0 || col >= ncols)
		return pgs_failf(err, PGS_ERR_MISUSE, NULL, "column %d of %d cannot be dropped", col,
						 ncols);
	if (!(st = pgs_malloc(sizeof(pgs_stamp) * (size_t) ncols)))
		return pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
	rc.ncols = ncols;
	rc.cols = st;
	if ((r = pgs_rowclock_decode(p, len, &rc, err)) == PGS_OK)
	{
		memmove(st + col, st + col + 1, sizeof(pgs_stamp) * (size_t) (ncols - col - 1));
		rc.ncols = ncols - 1;
		pgs_rowclock_encode(&rc, out);
	}
	pgs_free(st);
	return r;
}
