/*
 * payload.c — the payload container and its streaming reader.
 *
 * docs/PAYLOAD.md is the byte-by-byte description; this file follows it.
 * The reader distrusts its input: the checksum is verified before any field
 * of the body is read, every length and count is compared with the bytes
 * that remain before it is used or allocated, every index is range-checked,
 * and trailing bytes are an error. It allocates only dictionary arrays and
 * per-group scratch, all bounded by the body length.
 */
#include "pgsync.h"

#include <string.h>
#include <xxhash.h>
#include <zstd.h>

static uint64_t
le64(const uint8_t *p)
{
	uint64_t v = 0;

	for (int i = 0; i < 8; i++)
		v |= (uint64_t) p[i] << (8 * i);
	return v;
}

static uint32_t
le32(const uint8_t *p)
{
	return (uint32_t) p[0] | (uint32_t) p[1] << 8 | (uint32_t) p[2] << 16 | (uint32_t) p[3] << 24;
}

uint64_t pgs_payload_checksum(const uint8_t *header48, const uint8_t *body, size_t len);

uint64_t
pgs_payload_checksum(const uint8_t *header48, const uint8_t *body, size_t len)
{
	return XXH3_64bits_withSeed(body, len, XXH3_64bits(header48, 48));
}

#define CORRUPT(err, what)                                                                         \
	pgs_fail(err, PGS_ERR_CORRUPT, "corrupt payload: " what, NULL,                                 \
			 "The payload was damaged or truncated in transit; fetch it again from its sender.")

pgs_rc
pgs_payload_header(const uint8_t *p, size_t len, pgs_header *h, pgs_err *err)
{
	if (!p || len < PGS_HEADER_LEN)
		return pgs_failf(err, PGS_ERR_CORRUPT,
						 "Pass the value returned by sync_payload, unchanged.",
						 "not a pgsync payload: %zu bytes is shorter than the %d-byte header",
						 p ? len : 0, PGS_HEADER_LEN);
	if (memcmp(p, PGS_PAYLOAD_MAGIC, 4) != 0)
		return pgs_fail(err, PGS_ERR_CORRUPT, "not a pgsync payload: bad magic",
						"A payload starts with the bytes \"PGSY\".",
						"Pass the value returned by sync_payload, unchanged.");
	h->version = p[4];
	if (h->version < PGS_PAYLOAD_VERSION_MIN || h->version > PGS_PAYLOAD_VERSION)
		return pgs_failf(
			err, PGS_ERR_VERSION,
			"Upgrade this replica's pgsync to read payloads from newer replicas.",
			"unsupported payload format version %u (this build reads versions %d to %d)",
			h->version, PGS_PAYLOAD_VERSION_MIN, PGS_PAYLOAD_VERSION);
	h->flags = p[5];
	if ((h->flags & ~3u) != 0 || p[6] != 0 || p[7] != 0)
		return pgs_fail(err, PGS_ERR_VERSION, "unsupported payload flags",
						"Reserved header bits are set.",
						"Upgrade this replica's pgsync to read payloads from newer replicas.");
	memcpy(h->origin, p + 8, 16);
	h->since = (int64_t) le64(p + 24);
	h->until = (int64_t) le64(p + 32);
	h->body_len = le32(p + 40);
	h->stored_len = le32(p + 44);
	if (h->since < 0 || h->until < h->since)
		return CORRUPT(err, "invalid version range in header");
	if (h->body_len > PGS_MAX_BODY)
		return pgs_failf(err, PGS_ERR_TOO_BIG, "Sync more often, or in smaller batches.",
						 "payload too large: body of %u bytes exceeds the limit of %u", h->body_len,
						 PGS_MAX_BODY);
	if ((uint64_t) h->stored_len + PGS_HEADER_LEN != len)
	{
		pgs_failf(
			err, PGS_ERR_CORRUPT,
			"The payload was truncated or extended in transit; fetch it again from its sender.",
			"corrupt payload: length %zu does not match the header (expected %llu)", len,
			(unsigned long long) h->stored_len + PGS_HEADER_LEN);
		return PGS_ERR_CORRUPT;
	}
	if (!(h->flags & 1) && h->stored_len != h->body_len)
		return CORRUPT(err, "stored and body lengths differ in an uncompressed payload");
	if (pgs_payload_checksum(p, p + PGS_HEADER_LEN, h->stored_len) != le64(p + 48))
		return CORRUPT(err, "checksum mismatch");
	return PGS_OK;
}

pgs_rc
pgs_payload_origin(const uint8_t *p, size_t len, uint8_t origin[16])
{
	pgs_header h;
	pgs_rc	   rc = pgs_payload_header(p, len, &h, NULL);

	if (rc == PGS_OK)
		memcpy(origin, h.origin, 16);
	return rc;
}

pgs_rc
pgs_payload_until(const uint8_t *p, size_t len, int64_t *until, pgs_err *err)
{
	pgs_header h;
	pgs_rc	   rc = pgs_payload_header(p, len, &h, err);

	if (rc == PGS_OK)
		*until = h.until;
	return rc;
}

pgs_rc
pgs_payload_body(const uint8_t *p, size_t len, pgs_header *h, const uint8_t **body, uint8_t **owned,
				 pgs_err *err)
{
	pgs_rc			   rc = pgs_payload_header(p, len, h, err);
	uint8_t			  *out;
	size_t			   got;
	unsigned long long fsize;

	*owned = NULL;
	if (rc != PGS_OK)
		return rc;
	if (!(h->flags & 1))
	{
		*body = p + PGS_HEADER_LEN;
		return PGS_OK;
	}
	fsize = ZSTD_getFrameContentSize(p + PGS_HEADER_LEN, h->stored_len);
	if (fsize != h->body_len)
		return CORRUPT(err, "compressed body size does not match the header");

	/*
	 * Decompress as a stream into a buffer that grows with the output
	 * actually produced, so a forged size in a tiny frame cannot make us
	 * allocate up to PGS_MAX_BODY before the data proves it.
	 */
	{
		ZSTD_DCtx	  *dctx = ZSTD_createDCtx();
		size_t		   cap = (size_t) h->stored_len * 4 + 65536;
		ZSTD_inBuffer  in = {p + PGS_HEADER_LEN, h->stored_len, 0};
		ZSTD_outBuffer ob;
		size_t		   r = 1;

		if (cap > h->body_len)
			cap = h->body_len ? h->body_len : 1;
		out = dctx ? pgs_malloc(cap) : NULL;
		if (!out)
		{
			ZSTD_freeDCtx(dctx);
			return pgs_fail(err, PGS_ERR_NOMEM, "out of memory decompressing a payload", NULL,
							NULL);
		}
		ob.dst = out;
		ob.size = cap;
		ob.pos = 0;
		while (r != 0)
		{
			r = ZSTD_decompressStream(dctx, &ob, &in);
			if (ZSTD_isError(r) || ob.pos > h->body_len)
				break;
			if (r == 0)
				break;
			if (ob.pos == ob.size)
			{
				size_t	 ncap = ob.size * 2 > h->body_len ? h->body_len : ob.size * 2;
				uint8_t *n;

				if (ncap <= ob.size)
				{
					r = (size_t) -1; /* more output than the header promised */
					break;
				}
				if (!(n = pgs_realloc(out, ncap)))
				{
					ZSTD_freeDCtx(dctx);
					pgs_free(out);
					return pgs_fail(err, PGS_ERR_NOMEM, "out of memory decompressing a payload",
									NULL, NULL);
				}
				out = n;
				ob.dst = out;
				ob.size = ncap;
			}
			else if (in.pos == in.size)
				break; /* input exhausted before the frame ended */
		}
		got = ob.pos;
		ZSTD_freeDCtx(dctx);
		if (r != 0 || got != h->body_len || in.pos != in.size)
		{
			pgs_free(out);
			return CORRUPT(err, "compressed body does not decompress");
		}
	}
	*body = out;
	*owned = out;
	return PGS_OK;
}

/* ---- reader ---- */

static bool
get_varint(pgs_reader *r, uint64_t *v)
{
	int n = pgs_varint_get(r->p, r->end, v);

	r->p += n;
	return n != 0;
}

static bool
get_str(pgs_reader *r, const uint8_t **s, uint32_t *len)
{
	uint64_t n;

	if (!get_varint(r, &n) || n > PGS_MAX_NAME || n > (uint64_t) (r->end - r->p))
		return false;
	*s = r->p;
	*len = (uint32_t) n;
	r->p += n;
	return true;
}

/* read_aliases: attribute 4, varint n then n x (varint column, name). */
static bool
read_aliases(pgs_reader *r, pgs_dict_table *d, const uint8_t *v, size_t len)
{
	const uint8_t *save_p = r->p, *save_end = r->end;
	uint64_t	   n;
	bool		   ok = true;
	void		  *mem;

	r->p = v;
	r->end = v + len;
	if (!get_varint(r, &n) || n == 0 || n > len)
		ok = false;
	else if (!(mem = pgs_malloc((size_t) n * (sizeof(uint8_t *) + 2 * sizeof(uint32_t)))))
		ok = false;
	else
	{
		d->alias_names = mem;
		d->alias_cols = (uint32_t *) (d->alias_names + n);
		d->alias_name_lens = d->alias_cols + n;
		d->nalias = (uint32_t) n;
		for (uint64_t i = 0; i < n && ok; i++)
		{
			uint64_t col;

			ok = get_varint(r, &col) && col < d->ncols &&
				 get_str(r, &d->alias_names[i], &d->alias_name_lens[i]) &&
				 d->alias_name_lens[i] > 0;
			d->alias_cols[i] = (uint32_t) col;
		}
		ok = ok && r->p == r->end;
	}
	r->p = save_p;
	r->end = save_end;
	return ok;
}

/* read_attrs: a format 2 table entry's attributes; unknown tags are skipped. */
static bool
read_attrs(pgs_reader *r, pgs_dict_table *d)
{
	uint64_t n, tag, len;

	if (!get_varint(r, &n) || n > (uint64_t) (r->end - r->p))
		return false;
	for (uint64_t i = 0; i < n; i++)
	{
		const uint8_t *v;

		if (!get_varint(r, &tag) || !get_varint(r, &len) || len > (uint64_t) (r->end - r->p))
			return false;
		v = r->p;
		r->p += len;
		switch (tag)
		{
			case 1: /* fingerprint */
				if (len != 8)
					return false;
				d->has_fingerprint = true;
				d->fingerprint = le64(v);
				break;
			case 2: /* snapshot flags */
			{
				uint64_t f = 0;

				if (len == 0 || pgs_varint_get(v, v + len, &f) != (int) len || f > 7)
					return false;
				d->snap = (uint32_t) f;
				break;
			}
			case 3: /* salt of the removal candidates */
				if (len != 8)
					return false;
				d->has_salt = true;
				d->salt = le64(v);
				break;
			case 4: /* former column names */
				if (d->nalias || !read_aliases(r, d, v, (size_t) len))
					return false;
				break;
			default:
				break; /* a newer writer's attribute: ignored */
		}
	}
	return true;
}

pgs_rc
pgs_reader_open(pgs_reader *r, uint8_t version, const uint8_t *body, size_t len, pgs_err *err)
{
	uint64_t n;

	memset(r, 0, sizeof *r);
	r->version = version;
	r->p = body;
	r->end = body + len;
	if (!get_varint(r, &n) || n > (uint64_t) (r->end - r->p) / PGS_SITE_LEN)
		return CORRUPT(err, "bad site dictionary");
	r->nsites = (uint32_t) n;
	r->sites = r->p;
	r->p += n * PGS_SITE_LEN;
	if (!get_varint(r, &n) || n > (uint64_t) (r->end - r->p))
		return CORRUPT(err, "bad table dictionary");
	r->ntables = (uint32_t) n;
	r->tables = pgs_malloc(sizeof(pgs_dict_table) * (n ? n : 1));
	if (!r->tables)
		return pgs_fail(err, PGS_ERR_NOMEM, "out of memory reading a payload", NULL, NULL);
	memset(r->tables, 0, sizeof(pgs_dict_table) * (n ? n : 1));
	for (uint32_t t = 0; t < r->ntables; t++)
	{
		pgs_dict_table *d = &r->tables[t];
		uint64_t		npk, ncols;
		void		   *mem;

		if (!get_str(r, &d->name, &d->name_len) || d->name_len == 0)
			return CORRUPT(err, "bad table name");
		if (!get_varint(r, &npk) || !get_varint(r, &ncols) || npk == 0 || npk > 32767 ||
			ncols > 32767 || /* before the sum can wrap */
			npk + ncols > (uint64_t) (r->end - r->p) || npk + ncols > 32767)
			return CORRUPT(err, "bad column counts");
		d->npk = (uint32_t) npk;
		d->ncols = (uint32_t) ncols;
		mem = pgs_malloc((npk + ncols) * (sizeof(uint8_t *) + sizeof(uint32_t)));
		if (!mem)
			return pgs_fail(err, PGS_ERR_NOMEM, "out of memory reading a payload", NULL, NULL);
		d->pk_names = mem;
		d->col_names = d->pk_names + npk;
		d->pk_name_lens = (uint32_t *) (d->col_names + ncols);
		d->col_name_lens = d->pk_name_lens + npk;
		for (uint64_t i = 0; i < npk; i++)
			if (!get_str(r, &d->pk_names[i], &d->pk_name_lens[i]) || d->pk_name_lens[i] == 0)
				return CORRUPT(err, "bad key column name");
		for (uint64_t i = 0; i < ncols; i++)
			if (!get_str(r, &d->col_names[i], &d->col_name_lens[i]) || d->col_name_lens[i] == 0)
				return CORRUPT(err, "bad column name");
		if (version >= 2 && !read_attrs(r, d))
			return CORRUPT(err, "bad table attributes");
		if (npk > r->pk_cap)
			r->pk_cap = (uint32_t) npk;
	}
	if (!get_varint(r, &n) || n > (uint64_t) (r->end - r->p))
		return CORRUPT(err, "bad row count");
	r->nrows = n;
	if (r->pk_cap)
	{
		r->pk_scratch = pgs_malloc(sizeof(pgs_value) * r->pk_cap);
		if (!r->pk_scratch)
			return pgs_fail(err, PGS_ERR_NOMEM, "out of memory reading a payload", NULL, NULL);
	}
	return PGS_OK;
}

pgs_rc
pgs_reader_next(pgs_reader *r, pgs_group *g, bool *done, pgs_err *err)
{
	uint64_t		u, site = 0;
	uint64_t		hlc = r->prev_hlc;
	pgs_dict_table *d;
	int64_t			prev_col = -1;
	pgs_rc			rc;

	if (r->row == r->nrows)
	{
		if (r->p != r->end)
			return CORRUPT(err, "trailing bytes after the last row");
		*done = true;
		return PGS_OK;
	}
	*done = false;
	r->row++;
	if (!get_varint(r, &u))
		return CORRUPT(err, "table index out of range");
	g->kind = PGS_GROUP_CHANGES;
	if (r->version >= 2)
	{
		g->kind = (uint8_t) (u & 3);
		u >>= 2;
	}
	if (u >= r->ntables)
		return CORRUPT(err, "table index out of range");
	g->table = (uint32_t) u;
	d = &r->tables[u];
	g->pk = r->pk_scratch;
	g->nchanges = 0;
	g->hash = 0;
	g->whole = g->kind == PGS_GROUP_WHOLE;
	g->changes = r->ch_scratch;
	if (g->kind == PGS_GROUP_CANDIDATE)
	{
		if (r->end - r->p < 8)
			return CORRUPT(err, "truncated key hash");
		g->hash = le64(r->p);
		r->p += 8;
		if (!d->has_salt)
			return CORRUPT(err, "removal candidate in a table without a salt");
	}
	else
		for (uint32_t i = 0; i < d->npk; i++)
		{
			if (r->p >= r->end)
				return CORRUPT(err, "truncated primary key");
			u = *r->p++;
			if (u == PGS_NULL || u > PGS_BLOB)
				return CORRUPT(err, "bad primary key value type");
			if ((rc = pgs_value_get(&r->p, r->end, (uint8_t) u, &g->pk[i], err)) != PGS_OK)
				return rc;
		}
	if (g->kind == PGS_GROUP_ABSENT)
	{
		g->cl = 0;
		g->cl_site = 0;
		return PGS_OK;
	}
	if (!get_varint(r, &u) || u == 0 || u > PGS_MAX_CL)
		return CORRUPT(err, "bad causal length");
	g->cl = (int64_t) u;
	if (!get_varint(r, &u) || u >= r->nsites)
		return CORRUPT(err, "site index out of range");
	g->cl_site = (uint32_t) u;
	if (g->kind == PGS_GROUP_CANDIDATE)
		return PGS_OK;
	if (!get_varint(r, &u) || u > (uint64_t) (r->end - r->p) || u > d->ncols)
		return CORRUPT(err, "bad change count");
	g->nchanges = (uint32_t) u;
	if (g->nchanges && (g->cl & 1) == 0)
		return CORRUPT(err, "column change on a deleted row");
	if (g->kind == PGS_GROUP_WHOLE && (g->cl & 1) == 0)
		return CORRUPT(err, "whole row of a deleted row");
	if (r->version < 2)
		g->whole = (g->cl & 1) && g->nchanges == d->ncols;
	if (g->nchanges > r->ch_cap)
	{
		pgs_change *n = pgs_realloc(r->ch_scratch, sizeof(pgs_change) * g->nchanges);

		if (!n)
			return pgs_fail(err, PGS_ERR_NOMEM, "out of memory reading a payload", NULL, NULL);
		r->ch_scratch = n;
		r->ch_cap = g->nchanges;
	}
	g->changes = r->ch_scratch;
	if (g->nchanges)
	{
		if (!get_varint(r, &u))
			return CORRUPT(err, "truncated stamp");
		hlc = r->prev_hlc + (uint64_t) pgs_unzigzag(u);
		if (!pgs_hlc_valid(hlc))
			return CORRUPT(err, "invalid clock stamp");
		r->prev_hlc = hlc;
		if (!get_varint(r, &site) || site >= r->nsites)
			return CORRUPT(err, "site index out of range");
	}
	for (uint32_t i = 0; i < g->nchanges; i++)
	{
		pgs_change *c = &g->changes[i];
		uint8_t		head;
		int64_t		col;

		if (r->p >= r->end)
			return CORRUPT(err, "truncated change");
		head = *r->p++;
		c->hlc = hlc;
		c->site = (uint32_t) site;
		if (head & 8)
		{
			uint64_t s;

			if (!get_varint(r, &u))
				return CORRUPT(err, "truncated stamp");
			c->hlc = hlc + (uint64_t) pgs_unzigzag(u);
			if (!pgs_hlc_valid(c->hlc))
				return CORRUPT(err, "invalid clock stamp");
			if (!get_varint(r, &s) || s >= r->nsites)
				return CORRUPT(err, "site index out of range");
			c->site = (uint32_t) s;
		}
		if ((head >> 4) == 15)
		{
			if (!get_varint(r, &u) || u > INT32_MAX)
				return CORRUPT(err, "bad column index");
			col = (int64_t) u;
		}
		else
			col = prev_col + 1 + (head >> 4);
		if (col <= prev_col || col >= (int64_t) d->ncols)
			return CORRUPT(err, "column index out of range or out of order");
		c->col = (uint32_t) col;
		prev_col = col;
		if ((rc = pgs_value_get(&r->p, r->end, head & 7, &c->value, err)) != PGS_OK)
			return rc;
	}
	return PGS_OK;
}

void
pgs_reader_close(pgs_reader *r)
{
	if (r->tables)
		for (uint32_t t = 0; t < r->ntables; t++)
		{
			pgs_free((void *) r->tables[t].pk_names);
			pgs_free((void *) r->tables[t].alias_names);
		}
	pgs_free(r->tables);
	pgs_free(r->pk_scratch);
	pgs_free(r->ch_scratch);
	memset(r, 0, sizeof *r);
}
