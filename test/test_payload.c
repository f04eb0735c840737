/*
 * test_payload.c — payload building, the container, the reader and the
 * JSON rendering (core/build.c, core/payload.c, core/value.c, core/info.c),
 * end to end through mock replicas.
 *
 * Round trips: pgs_build on one mock, pgs_apply on another, the tables are
 * then equal bit for bit (values and clocks). Values at their edges, 16 MB
 * TEXT and BLOB, compression only when it pays, since/until/exclude_site
 * filtering, relays that keep the origin of every change.
 *
 * Malformed input: every case returns the documented pgs_rc with err filled
 * and the receiving mock exactly as it was (raw pgs_apply, no savepoint: the
 * core validates the whole body before it writes). Bodies are forged with
 * the small encoder below and sealed with a correct checksum, so the parser
 * itself is exercised, not only the checksum. A capped allocator shows that
 * forged counts and lengths never turn into large allocations.
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

/* ---- allocator: cmocka's, with an optional cap per allocation ---- */

static size_t alloc_cap;		/* 0 = no cap */
static size_t alloc_max;		/* largest request seen */
static int	alloc_refused;

static void *
cap_malloc(size_t n)
{
	if (n > alloc_max)
		alloc_max = n;
	if (alloc_cap && n > alloc_cap)
	{
		alloc_refused++;
		return NULL;
	}
	return test_malloc(n);
}

static void *
cap_realloc(void *p, size_t n)
{
	if (n > alloc_max)
		alloc_max = n;
	if (alloc_cap && n > alloc_cap)
	{
		alloc_refused++;
		return NULL;
	}
	return test_realloc(p, n);
}

static void
cap_free(void *p)
{
	test_free(p);
}

static int
setup(void **state)
{
	static const pgs_allocator a = {cap_malloc, cap_realloc, cap_free};

	(void) state;
	pgs_set_allocator(&a);
	alloc_cap = 0;
	alloc_max = 0;
	alloc_refused = 0;
	return 0;
}

#define MS0 UINT64_C(1700000000000)

static const uint8_t SITE_A[16] = {0x01, 0x8b, 0xd0, 0, 0, 0, 0x70, 0, 0x80, 0, 0, 0, 0, 0, 0, 0xaa};
static const uint8_t SITE_B[16] = {0x01, 0x8b, 0xd0, 0, 0, 0, 0x70, 0, 0x80, 0, 0, 0, 0, 0, 0, 0xbb};
static const uint8_t SITE_C[16] = {0x01, 0x8b, 0xd0, 0, 0, 0, 0x70, 0, 0x80, 0, 0, 0, 0, 0, 0, 0xcc};

enum
{
	NAME, QTY, PRICE, DATA			/* columns of items */
};

static db_conn *
replica(const uint8_t *site, uint64_t ms)
{
	db_conn    *db = mock_open(site);

	mock_add_std_tables(db);
	mock_set_clock(db, ms);
	return db;
}

static void
assert_equal_dbs(db_conn *a, db_conn *b)
{
	char		why[512];

	if (!mock_equal(a, b, MOCK_CMP_ROWS | MOCK_CMP_CLOCKS, why, sizeof why))
		fail_msg("replicas differ: %s", why);
}

/* build (since, now] on from and apply it to to; returns the apply stats */
static pgs_apply_stats
sync_once(db_conn *from, db_conn *to, int64_t since)
{
	pgs_buf		out;
	pgs_err		err;
	pgs_apply_stats st = {0};

	pgs_buf_init(&out);
	if (mock_build(from, since, NULL, 1, &out, &err) != PGS_OK)
		fail_msg("build: %s", err.msg);
	if (out.len && mock_apply(to, out.p, out.len, &st, &err) != PGS_OK)
		fail_msg("apply: %s (%s)", err.msg, err.detail);
	pgs_buf_free(&out);
	return st;
}

static void
insert_item(db_conn *db, int64_t id, const char *name, int64_t qty, double price)
{
	pgs_value	pk = mock_int(id);
	pgs_value	v[4] = {mock_text(name), mock_int(qty), mock_real(price), mock_null()};

	assert_int_equal(mock_local_insert(db, mock_table(db, "items"), &pk, v), PGS_OK);
}

static void
update_col(db_conn *db, int64_t id, int col, pgs_value v)
{
	pgs_value	pk = mock_int(id);

	assert_int_equal(mock_local_update(db, mock_table(db, "items"), &pk, 1, &col, &v), PGS_OK);
}

/* ---- payload inspection ---- */

static uint32_t
rd32(const uint8_t *p)
{
	return (uint32_t) p[0] | (uint32_t) p[1] << 8 | (uint32_t) p[2] << 16 | (uint32_t) p[3] << 24;
}

static cJSON *
info_json(const uint8_t *p, size_t len)
{
	char	   *text = NULL;
	pgs_err		err;
	cJSON	   *j;

	if (pgs_payload_info(p, len, &text, &err) != PGS_OK)
		fail_msg("payload_info: %s", err.msg);
	j = cJSON_Parse(text);
	if (!j)
		fail_msg("payload_info is not JSON: %s", text);
	pgs_free(text);
	return j;
}

static const char *
jstr(const cJSON *o, const char *k)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);

	assert_true(cJSON_IsString(v));
	return v->valuestring;
}

static double
jnum(const cJSON *o, const char *k)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);

	assert_true(cJSON_IsNumber(v));
	return v->valuedouble;
}

static const cJSON *
jget(const cJSON *o, const char *k)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);

	assert_non_null(v);
	return v;
}

/* ================================================================ */
/* round trips                                                       */
/* ================================================================ */

static void
test_roundtrip_basic(void **state)
{
	db_conn    *a = replica(SITE_A, MS0),
			   *b = replica(SITE_B, MS0 + 5);
	pgs_apply_stats st;

	(void) state;
	insert_item(a, 1, "one", 10, 1.5);
	insert_item(a, 2, "two", 20, 2.5);
	{
		pgs_value	pk[2] = {mock_text("x"), mock_int(-3)};
		pgs_value	v[2] = {mock_text("ax"), mock_blob("\x00\x01", 2)};

		assert_int_equal(mock_local_insert(a, mock_table(a, "tags"), pk, v), PGS_OK);
	}
	{
		pgs_value	pk = mock_int(100);
		pgs_value	v = mock_text("logged");

		assert_int_equal(mock_local_insert(a, mock_table(a, "log"), &pk, &v), PGS_OK);
	}
	st = sync_once(a, b, 0);
	assert_int_equal(st.won, 4 + 11);	/* 4 row lives + 4+4+2+1 columns */
	assert_int_equal(st.lost, 0);
	assert_int_equal(st.changes, 11);
	assert_int_equal(st.rejected, 0);
	assert_equal_dbs(a, b);
	/* the merged rows carry the sender's stamps, under the receiver's version */
	{
		pgs_stamp	cols[4];
		pgs_rowclock rc = {.cols = cols};
		pgs_value	pk = mock_int(1);

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
		mock_snap  *snap = mock_snapshot(b);
		char		why[256];

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
	db_conn    *a = replica(SITE_A, MS0);
	pgs_buf		out;
	pgs_err		err;
	pgs_build_stats st;
	pgs_build_opts o = {.since = 0, .until = 0, .compress = 1};

	(void) state;
	pgs_buf_init(&out);
	assert_int_equal(pgs_build(a, &o, &out, &st, &err), PGS_OK);
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
	uint64_t	u;

	memcpy(&u, &d, 8);
	return u;
}

static double
double_of(uint64_t u)
{
	double		d;

	memcpy(&d, &u, 8);
	return d;
}

static void
test_value_edges(void **state)
{
	db_conn    *a = replica(SITE_A, MS0),
			   *b = replica(SITE_B, MS0);
	db_table   *items = mock_table(a, "items");
	static const uint64_t reals[] = {
		0x8000000000000000ull,	/* -0.0 */
		0x0000000000000000ull,	/* +0.0 */
		0x7ff8000000000000ull,	/* quiet NaN */
		0x7ff8000000000123ull,	/* quiet NaN with payload */
		0xfff8dead0000beefull,	/* negative NaN with payload */
		0x7ff0000000000001ull,	/* signalling NaN */
		0x7ff0000000000000ull,	/* +Inf */
		0xfff0000000000000ull,	/* -Inf */
		0x0000000000000001ull,	/* smallest subnormal */
		0x800fffffffffffffull,	/* largest negative subnormal */
		0x7fefffffffffffffull,	/* DBL_MAX */
		0x0010000000000000ull,	/* DBL_MIN */
	};
	static const int64_t ints[] = {INT64_MIN, INT64_MAX, 0, -1, 1, INT64_MIN + 1, 63, -64, 64};
	static const char utf8[] = "h\xc3\xa9llo \xe2\x9c\x93 \xf0\x9d\x84\x9e \xe6\x97\xa5\xe6\x9c\xac";
	static const char with_nul[] = {'a', '\0', 'b', '\0'};
	uint8_t		allbytes[256];
	int64_t		id = 10000;

	(void) state;
	for (int i = 0; i < 256; i++)
		allbytes[i] = (uint8_t) i;
	for (size_t i = 0; i < sizeof reals / sizeof reals[0]; i++)
	{
		pgs_value	pk = mock_int(id++);
		pgs_value	v[4] = {mock_null(), mock_null(), mock_real(double_of(reals[i])), mock_null()};

		assert_int_equal(mock_local_insert(a, items, &pk, v), PGS_OK);
	}
	for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++)
	{
		pgs_value	pk = mock_int(ints[i]);	/* as key too */
		pgs_value	v[4] = {mock_null(), mock_int(ints[i]), mock_null(), mock_int(ints[i])};

		assert_int_equal(mock_local_insert(a, items, &pk, v), PGS_OK);
	}
	{
		pgs_value	pk = mock_int(1000);
		pgs_value	v[4] = {mock_text(utf8), mock_null(), mock_null(), mock_blob(allbytes, 256)};

		assert_int_equal(mock_local_insert(a, items, &pk, v), PGS_OK);
	}
	{
		pgs_value	pk = mock_int(1001);
		pgs_value	t = {.type = PGS_TEXT, .len = sizeof with_nul};
		pgs_value	v[4] = {mock_null(), mock_null(), mock_null(), mock_blob("", 0)};

		t.v.p = (const uint8_t *) with_nul;
		v[0] = t;
		assert_int_equal(mock_local_insert(a, items, &pk, v), PGS_OK);
	}
	{
		pgs_value	pk = mock_int(1002);
		pgs_value	v[4] = {mock_text(""), mock_real(-0.0), mock_int(0), mock_text("0")};

		assert_int_equal(mock_local_insert(a, items, &pk, v), PGS_OK);
	}
	/* keys of every type: TEXT with NUL and UTF-8, BLOB, REAL by bit pattern */
	{
		db_table   *tags = mock_table(a, "tags");
		pgs_value	t = {.type = PGS_TEXT, .len = sizeof with_nul};
		pgs_value	keys[][2] = {
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
			pgs_value	v[2] = {mock_int((int64_t) i), mock_null()};

			assert_int_equal(mock_local_insert(a, tags, keys[i], v), PGS_OK);
		}
		assert_int_equal(mock_row_count(a, tags), 5);
	}
	sync_once(a, b, 0);
	assert_equal_dbs(a, b);		/* pgs_value_cmp: same type, same bits */
	/* spot checks of the exact bits on the receiver */
	for (size_t i = 0; i < sizeof reals / sizeof reals[0]; i++)
	{
		pgs_value	pk = mock_int(10000 + (int64_t) i);
		const pgs_value *row = mock_row_get(b, mock_table(b, "items"), &pk);

		assert_non_null(row);
		assert_int_equal(row[PRICE].type, PGS_REAL);
		assert_true(bits_of(row[PRICE].v.r) == reals[i]);
		assert_int_equal(row[NAME].type, PGS_NULL);
	}
	{
		pgs_value	pk = mock_int(INT64_MIN);
		const pgs_value *row = mock_row_get(b, mock_table(b, "items"), &pk);

		assert_non_null(row);
		assert_true(row[QTY].type == PGS_INT && row[QTY].v.i == INT64_MIN);
	}
	{
		pgs_value	pk = mock_int(1001);
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
	uint64_t	x = seed | 1;

	for (size_t i = 0; i < n; i++)
	{
		x ^= x << 13, x ^= x >> 7, x ^= x << 17;
		p[i] = (uint8_t) (x >> 24);
	}
}

static void
test_large_values(void **state)
{
	size_t		n = 16u << 20;
	uint8_t    *text = test_malloc(n),
			   *blob = test_malloc(n);
	db_conn    *a = replica(SITE_A, MS0),
			   *b = replica(SITE_B, MS0);
	pgs_buf		out;
	pgs_err		err;

	(void) state;
	for (size_t i = 0; i < n; i++)
		text[i] = (uint8_t) ("pgsync large text value \xc3\xa9 "[i % 27]);
	fill_random(blob, n, 42);
	{
		pgs_value	pk = mock_int(1);
		pgs_value	t = {.type = PGS_TEXT, .len = (uint32_t) n};
		pgs_value	v[4] = {mock_null(), mock_int(1), mock_null(), mock_blob(blob, (uint32_t) n)};

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
		pgs_value	pk = mock_int(1);
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
	db_conn    *a = replica(SITE_A, MS0);
	db_conn    *b;
	pgs_buf		out;
	pgs_err		err;
	uint8_t		rnd[4096];

	(void) state;
	pgs_buf_init(&out);
	/* a tiny payload is never compressed */
	insert_item(a, 1, "tiny", 1, 1.0);
	assert_int_equal(mock_build(a, 0, NULL, 1, &out, &err), PGS_OK);
	assert_int_equal(out.p[5] & 1, 0);
	/* incompressible: stays raw although compression was asked for */
	fill_random(rnd, sizeof rnd, 7);
	{
		pgs_value	pk = mock_int(2);
		pgs_value	v[4] = {mock_null(), mock_null(), mock_null(), mock_blob(rnd, sizeof rnd)};

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
		cJSON	   *j = info_json(out.p, out.len);

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
	db_conn    *a = replica(SITE_A, MS0);
	pgs_buf		out;
	pgs_err		err;
	cJSON	   *j;
	char		site_a[37];
	uint8_t		bl[3] = {0x00, 0xab, 0xff};

	(void) state;
	pgs_uuid_format(SITE_A, site_a);
	{
		pgs_value	pk = mock_int(INT64_MIN);
		pgs_value	v[4] = {mock_text("caf\xc3\xa9 \"q\""), mock_int(INT64_MAX),
		mock_real(double_of(0x7ff8000000000001ull)), mock_blob(bl, 3)};

		assert_int_equal(mock_local_insert(a, mock_table(a, "items"), &pk, v), PGS_OK);
	}
	{
		pgs_value	pk = mock_int(2);
		pgs_value	v[4] = {mock_null(), mock_null(), mock_real(-INFINITY), mock_null()};

		assert_int_equal(mock_local_insert(a, mock_table(a, "items"), &pk, v), PGS_OK);
		assert_int_equal(mock_local_delete(a, mock_table(a, "items"), &pk), PGS_OK);
	}
	{
		pgs_value	pk = mock_int(3);
		pgs_value	v[4] = {mock_null(), mock_null(), mock_real(0.1), mock_null()};

		assert_int_equal(mock_local_insert(a, mock_table(a, "items"), &pk, v), PGS_OK);
	}
	pgs_buf_init(&out);
	assert_int_equal(mock_build(a, 0, NULL, 0, &out, &err), PGS_OK);
	{
		char	   *text;

		assert_int_equal(pgs_payload_info(out.p, out.len, &text, &err), PGS_OK);
		/* integers are exact in the text, not rounded through a double */
		assert_non_null(strstr(text, "-9223372036854775808"));
		assert_non_null(strstr(text, "9223372036854775807"));
		pgs_free(text);
	}
	j = info_json(out.p, out.len);
	assert_int_equal((int) jnum(j, "format_version"), 1);
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

		assert_int_equal(cJSON_GetArraySize(tables), 1);	/* only tables with changes */
		assert_string_equal(jstr(t0, "name"), "items");
		assert_int_equal(cJSON_GetArraySize(jget(t0, "key")), 1);
		assert_string_equal(cJSON_GetArrayItem(jget(t0, "key"), 0)->valuestring, "id");
		assert_int_equal(cJSON_GetArraySize(jget(t0, "columns")), 4);
		assert_string_equal(cJSON_GetArrayItem(jget(t0, "columns"), 3)->valuestring, "data");
	}
	{
		const cJSON *rows = jget(j, "rows");
		int			seen = 0;

		assert_int_equal(cJSON_GetArraySize(rows), 3);
		for (int i = 0; i < 3; i++)
		{
			const cJSON *r = cJSON_GetArrayItem(rows, i);
			const cJSON *ch = jget(r, "changes");
			double		key = cJSON_GetArrayItem(jget(r, "key"), 0)->valuedouble;

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
				assert_true(jget(c, "value")->valuedouble == 0.1);	/* 17 digits round-trip */
				assert_true(cJSON_IsNull(jget(cJSON_GetArrayItem(ch, 0), "value")));
				seen |= 4;
			}
		}
		assert_int_equal(seen, 7);
	}
	cJSON_Delete(j);
	/* infinities render as strings */
	{
		pgs_value	pk = mock_int(4);
		pgs_value	v[4] = {mock_null(), mock_null(), mock_real(-INFINITY), mock_null()};
		char	   *text;

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
	db_conn    *a = replica(SITE_A, MS0);
	pgs_buf		out;
	pgs_err		err;
	cJSON	   *j;

	(void) state;
	mock_begin(a);
	for (int i = 0; i < 10003; i++)
	{
		pgs_value	pk = mock_int(i);
		pgs_value	v[4] = {mock_null(), mock_int(i), mock_null(), mock_null()};

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
	uint8_t		bytes[3] = {1, 2, 3};
	pgs_value	vals[] = {
		mock_null(), mock_int(INT64_MIN), mock_int(-1), mock_int(0), mock_int(INT64_MAX),
		mock_real(-INFINITY), mock_real(-0.0), mock_real(0.0), mock_real(NAN),
		mock_text(""), mock_text("a"), mock_text("ab"), mock_blob(bytes, 0), mock_blob(bytes, 3),
	};
	int			n = (int) (sizeof vals / sizeof vals[0]);

	(void) state;
	for (int i = 0; i < n; i++)
	{
		pgs_buf		b;
		pgs_value	back;
		const uint8_t *p;
		pgs_err		err;

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
					assert_int_equal(pgs_value_get(&p, b.p + k, vals[i].type, &back, &err), PGS_ERR_CORRUPT);
			}
			else
				assert_int_equal(pgs_value_get(&p, b.p + k, vals[i].type, &back, &err), PGS_ERR_CORRUPT);
		}
		pgs_buf_free(&b);
		/* the order is total and antisymmetric: type first, then content */
		for (int k = 0; k < n; k++)
		{
			int			c = pgs_value_cmp(&vals[i], &vals[k]);

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
		pgs_value	v;
		pgs_err		err;

		assert_int_equal(pgs_value_get(&p, bytes + 3, t, &v, &err), PGS_ERR_CORRUPT);
	}
}

static void
test_since_until_filtering(void **state)
{
	db_conn    *a = replica(SITE_A, MS0);
	pgs_buf		out;
	pgs_err		err;
	int64_t		v1,
				v2,
				v3;
	cJSON	   *j;

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
		int64_t		until;

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

		assert_int_equal(pgs_build(a, &o, &out, NULL, &err), PGS_OK);
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
	db_conn    *a = replica(SITE_A, MS0),
			   *b = replica(SITE_B, MS0);
	pgs_buf		out;
	pgs_err		err;
	int64_t		v1,
				v3;

	(void) state;
	pgs_buf_init(&out);
	insert_item(a, 1, "one", 10, 1.5);	/* v1 */
	v1 = mock_version(a);
	insert_item(a, 2, "two", 20, 2.5);	/* v2: the slow writer of the story */
	update_col(a, 1, NAME, mock_text("uno"));	/* v3 */
	v3 = mock_version(a);
	{
		pgs_build_opts o = {.since = 0, .until = v1, .compress = 1};

		assert_int_equal(pgs_build(a, &o, &out, NULL, &err), PGS_OK);
		if (out.len)
			assert_int_equal(mock_apply(b, out.p, out.len, NULL, &err), PGS_OK);
	}
	{
		pgs_build_opts o = {.since = v1, .until = v3, .compress = 1};

		assert_int_equal(pgs_build(a, &o, &out, NULL, &err), PGS_OK);
		assert_true(out.len > 0);
		assert_int_equal(mock_apply(b, out.p, out.len, NULL, &err), PGS_OK);
	}
	/* b followed a's payloads back to back: it must hold row 1 whole */
	{
		pgs_value	pk = mock_int(1);
		const pgs_value *row = mock_row_get(b, mock_table(b, "items"), &pk);

		assert_non_null(row);
		assert_int_equal(row[QTY].type, PGS_INT);	/* fails: qty was never sent */
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
	db_conn    *a = replica(SITE_A, MS0),
			   *b = replica(SITE_B, MS0 + 10),
			   *c = replica(SITE_C, MS0 + 20);
	pgs_buf		out;
	pgs_err		err;
	char		sa[37],
				sb[37];
	cJSON	   *j;

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
	assert_string_equal(jstr(cJSON_GetArrayItem(jget(cJSON_GetArrayItem(jget(j, "rows"), 0), "changes"), 1), "site"), sa);
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
	db_conn    *a = replica(SITE_A, MS0),
			   *b = replica(SITE_B, MS0 + 10);
	pgs_buf		out;
	pgs_err		err;
	cJSON	   *j;

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
		pgs_value	pk = mock_int(2);

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
		int64_t		before = mock_version(b);

		assert_int_equal(mock_build(b, 0, SITE_C, 0, &out, &err), PGS_OK);
		j = info_json(out.p, out.len);
		assert_int_equal((int) jnum(j, "row_count"), 2);
		assert_int_equal((int) jnum(j, "change_count"), 4);
		cJSON_Delete(j);
		assert_true(mock_version(b) == before);
		assert_int_equal(mock_site_count(b), 2);	/* not interned: building is read-only */
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
	db_conn    *a = replica(SITE_A, MS0);
	db_conn    *b = mock_open(SITE_B);
	db_table   *bt = mock_add_table(b, "items", DB_ALGO_CLS, 1, pk, 5, cols);
	pgs_buf		out;
	pgs_err		err;

	(void) state;
	mock_set_clock(b, MS0);
	pgs_buf_init(&out);
	insert_item(a, 1, "one", 7, 0.5);
	assert_int_equal(mock_build(a, 0, NULL, 0, &out, &err), PGS_OK);
	assert_int_equal(mock_apply(b, out.p, out.len, NULL, &err), PGS_OK);
	{
		pgs_value	k = mock_int(1);
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
#define INFO_SKIP (-1)		/* an error pgs_payload_info cannot see (schema) */

static void
apply_expect_(db_conn *db, const uint8_t *p, size_t len, pgs_rc want, int info_want,
			  const char *what, int line)
{
	mock_snap  *snap = mock_snapshot(db);
	pgs_err		err;
	pgs_rc		rc;
	char		why[256];
	char	   *json = NULL;

	memset(&err, 0, sizeof err);
	rc = pgs_apply(db, p, len, NULL, &err);
	if (rc != want)
		fail_msg("line %d (%s): pgs_apply returned %d, expected %d: %s", line, what, rc, want, err.msg);
	if (rc != PGS_OK)
	{
		if (err.rc != rc || err.msg[0] == '\0')
			fail_msg("line %d (%s): err not filled (rc %d, msg '%s')", line, what, err.rc, err.msg);
		if (!mock_same_state(db, snap, why, sizeof why))
			fail_msg("line %d (%s): failed apply changed the replica: %s", line, what, why);
	}
	mock_snapshot_free(db, snap);
	/* pgs_payload_info reads the same bytes; schema errors are not its business */
	rc = pgs_payload_info(p, len, &json, &err);
	if (info_want != INFO_SKIP && rc != (pgs_rc) info_want)
		fail_msg("line %d (%s): pgs_payload_info returned %d, expected %d", line, what, rc, info_want);
	if (rc == PGS_OK)
	{
		cJSON	   *j = cJSON_Parse(json);

		if (!j)
			fail_msg("line %d (%s): payload_info is not JSON", line, what);
		cJSON_Delete(j);
	}
	else
		assert_null(json);
	pgs_free(json);
}

#define apply_expect(db, p, len, want) \
	apply_expect_(db, p, len, want, (want) == PGS_ERR_SCHEMA ? INFO_SKIP : (int) (want), #want, __LINE__)

/* ---- a small encoder for forged bodies ---- */

static void
f_str(pgs_buf *b, const char *s)
{
	pgs_buf_varint(b, strlen(s));
	pgs_buf_put(b, s, strlen(s));
}

/* f_dict: site dictionary (n sites: A, B, C) + one table dictionary entry */
static void
f_dict(pgs_buf *b, int nsites, const char *table, int npk, const char *const *pks, int ncols,
	   const char *const *cols)
{
	const uint8_t *sites[] = {SITE_A, SITE_B, SITE_C};

	pgs_buf_varint(b, (uint64_t) nsites);
	for (int i = 0; i < nsites; i++)
		pgs_buf_put(b, sites[i % 3], 16);
	pgs_buf_varint(b, 1);
	f_str(b, table);
	pgs_buf_varint(b, (uint64_t) npk);
	pgs_buf_varint(b, (uint64_t) ncols);
	for (int i = 0; i < npk; i++)
		f_str(b, pks[i]);
	for (int i = 0; i < ncols; i++)
		f_str(b, cols[i]);
}

static const char *const ITEMS_PK[] = {"id"};
static const char *const ITEMS_COLS[] = {"name", "qty", "price", "data"};

static void
f_items_dict(pgs_buf *b)
{
	f_dict(b, 2, "items", 1, ITEMS_PK, 4, ITEMS_COLS);
}

/* group header of an items row with an INT key */
static void
f_group(pgs_buf *b, uint64_t table, int64_t id, uint64_t cl, uint64_t cl_site, uint64_t nchanges,
		int64_t hlc_delta, uint64_t site)
{
	pgs_buf_varint(b, table);
	pgs_buf_u8(b, PGS_INT);
	pgs_buf_svarint(b, id);
	pgs_buf_varint(b, cl);
	pgs_buf_varint(b, cl_site);
	pgs_buf_varint(b, nchanges);
	if (nchanges)
	{
		pgs_buf_svarint(b, hlc_delta);
		pgs_buf_varint(b, site);
	}
}

/* a change with the group's stamp: head = type | delta << 4 */
static void
f_change_int(pgs_buf *b, int delta, int64_t v)
{
	pgs_buf_u8(b, (uint8_t) (PGS_INT | delta << 4));
	pgs_buf_svarint(b, v);
}

/* seal: a payload (uncompressed unless flags say otherwise) around body */
static uint8_t *
seal_ex(const uint8_t *body, size_t blen, uint8_t flags, uint32_t body_len, size_t *len)
{
	uint8_t    *p = test_malloc(PGS_HEADER_LEN + blen + 1);

	memset(p, 0, PGS_HEADER_LEN);
	memcpy(p, "PGSY", 4);
	p[4] = 1;
	p[5] = flags;
	memcpy(p + 8, SITE_A, 16);
	p[32] = 9;					/* until = 9 */
	for (int i = 0; i < 4; i++)
	{
		p[40 + i] = (uint8_t) (body_len >> (8 * i));
		p[44 + i] = (uint8_t) (blen >> (8 * i));
	}
	if (blen)
		memcpy(p + PGS_HEADER_LEN, body, blen);
	*len = PGS_HEADER_LEN + blen;
	mock_reseal(p, *len);
	return p;
}

static uint8_t *
seal(const pgs_buf *b, size_t *len)
{
	return seal_ex(b->p, b->len, 0, (uint32_t) b->len, len);
}

/* expect: seal body b, apply to a fresh replica, expect want; frees b */
static void
expect_body_(pgs_buf *b, pgs_rc want, int info_want, const char *what, int line)
{
	db_conn    *db = replica(SITE_C, MS0);
	size_t		len;
	uint8_t    *p;

	/* a replica with some state, so "unchanged" means something */
	insert_item(db, 1, "existing", 1, 1);
	p = seal(b, &len);
	apply_expect_(db, p, len, want, info_want, what, line);
	test_free(p);
	pgs_buf_free(b);
	mock_close(db);
}

#define expect_body(b, want) \
	expect_body_(b, want, (want) == PGS_ERR_SCHEMA ? INFO_SKIP : (int) (want), #want, __LINE__)
/* a payload that only a replica's schema shows to be malformed */
#define expect_body_apply_only(b, want) expect_body_(b, want, INFO_SKIP, #want, __LINE__)

static void
test_forged_valid(void **state)
{
	pgs_buf		b;

	(void) state;
	/* the encoder itself makes a valid payload */
	pgs_buf_init(&b);
	f_items_dict(&b);
	pgs_buf_varint(&b, 2);
	f_group(&b, 0, 7, 1, 0, 2, (int64_t) pgs_hlc_from_ms(MS0), 1);
	pgs_buf_u8(&b, PGS_TEXT | 0 << 4);
	f_str(&b, "x");
	f_change_int(&b, 0, 5);
	f_group(&b, 0, 8, 2, 1, 0, 0, 0);
	expect_body(&b, PGS_OK);
	/* with explicit column index, own stamp and a gap */
	pgs_buf_init(&b);
	f_items_dict(&b);
	pgs_buf_varint(&b, 1);
	f_group(&b, 0, 7, 1, 0, 2, (int64_t) pgs_hlc_from_ms(MS0), 1);
	pgs_buf_u8(&b, PGS_REAL | 8 | 1 << 4);	/* column 1, own stamp */
	pgs_buf_svarint(&b, 5);
	pgs_buf_varint(&b, 0);
	pgs_buf_put(&b, "\0\0\0\0\0\0\xf0\x3f", 8);
	pgs_buf_u8(&b, PGS_NULL | 15 << 4);	/* explicit column 3 */
	pgs_buf_varint(&b, 3);
	expect_body(&b, PGS_OK);
}

static void
test_malformed_container(void **state)
{
	db_conn    *db = replica(SITE_B, MS0);
	db_conn    *a = replica(SITE_A, MS0);
	pgs_buf		out;
	pgs_err		err;
	uint8_t    *p;
	size_t		len;

	(void) state;
	insert_item(db, 5, "mine", 5, 5);
	insert_item(a, 1, "one", 1, 1);
	pgs_buf_init(&out);
	assert_int_equal(mock_build(a, 0, NULL, 0, &out, &err), PGS_OK);
	len = out.len;
	p = test_malloc(len + 8);
	memcpy(p, out.p, len);
	apply_expect(db, p, len, PGS_OK);
	mock_close(db);
	db = replica(SITE_B, MS0);

	apply_expect(db, NULL, 0, PGS_ERR_CORRUPT);
	apply_expect(db, p, 0, PGS_ERR_CORRUPT);
	apply_expect(db, p, PGS_HEADER_LEN - 1, PGS_ERR_CORRUPT);
	apply_expect(db, p, PGS_HEADER_LEN, PGS_ERR_CORRUPT);	/* length mismatch */
	/* bad magic */
	p[0] = 'X';
	apply_expect(db, p, len, PGS_ERR_CORRUPT);
	mock_reseal(p, len);
	apply_expect(db, p, len, PGS_ERR_CORRUPT);
	p[0] = 'P';
	mock_reseal(p, len);
	/* version 2, version 0 */
	p[4] = 2;
	mock_reseal(p, len);
	apply_expect(db, p, len, PGS_ERR_VERSION);
	p[4] = 0;
	mock_reseal(p, len);
	apply_expect(db, p, len, PGS_ERR_VERSION);
	p[4] = 1;
	/* reserved flag bits, reserved bytes */
	for (int bit = 1; bit < 8; bit++)
	{
		p[5] = (uint8_t) (1 << bit);
		mock_reseal(p, len);
		apply_expect(db, p, len, PGS_ERR_VERSION);
	}
	p[5] = 0;
	p[6] = 1;
	mock_reseal(p, len);
	apply_expect(db, p, len, PGS_ERR_VERSION);
	p[6] = 0;
	p[7] = 0x80;
	mock_reseal(p, len);
	apply_expect(db, p, len, PGS_ERR_VERSION);
	p[7] = 0;
	mock_reseal(p, len);
	apply_expect(db, p, len, PGS_OK);
	mock_close(db);
	db = replica(SITE_B, MS0);
	/* length mismatch: one byte more, one byte less */
	p[len] = 0;
	apply_expect(db, p, len + 1, PGS_ERR_CORRUPT);
	apply_expect(db, p, len - 1, PGS_ERR_CORRUPT);
	/* checksum mismatch: header byte, body byte, checksum byte */
	for (size_t off = 0; off < len; off += (off < 60 ? 1 : 7))
	{
		if (off >= 48 && off < 56)
			continue;
		p[off] ^= 0x10;
		apply_expect(db, p, len, off < 4 ? PGS_ERR_CORRUPT : (off == 4 || (off >= 5 && off < 8)) ? PGS_ERR_VERSION : PGS_ERR_CORRUPT);
		p[off] ^= 0x10;
	}
	p[50] ^= 1;
	apply_expect(db, p, len, PGS_ERR_CORRUPT);
	p[50] ^= 1;
	/* since < 0, until < since (re-sealed) */
	{
		uint8_t		save[16];

		memcpy(save, p + 24, 16);
		memset(p + 24, 0xff, 8);
		mock_reseal(p, len);
		apply_expect(db, p, len, PGS_ERR_CORRUPT);
		memset(p + 24, 0, 16);
		p[24] = 5;
		p[32] = 4;
		mock_reseal(p, len);
		apply_expect(db, p, len, PGS_ERR_CORRUPT);
		memcpy(p + 24, save, 16);
	}
	/* body_len over the limit */
	{
		uint8_t		save[8];

		memcpy(save, p + 40, 8);
		p[40] = 1, p[41] = 0, p[42] = 0, p[43] = 0x40;	/* 1 GiB + 1 */
		mock_reseal(p, len);
		apply_expect(db, p, len, PGS_ERR_TOO_BIG);
		/* stored != body without the compression flag */
		memcpy(p + 40, save, 8);
		p[40]++;
		mock_reseal(p, len);
		apply_expect(db, p, len, PGS_ERR_CORRUPT);
		memcpy(p + 40, save, 8);
		mock_reseal(p, len);
	}
	/* the compression flag on a body that is not zstd */
	p[5] = 1;
	mock_reseal(p, len);
	apply_expect(db, p, len, PGS_ERR_CORRUPT);
	p[5] = 0;
	mock_reseal(p, len);
	apply_expect(db, p, len, PGS_OK);
	test_free(p);
	pgs_buf_free(&out);
	mock_close(db);
	mock_close(a);
}

/* a real payload with several tables, deletes, own stamps and explicit columns */
static void
rich_payload(pgs_buf *out, int compress)
{
	db_conn    *a = replica(SITE_A, MS0);
	db_conn    *b = replica(SITE_B, MS0 + 3);
	pgs_err		err;

	insert_item(a, 1, "one", 1, 1.25);
	insert_item(a, 2, "two", -2, -0.0);
	insert_item(a, 3, "three", 3, 3);
	sync_once(a, b, 0);
	mock_advance(b, 50);
	update_col(b, 1, QTY, mock_int(111));
	sync_once(b, a, 0);
	mock_advance(a, 100);
	update_col(a, 1, DATA, mock_blob("\x01\x02", 2));
	{
		pgs_value	pk = mock_int(2);

		assert_int_equal(mock_local_delete(a, mock_table(a, "items"), &pk), PGS_OK);
	}
	{
		pgs_value	pk[2] = {mock_text("k"), mock_real(2.5)};
		pgs_value	v[2] = {mock_text("t"), mock_int(1 << 20)};

		assert_int_equal(mock_local_insert(a, mock_table(a, "tags"), pk, v), PGS_OK);
	}
	{
		pgs_value	pk = mock_int(9);
		pgs_value	v = mock_text("log line");

		assert_int_equal(mock_local_insert(a, mock_table(a, "log"), &pk, &v), PGS_OK);
	}
	assert_int_equal(mock_build(a, 0, NULL, compress, out, &err), PGS_OK);
	mock_close(a);
	mock_close(b);
}

/* truncate the body of p at every length, fix both lengths, reseal */
static void
test_truncated_every_offset(void **state)
{
	pgs_buf		out;
	db_conn    *db = replica(SITE_C, MS0);
	size_t		blen;
	uint8_t    *t;

	(void) state;
	insert_item(db, 1, "existing", 1, 1);
	pgs_buf_init(&out);
	rich_payload(&out, 0);
	assert_int_equal(out.p[5], 0);
	blen = out.len - PGS_HEADER_LEN;
	apply_expect(db, out.p, out.len, PGS_OK);
	mock_close(db);
	db = replica(SITE_C, MS0);
	insert_item(db, 1, "existing", 1, 1);
	t = test_malloc(out.len);
	for (size_t k = 0; k < blen; k++)
	{
		size_t		len = PGS_HEADER_LEN + k;

		memcpy(t, out.p, len);
		for (int i = 0; i < 4; i++)
			t[40 + i] = t[44 + i] = (uint8_t) (k >> (8 * i));
		mock_reseal(t, len);
		apply_expect(db, t, len, PGS_ERR_CORRUPT);
		/* and the raw cut (lengths not fixed) */
		apply_expect(db, out.p, len, PGS_ERR_CORRUPT);
	}
	/* a compressed payload cut anywhere */
	pgs_buf_free(&out);
	rich_payload(&out, 1);
	if (out.p[5] == 1)
	{
		for (size_t k = 0; k < out.len - PGS_HEADER_LEN; k++)
		{
			size_t		len = PGS_HEADER_LEN + k;

			memcpy(t, out.p, len);
			for (int i = 0; i < 4; i++)
				t[44 + i] = (uint8_t) (k >> (8 * i));
			mock_reseal(t, len);
			apply_expect(db, t, len, PGS_ERR_CORRUPT);
		}
	}
	test_free(t);
	pgs_buf_free(&out);
	mock_close(db);
}

static void
test_every_bit_flipped(void **state)
{
	pgs_buf		out;
	uint8_t    *t;
	int			ok = 0,
				bad = 0;

	(void) state;
	pgs_buf_init(&out);
	rich_payload(&out, 0);
	t = test_malloc(out.len);
	for (size_t bit = 0; bit < out.len * 8; bit++)
	{
		db_conn    *db;
		mock_snap  *snap;
		pgs_err		err;
		pgs_rc		rc;
		char	   *json = NULL;

		if (bit / 8 >= 48 && bit / 8 < 56)
			continue;			/* the checksum itself: resealing undoes it */
		memcpy(t, out.p, out.len);
		t[bit / 8] ^= (uint8_t) (1u << (bit % 8));
		mock_reseal(t, out.len);
		db = replica(SITE_C, MS0);
		insert_item(db, 1, "existing", 1, 1);
		snap = mock_snapshot(db);
		rc = pgs_apply(db, t, out.len, NULL, &err);
		assert_true(rc == PGS_OK || rc == PGS_ERR_CORRUPT || rc == PGS_ERR_VERSION ||
					rc == PGS_ERR_TOO_BIG || rc == PGS_ERR_SCHEMA);
		if (rc == PGS_OK)
			ok++;
		else if (rc == PGS_ERR_SCHEMA)
		{
			/*
			 * A schema error found row by row (a delete reaching the
			 * grow-only table) may come after rows were written: the
			 * engine's savepoint undoes them (see test_delete_to_gset).
			 */
			bad++;
			mock_restore(db, snap);
			snap = mock_snapshot(db);
		}
		else
		{
			char		why[256];

			bad++;
			assert_int_equal(err.rc, rc);
			if (!mock_same_state(db, snap, why, sizeof why))
				fail_msg("bit %zu: failed apply (%s) changed the replica: %s", bit, err.msg, why);
		}
		mock_snapshot_free(db, snap);
		rc = pgs_payload_info(t, out.len, &json, &err);
		if (rc == PGS_OK)
		{
			cJSON	   *j = cJSON_Parse(json);

			assert_non_null(j);
			cJSON_Delete(j);
			pgs_free(json);
		}
		mock_close(db);
	}
	/* most flips are caught; some (a value's bit, the origin) make another valid payload */
	assert_true(bad > 0 && ok > 0);
	test_free(t);
	pgs_buf_free(&out);
}

static void
test_forged_counts_no_huge_allocation(void **state)
{
	pgs_buf		b;

	(void) state;
	alloc_cap = 1 << 20;		/* 1 MiB: more than any of these payloads needs */
	/* huge site count */
	pgs_buf_init(&b);
	pgs_buf_varint(&b, UINT64_C(1) << 40);
	pgs_buf_put(&b, SITE_A, 16);
	expect_body(&b, PGS_ERR_CORRUPT);
	/* site count just over what remains */
	pgs_buf_init(&b);
	pgs_buf_varint(&b, 2);
	pgs_buf_put(&b, SITE_A, 16);
	pgs_buf_put(&b, SITE_A, 15);
	expect_body(&b, PGS_ERR_CORRUPT);
	/* huge table count */
	pgs_buf_init(&b);
	pgs_buf_varint(&b, 0);
	pgs_buf_varint(&b, UINT64_MAX);
	expect_body(&b, PGS_ERR_CORRUPT);
	pgs_buf_init(&b);
	pgs_buf_varint(&b, 0);
	pgs_buf_varint(&b, 1u << 30);
	for (int i = 0; i < 64; i++)
		pgs_buf_u8(&b, 0);
	expect_body(&b, PGS_ERR_CORRUPT);
	/* huge column counts */
	pgs_buf_init(&b);
	pgs_buf_varint(&b, 0);
	pgs_buf_varint(&b, 1);
	f_str(&b, "items");
	pgs_buf_varint(&b, 1);
	pgs_buf_varint(&b, UINT64_MAX - 1);	/* npk + ncols = UINT64_MAX */
	f_str(&b, "id");
	expect_body(&b, PGS_ERR_CORRUPT);
	pgs_buf_init(&b);
	pgs_buf_varint(&b, 0);
	pgs_buf_varint(&b, 1);
	f_str(&b, "items");
	pgs_buf_varint(&b, 40000);	/* over the 32767 limit alone */
	pgs_buf_varint(&b, 0);
	for (int i = 0; i < 40000; i++)
		pgs_buf_u8(&b, 0);
	expect_body(&b, PGS_ERR_CORRUPT);
	pgs_buf_init(&b);
	pgs_buf_varint(&b, 0);
	pgs_buf_varint(&b, 1);
	f_str(&b, "items");
	pgs_buf_varint(&b, UINT64_C(1) << 33);
	pgs_buf_varint(&b, 0);
	expect_body(&b, PGS_ERR_CORRUPT);
	/* a name longer than the rest, longer than 64 KiB */
	pgs_buf_init(&b);
	pgs_buf_varint(&b, 0);
	pgs_buf_varint(&b, 1);
	pgs_buf_varint(&b, UINT64_C(1) << 31);
	pgs_buf_put(&b, "items", 5);
	expect_body(&b, PGS_ERR_CORRUPT);
	/* huge row count */
	pgs_buf_init(&b);
	f_items_dict(&b);
	pgs_buf_varint(&b, UINT64_MAX);
	f_group(&b, 0, 1, 1, 0, 0, 0, 0);
	expect_body(&b, PGS_ERR_CORRUPT);
	/* row count larger than the rows present */
	pgs_buf_init(&b);
	f_items_dict(&b);
	pgs_buf_varint(&b, 3);
	f_group(&b, 0, 1, 1, 0, 0, 0, 0);
	f_group(&b, 0, 2, 1, 0, 0, 0, 0);
	expect_body(&b, PGS_ERR_CORRUPT);
	/* huge change count */
	pgs_buf_init(&b);
	f_items_dict(&b);
	pgs_buf_varint(&b, 1);
	f_group(&b, 0, 1, 1, 0, UINT64_C(1) << 32, 1, 0);
	expect_body(&b, PGS_ERR_CORRUPT);
	/* change count over the table's columns */
	pgs_buf_init(&b);
	f_items_dict(&b);
	pgs_buf_varint(&b, 1);
	f_group(&b, 0, 1, 1, 0, 5, (int64_t) pgs_hlc_from_ms(MS0), 0);
	for (int i = 0; i < 5; i++)
		f_change_int(&b, 0, i);
	expect_body(&b, PGS_ERR_CORRUPT);
	/* huge TEXT length in a value and in a key */
	pgs_buf_init(&b);
	f_items_dict(&b);
	pgs_buf_varint(&b, 1);
	f_group(&b, 0, 1, 1, 0, 1, (int64_t) pgs_hlc_from_ms(MS0), 0);
	pgs_buf_u8(&b, PGS_TEXT);
	pgs_buf_varint(&b, (UINT64_C(1) << 30) - 1);
	pgs_buf_put(&b, "abc", 3);
	expect_body(&b, PGS_ERR_CORRUPT);
	pgs_buf_init(&b);
	f_items_dict(&b);
	pgs_buf_varint(&b, 1);
	pgs_buf_varint(&b, 0);
	pgs_buf_u8(&b, PGS_BLOB);
	pgs_buf_varint(&b, UINT64_MAX);
	expect_body(&b, PGS_ERR_CORRUPT);
	assert_int_equal(alloc_refused, 0);
	assert_true(alloc_max < (1 << 20));
}

/*
 * A compressed payload whose header and zstd frame both claim a 1 GiB body
 * but that carries no data: the decoder must not allocate 1 GiB before it
 * finds out (pgs_payload_body grows its buffer with the output).
 */
static void
test_forged_compressed_size_no_huge_allocation(void **state)
{
	/* zstd frame header: magic, FHD (single segment, 4-byte FCS), FCS = 2^30 - 1,
	 * then one last raw block of 0 bytes */
	uint32_t	claim = (1u << 30) - 1;
	uint8_t		frame[] = {0x28, 0xb5, 0x2f, 0xfd, 0xa0,
		(uint8_t) claim, (uint8_t) (claim >> 8), (uint8_t) (claim >> 16), (uint8_t) (claim >> 24),
	0x01, 0x00, 0x00};
	size_t		len;
	uint8_t    *p;
	db_conn    *db = replica(SITE_C, MS0);

	(void) state;
	p = seal_ex(frame, sizeof frame, 1, claim, &len);
	alloc_cap = 64u << 20;		/* 64 MiB */
	apply_expect(db, p, len, PGS_ERR_CORRUPT);
	if (alloc_max > (64u << 20))
		fail_msg("a %zu-byte payload asked for a %zu-byte allocation", len, alloc_max);
	test_free(p);
	mock_close(db);
}

static void
test_malformed_indexes_and_types(void **state)
{
	pgs_buf		b;
	int64_t		h0 = (int64_t) pgs_hlc_from_ms(MS0);

	(void) state;
	/* table index out of range */
	pgs_buf_init(&b);
	f_items_dict(&b);
	pgs_buf_varint(&b, 1);
	f_group(&b, 1, 1, 1, 0, 0, 0, 0);
	expect_body(&b, PGS_ERR_CORRUPT);
	/* cl_site out of range (2 sites) */
	pgs_buf_init(&b);
	f_items_dict(&b);
	pgs_buf_varint(&b, 1);
	f_group(&b, 0, 1, 1, 2, 0, 0, 0);
	expect_body(&b, PGS_ERR_CORRUPT);
	/* group site out of range */
	pgs_buf_init(&b);
	f_items_dict(&b);
	pgs_buf_varint(&b, 1);
	f_group(&b, 0, 1, 1, 0, 1, h0, 2);
	f_change_int(&b, 0, 1);
	expect_body(&b, PGS_ERR_CORRUPT);
	/* a change's own site out of range */
	pgs_buf_init(&b);
	f_items_dict(&b);
	pgs_buf_varint(&b, 1);
	f_group(&b, 0, 1, 1, 0, 1, h0, 0);
	pgs_buf_u8(&b, PGS_INT | 8);
	pgs_buf_svarint(&b, 1);
	pgs_buf_varint(&b, 7);
	pgs_buf_svarint(&b, 1);
	expect_body(&b, PGS_ERR_CORRUPT);
	/* no site at all, yet a group refers to one */
	pgs_buf_init(&b);
	f_dict(&b, 0, "items", 1, ITEMS_PK, 4, ITEMS_COLS);
	pgs_buf_varint(&b, 1);
	f_group(&b, 0, 1, 1, 0, 0, 0, 0);
	expect_body(&b, PGS_ERR_CORRUPT);
	/* column index out of range: by delta, and explicit */
	pgs_buf_init(&b);
	f_items_dict(&b);
	pgs_buf_varint(&b, 1);
	f_group(&b, 0, 1, 1, 0, 1, h0, 0);
	f_change_int(&b, 4, 1);		/* column 4 of 4 */
	expect_body(&b, PGS_ERR_CORRUPT);
	pgs_buf_init(&b);
	f_items_dict(&b);
	pgs_buf_varint(&b, 1);
	f_group(&b, 0, 1, 1, 0, 1, h0, 0);
	pgs_buf_u8(&b, PGS_INT | 15 << 4);
	pgs_buf_varint(&b, 4);
	pgs_buf_svarint(&b, 1);
	expect_body(&b, PGS_ERR_CORRUPT);
	pgs_buf_init(&b);
	f_items_dict(&b);
	pgs_buf_varint(&b, 1);
	f_group(&b, 0, 1, 1, 0, 1, h0, 0);
	pgs_buf_u8(&b, PGS_INT | 15 << 4);
	pgs_buf_varint(&b, UINT64_C(1) << 31);
	pgs_buf_svarint(&b, 1);
	expect_body(&b, PGS_ERR_CORRUPT);
	/* column order not increasing: explicit index repeats, goes back */
	pgs_buf_init(&b);
	f_items_dict(&b);
	pgs_buf_varint(&b, 1);
	f_group(&b, 0, 1, 1, 0, 2, h0, 0);
	f_change_int(&b, 2, 1);		/* column 2 */
	pgs_buf_u8(&b, PGS_INT | 15 << 4);
	pgs_buf_varint(&b, 2);		/* column 2 again */
	pgs_buf_svarint(&b, 1);
	expect_body(&b, PGS_ERR_CORRUPT);
	pgs_buf_init(&b);
	f_items_dict(&b);
	pgs_buf_varint(&b, 1);
	f_group(&b, 0, 1, 1, 0, 2, h0, 0);
	f_change_int(&b, 2, 1);
	pgs_buf_u8(&b, PGS_INT | 15 << 4);
	pgs_buf_varint(&b, 0);		/* back to column 0 */
	pgs_buf_svarint(&b, 1);
	expect_body(&b, PGS_ERR_CORRUPT);
	/* a column change on a deleted row (even cl) */
	pgs_buf_init(&b);
	f_items_dict(&b);
	pgs_buf_varint(&b, 1);
	f_group(&b, 0, 1, 2, 0, 1, h0, 0);
	f_change_int(&b, 0, 1);
	expect_body(&b, PGS_ERR_CORRUPT);
	/* causal length 0, and above INT64_MAX */
	pgs_buf_init(&b);
	f_items_dict(&b);
	pgs_buf_varint(&b, 1);
	f_group(&b, 0, 1, 0, 0, 0, 0, 0);
	expect_body(&b, PGS_ERR_CORRUPT);
	pgs_buf_init(&b);
	f_items_dict(&b);
	pgs_buf_varint(&b, 1);
	f_group(&b, 0, 1, UINT64_C(1) << 63, 0, 0, 0, 0);
	expect_body(&b, PGS_ERR_CORRUPT);
	/* invalid stamps: 0, past year 6400, and a change's own stamp wrapping to 0 */
	pgs_buf_init(&b);
	f_items_dict(&b);
	pgs_buf_varint(&b, 1);
	f_group(&b, 0, 1, 1, 0, 1, 0, 0);
	f_change_int(&b, 0, 1);
	expect_body(&b, PGS_ERR_CORRUPT);
	pgs_buf_init(&b);
	f_items_dict(&b);
	pgs_buf_varint(&b, 1);
	f_group(&b, 0, 1, 1, 0, 1, -1, 0);	/* 0 - 1 = UINT64_MAX */
	f_change_int(&b, 0, 1);
	expect_body(&b, PGS_ERR_CORRUPT);
	pgs_buf_init(&b);
	f_items_dict(&b);
	pgs_buf_varint(&b, 1);
	f_group(&b, 0, 1, 1, 0, 1, h0, 0);
	pgs_buf_u8(&b, PGS_INT | 8);
	pgs_buf_svarint(&b, -h0);
	pgs_buf_varint(&b, 0);
	pgs_buf_svarint(&b, 1);
	expect_body(&b, PGS_ERR_CORRUPT);
	/* NULL and unknown types in the key */
	for (int type = 0; type < 256; type++)
	{
		if (type >= PGS_INT && type <= PGS_BLOB)
			continue;
		pgs_buf_init(&b);
		f_items_dict(&b);
		pgs_buf_varint(&b, 1);
		pgs_buf_varint(&b, 0);
		pgs_buf_u8(&b, (uint8_t) type);
		pgs_buf_svarint(&b, 1);
		pgs_buf_varint(&b, 1);
		pgs_buf_varint(&b, 0);
		pgs_buf_varint(&b, 0);
		expect_body(&b, PGS_ERR_CORRUPT);
	}
	/* unknown value types 5-7 */
	for (int type = 5; type < 8; type++)
	{
		pgs_buf_init(&b);
		f_items_dict(&b);
		pgs_buf_varint(&b, 1);
		f_group(&b, 0, 1, 1, 0, 1, h0, 0);
		pgs_buf_u8(&b, (uint8_t) type);
		pgs_buf_svarint(&b, 1);
		expect_body(&b, PGS_ERR_CORRUPT);
	}
	/* truncated REAL */
	pgs_buf_init(&b);
	f_items_dict(&b);
	pgs_buf_varint(&b, 1);
	f_group(&b, 0, 1, 1, 0, 1, h0, 0);
	pgs_buf_u8(&b, PGS_REAL);
	pgs_buf_put(&b, "1234567", 7);
	expect_body(&b, PGS_ERR_CORRUPT);
	/* trailing bytes after the last row */
	pgs_buf_init(&b);
	f_items_dict(&b);
	pgs_buf_varint(&b, 1);
	f_group(&b, 0, 1, 1, 0, 0, 0, 0);
	pgs_buf_u8(&b, 0);
	expect_body(&b, PGS_ERR_CORRUPT);
	/* an empty body, a body of only a site dictionary */
	pgs_buf_init(&b);
	expect_body(&b, PGS_ERR_CORRUPT);
	pgs_buf_init(&b);
	pgs_buf_varint(&b, 0);
	expect_body(&b, PGS_ERR_CORRUPT);
	/* empty table name, empty column name, no key column */
	{
		static const char *const empty[] = {""};

		pgs_buf_init(&b);
		f_dict(&b, 1, "", 1, ITEMS_PK, 0, NULL);
		pgs_buf_varint(&b, 0);
		expect_body(&b, PGS_ERR_CORRUPT);
		pgs_buf_init(&b);
		f_dict(&b, 1, "items", 1, ITEMS_PK, 1, empty);
		pgs_buf_varint(&b, 0);
		expect_body(&b, PGS_ERR_CORRUPT);
		pgs_buf_init(&b);
		f_dict(&b, 1, "items", 1, empty, 0, NULL);
		pgs_buf_varint(&b, 0);
		expect_body(&b, PGS_ERR_CORRUPT);
		pgs_buf_init(&b);
		f_dict(&b, 1, "items", 0, NULL, 0, NULL);
		pgs_buf_varint(&b, 0);
		expect_body(&b, PGS_ERR_CORRUPT);
	}
}

static void
test_malformed_schema(void **state)
{
	pgs_buf		b;
	int64_t		h0 = (int64_t) pgs_hlc_from_ms(MS0);

	(void) state;
	/* unknown table */
	{
		static const char *const cols[] = {"x"};

		pgs_buf_init(&b);
		f_dict(&b, 1, "nosuch", 1, ITEMS_PK, 1, cols);
		pgs_buf_varint(&b, 1);
		f_group(&b, 0, 1, 1, 0, 1, h0, 0);
		f_change_int(&b, 0, 1);
		expect_body(&b, PGS_ERR_SCHEMA);
	}
	/* unknown column */
	{
		static const char *const cols[] = {"name", "colour"};

		pgs_buf_init(&b);
		f_dict(&b, 1, "items", 1, ITEMS_PK, 2, cols);
		pgs_buf_varint(&b, 1);
		f_group(&b, 0, 1, 1, 0, 1, h0, 0);
		f_change_int(&b, 0, 1);
		expect_body(&b, PGS_ERR_SCHEMA);
	}
	/* primary key mismatch: name, count */
	{
		static const char *const pk[] = {"ident"};
		static const char *const pk2[] = {"id", "id2"};

		pgs_buf_init(&b);
		f_dict(&b, 1, "items", 1, pk, 4, ITEMS_COLS);
		pgs_buf_varint(&b, 1);
		f_group(&b, 0, 1, 1, 0, 0, 0, 0);
		expect_body(&b, PGS_ERR_SCHEMA);
		pgs_buf_init(&b);
		f_dict(&b, 1, "items", 2, pk2, 4, ITEMS_COLS);
		pgs_buf_varint(&b, 1);
		pgs_buf_varint(&b, 0);
		pgs_buf_u8(&b, PGS_INT);
		pgs_buf_svarint(&b, 1);
		pgs_buf_u8(&b, PGS_INT);
		pgs_buf_svarint(&b, 1);
		pgs_buf_varint(&b, 1);
		pgs_buf_varint(&b, 0);
		pgs_buf_varint(&b, 0);
		expect_body(&b, PGS_ERR_SCHEMA);
	}
	/* a table name matching only by prefix */
	pgs_buf_init(&b);
	f_dict(&b, 1, "item", 1, ITEMS_PK, 4, ITEMS_COLS);
	pgs_buf_varint(&b, 1);
	f_group(&b, 0, 1, 1, 0, 0, 0, 0);
	expect_body(&b, PGS_ERR_SCHEMA);
}

/* a delete sent to a grow-only table is refused; the engine's savepoint undoes the rest */
static void
test_delete_to_gset(void **state)
{
	static const char *const pk[] = {"id"};
	static const char *const cols[] = {"msg"};
	pgs_buf		b;
	db_conn    *db = replica(SITE_C, MS0);
	size_t		len;
	uint8_t    *p;
	pgs_err		err;
	mock_snap  *snap;
	char		why[256];

	(void) state;
	/*
	 * The check is made row by row, after the site dictionary was interned
	 * and earlier rows written: like both engines, mock_apply runs pgs_apply
	 * in a savepoint that a failure rolls back.
	 */
	pgs_buf_init(&b);
	f_dict(&b, 1, "log", 1, pk, 1, cols);
	pgs_buf_varint(&b, 1);
	f_group(&b, 0, 1, 2, 0, 0, 0, 0);
	p = seal(&b, &len);
	snap = mock_snapshot(db);
	assert_int_equal(mock_apply(db, p, len, NULL, &err), PGS_ERR_SCHEMA);
	assert_int_equal(err.rc, PGS_ERR_SCHEMA);
	if (!mock_same_state(db, snap, why, sizeof why))
		fail_msg("rolled-back apply changed the replica: %s", why);
	mock_snapshot_free(db, snap);
	test_free(p);
	pgs_buf_free(&b);
	/* after a row that was applied: mock_apply (with its savepoint) leaves nothing */
	pgs_buf_init(&b);
	f_dict(&b, 1, "log", 1, pk, 1, cols);
	pgs_buf_varint(&b, 2);
	f_group(&b, 0, 1, 1, 0, 1, (int64_t) pgs_hlc_from_ms(MS0), 0);
	pgs_buf_u8(&b, PGS_TEXT);
	f_str(&b, "first");
	f_group(&b, 0, 2, 2, 0, 0, 0, 0);
	p = seal(&b, &len);
	snap = mock_snapshot(db);
	assert_int_equal(mock_apply(db, p, len, NULL, &err), PGS_ERR_SCHEMA);
	assert_non_null(strstr(err.msg, "grow-only"));
	if (!mock_same_state(db, snap, why, sizeof why))
		fail_msg("rolled-back apply changed the replica: %s", why);
	mock_snapshot_free(db, snap);
	test_free(p);
	pgs_buf_free(&b);
	mock_close(db);
}

/*
 * npk + ncols wrapping around to a small number: npk = 2, ncols = 2^64 - 1
 * sums to 1, passes the "<= remaining bytes" and "<= 32767" checks of
 * pgs_reader_open, which then allocates room for one name and reads two key
 * names into it (heap overflow under AddressSanitizer, found by
 * fuzz_payload). Reached by pgs_payload_info and by pgs_apply's validation
 * pass, before any table is resolved. Kept near the end: until fixed, it
 * aborts the binary.
 */
static void
test_column_count_wraparound(void **state)
{
	pgs_buf		b;

	(void) state;
	pgs_buf_init(&b);
	pgs_buf_varint(&b, 0);
	pgs_buf_varint(&b, 1);
	f_str(&b, "items");
	pgs_buf_varint(&b, 2);
	pgs_buf_varint(&b, UINT64_MAX);
	f_str(&b, "id");
	f_str(&b, "id2");
	f_str(&b, "x");
	expect_body(&b, PGS_ERR_CORRUPT);
}

/*
 * A table dictionary naming one column twice would map two payload columns
 * onto one local column (and hand the row write that column twice): refused
 * as corrupt before anything is written.
 */
static void
test_duplicate_column_names(void **state)
{
	static const char *const cols[] = {"name", "name"};
	pgs_buf		b;
	int64_t		h0 = (int64_t) pgs_hlc_from_ms(MS0);

	(void) state;
	pgs_buf_init(&b);
	f_dict(&b, 1, "items", 1, ITEMS_PK, 2, cols);
	pgs_buf_varint(&b, 1);
	f_group(&b, 0, 77, 1, 0, 2, h0, 0);
	pgs_buf_u8(&b, PGS_TEXT);
	f_str(&b, "first");
	pgs_buf_u8(&b, PGS_TEXT);
	f_str(&b, "second");
	expect_body_apply_only(&b, PGS_ERR_CORRUPT);
}

/*
 * The same with more duplicates than the local table has columns + 1: apply.c
 * sizes its per-row arrays (wcols, wvals) by the LOCAL column count, and a new
 * row life takes every change, so without the check this wrote past them
 * (heap overflow under AddressSanitizer).
 */
static void
test_duplicate_column_names_overflow(void **state)
{
	static const char *const pk[] = {"id"};
	static const char *const cols[] = {"msg", "msg", "msg", "msg", "msg", "msg"};
	pgs_buf		b;
	int64_t		h0 = (int64_t) pgs_hlc_from_ms(MS0);

	(void) state;
	pgs_buf_init(&b);
	f_dict(&b, 1, "log", 1, pk, 6, cols);	/* log has 1 column */
	pgs_buf_varint(&b, 1);
	f_group(&b, 0, 5, 1, 0, 6, h0, 0);
	for (int i = 0; i < 6; i++)
		f_change_int(&b, 0, i);
	expect_body_apply_only(&b, PGS_ERR_CORRUPT);
}

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
		cmocka_unit_test_setup(test_forged_valid, setup),
		cmocka_unit_test_setup(test_malformed_container, setup),
		cmocka_unit_test_setup(test_truncated_every_offset, setup),
		cmocka_unit_test_setup(test_every_bit_flipped, setup),
		cmocka_unit_test_setup(test_forged_counts_no_huge_allocation, setup),
		cmocka_unit_test_setup(test_forged_compressed_size_no_huge_allocation, setup),
		cmocka_unit_test_setup(test_malformed_indexes_and_types, setup),
		cmocka_unit_test_setup(test_malformed_schema, setup),
		cmocka_unit_test_setup(test_delete_to_gset, setup),
		cmocka_unit_test_setup(test_duplicate_column_names, setup),
		cmocka_unit_test_setup(test_column_count_wraparound, setup),
		cmocka_unit_test_setup(test_duplicate_column_names_overflow, setup),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
