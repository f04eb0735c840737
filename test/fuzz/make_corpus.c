/*
 * make_corpus.c — writes the seed corpus of fuzz_payload into a directory:
 * a handful of small valid payloads over the tables of mock_add_std_tables,
 * made by mock replicas with fixed site ids and clocks (so the bytes are the
 * same on every run), each also with the 0x01 / 0x03 prefixes that select
 * fuzz_payload's re-sealing modes.
 *
 *   gcc -std=c11 -D_GNU_SOURCE -I. -o build/make_corpus
 *       test/fuzz/make_corpus.c test/mockdb.c core/[a-z]*.c
 *       -lzstd -lxxhash -lcjson -lm
 *   build/make_corpus test/fuzz/corpus
 */
#include "../mockdb.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define MS0 UINT64_C(1700000000000)

static const uint8_t SITE_A[16] = {0x01, 0x8b, 0xd0, 0, 0, 0, 0x70, 0,
								   0x80, 0,	   0,	 0, 0, 0, 0,	0xaa};
static const uint8_t SITE_B[16] = {0x01, 0x8b, 0xd0, 0, 0, 0, 0x70, 0,
								   0x80, 0,	   0,	 0, 0, 0, 0,	0xbb};

static const char *outdir;

static void
write_file(const char *name, uint8_t prefix, const pgs_buf *b)
{
	char  path[512];
	FILE *f;

	snprintf(path, sizeof path, "%s/%s%s", outdir, name,
			 prefix == 1   ? "-reseal"
			 : prefix == 3 ? "-refit"
						   : "");
	if (!(f = fopen(path, "wb")))
	{
		perror(path);
		exit(1);
	}
	if (prefix)
		fputc(prefix, f);
	fwrite(b->p, 1, b->len, f);
	fclose(f);
}

static void
emit(const char *name, db_conn *db, int64_t since, const uint8_t *exclude, int compress)
{
	pgs_buf out;
	pgs_err err;

	pgs_buf_init(&out);
	if (mock_build(db, since, exclude, compress, &out, &err) != PGS_OK || out.len == 0)
	{
		fprintf(stderr, "make_corpus: %s: %s\n", name, out.len ? err.msg : "empty payload");
		exit(1);
	}
	write_file(name, 0, &out);
	write_file(name, 1, &out);
	write_file(name, 3, &out);
	pgs_buf_free(&out);
}

static void
sync_all(db_conn *from, db_conn *to)
{
	pgs_buf out;
	pgs_err err;

	pgs_buf_init(&out);
	if (mock_build(from, 0, NULL, 1, &out, &err) != PGS_OK ||
		(out.len && mock_apply(to, out.p, out.len, NULL, &err) != PGS_OK))
	{
		fprintf(stderr, "make_corpus: sync: %s\n", err.msg);
		exit(1);
	}
	pgs_buf_free(&out);
}

static db_conn *
replica(const uint8_t *site, uint64_t ms)
{
	db_conn *db = mock_open(site);

	mock_add_std_tables(db);
	mock_set_clock(db, ms);
	return db;
}

int
main(int argc, char **argv)
{
	db_conn	 *a, *b;
	db_table *items, *tags, *log;

	if (argc != 2)
	{
		fprintf(stderr, "usage: make_corpus DIR\n");
		return 2;
	}
	outdir = argv[1];
	if (mkdir(outdir, 0755) != 0 && errno != EEXIST)
	{
		perror(outdir);
		return 1;
	}
	a = replica(SITE_A, MS0);
	b = replica(SITE_B, MS0 + 7);
	items = mock_table(a, "items");
	tags = mock_table(a, "tags");
	log = mock_table(a, "log");

	/* 1. inserts into every table, every value type */
	{
		pgs_value k = mock_int(1);
		pgs_value v[4] = {mock_text("one"), mock_int(-42), mock_real(2.5),
						  mock_blob("\x00\xff", 2)};
		pgs_value tk[2] = {mock_text("x"), mock_int(0)};
		pgs_value tv[2] = {mock_null(), mock_real(-0.0)};
		pgs_value lv = mock_text("log line");

		mock_local_insert(a, items, &k, v);
		k = mock_int(INT64_MIN);
		v[0] = mock_text("\xc3\xa9t\xc3\xa9");
		v[2] = mock_real(NAN);
		mock_local_insert(a, items, &k, v);
		mock_local_insert(a, tags, tk, tv);
		k = mock_int(7);
		mock_local_insert(a, log, &k, &lv);
	}
	emit("inserts", a, 0, NULL, 0);

	/* 2. updates of single columns (a group per row, explicit deltas) */
	mock_advance(a, 1000);
	{
		pgs_value k = mock_int(1);
		int		  c = 3;
		pgs_value v = mock_text("changed");

		mock_local_update(a, items, &k, 1, &c, &v);
	}
	emit("update", a, mock_version(a) - 1, NULL, 0);

	/* 3. deletes and a resurrection */
	{
		pgs_value k = mock_int(1);
		pgs_value k2 = mock_int(INT64_MIN);
		pgs_value v[4] = {mock_text("back"), mock_null(), mock_null(), mock_null()};

		mock_local_delete(a, items, &k2);
		mock_local_delete(a, items, &k);
		mock_advance(a, 10);
		mock_local_insert(a, items, &k, v);
	}
	emit("delete-resurrect", a, 0, NULL, 0);

	/* 4. two sites: b edits one column of a's row, relays both (own stamps) */
	sync_all(a, b);
	mock_advance(b, 5000);
	{
		pgs_value k = mock_int(1);
		int		  c = 1;
		pgs_value v = mock_int(99);

		mock_local_update(b, mock_table(b, "items"), &k, 1, &c, &v);
	}
	emit("relay-two-sites", b, 0, NULL, 0);
	emit("exclude-site", b, 0, SITE_A, 0);

	/* 5. compressed: enough similar rows for zstd to pay */
	for (int i = 0; i < 40; i++)
	{
		pgs_value k = mock_int(100 + i);
		pgs_value v[4] = {mock_text("repetitive repetitive"), mock_int(i), mock_real(0.25),
						  mock_null()};

		mock_local_insert(a, items, &k, v);
	}
	emit("compressed", a, 0, NULL, 1);

	mock_close(a);
	mock_close(b);
	return 0;
}
