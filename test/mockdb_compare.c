/*
 * mockdb_compare.c — comparing two mock replicas (mock_equal) and taking,
 * checking and restoring snapshots of one (mock_snapshot, mock_same_state,
 * mock_restore), for the core's property tests. The replica itself is
 * mockdb.c.
 */
#include "mockdb.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "mockdb_int.h"

/* ---- comparison ---- */

static void
fmt_value(char *out, size_t cap, const pgs_value *v)
{
	switch (v->type)
	{
		case PGS_NULL:
			snprintf(out, cap, "NULL");
			break;
		case PGS_INT:
			snprintf(out, cap, "%lld", (long long) v->v.i);
			break;
		case PGS_REAL:
			snprintf(out, cap, "%.17g", v->v.r);
			break;
		case PGS_TEXT:
			snprintf(out, cap, "'%.*s'", (int) (v->len > 40 ? 40 : v->len), (const char *) v->v.p);
			break;
		default:
			snprintf(out, cap, "blob(%u)", v->len);
	}
}

static void
fmt_key(char *out, size_t cap, const db_table *t, const pgs_value *pk)
{
	size_t o = 0;

	out[0] = '\0';
	for (int i = 0; i < t->npk && o < cap; i++)
	{
		char v[64];

		fmt_value(v, sizeof v, &pk[i]);
		o += (size_t) snprintf(out + o, cap - o, "%s%s", i ? "," : "", v);
	}
}

#define WHY(...)                                                                                   \
	do                                                                                             \
	{                                                                                              \
		if (why)                                                                                   \
			snprintf(why, whylen, __VA_ARGS__);                                                    \
		return false;                                                                              \
	} while (0)

static bool
rows_equal(db_conn *a, db_table *ta, db_conn *b, db_table *tb, int what, char *why, size_t whylen)
{
	pgs_stamp *sa = NULL, *sb = NULL;
	bool	   ok = true;
	char	   key[160];

	if (ta->npk != tb->npk || ta->ncols != tb->ncols)
		WHY("table %s: different shapes", ta->name);
	if (what & MOCK_CMP_CLOCKS)
	{
		sa = mdb_xmalloc(sizeof(pgs_stamp) * (size_t) (ta->ncols + 1));
		sb = mdb_xmalloc(sizeof(pgs_stamp) * (size_t) (ta->ncols + 1));
	}
	for (int pass = 0; pass < 2 && ok; pass++)
	{
		db_table *t1 = pass ? tb : ta, *t2 = pass ? ta : tb;

		for (int i = 0; i < t1->r.nrows && ok; i++)
		{
			mrow *r1 = &t1->r.rows[i];
			mrow *r2 = mdb_rows_find(&t2->r, r1->key, r1->keylen);
			bool  a1 = r1->alive, a2 = r2 && r2->alive;

			fmt_key(key, sizeof key, t1, r1->pk);
			if (a1 != a2)
			{
				if (why)
					snprintf(why, whylen, "table %s key (%s): row alive on %s only", t1->name, key,
							 a1 == !pass ? "first" : "second");
				ok = false;
				break;
			}
			if (pass == 0 && a1)
				for (int c = 0; c < t1->ncols; c++)
					if (pgs_value_cmp(&r1->vals[c], &r2->vals[c]) != 0)
					{
						char v1[64], v2[64];

						fmt_value(v1, sizeof v1, &r1->vals[c]);
						fmt_value(v2, sizeof v2, &r2->vals[c]);
						if (why)
							snprintf(why, whylen, "table %s key (%s) column %s: %s vs %s", t1->name,
									 key, t1->col_names[c], v1, v2);
						ok = false;
						break;
					}
			if (!ok || !(what & MOCK_CMP_CLOCKS))
				continue;
			if (r1->has_clock != (r2 && r2->has_clock))
			{
				if (why)
					snprintf(why, whylen, "table %s key (%s): clock row on one side only", t1->name,
							 key);
				ok = false;
				break;
			}
			if (pass || !r1->has_clock)
				continue;
			if (r1->cl != r2->cl)
			{
				if (why)
					snprintf(why, whylen, "table %s key (%s): cl %lld vs %lld", t1->name, key,
							 (long long) r1->cl, (long long) r2->cl);
				ok = false;
				break;
			}
			{
				pgs_rowclock ca = {.ncols = ta->ncols, .cols = sa},
							 cb = {.ncols = ta->ncols, .cols = sb};

				if (pgs_rowclock_decode(r1->clk, r1->clk_len, &ca, NULL) != PGS_OK ||
					pgs_rowclock_decode(r2->clk, r2->clk_len, &cb, NULL) != PGS_OK)
					abort();
				for (int c = 0; c < ta->ncols; c++)
				{
					bool same = sa[c].hlc == sb[c].hlc;

					if (same && sa[c].hlc)
						same = memcmp(a->sites[sa[c].site], b->sites[sb[c].site], 16) == 0;
					if (!same)
					{
						if (why)
							snprintf(why, whylen,
									 "table %s key (%s) column %s: stamp %llu/%u vs %llu/%u",
									 ta->name, key, ta->col_names[c],
									 (unsigned long long) sa[c].hlc, sa[c].site,
									 (unsigned long long) sb[c].hlc, sb[c].site);
						ok = false;
						break;
					}
				}
			}
		}
	}
	pgs_free(sa);
	pgs_free(sb);
	return ok;
}

bool
mock_equal(db_conn *a, db_conn *b, int what, char *why, size_t whylen)
{
	if (a->ntables != b->ntables)
		WHY("different table counts");
	for (int i = 0; i < a->ntables; i++)
	{
		db_table *tb = mock_table(b, a->tables[i]->name);

		if (!tb)
			WHY("table %s missing on the second replica", a->tables[i]->name);
		if (!rows_equal(a, a->tables[i], b, tb, what, why, whylen))
			return false;
	}
	return true;
}

/* ---- snapshots ---- */

mock_snap *
mock_snapshot(db_conn *db)
{
	mock_snap *s = mdb_xmalloc(sizeof *s);

	s->sites = mdb_xmemdup(db->sites, 16 * (size_t) db->nsites);
	s->nsites = db->nsites;
	s->version = db->version;
	s->txn_ver = db->txn_ver;
	s->in_txn = db->in_txn;
	s->hlc = db->hlc;
	s->ntables = db->ntables;
	s->tables = mdb_xmalloc(sizeof(mtable_snap) * (size_t) (db->ntables ? db->ntables : 1));
	for (int i = 0; i < db->ntables; i++)
		mdb_rows_copy(db->tables[i], &s->tables[i].r, &db->tables[i]->r);
	return s;
}

static void
snap_free(db_conn *db, mock_snap *s)
{
	for (int i = 0; i < s->ntables; i++)
		mdb_rows_free(db->tables[i], &s->tables[i].r);
	pgs_free(s->tables);
	pgs_free(s->sites);
	pgs_free(s);
}

bool
mock_same_state(db_conn *db, const mock_snap *s, char *why, size_t whylen)
{
	if (db->version != s->version)
		WHY("db_version moved from %lld to %lld", (long long) s->version, (long long) db->version);
	if (db->hlc != s->hlc)
		WHY("hlc moved");
	if (db->nsites != s->nsites || memcmp(db->sites, s->sites, 16 * (size_t) s->nsites) != 0)
		WHY("site table changed (%u -> %u sites)", s->nsites, db->nsites);
	if (db->ntables != s->ntables)
		WHY("table count changed");
	for (int i = 0; i < db->ntables; i++)
	{
		const mrows *r1 = &s->tables[i].r, *r2 = &db->tables[i]->r;
		db_table	*t = db->tables[i];

		if (r1->nrows != r2->nrows)
			WHY("table %s: %d keys before, %d after", t->name, r1->nrows, r2->nrows);
		for (int k = 0; k < r1->nrows; k++)
		{
			const mrow *x = &r1->rows[k], *y = &r2->rows[k];

			if (x->keylen != y->keylen || memcmp(x->key, y->key, x->keylen) != 0 ||
				x->alive != y->alive || x->has_clock != y->has_clock || x->cl != y->cl ||
				x->ver != y->ver || x->clk_len != y->clk_len ||
				(x->clk_len && memcmp(x->clk, y->clk, x->clk_len) != 0))
				WHY("table %s: entry %d changed", t->name, k);
			if (x->alive)
				for (int c = 0; c < t->ncols; c++)
					if (pgs_value_cmp(&x->vals[c], &y->vals[c]) != 0)
						WHY("table %s: entry %d column %d changed", t->name, k, c);
		}
	}
	return true;
}

void
mock_restore(db_conn *db, mock_snap *s)
{
	for (int i = 0; i < db->ntables && i < s->ntables; i++)
	{
		mrows tmp = db->tables[i]->r;

		db->tables[i]->r = s->tables[i].r;
		s->tables[i].r = tmp;
	}
	if (s->nsites > db->sites_cap)
		abort(); /* sites only grow */
	memcpy(db->sites, s->sites, 16 * (size_t) s->nsites);
	db->nsites = s->nsites;
	db->version = s->version;
	db->txn_ver = s->txn_ver;
	db->in_txn = s->in_txn;
	db->hlc = s->hlc;
	snap_free(db, s);
}

void
mock_snapshot_free(db_conn *db, mock_snap *s)
{
	snap_free(db, s);
}

pgs_rc
mock_apply(db_conn *db, const uint8_t *payload, size_t len, pgs_apply_stats *st, pgs_err *err)
{
	bool	   autocommit = !db->in_txn;
	mock_snap *snap;
	pgs_rc	   rc;

	if (autocommit)
		mock_begin(db);
	snap = mock_snapshot(db);
	db->nlocked = 0;
	rc = pgs_apply(db, payload, len, false, st, err);
	if (rc == PGS_ERR_CAREFUL)
	{
		/* a row failed on the fast path: again, isolating every row */
		mock_restore(db, snap);
		snap = mock_snapshot(db);
		db->nlocked = 0;
		rc = pgs_apply(db, payload, len, true, st, err);
	}
	if (rc != PGS_OK)
		mock_restore(db, snap);
	else
		snap_free(db, snap);
	mdb_eph_reset(db);
	if (autocommit)
		mock_commit(db);
	return rc;
}

pgs_rc
mock_build(db_conn *db, int64_t since, const uint8_t *exclude_site, int compress, pgs_buf *out,
		   pgs_err *err)
{
	pgs_build_opts o = {.since = since, .exclude_site = exclude_site, .compress = compress};
	pgs_rc		   rc;

	if ((rc = db_version_safe(db, &o.until, err)) != PGS_OK)
		return rc;
	if (o.until < since)
		o.until = since;
	rc = pgs_build(db, &o, out, NULL, NULL, err);
	mdb_eph_reset(db);
	return rc;
}

void
mock_dump(db_conn *db, FILE *f)
{
	char u[37];

	pgs_uuid_format(db->sites[0], u);
	fprintf(f, "replica %s version %lld hlc %llu\n", u, (long long) db->version,
			(unsigned long long) db->hlc);
	for (int i = 0; i < db->ntables; i++)
	{
		db_table *t = db->tables[i];

		fprintf(f, " table %s\n", t->name);
		for (int k = 0; k < t->r.nrows; k++)
		{
			mrow *row = &t->r.rows[k];
			char  key[160];

			fmt_key(key, sizeof key, t, row->pk);
			fprintf(f, "  (%s) %s cl=%lld ver=%lld", key, row->alive ? "alive" : "dead",
					(long long) row->cl, (long long) row->ver);
			if (row->alive)
				for (int c = 0; c < t->ncols; c++)
				{
					char v[64];

					fmt_value(v, sizeof v, &row->vals[c]);
					fprintf(f, " %s=%s", t->col_names[c], v);
				}
			fprintf(f, "\n");
		}
	}
}
