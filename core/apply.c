/*
 * apply.c — pgs_apply: merge a payload into the local database.
 *
 * Order of work, chosen so that bad input changes nothing, losing changes
 * cost almost nothing, and every row has its own fate:
 *   1. verify the header and checksum, decompress (payload.c), and walk the
 *      whole body once to validate it, before any write;
 *   2. resolve the dictionaries by name. A table or column this replica
 *      does not have is not an error: its changes are held (kept aside with
 *      their clocks, db_held_*) and everything else applies; then announce
 *      every row the payload may write (db_apply_lock: an engine with
 *      concurrent writers locks them there, in an order of its own, before
 *      the first write);
 *   3. apply the row groups table by table in foreign-key order (parents
 *      first; deletes and removals children first) — one pass in payload
 *      order when no synced table references another. For each group: read
 *      the row's clock once, decide every change with the pure merge rules
 *      (merge.c), and only if something wins write the winning columns in ONE
 *      row write (RLS sees the whole row) and then the new clock;
 *   4. removal candidates (a row the sender's caller may not see) are
 *      matched against the local keys by their salted hash; snapshot ends
 *      forget what the snapshot did not contain.
 *
 * A row the engine cannot store (a constraint, a conversion, a trigger,
 * privileges, RLS) is rejected alone: its clock is left untouched and it is
 * reported through db_reject, so a later apply of the same change (after a
 * fix) still brings it. On the fast path (careful == false) the first such
 * row makes pgs_apply return PGS_ERR_CAREFUL: the engine rolls back and
 * applies again with careful set, isolating every row write. In careful mode
 * a row that fails on a foreign key is retried after the others, until no
 * more succeed. The engine wraps the call in a savepoint: any other error
 * rolls everything back.
 */
#include "pgsync.h"
#include "../database.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct cand
{
	uint64_t hash;
	int64_t	 cl;
	uint32_t cl_site; /* payload site */
} cand;

typedef struct apply_table
{
	db_table			*t; /* NULL: not synced here, its changes are held */
	const db_table_info *ti;
	int					*colmap; /* payload column -> local column, or COL_HELD, COL_DROPPED */
	bool				 unknown_cols;
	char				 why_held[256]; /* what differs, for the held columns */
	int					 order;			/* position in dependency order */
	cand				*cands;
	uint32_t			 ncands;
	uint32_t			 cands_cap;
} apply_table;

typedef struct deferred
{
	uint64_t ordinal; /* group number in the body */
	pgs_err	 why;
} deferred;

/* a row the payload may write: its table (payload index) and key hash */
typedef struct row_note
{
	uint32_t table;
	uint64_t hash;
} row_note;

typedef struct apply_ctx
{
	db_conn		  *db;
	const uint8_t *body;
	size_t		   body_len;
	uint8_t		   version;
	uint8_t		   origin[16]; /* the sender (payload header) */
	pgs_reader	   r;
	apply_table	  *tables;
	int			  *by_order; /* dependency order -> payload table index */
	uint32_t	  *sitemap;	 /* payload site -> local site index */
	uint8_t		  *site_ok;	 /* payload site: 0 unknown, 1 may be written, 2 refused */
	pgs_err		  *site_why;
	bool		   careful;
	int64_t		   ver; /* local version of this apply, 0 until needed */
	int			   maxcols;
	pgs_stamp	  *stamps;
	int			  *wcols;
	pgs_value	  *wvals;
	bool		  *differs;	   /* db_row_forms of the last row write */
	uint32_t	   canon_site; /* local index of PGS_SITE_CANON, once interned */
	bool		   have_canon;
	pgs_buf		   blob;
	uint64_t	   max_hlc;
	/* careful mode: rows failing on a foreign key, tried again at the end */
	deferred *defer;
	uint32_t  ndefer;
	uint32_t  defer_cap;
	bool	  final_round;
	uint64_t *only; /* when set: apply only these group ordinals (sorted) */
	uint32_t  nonly;
	/* rows of the payload, noted by the validation pass for db_apply_lock */
	row_note *notes;
	uint32_t  nnotes;
	uint32_t  notes_cap;
} apply_ctx;

static pgs_rc
oom(pgs_err *err)
{
	return pgs_fail(err, PGS_ERR_NOMEM, "out of memory applying a payload", NULL, NULL);
}

/* colmap values that are not a local column */
#define COL_HELD (-1)	 /* unknown here (a newer replica's column): kept aside */
#define COL_DROPPED (-2) /* dropped here (sync_alter, DROP COLUMN): ignored */

static bool
name_eq(const uint8_t *a, uint32_t alen, const char *b)
{
	return strlen(b) == alen && memcmp(a, b, alen) == 0;
}

/* ---- resolving the dictionaries ---------------------------------------- */

static pgs_rc
resolve_table(apply_ctx *a, uint32_t i, pgs_err *err)
{
	pgs_dict_table *d = &a->r.tables[i];
	apply_table	   *at = &a->tables[i];
	pgs_err			ignored;

	if (db_table_find(a->db, d->name, d->name_len, &at->t, &ignored) != PGS_OK)
	{
		at->t = NULL; /* not synced here (yet): held */
		return PGS_OK;
	}
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
			char nm[72];

			pgs_failf(err, PGS_ERR_SCHEMA, "Give the table the same primary key on every replica.",
					  "primary key of table \"%s\" does not match the payload", at->ti->name);
			pgs_err_detailf(err, "Key column %u is \"%s\" in the payload and \"%s\" here.", k + 1,
							pgs_name_for_msg(nm, d->pk_names[k], d->pk_name_lens[k]),
							at->ti->pk_names[k]);
			return PGS_ERR_SCHEMA;
		}
	at->colmap = pgs_malloc(sizeof(int) * (d->ncols ? d->ncols : 1));
	if (!at->colmap)
		return oom(err);
	for (uint32_t c = 0; c < d->ncols; c++)
	{
		int	 found = COL_HELD;
		bool by_name = false;

		for (int l = 0; l < at->ti->ncols && found < 0; l++)
			if (name_eq(d->col_names[c], d->col_name_lens[c], at->ti->col_names[l]))
				found = l, by_name = true;
		/* a column renamed or dropped here, or renamed by the sender (aliases) */
		for (int h = 0; h < at->ti->nhist && found == COL_HELD; h++)
			if (name_eq(d->col_names[c], d->col_name_lens[c], at->ti->hist_names[h]))
				found = at->ti->hist_cols[h] >= 0 ? at->ti->hist_cols[h] : COL_DROPPED;
		for (uint32_t k = 0; k < d->nalias && found == COL_HELD; k++)
			for (int l = 0; l < at->ti->ncols && found < 0 && d->alias_cols[k] == c; l++)
				if (name_eq(d->alias_names[k], d->alias_name_lens[k], at->ti->col_names[l]))
					found = l;
		for (uint32_t k = 0; k < c && found >= 0; k++)
			if (at->colmap[k] == found)
			{
				if (!by_name)
				{
					found = COL_HELD; /* a former name beside the current one: kept aside */
					break;
				}
				return pgs_failf(
					err, PGS_ERR_CORRUPT,
					"The payload was damaged or forged; fetch it again from its sender.",
					"corrupt payload: column \"%s\" of table \"%s\" appears twice",
					at->ti->col_names[found], at->ti->name);
			}
		if (found == COL_HELD)
		{
			/* a newer replica's column: held; say which (the fingerprints differ) */
			size_t used = strlen(at->why_held);
			char   nm[72];

			if (!at->unknown_cols)
				used = (size_t) snprintf(at->why_held, sizeof at->why_held,
										 "the sender's table \"%s\" has columns this replica's "
										 "lacks (add them and call sync_init): ",
										 at->ti->name);
			if (used < sizeof at->why_held)
				snprintf(at->why_held + used, sizeof at->why_held - used, "%s\"%s\"",
						 at->unknown_cols ? ", " : "",
						 pgs_name_for_msg(nm, d->col_names[c], d->col_name_lens[c]));
			at->unknown_cols = true;
		}
		at->colmap[c] = found;
	}
	if (at->ti->ncols > a->maxcols)
		a->maxcols = at->ti->ncols;
	return PGS_OK;
}

/* order_tables: payload tables in foreign-key order (parents first); returns
 * whether any payload table references another. */
static pgs_rc
order_tables(apply_ctx *a, bool *deps, pgs_err *err)
{
	uint32_t n = a->r.ntables;
	int		*indeg = pgs_malloc(sizeof(int) * (n ? n : 1));
	bool   **edge = NULL; /* edge[p][c]: c references p */
	uint32_t k = 0;
	pgs_rc	 rc = PGS_OK;

	*deps = false;
	a->by_order = pgs_malloc(sizeof(int) * (n ? n : 1));
	if (!indeg || !a->by_order)
	{
		pgs_free(indeg);
		return oom(err);
	}
	memset(indeg, 0, sizeof(int) * (n ? n : 1));
	for (uint32_t c = 0; c < n; c++)
	{
		db_table **parents;
		int		   np;

		if (!a->tables[c].t)
			continue;
		if ((rc = db_table_parents(a->db, a->tables[c].t, &parents, &np, err)) != PGS_OK)
			goto out;
		for (int j = 0; j < np; j++)
			for (uint32_t p = 0; p < n; p++)
				if (p != c && a->tables[p].t == parents[j])
				{
					if (!edge)
					{
						edge = pgs_malloc(sizeof(bool *) * n);
						if (!edge)
						{
							rc = oom(err);
							goto out;
						}
						memset(edge, 0, sizeof(bool *) * n);
					}
					if (!edge[p])
					{
						edge[p] = pgs_malloc(sizeof(bool) * n);
						if (!edge[p])
						{
							rc = oom(err);
							goto out;
						}
						memset(edge[p], 0, sizeof(bool) * n);
					}
					if (!edge[p][c])
					{
						edge[p][c] = true;
						indeg[c]++;
						*deps = true;
					}
				}
	}
	/* Kahn's algorithm, stable in payload order; a cycle keeps payload order
	 * for its members (DEFERRABLE constraints are the way out, docs/PG.md) */
	while (k < n)
	{
		bool progress = false;

		for (uint32_t i = 0; i < n; i++)
		{
			if (indeg[i] < 0 || indeg[i] > 0)
				continue;
			indeg[i] = -1;
			a->tables[i].order = (int) k;
			a->by_order[k++] = (int) i;
			progress = true;
			if (edge && edge[i])
				for (uint32_t c = 0; c < n; c++)
					if (edge[i][c])
						indeg[c]--;
		}
		if (!progress)
			for (uint32_t i = 0; i < n; i++)
				if (indeg[i] >= 0)
				{
					indeg[i] = 0; /* break the cycle at the first remaining table */
					break;
				}
	}
out:
	if (edge)
		for (uint32_t p = 0; p < n; p++)
			pgs_free(edge[p]);
	pgs_free(edge);
	pgs_free(indeg);
	return rc;
}

static pgs_rc
resolve(apply_ctx *a, bool *deps, pgs_err *err)
{
	pgs_reader *r = &a->r;
	pgs_rc		rc;
	size_t		nt = r->ntables ? r->ntables : 1, ns = r->nsites ? r->nsites : 1;

	a->tables = pgs_malloc(sizeof(apply_table) * nt);
	a->sitemap = pgs_malloc(sizeof(uint32_t) * ns);
	a->site_ok = pgs_malloc(ns);
	a->site_why = pgs_malloc(sizeof(pgs_err) * ns);
	if (!a->tables || !a->sitemap || !a->site_ok || !a->site_why)
		return oom(err);
	memset(a->tables, 0, sizeof(apply_table) * nt);
	memset(a->site_ok, 0, ns);
	for (uint32_t i = 0; i < r->ntables; i++)
		if ((rc = resolve_table(a, i, err)) != PGS_OK)
			return rc;
	for (uint32_t s = 0; s < r->nsites; s++)
		if ((rc = db_site_intern(a->db, r->sites + 16 * s, &a->sitemap[s], err)) != PGS_OK)
			return rc;
	a->stamps = pgs_malloc(sizeof(pgs_stamp) * (a->maxcols + 1));
	a->wcols = pgs_malloc(sizeof(int) * (a->maxcols + 1));
	a->wvals = pgs_malloc(sizeof(pgs_value) * (a->maxcols + 1));
	a->differs = pgs_malloc(sizeof(bool) * (a->maxcols + 1));
	if (!a->stamps || !a->wcols || !a->wvals || !a->differs)
		return oom(err);
	return order_tables(a, deps, err);
}

/* ---- held changes -------------------------------------------------------- */

/*
 * frag_write writes a one-group payload: table d (only the columns in
 * sel, all when sel is NULL) and group g's changes of those columns.
 */
static pgs_rc
frag_write(apply_ctx *a, const pgs_dict_table *d, const pgs_group *g, const bool *sel, pgs_buf *out,
		   pgs_err *err)
{
	pgs_writer	 w;
	pgs_name	*names = pgs_malloc(sizeof(pgs_name) * (d->npk + d->ncols + 1));
	pgs_wchange *ch = pgs_malloc(sizeof(pgs_wchange) * (g->nchanges + 1));
	uint32_t	*newcol = pgs_malloc(sizeof(uint32_t) * (d->ncols + 1));
	uint32_t	 nc = 0, n = 0, tidx;
	pgs_rc		 rc;

	if (!names || !ch || !newcol)
	{
		pgs_free(names);
		pgs_free(ch);
		pgs_free(newcol);
		return oom(err);
	}
	pgs_writer_init(&w);
	for (uint32_t i = 0; i < d->npk; i++)
		names[i] = (pgs_name){d->pk_names[i], d->pk_name_lens[i]};
	for (uint32_t c = 0; c < d->ncols; c++)
		if (!sel || sel[c])
		{
			newcol[c] = nc;
			names[d->npk + nc++] = (pgs_name){d->col_names[c], d->col_name_lens[c]};
		}
	tidx =
		pgs_writer_table(&w, (pgs_name){d->name, d->name_len}, d->npk, names, nc, names + d->npk);
	for (uint32_t i = 0; i < g->nchanges; i++)
	{
		const pgs_change *c = &g->changes[i];

		if (sel && !sel[c->col])
			continue;
		ch[n].col = newcol[c->col];
		ch[n].hlc = c->hlc;
		ch[n].site = pgs_writer_site(&w, a->r.sites + 16 * c->site);
		ch[n].value = c->value;
		n++;
	}
	pgs_writer_row(&w, tidx, g->whole && !sel, g->pk, g->cl,
				   pgs_writer_site(&w, a->r.sites + 16 * g->cl_site), n, ch);
	rc = pgs_writer_seal(&w, db_site_id(a->db), 0, 0, 0, false, out, err);
	pgs_writer_free(&w);
	pgs_free(names);
	pgs_free(ch);
	pgs_free(newcol);
	return rc;
}

/* frag_open reads a held fragment (one table, one group). */
static pgs_rc
frag_open(const uint8_t *p, size_t len, pgs_reader *r, pgs_group *g, uint8_t **owned, pgs_err *err)
{
	pgs_header	   h;
	const uint8_t *body;
	bool		   done;
	pgs_rc		   rc;

	if ((rc = pgs_payload_body(p, len, &h, &body, owned, err)) != PGS_OK)
		return rc;
	if ((rc = pgs_reader_open(r, h.version, body, h.body_len, err)) != PGS_OK)
		return rc;
	if ((rc = pgs_reader_next(r, g, &done, err)) != PGS_OK)
		return rc;
	if (done || r->ntables != 1)
		return pgs_fail(err, PGS_ERR_DB, "corrupt held change",
						"A row of the held-change store is not a one-row payload.", NULL);
	return PGS_OK;
}

/*
 * frag_merge merges a new fragment (group g of dictionary d, columns sel)
 * into the held one for the same key: the later life wins; in one life each
 * column keeps its winning stamp (merge.c's order). Writes the result to out.
 */
static pgs_rc
frag_merge(apply_ctx *a, const uint8_t *old, size_t old_len, const pgs_dict_table *d,
		   const pgs_group *g, const bool *sel, pgs_buf *out, pgs_err *err)
{
	pgs_reader		r;
	pgs_group		og;
	uint8_t		   *owned = NULL;
	pgs_writer		w;
	pgs_rc			rc;
	pgs_name	   *names = NULL;
	pgs_wchange	   *ch = NULL;
	uint32_t		ncols = 0, n = 0, tidx;
	pgs_dict_table *od;

	memset(&r, 0, sizeof r);
	if ((rc = frag_open(old, old_len, &r, &og, &owned, err)) != PGS_OK)
		goto out;
	od = &r.tables[0];
	if (og.cl != g->cl)
	{
		/* another life: the later one is all that counts */
		if (og.cl > g->cl)
		{
			rc = pgs_buf_reserve(out, old_len) ? PGS_OK : oom(err);
			if (rc == PGS_OK)
			{
				memcpy(out->p, old, old_len);
				out->len = old_len;
			}
		}
		else
			rc = frag_write(a, d, g, sel, out, err);
		goto out;
	}
	/* the same life: the union of the columns, each with its winner */
	names = pgs_malloc(sizeof(pgs_name) * (d->npk + d->ncols + od->ncols + 1));
	ch = pgs_malloc(sizeof(pgs_wchange) * (d->ncols + od->ncols + 1));
	if (!names || !ch)
	{
		rc = oom(err);
		goto out;
	}
	pgs_writer_init(&w);
	for (uint32_t i = 0; i < d->npk; i++)
		names[i] = (pgs_name){d->pk_names[i], d->pk_name_lens[i]};
	/* columns: the old fragment's, then the new one's it lacks */
	for (uint32_t c = 0; c < od->ncols; c++)
		names[d->npk + ncols++] = (pgs_name){od->col_names[c], od->col_name_lens[c]};
	for (uint32_t c = 0; c < d->ncols; c++)
	{
		bool have = false;

		if (sel && !sel[c])
			continue;
		for (uint32_t k = 0; k < od->ncols && !have; k++)
			have = od->col_name_lens[k] == d->col_name_lens[c] &&
				   memcmp(od->col_names[k], d->col_names[c], d->col_name_lens[c]) == 0;
		if (!have)
			names[d->npk + ncols++] = (pgs_name){d->col_names[c], d->col_name_lens[c]};
	}
	tidx = pgs_writer_table(&w, (pgs_name){d->name, d->name_len}, d->npk, names, ncols,
							names + d->npk);
	for (uint32_t c = 0; c < ncols; c++)
	{
		pgs_name		  nm = names[d->npk + c];
		const pgs_change *best = NULL;
		const uint8_t	 *best_site = NULL;

		for (uint32_t i = 0; i < og.nchanges; i++)
			if (od->col_name_lens[og.changes[i].col] == nm.len &&
				memcmp(od->col_names[og.changes[i].col], nm.p, nm.len) == 0)
			{
				best = &og.changes[i];
				best_site = r.sites + 16 * best->site;
			}
		for (uint32_t i = 0; i < g->nchanges; i++)
		{
			const pgs_change *c2 = &g->changes[i];

			if ((sel && !sel[c2->col]) || d->col_name_lens[c2->col] != nm.len ||
				memcmp(d->col_names[c2->col], nm.p, nm.len) != 0)
				continue;
			{
				const uint8_t *s2 = a->r.sites + 16 * c2->site;
				pgs_cellstamp  in = {c2->hlc, s2}, cur = {best ? best->hlc : 0, best_site};

				if (!best || pgs_merge_cell(g->cl, &cur, g->cl, &in) == PGS_MERGE_WIN)
				{
					best = c2;
					best_site = s2;
				}
			}
		}
		if (!best)
			continue;
		ch[n].col = c;
		ch[n].hlc = best->hlc;
		ch[n].site = pgs_writer_site(&w, best_site);
		ch[n].value = best->value;
		n++;
	}
	/* the union of a whole row and anything is whole */
	pgs_writer_row(&w, tidx, og.whole || (g->whole && !sel), g->pk, g->cl,
				   pgs_writer_site(&w, a->r.sites + 16 * g->cl_site), n, ch);
	rc = pgs_writer_seal(&w, db_site_id(a->db), 0, 0, 0, false, out, err);
	pgs_writer_free(&w);
out:
	pgs_free(names);
	pgs_free(ch);
	pgs_reader_close(&r);
	pgs_free(owned);
	return rc;
}

/*
 * hold keeps group g (the columns in sel, or all) of payload table ti aside
 * with their clocks: merged into what is already held for the key.
 */
static pgs_rc
hold(apply_ctx *a, uint32_t ti, const pgs_group *g, const bool *sel, const char *code,
	 const char *message, pgs_apply_stats *st, pgs_err *err)
{
	const pgs_dict_table *d = &a->r.tables[ti];
	pgs_buf				  key, frag;
	const uint8_t		 *old;
	size_t				  old_len;
	pgs_name			  tname = {d->name, d->name_len};
	pgs_rc				  rc;

	pgs_buf_init(&key);
	pgs_buf_init(&frag);
	pgs_key_encode(&key, d->npk, g->pk);
	if (key.oom)
		return oom(err);
	rc = db_held_get(a->db, tname, (pgs_name){key.p, (uint32_t) key.len}, &old, &old_len, err);
	if (rc == PGS_OK)
		rc = old ? frag_merge(a, old, old_len, d, g, sel, &frag, err)
				 : frag_write(a, d, g, sel, &frag, err);
	if (rc == PGS_OK)
		rc = db_held_put(a->db, tname, (pgs_name){key.p, (uint32_t) key.len}, code, message, frag.p,
						 frag.len, err);
	if (rc == PGS_OK)
		st->held++;
	pgs_buf_free(&key);
	pgs_buf_free(&frag);
	return rc;
}

/* ---- row groups ---------------------------------------------------------- */

static pgs_rc
need_version(apply_ctx *a, pgs_err *err)
{
	if (a->ver)
		return PGS_OK;
	return db_apply_version(a->db, &a->ver, err);
}

/* site_allowed: may stamps of payload site s be written here? */
static pgs_rc
site_allowed(apply_ctx *a, uint32_t s, bool *ok, pgs_err *err)
{
	if (!a->site_ok[s])
	{
		pgs_rc rc = db_site_check(a->db, a->sitemap[s], &a->site_why[s]);

		if (rc != PGS_OK && rc != PGS_ERR_PERMISSION)
		{
			*err = a->site_why[s];
			return rc;
		}
		a->site_ok[s] = rc == PGS_OK ? 1 : 2;
		if (rc != PGS_OK && !a->site_why[s].code[0])
			pgs_err_code(&a->site_why[s], PGS_CODE_FOREIGN_SITE);
	}
	*ok = a->site_ok[s] == 1;
	return PGS_OK;
}

static void
defer_add(apply_ctx *a, uint64_t ordinal, const pgs_err *why)
{
	if (a->ndefer == a->defer_cap)
	{
		uint32_t  cap = a->defer_cap ? a->defer_cap * 2 : 16;
		deferred *n = pgs_realloc(a->defer, sizeof(deferred) * cap);

		if (!n)
			return; /* not deferred: reported now by the caller's fallback */
		a->defer = n;
		a->defer_cap = cap;
	}
	a->defer[a->ndefer].ordinal = ordinal;
	a->defer[a->ndefer].why = *why;
	a->ndefer++;
}

/* reject_row reports a refused row (and on a device keeps it aside). */
static pgs_rc
reject_row(apply_ctx *a, apply_table *at, const pgs_group *g, const pgs_err *why,
		   pgs_apply_stats *st, pgs_err *err)
{
	char code[6], msg[256];

	db_reject(a->db, at->t, g->pk, why);
	st->rejected++;
	if (!db_hold_rejected(a->db))
		return PGS_OK;
	memcpy(code, why->code, sizeof code);
	memcpy(msg, why->msg, sizeof msg);
	return hold(a, (uint32_t) (at - a->tables), g, NULL, code, msg, st, err);
}

/*
 * row_failed decides the fate of a row whose write failed: fast path ->
 * apply again carefully; careful -> defer (foreign key, not the last round)
 * or reject. Returns PGS_OK when the apply goes on.
 */
static pgs_rc
row_failed(apply_ctx *a, apply_table *at, const pgs_group *g, uint64_t ordinal, pgs_rc r,
		   pgs_err *err, pgs_apply_stats *st)
{
	if (r == PGS_ERR_PERMISSION && !err->code[0])
		pgs_err_code(err, "42501");
	if (!a->careful)
		return PGS_ERR_CAREFUL;
	if (strcmp(err->code, "23503") == 0 && !a->final_round && ordinal != UINT64_MAX)
	{
		uint32_t before = a->ndefer;

		defer_add(a, ordinal, err);
		if (a->ndefer > before)
			return PGS_OK;
	}
	return reject_row(a, at, g, err, st, err);
}

/*
 * restamp: the row write just made stored some of its n winning values in
 * a form of the engine's own (db_row_forms: Postgres' jsonb, timestamptz,
 * numeric...). Each such cell, whose stored value already is that form,
 * gets a new stamp: the received one's immediate successor (hlc + 1) at the
 * canonical site, with this apply's version. So it is a change of this
 * replica that beats the received form everywhere (also on the writer,
 * whose pulls exclude only its own site), that any later edit still beats
 * (a later hlc; the same hlc too, as the canonical site loses every tie),
 * and that never comes back: receivers store it as sent and Postgres would
 * store it in the same form. A value that already carries a canonical stamp
 * is never re-stamped: each write is canonicalized at most once, so there is
 * no loop in any topology. docs/TYPES.md, "One form on every replica".
 */
static pgs_rc
restamp(apply_ctx *a, int n, pgs_apply_stats *st, pgs_err *err)
{
	pgs_rc r;

	if (!db_row_forms(a->db, n, a->differs))
		return PGS_OK;
	for (int k = 0; k < n; k++)
	{
		pgs_stamp *s = &a->stamps[a->wcols[k]];

		if (!a->differs[k] || s->hlc >= PGS_HLC_MAX)
			continue; /* stored as received, or no successor (a forged stamp) */
		if (!a->have_canon)
		{
			if ((r = db_site_intern(a->db, PGS_SITE_CANON, &a->canon_site, err)) != PGS_OK)
				return r;
			a->have_canon = true;
		}
		if (s->site == a->canon_site)
			continue; /* canonicalized once already (by another Postgres): kept, so
					   * that two replicas with different column types cannot
					   * re-stamp each other forever */
		s->hlc++;
		s->site = a->canon_site;
		if (s->hlc > a->max_hlc)
			a->max_hlc = s->hlc;
		st->restamped++;
	}
	return PGS_OK;
}

/* apply_group merges one row group of a known table. */
static pgs_rc
apply_group(apply_ctx *a, uint32_t tix, const pgs_group *g, uint64_t ordinal, pgs_apply_stats *st,
			pgs_err *err)
{
	apply_table			*at = &a->tables[tix];
	const db_table_info *ti = at->ti;
	pgs_rowclock		 rc = {.ncols = ti->ncols, .cols = a->stamps};
	bool				 found, ok, held_part = false;
	int64_t				 lcl = 0;
	const uint8_t		*blob;
	size_t				 blob_len;
	int					 n = 0;
	pgs_merge			 life;
	pgs_rc				 r;
	const uint8_t		*in_sites = a->r.sites;
	bool				*sel = NULL;

	st->changes += g->nchanges;
	for (uint32_t i = 0; i < g->nchanges; i++)
		if (g->changes[i].hlc > a->max_hlc)
			a->max_hlc = g->changes[i].hlc;
	if ((r = db_clock_get(a->db, at->t, g->pk, &found, &lcl, &blob, &blob_len, err)) != PGS_OK)
		return r == PGS_ERR_ROW ? row_failed(a, at, g, ordinal, r, err, st) : r;
	if (!found)
		lcl = 0;
	life = pgs_merge_life(lcl, g->cl);
	if (life == PGS_MERGE_LOSE && g->cl == 1 && (lcl & 1) == 0 && !db_hold_rejected(a->db) &&
		g->cl_site < a->r.nsites && memcmp(a->r.sites + 16 * g->cl_site, a->origin, 16) == 0)
	{
		/*
		 * A first life of the key, born at the sender, that a delete here
		 * ended or that came after a delete the sender never learned of (it
		 * joined afterwards, or the row is hidden from it): by causal length
		 * the delete wins, so the sender is told instead of being left with a
		 * row nobody else has.
		 */
		pgs_err why;

		pgs_failf(&why, PGS_ERR_ROW,
				  "Give new rows keys that are unique across devices (sync_uuid()), or discard "
				  "this row (sync_network_discard).",
				  "row of table \"%s\" was deleted: the change belongs to the life of the row "
				  "that the delete ended, or the key had been used and deleted before the "
				  "sender knew it",
				  ti->name);
		pgs_err_code(&why, PGS_CODE_DELETED);
		return reject_row(a, at, g, &why, st, err);
	}
	if (life == PGS_MERGE_LOSE || (life == PGS_MERGE_SAME && (g->cl & 1) == 0))
	{
		st->lost += g->nchanges;
		return PGS_OK;
	}
	if (life == PGS_MERGE_WIN && (g->cl & 1) && !g->whole && !found)
	{
		/*
		 * Changes of a life of a key unknown here, older than a tombstone this
		 * replica collected in the table (a live life cl ends with tombstone
		 * cl + 1 <= floor): the row was deleted meanwhile (docs/DESIGN.md,
		 * "Tombstone GC"). The sender forgets it instead of sending it whole.
		 */
		int64_t floor = 0;

		if ((r = db_table_floor(a->db, at->t, &floor, err)) != PGS_OK)
			return r;
		if (g->cl < floor)
		{
			pgs_err why;

			pgs_failf(&why, PGS_ERR_ROW,
					  "The sender forgets the row: it was deleted while the sender was away "
					  "(pgsync does it by itself).",
					  "row of table \"%s\" is unknown here and its life (causal length %lld) "
					  "is older than what this replica collected: it was deleted",
					  ti->name, (long long) g->cl);
			pgs_err_code(&why, PGS_CODE_GONE);
			return reject_row(a, at, g, &why, st, err);
		}
	}
	if (life == PGS_MERGE_WIN && (g->cl & 1) && !g->whole)
	{
		/* a new life without the whole row: cannot be stored faithfully */
		pgs_err why;

		pgs_failf(&why, PGS_ERR_ROW,
				  "The sender sends the whole row again (pgsync does it by itself).",
				  "incomplete row: this replica does not have the row of table \"%s\" and the "
				  "change carries only some of its columns",
				  ti->name);
		pgs_err_code(&why, PGS_CODE_INCOMPLETE);
		return reject_row(a, at, g, &why, st, err);
	}
	if (!found && (g->cl & 1))
	{
		/*
		 * A first life of a key this replica has no clock for: its tombstone
		 * may have been collected here, and replicas that still hold it would
		 * ignore a life at or below it. The sender renumbers above the floor
		 * (docs/DESIGN.md, "Floors").
		 */
		int64_t floor = 0;

		if ((r = db_table_floor(a->db, at->t, &floor, err)) != PGS_OK)
			return r;
		if (g->cl <= floor)
		{
			pgs_err why;

			pgs_failf(&why, PGS_ERR_ROW,
					  "The sender starts the row's life again above the floor (pgsync does it "
					  "by itself).",
					  "causal length floor %lld: a first life at %lld of a key of table \"%s\" "
					  "whose deletes this replica may have collected",
					  (long long) floor, (long long) g->cl, ti->name);
			pgs_err_code(&why, PGS_CODE_FLOOR);
			return reject_row(a, at, g, &why, st, err);
		}
	}
	if (at->unknown_cols)
	{
		/* columns this replica does not have: held, the rest applies */
		sel = pgs_malloc(sizeof(bool) * (a->r.tables[tix].ncols + 1));
		if (!sel)
			return oom(err);
		memset(sel, 0, sizeof(bool) * (a->r.tables[tix].ncols + 1));
		for (uint32_t i = 0; i < g->nchanges; i++)
			if (at->colmap[g->changes[i].col] == COL_HELD)
				sel[g->changes[i].col] = held_part = true;
	}
	if ((r = site_allowed(a, g->cl_site, &ok, err)) != PGS_OK)
		goto out;
	if (!ok && life == PGS_MERGE_WIN)
	{
		r = reject_row(a, at, g, &a->site_why[g->cl_site], st, err);
		goto out;
	}
	if (life == PGS_MERGE_SAME)
	{
		/* same life: per-column last-writer-wins, decided from the clock alone */
		if ((r = pgs_rowclock_decode(blob, blob_len, &rc, err)) != PGS_OK)
			goto out;
		for (uint32_t i = 0; i < g->nchanges; i++)
		{
			const pgs_change *c = &g->changes[i];
			int				  lc = at->colmap[c->col];
			pgs_stamp		 *s;
			pgs_cellstamp	  in = {c->hlc, in_sites + 16 * c->site};
			pgs_merge		  m;

			if (lc < 0)
				continue; /* held */
			s = &a->stamps[lc];
			if (s->hlc == 0)
				m = PGS_MERGE_WIN;
			else if (c->hlc != s->hlc)
				m = c->hlc > s->hlc ? PGS_MERGE_WIN : PGS_MERGE_LOSE;
			else
			{
				pgs_cellstamp loc = {s->hlc, NULL};

				if ((r = db_site_lookup(a->db, s->site, &loc.site, err)) != PGS_OK)
					goto out;
				m = pgs_merge_cell(lcl, &loc, g->cl, &in);
			}
			if (m != PGS_MERGE_WIN)
				continue;
			if ((r = site_allowed(a, c->site, &ok, err)) != PGS_OK)
				goto out;
			if (!ok)
			{
				r = reject_row(a, at, g, &a->site_why[c->site], st, err);
				goto out;
			}
			a->wcols[n] = lc;
			a->wvals[n] = c->value;
			a->stamps[lc].hlc = c->hlc;
			a->stamps[lc].site = a->sitemap[c->site];
			n++;
		}
		st->lost += g->nchanges - n;
		if (n == 0)
			goto held;
		if ((r = need_version(a, err)) != PGS_OK)
			goto out;
		for (int k = 0; k < n; k++)
			a->stamps[a->wcols[k]].ver = a->ver;
		r = db_row_write(a->db, at->t, g->pk, DB_WRITE_MERGE, n, a->wcols, a->wvals, err);
	}
	else
	{
		/* a new life of the row: a delete, or a (re-)insert with its columns */
		if (ti->algo == DB_ALGO_GSET && (g->cl & 1) == 0)
		{
			pgs_err why;

			pgs_failf(&why, PGS_ERR_ROW,
					  "Make the table a cls table on every replica, or stop deleting from it.",
					  "grow-only table \"%s\" cannot receive a delete", ti->name);
			pgs_err_code(&why, "0A000");
			r = reject_row(a, at, g, &why, st, err);
			goto out;
		}
		for (uint32_t i = 0; i < g->nchanges; i++)
		{
			if (at->colmap[g->changes[i].col] < 0)
				continue;
			if ((r = site_allowed(a, g->changes[i].site, &ok, err)) != PGS_OK)
				goto out;
			if (!ok)
			{
				r = reject_row(a, at, g, &a->site_why[g->changes[i].site], st, err);
				goto out;
			}
		}
		if ((r = need_version(a, err)) != PGS_OK)
			goto out;
		for (int i = 0; i < ti->ncols; i++)
			a->stamps[i].hlc = 0, a->stamps[i].ver = 0, a->stamps[i].site = 0;
		rc.cl_ver = a->ver;
		rc.cl_site = a->sitemap[g->cl_site];
		for (uint32_t i = 0; i < g->nchanges; i++)
		{
			const pgs_change *c = &g->changes[i];
			int				  lc = at->colmap[c->col];

			if (lc < 0)
				continue;
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
	}
	if (r == PGS_ERR_PERMISSION || r == PGS_ERR_ROW)
	{
		r = row_failed(a, at, g, ordinal, r, err, st);
		goto out;
	}
	if (r != PGS_OK)
		goto out;
	if (n > 0 && (g->cl & 1) && (r = restamp(a, n, st, err)) != PGS_OK)
		goto out;
	if (life == PGS_MERGE_WIN)
	{
		st->won++; /* the row-life change itself */
		if (g->cl & 1)
			st->rows_inserted++;
		else
			st->rows_deleted++;
	}
	else
		st->rows_updated++;
	st->won += n;
	rc.cl = g->cl;
	a->blob.len = 0;
	pgs_rowclock_encode(&rc, &a->blob);
	if (a->blob.oom)
	{
		r = oom(err);
		goto out;
	}
	if ((r = db_clock_put(a->db, at->t, g->pk, found, g->cl, pgs_rowclock_max_ver(&rc), a->blob.p,
						  a->blob.len, err)) != PGS_OK)
		goto out;
held:
	r = PGS_OK;
	if (held_part)
		r = hold(a, tix, g, sel, PGS_CODE_HELD, at->why_held, st, err);
out:
	pgs_free(sel);
	return r;
}

/* removal: an ABSENT group, or a candidate that matched a local key. */
static pgs_rc
remove_row(apply_ctx *a, apply_table *at, const pgs_value *pk, int64_t in_cl, uint32_t cl_site,
		   int64_t local_cl, pgs_apply_stats *st, pgs_err *err)
{
	bool   forgot;
	pgs_rc r;

	if (in_cl && (in_cl & 1) == 0)
	{
		/* a delete: merged like a delete group (only if it is a newer life) */
		pgs_group g = {.table = 0,
					   .kind = PGS_GROUP_CHANGES,
					   .cl = in_cl,
					   .cl_site = cl_site,
					   .nchanges = 0,
					   .pk = (pgs_value *) pk};

		if (pgs_merge_life(local_cl, in_cl) != PGS_MERGE_WIN)
			return PGS_OK;
		return apply_group(a, (uint32_t) (at - a->tables), &g, UINT64_MAX, st, err);
	}
	if ((r = db_row_forget(a->db, at->t, pk, &forgot, err)) != PGS_OK)
		return r;
	if (forgot)
		st->rows_forgotten++;
	return PGS_OK;
}

static int
cmp_cand(const void *x, const void *y)
{
	const cand *a = x, *b = y;

	return a->hash < b->hash ? -1 : a->hash > b->hash;
}

/* lock_keys announces n encoded keys of table at (db_apply_lock). */
static pgs_rc
lock_keys(apply_ctx *a, apply_table *at, const uint8_t *p, const uint8_t *end, uint32_t n,
		  pgs_err *err)
{
	db_lock_key *lk = pgs_malloc(sizeof(db_lock_key) * n);
	pgs_value	*pk = pgs_malloc(sizeof(pgs_value) * at->ti->npk);
	pgs_rc		 r = PGS_OK;

	if (!lk || !pk)
		r = oom(err);
	for (uint32_t i = 0; r == PGS_OK && i < n; i++)
	{
		for (int k = 0; r == PGS_OK && k < at->ti->npk; k++)
		{
			uint8_t type = *p++;

			r = pgs_value_get(&p, end, type, &pk[k], err);
		}
		lk[i] = (db_lock_key){at->t, pgs_key_hash(PGS_LOCK_SALT, (uint32_t) at->ti->npk, pk)};
	}
	if (r == PGS_OK)
		r = db_apply_lock(a->db, lk, n, err);
	pgs_free(lk);
	pgs_free(pk);
	return r;
}

/* match_candidates: every local key of table tix whose salted hash is a
 * removal candidate of this payload. One pass over the local keys. */
static pgs_rc
match_candidates(apply_ctx *a, uint32_t tix, pgs_apply_stats *st, pgs_err *err)
{
	apply_table *at = &a->tables[tix];
	uint64_t	 salt = a->r.tables[tix].salt;
	db_cursor	*cur;
	pgs_rc		 r;
	pgs_value	*keys = NULL;
	int64_t		*cls = NULL;
	cand	   **hits = NULL;
	uint32_t	 nhits = 0, cap = 0;
	pgs_buf		 keybytes;

	if (!at->ncands || !at->t)
		return PGS_OK;
	qsort(at->cands, at->ncands, sizeof(cand), cmp_cand);
	if ((r = db_keys_open(a->db, at->t, &cur, err)) != PGS_OK)
		return r;
	/* collect the matches first: removing rows while the cursor is open is
	 * not allowed on every engine; keys are copied (they live in the cursor) */
	pgs_buf_init(&keybytes);
	for (;;)
	{
		bool			 done;
		const pgs_value *pk;
		int64_t			 cl;
		cand			 probe, *hit;

		if ((r = db_keys_next(cur, &done, &pk, &cl, err)) != PGS_OK || done)
			break;
		probe = (cand){.hash = pgs_key_hash(salt, (uint32_t) at->ti->npk, pk)};
		hit = bsearch(&probe, at->cands, at->ncands, sizeof(cand), cmp_cand);
		if (!hit)
			continue;
		if (nhits == cap)
		{
			uint32_t ncap = cap ? cap * 2 : 16;
			cand   **nh = pgs_realloc(hits, sizeof(cand *) * ncap);
			int64_t *nc = pgs_realloc(cls, sizeof(int64_t) * ncap);

			if (nh)
				hits = nh;
			if (nc)
				cls = nc;
			if (!nh || !nc)
			{
				r = oom(err);
				break;
			}
			cap = ncap;
		}
		hits[nhits] = hit;
		cls[nhits] = cl;
		nhits++;
		pgs_key_encode(&keybytes, (uint32_t) at->ti->npk, pk);
	}
	db_changes_close(cur);
	if (r == PGS_OK && keybytes.oom)
		r = oom(err);
	if (r == PGS_OK && nhits)
	{
		const uint8_t *p = keybytes.p, *end = p + keybytes.len;

		keys = pgs_malloc(sizeof(pgs_value) * at->ti->npk);
		if (!keys)
			r = oom(err);
		/* these rows were not in the payload: announce them before writing */
		if (r == PGS_OK)
			r = lock_keys(a, at, p, end, nhits, err);
		for (uint32_t i = 0; r == PGS_OK && i < nhits; i++)
		{
			for (int k = 0; r == PGS_OK && k < at->ti->npk; k++)
			{
				uint8_t type = *p++;

				r = pgs_value_get(&p, end, type, &keys[k], err);
			}
			if (r == PGS_OK)
				r = remove_row(a, at, keys, hits[i]->cl, hits[i]->cl_site, cls[i], st, err);
		}
	}
	pgs_buf_free(&keybytes);
	pgs_free(keys);
	pgs_free(hits);
	pgs_free(cls);
	return r;
}

static pgs_rc
add_candidate(apply_table *at, const pgs_group *g, pgs_err *err)
{
	if (at->ncands == at->cands_cap)
	{
		uint32_t cap = at->cands_cap ? at->cands_cap * 2 : 64;
		cand	*n = pgs_realloc(at->cands, sizeof(cand) * cap);

		if (!n)
			return oom(err);
		at->cands = n;
		at->cands_cap = cap;
	}
	at->cands[at->ncands++] = (cand){g->hash, g->cl, g->cl_site};
	return PGS_OK;
}

static bool
only_has(const apply_ctx *a, uint64_t ordinal)
{
	uint32_t lo = 0, hi = a->nonly;

	while (lo < hi)
	{
		uint32_t mid = (lo + hi) / 2;

		if (a->only[mid] == ordinal)
			return true;
		if (a->only[mid] < ordinal)
			lo = mid + 1;
		else
			hi = mid;
	}
	return false;
}

/* is_removal: groups of the second phase (children before parents). */
static bool
is_removal(const pgs_group *g)
{
	return g->kind == PGS_GROUP_CANDIDATE || g->kind == PGS_GROUP_ABSENT || (g->cl & 1) == 0;
}

/*
 * pass applies the groups of table `only_table` (-1: all) that are, or are
 * not, removals (phase 0: writes, 1: removals, -1: both).
 */
static pgs_rc
pass(apply_ctx *a, int only_table, int phase, pgs_apply_stats *st, pgs_err *err)
{
	pgs_rc	 rc;
	uint64_t ordinal = 0;

	pgs_reader_close(&a->r);
	if ((rc = pgs_reader_open(&a->r, a->version, a->body, a->body_len, err)) != PGS_OK)
		return rc;
	for (;; ordinal++)
	{
		pgs_group	 g;
		bool		 done;
		apply_table *at;

		if ((rc = pgs_reader_next(&a->r, &g, &done, err)) != PGS_OK || done)
			return rc;
		if (only_table >= 0 && (int) g.table != only_table)
			continue;
		if (phase >= 0 && is_removal(&g) != (phase == 1))
			continue;
		if (a->only && !only_has(a, ordinal))
			continue;
		at = &a->tables[g.table];
		if (!at->t)
		{
			/* a table this replica does not sync (yet): held */
			if (g.kind == PGS_GROUP_CHANGES || g.kind == PGS_GROUP_WHOLE)
				rc = hold(a, g.table, &g, NULL, PGS_CODE_HELD,
						  "the sender syncs a table this replica does not (create it and call "
						  "sync_init)",
						  st, err);
		}
		else if (g.kind == PGS_GROUP_CANDIDATE)
			rc = a->only ? PGS_OK : add_candidate(at, &g, err);
		else if (g.kind == PGS_GROUP_ABSENT)
			rc = remove_row(a, at, g.pk, 0, 0, 0, st, err);
		else
		{
			if (a->r.tables[g.table].snap && !a->only &&
				(rc = db_snapshot(a->db, at->t, DB_SNAP_SEEN, g.pk, NULL, err)) != PGS_OK)
				return rc;
			rc = apply_group(a, g.table, &g, ordinal, st, err);
		}
		if (rc != PGS_OK)
			return rc;
	}
}

static int
cmp_u64(const void *x, const void *y)
{
	uint64_t a = *(const uint64_t *) x, b = *(const uint64_t *) y;

	return a < b ? -1 : a > b;
}

/* run_only applies again just the deferred groups of list. */
static pgs_rc
run_only(apply_ctx *a, const deferred *list, uint32_t n, pgs_apply_stats *st, pgs_err *err)
{
	pgs_rc rc;

	a->only = pgs_malloc(sizeof(uint64_t) * (n ? n : 1));
	if (!a->only)
		return oom(err);
	for (uint32_t i = 0; i < n; i++)
		a->only[i] = list[i].ordinal;
	qsort(a->only, n, sizeof(uint64_t), cmp_u64);
	a->nonly = n;
	rc = pass(a, -1, -1, st, err);
	pgs_free(a->only);
	a->only = NULL;
	a->nonly = 0;
	return rc;
}

/* retry_deferred: rows that failed on a foreign key, again, while some
 * succeed; what still fails after a round without progress is rejected. */
static pgs_rc
retry_deferred(apply_ctx *a, pgs_apply_stats *st, pgs_err *err)
{
	while (a->ndefer)
	{
		deferred *d = a->defer;
		uint32_t  before = a->ndefer;
		bool	  last = a->final_round;
		pgs_rc	  rc;

		a->defer = NULL;
		a->ndefer = a->defer_cap = 0;
		rc = run_only(a, d, before, st, err);
		pgs_free(d);
		if (rc != PGS_OK || last)
			return rc;
		if (a->ndefer >= before)
			a->final_round = true; /* no progress: the next round rejects */
	}
	return PGS_OK;
}

/* note_row remembers a row group of the validation pass for db_apply_lock. */
static pgs_rc
note_row(apply_ctx *a, const pgs_group *g, pgs_err *err)
{
	if (g->kind != PGS_GROUP_CHANGES && g->kind != PGS_GROUP_WHOLE && g->kind != PGS_GROUP_ABSENT)
		return PGS_OK; /* candidates: their local keys are locked when matched */
	if (a->nnotes == a->notes_cap)
	{
		uint32_t  cap = a->notes_cap ? a->notes_cap * 2 : 64;
		row_note *n = pgs_realloc(a->notes, sizeof(row_note) * cap);

		if (!n)
			return oom(err);
		a->notes = n;
		a->notes_cap = cap;
	}
	a->notes[a->nnotes].table = g->table;
	a->notes[a->nnotes].hash = pgs_key_hash(PGS_LOCK_SALT, a->r.tables[g->table].npk, g->pk);
	a->nnotes++;
	return PGS_OK;
}

/* lock_rows announces the noted rows of tables synced here (db_apply_lock). */
static pgs_rc
lock_rows(apply_ctx *a, pgs_err *err)
{
	db_lock_key *keys = pgs_malloc(sizeof(db_lock_key) * (a->nnotes ? a->nnotes : 1));
	uint32_t	 n = 0;
	pgs_rc		 rc;

	if (!keys)
		return oom(err);
	for (uint32_t i = 0; i < a->nnotes; i++)
		if (a->tables[a->notes[i].table].t)
			keys[n++] = (db_lock_key){a->tables[a->notes[i].table].t, a->notes[i].hash};
	rc = db_apply_lock(a->db, keys, n, err);
	pgs_free(keys);
	return rc;
}

pgs_rc
pgs_apply(db_conn *db, const uint8_t *payload, size_t len, bool careful, pgs_apply_stats *st,
		  pgs_err *err)
{
	apply_ctx		a;
	pgs_header		h;
	const uint8_t  *body;
	uint8_t		   *owned = NULL;
	pgs_rc			rc;
	pgs_apply_stats dummy = {0};
	bool			deps = false;

	memset(&a, 0, sizeof a);
	st = st ? st : &dummy;
	memset(st, 0, sizeof *st);
	a.db = db;
	a.careful = careful;
	pgs_buf_init(&a.blob);
	if ((rc = pgs_payload_body(payload, len, &h, &body, &owned, err)) != PGS_OK)
		return rc;
	a.body = body;
	a.body_len = h.body_len;
	a.version = h.version;
	memcpy(a.origin, h.origin, sizeof a.origin);

	/* validation pass: the whole body must parse before anything is written */
	if ((rc = pgs_reader_open(&a.r, h.version, body, h.body_len, err)) == PGS_OK)
	{
		pgs_group g;
		bool	  done = false;

		st->rows = 0;
		while (rc == PGS_OK && !done)
			if ((rc = pgs_reader_next(&a.r, &g, &done, err)) == PGS_OK && !done)
			{
				st->rows++;
				rc = note_row(&a, &g, err);
			}
	}
	if (rc != PGS_OK)
		goto out;
	if ((rc = resolve(&a, &deps, err)) != PGS_OK)
		goto out;
	if ((rc = lock_rows(&a, err)) != PGS_OK)
		goto out;
	db_apply_careful(db, careful);
	for (uint32_t i = 0; i < a.r.ntables; i++)
		if (a.tables[i].t && (a.r.tables[i].snap & PGS_SNAP_BEGIN) &&
			(rc = db_snapshot(db, a.tables[i].t, DB_SNAP_BEGIN, NULL, NULL, err)) != PGS_OK)
			goto out;
	if (!deps)
		rc = pass(&a, -1, -1, st, err);
	else
	{
		/* parents' writes first, then children's; removals children first */
		for (uint32_t k = 0; rc == PGS_OK && k < a.r.ntables; k++)
			rc = pass(&a, a.by_order[k], 0, st, err);
		for (uint32_t k = a.r.ntables; rc == PGS_OK && k-- > 0;)
			rc = pass(&a, a.by_order[k], 1, st, err);
	}
	if (rc == PGS_OK)
		rc = retry_deferred(&a, st, err);
	for (uint32_t i = 0; rc == PGS_OK && i < a.r.ntables; i++)
		rc = match_candidates(&a, i, st, err);
	if (rc == PGS_OK)
		rc = db_apply_end(db, err);
	for (uint32_t i = 0; rc == PGS_OK && i < a.r.ntables; i++)
		if (a.tables[i].t && (a.r.tables[i].snap & PGS_SNAP_END))
			rc = db_snapshot(db, a.tables[i].t, DB_SNAP_END, NULL, &st->rows_forgotten, err);
	if (rc == PGS_OK && a.max_hlc)
		rc = db_hlc_observe(db, pgs_hlc_receive(0, a.max_hlc, pgs_now_ms()), err);
out:
	if (a.tables)
		for (uint32_t i = 0; i < a.r.ntables; i++)
		{
			pgs_free(a.tables[i].colmap);
			pgs_free(a.tables[i].cands);
		}
	pgs_free(a.tables);
	pgs_free(a.by_order);
	pgs_free(a.sitemap);
	pgs_free(a.site_ok);
	pgs_free(a.site_why);
	pgs_free(a.stamps);
	pgs_free(a.wcols);
	pgs_free(a.wvals);
	pgs_free(a.differs);
	pgs_free(a.defer);
	pgs_free(a.only);
	pgs_free(a.notes);
	pgs_buf_free(&a.blob);
	pgs_reader_close(&a.r);
	pgs_free(owned);
	return rc;
}
