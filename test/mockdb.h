/*
 * mockdb.h — an in-memory engine behind database.h, for the unit tests and
 * the fuzzer.
 *
 * A mock replica holds synced tables (npk key columns + ncols columns), one
 * entry per primary key that carries both the base row (alive or not) and its
 * clock row (cl, ver, clock blob), a site table (index 0 = own site), a
 * db_version and a persisted HLC. It follows sqlite_ext/ closely:
 *   - versions: one db_version per write transaction, taken lazily by the
 *     first captured change or db_apply_version; mock_begin()/mock_commit()
 *     open and close a transaction, and a mock_local_* call or pgs_apply made
 *     outside one runs in its own (autocommit);
 *   - mock_local_* make LOCAL edits exactly as the SQLite triggers record
 *     them (sl_capture.c): new key -> cl 1, every column stamped {tick, ver,
 *     site 0}; insert over a tombstone -> cl + 1, same; update -> each column
 *     whose value changed stamped max(tick, old stamp + 1); delete -> cl + 1,
 *     column stamps cleared, cl_ver = ver, cl_site = 0.
 *   - time: each replica has its own clock (mock_set_clock); 0 means the wall
 *     clock. Tests use fixed clocks so runs are reproducible.
 * The mock is stricter than an engine where that finds core bugs: a
 * db_clock_put whose `exists` disagrees with the store, a site index out of
 * range, or a column index out of range is an error (PGS_ERR_DB).
 *
 * Every byte is allocated with pgs_malloc, so the tests' tracking allocator
 * sees mock leaks too. Nothing here is thread-safe.
 */
#ifndef PGSYNC_MOCKDB_H
#define PGSYNC_MOCKDB_H

#include "database.h"

#include <stdio.h>

/* mock_open: a replica with the given site id (NULL: a fresh UUIDv7). */
db_conn *mock_open(const uint8_t site[16]);
void	 mock_close(db_conn *db);

/* mock_add_table: a synced table; names are copied. */
db_table *mock_add_table(db_conn *db, const char *name, db_algo algo, int npk,
						 const char *const *pk_names, int ncols, const char *const *col_names);
db_table *mock_table(db_conn *db, const char *name);

/*
 * mock_add_std_tables: the schema shared by the tests, the fuzzer and its
 * corpus: items(id; name, qty, price, data), tags(k1, k2; a, b) and the
 * grow-only log(id; msg).
 */
void mock_add_std_tables(db_conn *db);

/* ---- clocks and transactions ---- */

void	 mock_set_clock(db_conn *db, uint64_t ms); /* 0 = wall clock */
void	 mock_advance(db_conn *db, int64_t ms);
int64_t	 mock_version(db_conn *db); /* current db_version */
uint64_t mock_hlc(db_conn *db);		/* persisted HLC */
void	 mock_begin(db_conn *db);
void	 mock_commit(db_conn *db);

/* ---- local edits, as the SQLite triggers capture them ---- */

/*
 * mock_local_insert inserts (or, for a live key, INSERT OR REPLACEs) a row;
 * vals has ncols values (NULL: every column NULL). PGS_ERR_VALUE when the key
 * holds a NULL or a live row of a grow-only table is replaced.
 */
pgs_rc mock_local_insert(db_conn *db, db_table *t, const pgs_value *pk, const pgs_value *vals);
/* mock_local_update sets n columns of a live row; no-op if the row is absent. */
pgs_rc mock_local_update(db_conn *db, db_table *t, const pgs_value *pk, int n, const int *cols,
						 const pgs_value *vals);
/* mock_local_delete deletes a live row; no-op if absent. */
pgs_rc mock_local_delete(db_conn *db, db_table *t, const pgs_value *pk);

/* ---- inspection ---- */

/* mock_row_get: the live row's ncols values (engine memory), or NULL. */
const pgs_value *mock_row_get(db_conn *db, db_table *t, const pgs_value *pk);
/* mock_clock: decode pk's clock; false when there is none. cols: ncols. */
bool	 mock_clock(db_conn *db, db_table *t, const pgs_value *pk, pgs_rowclock *out);
int		 mock_row_count(db_conn *db, db_table *t);	 /* live rows */
int		 mock_clock_count(db_conn *db, db_table *t); /* clock rows */
uint32_t mock_site_count(db_conn *db);

/* ---- permissions ---- */

/* mock_deny: db_row_write and db_row_delete of pk return PGS_ERR_PERMISSION. */
void mock_deny(db_conn *db, db_table *t, const pgs_value *pk);
void mock_allow_all(db_conn *db);
int	 mock_rejections(db_conn *db); /* db_reject calls so far */
/* mock_refuse_site: db_site_check refuses stamps of this site (PS002). */
void mock_refuse_site(db_conn *db, const uint8_t site[16]);
/*
 * mock_canonical: the replica stores values in forms of its own, as Postgres
 * does (db_row_forms, docs/TYPES.md): mode 1 lower-cases the ASCII letters
 * of TEXT and stores REAL -0.0 as 0.0; mode 2 upper-cases them (another
 * column type); 0: as received. Local edits (mock_local_*) store what they
 * are given.
 */
void mock_canonical(db_conn *db, int mode);
/* mock_add_parent: child references parent by a foreign key (apply order). */
void mock_add_parent(db_conn *db, db_table *child, db_table *parent);

/* ---- views and fates (mockdb_view.c) ---- */

int	   mock_held_count(db_conn *db);
int	   mock_forgotten(db_conn *db); /* rows removed by db_row_forget */
pgs_rc mock_apply_held(db_conn *db, pgs_apply_stats *st, pgs_err *err);
void   mock_view_free(db_conn *db);

/* ---- whole-replica comparison, snapshots ---- */

#define MOCK_CMP_ROWS 1	  /* live rows and their values, bit for bit */
#define MOCK_CMP_CLOCKS 2 /* cl and every column's (hlc, site id) */

/*
 * mock_equal compares the synced tables of a and b (by table name and key).
 * On a difference it writes a description into why (may be NULL) and
 * returns false.
 */
bool mock_equal(db_conn *a, db_conn *b, int what, char *why, size_t whylen);

/*
 * mock_snapshot copies the whole state (tables, clocks, sites, version, HLC);
 * mock_same_state tells if db is still exactly as snap (raw clock blobs and
 * versions included); mock_restore puts snap back into db (db's table
 * pointers stay valid) and frees it; mock_snapshot_free drops it.
 */
typedef struct mock_snap mock_snap;
mock_snap				*mock_snapshot(db_conn *db);
bool mock_same_state(db_conn *db, const mock_snap *snap, char *why, size_t whylen);
void mock_restore(db_conn *db, mock_snap *snap);
void mock_snapshot_free(db_conn *db, mock_snap *snap);

/*
 * mock_apply runs pgs_apply the way an engine does: in a transaction, inside
 * a savepoint that is rolled back when pgs_apply fails.
 */
pgs_rc mock_apply(db_conn *db, const uint8_t *payload, size_t len, pgs_apply_stats *st,
				  pgs_err *err);

/* mock_build runs pgs_build with until = db_version_safe. */
pgs_rc mock_build(db_conn *db, int64_t since, const uint8_t *exclude_site, int compress,
				  pgs_buf *out, pgs_err *err);

/* mock_dump prints the tables (debugging aid). */
void mock_dump(db_conn *db, FILE *f);

/* ---- payload surgery for tests ---- */

/* mock_reseal recomputes the checksum at offset 48 of a payload (len >= 56). */
void mock_reseal(uint8_t *payload, size_t len);

/* value constructors (TEXT/BLOB point at the caller's bytes) */
pgs_value mock_int(int64_t i);
pgs_value mock_real(double r);
pgs_value mock_text(const char *s);
pgs_value mock_blob(const void *p, uint32_t len);
pgs_value mock_null(void);

/*
 * In a cmocka test (cmocka.h included first): mock_test_allocator() binds the
 * core allocator to cmocka's tracking allocator, so every block the core or
 * the mock leaks fails the test that leaked it.
 */
#ifdef CMOCKA_H_
static inline void *
mock_tmalloc(size_t n)
{
	return test_malloc(n);
}
static inline void *
mock_trealloc(void *p, size_t n)
{
	return test_realloc(p, n);
}
static inline void
mock_tfree(void *p)
{
	test_free(p);
}
static inline void
mock_test_allocator(void)
{
	static const pgs_allocator a = {mock_tmalloc, mock_trealloc, mock_tfree};

	pgs_set_allocator(&a);
}
#endif

#endif /* PGSYNC_MOCKDB_H */
