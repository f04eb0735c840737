/*
 * fuzz_payload.c — libFuzzer target for the payload decoder and the apply
 * driver (core/payload.c, core/value.c, core/info.c, core/apply.c), built by
 * `make build/fuzz_payload` and run by `make fuzz`.
 *
 * Input modes, chosen by the first byte:
 *   even (a real payload starts with 'P' = 0x50): the input is the payload,
 *     as it would arrive; the checksum stops almost every mutation early;
 *   odd: the rest is a payload whose checksum is recomputed first, so the
 *     mutations reach the body parser; with bit 1 also set, stored_len (and
 *     body_len for an uncompressed body) are fixed to the real length too.
 *
 * Each input goes through pgs_payload_info and pgs_apply on a fresh mock
 * replica holding the tables of the seed corpus (mock_add_std_tables) and a
 * few rows, so merges meet existing clocks. Oracles beyond "no crash, no
 * leak, no sanitizer report":
 *   - an input that applies must apply again as a no-op (won == 0);
 *   - the replica it produced, rebuilt into a payload and applied to an
 *     empty replica, must give an equal replica (rows and clocks);
 *   - an allocation of the core is never larger than 64 MiB (the capped
 *     allocator below refuses it; see the core's forged-length checks).
 * Seed corpus: test/fuzz/corpus/, written by test/fuzz/make_corpus.c.
 */
#include "../mockdb.h"

#include <stdlib.h>
#include <string.h>

#define FUZZ_ALLOC_CAP ((size_t) 64 << 20)

static void *
cap_malloc(size_t n)
{
	return n > FUZZ_ALLOC_CAP ? NULL : malloc(n);
}

static void *
cap_realloc(void *p, size_t n)
{
	return n > FUZZ_ALLOC_CAP ? NULL : realloc(p, n);
}

static const uint8_t FUZZ_SITE[16] = {0x01, 0x8b, 0xd0, 0, 0, 0, 0x70, 0,
									  0x80, 0,	  0,	0, 0, 0, 0,	   0xcc};
static const uint8_t FUZZ_SITE2[16] = {0x01, 0x8b, 0xd0, 0, 0, 0, 0x70, 0,
									   0x80, 0,	   0,	 0, 0, 0, 0,	0xdd};

static db_conn *
fuzz_replica(const uint8_t *site, bool rows)
{
	db_conn *db = mock_open(site);

	mock_add_std_tables(db);
	mock_set_clock(db, UINT64_C(1700000000000));
	if (rows)
	{
		pgs_value k1 = mock_int(1), k2 = mock_int(2);
		pgs_value v[4] = {mock_text("one"), mock_int(1), mock_real(1.5), mock_null()};
		pgs_value tk[2] = {mock_text("x"), mock_int(0)};
		pgs_value tv[2] = {mock_text("a"), mock_int(2)};

		mock_local_insert(db, mock_table(db, "items"), &k1, v);
		mock_local_insert(db, mock_table(db, "items"), &k2, v);
		mock_local_delete(db, mock_table(db, "items"), &k2);
		mock_local_insert(db, mock_table(db, "tags"), tk, tv);
		mock_local_insert(db, mock_table(db, "log"), &k1, v);
	}
	return db;
}

static void
check_rebuild(db_conn *db)
{
	db_conn *fresh = fuzz_replica(FUZZ_SITE2, false);
	pgs_buf	 out;
	pgs_err	 err;
	char	 why[512];

	pgs_buf_init(&out);
	if (mock_build(db, 0, NULL, 1, &out, &err) != PGS_OK)
	{
		fprintf(stderr, "fuzz: rebuilding the merged replica failed: %s\n", err.msg);
		abort();
	}
	if (out.len && mock_apply(fresh, out.p, out.len, NULL, &err) != PGS_OK)
	{
		fprintf(stderr, "fuzz: applying the rebuilt payload failed: %s\n", err.msg);
		abort();
	}
	if (!mock_equal(db, fresh, MOCK_CMP_ROWS | MOCK_CMP_CLOCKS, why, sizeof why))
	{
		fprintf(stderr, "fuzz: rebuilt replica differs: %s\n", why);
		abort();
	}
	pgs_buf_free(&out);
	mock_close(fresh);
}

static void
run(const uint8_t *p, size_t len)
{
	char		   *json = NULL;
	pgs_err			err;
	pgs_apply_stats st;
	db_conn		   *db;
	pgs_rc			rc;

	if (pgs_payload_info(p, len, &json, &err) == PGS_OK)
	{
		if (!json || json[0] != '{')
			abort();
		pgs_free(json);
	}
	else if (json)
		abort();

	db = fuzz_replica(FUZZ_SITE, true);
	rc = mock_apply(db, p, len, &st, &err);
	if (rc != PGS_OK && (err.rc != rc || err.msg[0] == '\0'))
		abort(); /* every failure explains itself */
	if (rc == PGS_OK)
	{
		pgs_apply_stats again;

		if (mock_apply(db, p, len, &again, &err) != PGS_OK)
		{
			fprintf(stderr, "fuzz: second apply failed: %s\n", err.msg);
			abort();
		}
		if (again.won != 0 || again.rejected != 0)
		{
			fprintf(stderr, "fuzz: second apply won %lld changes\n", (long long) again.won);
			abort();
		}
		check_rebuild(db);
	}
	mock_close(db);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static bool init;

	if (!init)
	{
		static const pgs_allocator a = {cap_malloc, cap_realloc, free};

		pgs_set_allocator(&a);
		init = true;
	}
	if (size > 0 && (data[0] & 1))
	{
		size_t	 len = size - 1;
		uint8_t *copy = malloc(len ? len : 1);

		memcpy(copy, data + 1, len);
		if (len >= PGS_HEADER_LEN)
		{
			if (data[0] & 2)
			{
				uint32_t stored = (uint32_t) (len - PGS_HEADER_LEN);

				for (int i = 0; i < 4; i++)
				{
					copy[44 + i] = (uint8_t) (stored >> (8 * i));
					if (!(copy[5] & 1))
						copy[40 + i] = (uint8_t) (stored >> (8 * i));
				}
			}
			mock_reseal(copy, len);
		}
		run(copy, len);
		free(copy);
	}
	else
		run(data, size);
	{
		/* the same bytes as a continuation token (they come from clients) */
		pgs_token t;
		pgs_err	  err;

		(void) pgs_token_decode(data, size, &t, &err);
	}
	return 0;
}
