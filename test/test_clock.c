/*
 * test_clock.c — replica identity, the hybrid logical clock and the row
 * clock blob (core/clock.c).
 *
 * HLC: a tick is strictly after the last stamp and not before now, also when
 * the wall clock goes backwards; a received stamp moves the local clock
 * forward but never past now + PGS_HLC_MAX_DRIFT_MS (the skew policy of
 * clock.c's header), and the next tick is still after it.
 * UUIDv7: version 7, RFC 4122 variant, big-endian millisecond prefix.
 * Row clock blob: round trips (runs of equal stamps, holes, many columns),
 * and every malformed blob is refused rather than misread.
 * Local edits of a key without a clock after a GC start above the floor.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "mockdb.h"

#include <ctype.h>
#include <string.h>
#include <time.h>

static int
setup(void **state)
{
	(void) state;
	mock_test_allocator();
	return 0;
}

#define MS0 UINT64_C(1700000000000) /* 2023-11-14 */

/* ---- HLC ---- */

static void
test_hlc_layout(void **state)
{
	(void) state;
	assert_true(pgs_hlc_from_ms(1) == 65536);
	assert_true(pgs_hlc_from_ms(MS0) >> PGS_HLC_LOGICAL_BITS == MS0);
	assert_true((pgs_hlc_from_ms(MS0) & 0xffff) == 0);
	/* stamps compare as integers: a later ms beats any counter */
	assert_true(pgs_hlc_from_ms(MS0 + 1) > pgs_hlc_from_ms(MS0) + 0xffff);
	/* pgs_now_ms is a plausible Unix time in ms */
	assert_true(pgs_now_ms() > MS0);
	assert_true(pgs_now_ms() < UINT64_C(1) << 47);
}

static void
test_hlc_tick_monotonic(void **state)
{
	uint64_t last = 0;
	uint64_t now = MS0;
	uint64_t x = 88172645463325252ull;

	(void) state;
	for (int i = 0; i < 100000; i++)
	{
		uint64_t t;

		/* the wall clock mostly advances, sometimes stalls, sometimes jumps back */
		x ^= x << 13, x ^= x >> 7, x ^= x << 17;
		switch (x % 4)
		{
			case 0:
				break;
			case 1:
				now += x % 50;
				break;
			case 2:
				now -= x % 3000;
				break;
			default:
				now += 1;
		}
		t = pgs_hlc_tick(last, now);
		assert_true(t > last);
		assert_true(t >= pgs_hlc_from_ms(now));
		/* it takes now when now is ahead, else last + 1 */
		assert_true(t == (pgs_hlc_from_ms(now) > last ? pgs_hlc_from_ms(now) : last + 1));
		last = t;
	}
}

static void
test_hlc_tick_clock_backwards(void **state)
{
	uint64_t a, b, c;

	(void) state;
	a = pgs_hlc_tick(0, MS0);
	assert_true(a == pgs_hlc_from_ms(MS0));
	/* same millisecond: the logical counter moves */
	b = pgs_hlc_tick(a, MS0);
	assert_true(b == a + 1);
	/* the wall clock jumps back an hour: still strictly after */
	c = pgs_hlc_tick(b, MS0 - 3600 * 1000);
	assert_true(c == b + 1);
	/* and the physical part does not go back */
	assert_true(c >> PGS_HLC_LOGICAL_BITS == MS0);
	/* when the wall clock catches up it takes over again */
	assert_true(pgs_hlc_tick(c, MS0 + 10) == pgs_hlc_from_ms(MS0 + 10));
}

static void
test_hlc_tick_year_7000(void **state)
{
	uint64_t y7000 = UINT64_C(7000 - 1970) * 365 * 86400 * 1000;
	uint64_t a;

	(void) state;
	/* a wall clock past the format's range is ignored: the clock moves logically */
	a = pgs_hlc_tick(0, y7000);
	assert_true(a == 1);
	a = pgs_hlc_tick(pgs_hlc_from_ms(MS0), y7000);
	assert_true(a == pgs_hlc_from_ms(MS0) + 1);
	assert_true(pgs_hlc_tick(0, PGS_HLC_MAX_MS) == pgs_hlc_from_ms(PGS_HLC_MAX_MS));
	assert_true(pgs_hlc_tick(0, PGS_HLC_MAX_MS + 1) == 1);
	/* and never runs past the largest stamp a peer accepts */
	assert_true(pgs_hlc_tick(PGS_HLC_MAX, MS0) == PGS_HLC_MAX);
	assert_true(pgs_hlc_tick(PGS_HLC_MAX + 5, MS0) == PGS_HLC_MAX);
	assert_true(pgs_hlc_tick(UINT64_MAX, MS0) == PGS_HLC_MAX);
	assert_true(pgs_hlc_tick(PGS_HLC_MAX - 1, y7000) == PGS_HLC_MAX);
}

static void
test_hlc_receive_bound(void **state)
{
	uint64_t now = MS0;
	uint64_t last = pgs_hlc_from_ms(now);
	uint64_t bound = pgs_hlc_from_ms(now + PGS_HLC_MAX_DRIFT_MS);
	uint64_t r;

	(void) state;
	assert_int_equal(PGS_HLC_MAX_DRIFT_MS, 5 * 60 * 1000);
	/* an older remote stamp does not move the clock */
	assert_true(pgs_hlc_receive(last, last - 100, now) == last);
	assert_true(pgs_hlc_receive(last, 1, now) == last);
	/* a newer one within the bound is taken as is */
	assert_true(pgs_hlc_receive(last, last + 7, now) == last + 7);
	assert_true(pgs_hlc_receive(last, bound, now) == bound);
	assert_true(pgs_hlc_receive(last, bound - 1, now) == bound - 1);
	/* a remote clock a year ahead drags us only to now + 5 minutes */
	r = pgs_hlc_receive(last, pgs_hlc_from_ms(now + 365ull * 86400 * 1000), now);
	assert_true(r == bound);
	assert_true(pgs_hlc_receive(last, bound + 1, now) == bound);
	assert_true(pgs_hlc_receive(last, (UINT64_C(1) << 63) - 1, now) == bound);
	/* the next local tick is after the bounded stamp, and near now */
	assert_true(pgs_hlc_tick(r, now) == bound + 1);
	/* a local clock already past the bound is never moved back */
	assert_true(pgs_hlc_receive(bound + 500, pgs_hlc_from_ms(now + 10 * PGS_HLC_MAX_DRIFT_MS),
								now) == bound + 500);
	/* the bound follows now */
	assert_true(pgs_hlc_receive(0, UINT64_C(1) << 62, now + 1000) ==
				pgs_hlc_from_ms(now + 1000 + PGS_HLC_MAX_DRIFT_MS));
}

static void
test_hlc_valid(void **state)
{
	uint64_t max_ms = (UINT64_C(1) << 47) - 1;

	(void) state;
	assert_false(pgs_hlc_valid(0));
	assert_true(pgs_hlc_valid(1));
	assert_true(pgs_hlc_valid(pgs_hlc_from_ms(MS0)));
	assert_true(pgs_hlc_valid(pgs_hlc_from_ms(pgs_now_ms())));
	assert_true(pgs_hlc_valid(pgs_hlc_from_ms(max_ms) | 0xffff));
	assert_false(pgs_hlc_valid(pgs_hlc_from_ms(max_ms + 1)));
	assert_false(pgs_hlc_valid(UINT64_C(1) << 63));
	assert_false(pgs_hlc_valid(UINT64_MAX));
}

/* ---- UUIDv7 ---- */

static uint64_t
uuid_ms(const uint8_t u[16])
{
	uint64_t ms = 0;

	for (int i = 0; i < 6; i++)
		ms = ms << 8 | u[i];
	return ms;
}

static void
test_uuid7_format(void **state)
{
	uint8_t prev[16] = {0};

	(void) state;
	for (int i = 0; i < 200; i++)
	{
		uint8_t	 u[16];
		uint64_t before = pgs_now_ms(), after;
		pgs_err	 err;

		assert_int_equal(pgs_uuid7(u, &err), PGS_OK);
		after = pgs_now_ms();
		assert_int_equal(u[6] >> 4, 7); /* version */
		assert_int_equal(u[8] >> 6, 2); /* variant 10xx */
		assert_true(uuid_ms(u) >= before && uuid_ms(u) <= after);
		/* the time prefix never goes back, and two ids differ */
		assert_true(uuid_ms(u) >= uuid_ms(prev));
		assert_memory_not_equal(u, prev, 16);
		memcpy(prev, u, 16);
	}
}

static void
test_uuid7_time_ordering(void **state)
{
	uint8_t			a[16], b[16];
	struct timespec ts = {0, 3 * 1000 * 1000};

	(void) state;
	assert_int_equal(pgs_uuid7(a, NULL), PGS_OK);
	nanosleep(&ts, NULL);
	assert_int_equal(pgs_uuid7(b, NULL), PGS_OK);
	/* ids made in later milliseconds sort after, as bytes and as text */
	assert_true(uuid_ms(b) > uuid_ms(a));
	assert_true(memcmp(b, a, 16) > 0);
	{
		char sa[37], sb[37];

		pgs_uuid_format(a, sa);
		pgs_uuid_format(b, sb);
		assert_true(strcmp(sb, sa) > 0);
	}
}

static void
test_uuid_roundtrip(void **state)
{
	static const uint8_t fixed[16] = {0x01, 0x8c, 0xcd, 0x1f, 0x2b, 0x3a, 0x7d, 0x4e,
									  0x9f, 0x00, 0xff, 0x10, 0xab, 0xcd, 0xef, 0x99};
	char				 s[37];
	uint8_t				 back[16];

	(void) state;
	pgs_uuid_format(fixed, s);
	assert_string_equal(s, "018ccd1f-2b3a-7d4e-9f00-ff10abcdef99");
	assert_true(pgs_uuid_parse(s, 36, back));
	assert_memory_equal(back, fixed, 16);
	/* any case */
	assert_true(pgs_uuid_parse("018CCD1F-2B3A-7D4E-9F00-FF10ABCDEF99", 36, back));
	assert_memory_equal(back, fixed, 16);
	assert_true(pgs_uuid_parse("018cCd1F-2b3A-7D4e-9f00-Ff10aBcDeF99", 36, back));
	assert_memory_equal(back, fixed, 16);
	/* random ids */
	for (int i = 0; i < 100; i++)
	{
		uint8_t u[16];

		assert_int_equal(pgs_uuid7(u, NULL), PGS_OK);
		pgs_uuid_format(u, s);
		assert_int_equal(strlen(s), 36);
		for (int k = 0; k < 36; k++)
		{
			if (k == 8 || k == 13 || k == 18 || k == 23)
				assert_int_equal(s[k], '-');
			else
				assert_true(isxdigit((unsigned char) s[k]) && !isupper((unsigned char) s[k]));
		}
		assert_true(pgs_uuid_parse(s, 36, back));
		assert_memory_equal(back, u, 16);
	}
	/* every byte value in every position */
	for (int pos = 0; pos < 16; pos++)
		for (int v = 0; v < 256; v++)
		{
			uint8_t u[16];

			memcpy(u, fixed, 16);
			u[pos] = (uint8_t) v;
			pgs_uuid_format(u, s);
			assert_true(pgs_uuid_parse(s, 36, back));
			assert_memory_equal(back, u, 16);
		}
}

static void
test_uuid_parse_rejects(void **state)
{
	const char *good = "018ccd1f-2b3a-7d4e-9f00-ff10abcdef99";
	uint8_t		out[16];
	char		s[64];

	(void) state;
	assert_false(pgs_uuid_parse(good, 35, out));
	assert_false(pgs_uuid_parse(good, 0, out));
	assert_false(pgs_uuid_parse("018ccd1f-2b3a-7d4e-9f00-ff10abcdef999", 37, out));
	assert_false(pgs_uuid_parse("018ccd1f2b3a7d4e9f00ff10abcdef99", 32, out));
	assert_false(pgs_uuid_parse("{018ccd1f-2b3a-7d4e-9f00-ff10abcdef9}", 36, out));
	/* every position: a dash where a digit belongs, a digit where a dash
	 * belongs, non-hex characters, NUL */
	for (int k = 0; k < 36; k++)
	{
		static const char bad[] = {'g', 'G', 'x', ' ', '\0', ':', '/', '@', '`', '-', '0'};

		for (size_t b = 0; b < sizeof bad; b++)
		{
			bool dashpos = k == 8 || k == 13 || k == 18 || k == 23;

			if (dashpos ? bad[b] == '-' : bad[b] == '0')
				continue; /* that one is valid */
			memcpy(s, good, 37);
			s[k] = bad[b];
			assert_false(pgs_uuid_parse(s, 36, out));
		}
	}
	/* dashes shifted */
	assert_false(pgs_uuid_parse("018ccd1-f2b3a-7d4e-9f00-ff10abcdef99", 36, out));
	assert_false(pgs_uuid_parse("018ccd1f-2b3a-7d4e-9f00f-f10abcdef99", 36, out));
}

/* ---- row clock blob ---- */

static void
assert_clock_equal(const pgs_rowclock *a, const pgs_rowclock *b)
{
	assert_true(a->cl_ver == b->cl_ver);
	assert_int_equal(a->cl_site, b->cl_site);
	assert_int_equal(a->ncols, b->ncols);
	for (int i = 0; i < a->ncols; i++)
	{
		assert_true(a->cols[i].hlc == b->cols[i].hlc);
		if (a->cols[i].hlc)
		{
			assert_true(a->cols[i].ver == b->cols[i].ver);
			assert_int_equal(a->cols[i].site, b->cols[i].site);
		}
	}
}

static void
roundtrip_clock(const pgs_rowclock *in, size_t *len_out)
{
	pgs_buf		 b;
	pgs_stamp	*cols = test_malloc(sizeof(pgs_stamp) * (size_t) (in->ncols + 1));
	pgs_rowclock out = {.ncols = in->ncols, .cols = cols};
	pgs_err		 err;

	/* garbage in the destination must be overwritten */
	memset(cols, 0x5a, sizeof(pgs_stamp) * (size_t) (in->ncols + 1));
	pgs_buf_init(&b);
	pgs_rowclock_encode(in, &b);
	assert_false(b.oom);
	assert_int_equal(pgs_rowclock_decode(b.p, b.len, &out, &err), PGS_OK);
	assert_clock_equal(in, &out);
	assert_true(pgs_rowclock_max_ver(in) == pgs_rowclock_max_ver(&out));
	/* decoding is stable: re-encoding gives the same bytes */
	{
		pgs_buf b2;

		pgs_buf_init(&b2);
		pgs_rowclock_encode(&out, &b2);
		assert_int_equal(b2.len, b.len);
		assert_memory_equal(b2.p, b.p, b.len);
		pgs_buf_free(&b2);
	}
	if (len_out)
		*len_out = b.len;
	pgs_buf_free(&b);
	test_free(cols);
}

static void
test_rowclock_empty(void **state)
{
	pgs_rowclock rc = {.cl = 2, .cl_ver = 9, .cl_site = 3, .ncols = 0, .cols = NULL};
	pgs_stamp	 cols[4];
	size_t		 len;

	(void) state;
	roundtrip_clock(&rc, &len);
	assert_int_equal(len, 2); /* cl_ver, cl_site */
	/* a tombstone blob (no column) decodes into any width with no stamps */
	{
		pgs_buf		 b;
		pgs_rowclock out = {.ncols = 4, .cols = cols};

		pgs_buf_init(&b);
		pgs_rowclock_encode(&rc, &b);
		memset(cols, 0x77, sizeof cols);
		assert_int_equal(pgs_rowclock_decode(b.p, b.len, &out, NULL), PGS_OK);
		for (int i = 0; i < 4; i++)
			assert_true(cols[i].hlc == 0 && cols[i].ver == 0 && cols[i].site == 0);
		assert_true(out.cl_ver == 9);
		assert_true(pgs_rowclock_max_ver(&out) == 9);
		pgs_buf_free(&b);
	}
	/* a width with every column unstamped is the same as no column */
	{
		pgs_stamp	 z[3] = {{0}};
		pgs_rowclock r3 = {.cl_ver = 9, .cl_site = 3, .ncols = 3, .cols = z};

		roundtrip_clock(&r3, &len);
		assert_int_equal(len, 2);
	}
}

static void
test_rowclock_one_run(void **state)
{
	pgs_stamp	 s[50];
	pgs_rowclock rc = {.cl = 1, .cl_ver = 300, .cl_site = 0, .ncols = 50, .cols = s};
	size_t		 len;

	(void) state;
	for (int i = 0; i < 50; i++)
		s[i] = (pgs_stamp){pgs_hlc_from_ms(MS0) + 3, 300, 0};
	roundtrip_clock(&rc, &len);
	/* cl_ver(2) cl_site(1) start(1) count(1) ver(2) hlc(8) site(1) */
	assert_int_equal(len, 16);
	/* the width does not change the size of one run (as long as count fits a byte) */
	rc.ncols = 3;
	roundtrip_clock(&rc, &len);
	assert_int_equal(len, 16);
}

static void
test_rowclock_sparse(void **state)
{
	pgs_stamp	 s[10] = {{0}};
	pgs_rowclock rc = {.cl = 3, .cl_ver = 4, .cl_site = 2, .ncols = 10, .cols = s};

	(void) state;
	s[3] = (pgs_stamp){pgs_hlc_from_ms(MS0), 5, 1};
	s[7] = (pgs_stamp){pgs_hlc_from_ms(MS0) + 9, 8, 4};
	roundtrip_clock(&rc, NULL);
	assert_true(pgs_rowclock_max_ver(&rc) == 8);
	/* last column only */
	memset(s, 0, sizeof s);
	s[9] = (pgs_stamp){1, 2, 3};
	roundtrip_clock(&rc, NULL);
	/* first column only */
	memset(s, 0, sizeof s);
	s[0] = (pgs_stamp){1, 2, 3};
	roundtrip_clock(&rc, NULL);
	/* adjacent columns that differ only in ver or only in site are separate runs */
	memset(s, 0, sizeof s);
	s[0] = (pgs_stamp){100, 2, 3};
	s[1] = (pgs_stamp){100, 3, 3};
	s[2] = (pgs_stamp){100, 3, 4};
	s[3] = (pgs_stamp){101, 3, 4};
	roundtrip_clock(&rc, NULL);
	/* max_ver ignores unstamped columns' ver */
	memset(s, 0, sizeof s);
	s[5].ver = 999;
	assert_true(pgs_rowclock_max_ver(&rc) == 4);
}

static void
test_rowclock_many_columns(void **state)
{
	int			 n = 3000;
	pgs_stamp	*s = test_malloc(sizeof(pgs_stamp) * (size_t) n);
	pgs_rowclock rc = {.cl = 7, .cl_ver = 1, .cl_site = 70000, .ncols = n, .cols = s};
	uint64_t	 x = 1234567;

	(void) state;
	for (int i = 0; i < n; i++)
	{
		x ^= x << 13, x ^= x >> 7, x ^= x << 17;
		if (x % 5 == 0)
			s[i] = (pgs_stamp){0, 0, 0};
		else if (i > 0 && x % 5 == 1)
			s[i] = s[i - 1]; /* extends a run */
		else
			s[i] = (pgs_stamp){x >> 2, (int64_t) (x % 100000), (uint32_t) (x % 7)};
	}
	s[n - 1] = (pgs_stamp){UINT64_MAX, INT64_MAX, UINT32_MAX};
	roundtrip_clock(&rc, NULL);
	assert_true(pgs_rowclock_max_ver(&rc) == INT64_MAX);
	/* extremes in the header fields */
	rc.cl_ver = INT64_MAX;
	rc.cl_site = UINT32_MAX;
	roundtrip_clock(&rc, NULL);
	test_free(s);
}

/* a valid 3-column blob: two runs; returns its length, fills run ends */
static size_t
sample_blob(uint8_t *out, size_t *run_end, int *nruns)
{
	pgs_stamp	 s[3] = {{pgs_hlc_from_ms(MS0), 300, 1},
						 {pgs_hlc_from_ms(MS0), 300, 1},
						 {pgs_hlc_from_ms(MS0) + 1, 301, 2}};
	pgs_rowclock rc = {.cl = 1, .cl_ver = 300, .cl_site = 1, .ncols = 3, .cols = s};
	pgs_buf		 b;
	size_t		 len;

	pgs_buf_init(&b);
	pgs_rowclock_encode(&rc, &b);
	len = b.len;
	memcpy(out, b.p, len);
	pgs_buf_free(&b);
	/* header: cl_ver 300 (2 bytes) + cl_site (1); each run: start 1, count 1, ver 2, hlc 8, site 1
	 */
	*nruns = 3;
	run_end[0] = 3;
	run_end[1] = 3 + 13;
	run_end[2] = 3 + 26;
	assert_int_equal(len, run_end[2]);
	return len;
}

static pgs_rc
decode3(const uint8_t *p, size_t len)
{
	pgs_stamp	 s[3];
	pgs_rowclock rc = {.ncols = 3, .cols = s};
	pgs_err		 err;
	pgs_rc		 r = pgs_rowclock_decode(p, len, &rc, &err);

	if (r != PGS_OK)
	{
		assert_int_equal(err.rc, r);
		assert_true(err.msg[0] != '\0');
	}
	return r;
}

static void
test_rowclock_truncated(void **state)
{
	uint8_t blob[64];
	size_t	ends[3];
	int		nends;
	size_t	len = sample_blob(blob, ends, &nends);

	(void) state;
	assert_int_equal(decode3(blob, len), PGS_OK);
	for (size_t k = 0; k < len; k++)
	{
		bool boundary = false;

		for (int e = 0; e < nends; e++)
			boundary |= ends[e] == k;
		/* a prefix ending between runs is a valid (shorter) clock; any other
		 * prefix is refused */
		assert_int_equal(decode3(blob, k), boundary ? PGS_OK : PGS_ERR_DB);
	}
}

static void
put_run(pgs_buf *b, uint64_t start, uint64_t count, uint64_t ver, uint64_t hlc, uint64_t site)
{
	uint8_t le[8];

	pgs_buf_varint(b, start);
	pgs_buf_varint(b, count);
	pgs_buf_varint(b, ver);
	for (int k = 0; k < 8; k++)
		le[k] = (uint8_t) (hlc >> (8 * k));
	pgs_buf_put(b, le, 8);
	pgs_buf_varint(b, site);
}

static pgs_rc
decode_built(uint64_t cl_ver, uint64_t cl_site, int nruns, const uint64_t runs[][5])
{
	pgs_buf b;
	pgs_rc	r;

	pgs_buf_init(&b);
	pgs_buf_varint(&b, cl_ver);
	pgs_buf_varint(&b, cl_site);
	for (int i = 0; i < nruns; i++)
		put_run(&b, runs[i][0], runs[i][1], runs[i][2], runs[i][3], runs[i][4]);
	r = decode3(b.p, b.len);
	pgs_buf_free(&b);
	return r;
}

static void
test_rowclock_malformed(void **state)
{
	const uint64_t ok[][5] = {{0, 3, 1, 100, 0}};

	(void) state;
	assert_int_equal(decode3(NULL, 0), PGS_ERR_DB);
	assert_int_equal(decode3((const uint8_t *) "\x01", 1), PGS_ERR_DB);
	assert_int_equal(decode_built(1, 0, 1, ok), PGS_OK);
	/* header values out of range */
	assert_int_equal(decode_built(UINT64_C(1) << 63, 0, 1, ok), PGS_ERR_DB);
	assert_int_equal(decode_built(1, UINT64_C(1) << 32, 1, ok), PGS_ERR_DB);
	assert_int_equal(decode_built(1, UINT32_MAX, 1, ok), PGS_OK);
	{
		const uint64_t r[][5] = {{0, 0, 1, 100, 0}}; /* empty run */

		assert_int_equal(decode_built(1, 0, 1, r), PGS_ERR_DB);
	}
	{
		const uint64_t r[][5] = {{0, 4, 1, 100, 0}}; /* 4 columns in a 3-column table */

		assert_int_equal(decode_built(1, 0, 1, r), PGS_ERR_DB);
	}
	{
		const uint64_t r[][5] = {{3, 1, 1, 100, 0}}; /* starts past the end */

		assert_int_equal(decode_built(1, 0, 1, r), PGS_ERR_DB);
	}
	{
		const uint64_t r[][5] = {{2, 1, 1, 100, 0},
								 {0, 1, 1, 100, 0}}; /* second run past the end */

		assert_int_equal(decode_built(1, 0, 2, r), PGS_ERR_DB);
	}
	{
		const uint64_t r[][5] = {{UINT64_MAX, 1, 1, 100, 0}}; /* huge start */

		assert_int_equal(decode_built(1, 0, 1, r), PGS_ERR_DB);
	}
	{
		const uint64_t r[][5] = {{1, UINT64_MAX, 1, 100, 0}}; /* huge count */

		assert_int_equal(decode_built(1, 0, 1, r), PGS_ERR_DB);
	}
	{
		const uint64_t r[][5] = {{0, 1, UINT64_C(1) << 63, 100, 0}}; /* ver > INT64_MAX */

		assert_int_equal(decode_built(1, 0, 1, r), PGS_ERR_DB);
	}
	{
		const uint64_t r[][5] = {{0, 1, 1, 100, UINT64_C(1) << 32}}; /* site > UINT32_MAX */

		assert_int_equal(decode_built(1, 0, 1, r), PGS_ERR_DB);
	}
	/* an 11-byte varint in the header */
	{
		uint8_t b[] = {0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00, 0x00};

		assert_int_equal(decode3(b, sizeof b), PGS_ERR_DB);
	}
	/* hlc cut short */
	{
		uint8_t b[] = {1, 0, 0, 1, 1, 1, 2, 3, 4, 5, 6, 7};

		assert_int_equal(decode3(b, sizeof b), PGS_ERR_DB);
	}
}

static void
test_rowclock_wider_than_table(void **state)
{
	pgs_stamp	 s[5];
	pgs_rowclock rc = {.cl = 1, .cl_ver = 1, .ncols = 5, .cols = s};
	pgs_rowclock narrow = {.ncols = 4, .cols = s};
	pgs_buf		 b;
	pgs_err		 err;

	(void) state;
	for (int i = 0; i < 5; i++)
		s[i] = (pgs_stamp){10 + (uint64_t) i, 1, 0};
	pgs_buf_init(&b);
	pgs_rowclock_encode(&rc, &b);
	assert_int_equal(pgs_rowclock_decode(b.p, b.len, &narrow, &err), PGS_ERR_DB);
	assert_non_null(strstr(err.msg, "more columns"));
	assert_true(err.hint[0] != '\0');
	/* a wider table reads it with the extra columns unstamped */
	{
		pgs_stamp	 w[8];
		pgs_rowclock wide = {.ncols = 8, .cols = w};

		assert_int_equal(pgs_rowclock_decode(b.p, b.len, &wide, &err), PGS_OK);
		for (int i = 0; i < 5; i++)
			assert_true(w[i].hlc == 10 + (uint64_t) i);
		for (int i = 5; i < 8; i++)
			assert_true(w[i].hlc == 0);
	}
	pgs_buf_free(&b);
}

/* a key without a clock row after a GC: its life starts above the floor */
static void
test_local_above_floor(void **state)
{
	struct
	{
		pgs_local_op op;
		int64_t		 floor, want;
	} cases[] = {
		{PGS_LOCAL_INSERT, 0, 1}, {PGS_LOCAL_INSERT, 2, 3},	 {PGS_LOCAL_INSERT, 5, 7},
		{PGS_LOCAL_INSERT, 6, 7}, {PGS_LOCAL_UPDATE, 4, 5},	 {PGS_LOCAL_DELETE, 0, 2},
		{PGS_LOCAL_DELETE, 2, 4}, {PGS_LOCAL_DELETE, 7, 10}, {PGS_LOCAL_INSERT, -3, 1},
	};

	(void) state;
	for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++)
	{
		pgs_stamp	 s[2] = {{0}};
		pgs_rowclock rc = {.ncols = 2, .cols = s};

		assert_int_equal(pgs_local_edit(&rc, false, cases[k].op, DB_ALGO_CLS, NULL, 9, 100),
						 PGS_LOCAL_WRITE);
		pgs_local_above_floor(&rc, cases[k].floor);
		assert_int_equal(rc.cl, cases[k].want);
		/* a life above every collected one: odd for a write, even for a delete */
		assert_true(rc.cl > cases[k].floor);
		assert_int_equal(rc.cl & 1, cases[k].op != PGS_LOCAL_DELETE);
		assert_int_equal(rc.cl_ver, 9);
	}
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup(test_hlc_layout, setup),
		cmocka_unit_test_setup(test_hlc_tick_monotonic, setup),
		cmocka_unit_test_setup(test_hlc_tick_clock_backwards, setup),
		cmocka_unit_test_setup(test_hlc_tick_year_7000, setup),
		cmocka_unit_test_setup(test_hlc_receive_bound, setup),
		cmocka_unit_test_setup(test_hlc_valid, setup),
		cmocka_unit_test_setup(test_uuid7_format, setup),
		cmocka_unit_test_setup(test_uuid7_time_ordering, setup),
		cmocka_unit_test_setup(test_uuid_roundtrip, setup),
		cmocka_unit_test_setup(test_uuid_parse_rejects, setup),
		cmocka_unit_test_setup(test_rowclock_empty, setup),
		cmocka_unit_test_setup(test_rowclock_one_run, setup),
		cmocka_unit_test_setup(test_rowclock_sparse, setup),
		cmocka_unit_test_setup(test_rowclock_many_columns, setup),
		cmocka_unit_test_setup(test_rowclock_truncated, setup),
		cmocka_unit_test_setup(test_rowclock_malformed, setup),
		cmocka_unit_test_setup(test_rowclock_wider_than_table, setup),
		cmocka_unit_test_setup(test_local_above_floor, setup),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
