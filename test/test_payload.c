/*
 * test_payload.c — payload building and the JSON rendering (core/build.c,
 * core/payload.c, core/value.c, core/info.c), end to end through mock
 * replicas.
 *
 * Round trips: pgs_build on one mock, pgs_apply on another, the tables are
 * then equal bit for bit (values and clocks). Values at their edges, 16 MB
 * TEXT and BLOB, compression only when it pays, since/until/exclude_site
 * filtering, relays that keep the origin of every change. Malformed input
 * is in test_decode.c.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "mockdb.h"

#include <cjson/cJSON.h>
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "payload_fixtures.h"

static void
test_roundtrip_basic(void **state)
{
	db_conn		   *a = replica(SITE_A, MS0), *b = replica(SITE_B, MS0 + 5);
	pgs_apply_stats st;

	(void) state;
	insert_item(a, 1, "one", 10, 1.5);
	insert_item(a, 2, "two", 20, 2.5);
	{
		pgs_value pk[2] = {mock_text("x"), mock_int(-3)};
		pgs_value v[2] = {mock_text("ax"), mock_blob("\x00\x01", 2)};

		assert_int_equal(mock_local_insert(a, mock_table(a, "tags"), pk, v), PGS_OK);
	}
	{
		pgs_value pk = mock_int(100);
		pgs_value v = mock_text("logged");

		assert_int_equal(mock_local_insert(a, mock_table(a, "log"), &pk, &v), PGS_OK);
	}
	st = sync_once(a, b, 0);
	assert_int_equal(st.won, 4 + 11); /* 4 row lives + 4+4+2+1 columns */
	assert_int_equal(st.lost, 0);
	assert_int_equal(st.changes, 11);
	assert_int_equal(st.rejected, 0);
	assert_equal_dbs(a, b);
	/* the merged rows carry the sender's stamps, under the receiver's version */
	{
		pgs_stamp	 cols[4];
		pgs_rowclock rc = {.cols = cols};
		pgs_value	 pk = mock_int(1);

		assert_true(mock_clock(b, mock_table(b, "items"), &pk, &rc));
		assert_true(rc.cl == 1);
		assert_true(rc.cl_ver == mock_version(b));
		assert_true(cols[0].ver == mock_version(b));
		assert_true(cols[0].hlc >> PGS_HLC_LOGICAL_BITS == MS0);
	}
	/* the receiver's HLC observed the stamps */
	assert_true(mock_hlc(b) >= mock_hlc(a));
	/* applying the same payload again changes nothing */
	{
		mock_snap *snap = mock_snapshot(b);
		char	   why[256];

		st = sync_once(a, b, 0);
		assert_int_equal(st.won, 0);
		assert_int_equal(st.lost, 11);
		if (!mock_same_state(b, snap, why, sizeof why))
			fail_msg("second apply changed the replica: %s", why);
		mock_snapshot_free(b, snap);
	}
	mock_close(a);
	mock_close(b);
}

static void
test_empty_build(void **state)
{
	db_conn		   *a = replica(SITE_A, MS0);
	pgs_buf			out;
	pgs_err			err;
	pgs_build_stats st;
	pgs_build_opts	o = {.since = 0, .until = 0, .compress = 1};

	(void) state;
	pgs_buf_init(&out);
	assert_int_equal(pgs_build(a, &o, &out, NULL, &st, &err), PGS_OK);
	assert_int_equal(out.len, 0);
	assert_int_equal(st.rows, 0);
	insert_item(a, 1, "x", 1, 1);
	/* nothing newer than the current version */
	assert_int_equal(mock_build(a, mock_version(a), NULL, 1, &out, &err), PGS_OK);
	assert_int_equal(out.len, 0);
	pgs_buf_free(&out);
	mock_close(a);
}

static uint64_t
bits_of(double d)
{
	uint64_t u;

	memcpy(&u, &d, 8);
	return u;
}

static double
double_of(uint64_t u)
{
	double d;

	memcpy(&d, &u, 8);
	return d;
}

static void
test_value_edges(void **state)
{
	db_conn				 *a = replica(SITE_A, MS0), *b = replica(SITE_B, MS0);
	db_table			 *items = mock_table(a, "items");
	static const uint64_t reals[] = {
		0x8000000000000000ull, /* -0.0 */
		0x0000000000000000ull, /* +0.0 */
		0x7ff8000000000000ull, /* quiet NaN */
		0x7ff8000000000123ull, /* quiet NaN with payload */
		0xfff8dead0000beefull, /* negative NaN with payload */
		0x7ff0000000000001ull, /* signalling NaN */
		0x7ff0000000000000ull, /* +Inf */
		0xfff0000000000000ull, /* -Inf */
		0x0000000000000001ull, /* smallest subnormal */
		0x800fffffffffffffull, /* largest negative subnormal */
		0x7fefffffffffffffull, /* DBL_MAX */
		0x0010000000000000ull, /* DBL_MIN */
	};
	static const int64_t ints[] = {INT64_MIN, INT64_MAX, 0, -1, 1, INT64_MIN + 1, 63, -64, 64};
	static const char	 utf8[] =
		"h\xc3\xa9llo \xe2\x9c\x93 \xf0\x9d\x84\x9e \xe6\x97\xa5\xe6\x9c\xac";
	static const char with_nul[] = {'a', '\0', 'b', '\0'};
	uint8_t			  allbytes[256];
	int64_t			  id = 10000;

	(void) state;
	for (int i = 0; i < 256; i++)
		allbytes[i] = (uint8_t) i;
	for (size_t i = 0; i < sizeof reals / sizeof reals[0]; i++)
	{
		pgs_value pk = mock_int(id++);
		pgs_value v[4] = {mock_null(), mock_null(), mock_real(double_of(reals[i])), mock_null()};

		assert_int_equal(mock_local_insert(a, items, &pk, v), PGS_OK);
	}
	for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++)
	{
		pgs_value pk = mock_int(ints[i]); /* as key too */
		pgs_value v[4] = {mock_null(), mock_int(ints[i]), mock_null(), mock_int(ints[i])};

		assert_int_equal(mock_local_insert(a, items, &pk, v), PGS_OK);
	}
	{
		pgs_value pk = mock_int(1000);
		pgs_value v[4] = {mock_text(utf8), mock_null(), mock_null(), mock_blob(allbytes, 256)};

		assert_int_equal(mock_local_insert(a, items, &pk, v), PGS_OK);
	}
	{
		pgs_value pk = mock_int(1001);
		pgs_value t = {.type = PGS_TEXT, .len = sizeof with_nul};
		pgs_value v[4] = {mock_null(), mock_null(), mock_null(), mock_blob("", 0)};

		t.v.p = (const uint8_t *) with_nul;
		v[0] = t;
		assert_int_equal(mock_local_insert(a, items, &pk, v), PGS_OK);
	}
	{
		pgs_value pk = mock_int(1002);
		pgs_value v[4] = {mock_text(""), mock_real(-0.0), mock_int(0), mock_text("0")};

		assert_int_equal(mock_local_insert(a, items, &pk, v), PGS_OK);
	}
	/* keys of every type: TEXT with NUL and UTF-8, BLOB, REAL by bit pattern */
	{
		db_table *tags = mock_table(a, "tags");
		pgs_value t = {.type = PGS_TEXT, .len = sizeof with_nul};
		pgs_value keys[][2] = {
			{mock_text(utf8), mock_int(INT64_MIN)},
			{mock_blob(allbytes, 256), mock_real(-0.0)},
			{mock_blob(allbytes, 256), mock_real(0.0)},
			{mock_blob("", 0), mock_real(double_of(0x7ff8000000000123ull))},
			{t, mock_int(0)},
		};

		t.v.p = (const uint8_t *) with_nul;
		keys[4][0] = t;
		for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
		{
			pgs_value v[2] = {mock_int((int64_t) i), mock_null()};

			assert_int_equal(mock_local_insert(a, tags, keys[i], v), PGS_OK);
		}
		assert_int_equal(mock_row_count(a, tags), 5);
	}
	sync_once(a, b, 0);
	assert_equal_dbs(a, b); /* pgs_value_cmp: same type, same bits */
	/* spot checks of the exact bits on the receiver */
	for (size_t i = 0; i < sizeof reals / sizeof reals[0]; i++)
	{
		pgs_value		 pk = mock_int(10000 + (int64_t) i);
		const pgs_value *row = mock_row_get(b, mock_table(b, "items"), &pk);

		assert_non_null(row);
		assert_int_equal(row[PRICE].type, PGS_REAL);
		assert_true(bits_of(row[PRICE].v.r) == reals[i]);
		assert_int_equal(row[NAME].type, PGS_NULL);
	}
	{
		pgs_value		 pk = mock_int(INT64_MIN);
		const pgs_value *row = mock_row_get(b, mock_table(b, "items"), &pk);

		assert_non_null(row);
		assert_true(row[QTY].type == PGS_INT && row[QTY].v.i == INT64_MIN);
	}
	{
		pgs_value		 pk = mock_int(1001);
		const pgs_value *row = mock_row_get(b, mock_table(b, "items"), &pk);

		assert_int_equal(row[NAME].type, PGS_TEXT);
		assert_int_equal(row[NAME].len, 4);
		assert_memory_equal(row[NAME].v.p, with_nul, 4);
		assert_int_equal(row[DATA].type, PGS_BLOB);
		assert_int_equal(row[DATA].len, 0);
	}
	(void) DBL_MAX;
	mock_close(a);
	mock_close(b);
}

static void
fill_random(uint8_t *p, size_t n, uint64_t seed)
{
	uint64_t x = seed | 1;

	for (size_t i = 0; i < n; i++)
	{
		x ^= x << 13, x ^= x >> 7, x ^= x << 17;
		p[i] = (uint8_t) (x >> 24);
	}
}

static void
test_large_values(void **state)
{
	size_t	 n = 16u << 20;
	uint8_t *text = test_malloc(n), *blob = test_malloc(n);
	db_conn *a = replica(SITE_A, MS0), *b = replica(SITE_B, MS0);
	pgs_buf	 out;
	pgs_err	 err;

	(void) state;
	for (size_t i = 0; i < n; i++)
		text[i] = (uint8_t) ("pgsync large text value \xc3\xa9 "[i % 27]);
	fill_random(blob, n, 42);
	{
		pgs_value pk = mock_int(1);
		pgs_value t = {.type = PGS_TEXT, .len = (uint32_t) n};
		pgs_value v[4] = {mock_null(), mock_int(1), mock_null(), mock_blob(blob, (uint32_t) n)};

		t.v.p = text;
		v[0] = t;
		assert_int_equal(mock_local_insert(a, mock_table(a, "items"), &pk, v), PGS_OK);
	}
	pgs_buf_init(&out);
	/* compressed: the text compresses, the random blob does not, the whole does */
	assert_int_equal(mock_build(a, 0, NULL, 1, &out, &err), PGS_OK);
	assert_int_equal(out.p[5], 1);
	assert_true(rd32(out.p + 44) < rd32(out.p + 40));
	assert_true(rd32(out.p + 40) > 2 * n);
	{
		pgs_apply_stats st;

		assert_int_equal(mock_apply(b, out.p, out.len, &st, &err), PGS_OK);
		assert_int_equal(st.changes, 4);
	}
	assert_equal_dbs(a, b);
	/* uncompressed */
	mock_close(b);
	b = replica(SITE_B, MS0);
	assert_int_equal(mock_build(a, 0, NULL, 0, &out, &err), PGS_OK);
	assert_int_equal(out.p[5], 0);
	assert_int_equal(rd32(out.p + 44), rd32(out.p + 40));
	assert_int_equal(out.len, PGS_HEADER_LEN + rd32(out.p + 40));
	assert_int_equal(mock_apply(b, out.p, out.len, NULL, &err), PGS_OK);
	assert_equal_dbs(a, b);
	{
		pgs_value		 pk = mock_int(1);
		const pgs_value *row = mock_row_get(b, mock_table(b, "items"), &pk);

		assert_int_equal(row[NAME].len, n);
		assert_memory_equal(row[NAME].v.p, text, n);
		assert_int_equal(row[DATA].len, n);
		assert_memory_equal(row[DATA].v.p, blob, n);
	}
	pgs_buf_free(&out);
	test_free(text);
	test_free(blob);
	mock_close(a);
	mock_close(b);
}

static void
test_compression_only_when_smaller(void **state)
{
	db_conn *a = replica(SITE_A, MS0);
	db_conn *b;
	pgs_buf	 out;
	pgs_err	 err;
	uint8_t	 rnd[4096];

	(void) state;
	pgs_buf_init(&out);
	/* a tiny payload is never compressed */
	insert_item(a, 1, "tiny", 1, 1.0);
	assert_int_equal(mock_build(a, 0, NULL, 1, &out, &err), PGS_OK);
	assert_int_equal(out.p[5] & 1, 0);
	/* incompressible: stays raw although compression was asked for */
	fill_random(rnd, sizeof rnd, 7);
	{
		pgs_value pk = mock_int(2);
		pgs_value v[4] = {mock_null(), mock_null(), mock_null(), mock_blob(rnd, sizeof rnd)};

		assert_int_equal(mock_local_insert(a, mock_table(a, "items"), &pk, v), PGS_OK);
	}
	assert_int_equal(mock_build(a, mock_version(a) - 1, NULL, 1, &out, &err), PGS_OK);
	assert_int_equal(out.p[5] & 1, 0);
	assert_int_equal(rd32(out.p + 40), rd32(out.p + 44));
	/* compressible: compressed, and smaller */
	for (int i = 0; i < 200; i++)
		insert_item(a, 100 + i, "a rather repetitive name", 5, 0.25);
	assert_int_equal(mock_build(a, 0, NULL, 1, &out, &err), PGS_OK);
	assert_int_equal(out.p[5], 1);
	assert_true(rd32(out.p + 44) < rd32(out.p + 40));
	assert_int_equal(out.len, PGS_HEADER_LEN + rd32(out.p + 44));
	b = replica(SITE_B, MS0);
	assert_int_equal(mock_apply(b, out.p, out.len, NULL, &err), PGS_OK);
	assert_equal_dbs(a, b);
	{
		cJSON *j = info_json(out.p, out.len);

		assert_true(cJSON_IsTrue(jget(j, "compressed")));
		assert_true(jnum(j, "stored_bytes") < jnum(j, "body_bytes"));
		cJSON_Delete(j);
	}
	/* compress = 0: never */
	assert_int_equal(mock_build(a, 0, NULL, 0, &out, &err), PGS_OK);
	assert_int_equal(out.p[5], 0);
	pgs_buf_free(&out);
	mock_close(a);
	mock_close(b);
}

static void
test_payload_info_json(void **state)
{
	db_conn *a = replica(SITE_A, MS0);
	pgs_buf	 out;
	pgs_err	 err;
	cJSON	*j;
	char	 site_a[37];
	uint8_t	 bl[3] = {0x00, 0xab, 0xff};

	(void) state;
	pgs_uuid_format(SITE_A, site_a);
	{
		pgs_value pk = mock_int(INT64_MIN);
		pgs_value v[4] = {mock_text("caf\xc3\xa9 \"q\""), mock_int(INT64_MAX),
						  mock_real(double_of(0x7ff8000000000001ull)), mock_blob(bl, 3)};

		assert_int_equal(mock_local_insert(a, mock_table(a, "items"), &pk, v), PGS_OK);
	}
	{
		pgs_value pk = mock_int(2);
		pgs_value v[4] = {mock_null(), mock_null(), mock_real(-INFINITY), mock_null()};

		assert_int_equal(mock_local_insert(a, mock_table(a, "items"), &pk, v), PGS_OK);
		assert_int_equal(mock_local_delete(a, mock_table(a, "items"), &pk), PGS_OK);
	}
	{
		pgs_value pk = mock_int(3);
		pgs_value v[4] = {mock_null(), mock_null(), mock_real(0.1), mock_null()};

		assert_int_equal(mock_local_insert(a, mock_table(a, "items"), &pk, v), PGS_OK);
	}
	pgs_buf_init(&out);
	assert_int_equal(mock_build(a, 0, NULL, 0, &out, &err), PGS_OK);
	{
		char *text;

		assert_int_equal(pgs_payload_info(out.p, out.len, &text, &err), PGS_OK);
		/* integers are exact in the text, not rounded through a double */
		assert_non_null(strstr(text, "-9223372036854775808"));
		assert_non_null(strstr(text, "9223372036854775807"));
		pgs_free(text);
	}
	j = info_json(out.p, out.len);
	assert_int_equal((int) jnum(j, "format_version"), PGS_PAYLOAD_VERSION);
	assert_true(cJSON_IsFalse(jget(j, "compressed")));
	assert_string_equal(jstr(j, "origin"), site_a);
	assert_int_equal((int) jnum(j, "since"), 0);
	assert_int_equal((int) jnum(j, "until"), (int) mock_version(a));
	assert_int_equal((int) jnum(j, "body_bytes"), (int) (out.len - PGS_HEADER_LEN));
	assert_int_equal((int) jnum(j, "stored_bytes"), (int) (out.len - PGS_HEADER_LEN));
	assert_int_equal((int) jnum(j, "row_count"), 3);
	assert_int_equal((int) jnum(j, "change_count"), 8);
	assert_null(cJSON_GetObjectItemCaseSensitive(j, "rows_omitted"));
	{
		const cJSON *sites = jget(j, "sites");

		assert_int_equal(cJSON_GetArraySize(sites), 1);
		assert_string_equal(cJSON_GetArrayItem(sites, 0)->valuestring, site_a);
	}
	{
		const cJSON *tables = jget(j, "tables");
		const cJSON *t0 = cJSON_GetArrayItem(tables, 0);

		assert_int_equal(cJSON_GetArraySize(tables), 1); /* only tables with changes */
		assert_string_equal(jstr(t0, "name"), "items");
		assert_int_equal(cJSON_GetArraySize(jget(t0, "key")), 1);
		assert_string_equal(cJSON_GetArrayItem(jget(t0, "key"), 0)->valuestring, "id");
		assert_int_equal(cJSON_GetArraySize(jget(t0, "columns")), 4);
		assert_string_equal(cJSON_GetArrayItem(jget(t0, "columns"), 3)->valuestring, "data");
	}
	{
		const cJSON *rows = jget(j, "rows");
		int			 seen = 0;

		assert_int_equal(cJSON_GetArraySize(rows), 3);
		for (int i = 0; i < 3; i++)
		{
			const cJSON *r = cJSON_GetArrayItem(rows, i);
			const cJSON *ch = jget(r, "changes");
			double		 key = cJSON_GetArrayItem(jget(r, "key"), 0)->valuedouble;

			assert_string_equal(jstr(r, "table"), "items");
			assert_string_equal(jstr(r, "cl_site"), site_a);
			if (key == 2)
			{
				/* the deleted row: even cl, no column */
				assert_int_equal((int) jnum(r, "cl"), 2);
				assert_true(cJSON_IsTrue(jget(r, "deleted")));
				assert_int_equal(cJSON_GetArraySize(ch), 0);
				seen |= 1;
			}
			else if (key < 0)
			{
				const cJSON *c;

				assert_int_equal((int) jnum(r, "cl"), 1);
				assert_true(cJSON_IsFalse(jget(r, "deleted")));
				assert_int_equal(cJSON_GetArraySize(ch), 4);
				c = cJSON_GetArrayItem(ch, 0);
				assert_string_equal(jstr(c, "column"), "name");
				assert_string_equal(jstr(c, "value"), "caf\xc3\xa9 \"q\"");
				assert_string_equal(jstr(c, "site"), site_a);
				assert_true(jnum(c, "hlc") > 0);
				assert_int_equal((uint64_t) jnum(c, "hlc_ms"), MS0);
				c = cJSON_GetArrayItem(ch, 2);
				assert_string_equal(jstr(c, "column"), "price");
				assert_string_equal(jstr(c, "value"), "NaN");
				c = cJSON_GetArrayItem(ch, 3);
				assert_string_equal(jstr(jget(c, "value"), "hex"), "00abff");
				seen |= 2;
			}
			else
			{
				const cJSON *c = cJSON_GetArrayItem(ch, 2);

				assert_true(cJSON_IsNumber(jget(c, "value")));
				assert_true(jget(c, "value")->valuedouble == 0.1); /* 17 digits round-trip */
				assert_true(cJSON_IsNull(jget(cJSON_GetArrayItem(ch, 0), "value")));
				seen |= 4;
			}
		}
		assert_int_equal(seen, 7);
	}
	cJSON_Delete(j);
	/* infinities render as strings */
	{
		pgs_value pk = mock_int(4);
		pgs_value v[4] = {mock_null(), mock_null(), mock_real(-INFINITY), mock_null()};
		char	 *text;

		assert_int_equal(mock_local_insert(a, mock_table(a, "items"), &pk, v), PGS_OK);
		assert_int_equal(mock_build(a, mock_version(a) - 1, NULL, 0, &out, &err), PGS_OK);
		assert_int_equal(pgs_payload_info(out.p, out.len, &text, &err), PGS_OK);
		assert_non_null(strstr(text, "\"-Infinity\""));
		pgs_free(text);
	}
	pgs_buf_free(&out);
	mock_close(a);
}

/* pgs_payload_info lists at most 10000 row groups and says how many it left out */
static void
test_payload_info_row_cap(void **state)
{
	db_conn *a = replica(SITE_A, MS0);
	pgs_buf	 out;
	pgs_err	 err;
	cJSON	*j;

	(void) state;
	mock_begin(a);
	for (int i = 0; i < 10003; i++)
	{
		pgs_value pk = mock_int(i);
		pgs_value v[4] = {mock_null(), mock_int(i), mock_null(), mock_null()};

		assert_int_equal(mock_local_insert(a, mock_table(a, "items"), &pk, v), PGS_OK);
	}
	mock_commit(a);
	pgs_buf_init(&out);
	assert_int_equal(mock_build(a, 0, NULL, 1, &out, &err), PGS_OK);
	j = info_json(out.p, out.len);
	assert_int_equal(cJSON_GetArraySize(jget(j, "rows")), 10000);
	assert_int_equal((int) jnum(j, "row_count"), 10003);
	assert_int_equal((int) jnum(j, "rows_omitted"), 3);
	assert_int_equal((int) jnum(j, "change_count"), 4 * 10003);
	cJSON_Delete(j);
	pgs_buf_free(&out);
	mock_close(a);
}

/* value.c directly: each type's encoding, truncations, and the total order */
static void
test_value_codec(void **state)
{
	uint8_t	  bytes[3] = {1, 2, 3};
	pgs_value vals[] = {
		mock_null(),		 mock_int(INT64_MIN),  mock_int(-1),	mock_int(0),
		mock_int(INT64_MAX), mock_real(-INFINITY), mock_real(-0.0), mock_real(0.0),
		mock_real(NAN),		 mock_text(""),		   mock_text("a"),	mock_text("ab"),
		mock_blob(bytes, 0), mock_blob(bytes, 3),
	};
	int n = (int) (sizeof vals / sizeof vals[0]);

	(void) state;
	for (int i = 0; i < n; i++)
	{
		pgs_buf		   b;
		pgs_value	   back;
		const uint8_t *p;
		pgs_err		   err;

		pgs_buf_init(&b);
		pgs_value_put(&b, &vals[i]);
		p = b.p;
		assert_int_equal(pgs_value_get(&p, b.p + b.len, vals[i].type, &back, &err), PGS_OK);
		assert_ptr_equal(p, b.p + b.len);
		assert_int_equal(pgs_value_cmp(&vals[i], &back), 0);
		/* every strict prefix of a non-empty encoding is refused */
		for (size_t k = 0; k < b.len; k++)
		{
			p = b.p;
			if (vals[i].type == PGS_TEXT || vals[i].type == PGS_BLOB)
			{
				if (k == 0 || vals[i].len > 0)
					assert_int_equal(pgs_value_get(&p, b.p + k, vals[i].type, &back, &err),
									 PGS_ERR_CORRUPT);
			}
			else
				assert_int_equal(pgs_value_get(&p, b.p + k, vals[i].type, &back, &err),
								 PGS_ERR_CORRUPT);
		}
		pgs_buf_free(&b);
		/* the order is total and antisymmetric: type first, then content */
		for (int k = 0; k < n; k++)
		{
			int c = pgs_value_cmp(&vals[i], &vals[k]);

			assert_int_equal(c, -pgs_value_cmp(&vals[k], &vals[i]));
			assert_int_equal(c == 0, i == k);
			if (vals[i].type != vals[k].type)
				assert_int_equal(c, vals[i].type < vals[k].type ? -1 : 1);
		}
	}
	/* types 5-7 are refused */
	for (uint8_t t = 5; t < 8; t++)
	{
		const uint8_t *p = bytes;
		pgs_value	   v;
		pgs_err		   err;

		assert_int_equal(pgs_value_get(&p, bytes + 3, t, &v, &err), PGS_ERR_CORRUPT);
	}
}

static void
test_since_until_filtering(void **state)
{
	db_conn *a = replica(SITE_A, MS0);
	pgs_buf	 out;
	pgs_err	 err;
	int64_t	 v1, v2, v3;
	cJSON	*j;

	(void) state;
	pgs_buf_init(&out);
	insert_item(a, 1, "one", 1, 1);
	v1 = mock_version(a);
	insert_item(a, 2, "two", 2, 2);
	v2 = mock_version(a);
	mock_advance(a, 1000);
	update_col(a, 1, NAME, mock_text("uno"));
	v3 = mock_version(a);
	assert_true(v1 < v2 && v2 < v3);

	/* everything */
	assert_int_equal(mock_build(a, 0, NULL, 0, &out, &err), PGS_OK);
	j = info_json(out.p, out.len);
	assert_int_equal((int) jnum(j, "row_count"), 2);
	assert_int_equal((int) jnum(j, "change_count"), 8);
	assert_int_equal((int) jnum(j, "until"), (int) v3);
	cJSON_Delete(j);
	{
		int64_t until;

		assert_int_equal(pgs_payload_until(out.p, out.len, &until, &err), PGS_OK);
		assert_true(until == v3);
	}
	/* since v1: row 2 whole, row 1 only its name (not its life) */
	assert_int_equal(mock_build(a, v1, NULL, 0, &out, &err), PGS_OK);
	j = info_json(out.p, out.len);
	assert_int_equal((int) jnum(j, "since"), (int) v1);
	assert_int_equal((int) jnum(j, "row_count"), 2);
	assert_int_equal((int) jnum(j, "change_count"), 5);
	cJSON_Delete(j);
	/* since v2: row 1's name only */
	assert_int_equal(mock_build(a, v2, NULL, 0, &out, &err), PGS_OK);
	j = info_json(out.p, out.len);
	{
		const cJSON *r = cJSON_GetArrayItem(jget(j, "rows"), 0);
		const cJSON *c = cJSON_GetArrayItem(jget(r, "changes"), 0);

		assert_int_equal((int) jnum(j, "row_count"), 1);
		assert_int_equal(cJSON_GetArraySize(jget(r, "changes")), 1);
		assert_string_equal(jstr(c, "column"), "name");
		assert_string_equal(jstr(c, "value"), "uno");
		assert_int_equal((uint64_t) jnum(c, "hlc_ms"), MS0 + 1000);
	}
	cJSON_Delete(j);
	/* since v3: nothing */
	assert_int_equal(mock_build(a, v3, NULL, 0, &out, &err), PGS_OK);
	assert_int_equal(out.len, 0);
	/*
	 * An explicit until below the current version (Postgres' pull horizon):
	 * until is only the cursor the payload reports; every stamp above since
	 * goes out, including row 1's name, stamped at v3 > until (see
	 * test_until_below_current_version for why).
	 */
	{
		pgs_build_opts o = {.since = v1, .until = v2, .compress = 0};

		assert_int_equal(pgs_build(a, &o, &out, NULL, NULL, &err), PGS_OK);
		j = info_json(out.p, out.len);
		assert_int_equal((int) jnum(j, "row_count"), 2);
		assert_int_equal((int) jnum(j, "change_count"), 5);
		assert_int_equal((int) jnum(j, "until"), (int) v2);
		cJSON_Delete(j);
	}
	pgs_buf_free(&out);
	mock_close(a);
}

/*
 * Postgres hands out until = db_version_safe() below versions that are
 * already committed (a writer that started earlier is still running). A row
 * inserted at v1 and updated at v3 then has clock ver 3: payload (0, v1]
 * must still carry its life and the columns stamped at v1, because payload
 * (v1, v3] carries only what changed after v1.
 */
static void
test_until_below_current_version(void **state)
{
	db_conn *a = replica(SITE_A, MS0), *b = replica(SITE_B, MS0);
	pgs_buf	 out;
	pgs_err	 err;
	int64_t	 v1, v3;

	(void) state;
	pgs_buf_init(&out);
	insert_item(a, 1, "one", 10, 1.5); /* v1 */
	v1 = mock_version(a);
	insert_item(a, 2, "two", 20, 2.5);		  /* v2: the slow writer of the story */
	update_col(a, 1, NAME, mock_text("uno")); /* v3 */
	v3 = mock_version(a);
	{
		pgs_build_opts o = {.since = 0, .until = v1, .compress = 1};

		assert_int_equal(pgs_build(a, &o, &out, NULL, NULL, &err), PGS_OK);
		if (out.len)
			assert_int_equal(mock_apply(b, out.p, out.len, NULL, &err), PGS_OK);
	}
	{
		pgs_build_opts o = {.since = v1, .until = v3, .compress = 1};

		assert_int_equal(pgs_build(a, &o, &out, NULL, NULL, &err), PGS_OK);
		assert_true(out.len > 0);
		assert_int_equal(mock_apply(b, out.p, out.len, NULL, &err), PGS_OK);
	}
	/* b followed a's payloads back to back: it must hold row 1 whole */
	{
		pgs_value		 pk = mock_int(1);
		const pgs_value *row = mock_row_get(b, mock_table(b, "items"), &pk);

		assert_non_null(row);
		assert_int_equal(row[QTY].type, PGS_INT); /* fails: qty was never sent */
		assert_true(row[QTY].v.i == 10);
	}
	assert_equal_dbs(a, b);
	pgs_buf_free(&out);
	mock_close(a);
	mock_close(b);
}

static void
test_relay_keeps_origin(void **state)
{
	db_conn *a = replica(SITE_A, MS0), *b = replica(SITE_B, MS0 + 10),
			*c = replica(SITE_C, MS0 + 20);
	pgs_buf out;
	pgs_err err;
	char	sa[37], sb[37];
	cJSON  *j;

	(void) state;
	pgs_uuid_format(SITE_A, sa);
	pgs_uuid_format(SITE_B, sb);
	pgs_buf_init(&out);
	insert_item(a, 1, "from a", 1, 1);
	sync_once(a, b, 0);
	/* b relays to c: b is the origin of the payload, a of every change */
	assert_int_equal(mock_build(b, 0, NULL, 0, &out, &err), PGS_OK);
	j = info_json(out.p, out.len);
	assert_string_equal(jstr(j, "origin"), sb);
	{
		const cJSON *r = cJSON_GetArrayItem(jget(j, "rows"), 0);
		const cJSON *ch = jget(r, "changes");

		assert_string_equal(jstr(r, "cl_site"), sa);
		for (int i = 0; i < cJSON_GetArraySize(ch); i++)
			assert_string_equal(jstr(cJSON_GetArrayItem(ch, i), "site"), sa);
		/* the site dictionary holds a only: b made no change */
		assert_int_equal(cJSON_GetArraySize(jget(j, "sites")), 1);
	}
	cJSON_Delete(j);
	assert_int_equal(mock_apply(c, out.p, out.len, NULL, &err), PGS_OK);
	assert_equal_dbs(a, c);
	/* and c, relaying further, still names a */
	assert_int_equal(mock_build(c, 0, NULL, 0, &out, &err), PGS_OK);
	j = info_json(out.p, out.len);
	assert_string_equal(
		jstr(cJSON_GetArrayItem(jget(cJSON_GetArrayItem(jget(j, "rows"), 0), "changes"), 1),
			 "site"),
		sa);
	cJSON_Delete(j);
	/* b edits one column: a relay now names both, each on its own change */
	update_col(b, 1, QTY, mock_int(2));
	assert_int_equal(mock_build(b, 0, NULL, 0, &out, &err), PGS_OK);
	j = info_json(out.p, out.len);
	{
		const cJSON *ch = jget(cJSON_GetArrayItem(jget(j, "rows"), 0), "changes");

		assert_int_equal(cJSON_GetArraySize(jget(j, "sites")), 2);
		assert_string_equal(jstr(cJSON_GetArrayItem(ch, 0), "site"), sa);
		assert_string_equal(jstr(cJSON_GetArrayItem(ch, 1), "site"), sb);
		assert_string_equal(jstr(cJSON_GetArrayItem(ch, 2), "site"), sa);
	}
	cJSON_Delete(j);
	assert_int_equal(mock_apply(c, out.p, out.len, NULL, &err), PGS_OK);
	assert_equal_dbs(b, c);
	pgs_buf_free(&out);
	mock_close(a);
	mock_close(b);
	mock_close(c);
}

static void
test_exclude_site(void **state)
{
	db_conn *a = replica(SITE_A, MS0), *b = replica(SITE_B, MS0 + 10);
	pgs_buf	 out;
	pgs_err	 err;
	cJSON	*j;

	(void) state;
	pgs_buf_init(&out);
	insert_item(a, 1, "one", 1, 1);
	insert_item(a, 2, "two", 2, 2);
	sync_once(a, b, 0);
	/* everything b holds came from a: nothing to send back to a */
	assert_int_equal(mock_build(b, 0, SITE_A, 1, &out, &err), PGS_OK);
	assert_int_equal(out.len, 0);
	/* b's own edits go out, a's do not */
	update_col(b, 1, PRICE, mock_real(9.5));
	{
		pgs_value pk = mock_int(2);

		assert_int_equal(mock_local_delete(b, mock_table(b, "items"), &pk), PGS_OK);
	}
	assert_int_equal(mock_build(b, 0, SITE_A, 0, &out, &err), PGS_OK);
	j = info_json(out.p, out.len);
	assert_int_equal((int) jnum(j, "row_count"), 2);
	assert_int_equal((int) jnum(j, "change_count"), 1);
	cJSON_Delete(j);
	assert_int_equal(mock_apply(a, out.p, out.len, NULL, &err), PGS_OK);
	assert_equal_dbs(a, b);
	/* a site nobody knows excludes nothing */
	{
		int64_t before = mock_version(b);

		assert_int_equal(mock_build(b, 0, SITE_C, 0, &out, &err), PGS_OK);
		j = info_json(out.p, out.len);
		assert_int_equal((int) jnum(j, "row_count"), 2);
		assert_int_equal((int) jnum(j, "change_count"), 4);
		cJSON_Delete(j);
		assert_true(mock_version(b) == before);
		assert_int_equal(mock_site_count(b), 2); /* not interned: building is read-only */
	}
	pgs_buf_free(&out);
	mock_close(a);
	mock_close(b);
}

/* the receiver matches columns by name: another column order works */
static void
test_column_order_by_name(void **state)
{
	static const char *const pk[] = {"id"};
	static const char *const cols[] = {"data", "price", "extra", "name", "qty"};
	db_conn					*a = replica(SITE_A, MS0);
	db_conn					*b = mock_open(SITE_B);
	db_table				*bt = mock_add_table(b, "items", DB_ALGO_CLS, 1, pk, 5, cols);
	pgs_buf					 out;
	pgs_err					 err;

	(void) state;
	mock_set_clock(b, MS0);
	pgs_buf_init(&out);
	insert_item(a, 1, "one", 7, 0.5);
	assert_int_equal(mock_build(a, 0, NULL, 0, &out, &err), PGS_OK);
	assert_int_equal(mock_apply(b, out.p, out.len, NULL, &err), PGS_OK);
	{
		pgs_value		 k = mock_int(1);
		const pgs_value *row = mock_row_get(b, bt, &k);

		assert_non_null(row);
		assert_int_equal(row[0].type, PGS_NULL);
		assert_true(row[1].type == PGS_REAL && row[1].v.r == 0.5);
		assert_int_equal(row[2].type, PGS_NULL);
		assert_true(row[3].type == PGS_TEXT && row[3].len == 3);
		assert_true(row[4].type == PGS_INT && row[4].v.i == 7);
	}
	pgs_buf_free(&out);
	mock_close(a);
	mock_close(b);
}

/* ================================================================ */
/* malformed payloads                                                */
/* ================================================================ */

/* apply_expect: raw pgs_apply must return want and, on failure, leave db as it was */
int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup(test_roundtrip_basic, setup),
		cmocka_unit_test_setup(test_empty_build, setup),
		cmocka_unit_test_setup(test_value_edges, setup),
		cmocka_unit_test_setup(test_large_values, setup),
		cmocka_unit_test_setup(test_compression_only_when_smaller, setup),
		cmocka_unit_test_setup(test_payload_info_json, setup),
		cmocka_unit_test_setup(test_payload_info_row_cap, setup),
		cmocka_unit_test_setup(test_value_codec, setup),
		cmocka_unit_test_setup(test_since_until_filtering, setup),
		cmocka_unit_test_setup(test_until_below_current_version, setup),
		cmocka_unit_test_setup(test_relay_keeps_origin, setup),
		cmocka_unit_test_setup(test_exclude_site, setup),
		cmocka_unit_test_setup(test_column_order_by_name, setup),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
