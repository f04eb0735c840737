/*
 * merge.c — the merge ladder, written once, as pure functions.
 *
 * Every change is a (row, column) write tagged with the row's causal length
 * cl, an HLC stamp and the site that made it. Replicas agree because all of
 * them order competing writes of one cell by the same total order:
 *
 *   1. causal length: the larger cl wins. cl counts the row's lives: odd =
 *      alive, even = deleted. A delete (cl -> cl+1, even) therefore beats
 *      every update made concurrently in the life it ended, and a re-insert
 *      after a delete (cl+2, odd) resurrects the row and beats the delete.
 *      A column write with a smaller cl belongs to a life that is over: lost.
 *   2. within the same life (equal, odd cl): the larger HLC stamp wins, so
 *      the edit made last in time wins, and an edit made after seeing
 *      another (its stamp is at least that one + 1) always beats it;
 *   3. equal stamps: the larger site id (16 bytes, memcmp) wins;
 *   4. equal stamp and site: the same write seen twice -> SAME (no-op).
 *      A site never stamps two different values of one cell with one stamp
 *      (each local write of a cell takes at least the cell's stamp + 1), so
 *      rung 4 is idempotence, not a tie to break.
 *
 * A cell never written in the current life (local == NULL) loses to any
 * write of that life. Row existence alone is decided by rung 1.
 */
#include "pgsync.h"

#include <string.h>

/* the nil UUID: below every real site id, so a canonical form loses ties */
const uint8_t PGS_SITE_CANON[16] = {0};

pgs_merge
pgs_merge_life(int64_t local_cl, int64_t in_cl)
{
	if (in_cl > local_cl)
		return PGS_MERGE_WIN;
	return in_cl == local_cl ? PGS_MERGE_SAME : PGS_MERGE_LOSE;
}

pgs_merge
pgs_merge_cell(int64_t local_cl, const pgs_cellstamp *local, int64_t in_cl, const pgs_cellstamp *in)
{
	int c;

	if (in_cl != local_cl)
		return in_cl > local_cl ? PGS_MERGE_WIN : PGS_MERGE_LOSE;
	if ((in_cl & 1) == 0)
		return PGS_MERGE_LOSE; /* the row is deleted in this life */
	if (!local)
		return PGS_MERGE_WIN;
	if (in->hlc != local->hlc)
		return in->hlc > local->hlc ? PGS_MERGE_WIN : PGS_MERGE_LOSE;
	c = memcmp(in->site, local->site, PGS_SITE_LEN);
	if (c != 0)
		return c > 0 ? PGS_MERGE_WIN : PGS_MERGE_LOSE;
	return PGS_MERGE_SAME;
}
