/*
 * build.c — pgs_build: the payload of every change with a local version in
 * (since, until], as the caller may see it.
 *
 * The engine enumerates clock rows with a version above since together with
 * the row's current values (db_changes_*) and says, per table, how the
 * caller may read it (db_table_view): FULL (changes go out as they are:
 * the columns stamped after since), RLS (visible changed rows go out whole,
 * changed rows the caller cannot see and tombstones as removal candidates:
 * a salted hash of the key, never the key) or NONE (nothing). View builds
 * (a server answering one device's pull) also send snapshots: every visible
 * row of a table whose visibility may have changed, framed by the table's
 * SNAP_BEGIN/SNAP_END attributes, so the receiver forgets what it no longer
 * may see (docs/DESIGN.md, "Visibility").
 *
 * The core decides which columns go out and hands groups to the writer
 * (writer.c), the only code that writes the format.
 */
#include "pgsync.h"
#include "../database.h"

#include <stdlib.h>
#include <string.h>
#define XXH_STATIC_LINKING_ONLY /* XXH3_state_t on the stack */
#include <xxhash.h>

typedef struct build_ctx
{
	db_conn				 *db;
	const pgs_build_opts *o;
	pgs_writer			  w;
	uint64_t			  nrows;
	/* local site index -> payload site index + 1 (0 = not yet used) */
	uint32_t *site_map;
	uint32_t  site_map_cap;
	/* local site index -> 1 excluded, 2 not excluded, 0 unknown yet */
	uint8_t			*excl;
	uint32_t		 excl_cap;
	pgs_build_stats *st;
	bool			 full; /* max_rows reached: stop, more follows */
	pgs_wchange		*ch;
	int				 ch_cap;
	/* the last row group's key, for the continuation token */
	const db_table_info *last_table;
	pgs_buf				 last_key; /* pgs_key_encode of it */
} build_ctx;

static pgs_rc
oom(pgs_err *err)
{
	return pgs_fail(err, PGS_ERR_NOMEM, "out of memory building a payload", NULL, NULL);
}

/* excluded: whether local site idx is opts->exclude_site (no writes: the
 * excluded id is compared, never interned). */
static pgs_rc
excluded(build_ctx *b, uint32_t idx, bool *out, pgs_err *err)
{
	const uint8_t *site;
	pgs_rc		   rc;

	*out = false;
	if (!b->o->exclude_site)
		return PGS_OK;
	if (idx >= b->excl_cap)
	{
		uint32_t cap = b->excl_cap ? b->excl_cap : 16;
		uint8_t *n;

		while (cap <= idx)
			cap *= 2;
		if (!(n = pgs_realloc(b->excl, cap)))
			return oom(err);
		memset(n + b->excl_cap, 0, cap - b->excl_cap);
		b->excl = n;
		b->excl_cap = cap;
	}
	if (!b->excl[idx])
	{
		if ((rc = db_site_lookup(b->db, idx, &site, err)) != PGS_OK)
			return rc;
		b->excl[idx] = memcmp(site, b->o->exclude_site, PGS_SITE_LEN) == 0 ? 1 : 2;
	}
	*out = b->excl[idx] == 1;
	return PGS_OK;
}

/* map_site: the payload index of local site `local`, added on first use. */
static pgs_rc
map_site(build_ctx *b, uint32_t local, uint32_t *out, pgs_err *err)
{
	if (local >= b->site_map_cap)
	{
		uint32_t  cap = b->site_map_cap ? b->site_map_cap : 16;
		uint32_t *m;

		while (cap <= local)
			cap *= 2;
		if (!(m = pgs_realloc(b->site_map, sizeof(uint32_t) * cap)))
			return oom(err);
		memset(m + b->site_map_cap, 0, sizeof(uint32_t) * (cap - b->site_map_cap));
		b->site_map = m;
		b->site_map_cap = cap;
	}
	if (!b->site_map[local])
	{
		const uint8_t *site;
		pgs_rc		   rc;

		if ((rc = db_site_lookup(b->db, local, &site, err)) != PGS_OK)
			return rc;
		b->site_map[local] = pgs_writer_site_add(&b->w, site) + 1;
	}
	*out = b->site_map[local] - 1;
	return PGS_OK;
}

/*
 * in_range: a stamp goes out when it is newer than since. There is no upper
 * bound: until is only the cursor the payload reports. Every change the
 * engine shows us is committed, and on Postgres until may sit below newer
 * committed versions (a slower writer is still running); holding those back
 * would send a row's later columns without its earlier ones. Sending them now
 * is harmless: the next payload repeats them and the merge is idempotent.
 */
static bool
in_range(const build_ctx *b, int64_t ver)
{
	return ver > b->o->since;
}

/*
 * unseen: a row the receiver may not see and cannot hold either, which a
 * view build leaves out instead of sending it as a removal candidate. Its
 * only life (cl 1) began after since, so no payload the receiver applied
 * had it, and the receiver did not make it (the life's site is not
 * exclude_site). Sent, its hash would tell the receiver that an invisible
 * row was just made, and by which device (docs/DESIGN.md, "Removal
 * candidates"). Without a named receiver (a group build) the row is left
 * out and its site reported in o->unseen_sites, so that the device that
 * made it is not served by this build; with neither, it goes out.
 */
static pgs_rc
unseen(build_ctx *b, int64_t cl, const pgs_rowclock *rcl, bool *out, pgs_err *err)
{
	const uint8_t *site;
	pgs_buf		  *rep = b->o->unseen_sites;
	bool		   mine;
	pgs_rc		   rc;

	*out = false;
	if (!b->o->view || cl != 1 || !in_range(b, rcl->cl_ver))
		return PGS_OK;
	if (b->o->exclude_site)
	{
		if ((rc = excluded(b, rcl->cl_site, &mine, err)) != PGS_OK)
			return rc;
		*out = !mine;
		return PGS_OK;
	}
	if (!rep)
		return PGS_OK;
	if ((rc = db_site_lookup(b->db, rcl->cl_site, &site, err)) != PGS_OK)
		return rc;
	*out = true;
	if (pgs_site_listed(rep->p, rep->len / PGS_SITE_LEN, site))
		return PGS_OK;
	pgs_buf_put(rep, site, PGS_SITE_LEN);
	if (rep->oom)
		return oom(err);
	return PGS_OK;
}

static uint64_t
encoded_value_bytes(const pgs_value *v)
{
	uint8_t tmp[PGS_VARINT_MAX];

	switch (v->type)
	{
		case PGS_INT:
			return (uint64_t) pgs_varint_put(tmp, pgs_zigzag(v->v.i));
		case PGS_REAL:
			return 8;
		case PGS_TEXT:
		case PGS_BLOB:
			return v->len;
		default:
			return 0;
	}
}

static int
cmp_names(const void *a, const void *b)
{
	return strcmp(*(const char *const *) a, *(const char *const *) b);
}

uint64_t
pgs_table_fingerprint(const db_table_info *ti)
{
	XXH3_state_t st;
	const char **sorted = pgs_malloc(sizeof(char *) * (ti->ncols ? ti->ncols : 1));
	uint8_t		 zero = 0;

	/* the key in key order, then the columns in name order (column order may
	 * differ between replicas; names are what payloads match) */
	XXH3_64bits_reset(&st);
	for (int i = 0; i < ti->npk; i++)
		XXH3_64bits_update(&st, ti->pk_names[i], strlen(ti->pk_names[i]) + 1);
	XXH3_64bits_update(&st, &zero, 1);
	if (sorted)
	{
		memcpy(sorted, ti->col_names, sizeof(char *) * ti->ncols);
		qsort(sorted, (size_t) ti->ncols, sizeof(char *), cmp_names);
		for (int i = 0; i < ti->ncols; i++)
			XXH3_64bits_update(&st, sorted[i], strlen(sorted[i]) + 1);
		pgs_free(sorted);
	}
	return XXH3_64bits_digest(&st);
}

/* add_table: the table's dictionary entry in this payload. */
static uint32_t
add_table(build_ctx *b, const db_table_info *ti)
{
	pgs_name *names = pgs_malloc(sizeof(pgs_name) * (size_t) (ti->npk + ti->ncols + 1));
	uint32_t  idx;

	if (!names)
	{
		b->w.oom = true;
		return 0;
	}
	for (int i = 0; i < ti->npk; i++)
		names[i] =
			(pgs_name){(const uint8_t *) ti->pk_names[i], (uint32_t) strlen(ti->pk_names[i])};
	for (int i = 0; i < ti->ncols; i++)
		names[ti->npk + i] =
			(pgs_name){(const uint8_t *) ti->col_names[i], (uint32_t) strlen(ti->col_names[i])};
	idx =
		pgs_writer_table(&b->w, (pgs_name){(const uint8_t *) ti->name, (uint32_t) strlen(ti->name)},
						 (uint32_t) ti->npk, names, (uint32_t) ti->ncols, names + ti->npk);
	pgs_free(names);
	pgs_writer_table_fingerprint(&b->w, idx, pgs_table_fingerprint(ti));
	for (int h = 0; h < ti->nhist; h++)
		if (ti->hist_cols[h] >= 0 && ti->hist_cols[h] < ti->ncols)
			pgs_writer_table_alias(&b->w, idx, (uint32_t) ti->hist_cols[h],
								   (pgs_name){(const uint8_t *) ti->hist_names[h],
											  (uint32_t) strlen(ti->hist_names[h])});
	return idx;
}

/*
 * build_table appends the row groups of one table. first: the chunk starts
 * this table at its first key (a snapshot then begins here).
 */
static pgs_rc
build_table(build_ctx *b, db_table *t, const pgs_value *after_pk, bool first, pgs_err *err)
{
	const db_table_info *ti = db_table_describe(t);
	db_cursor			*cur = NULL;
	pgs_stamp			*stamps;
	db_access			 access;
	bool				 snapshot = false, have_idx = false, done = false;
	uint32_t			 tidx = 0;
	uint64_t			 salt = 0;
	pgs_rc				 rc;

	if ((rc = db_table_view(b->db, t, b->o->view, b->o->since, b->o->until, &access, &snapshot,
							err)) != PGS_OK)
		return rc;
	snapshot = b->o->view && (snapshot || b->o->snapshot_all || b->o->since == 0);
	if (access == DB_ACCESS_NONE)
	{
		/* nothing visible; a snapshot says so, so that the receiver forgets */
		if (snapshot)
		{
			tidx = add_table(b, ti);
			pgs_writer_table_snap(&b->w, tidx,
								  PGS_SNAP_PART | (first ? PGS_SNAP_BEGIN : 0) | PGS_SNAP_END);
		}
		return PGS_OK;
	}
	stamps = pgs_malloc(sizeof(pgs_stamp) * (ti->ncols + 1));
	if (!stamps || (ti->ncols + 1 > b->ch_cap &&
					!(b->ch = pgs_realloc(b->ch, sizeof(pgs_wchange) * (ti->ncols + 1)))))
	{
		pgs_free(stamps);
		return oom(err);
	}
	if (ti->ncols + 1 > b->ch_cap)
		b->ch_cap = ti->ncols + 1;
	if (snapshot)
	{
		tidx = add_table(b, ti);
		have_idx = true;
		/* every chunk of a snapshot says so: its rows are part of it */
		pgs_writer_table_snap(&b->w, tidx, PGS_SNAP_PART | (first ? PGS_SNAP_BEGIN : 0));
	}
	if ((rc = db_changes_open(b->db, t, b->o->since, b->o->until, b->o->max_rows > 0, after_pk,
							  access, snapshot, &cur, err)) != PGS_OK)
		goto out;
	while (!b->full)
	{
		bool			 alive, life, skip, whole;
		const pgs_value *pk, *vals;
		int64_t			 cl;
		const uint8_t	*blob;
		size_t			 blob_len;
		pgs_rowclock	 rcl = {.ncols = ti->ncols, .cols = stamps};
		uint32_t		 n = 0, written = 0, s;
		db_vis			 vis;

		if ((rc = db_changes_next(cur, &done, &pk, &cl, &blob, &blob_len, &alive, &vals, &vis,
								  err)) != PGS_OK)
			goto out;
		if (done)
			break;
		if ((rc = pgs_rowclock_decode(blob, blob_len, &rcl, err)) != PGS_OK)
			goto out;
		if (vis == DB_VIS_HIDDEN)
		{
			bool gone; /* never the receiver's: nothing to say */

			if ((rc = unseen(b, cl, &rcl, &gone, err)) != PGS_OK)
				goto out;
			if (gone)
				continue;
			if (!have_idx)
			{
				tidx = add_table(b, ti);
				have_idx = true;
			}
			/* changed, not visible: the receiver forgets it if it holds it */
			if (!salt)
			{
				salt = pgs_random64() | 1;
				pgs_writer_table_salt(&b->w, tidx, salt);
			}
			if ((rc = map_site(b, rcl.cl_site, &s, err)) != PGS_OK)
				goto out;
			pgs_writer_candidate(&b->w, tidx, pgs_key_hash(salt, (uint32_t) ti->npk, pk), cl, s);
			b->st->candidates++;
		}
		else
		{
			bool news; /* something in range that the receiver did not write */

			whole = vis == DB_VIS_WHOLE;
			if ((rc = excluded(b, rcl.cl_site, &skip, err)) != PGS_OK)
				goto out;
			life = in_range(b, rcl.cl_ver) && !skip;
			news = life;
			if ((cl & 1) && alive)
				for (int i = 0; i < ti->ncols; i++)
				{
					bool in;

					if (!stamps[i].hlc)
						continue;
					written++;
					in = in_range(b, stamps[i].ver);
					if (in || !whole)
					{
						if ((rc = excluded(b, stamps[i].site, &skip, err)) != PGS_OK)
							goto out;
						in = in && !skip;
						news |= in;
					}
					if (!whole && !in)
						continue;
					b->ch[n].col = (uint32_t) i;
					b->ch[n].hlc = stamps[i].hlc;
					b->ch[n].site = stamps[i].site; /* local index, mapped below */
					b->ch[n].value = vals[i];
					n++;
				}
			/* a whole row is sent when it has news for the receiver (its own
			 * echo is not), or always in a snapshot */
			if (!(snapshot || news))
				continue;
			if (!have_idx)
			{
				tidx = add_table(b, ti);
				have_idx = true;
			}
			for (uint32_t k = 0; k < n; k++)
			{
				if ((rc = map_site(b, b->ch[k].site, &b->ch[k].site, err)) != PGS_OK)
					goto out;
				b->st->value_bytes += encoded_value_bytes(&b->ch[k].value);
			}
			if ((rc = map_site(b, rcl.cl_site, &s, err)) != PGS_OK)
				goto out;
			for (int i = 0; i < ti->npk; i++)
				b->st->value_bytes += encoded_value_bytes(&pk[i]);
			/* whole: every written column is in the group (a fresh row, or a
			 * view of the row): a receiver that lacks the row can insert it */
			pgs_writer_row(&b->w, tidx,
						   (cl & 1) && (whole || (n == written && (!b->o->known_lives_partial ||
																   in_range(b, rcl.cl_ver)))),
						   pk, cl, s, n, b->ch);
			b->st->changes += n;
		}
		b->nrows++;
		b->st->rows++;
		b->last_table = ti;
		b->last_key.len = 0;
		pgs_key_encode(&b->last_key, (uint32_t) ti->npk, pk);
		if (b->o->max_rows && b->nrows >= b->o->max_rows)
			b->full = true;
		if (b->w.oom || b->last_key.oom)
		{
			rc = oom(err);
			goto out;
		}
	}
	if (done && snapshot)
		pgs_writer_table_snap(&b->w, tidx, PGS_SNAP_END);
	rc = PGS_OK;
out:
	if (cur)
		db_changes_close(cur);
	pgs_free(stamps);
	return rc;
}

/* next_token: the continuation token after the chunk's last row group. */
static pgs_rc
next_token(build_ctx *b, pgs_buf *tok, pgs_err *err)
{
	const db_table_info *ti = b->last_table;
	pgs_value			 pk[PGS_TOKEN_MAX_PK];
	const uint8_t		*p = b->last_key.p, *end = p + b->last_key.len;
	uint32_t			 flags =
		(b->o->view ? PGS_TOKEN_VIEW : 0) | (b->o->snapshot_all ? PGS_TOKEN_SNAPSHOT_ALL : 0);
	pgs_rc rc;

	if (ti->npk > PGS_TOKEN_MAX_PK)
		return pgs_failf(err, PGS_ERR_TOO_BIG, "Pull this table without max_rows.",
						 "table \"%s\" has too many key columns for a chunked pull", ti->name);
	for (int i = 0; i < ti->npk; i++)
	{
		uint8_t type = *p++;

		if ((rc = pgs_value_get(&p, end, type, &pk[i], err)) != PGS_OK)
			return rc;
	}
	pgs_token_encode(tok, b->o->since, b->o->until, flags, (const uint8_t *) ti->name,
					 (uint32_t) strlen(ti->name), (uint32_t) ti->npk, pk);
	if (tok->oom)
		return oom(err);
	if (tok->len > PGS_MAX_TOKEN)
	{
		tok->len = 0;
		return pgs_failf(err, PGS_ERR_TOO_BIG, "Pull this table without max_rows.",
						 "primary key too long for a continuation token (limit %d bytes)",
						 PGS_MAX_TOKEN);
	}
	return PGS_OK;
}

pgs_rc
pgs_build(db_conn *db, const pgs_build_opts *o, pgs_buf *out, pgs_buf *next, pgs_build_stats *st,
		  pgs_err *err)
{
	build_ctx		b;
	db_table	  **tables;
	int				ntables;
	pgs_rc			rc;
	pgs_build_stats dummy = {0};
	pgs_build_opts	oo = *o;
	pgs_token		tok;
	uint32_t		first = 0;

	memset(&b, 0, sizeof b);
	memset(st ? st : &dummy, 0, sizeof dummy);
	out->len = 0;
	if (next)
		next->len = 0;
	if (o->after)
	{
		if ((rc = pgs_token_decode(o->after, o->after_len, &tok, err)) != PGS_OK)
			return rc;
		if (tok.since != o->since)
			return pgs_failf(err, PGS_ERR_MISUSE, "Pass the same since to every chunk of one pull.",
							 "continuation token was made for since %lld, not %lld",
							 (long long) tok.since, (long long) o->since);
		oo.until = tok.until; /* pinned by the first chunk */
		oo.view = (tok.flags & PGS_TOKEN_VIEW) != 0;
		oo.snapshot_all = (tok.flags & PGS_TOKEN_SNAPSHOT_ALL) != 0;
		if (!oo.max_rows)
			oo.max_rows = UINT32_MAX;
	}
	o = &oo;
	b.db = db;
	b.o = o;
	b.st = st ? st : &dummy;
	pgs_writer_init(&b.w);
	pgs_buf_init(&b.last_key);
	if ((rc = db_tables(db, &tables, &ntables, err)) != PGS_OK)
		goto out;
	if (o->after)
	{
		db_table *tt = NULL;
		pgs_err	  ignored;
		int		  k = ntables;

		if (db_table_find(db, tok.table, tok.table_len, &tt, &ignored) == PGS_OK)
			for (k = 0; k < ntables && tables[k] != tt; k++)
				;
		if (k == ntables || db_table_describe(tables[k])->npk != (int) tok.npk)
		{
			rc = pgs_fail(err, PGS_ERR_CORRUPT, "invalid continuation token",
						  "The token names a table or key this database does not sync.",
						  "Pass the cursor of the previous chunk unchanged, or restart the pull "
						  "without one.");
			goto out;
		}
		first = (uint32_t) k;
	}
	for (int t = (int) first; t < ntables && !b.full; t++)
	{
		bool resume = o->after && t == (int) first;

		if ((rc = build_table(&b, tables[t], resume ? tok.pk : NULL, !resume, err)) != PGS_OK)
			goto out;
	}
	/* a chunk that ends exactly at the last row announces more; the next
	 * (empty) chunk then carries the final until */
	if (b.w.ngroups == 0 && b.w.ntables == 0 && !o->after)
		goto out; /* nothing to send: out stays empty */
	rc = pgs_writer_seal(&b.w, db_site_id(db), o->since, o->until, b.full ? PGS_FLAG_MORE : 0,
						 o->compress != 0, out, err);
	if (rc == PGS_OK)
		b.st->body_len = b.w.body_len;
	if (rc == PGS_OK && b.full && next)
		rc = next_token(&b, next, err);
out:
	pgs_writer_free(&b.w);
	pgs_buf_free(&b.last_key);
	pgs_free(b.site_map);
	pgs_free(b.excl);
	pgs_free(b.ch);
	return rc;
}

pgs_rc
pgs_build_rows(db_conn *db, const pgs_row_ref *rows, uint32_t n, pgs_buf *out, pgs_err *err)
{
	build_ctx			  b;
	pgs_build_stats		  st;
	pgs_build_opts		  o = {.since = 0, .until = 0, .compress = 1};
	pgs_stamp			 *stamps = NULL;
	int					  cap = 0;
	pgs_rc				  rc = PGS_OK;
	const db_table_info **seen = pgs_malloc(sizeof(void *) * (n ? n : 1));
	uint32_t			 *idx = pgs_malloc(sizeof(uint32_t) * (n ? n : 1));
	bool				 *hidden = pgs_malloc(sizeof(bool) * (n ? n : 1));
	uint32_t			  nseen = 0;

	memset(&b, 0, sizeof b);
	memset(&st, 0, sizeof st);
	b.db = db;
	b.o = &o;
	b.st = &st;
	pgs_writer_init(&b.w);
	pgs_buf_init(&b.last_key);
	if (!seen || !idx || !hidden)
	{
		rc = oom(err);
		goto out;
	}
	for (uint32_t r = 0; r < n && rc == PGS_OK; r++)
	{
		const db_table_info *ti = db_table_describe(rows[r].t);
		uint32_t			 tidx = 0, k, s, nch = 0;
		bool				 visible;
		int64_t				 cl;
		const uint8_t		*blob;
		size_t				 blen;
		const pgs_value		*vals;
		pgs_rowclock		 rcl;

		for (k = 0; k < nseen && seen[k] != ti; k++)
			;
		if (k == nseen)
		{
			db_access access;
			bool	  snap;

			/* a table the caller may not read at all: every key is absent */
			if ((rc = db_table_view(db, rows[r].t, false, 0, 0, &access, &snap, err)) != PGS_OK)
				break;
			seen[nseen] = ti;
			hidden[nseen] = access == DB_ACCESS_NONE;
			idx[nseen++] = add_table(&b, ti);
		}
		tidx = idx[k];
		if (hidden[k])
		{
			pgs_writer_absent(&b.w, tidx, rows[r].pk);
			continue;
		}
		if (ti->ncols + 1 > cap)
		{
			cap = ti->ncols + 1;
			pgs_free(stamps);
			stamps = pgs_malloc(sizeof(pgs_stamp) * cap);
			if (!stamps ||
				(cap > b.ch_cap && !(b.ch = pgs_realloc(b.ch, sizeof(pgs_wchange) * cap))))
			{
				rc = oom(err);
				break;
			}
			if (cap > b.ch_cap)
				b.ch_cap = cap;
		}
		if ((rc = db_row_read(db, rows[r].t, rows[r].pk, &visible, &cl, &blob, &blen, &vals,
							  err)) != PGS_OK)
			break;
		if (!visible)
		{
			pgs_writer_absent(&b.w, tidx, rows[r].pk);
			continue;
		}
		rcl = (pgs_rowclock){.ncols = ti->ncols, .cols = stamps};
		if ((rc = pgs_rowclock_decode(blob, blen, &rcl, err)) != PGS_OK)
			break;
		for (int i = 0; i < ti->ncols && rc == PGS_OK; i++)
		{
			if (!stamps[i].hlc)
				continue;
			if ((rc = map_site(&b, stamps[i].site, &s, err)) != PGS_OK)
				break;
			b.ch[nch++] = (pgs_wchange){(uint32_t) i, stamps[i].hlc, s, vals[i]};
		}
		if (rc == PGS_OK && (rc = map_site(&b, rcl.cl_site, &s, err)) == PGS_OK)
			pgs_writer_row(&b.w, tidx, true, rows[r].pk, cl, s, nch, b.ch);
	}
	if (rc == PGS_OK)
		rc = pgs_writer_seal(&b.w, db_site_id(db), 0, 0, 0, true, out, err);
out:
	pgs_writer_free(&b.w);
	pgs_buf_free(&b.last_key);
	pgs_free(b.site_map);
	pgs_free(b.excl);
	pgs_free(b.ch);
	pgs_free(stamps);
	pgs_free(seen);
	pgs_free(idx);
	pgs_free(hidden);
	return rc;
}
