/*
 * test_merge.c — the merge ladder of core/merge.c.
 *
 * One test per rung, in the order of the ladder's header comment, then
 * exhaustive checks over a small domain (causal lengths 1..6, a few HLC
 * values including ties and extremes, three site ids whose bytes differ at
 * both ends and across the sign bit): the cell order is antisymmetric (a vs
 * b WIN <=> b vs a LOSE, SAME both ways only for the same write), total and
 * transitive, so folding any set of writes in any order picks one winner.
 *
 * Convention: pgs_merge_cell(local_cl, local, in_cl, in) says what happens
 * to the INCOMING write: WIN = it replaces the local cell.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "mockdb.h"

#include <string.h>

static int
setup(void **state)
{
	(void) state;
	mock_test_allocator();
	return 0;
}

/* three site ids: LO < MID < HI by memcmp; MID and HI differ only in the
 * last byte, LO and MID across the sign bit of the first byte */
static const uint8_t SITE_LO[16] = {0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
									0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
static const uint8_t SITE_MID[16] = {0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01};
static const uint8_t SITE_HI[16] = {0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02};

#define T(ms) ((uint64_t) (ms) << PGS_HLC_LOGICAL_BITS)

static pgs_merge
cell(int64_t lcl, uint64_t lhlc, const uint8_t *lsite, int64_t icl, uint64_t ihlc,
	 const uint8_t *isite)
{
	pgs_cellstamp l = {lhlc, lsite}, i = {ihlc, isite};

	return pgs_merge_cell(lcl, &l, icl, &i);
}

/* ---- pgs_merge_life ---- */

static void
test_life(void **state)
{
	(void) state;
	assert_int_equal(pgs_merge_life(0, 1), PGS_MERGE_WIN); /* unknown key */
	assert_int_equal(pgs_merge_life(1, 2), PGS_MERGE_WIN); /* delete */
	assert_int_equal(pgs_merge_life(2, 3), PGS_MERGE_WIN); /* resurrection */
	assert_int_equal(pgs_merge_life(1, 4), PGS_MERGE_WIN); /* skips lives */
	assert_int_equal(pgs_merge_life(3, 3), PGS_MERGE_SAME);
	assert_int_equal(pgs_merge_life(2, 2), PGS_MERGE_SAME);
	assert_int_equal(pgs_merge_life(3, 2), PGS_MERGE_LOSE);
	assert_int_equal(pgs_merge_life(5, 1), PGS_MERGE_LOSE);
	assert_int_equal(pgs_merge_life(INT64_MAX - 1, INT64_MAX), PGS_MERGE_WIN);
	assert_int_equal(pgs_merge_life(INT64_MAX, 1), PGS_MERGE_LOSE);
}

/* ---- the rungs ---- */

/* rung 1: a larger causal length wins whatever the stamps say */
static void
test_rung_cl_higher_wins(void **state)
{
	(void) state;
	assert_int_equal(cell(1, T(9000), SITE_HI, 3, T(1), SITE_LO), PGS_MERGE_WIN);
	assert_int_equal(cell(3, T(1), SITE_LO, 1, T(9000), SITE_HI), PGS_MERGE_LOSE);
	assert_int_equal(cell(1, T(5), SITE_MID, 5, T(5), SITE_MID), PGS_MERGE_WIN);
}

/* rung 1: a delete (cl -> cl+1, even) beats an update made in the life it ended */
static void
test_rung_delete_beats_concurrent_update(void **state)
{
	(void) state;
	/* local: the update, later in time and from a larger site; incoming: the delete */
	assert_int_equal(cell(1, T(2000), SITE_HI, 2, T(1000), SITE_LO), PGS_MERGE_WIN);
	/* local: the delete; incoming: the update of the life it ended */
	assert_int_equal(cell(2, T(1000), SITE_LO, 1, T(2000), SITE_HI), PGS_MERGE_LOSE);
	/* same in a later life */
	assert_int_equal(cell(3, T(2000), SITE_HI, 4, T(1), SITE_LO), PGS_MERGE_WIN);
	assert_int_equal(cell(4, T(1), SITE_LO, 3, T(2000), SITE_HI), PGS_MERGE_LOSE);
}

/* rung 1: a re-insert after a delete (cl+2, odd) beats the delete */
static void
test_rung_resurrection_beats_delete(void **state)
{
	(void) state;
	assert_int_equal(cell(2, T(5000), SITE_HI, 3, T(10), SITE_LO), PGS_MERGE_WIN);
	assert_int_equal(cell(3, T(10), SITE_LO, 2, T(5000), SITE_HI), PGS_MERGE_LOSE);
}

/* rung 1: a write of a life that is over is lost */
static void
test_rung_stale_life_loses(void **state)
{
	(void) state;
	assert_int_equal(cell(3, T(1), SITE_LO, 1, UINT64_C(1) << 62, SITE_HI), PGS_MERGE_LOSE);
	assert_int_equal(cell(5, T(1), SITE_LO, 3, T(99999), SITE_HI), PGS_MERGE_LOSE);
	/* a delete of an older life loses against a newer live life */
	assert_int_equal(cell(3, T(1), SITE_LO, 2, T(99999), SITE_HI), PGS_MERGE_LOSE);
}

/* rung 2: same life, the larger HLC wins, whatever the sites */
static void
test_rung_same_life_by_hlc(void **state)
{
	(void) state;
	assert_int_equal(cell(1, T(100), SITE_HI, 1, T(101), SITE_LO), PGS_MERGE_WIN);
	assert_int_equal(cell(1, T(101), SITE_LO, 1, T(100), SITE_HI), PGS_MERGE_LOSE);
	/* the logical counter counts */
	assert_int_equal(cell(3, T(100), SITE_HI, 3, T(100) + 1, SITE_LO), PGS_MERGE_WIN);
	assert_int_equal(cell(3, T(100) + 1, SITE_LO, 3, T(100), SITE_HI), PGS_MERGE_LOSE);
	/* compared as unsigned 64-bit integers */
	assert_int_equal(cell(1, UINT64_C(1) << 62, SITE_HI, 1, (UINT64_C(1) << 63) + 5, SITE_LO),
					 PGS_MERGE_WIN);
}

/* rung 3: equal stamps, the larger site id (memcmp) wins */
static void
test_rung_tie_by_site(void **state)
{
	(void) state;
	assert_int_equal(cell(1, T(7), SITE_LO, 1, T(7), SITE_MID), PGS_MERGE_WIN);
	assert_int_equal(cell(1, T(7), SITE_MID, 1, T(7), SITE_LO), PGS_MERGE_LOSE);
	/* differ in the last byte only */
	assert_int_equal(cell(1, T(7), SITE_MID, 1, T(7), SITE_HI), PGS_MERGE_WIN);
	assert_int_equal(cell(1, T(7), SITE_HI, 1, T(7), SITE_MID), PGS_MERGE_LOSE);
	/* bytes compare unsigned: 0x80... beats 0x7f... */
	assert_int_equal(cell(5, T(7), SITE_LO, 5, T(7), SITE_HI), PGS_MERGE_WIN);
}

/* rung 4: the same write seen twice */
static void
test_rung_same_stamp_and_site_is_same(void **state)
{
	uint8_t copy[16];

	(void) state;
	memcpy(copy, SITE_MID, 16);
	assert_int_equal(cell(1, T(7), SITE_MID, 1, T(7), SITE_MID), PGS_MERGE_SAME);
	/* equal bytes, different pointers */
	assert_int_equal(cell(3, T(7), SITE_MID, 3, T(7), copy), PGS_MERGE_SAME);
}

/* a cell never written in the current life loses to any write of that life */
static void
test_unstamped_local_loses(void **state)
{
	pgs_cellstamp in = {1, SITE_LO};

	(void) state;
	assert_int_equal(pgs_merge_cell(1, NULL, 1, &in), PGS_MERGE_WIN);
	assert_int_equal(pgs_merge_cell(7, NULL, 7, &in), PGS_MERGE_WIN);
	/* but not a write of another life */
	assert_int_equal(pgs_merge_cell(3, NULL, 1, &in), PGS_MERGE_LOSE);
	assert_int_equal(pgs_merge_cell(1, NULL, 3, &in), PGS_MERGE_WIN);
	/* nor a write on a row deleted in this life */
	assert_int_equal(pgs_merge_cell(2, NULL, 2, &in), PGS_MERGE_LOSE);
}

/* equal even cl: the row is deleted in this life, no column write applies */
static void
test_deleted_life_takes_no_cell(void **state)
{
	(void) state;
	assert_int_equal(cell(2, T(1), SITE_LO, 2, T(2), SITE_HI), PGS_MERGE_LOSE);
	assert_int_equal(cell(2, T(2), SITE_HI, 2, T(1), SITE_LO), PGS_MERGE_LOSE);
	assert_int_equal(cell(4, T(2), SITE_HI, 4, T(2), SITE_HI), PGS_MERGE_LOSE);
}

/* ---- exhaustive checks over a small domain ---- */

typedef struct stamp
{
	int64_t		   cl;
	uint64_t	   hlc;
	const uint8_t *site;
} stamp;

static stamp domain[6 * 6 * 3];
static int	 ndomain;

static void
build_domain(void)
{
	static const uint64_t hlcs[] = {1, 2, T(1000), T(1000) + 1, T(1001), (UINT64_C(1) << 63) - 1};
	static const uint8_t *const sites[] = {SITE_LO, SITE_MID, SITE_HI};

	ndomain = 0;
	for (int64_t cl = 1; cl <= 6; cl++)
		for (int h = 0; h < 6; h++)
			for (int s = 0; s < 3; s++)
				domain[ndomain++] = (stamp){cl, hlcs[h], sites[s]};
}

static pgs_merge
vs(const stamp *local, const stamp *in)
{
	pgs_cellstamp l = {local->hlc, local->site}, i = {in->hlc, in->site};

	return pgs_merge_cell(local->cl, &l, in->cl, &i);
}

static bool
same_write(const stamp *a, const stamp *b)
{
	return a->cl == b->cl && a->hlc == b->hlc && memcmp(a->site, b->site, 16) == 0;
}

/* comparable: not two writes of one deleted life (those never meet a cell) */
static bool
comparable(const stamp *a, const stamp *b)
{
	return !(a->cl == b->cl && (a->cl & 1) == 0);
}

static void
test_antisymmetric_and_total(void **state)
{
	int checked = 0;

	(void) state;
	build_domain();
	for (int i = 0; i < ndomain; i++)
		for (int j = 0; j < ndomain; j++)
		{
			const stamp *a = &domain[i], *b = &domain[j];
			pgs_merge	 ab = vs(a, b), ba = vs(b, a);

			/* total: always one of the three answers */
			assert_true(ab == PGS_MERGE_WIN || ab == PGS_MERGE_LOSE || ab == PGS_MERGE_SAME);
			if (!comparable(a, b))
			{
				assert_int_equal(ab, PGS_MERGE_LOSE);
				assert_int_equal(ba, PGS_MERGE_LOSE);
				continue;
			}
			/* antisymmetric */
			assert_int_equal(ab == PGS_MERGE_WIN, ba == PGS_MERGE_LOSE);
			assert_int_equal(ab == PGS_MERGE_LOSE, ba == PGS_MERGE_WIN);
			/* SAME exactly for the same write */
			assert_int_equal(ab == PGS_MERGE_SAME, same_write(a, b));
			assert_int_equal(ba == PGS_MERGE_SAME, same_write(a, b));
			/* and it agrees with the documented lexicographic order */
			if (a->cl != b->cl)
				assert_int_equal(ab, b->cl > a->cl ? PGS_MERGE_WIN : PGS_MERGE_LOSE);
			else if (a->hlc != b->hlc)
				assert_int_equal(ab, b->hlc > a->hlc ? PGS_MERGE_WIN : PGS_MERGE_LOSE);
			else if (memcmp(a->site, b->site, 16) != 0)
				assert_int_equal(ab,
								 memcmp(b->site, a->site, 16) > 0 ? PGS_MERGE_WIN : PGS_MERGE_LOSE);
			checked++;
		}
	assert_true(checked > ndomain * ndomain / 2);
}

static void
test_transitive(void **state)
{
	(void) state;
	build_domain();
	for (int i = 0; i < ndomain; i++)
		for (int j = 0; j < ndomain; j++)
		{
			if (!comparable(&domain[i], &domain[j]) || vs(&domain[i], &domain[j]) != PGS_MERGE_WIN)
				continue;
			/* domain[j] beats domain[i] */
			for (int k = 0; k < ndomain; k++)
				if (comparable(&domain[j], &domain[k]) && comparable(&domain[i], &domain[k]) &&
					vs(&domain[j], &domain[k]) == PGS_MERGE_WIN)
					assert_int_equal(vs(&domain[i], &domain[k]), PGS_MERGE_WIN);
		}
}

/* the fold of a set of writes does not depend on the order of arrival */
static void
test_fold_order_independent(void **state)
{
	uint64_t x = 0x2545F4914F6CDD1Dull;

	(void) state;
	build_domain();
	for (int round = 0; round < 2000; round++)
	{
		stamp set[6];
		int	  n = 2 + (int) (x % 5);
		stamp first = {0}, best = {0};

		for (int i = 0; i < n; i++)
		{
			x ^= x << 13, x ^= x >> 7, x ^= x << 17;
			set[i] = domain[x % (uint64_t) ndomain];
		}
		for (int perm = 0; perm < 24; perm++)
		{
			stamp cur;

			/* a random permutation */
			for (int i = n - 1; i > 0; i--)
			{
				int	  k;
				stamp tmp;

				x ^= x << 13, x ^= x >> 7, x ^= x << 17;
				k = (int) (x % (uint64_t) (i + 1));
				tmp = set[i], set[i] = set[k], set[k] = tmp;
			}
			cur = set[0];
			for (int i = 1; i < n; i++)
				if (vs(&cur, &set[i]) == PGS_MERGE_WIN)
					cur = set[i];
			if (perm == 0)
				first = cur;
			else if (first.cl & 1)
				assert_true(same_write(&first, &cur));
			else
				assert_true(first.cl == cur.cl); /* a deleted life: no cell to agree on */
			best = cur;
		}
		/* and the winner beats or equals every write of the set */
		for (int i = 0; i < n; i++)
			if (comparable(&best, &set[i]))
				assert_int_not_equal(vs(&best, &set[i]), PGS_MERGE_WIN);
	}
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup(test_life, setup),
		cmocka_unit_test_setup(test_rung_cl_higher_wins, setup),
		cmocka_unit_test_setup(test_rung_delete_beats_concurrent_update, setup),
		cmocka_unit_test_setup(test_rung_resurrection_beats_delete, setup),
		cmocka_unit_test_setup(test_rung_stale_life_loses, setup),
		cmocka_unit_test_setup(test_rung_same_life_by_hlc, setup),
		cmocka_unit_test_setup(test_rung_tie_by_site, setup),
		cmocka_unit_test_setup(test_rung_same_stamp_and_site_is_same, setup),
		cmocka_unit_test_setup(test_unstamped_local_loses, setup),
		cmocka_unit_test_setup(test_deleted_life_takes_no_cell, setup),
		cmocka_unit_test_setup(test_antisymmetric_and_total, setup),
		cmocka_unit_test_setup(test_transitive, setup),
		cmocka_unit_test_setup(test_fold_order_independent, setup),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
