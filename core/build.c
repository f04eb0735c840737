/*
 * build.c — pgs_build: the payload of every change with a local version in
 * (since, until].
 *
 * The engine enumerates clock rows with a version above since together with
 * the row's current values (db_changes_*); the core decides which columns go
 * out (stamp version in range, origin not excluded), encodes the row groups,
 * and only then writes the dictionaries of the sites and tables actually used
 * in front of them. Compression is tried once at the end and kept only when
 * it makes the payload smaller.
 */
#include "pgsync.h"
#include "../database.h"

#include <string.h>
#include <xxhash.h>
#include <zstd.h>

uint64_t pgs_payload_checksum(const uint8_t *header48, const uint8_t *body, size_t len);

typedef struct build_ctx
{
	db_conn				 *db;
	const pgs_build_opts *o;
	pgs_buf				  rows;
	uint64_t			  nrows;
	uint64_t			  prev_hlc;
	/* local site index -> payload site index + 1 (0 = not yet used) */
	uint32_t *site_map;
	uint32_t  site_map_cap;
	uint32_t *site_order; /* payload index -> local index */
	uint32_t  nsites;
	/* local site index -> 1 excluded, 2 not excluded, 0 unknown yet */
	uint8_t			*excl;
	uint32_t		 excl_cap;
	pgs_build_stats *st;
	bool			 full; /* max_rows reached: stop, more follows */
} build_ctx;

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
			return pgs_fail(err, PGS_ERR_NOMEM, "out of memory building a payload", NULL, NULL);
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

static pgs_rc
map_site(build_ctx *b, uint32_t local, uint32_t *out, pgs_err *err)
{
	if (local >= b->site_map_cap)
	{
		uint32_t  cap = b->site_map_cap ? b->site_map_cap : 16;
		uint32_t *m, *o;

		while (cap <= local)
			cap *= 2;
		m = pgs_realloc(b->site_map, sizeof(uint32_t) * cap);
		if (!m)
			return pgs_fail(err, PGS_ERR_NOMEM, "out of memory building a payload", NULL, NULL);
		memset(m + b->site_map_cap, 0, sizeof(uint32_t) * (cap - b->site_map_cap));
		b->site_map = m;
		o = pgs_realloc(b->site_order, sizeof(uint32_t) * cap);
		if (!o)
			return pgs_fail(err, PGS_ERR_NOMEM, "out of memory building a payload", NULL, NULL);
		b->site_order = o;
		b->site_map_cap = cap;
	}
	if (!b->site_map[local])
	{
		b->site_order[b->nsites++] = local;
		b->site_map[local] = b->nsites;
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

/* build_table appends the row groups of one table; *used tells if any. */
static pgs_rc
build_table(build_ctx *b, db_table *t, uint32_t tidx, const pgs_value *after_pk, bool *used,
			pgs_err *err)
{
	const db_table_info *ti = db_table_describe(t);
	db_cursor			*cur = NULL;
	pgs_stamp			*stamps;
	int					*pick;
	pgs_rc				 rc;

	*used = false;
	stamps = pgs_malloc(sizeof(pgs_stamp) * (ti->ncols + 1));
	pick = pgs_malloc(sizeof(int) * (ti->ncols + 1));
	if (!stamps || !pick)
	{
		pgs_free(stamps);
		pgs_free(pick);
		return pgs_fail(err, PGS_ERR_NOMEM, "out of memory building a payload", NULL, NULL);
	}
	if ((rc = db_changes_open(b->db, t, b->o->since, b->o->until, b->o->max_rows > 0, after_pk,
							  &cur, err)) != PGS_OK)
		goto out;
	while (!b->full)
	{
		bool			 done, alive;
		const pgs_value *pk, *vals;
		int64_t			 cl;
		const uint8_t	*blob;
		size_t			 blob_len;
		pgs_rowclock	 rcl = {.ncols = ti->ncols, .cols = stamps};
		int				 n = 0;
		bool			 life, skip;
		uint32_t		 s;
		int				 prev_col = -1;
		uint64_t		 ghlc;
		uint32_t		 gsite;

		if ((rc = db_changes_next(cur, &done, &pk, &cl, &blob, &blob_len, &alive, &vals, err)) !=
			PGS_OK)
			goto out;
		if (done)
			break;
		if ((rc = pgs_rowclock_decode(blob, blob_len, &rcl, err)) != PGS_OK)
			goto out;
		if ((rc = excluded(b, rcl.cl_site, &skip, err)) != PGS_OK)
			goto out;
		life = in_range(b, rcl.cl_ver) && !skip;
		if ((cl & 1) && alive)
			for (int i = 0; i < ti->ncols; i++)
			{
				if (!stamps[i].hlc || !in_range(b, stamps[i].ver))
					continue;
				if ((rc = excluded(b, stamps[i].site, &skip, err)) != PGS_OK)
					goto out;
				if (!skip)
					pick[n++] = i;
			}
		if (n == 0 && !life)
			continue;
		*used = true;
		b->nrows++;
		b->st->rows++;
		pgs_buf_varint(&b->rows, tidx);
		for (int i = 0; i < ti->npk; i++)
		{
			pgs_buf_u8(&b->rows, pk[i].type);
			pgs_value_put(&b->rows, &pk[i]);
			b->st->value_bytes += encoded_value_bytes(&pk[i]);
		}
		pgs_buf_varint(&b->rows, (uint64_t) cl);
		if ((rc = map_site(b, rcl.cl_site, &s, err)) != PGS_OK)
			goto out;
		pgs_buf_varint(&b->rows, s);
		pgs_buf_varint(&b->rows, (uint64_t) n);
		if (b->o->max_rows && b->nrows >= b->o->max_rows)
			b->full = true;
		if (n == 0)
			continue;
		ghlc = stamps[pick[0]].hlc;
		gsite = stamps[pick[0]].site;
		pgs_buf_svarint(&b->rows, (int64_t) (ghlc - b->prev_hlc));
		b->prev_hlc = ghlc;
		if ((rc = map_site(b, gsite, &s, err)) != PGS_OK)
			goto out;
		pgs_buf_varint(&b->rows, s);
		for (int k = 0; k < n; k++)
		{
			int				 c = pick[k];
			const pgs_stamp *st = &stamps[c];
			bool			 own = st->hlc != ghlc || st->site != gsite;
			int				 delta = c - prev_col - 1;
			uint8_t			 head =
				(uint8_t) (vals[c].type | (own ? 8 : 0) | (delta < 15 ? delta : 15) << 4);

			pgs_buf_u8(&b->rows, head);
			if (own)
			{
				pgs_buf_svarint(&b->rows, (int64_t) (st->hlc - ghlc));
				if ((rc = map_site(b, st->site, &s, err)) != PGS_OK)
					goto out;
				pgs_buf_varint(&b->rows, s);
			}
			if (delta >= 15)
				pgs_buf_varint(&b->rows, (uint64_t) c);
			pgs_value_put(&b->rows, &vals[c]);
			b->st->value_bytes += encoded_value_bytes(&vals[c]);
			prev_col = c;
		}
		b->st->changes += (uint64_t) n;
		if (b->rows.oom)
		{
			rc = pgs_fail(err, PGS_ERR_NOMEM, "out of memory building a payload", NULL, NULL);
			goto out;
		}
	}
	rc = PGS_OK;
out:
	if (cur)
		db_changes_close(cur);
	pgs_free(stamps);
	pgs_free(pick);
	return rc;
}

static bool *
pgs_calloc_bools(int n)
{
	bool *p = pgs_malloc(sizeof(bool) * (n ? n : 1));

	if (p)
		memset(p, 0, sizeof(bool) * (n ? n : 1));
	return p;
}

static void
put_str(pgs_buf *b, const char *s)
{
	size_t n = strlen(s);

	pgs_buf_varint(b, n);
	pgs_buf_put(b, s, n);
}

static void
put_le(uint8_t *p, uint64_t v, int n)
{
	for (int i = 0; i < n; i++)
		p[i] = (uint8_t) (v >> (8 * i));
}

pgs_rc
pgs_build(db_conn *db, const pgs_build_opts *o, pgs_buf *out, pgs_build_stats *st, pgs_err *err)
{
	build_ctx		b;
	db_table	  **tables;
	int				ntables;
	bool		   *used = NULL;
	uint32_t		nused = 0;
	pgs_buf			body;
	pgs_rc			rc;
	pgs_build_stats dummy = {0};

	pgs_build_opts oo = *o;
	pgs_token	   tok;
	uint32_t	   first = 0;

	memset(&b, 0, sizeof b);
	memset(st ? st : &dummy, 0, sizeof dummy);
	out->len = 0;
	if (o->after)
	{
		if ((rc = pgs_token_decode(o->after, o->after_len, &tok, err)) != PGS_OK)
			return rc;
		if (tok.since != o->since)
			return pgs_failf(err, PGS_ERR_MISUSE, "Pass the same since to every chunk of one pull.",
							 "continuation token was made for since %lld, not %lld",
							 (long long) tok.since, (long long) o->since);
		oo.until = tok.until; /* pinned by the first chunk */
		if (!oo.max_rows)
			oo.max_rows = UINT32_MAX;
	}
	o = &oo;
	b.db = db;
	b.o = o;
	b.st = st ? st : &dummy;
	pgs_buf_init(&b.rows);
	pgs_buf_init(&body);
	if ((rc = db_tables(db, &tables, &ntables, err)) != PGS_OK)
		return rc;
	if (o->after)
	{
		db_table *tt = NULL;
		pgs_err	  ignored;
		int		  k = ntables;

		if (db_table_find(db, tok.table, tok.table_len, &tt, &ignored) == PGS_OK)
			for (k = 0; k < ntables && tables[k] != tt; k++)
				;
		if (k == ntables || db_table_describe(tables[k])->npk != (int) tok.npk)
			return pgs_fail(err, PGS_ERR_CORRUPT, "invalid continuation token",
							"The token names a table or key this database does not sync.",
							"Pass the cursor of the previous chunk unchanged, or restart the pull "
							"without one.");
		first = (uint32_t) k;
	}
	used = pgs_calloc_bools(ntables);
	if (!used)
		return pgs_fail(err, PGS_ERR_NOMEM, "out of memory building a payload", NULL, NULL);
	for (int t = (int) first; t < ntables && !b.full; t++)
	{
		if ((rc = build_table(&b, tables[t], nused, o->after && t == (int) first ? tok.pk : NULL,
							  &used[t], err)) != PGS_OK)
			goto out;
		if (used[t])
			nused++;
	}
	/* a chunk that ends exactly at the last row announces more; the next
	 * (empty) chunk then carries the final until */
	if (b.nrows == 0 && !o->after)
		goto out; /* nothing to send: out stays empty */

	/* body = site dict, table dict, rows */
	pgs_buf_varint(&body, b.nsites);
	for (uint32_t i = 0; i < b.nsites; i++)
	{
		const uint8_t *site;

		if ((rc = db_site_lookup(db, b.site_order[i], &site, err)) != PGS_OK)
			goto out;
		pgs_buf_put(&body, site, PGS_SITE_LEN);
	}
	pgs_buf_varint(&body, nused);
	for (int t = 0; t < ntables; t++)
	{
		const db_table_info *ti;

		if (!used[t])
			continue;
		ti = db_table_describe(tables[t]);
		put_str(&body, ti->name);
		pgs_buf_varint(&body, (uint64_t) ti->npk);
		pgs_buf_varint(&body, (uint64_t) ti->ncols);
		for (int i = 0; i < ti->npk; i++)
			put_str(&body, ti->pk_names[i]);
		for (int i = 0; i < ti->ncols; i++)
			put_str(&body, ti->col_names[i]);
	}
	pgs_buf_varint(&body, b.nrows);
	pgs_buf_put(&body, b.rows.p, b.rows.len);
	pgs_buf_free(&b.rows);
	if (body.oom)
	{
		rc = pgs_fail(err, PGS_ERR_NOMEM, "out of memory building a payload", NULL, NULL);
		goto out;
	}
	if (body.len > PGS_MAX_BODY)
	{
		rc = pgs_failf(
			err, PGS_ERR_TOO_BIG, "Sync more often, or pass a larger since to send less.",
			"payload too large: %zu bytes exceeds the limit of %u", body.len, PGS_MAX_BODY);
		goto out;
	}
	b.st->body_len = body.len;

	{
		uint8_t	 flags = 0;
		uint8_t	 more = b.full ? PGS_FLAG_MORE : 0;
		size_t	 stored = body.len;
		uint8_t *hdr;

		if (!pgs_buf_reserve(out, PGS_HEADER_LEN + body.len))
		{
			rc = pgs_fail(err, PGS_ERR_NOMEM, "out of memory building a payload", NULL, NULL);
			goto out;
		}
		if (o->compress && body.len >= 128)
		{
			size_t bound = ZSTD_compressBound(body.len);

			if (pgs_buf_reserve(out, PGS_HEADER_LEN + bound))
			{
				size_t z = ZSTD_compress(out->p + PGS_HEADER_LEN, bound, body.p, body.len, 1);

				if (!ZSTD_isError(z) && z < body.len)
				{
					flags = 1;
					stored = z;
				}
			}
		}
		if (!flags)
			memcpy(out->p + PGS_HEADER_LEN, body.p, body.len);
		hdr = out->p;
		memcpy(hdr, PGS_PAYLOAD_MAGIC, 4);
		hdr[4] = PGS_PAYLOAD_VERSION;
		hdr[5] = flags | more;
		hdr[6] = hdr[7] = 0;
		memcpy(hdr + 8, db_site_id(db), PGS_SITE_LEN);
		put_le(hdr + 24, (uint64_t) o->since, 8);
		put_le(hdr + 32, (uint64_t) o->until, 8);
		put_le(hdr + 40, body.len, 4);
		put_le(hdr + 44, stored, 4);
		out->len = PGS_HEADER_LEN + stored;
		put_le(hdr + 48, pgs_payload_checksum(hdr, hdr + PGS_HEADER_LEN, stored), 8);
	}
	rc = PGS_OK;
out:
	pgs_buf_free(&b.rows);
	pgs_buf_free(&body);
	pgs_free(b.site_map);
	pgs_free(b.site_order);
	pgs_free(b.excl);
	pgs_free(used);
	return rc;
}
