/*
 * apply.c — pgs_apply: merge a payload into the local database.
 *
 * Order of work, chosen so that bad input changes nothing and losing changes
 * cost almost nothing:
 *   1. verify the header and checksum, decompress (payload.c);
 *   2. resolve every table and column of the dictionaries by name, and walk
 *      the whole body once to validate it, before any write;
 *   3. for each row group: read the row's clock once, decide every change
 *      with the pure merge rules (merge.c) from the clock alone, and only if
 *      something wins write the winning columns in ONE row write (RLS sees
 *      the whole row) and the new clock.
 * The engine wraps the call in a savepoint: any error rolls everything back.
 * A row the engine refuses for permissions is reported through db_reject and
 * skipped without touching its clock, so it is neither lost nor blocking.
 */
#include "pgsync.h"
#include "../database.h"

#include <string.h>

typedef struct apply_table
{
	db_table			*t;
	const db_table_info *ti;
	int					*colmap; /* payload column -> local column */
} apply_table;

typedef struct apply_ctx
{
	db_conn		*db;
	pgs_reader	 r;
	apply_table *tables;
	uint32_t	*sitemap; /* payload site -> local site index */
	int64_t		 ver;	  /* local version of this apply, 0 until needed */
	int			 maxcols;
	pgs_stamp	*stamps;
	int			*wcols;
	pgs_value	*wvals;
	pgs_buf		 blob;
	uint64_t	 max_hlc;
} apply_ctx;

static pgs_rc
oom(pgs_err *err)
{
	return pgs_fail(err, PGS_ERR_NOMEM, "out of memory applying a payload", NULL, NULL);
}

static bool
name_eq(const uint8_t *a, uint32_t alen, const char *b)
{
	return strlen(b) == alen && memcmp(a, b, alen) == 0;
}

/* resolve maps the payload's dictionaries onto local tables, columns, sites. */
static pgs_rc
resolve(apply_ctx *a, pgs_err *err)
{
	pgs_reader *r = &a->r;
	pgs_rc		rc;

	a->tables = pgs_malloc(sizeof(apply_table) * (r->ntables ? r->ntables : 1));
	a->sitemap = pgs_malloc(sizeof(uint32_t) * (r->nsites ? r->nsites : 1));
	if (!a->tables || !a->sitemap)
		return oom(err);
	memset(a->tables, 0, sizeof(apply_table) * (r->ntables ? r->ntables : 1));
	for (uint32_t i = 0; i < r->ntables; i++)
	{
		pgs_dict_table *d = &r->tables[i];
		apply_table	   *at = &a->tables[i];

		if ((rc = db_table_find(a->db, d->name, d->name_len, &at->t, err)) != PGS_OK)
			return rc;
		at->ti = db_table_describe(at->t);
		if ((int) d->npk != at->ti->npk)
		{
			pgs_failf(err, PGS_ERR_SCHEMA, "Give the table the same primary key on every replica.",
					  "primary key of table \"%s\" does not match the payload", at->ti->name);
			pgs_err_detailf(err, "The payload has %u key columns, the local table %d.", d->npk,
							at->ti->npk);
			return PGS_ERR_SCHEMA;
		}
		for (uint32_t k = 0; k < d->npk; k++)
			if (!name_eq(d->pk_names[k], d->pk_name_lens[k], at->ti->pk_names[k]))
			{
				pgs_failf(err, PGS_ERR_SCHEMA,
						  "Give the table the same primary key on every replica.",
						  "primary key of table \"%s\" does not match the payload", at->ti->name);
				char nm[72];

				pgs_err_detailf(err, "Key column %u is \"%s\" in the payload and \"%s\" here.",
								k + 1, pgs_name_for_msg(nm, d->pk_names[k], d->pk_name_lens[k]),
								at->ti->pk_names[k]);
				return PGS_ERR_SCHEMA;
			}
		at->colmap = pgs_malloc(sizeof(int) * (d->ncols ? d->ncols : 1));
		if (!at->colmap)
			return oom(err);
		for (uint32_t c = 0; c < d->ncols; c++)
		{
			int found = -1;

			for (int l = 0; l < at->ti->ncols && found < 0; l++)
				if (name_eq(d->col_names[c], d->col_name_lens[c], at->ti->col_names[l]))
					found = l;
			if (found < 0)
			{
				char nm[72];

				pgs_failf(err, PGS_ERR_SCHEMA,
						  "Add the column here (and call sync_init again) before applying payloads "
						  "from replicas that have it.",
						  "unknown column \"%s\" in table \"%s\"",
						  pgs_name_for_msg(nm, d->col_names[c], d->col_name_lens[c]), at->ti->name);
				return PGS_ERR_SCHEMA;
			}
			for (uint32_t k = 0; k < c; k++)
				if (at->colmap[k] == found)
				{
					pgs_failf(err, PGS_ERR_CORRUPT,
							  "The payload was damaged or forged; fetch it again from its sender.",
							  "corrupt payload: column \"%s\" of table \"%s\" appears twice",
							  at->ti->col_names[found], at->ti->name);
					return PGS_ERR_CORRUPT;
				}
			at->colmap[c] = found;
		}
		if (at->ti->ncols > a->maxcols)
			a->maxcols = at->ti->ncols;
	}
	for (uint32_t s = 0; s < r->nsites; s++)
		if ((rc = db_site_intern(a->db, r->sites + 16 * s, &a->sitemap[s], err)) != PGS_OK)
			return rc;
	a->stamps = pgs_malloc(sizeof(pgs_stamp) * (a->maxcols + 1));
	a->wcols = pgs_malloc(sizeof(int) * (a->maxcols + 1));
	a->wvals = pgs_malloc(sizeof(pgs_value) * (a->maxcols + 1));
	if (!a->stamps || !a->wcols || !a->wvals)
		return oom(err);
	return PGS_OK;
}

static pgs_rc
need_version(apply_ctx *a, pgs_err *err)
{
	if (a->ver)
		return PGS_OK;
	return db_apply_version(a->db, &a->ver, err);
}

/* apply_group merges one row group. */
static pgs_rc
apply_group(apply_ctx *a, const pgs_group *g, pgs_apply_stats *st, pgs_err *err)
{
	apply_table			*at = &a->tables[g->table];
	const db_table_info *ti = at->ti;
	pgs_rowclock		 rc = {.ncols = ti->ncols, .cols = a->stamps};
	bool				 found;
	int64_t				 lcl = 0;
	const uint8_t		*blob;
	size_t				 blob_len;
	int					 n = 0;
	pgs_merge			 life;
	pgs_rc				 r;
	const uint8_t		*in_sites = a->r.sites;

	st->changes += g->nchanges;
	for (uint32_t i = 0; i < g->nchanges; i++)
		if (g->changes[i].hlc > a->max_hlc)
			a->max_hlc = g->changes[i].hlc;
	if ((r = db_clock_get(a->db, at->t, g->pk, &found, &lcl, &blob, &blob_len, err)) != PGS_OK)
		return r;
	if (!found)
		lcl = 0;
	life = pgs_merge_life(lcl, g->cl);
	if (life == PGS_MERGE_LOSE || (life == PGS_MERGE_SAME && (g->cl & 1) == 0))
	{
		st->lost += g->nchanges;
		return PGS_OK;
	}
	if (life == PGS_MERGE_SAME)
	{
		/* same life: per-column last-writer-wins, decided from the clock alone */
		if ((r = pgs_rowclock_decode(blob, blob_len, &rc, err)) != PGS_OK)
			return r;
		for (uint32_t i = 0; i < g->nchanges; i++)
		{
			const pgs_change *c = &g->changes[i];
			int				  lc = at->colmap[c->col];
			pgs_stamp		 *s = &a->stamps[lc];
			pgs_cellstamp	  in = {c->hlc, in_sites + 16 * c->site};
			pgs_merge		  m;

			if (s->hlc == 0)
				m = PGS_MERGE_WIN;
			else if (c->hlc != s->hlc)
				m = c->hlc > s->hlc ? PGS_MERGE_WIN : PGS_MERGE_LOSE;
			else
			{
				pgs_cellstamp loc = {s->hlc, NULL};

				if ((r = db_site_lookup(a->db, s->site, &loc.site, err)) != PGS_OK)
					return r;
				m = pgs_merge_cell(lcl, &loc, g->cl, &in);
			}
			if (m != PGS_MERGE_WIN)
				continue;
			a->wcols[n] = lc;
			a->wvals[n] = c->value;
			a->stamps[lc].hlc = c->hlc;
			a->stamps[lc].site = a->sitemap[c->site];
			n++;
		}
		st->lost += g->nchanges - n;
		if (n == 0)
			return PGS_OK;
		if ((r = need_version(a, err)) != PGS_OK)
			return r;
		for (int k = 0; k < n; k++)
			a->stamps[a->wcols[k]].ver = a->ver;
		r = db_row_write(a->db, at->t, g->pk, DB_WRITE_MERGE, n, a->wcols, a->wvals, err);
	}
	else
	{
		/* a new life of the row: a delete, or a (re-)insert with its columns */
		if (ti->algo == DB_ALGO_GSET && (g->cl & 1) == 0)
			return pgs_failf(
				err, PGS_ERR_SCHEMA,
				"Make the table a cls table on every replica, or stop deleting from it.",
				"grow-only table \"%s\" cannot receive a delete", ti->name);
		if ((r = need_version(a, err)) != PGS_OK)
			return r;
		for (int i = 0; i < ti->ncols; i++)
			a->stamps[i].hlc = 0, a->stamps[i].ver = 0, a->stamps[i].site = 0;
		rc.cl_ver = a->ver;
		rc.cl_site = a->sitemap[g->cl_site];
		for (uint32_t i = 0; i < g->nchanges; i++)
		{
			const pgs_change *c = &g->changes[i];
			int				  lc = at->colmap[c->col];

			a->wcols[n] = lc;
			a->wvals[n] = c->value;
			a->stamps[lc].hlc = c->hlc;
			a->stamps[lc].site = a->sitemap[c->site];
			a->stamps[lc].ver = a->ver;
			n++;
		}
		if (g->cl & 1)
			r = db_row_write(a->db, at->t, g->pk, (lcl & 1) ? DB_WRITE_REPLACE : DB_WRITE_INSERT, n,
							 a->wcols, a->wvals, err);
		else
			r = db_row_delete(a->db, at->t, g->pk, err);
		st->won++; /* the row-life change itself */
	}
	if (r == PGS_ERR_PERMISSION)
	{
		db_reject(a->db, at->t, g->pk, err);
		st->rejected++;
		if (life == PGS_MERGE_WIN)
			st->won--;
		return PGS_OK;
	}
	if (r != PGS_OK)
		return r;
	st->won += n;
	if (life == PGS_MERGE_SAME)
	{
		/* keep cl_ver/cl_site as decoded */
	}
	rc.cl = g->cl;
	a->blob.len = 0;
	pgs_rowclock_encode(&rc, &a->blob);
	if (a->blob.oom)
		return oom(err);
	return db_clock_put(a->db, at->t, g->pk, found, g->cl, pgs_rowclock_max_ver(&rc), a->blob.p,
						a->blob.len, err);
}

pgs_rc
pgs_apply(db_conn *db, const uint8_t *payload, size_t len, pgs_apply_stats *st, pgs_err *err)
{
	apply_ctx		a;
	pgs_header		h;
	const uint8_t  *body;
	uint8_t		   *owned = NULL;
	pgs_rc			rc;
	pgs_apply_stats dummy = {0};

	memset(&a, 0, sizeof a);
	st = st ? st : &dummy;
	memset(st, 0, sizeof *st);
	a.db = db;
	pgs_buf_init(&a.blob);
	if ((rc = pgs_payload_body(payload, len, &h, &body, &owned, err)) != PGS_OK)
		return rc;

	/* validation pass: the whole body must parse before anything is written */
	if ((rc = pgs_reader_open(&a.r, body, h.body_len, err)) == PGS_OK)
	{
		pgs_group g;
		bool	  done = false;

		while (rc == PGS_OK && !done)
			rc = pgs_reader_next(&a.r, &g, &done, err);
	}
	pgs_reader_close(&a.r);
	if (rc != PGS_OK)
		goto out;

	if ((rc = pgs_reader_open(&a.r, body, h.body_len, err)) != PGS_OK)
		goto out;
	if ((rc = resolve(&a, err)) != PGS_OK)
		goto out;
	for (;;)
	{
		pgs_group g;
		bool	  done;

		if ((rc = pgs_reader_next(&a.r, &g, &done, err)) != PGS_OK || done)
			break;
		if ((rc = apply_group(&a, &g, st, err)) != PGS_OK)
			break;
	}
	if (rc == PGS_OK)
		rc = db_apply_end(db, err);
	if (rc == PGS_OK && a.max_hlc)
		rc = db_hlc_observe(db, pgs_hlc_receive(0, a.max_hlc, pgs_now_ms()), err);
out:
	if (a.tables)
		for (uint32_t i = 0; i < a.r.ntables; i++)
			pgs_free(a.tables[i].colmap);
	pgs_free(a.tables);
	pgs_free(a.sitemap);
	pgs_free(a.stamps);
	pgs_free(a.wcols);
	pgs_free(a.wvals);
	pgs_buf_free(&a.blob);
	pgs_reader_close(&a.r);
	pgs_free(owned);
	return rc;
}
