/*
 * test_varint.c — unsigned LEB128 varints and zigzag (core/util.c), and the
 * growable buffer they are written through.
 *
 * Invariants checked: every uint64 round-trips through pgs_varint_put /
 * pgs_varint_get with the length the encoding predicts; a read never goes
 * past the end it is given; a truncated varint, an 11-byte one and a 10th
 * byte above 1 (a value over 64 bits) are refused; zigzag is a bijection that
 * keeps small magnitudes small.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "mockdb.h"

#include <stdlib.h>
#include <string.h>

static int
setup(void **state)
{
	(void) state;
	mock_test_allocator();
	return 0;
}

static int
expected_len(uint64_t v)
{
	int n = 1;

	while (v >= 0x80)
	{
		v >>= 7;
		n++;
	}
	return n;
}

static void
roundtrip(uint64_t v)
{
	uint8_t	 buf[PGS_VARINT_MAX + 4];
	uint64_t got = ~v;
	int		 n;

	memset(buf, 0xAA, sizeof buf);
	n = pgs_varint_put(buf, v);
	assert_int_equal(n, expected_len(v));
	assert_true(n <= PGS_VARINT_MAX);
	/* exact end */
	assert_int_equal(pgs_varint_get(buf, buf + n, &got), n);
	assert_true(got == v);
	/* trailing bytes are not consumed */
	got = ~v;
	assert_int_equal(pgs_varint_get(buf, buf + sizeof buf, &got), n);
	assert_true(got == v);
	/* every truncation is refused */
	for (int k = 0; k < n; k++)
		assert_int_equal(pgs_varint_get(buf, buf + k, &got), 0);
}

static void
test_varint_edges(void **state)
{
	static const uint64_t edges[] = {
		0,
		1,
		2,
		63,
		64,
		127,
		128,
		129,
		255,
		256,
		16383,
		16384,
		16385,
		(1u << 21) - 1,
		1u << 21,
		(1ull << 28) - 1,
		1ull << 28,
		UINT32_MAX,
		(uint64_t) UINT32_MAX + 1,
		(1ull << 35) - 1,
		1ull << 35,
		(1ull << 42),
		(1ull << 49) - 1,
		1ull << 49,
		(1ull << 56) - 1,
		1ull << 56,
		(1ull << 62),
		(1ull << 63) - 1,
		1ull << 63,
		(1ull << 63) + 1,
		UINT64_MAX - 1,
		UINT64_MAX,
	};

	(void) state;
	for (size_t i = 0; i < sizeof edges / sizeof edges[0]; i++)
		roundtrip(edges[i]);
}

static void
test_varint_lengths(void **state)
{
	uint8_t buf[PGS_VARINT_MAX];

	(void) state;
	assert_int_equal(pgs_varint_put(buf, 0), 1);
	assert_int_equal(buf[0], 0);
	assert_int_equal(pgs_varint_put(buf, 127), 1);
	assert_int_equal(buf[0], 0x7f);
	assert_int_equal(pgs_varint_put(buf, 128), 2);
	assert_int_equal(buf[0], 0x80);
	assert_int_equal(buf[1], 0x01);
	assert_int_equal(pgs_varint_put(buf, 1ull << 63), 10);
	assert_int_equal(buf[9], 0x01);
	assert_int_equal(pgs_varint_put(buf, UINT64_MAX), 10);
	for (int i = 0; i < 9; i++)
		assert_int_equal(buf[i], 0xff);
	assert_int_equal(buf[9], 0x01);
}

static void
test_varint_every_bit(void **state)
{
	(void) state;
	for (int b = 0; b < 64; b++)
	{
		roundtrip(1ull << b);
		roundtrip((1ull << b) - 1);
		roundtrip(~(1ull << b));
	}
	/* a deterministic pseudo-random sweep */
	{
		uint64_t x = 0x9E3779B97F4A7C15ull;

		for (int i = 0; i < 100000; i++)
		{
			x ^= x << 13;
			x ^= x >> 7;
			x ^= x << 17;
			roundtrip(x >> (x & 63));
		}
	}
}

static void
test_varint_malformed(void **state)
{
	uint64_t v = 12345;
	uint8_t	 b[16] = {0};

	(void) state;
	/* empty input */
	assert_int_equal(pgs_varint_get(b, b, &v), 0);
	assert_true(v == 12345); /* untouched on failure */
	/* continuation bit on the last available byte */
	b[0] = 0x80;
	assert_int_equal(pgs_varint_get(b, b + 1, &v), 0);
	b[0] = 0xff;
	b[1] = 0xff;
	assert_int_equal(pgs_varint_get(b, b + 2, &v), 0);

	/* 10th byte may only be 0 or 1 */
	memset(b, 0xff, 9);
	b[9] = 0x01;
	assert_int_equal(pgs_varint_get(b, b + 10, &v), 10);
	assert_true(v == UINT64_MAX);
	b[9] = 0x00;
	assert_int_equal(pgs_varint_get(b, b + 10, &v), 10);
	assert_true(v == (UINT64_MAX >> 1));
	for (int x = 2; x < 256; x++)
	{
		b[9] = (uint8_t) x;
		assert_int_equal(pgs_varint_get(b, b + 16, &v), 0);
	}
	/* 11 bytes: ten with the continuation bit */
	memset(b, 0x80, 10);
	b[10] = 0x00;
	assert_int_equal(pgs_varint_get(b, b + 16, &v), 0);
	memset(b, 0xff, 10);
	b[10] = 0x01;
	assert_int_equal(pgs_varint_get(b, b + 16, &v), 0);
}

static void
test_varint_overlong_accepted(void **state)
{
	/* util.c documents that an over-long (non-minimal) encoding decodes the same */
	uint8_t	 b[10] = {0x80, 0x80, 0x00};
	uint8_t	 c[10] = {0xff, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00};
	uint64_t v = 99;

	(void) state;
	assert_int_equal(pgs_varint_get(b, b + 3, &v), 3);
	assert_true(v == 0);
	assert_int_equal(pgs_varint_get(c, c + 10, &v), 10);
	assert_true(v == 127);
}

static void
test_zigzag(void **state)
{
	static const int64_t vals[] = {
		0,
		1,
		-1,
		2,
		-2,
		63,
		-64,
		64,
		-65,
		INT32_MAX,
		INT32_MIN,
		INT64_MAX,
		INT64_MIN,
		INT64_MAX - 1,
		INT64_MIN + 1,
	};

	(void) state;
	assert_true(pgs_zigzag(0) == 0);
	assert_true(pgs_zigzag(-1) == 1);
	assert_true(pgs_zigzag(1) == 2);
	assert_true(pgs_zigzag(-2) == 3);
	assert_true(pgs_zigzag(INT64_MAX) == UINT64_MAX - 1);
	assert_true(pgs_zigzag(INT64_MIN) == UINT64_MAX);
	for (size_t i = 0; i < sizeof vals / sizeof vals[0]; i++)
	{
		uint8_t	 buf[PGS_VARINT_MAX];
		uint64_t u;
		int		 n = pgs_varint_put(buf, pgs_zigzag(vals[i]));

		assert_true(pgs_unzigzag(pgs_zigzag(vals[i])) == vals[i]);
		assert_int_equal(pgs_varint_get(buf, buf + n, &u), n);
		assert_true(pgs_unzigzag(u) == vals[i]);
	}
	/* small magnitudes stay short */
	for (int64_t v = -64; v < 64; v++)
	{
		uint8_t buf[PGS_VARINT_MAX];

		assert_int_equal(pgs_varint_put(buf, pgs_zigzag(v)), 1);
	}
	/* unzigzag is onto: every uint64 maps back to itself */
	for (uint64_t u = 0; u < 1000; u++)
		assert_true(pgs_zigzag(pgs_unzigzag(u)) == u);
	assert_true(pgs_zigzag(pgs_unzigzag(UINT64_MAX)) == UINT64_MAX);
}

static void
test_buf_varints(void **state)
{
	pgs_buf		   b;
	const uint8_t *p, *end;
	uint64_t	   u;

	(void) state;
	pgs_buf_init(&b);
	for (uint64_t i = 0; i < 2000; i++)
	{
		pgs_buf_varint(&b, i * 0x10001ull);
		pgs_buf_svarint(&b, -(int64_t) i * 977);
	}
	pgs_buf_svarint(&b, INT64_MIN);
	pgs_buf_varint(&b, UINT64_MAX);
	assert_false(b.oom);
	p = b.p;
	end = b.p + b.len;
	for (uint64_t i = 0; i < 2000; i++)
	{
		int n = pgs_varint_get(p, end, &u);

		assert_true(n > 0);
		assert_true(u == i * 0x10001ull);
		p += n;
		n = pgs_varint_get(p, end, &u);
		assert_true(n > 0);
		assert_true(pgs_unzigzag(u) == -(int64_t) i * 977);
		p += n;
	}
	p += pgs_varint_get(p, end, &u);
	assert_true(pgs_unzigzag(u) == INT64_MIN);
	p += pgs_varint_get(p, end, &u);
	assert_true(u == UINT64_MAX);
	assert_ptr_equal(p, end);
	pgs_buf_free(&b);
	assert_null(b.p);
	assert_int_equal(b.len, 0);
}

static void
test_buf_overflow_is_sticky(void **state)
{
	pgs_buf b;

	(void) state;
	pgs_buf_init(&b);
	pgs_buf_u8(&b, 1);
	assert_false(pgs_buf_reserve(&b, SIZE_MAX));
	assert_true(b.oom);
	pgs_buf_u8(&b, 2); /* refused once oom */
	assert_int_equal(b.len, 1);
	pgs_buf_free(&b);
}

/* base64url as JWT parts carry it (RFC 4648 section 5 vectors, no padding) */
static void
test_b64url(void **state)
{
	static const struct
	{
		const char *in, *out;
	} v[] = {
		{"", ""},			{"Zg", "f"},		  {"Zm8", "fo"},		  {"Zm9v", "foo"},
		{"Zm9vYg", "foob"}, {"Zm9vYmE", "fooba"}, {"Zm9vYmFy", "foobar"}, {"Zm9vYg==", "foob"}};
	uint8_t out[16];

	(void) state;
	for (size_t i = 0; i < sizeof v / sizeof v[0]; i++)
	{
		long n = pgs_b64url_decode(v[i].in, strlen(v[i].in), out, sizeof out);

		assert_int_equal(n, (long) strlen(v[i].out));
		assert_memory_equal(out, v[i].out, (size_t) n);
	}
	/* the url alphabet and the standard one: 0xfb 0xff */
	assert_int_equal(pgs_b64url_decode("-_8", 3, out, sizeof out), 2);
	assert_int_equal(out[0], 0xfb);
	assert_int_equal(out[1], 0xff);
	assert_int_equal(pgs_b64url_decode("+/8", 3, out, sizeof out), 2);
	assert_int_equal(out[0], 0xfb);
	/* outside the alphabet, and a full buffer */
	assert_int_equal(pgs_b64url_decode("Zm9v.", 5, out, sizeof out), -1);
	assert_int_equal(pgs_b64url_decode("Zm\x80v", 4, out, sizeof out), -1);
	assert_int_equal(pgs_b64url_decode("Zm9vYmFy", 8, out, 5), -1);
	assert_int_equal(pgs_b64url_decode("Zm9vYmFy", 8, out, 6), 6);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup(test_varint_edges, setup),
		cmocka_unit_test_setup(test_varint_lengths, setup),
		cmocka_unit_test_setup(test_varint_every_bit, setup),
		cmocka_unit_test_setup(test_varint_malformed, setup),
		cmocka_unit_test_setup(test_varint_overlong_accepted, setup),
		cmocka_unit_test_setup(test_zigzag, setup),
		cmocka_unit_test_setup(test_buf_varints, setup),
		cmocka_unit_test_setup(test_buf_overflow_is_sticky, setup),
		cmocka_unit_test_setup(test_b64url, setup),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
