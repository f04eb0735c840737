/*
 * local.c — the local-edit rules: how a replica's own write changes a row's
 * clock (docs/DESIGN.md, "The merge ladder"). One place for both engines'
 * capture triggers and the test engine; the engines only read the clock row,
 * call pgs_local_edit and write what it says.
 *
 *   INSERT of a key never seen      cl 1, every column stamped
 *   INSERT of a deleted key         cl + 1 (a new life), every column stamped
 *   INSERT over a live row          every column restamped (INSERT OR REPLACE)
 *   UPDATE of a live row            the changed columns restamped
 *   UPDATE of a row without a live  a new life (cl + 1, or 1), every column
 *   clock (written with capture     stamped
 *   off, or its delete was merged)
 *   DELETE                          cl + 1 (even), column stamps cleared;
 *                                   nothing when already deleted
 *   key change                      DELETE of the old key + INSERT of the new
 *
 * A restamp is max(tick, stamp + 1): an edit made after seeing a cell's
 * stamp beats it even when that stamp is from a clock running ahead.
 * Grow-only (gset) tables accept only the INSERT of a new or deleted key.
 *
 * After a tombstone GC a key "never seen" may be one whose deleted lives
 * were collected: its first life starts above the table's floor instead of
 * at 1 (pgs_local_above_floor), so it beats every life of the key a replica
 * may still hold.
 */
#include "pgsync.h"
#include "../database.h"

static void
new_life(pgs_rowclock *rc, int64_t cl, int64_t ver, uint64_t tick)
{
	rc->cl = cl;
	rc->cl_ver = ver;
	rc->cl_site = 0;
	for (int i = 0; i < rc->ncols; i++)
		rc->cols[i] = (pgs_stamp){.hlc = tick, .ver = ver, .site = 0};
}

void
pgs_local_above_floor(pgs_rowclock *rc, int64_t floor)
{
	if (floor <= 0)
		return;
	rc->cl += floor + (floor & 1);
}

void
pgs_local_stamp(pgs_stamp *s, int64_t ver, uint64_t tick)
{
	s->hlc = s->hlc >= tick ? s->hlc + 1 : tick;
	s->ver = ver;
	s->site = 0;
}

pgs_local_result
pgs_local_edit(pgs_rowclock *rc, bool found, pgs_local_op op, int algo, const bool *changed,
			   int64_t ver, uint64_t tick)
{
	bool live = found && (rc->cl & 1) != 0;
	int	 n = 0;

	switch (op)
	{
		case PGS_LOCAL_INSERT:
			if (!live)
			{
				new_life(rc, found ? rc->cl + 1 : 1, ver, tick);
				return PGS_LOCAL_WRITE;
			}
			if (algo == DB_ALGO_GSET)
				return PGS_LOCAL_GSET;
			for (int i = 0; i < rc->ncols; i++)
				pgs_local_stamp(&rc->cols[i], ver, tick);
			return PGS_LOCAL_WRITE;
		case PGS_LOCAL_UPDATE:
			if (algo == DB_ALGO_GSET)
				return PGS_LOCAL_GSET;
			if (!live)
			{
				new_life(rc, found ? rc->cl + 1 : 1, ver, tick);
				return PGS_LOCAL_WRITE;
			}
			for (int i = 0; i < rc->ncols; i++)
				if (!changed || changed[i])
				{
					pgs_local_stamp(&rc->cols[i], ver, tick);
					n++;
				}
			return n ? PGS_LOCAL_WRITE : PGS_LOCAL_NONE;
		case PGS_LOCAL_DELETE:
			if (algo == DB_ALGO_GSET)
				return PGS_LOCAL_GSET;
			if (found && !live)
				return PGS_LOCAL_NONE; /* already a tombstone */
			rc->cl = found ? rc->cl + 1 : 2;
			rc->cl_ver = ver;
			rc->cl_site = 0;
			for (int i = 0; i < rc->ncols; i++)
				rc->cols[i] = (pgs_stamp){0};
			return PGS_LOCAL_WRITE;
	}
	return PGS_LOCAL_NONE;
}
