/*
 * bench_sqlite.c — the fixed SQLite workload of `make bench`.
 *
 * 100,000 rows x 4 non-key columns (short TEXT, INTEGER, REAL, ~100-byte
 * TEXT), TEXT UUIDv7 keys, one transaction, file databases in WAL mode with
 * synchronous=NORMAL and an 8 MiB page cache on every database, plain and
 * tracked alike. With SQLite's default 2 MiB cache the three growing B-trees
 * of a tracked insert overflow the cache inside each statement, and SQLite
 * journals the spilled pages to a temp file; the bench also times that case
 * (one extra line). Every figure comes from one run, except the incremental
 * pulls (median of PULL_REPEAT pulls, each after its own one-row change).
 * Plain DELETE is timed as DELETE ... WHERE 1: without a WHERE clause SQLite
 * truncates the table instead of deleting row by row, which no table with a
 * trigger can do, so that would not be a like-for-like baseline.
 * Incremental pulls: tracked databases of 10k, 100k and 1M rows (made with
 * one INSERT ... SELECT, not timed), one row updated, then sync_payload(since)
 * with since = the version before the update.
 * Usage: bench_sqlite EXTENSION_PATH [ROWS [MAX_PULL_ROWS]]
 */
#include <sqlite3.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static const char *ext;
static int		   nrows = 100000;
static int		   max_pull_rows = 1000000;
#define PULL_REPEAT 7
static const char *cache_sql = "PRAGMA cache_size=-8192"; /* 8 MiB, see main() */
static char		   dir[] = "/tmp/pgsync-bench-XXXXXX";

static double
now(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static void
check(sqlite3 *db, int rc, const char *what)
{
	if (rc != SQLITE_OK && rc != SQLITE_DONE && rc != SQLITE_ROW)
	{
		fprintf(stderr, "bench: %s: %s\n", what, sqlite3_errmsg(db));
		exit(1);
	}
}

static void
exec(sqlite3 *db, const char *sql)
{
	char *err = NULL;

	if (sqlite3_exec(db, sql, NULL, NULL, &err) != SQLITE_OK)
	{
		fprintf(stderr, "bench: %s: %s\n", sql, err);
		exit(1);
	}
}

static sqlite3 *
open_db(const char *name, int tracked)
{
	char	 path[256];
	sqlite3 *db;
	char	*err = NULL;

	snprintf(path, sizeof path, "%s/%s.db", dir, name);
	check(NULL, sqlite3_open(path, &db), "open");
	exec(db, "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;");
	if (cache_sql)
		exec(db, cache_sql);
	if (tracked)
	{
		sqlite3_enable_load_extension(db, 1);
		if (sqlite3_load_extension(db, ext, NULL, &err) != SQLITE_OK)
		{
			fprintf(stderr, "bench: cannot load %s: %s\n", ext, err);
			exit(1);
		}
	}
	exec(db, "CREATE TABLE IF NOT EXISTS items(id TEXT PRIMARY KEY NOT NULL, name TEXT, qty "
			 "INTEGER, price REAL, note TEXT)");
	if (tracked)
		exec(db, "SELECT sync_init('items')");
	return db;
}

static double
file_mb(sqlite3 *db)
{
	sqlite3_stmt *st;
	double		  pages = 0, psize = 0;

	exec(db, "PRAGMA wal_checkpoint(TRUNCATE)");
	sqlite3_prepare_v2(db,
					   "SELECT (SELECT page_count FROM pragma_page_count), (SELECT page_size FROM "
					   "pragma_page_size)",
					   -1, &st, NULL);
	if (sqlite3_step(st) == SQLITE_ROW)
	{
		pages = sqlite3_column_double(st, 0);
		psize = sqlite3_column_double(st, 1);
	}
	sqlite3_finalize(st);
	return pages * psize / 1e6;
}

typedef struct row
{
	char	  id[64];
	char	  name[16];
	long long qty;
	double	  price;
	char	  note[101];
} row;

static row	   *rows;
static uint64_t raw_value_bytes;

static int
varint_len(uint64_t v)
{
	int n = 1;

	while (v >= 0x80)
		v >>= 7, n++;
	return n;
}

static void
make_rows(void)
{
	uint64_t ms = 1795000000000ULL;
	unsigned seed = 42;

	rows = calloc((size_t) nrows, sizeof(row));
	for (int i = 0; i < nrows; i++)
	{
		row		*r = &rows[i];
		unsigned a = (unsigned) rand_r(&seed), b = (unsigned) rand_r(&seed),
				 c = (unsigned) rand_r(&seed);
		long long z;

		if (i % 50 == 0)
			ms++; /* UUIDv7: time-ordered prefix, random tail */
		snprintf(r->id, sizeof r->id, "%08llx-%04llx-7%03x-%04x-%04x%08x", /* 36 chars */
				 (unsigned long long) ((ms >> 16) & 0xffffffff), (unsigned long long) (ms & 0xffff),
				 a & 0xfff, 0x8000 | (b & 0x3fff), c & 0xffff, (a ^ b ^ c) & 0xffffffffu);
		snprintf(r->name, sizeof r->name, "item-%d", i);
		r->qty = rand_r(&seed) % 1000;
		r->price = (rand_r(&seed) % 100000) / 100.0;
		for (int k = 0; k < 100; k++)
			r->note[k] = (char) ('a' + (k * 7 + i) % 26);
		r->note[100] = '\0';
		z = (r->qty << 1) ^ (r->qty >> 63);
		raw_value_bytes += 36 + strlen(r->name) + (uint64_t) varint_len((uint64_t) z) + 8 + 100;
	}
}

static double
insert_all(sqlite3 *db)
{
	sqlite3_stmt *st;
	double		  t0 = now();

	exec(db, "BEGIN");
	check(db, sqlite3_prepare_v2(db, "INSERT INTO items VALUES(?1, ?2, ?3, ?4, ?5)", -1, &st, NULL),
		  "prepare");
	for (int i = 0; i < nrows; i++)
	{
		sqlite3_bind_text(st, 1, rows[i].id, 36, SQLITE_STATIC);
		sqlite3_bind_text(st, 2, rows[i].name, -1, SQLITE_STATIC);
		sqlite3_bind_int64(st, 3, rows[i].qty);
		sqlite3_bind_double(st, 4, rows[i].price);
		sqlite3_bind_text(st, 5, rows[i].note, 100, SQLITE_STATIC);
		check(db, sqlite3_step(st), "insert");
		sqlite3_reset(st);
	}
	sqlite3_finalize(st);
	exec(db, "COMMIT");
	return now() - t0;
}

static double
timed(sqlite3 *db, const char *sql)
{
	double t0 = now();

	exec(db, "BEGIN");
	exec(db, sql);
	exec(db, "COMMIT");
	return now() - t0;
}

/*
 * dml_round: one more measurement of the write ratios on fresh files: plain
 * and tracked insert, UPDATE and DELETE (t[0..2] plain, t[3..5] tracked),
 * the two kinds taking turns in the order odd/even rounds swap. One timing
 * of each is at the mercy of whatever else the machine does; the ratios are
 * the median over the rounds.
 */
#define DML_ROUNDS 5
static void
drop_db(sqlite3 *db, const char *name)
{
	static const char *const suffix[] = {"", "-wal", "-shm"};
	char					 path[300];

	sqlite3_close(db);
	for (int i = 0; i < 3; i++)
	{
		snprintf(path, sizeof path, "%s/%s.db%s", dir, name, suffix[i]);
		unlink(path);
	}
}

static void
dml_round(int r, double t[6])
{
	char	 pn[32], tn[32];
	sqlite3 *db[2];

	snprintf(pn, sizeof pn, "plain_r%d", r);
	snprintf(tn, sizeof tn, "tracked_r%d", r);
	db[0] = open_db(pn, 0);
	db[1] = open_db(tn, 1);
	for (int k = 0; k < 2; k++)
	{
		int i = r % 2 ? 1 - k : k;

		t[3 * i] = insert_all(db[i]);
	}
	for (int k = 0; k < 2; k++)
	{
		int i = r % 2 ? 1 - k : k;

		t[3 * i + 1] = timed(db[i], "UPDATE items SET qty = qty + 1");
	}
	for (int k = 0; k < 2; k++)
	{
		int i = r % 2 ? 1 - k : k;

		t[3 * i + 2] = timed(db[i], i ? "DELETE FROM items" : "DELETE FROM items WHERE 1");
	}
	drop_db(db[0], pn);
	drop_db(db[1], tn);
}

/* payload: the whole table as one payload; returns seconds, fills blob */
static double
get_payload(sqlite3 *db, long long since, void **blob, int *len)
{
	sqlite3_stmt *st;
	double		  t0 = now();

	check(db, sqlite3_prepare_v2(db, "SELECT sync_payload(?1)", -1, &st, NULL), "prepare");
	sqlite3_bind_int64(st, 1, since);
	check(db, sqlite3_step(st), "sync_payload");
	*len = sqlite3_column_bytes(st, 0);
	*blob = malloc((size_t) *len + 1);
	memcpy(*blob, sqlite3_column_blob(st, 0), (size_t) *len);
	sqlite3_finalize(st);
	return now() - t0;
}

static double
apply(sqlite3 *db, const void *blob, int len, long long *won)
{
	sqlite3_stmt *st;
	double		  t0 = now();

	exec(db, "BEGIN");
	check(db, sqlite3_prepare_v2(db, "SELECT sync_apply_payload(?1)", -1, &st, NULL), "prepare");
	sqlite3_bind_blob(st, 1, blob, len, SQLITE_STATIC);
	check(db, sqlite3_step(st), "sync_apply_payload");
	*won = sqlite3_column_int64(st, 0);
	sqlite3_finalize(st);
	exec(db, "COMMIT");
	return now() - t0;
}

static int
cmp_double(const void *a, const void *b)
{
	double x = *(const double *) a, y = *(const double *) b;

	return x < y ? -1 : x > y;
}

static long long
one_int(sqlite3 *db, const char *sql)
{
	sqlite3_stmt *st;
	long long	  v = 0;

	check(db, sqlite3_prepare_v2(db, sql, -1, &st, NULL), "prepare");
	if (sqlite3_step(st) == SQLITE_ROW)
		v = sqlite3_column_int64(st, 0);
	sqlite3_finalize(st);
	return v;
}

/*
 * pull_one_change: a tracked database of n rows, then PULL_REPEAT times: update
 * one row (its own transaction) and time sync_payload(version before it).
 * Returns the median in milliseconds; warns unless each payload has one row.
 */
static double
pull_one_change(int n)
{
	char		  name[32], sql[512];
	sqlite3		 *db;
	sqlite3_stmt *st;
	double		  ms[PULL_REPEAT];

	snprintf(name, sizeof name, "pull%d", n);
	db = open_db(name, 1);
	snprintf(sql, sizeof sql,
			 "BEGIN; WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < %d) "
			 "INSERT INTO items SELECT sync_uuid(), 'item-' || i, i %% 1000, i / 100.0, "
			 "printf('%%.100c', 97 + i %% 26) FROM s; COMMIT",
			 n);
	exec(db, sql);
	check(db, sqlite3_prepare_v2(db, "SELECT sync_payload(?1)", -1, &st, NULL), "prepare");
	for (int k = 0; k < PULL_REPEAT; k++)
	{
		long long since = one_int(db, "SELECT sync_db_version()");
		double	  t0;

		snprintf(sql, sizeof sql,
				 "UPDATE items SET qty = qty + 1 WHERE id = (SELECT id FROM items LIMIT 1 OFFSET "
				 "%d)",
				 (int) ((long long) n * (2 * k + 1) / (2 * PULL_REPEAT)));
		exec(db, sql);
		t0 = now();
		sqlite3_bind_int64(st, 1, since);
		check(db, sqlite3_step(st), "sync_payload");
		ms[k] = (now() - t0) * 1e3;
		if (sqlite3_column_type(st, 0) != SQLITE_BLOB)
			fprintf(stderr, "bench: warning: incremental pull at %d rows returned no payload\n", n);
		sqlite3_reset(st);
	}
	sqlite3_finalize(st);
	sqlite3_close(db);
	snprintf(sql, sizeof sql, "%s/%s.db", dir, name);
	unlink(sql);
	qsort(ms, PULL_REPEAT, sizeof ms[0], cmp_double);
	return ms[PULL_REPEAT / 2];
}

static const char *
verdict(int ok)
{
	return ok ? "met" : "missed";
}

static uint32_t
le32(const unsigned char *p)
{
	return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t) p[3] << 24;
}

int
main(int argc, char **argv)
{
	sqlite3 *plain, *tracked, *empty, *uptodate;
	double t_plain, t_tracked, t_upd_plain, t_upd, t_del_plain, t_del, mb_plain, mb_tracked, t_pay,
		t_apply_empty, t_apply_lose, t_apply_half, t_plain_default, t_tracked_default;
	static const int pull_sizes[] = {10000, 100000, 1000000};
	double			 pull_ms[3];
	int				 npull = 0;
	void			*pay, *pay2;
	int				 len, len2;
	long long		 won;
	long long		 changes;
	double			 r_ins_med, r_upd_med, r_del_med;

	if (argc < 2)
	{
		fprintf(stderr, "usage: bench_sqlite EXTENSION [ROWS]\n");
		return 2;
	}
	ext = argv[1];
	if (argc > 2)
		nrows = atoi(argv[2]);
	if (argc > 3)
		max_pull_rows = atoi(argv[3]);
	if (!mkdtemp(dir))
		return 1;
	make_rows();
	changes = 4LL * nrows;

	plain = open_db("plain", 0);
	tracked = open_db("tracked", 1);
	t_plain = insert_all(plain);
	t_tracked = insert_all(tracked);
	mb_plain = file_mb(plain);
	mb_tracked = file_mb(tracked);

	t_pay = get_payload(tracked, 0, &pay, &len);

	empty = open_db("empty", 1);
	t_apply_empty = apply(empty, pay, len, &won);
	if (won != changes + nrows)
		fprintf(stderr, "bench: warning: apply into empty won %lld, expected %lld\n", won,
				changes + nrows);
	uptodate = empty;
	t_apply_lose = apply(uptodate, pay, len, &won);
	if (won != 0)
		fprintf(stderr, "bench: warning: apply into up-to-date replica won %lld\n", won);

	/* half winning: the source edits every column of half the rows */
	exec(tracked, "BEGIN; UPDATE items SET name = name || '*', qty = qty + 1, price = price + 1, "
				  "note = upper(note) "
				  "WHERE rowid % 2 = 0; COMMIT");
	get_payload(tracked, 0, &pay2, &len2);
	t_apply_half = apply(uptodate, pay2, len2, &won);
	if (won != changes / 2)
		fprintf(stderr, "bench: warning: half apply won %lld, expected %lld\n", won, changes / 2);

	/* the same tracked insert with SQLite's default 2 MiB page cache */
	{
		sqlite3 *p2, *t2;

		cache_sql = NULL;
		p2 = open_db("plain2", 0);
		t2 = open_db("tracked2", 1);
		t_plain_default = insert_all(p2);
		t_tracked_default = insert_all(t2);
		sqlite3_close(p2);
		sqlite3_close(t2);
	}

	t_upd_plain = timed(plain, "UPDATE items SET qty = qty + 1");
	t_upd = timed(tracked, "UPDATE items SET qty = qty + 1");
	t_del_plain = timed(plain, "DELETE FROM items WHERE 1");
	t_del = timed(tracked, "DELETE FROM items");

	/* the write ratios: this first round and DML_ROUNDS - 1 more on fresh files */
	{
		double ratio[3][DML_ROUNDS], tm[6][DML_ROUNDS];

		cache_sql = "PRAGMA cache_size=-8192";
		tm[0][0] = t_plain, tm[1][0] = t_upd_plain, tm[2][0] = t_del_plain;
		tm[3][0] = t_tracked, tm[4][0] = t_upd, tm[5][0] = t_del;
		for (int r = 1; r < DML_ROUNDS; r++)
		{
			double t[6];

			dml_round(r, t);
			for (int k = 0; k < 6; k++)
				tm[k][r] = t[k];
		}
		for (int r = 0; r < DML_ROUNDS; r++)
			for (int k = 0; k < 3; k++)
				ratio[k][r] = tm[3 + k][r] / tm[k][r];
		for (int k = 0; k < 6; k++)
			qsort(tm[k], DML_ROUNDS, sizeof(double), cmp_double);
		for (int k = 0; k < 3; k++)
			qsort(ratio[k], DML_ROUNDS, sizeof(double), cmp_double);
		t_plain = tm[0][DML_ROUNDS / 2], t_upd_plain = tm[1][DML_ROUNDS / 2];
		t_del_plain = tm[2][DML_ROUNDS / 2], t_tracked = tm[3][DML_ROUNDS / 2];
		t_upd = tm[4][DML_ROUNDS / 2], t_del = tm[5][DML_ROUNDS / 2];
		r_ins_med = ratio[0][DML_ROUNDS / 2], r_upd_med = ratio[1][DML_ROUNDS / 2];
		r_del_med = ratio[2][DML_ROUNDS / 2];
	}
	for (int i = 0; i < 3 && pull_sizes[i] <= max_pull_rows; i++)
		pull_ms[npull++] = pull_one_change(pull_sizes[i]);

	{
		const unsigned char *h = pay;
		uint32_t			 body = le32(h + 40), stored = le32(h + 44);
		double				 per_change = (double) body / changes;
		double				 overhead = ((double) body - (double) raw_value_bytes) / changes;

		double r_ins = r_ins_med, r_upd = r_upd_med, r_del = r_del_med;
		double r_size = mb_tracked / mb_plain;

		printf("SQLite (%d rows x 4 columns, TEXT UUIDv7 keys, one transaction, WAL, 8 MiB page "
			   "cache; write ratios: median of %d rounds on fresh files)\n",
			   nrows, DML_ROUNDS);
		printf("| metric | value | target | |\n|---|---|---|---|\n");
		printf("| plain insert | %.0f rows/s | | |\n", nrows / t_plain);
		printf("| tracked insert | %.0f rows/s (%.2fx plain time) | <= 2.0x | %s |\n",
			   nrows / t_tracked, r_ins, verdict(r_ins <= 2.0));
		printf(
			"| tracked insert, default 2 MiB page cache | %.0f rows/s (%.2fx plain time) | | |\n",
			nrows / t_tracked_default, t_tracked_default / t_plain_default);
		printf("| update one column, all rows | %.0f rows/s tracked, %.0f plain (%.2fx) | <= 3.0x "
			   "| %s |\n",
			   nrows / t_upd, nrows / t_upd_plain, r_upd, verdict(r_upd <= 3.0));
		printf("| delete all rows (plain: DELETE ... WHERE 1) | %.0f rows/s tracked, %.0f plain "
			   "(%.2fx) | <= 3.0x | %s |\n",
			   nrows / t_del, nrows / t_del_plain, r_del, verdict(r_del <= 3.0));
		printf("| database size | %.1f MB plain, %.1f MB tracked (%.2fx) | <= 1.6x | %s |\n",
			   mb_plain, mb_tracked, r_size, verdict(r_size <= 1.6));
		printf("| sync_payload | %.0f column changes/s, %.1f bytes/change (%u B body, %u B stored) "
			   "| | |\n",
			   changes / t_pay, per_change, body, stored);
		printf("| payload overhead beyond raw value bytes (keys counted as values) | %.2f "
			   "bytes/change | <= 4 | %s |\n",
			   overhead, verdict(overhead <= 4));
		printf("| sync_apply_payload into empty replica | %.0f column changes/s | >= 500,000 | %s "
			   "|\n",
			   changes / t_apply_empty, verdict(changes / t_apply_empty >= 500000));
		printf("| sync_apply_payload, every change loses | %.0f column changes/s | >= 2,000,000 | "
			   "%s |\n",
			   changes / t_apply_lose, verdict(changes / t_apply_lose >= 2000000));
		printf("| sync_apply_payload, half the changes win | %.0f column changes/s | | |\n",
			   changes / t_apply_half);
		for (int i = 0; i < npull; i++)
			printf(
				"| incremental sync_payload, 1 changed row of %d (median of %d) | %.3f ms | <= 1 "
				"ms | %s |\n",
				pull_sizes[i], PULL_REPEAT, pull_ms[i], verdict(pull_ms[i] <= 1.0));
	}
	sqlite3_close(plain);
	sqlite3_close(tracked);
	sqlite3_close(empty);
	free(pay);
	free(pay2);
	free(rows);
	{
		char cmd[300];

		snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
		if (system(cmd) != 0)
			return 1;
	}
	return 0;
}
