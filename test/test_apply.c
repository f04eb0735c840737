/*
 * test_apply.c — pgs_apply between mock replicas (core/apply.c): the
 * scenarios people ask about, then a randomized property test.
 *
 * Scenarios: concurrent edits of different columns merge; the later edit of
 * a column wins (and an edit made after seeing another wins even on a clock
 * that is behind); a delete beats a concurrent update; a re-insert after a
 * delete resurrects the row; duplicate delivery is a no-op; out-of-order
 * delivery converges; a refused row is reported and does not block the
 * rest; a remote clock far in the future does not drag ours.
 *
 * Property: 2-5 replicas make random local edits (insert, update, delete,
 * re-insert, in transactions, on small key spaces so conflicts are common)
 * and exchange random partial payloads (random since, duplicated, reordered,
 * relayed, with exclude_site); then each pair syncs incrementally, the way
 * clients do (since = the previous payload's until), until nothing changes.
 * Every replica must then hold the same rows, the same causal lengths and
 * the same winning stamps. PGS_SEED fixes the seed (printed on failure),
 * PGS_ITER the number of runs (default 500, about 4 s under ASan; long mode:
 * PGS_ITER=5000).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "mockdb.h"

#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static int
setup(void **state)
{
	(void) state;
	mock_test_allocator();
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
	DATA
};

static db_conn *
replica(const uint8_t *site, uint64_t ms)
{
	db_conn *db = mock_open(site);

	mock_add_std_tables(db);
	mock_set_clock(db, ms);
	return db;
}

static db_table *
items(db_conn *db)
{
	return mock_table(db, "items");
}

static void
assert_converged(db_conn *a, db_conn *b)
{
	char why[512];

	if (!mock_equal(a, b, MOCK_CMP_ROWS | MOCK_CMP_CLOCKS, why, sizeof why))
	{
		mock_dump(a, stderr);
		mock_dump(b, stderr);
		fail_msg("replicas differ: %s", why);
	}
}

/* payload of from, (since, now] */
static void
build(db_conn *from, int64_t since, pgs_buf *out)
{
	pgs_err err;

	if (mock_build(from, since, NULL, 1, out, &err) != PGS_OK)
		fail_msg("build: %s", err.msg);
}

static pgs_apply_stats
apply(db_conn *to, const pgs_buf *p)
{
	pgs_apply_stats st = {0};
	pgs_err			err;

	if (p->len && mock_apply(to, p->p, p->len, &st, &err) != PGS_OK)
		fail_msg("apply: %s (%s)", err.msg, err.detail);
	return st;
}

static pgs_apply_stats
sync_once(db_conn *from, db_conn *to)
{
	pgs_buf			out;
	pgs_apply_stats st;

	pgs_buf_init(&out);
	build(from, 0, &out);
	st = apply(to, &out);
	pgs_buf_free(&out);
	return st;
}

static void
exchange(db_conn *a, db_conn *b)
{
	sync_once(a, b);
	sync_once(b, a);
}

static void
insert_item(db_conn *db, int64_t id, const char *name, int64_t qty)
{
	pgs_value pk = mock_int(id);
	pgs_value v[4] = {mock_text(name), mock_int(qty), mock_real(1.0), mock_null()};

	assert_int_equal(mock_local_insert(db, items(db), &pk, v), PGS_OK);
}

static void
set_col(db_conn *db, int64_t id, int col, pgs_value v)
{
	pgs_value pk = mock_int(id);

	assert_int_equal(mock_local_update(db, items(db), &pk, 1, &col, &v), PGS_OK);
}

static void
delete_item(db_conn *db, int64_t id)
{
	pgs_value pk = mock_int(id);

	assert_int_equal(mock_local_delete(db, items(db), &pk), PGS_OK);
}

static const pgs_value *
row_of(db_conn *db, int64_t id)
{
	pgs_value pk = mock_int(id);

	return mock_row_get(db, items(db), &pk);
}

static void
assert_text(const pgs_value *v, const char *s)
{
	assert_int_equal(v->type, PGS_TEXT);
	assert_int_equal(v->len, strlen(s));
	assert_memory_equal(v->v.p, s, v->len);
}

/* ================================================================ */
/* scenarios                                                         */
/* ================================================================ */

static void
test_concurrent_different_columns_merge(void **state)
{
	db_conn *a = replica(SITE_A, MS0), *b = replica(SITE_B, MS0);

	(void) state;
	insert_item(a, 1, "one", 1);
	exchange(a, b);
	mock_advance(a, 10);
	mock_advance(b, 20);
	set_col(a, 1, NAME, mock_text("renamed by a"));
	set_col(b, 1, QTY, mock_int(42));
	exchange(a, b);
	assert_converged(a, b);
	assert_text(&row_of(a, 1)[NAME], "renamed by a");
	assert_true(row_of(a, 1)[QTY].v.i == 42);
	mock_close(a);
	mock_close(b);
}

static void
test_later_edit_of_same_column_wins(void **state)
{
	(void) state;
	for (int order = 0; order < 2; order++)
	{
		db_conn *a = replica(SITE_A, MS0), *b = replica(SITE_B, MS0);

		insert_item(a, 1, "one", 1);
		exchange(a, b);
		mock_advance(a, 100);
		mock_advance(b, 200);
		set_col(a, 1, NAME, mock_text("a at +100"));
		set_col(b, 1, NAME, mock_text("b at +200"));
		if (order)
			exchange(a, b);
		else
			exchange(b, a);
		assert_converged(a, b);
		assert_text(&row_of(a, 1)[NAME], "b at +200");
		mock_close(a);
		mock_close(b);
	}
}

static void
test_edit_after_seeing_wins_despite_slow_clock(void **state)
{
	db_conn *a = replica(SITE_A, MS0 + 60000), /* a minute ahead */
		*b = replica(SITE_B, MS0);
	pgs_stamp	 cols[4];
	pgs_rowclock rc = {.cols = cols};
	pgs_value	 pk = mock_int(1);

	(void) state;
	insert_item(a, 1, "from a", 1);
	sync_once(a, b);
	/* b's wall clock is behind a's stamp, yet b's edit comes after */
	set_col(b, 1, NAME, mock_text("b saw a"));
	assert_true(mock_clock(b, items(b), &pk, &rc));
	assert_true(cols[NAME].hlc > pgs_hlc_from_ms(MS0 + 60000));
	exchange(a, b);
	assert_converged(a, b);
	assert_text(&row_of(a, 1)[NAME], "b saw a");
	mock_close(a);
	mock_close(b);
}

static void
test_tie_broken_by_site(void **state)
{
	db_conn *a = replica(SITE_A, MS0), *b = replica(SITE_B, MS0);

	(void) state;
	/* the same key inserted on both at the same millisecond: site B > site A */
	insert_item(a, 1, "a", 1);
	insert_item(b, 1, "b", 2);
	exchange(a, b);
	assert_converged(a, b);
	assert_text(&row_of(a, 1)[NAME], "b");
	mock_close(a);
	mock_close(b);
}

static void
test_delete_beats_concurrent_update(void **state)
{
	(void) state;
	for (int order = 0; order < 2; order++)
	{
		db_conn *a = replica(SITE_A, MS0), *b = replica(SITE_B, MS0);

		insert_item(a, 1, "one", 1);
		exchange(a, b);
		mock_advance(a, 10);
		mock_advance(b, 5000); /* the update is later in time */
		delete_item(a, 1);
		set_col(b, 1, NAME, mock_text("updated"));
		if (order)
			exchange(a, b);
		else
			exchange(b, a);
		assert_converged(a, b);
		assert_null(row_of(a, 1));
		assert_null(row_of(b, 1));
		mock_close(a);
		mock_close(b);
	}
}

static void
test_resurrection_after_delete(void **state)
{
	db_conn		*a = replica(SITE_A, MS0), *b = replica(SITE_B, MS0), *c = replica(SITE_C, MS0);
	pgs_rowclock rc = {.cols = (pgs_stamp[4]){{0}}};
	pgs_value	 pk = mock_int(1);

	(void) state;
	insert_item(a, 1, "one", 1);
	exchange(a, b);
	delete_item(a, 1);
	exchange(a, b);
	assert_null(row_of(b, 1));
	/* b re-inserts after seeing the delete: cl 3 */
	mock_advance(b, 10);
	insert_item(b, 1, "again", 2);
	assert_true(mock_clock(b, items(b), &pk, &rc));
	assert_true(rc.cl == 3);
	/* c hears of the first life only now, then of the others, in that order */
	sync_once(b, c);
	exchange(a, b);
	assert_converged(a, b);
	assert_text(&row_of(a, 1)[NAME], "again");
	sync_once(a, c);
	assert_converged(a, c);
	/* a concurrent delete of the old life does not undo the resurrection */
	{
		db_conn *d = replica(SITE_C, MS0);

		insert_item(d, 1, "one", 1);
		delete_item(d, 1); /* cl 2, concurrently with b's cl 3 */
		sync_once(d, b);
		assert_text(&row_of(b, 1)[NAME], "again");
		mock_close(d);
	}
	mock_close(a);
	mock_close(b);
	mock_close(c);
}

/*
 * A partial change set that starts a new life of a row (the receiver missed
 * the re-insert) cannot be stored faithfully: it would mix the columns of
 * two lives. It is rejected as incomplete (PS001) without touching the row
 * or its clock, and the whole row that follows converges.
 */
static void
test_partial_new_life_is_incomplete(void **state)
{
	db_conn			*a = replica(SITE_A, MS0), *b = replica(SITE_B, MS0), *c = replica(SITE_C, MS0);
	pgs_buf			 p;
	int64_t			 since;
	const pgs_value *row;
	int				 rej;

	(void) state;
	pgs_buf_init(&p);
	insert_item(a, 1, "one", 1);
	sync_once(a, b);
	sync_once(a, c);
	mock_advance(a, 10);
	delete_item(a, 1);
	insert_item(a, 1, "new life", 7); /* cl 3 */
	sync_once(a, b);
	since = mock_version(b);
	mock_advance(b, 10);
	set_col(b, 1, QTY, mock_int(8));
	build(b, since, &p); /* cl 3, qty only */
	rej = mock_rejections(c);
	apply(c, &p);
	assert_int_equal(mock_rejections(c), rej + 1);
	row = row_of(c, 1);
	assert_non_null(row);
	assert_text(&row[NAME], "one"); /* life 1, untouched */
	sync_once(b, c);
	assert_converged(b, c);
	assert_text(&row_of(c, 1)[NAME], "new life");
	assert_true(row_of(c, 1)[QTY].v.i == 8);
	pgs_buf_free(&p);
	mock_close(a);
	mock_close(b);
	mock_close(c);
}

static void
test_reinsert_concurrent_with_reinsert(void **state)
{
	db_conn *a = replica(SITE_A, MS0), *b = replica(SITE_B, MS0);

	(void) state;
	insert_item(a, 1, "one", 1);
	exchange(a, b);
	delete_item(a, 1);
	exchange(a, b);
	/* both resurrect the row concurrently: both cl 3, columns by stamp */
	mock_advance(a, 10);
	mock_advance(b, 20);
	insert_item(a, 1, "a again", 10);
	insert_item(b, 1, "b again", 20);
	exchange(a, b);
	assert_converged(a, b);
	assert_text(&row_of(a, 1)[NAME], "b again");
	mock_close(a);
	mock_close(b);
}

static void
test_duplicate_delivery_idempotent(void **state)
{
	db_conn		   *a = replica(SITE_A, MS0), *b = replica(SITE_B, MS0);
	pgs_buf			p;
	pgs_apply_stats st;
	mock_snap	   *snap;
	char			why[256];

	(void) state;
	pgs_buf_init(&p);
	insert_item(a, 1, "one", 1);
	insert_item(a, 2, "two", 2);
	delete_item(a, 2);
	insert_item(a, 3, "three", 3);
	set_col(a, 3, QTY, mock_int(33));
	build(a, 0, &p);
	st = apply(b, &p);
	assert_true(st.won > 0);
	snap = mock_snapshot(b);
	for (int i = 0; i < 3; i++)
	{
		st = apply(b, &p);
		assert_int_equal(st.won, 0);
		assert_int_equal(st.rejected, 0);
		assert_true(st.lost == st.changes);
		if (!mock_same_state(b, snap, why, sizeof why))
			fail_msg("duplicate delivery changed the replica: %s", why);
	}
	mock_snapshot_free(b, snap);
	/* a's own payload applied to a: nothing wins either */
	st = apply(a, &p);
	assert_int_equal(st.won, 0);
	assert_converged(a, b);
	pgs_buf_free(&p);
	mock_close(a);
	mock_close(b);
}

static void
test_out_of_order_delivery(void **state)
{
	db_conn *a = replica(SITE_A, MS0), *b = replica(SITE_B, MS0);
	pgs_buf	 p[4];
	int64_t	 v = 0;

	(void) state;
	for (int i = 0; i < 4; i++)
		pgs_buf_init(&p[i]);
	insert_item(a, 1, "one", 1);
	insert_item(a, 2, "two", 2);
	build(a, v, &p[0]);
	v = mock_version(a);
	mock_advance(a, 10);
	set_col(a, 1, NAME, mock_text("uno"));
	delete_item(a, 2);
	build(a, v, &p[1]);
	v = mock_version(a);
	mock_advance(a, 10);
	insert_item(a, 2, "two again", 22);
	set_col(a, 1, QTY, mock_int(11));
	build(a, v, &p[2]);
	v = mock_version(a);
	mock_advance(a, 10);
	delete_item(a, 1);
	build(a, v, &p[3]);
	/* every order of the four payloads */
	{
		static const int perms[][4] = {
			{3, 2, 1, 0}, {2, 0, 3, 1}, {1, 3, 0, 2}, {0, 2, 1, 3}, {3, 0, 2, 1}, {1, 0, 3, 2},
		};

		for (size_t k = 0; k < sizeof perms / sizeof perms[0]; k++)
		{
			db_conn *r = replica(SITE_B, MS0);

			for (int i = 0; i < 4; i++)
				apply(r, &p[perms[k][i]]);
			assert_converged(a, r);
			mock_close(r);
		}
	}
	for (int i = 0; i < 4; i++)
		pgs_buf_free(&p[i]);
	mock_close(a);
	mock_close(b);
}

static void
test_permission_rejection(void **state)
{
	db_conn		   *a = replica(SITE_A, MS0), *b = replica(SITE_B, MS0);
	pgs_buf			p;
	pgs_apply_stats st;
	pgs_value		k2 = mock_int(2);
	pgs_rowclock	rc = {.cols = (pgs_stamp[4]){{0}}};

	(void) state;
	pgs_buf_init(&p);
	insert_item(a, 1, "one", 1);
	insert_item(a, 2, "two", 2);
	insert_item(a, 3, "three", 3);
	mock_deny(b, items(b), &k2);
	build(a, 0, &p);
	st = apply(b, &p);
	/* reported, counted, and the others went in */
	assert_int_equal(st.rejected, 1);
	assert_int_equal(mock_rejections(b), 1);
	assert_int_equal(st.won, 2 + 8);
	assert_non_null(row_of(b, 1));
	assert_non_null(row_of(b, 3));
	/* the refused row left no trace: no row, no clock */
	assert_null(row_of(b, 2));
	assert_false(mock_clock(b, items(b), &k2, &rc));
	assert_int_equal(mock_clock_count(b, items(b)), 2);
	/* so once allowed, the same payload brings it */
	mock_allow_all(b);
	st = apply(b, &p);
	assert_int_equal(st.rejected, 0);
	assert_int_equal(st.won, 1 + 4);
	assert_converged(a, b);

	/* a refused update (same life) keeps the old clock, and so wins later */
	mock_advance(a, 10);
	set_col(a, 2, NAME, mock_text("deux"));
	set_col(a, 1, NAME, mock_text("un"));
	mock_deny(b, items(b), &k2);
	{
		pgs_stamp	 before[4], after[4];
		pgs_rowclock r1 = {.cols = before}, r2 = {.cols = after};

		assert_true(mock_clock(b, items(b), &k2, &r1));
		build(a, 0, &p);
		st = apply(b, &p);
		assert_int_equal(st.rejected, 1);
		assert_int_equal(mock_rejections(b), 2);
		assert_true(mock_clock(b, items(b), &k2, &r2));
		for (int c = 0; c < 4; c++)
			assert_true(before[c].hlc == after[c].hlc && before[c].ver == after[c].ver &&
						before[c].site == after[c].site);
		assert_true(r1.cl == r2.cl && r1.cl_ver == r2.cl_ver);
		assert_text(&row_of(b, 2)[NAME], "two");
		assert_text(&row_of(b, 1)[NAME], "un");
	}
	/* a refused delete: the row stays, alive, with its clock */
	delete_item(a, 2);
	build(a, 0, &p);
	st = apply(b, &p);
	assert_int_equal(st.rejected, 1);
	assert_non_null(row_of(b, 2));
	assert_true(mock_clock(b, items(b), &k2, &rc));
	assert_true(rc.cl == 1);
	mock_allow_all(b);
	build(a, 0, &p);
	apply(b, &p);
	assert_converged(a, b);
	pgs_buf_free(&p);
	mock_close(a);
	mock_close(b);
}

static void
test_future_clock_does_not_drag_ours(void **state)
{
	uint64_t year = 365ull * 86400 * 1000;
	db_conn *a = replica(SITE_A, pgs_now_ms() + year), /* a clock a year ahead */
		*b = replica(SITE_B, 0);					   /* b on the wall clock */
	pgs_stamp	 cols[4];
	pgs_rowclock rc = {.cols = cols};
	pgs_value	 pk = mock_int(1);
	uint64_t	 limit;

	(void) state;
	insert_item(a, 1, "from the future", 1);
	sync_once(a, b);
	limit = pgs_hlc_from_ms(pgs_now_ms() + PGS_HLC_MAX_DRIFT_MS);
	/* the stamp is accepted as is for the merge ... */
	assert_true(mock_clock(b, items(b), &pk, &rc));
	assert_true(cols[NAME].hlc >> PGS_HLC_LOGICAL_BITS >= pgs_now_ms() + year - 1000);
	/* ... but b's own clock moved at most to now + 5 minutes */
	assert_true(mock_hlc(b) <= limit);
	assert_true(mock_hlc(b) >= limit - pgs_hlc_from_ms(60 * 1000));
	/* a later local edit of that cell still beats it (cell stamp + 1) */
	set_col(b, 1, NAME, mock_text("b now"));
	exchange(a, b);
	assert_converged(a, b);
	assert_text(&row_of(a, 1)[NAME], "b now");
	/* while b's new rows are stamped near now, not a year ahead */
	insert_item(b, 2, "b's own", 2);
	pk = mock_int(2);
	assert_true(mock_clock(b, items(b), &pk, &rc));
	assert_true(cols[QTY].hlc <= limit + pgs_hlc_from_ms(60 * 1000));
	mock_close(a);
	mock_close(b);
}

static void
test_tombstone_for_unknown_key(void **state)
{
	db_conn		*a = replica(SITE_A, MS0), *b = replica(SITE_B, MS0);
	pgs_value	 pk = mock_int(1);
	pgs_rowclock rc = {.cols = (pgs_stamp[4]){{0}}};

	(void) state;
	insert_item(a, 1, "short-lived", 1);
	delete_item(a, 1);
	sync_once(a, b);
	assert_null(row_of(b, 1));
	assert_true(mock_clock(b, items(b), &pk, &rc));
	assert_true(rc.cl == 2);
	/* and an old insert arriving later does not bring it back */
	{
		db_conn *c = replica(SITE_C, MS0 + 99999);

		insert_item(c, 1, "stale", 1);
		sync_once(c, b);
		assert_null(row_of(b, 1));
		mock_close(c);
	}
	assert_converged(a, b);
	mock_close(a);
	mock_close(b);
}

/*
 * Removal candidates name local rows the payload does not carry: the core
 * announces them to db_apply_lock before it forgets or deletes them (the mock
 * refuses a write of a row that was not announced).
 */
static void
test_removal_candidates_are_announced(void **state)
{
	db_conn		   *a = replica(SITE_A, MS0);
	pgs_writer		w;
	pgs_buf			out;
	pgs_err			err;
	pgs_apply_stats st = {0};
	const uint64_t	salt = UINT64_C(0x5a17);
	pgs_name		pkn[1] = {{(const uint8_t *) "id", 2}};
	pgs_name		cols[4] = {{(const uint8_t *) "name", 4},
							   {(const uint8_t *) "qty", 3},
							   {(const uint8_t *) "price", 5},
							   {(const uint8_t *) "data", 4}};
	pgs_value		k1 = mock_int(1), k2 = mock_int(2);
	uint32_t		t, sb;

	(void) state;
	insert_item(a, 1, "moves out", 1);
	insert_item(a, 2, "deleted elsewhere", 2);
	insert_item(a, 3, "stays", 3);
	pgs_writer_init(&w);
	sb = pgs_writer_site(&w, SITE_B);
	t = pgs_writer_table(&w, (pgs_name){(const uint8_t *) "items", 5}, 1, pkn, 4, cols);
	pgs_writer_table_salt(&w, t, salt);
	pgs_writer_candidate(&w, t, pgs_key_hash(salt, 1, &k1), 1, sb); /* alive, hidden: forget */
	pgs_writer_candidate(&w, t, pgs_key_hash(salt, 1, &k2), 2, sb); /* a newer delete */
	pgs_buf_init(&out);
	assert_int_equal(pgs_writer_seal(&w, SITE_B, 0, 0, 0, false, &out, &err), PGS_OK);
	pgs_writer_free(&w);
	if (mock_apply(a, out.p, out.len, &st, &err) != PGS_OK)
		fail_msg("apply: %s", err.msg);
	assert_int_equal(mock_forgotten(a), 1);
	assert_null(row_of(a, 1));
	assert_null(row_of(a, 2));
	assert_non_null(row_of(a, 3));
	assert_int_equal(st.rows_deleted, 1);
	pgs_buf_free(&out);
	mock_close(a);
}

static void
test_apply_stats_and_version(void **state)
{
	db_conn		   *a = replica(SITE_A, MS0), *b = replica(SITE_B, MS0);
	pgs_apply_stats st;
	int64_t			v;

	(void) state;
	insert_item(a, 1, "one", 1);
	insert_item(a, 2, "two", 2);
	v = mock_version(b);
	st = sync_once(a, b);
	/* one apply = one local version, whatever the number of rows */
	assert_true(mock_version(b) == v + 1);
	assert_int_equal(st.changes, 8);
	assert_int_equal(st.won, 10);
	/* nothing new: no version taken */
	st = sync_once(a, b);
	assert_true(mock_version(b) == v + 1);
	assert_int_equal(st.won, 0);
	assert_int_equal(st.lost, 8);
	mock_close(a);
	mock_close(b);
}

/* ---- one form on every replica (docs/TYPES.md) ---- */

static const uint8_t SITE_P[16] = {0x01, 0x8b, 0xd0, 0, 0, 0, 0x70, 0,
								   0x80, 0,	   0,	 0, 0, 0, 0,	0xff};

/* pull: to applies from's changes since `since`, without to's own stamps
 * (the way a device pulls and pushes); returns the stats */
static pgs_apply_stats
pull(db_conn *from, db_conn *to, const uint8_t *to_site, int64_t since)
{
	pgs_buf			out;
	pgs_err			err;
	pgs_apply_stats st;

	pgs_buf_init(&out);
	if (mock_build(from, since, to_site, 0, &out, &err) != PGS_OK)
		fail_msg("build: %s", err.msg);
	st = apply(to, &out);
	pgs_buf_free(&out);
	return st;
}

static pgs_stamp
stamp_of(db_conn *db, int64_t id, int col)
{
	pgs_stamp	 cols[4];
	pgs_rowclock rc = {.cols = cols};
	pgs_value	 pk = mock_int(id);

	assert_true(mock_clock(db, items(db), &pk, &rc));
	return cols[col];
}

static const uint8_t *
site_of(db_conn *db, uint32_t idx)
{
	const uint8_t *s;
	pgs_err		   err;

	assert_int_equal(db_site_lookup(db, idx, &s, &err), PGS_OK);
	return s;
}

static void
test_canonical_form_reaches_writer(void **state)
{
	db_conn		   *a = replica(SITE_A, MS0), *b = replica(SITE_B, MS0), *p = replica(SITE_P, MS0);
	pgs_apply_stats st;
	pgs_stamp		was, now;
	int64_t			pv, av, bv;

	(void) state;
	mock_canonical(p, 1);
	insert_item(a, 1, "White", 1);
	was = stamp_of(a, 1, NAME);
	st = pull(a, p, SITE_P, 0); /* the push */
	assert_int_equal(st.restamped, 1);
	assert_text(&row_of(p, 1)[NAME], "white");
	now = stamp_of(p, 1, NAME);
	assert_true(now.hlc == was.hlc + 1);
	assert_memory_equal(site_of(p, now.site), PGS_SITE_CANON, 16);
	/* the other cells keep the writer's stamps */
	assert_memory_equal(site_of(p, stamp_of(p, 1, QTY).site), SITE_A, 16);
	/* the writer (its pulls exclude its own site) and another device take it */
	st = pull(p, a, SITE_A, 0);
	assert_int_equal(st.won, 1);
	assert_int_equal(st.restamped, 0);
	pull(p, b, SITE_B, 0);
	assert_text(&row_of(a, 1)[NAME], "white");
	assert_converged(a, p);
	assert_converged(b, p);
	/* a further round changes nothing anywhere: no ping-pong */
	pv = mock_version(p), av = mock_version(a), bv = mock_version(b);
	for (int round = 0; round < 3; round++)
	{
		assert_int_equal(pull(a, p, SITE_P, 0).won, 0);
		assert_int_equal(pull(b, p, SITE_P, 0).won, 0);
		assert_int_equal(pull(p, a, SITE_A, 0).won, 0);
		assert_int_equal(pull(p, b, SITE_B, 0).won, 0);
		exchange(a, b);
	}
	assert_true(mock_version(p) == pv && mock_version(a) == av && mock_version(b) == bv);
	/* the writer's clock passed the re-stamp: its next edit wins everywhere */
	assert_true(mock_hlc(a) >= now.hlc);
	set_col(a, 1, NAME, mock_text("black"));
	assert_true(stamp_of(a, 1, NAME).hlc > now.hlc);
	st = pull(a, p, SITE_P, av);
	assert_int_equal(st.won, 1);
	assert_int_equal(st.restamped, 0);
	pull(p, b, SITE_B, pv);
	assert_text(&row_of(b, 1)[NAME], "black");
	assert_converged(a, p);
	assert_converged(b, p);
	mock_close(a);
	mock_close(b);
	mock_close(p);
}

static void
test_canonical_same_bytes_not_restamped(void **state)
{
	db_conn		   *a = replica(SITE_A, MS0), *p = replica(SITE_P, MS0);
	pgs_apply_stats st;
	int64_t			pv;

	(void) state;
	mock_canonical(p, 1);
	insert_item(a, 1, "white", 1);
	st = pull(a, p, SITE_P, 0);
	assert_int_equal(st.restamped, 0);
	assert_memory_equal(site_of(p, stamp_of(p, 1, NAME).site), SITE_A, 16);
	pv = mock_version(p);
	/* nothing for the writer: its own stamps only */
	st = pull(p, a, SITE_A, 0);
	assert_int_equal(st.changes, 0);
	assert_true(mock_version(p) == pv);
	assert_converged(a, p);
	mock_close(a);
	mock_close(p);
}

/*
 * The writer's later edit, made before the re-stamp reaches it (a push, then
 * an edit in the same millisecond), beats the canonical form of its earlier
 * value, whichever arrives first; and is canonicalized in turn.
 */
static void
test_canonical_later_edit_wins(void **state)
{
	(void) state;
	for (int order = 0; order < 2; order++)
	{
		db_conn	 *a = replica(SITE_A, MS0), *b = replica(SITE_B, MS0), *p = replica(SITE_P, MS0);
		pgs_stamp first, second;

		mock_canonical(p, 1);
		insert_item(a, 1, "White", 1);
		first = stamp_of(a, 1, NAME);
		pull(a, p, SITE_P, 0);
		pull(p, b, SITE_B, 0);
		set_col(a, 1, NAME, mock_text("Grey")); /* same millisecond */
		second = stamp_of(a, 1, NAME);
		assert_true(second.hlc > first.hlc && second.hlc <= first.hlc + 2);
		assert_true(stamp_of(p, 1, NAME).hlc == first.hlc + 1);
		if (order)
		{
			/* the re-stamp reaches the writer first: the later edit stays */
			pull(p, a, SITE_A, 0);
			assert_text(&row_of(a, 1)[NAME], "Grey");
		}
		assert_int_equal(pull(a, p, SITE_P, 0).restamped, 1);
		assert_text(&row_of(p, 1)[NAME], "grey");
		assert_true(stamp_of(p, 1, NAME).hlc == second.hlc + 1);
		pull(p, a, SITE_A, 0);
		pull(p, b, SITE_B, 0);
		exchange(a, b);
		assert_text(&row_of(a, 1)[NAME], "grey");
		assert_converged(a, p);
		assert_converged(b, p);
		mock_close(a);
		mock_close(b);
		mock_close(p);
	}
}

/*
 * Another device's concurrent edit at exactly the re-stamp's hlc beats it
 * too; one at the writer's own hlc (a true tie, decided by site ids) is
 * decided by what Postgres applied first, the same way on every replica.
 */
static void
test_canonical_concurrent_edits(void **state)
{
	(void) state;
	for (int order = 0; order < 2; order++)
	{
		db_conn *a = replica(SITE_A, MS0), *b = replica(SITE_B, MS0), *p = replica(SITE_P, MS0);
		uint64_t h;

		mock_canonical(p, 1);
		insert_item(a, 1, "one", 1);
		pull(a, p, SITE_P, 0);
		pull(p, b, SITE_B, 0);
		mock_advance(a, 10);
		mock_advance(b, 10);
		set_col(a, 1, NAME, mock_text("A-side"));
		h = stamp_of(a, 1, NAME).hlc;
		/* b's edit one logical tick later than a's, made without seeing it */
		mock_begin(b);
		set_col(b, 1, QTY, mock_int(7)); /* moves b's clock to h */
		set_col(b, 1, NAME, mock_text("B-side"));
		mock_commit(b);
		if (stamp_of(b, 1, NAME).hlc != h + 1)
			fail_msg("setup: b's stamp %" PRIu64 " is not h + 1 = %" PRIu64,
					 stamp_of(b, 1, NAME).hlc, h + 1);
		if (order)
		{
			pull(a, p, SITE_P, 0);
			pull(b, p, SITE_P, 0);
		}
		else
		{
			pull(b, p, SITE_P, 0);
			pull(a, p, SITE_P, 0);
		}
		for (int round = 0; round < 2; round++)
		{
			pull(p, a, SITE_A, 0);
			pull(p, b, SITE_B, 0);
			pull(a, p, SITE_P, 0);
			pull(b, p, SITE_P, 0);
		}
		assert_text(&row_of(p, 1)[NAME], "b-side");
		assert_converged(a, p);
		assert_converged(b, p);
		mock_close(a);
		mock_close(b);
		mock_close(p);
	}
}

/*
 * Two replicas that both canonicalize, differently (two Postgres databases
 * whose column types differ): each write is re-stamped once, by the first
 * that stores it; the other keeps that canonical stamp and its own form.
 * Syncing ends: no ping-pong.
 */
static void
test_canonical_twice_no_loop(void **state)
{
	db_conn *a = replica(SITE_A, MS0), *p = replica(SITE_P, MS0), *q = replica(SITE_C, MS0);
	int64_t	 won = 0;

	(void) state;
	mock_canonical(p, 1);
	mock_canonical(q, 2);
	insert_item(a, 1, "Mixed", 1);
	pull(a, p, SITE_P, 0);
	assert_text(&row_of(p, 1)[NAME], "mixed");
	for (int round = 0; round < 10; round++)
	{
		won = 0;
		won += pull(p, q, SITE_C, 0).won;
		won += pull(q, p, SITE_P, 0).won;
		won += pull(p, a, SITE_A, 0).won;
		won += pull(q, a, SITE_A, 0).won;
		won += pull(a, q, SITE_C, 0).won;
		won += pull(a, p, SITE_P, 0).won;
	}
	assert_int_equal(won, 0);
	assert_text(&row_of(p, 1)[NAME], "mixed");
	assert_text(&row_of(q, 1)[NAME], "MIXED");
	assert_text(&row_of(a, 1)[NAME], "mixed");
	assert_memory_equal(site_of(q, stamp_of(q, 1, NAME).site), PGS_SITE_CANON, 16);
	mock_close(a);
	mock_close(p);
	mock_close(q);
}

/* ================================================================ */
/* property test                                                     */
/* ================================================================ */

typedef struct rng
{
	uint64_t s;
} rng;

static uint64_t
rnd(rng *r)
{
	uint64_t x = r->s;

	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	r->s = x;
	return x * 0x2545F4914F6CDD1Dull;
}

static int
rint_(rng *r, int n)
{
	return (int) (rnd(r) % (uint64_t) n);
}

static bool
chance(rng *r, int pct)
{
	return rint_(r, 100) < pct;
}

static pgs_value
rand_value(rng *r)
{
	static const char *texts[] = {"a", "b", "\xc3\xbc", "", "longer text value", "A", "Mixed Case"};
	static const uint8_t blob[] = {0, 1, 2, 0xff};

	switch (rint_(r, 9))
	{
		case 0:
			return mock_null();
		case 1:
			return mock_int(rint_(r, 5) - 2);
		case 2:
			return mock_int(chance(r, 50) ? INT64_MIN : INT64_MAX);
		case 3:
			return mock_real(chance(r, 50) ? -0.0 : 0.5);
		case 4:
			return mock_real(NAN);
		case 5:
			return mock_blob(blob, (uint32_t) rint_(r, 5));
		default:
			return mock_text(texts[rint_(r, 7)]);
	}
}

static void
rand_key(rng *r, db_table *t, pgs_value *pk, int keyspace)
{
	static const char *k1[] = {"x", "y", "z"};

	if (strcmp(db_table_describe(t)->name, "tags") == 0)
	{
		pk[0] = mock_text(k1[rint_(r, 3)]);
		pk[1] = mock_int(rint_(r, keyspace > 2 ? 2 : keyspace));
	}
	else
		pk[0] = mock_int(rint_(r, keyspace));
}

/* one random local edit on db */
static void
rand_edit(rng *r, db_conn *db, int keyspace)
{
	static const char *const tables[] = {"items", "items", "tags", "log"};
	db_table				*t = mock_table(db, tables[rint_(r, 4)]);
	const db_table_info		*ti = db_table_describe(t);
	pgs_value				 pk[2];
	pgs_value				 vals[4];
	int						 op = rint_(r, 10);

	rand_key(r, t, pk, keyspace);
	for (int i = 0; i < ti->ncols; i++)
		vals[i] = rand_value(r);
	if (ti->algo == DB_ALGO_GSET)
	{
		if (!mock_row_get(db, t, pk))
			assert_int_equal(mock_local_insert(db, t, pk, vals), PGS_OK);
		return;
	}
	if (op < 3 || !mock_row_get(db, t, pk))
		assert_int_equal(mock_local_insert(db, t, pk, vals),
						 PGS_OK); /* insert, re-insert, or replace */
	else if (op < 8)
	{
		int cols[4], n = 0;

		for (int i = 0; i < ti->ncols; i++)
			if (chance(r, 50))
				cols[n++] = i;
		if (n == 0)
			cols[n++] = rint_(r, ti->ncols);
		for (int i = 0; i < n; i++)
			vals[i] = rand_value(r);
		assert_int_equal(mock_local_update(db, t, pk, n, cols, vals), PGS_OK);
	}
	else
		assert_int_equal(mock_local_delete(db, t, pk), PGS_OK);
}

/* internal consistency of one replica: a row is alive iff its cl is odd, and
 * a live row's never-written columns are NULL */
static void
check_replica(db_conn *db, const char *ctx)
{
	for (int ti = 0; ti < 3; ti++)
	{
		static const char *const names[] = {"items", "tags", "log"};
		db_table				*t = mock_table(db, names[ti]);

		if (mock_clock_count(db, t) < mock_row_count(db, t))
			fail_msg("%s: table %s has live rows without a clock", ctx, names[ti]);
	}
	(void) ctx;
}

typedef struct flight
{
	uint8_t *p;
	size_t	 len;
	int		 to;
} flight;

static int64_t restamps_seen; /* by the canonical property runs */

typedef struct world
{
	int		 n;
	db_conn *r[5];
	uint8_t	 sites[5][16];
	int64_t	 cursor[5][5]; /* cursor[to][from]: since for the next incremental pull */
	flight	 air[64];
	int		 nair;
	bool	 pg_horizon; /* until below the current version, as on Postgres */
	bool	 canonical;	 /* replica 0 stores forms of its own (mock_canonical) */
	uint64_t now;
} world;

static void
send_payload(world *w, rng *r, int from, int to, int64_t since, bool advance_cursor, bool exclude)
{
	pgs_build_opts o = {.since = since, .compress = chance(r, 50)};
	pgs_buf		   out;
	pgs_err		   err;
	int64_t		   cur = mock_version(w->r[from]);

	o.until = cur;
	if (w->pg_horizon && cur > since && chance(r, 40))
		o.until = since + rint_(r, (int) (cur - since) + 1);
	if (o.until < since)
		o.until = since;
	o.exclude_site = exclude ? w->sites[to] : NULL;
	pgs_buf_init(&out);
	if (pgs_build(w->r[from], &o, &out, NULL, NULL, &err) != PGS_OK)
		fail_msg("build: %s", err.msg);
	if (out.len == 0)
	{
		if (advance_cursor)
			w->cursor[to][from] = o.until;
		pgs_buf_free(&out);
		return;
	}
	if (w->nair < 64 && chance(r, 40))
	{
		/* the receiver's cursor moves only when it has applied the payload */
		/* in flight: delivered later, maybe out of order, maybe twice */
		flight *f = &w->air[w->nair++];

		f->p = test_malloc(out.len);
		memcpy(f->p, out.p, out.len);
		f->len = out.len;
		f->to = to;
	}
	else
	{
		pgs_apply_stats st;

		if (mock_apply(w->r[to], out.p, out.len, &st, &err) != PGS_OK)
			fail_msg("apply %d -> %d: %s", from, to, err.msg);
		if (advance_cursor)
			w->cursor[to][from] = o.until;
	}
	pgs_buf_free(&out);
}

static void
deliver_one(world *w, rng *r)
{
	int		k = rint_(r, w->nair);
	flight	f = w->air[k];
	pgs_err err;
	int		to = chance(r, 20) ? rint_(r, w->n) : f.to; /* sometimes to someone else */

	if (mock_apply(w->r[to], f.p, f.len, NULL, &err) != PGS_OK)
		fail_msg("delayed apply: %s", err.msg);
	if (chance(r, 25))
		return; /* stays in flight: delivered again later */
	test_free(f.p);
	w->air[k] = w->air[--w->nair];
}

static void
world_free(world *w)
{
	for (int i = 0; i < w->nair; i++)
		test_free(w->air[i].p);
	for (int i = 0; i < w->n; i++)
		mock_close(w->r[i]);
}

/* run one random history; returns false (after printing) on divergence */
static bool
run_one(uint64_t seed, bool pg_horizon, bool canonical)
{
	rng	  r = {seed ? seed : 1};
	world w;
	int	  steps;
	char  why[512];
	bool  ok = true;

	memset(&w, 0, sizeof w);
	w.pg_horizon = pg_horizon;
	w.canonical = canonical;
	w.n = 2 + rint_(&r, 4);
	w.now = MS0;
	for (int i = 0; i < w.n; i++)
	{
		/* site ids in a random order relative to the replica index */
		for (int b = 0; b < 16; b++)
			w.sites[i][b] = (uint8_t) rnd(&r);
		w.sites[i][15] = (uint8_t) i; /* distinct */
		w.r[i] = replica(w.sites[i], MS0 + (uint64_t) rint_(&r, 2000));
	}
	if (canonical)
		mock_canonical(w.r[0], 1);
	steps = 20 + rint_(&r, 60);
	for (int s = 0; s < steps; s++)
	{
		int a = rint_(&r, w.n);
		int keyspace = 2 + rint_(&r, 4);

		/* clocks: mostly forward, skewed, sometimes a replica's goes back */
		for (int i = 0; i < w.n; i++)
			mock_advance(w.r[i], chance(&r, 10) ? -(int64_t) rint_(&r, 3000) : rint_(&r, 50));
		switch (rint_(&r, 10))
		{
			case 0:
			case 1:
			case 2:
			case 3:
				rand_edit(&r, w.r[a], keyspace);
				break;
			case 4:
				/* a transaction of several edits: one version */
				mock_begin(w.r[a]);
				for (int k = rint_(&r, 5); k >= 0; k--)
					rand_edit(&r, w.r[a], keyspace);
				mock_commit(w.r[a]);
				break;
			case 5:
			case 6:
			{
				int		b = rint_(&r, w.n);
				int64_t v = mock_version(w.r[a]);
				int64_t since = chance(&r, 50) ? w.cursor[b][a] : rint_(&r, (int) v + 1);

				if (b != a)
					send_payload(&w, &r, a, b, since, since == w.cursor[b][a], chance(&r, 30));
				break;
			}
			case 7:
			case 8:
				if (w.nair)
					deliver_one(&w, &r);
				break;
			default:
			{
				/* relay: b pulls from a, then c pulls from b */
				int b = rint_(&r, w.n), c = rint_(&r, w.n);

				if (b != a)
					send_payload(&w, &r, a, b, w.cursor[b][a], true, chance(&r, 30));
				if (c != b)
					send_payload(&w, &r, b, c, w.cursor[c][b], true, chance(&r, 30));
			}
		}
		for (int i = 0; i < w.n; i++)
			check_replica(w.r[i], "random phase");
	}
	/* drop what is still in flight half the time, deliver it otherwise */
	while (w.nair)
	{
		if (chance(&r, 50))
			deliver_one(&w, &r);
		else
		{
			test_free(w.air[w.nair - 1].p);
			w.nair--;
		}
	}
	/* incremental pulls, pair by pair, until a full round changes nothing */
	for (int round = 0; round < 20; round++)
	{
		int64_t won = 0;

		for (int to = 0; to < w.n; to++)
			for (int from = 0; from < w.n; from++)
			{
				pgs_build_opts	o = {.since = w.cursor[to][from], .compress = 1};
				pgs_buf			out;
				pgs_err			err;
				pgs_apply_stats st = {0};

				if (to == from)
					continue;
				o.until = mock_version(w.r[from]);
				o.exclude_site = (round & 1) ? w.sites[to] : NULL;
				pgs_buf_init(&out);
				if (pgs_build(w.r[from], &o, &out, NULL, NULL, &err) != PGS_OK)
					fail_msg("build: %s", err.msg);
				if (out.len && mock_apply(w.r[to], out.p, out.len, &st, &err) != PGS_OK)
					fail_msg("apply: %s", err.msg);
				w.cursor[to][from] = o.until;
				won += st.won;
				restamps_seen += st.restamped;
				pgs_buf_free(&out);
			}
		if (won == 0 && round > 0)
			break;
	}
	for (int i = 1; i < w.n && ok; i++)
		if (!mock_equal(w.r[0], w.r[i], MOCK_CMP_ROWS | MOCK_CMP_CLOCKS, why, sizeof why))
		{
			fprintf(stderr, "DIVERGED (seed %" PRIu64 ", %d replicas): replica 0 vs %d: %s\n", seed,
					w.n, i, why);
			mock_dump(w.r[0], stderr);
			mock_dump(w.r[i], stderr);
			ok = false;
		}
	world_free(&w);
	return ok;
}

static uint64_t
env_u64(const char *name, uint64_t dflt)
{
	const char *s = getenv(name);

	return s && *s ? strtoull(s, NULL, 0) : dflt;
}

static void
property(bool pg_horizon, bool canonical)
{
	uint64_t seed = env_u64("PGS_SEED", 20240601);
	uint64_t iters = env_u64("PGS_ITER", 500);

	for (uint64_t i = 0; i < iters; i++)
	{
		uint64_t s = seed + i * 0x9E3779B97F4A7C15ull;

		if (!run_one(s, pg_horizon, canonical))
			fail_msg("convergence failed: rerun with PGS_SEED=%" PRIu64 " PGS_ITER=1 (run %" PRIu64
					 " of base seed %" PRIu64 ")",
					 s, i, seed);
	}
}

static void
test_property_convergence(void **state)
{
	(void) state;
	property(false, false);
}

/*
 * The same with Postgres' pull horizon: until = a random version below the
 * current one (db_version_safe), the next pull starting there, while newer
 * versions are already visible (see test_payload.c,
 * test_until_below_current_version).
 */
static void
test_property_convergence_pg_horizon(void **state)
{
	(void) state;
	property(true, false);
}

/*
 * The same with replica 0 storing values in forms of its own, as Postgres
 * does: its re-stamps reach every replica (the writers too), every replica
 * ends with the same bytes, and the final rounds end (no ping-pong).
 */
static void
test_property_convergence_canonical(void **state)
{
	(void) state;
	restamps_seen = 0;
	property(true, true);
	if (restamps_seen == 0)
		fail_msg("no value was re-stamped: the test does not exercise db_row_forms");
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup(test_concurrent_different_columns_merge, setup),
		cmocka_unit_test_setup(test_later_edit_of_same_column_wins, setup),
		cmocka_unit_test_setup(test_edit_after_seeing_wins_despite_slow_clock, setup),
		cmocka_unit_test_setup(test_tie_broken_by_site, setup),
		cmocka_unit_test_setup(test_delete_beats_concurrent_update, setup),
		cmocka_unit_test_setup(test_resurrection_after_delete, setup),
		cmocka_unit_test_setup(test_partial_new_life_is_incomplete, setup),
		cmocka_unit_test_setup(test_reinsert_concurrent_with_reinsert, setup),
		cmocka_unit_test_setup(test_duplicate_delivery_idempotent, setup),
		cmocka_unit_test_setup(test_out_of_order_delivery, setup),
		cmocka_unit_test_setup(test_permission_rejection, setup),
		cmocka_unit_test_setup(test_future_clock_does_not_drag_ours, setup),
		cmocka_unit_test_setup(test_tombstone_for_unknown_key, setup),
		cmocka_unit_test_setup(test_removal_candidates_are_announced, setup),
		cmocka_unit_test_setup(test_apply_stats_and_version, setup),
		cmocka_unit_test_setup(test_canonical_form_reaches_writer, setup),
		cmocka_unit_test_setup(test_canonical_same_bytes_not_restamped, setup),
		cmocka_unit_test_setup(test_canonical_later_edit_wins, setup),
		cmocka_unit_test_setup(test_canonical_concurrent_edits, setup),
		cmocka_unit_test_setup(test_canonical_twice_no_loop, setup),
		cmocka_unit_test_setup(test_property_convergence, setup),
		cmocka_unit_test_setup(test_property_convergence_pg_horizon, setup),
		cmocka_unit_test_setup(test_property_convergence_canonical, setup),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
