/*
 * payload_fixtures.h — what test_payload.c and test_decode.c share: the
 * capped cmocka allocator, mock replicas and their sites, small edits, and
 * JSON helpers. Included once per test binary; unused helpers are fine.
 */
#ifndef PAYLOAD_FIXTURES_H
#define PAYLOAD_FIXTURES_H

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wunused-variable"

/* ---- allocator: cmocka's, with an optional cap per allocation ---- */

static size_t alloc_cap; /* 0 = no cap */
static size_t alloc_max; /* largest request seen */
static int	  alloc_refused;

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

static const uint8_t SITE_A[16] = {0x01, 0x8b, 0xd0, 0, 0, 0, 0x70, 0,
								   0x80, 0,	   0,	 0, 0, 0, 0,	0xaa};
static const uint8_t SITE_B[16] = {0x01, 0x8b, 0xd0, 0, 0, 0, 0x70, 0,
								   0x80, 0,	   0,	 0, 0, 0, 0,	0xbb};
static const uint8_t SITE_C[16] = {0x01, 0x8b, 0xd0, 0, 0, 0, 0x70, 0,
								   0x80, 0,	   0,	 0, 0, 0, 0,	0xcc};

enum
{
	NAME,
	QTY,
	PRICE,
	DATA /* columns of items */
};

static db_conn *
replica(const uint8_t *site, uint64_t ms)
{
	db_conn *db = mock_open(site);

	mock_add_std_tables(db);
	mock_set_clock(db, ms);
	return db;
}

static void
assert_equal_dbs(db_conn *a, db_conn *b)
{
	char why[512];

	if (!mock_equal(a, b, MOCK_CMP_ROWS | MOCK_CMP_CLOCKS, why, sizeof why))
		fail_msg("replicas differ: %s", why);
}

/* build (since, now] on from and apply it to to; returns the apply stats */
static pgs_apply_stats
sync_once(db_conn *from, db_conn *to, int64_t since)
{
	pgs_buf			out;
	pgs_err			err;
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
	pgs_value pk = mock_int(id);
	pgs_value v[4] = {mock_text(name), mock_int(qty), mock_real(price), mock_null()};

	assert_int_equal(mock_local_insert(db, mock_table(db, "items"), &pk, v), PGS_OK);
}

static void
update_col(db_conn *db, int64_t id, int col, pgs_value v)
{
	pgs_value pk = mock_int(id);

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
	char   *text = NULL;
	pgs_err err;
	cJSON  *j;

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

#pragma GCC diagnostic pop

#endif
