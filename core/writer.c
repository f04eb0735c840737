/*
 * writer.c — the one writer of the payload format (docs/PAYLOAD.md).
 *
 * Everything that produces payload bytes goes through here: pgs_build
 * (sync_payload on both engines), held fragments (apply.c) and the tests'
 * fixtures. Groups are appended as they are built; the site and table
 * dictionaries grow with them and are written in front of the groups when
 * the payload is sealed, so a builder never knows in advance which sites and
 * tables it will use. Sealing writes the header, tries zstd once and keeps
 * it only when it makes the body smaller, and computes the checksum.
 *
 * Encoding rules kept here and nowhere else: a group's default stamp is its
 * first change's, the group hlc is a delta from the previous group's, a
 * change carries its own stamp only when it differs, column indexes are
 * deltas (15 = explicit index), group heads are table << 2 | kind.
 */
#include "pgsync.h"

#include <string.h>
#include <xxhash.h>
#include <zstd.h>

uint64_t pgs_payload_checksum(const uint8_t *header48, const uint8_t *body, size_t len);

static void
put_le(uint8_t *p, uint64_t v, int n)
{
	for (int i = 0; i < n; i++)
		p[i] = (uint8_t) (v >> (8 * i));
}

static void
put_name(pgs_buf *b, pgs_name n)
{
	pgs_buf_varint(b, n.len);
	pgs_buf_put(b, n.p, n.len);
}

void
pgs_writer_init(pgs_writer *w)
{
	memset(w, 0, sizeof *w);
	pgs_buf_init(&w->groups);
	pgs_buf_init(&w->sites);
}

void
pgs_writer_free(pgs_writer *w)
{
	for (uint32_t i = 0; i < w->ntables; i++)
	{
		pgs_buf_free(&w->tables[i].dict);
		pgs_buf_free(&w->tables[i].aliases);
	}
	pgs_free(w->tables);
	pgs_buf_free(&w->groups);
	pgs_buf_free(&w->sites);
	memset(w, 0, sizeof *w);
}

uint32_t
pgs_writer_site_add(pgs_writer *w, const uint8_t site[16])
{
	pgs_buf_put(&w->sites, site, PGS_SITE_LEN);
	return w->nsites++;
}

uint32_t
pgs_writer_site(pgs_writer *w, const uint8_t site[16])
{
	for (uint32_t i = 0; i < w->nsites; i++)
		if (memcmp(w->sites.p + PGS_SITE_LEN * i, site, PGS_SITE_LEN) == 0)
			return i;
	return pgs_writer_site_add(w, site);
}

uint32_t
pgs_writer_table(pgs_writer *w, pgs_name name, uint32_t npk, const pgs_name *pk_names,
				 uint32_t ncols, const pgs_name *col_names)
{
	pgs_wtable *t;

	if (w->ntables == w->tables_cap)
	{
		uint32_t	cap = w->tables_cap ? w->tables_cap * 2 : 8;
		pgs_wtable *n = pgs_realloc(w->tables, sizeof(pgs_wtable) * cap);

		if (!n)
		{
			w->oom = true;
			return 0;
		}
		w->tables = n;
		w->tables_cap = cap;
	}
	t = &w->tables[w->ntables];
	memset(t, 0, sizeof *t);
	pgs_buf_init(&t->dict);
	pgs_buf_init(&t->aliases);
	put_name(&t->dict, name);
	pgs_buf_varint(&t->dict, npk);
	pgs_buf_varint(&t->dict, ncols);
	for (uint32_t i = 0; i < npk; i++)
		put_name(&t->dict, pk_names[i]);
	for (uint32_t i = 0; i < ncols; i++)
		put_name(&t->dict, col_names[i]);
	t->npk = npk;
	t->ncols = ncols;
	return w->ntables++;
}

void
pgs_writer_table_fingerprint(pgs_writer *w, uint32_t table, uint64_t fp)
{
	if (table < w->ntables)
	{
		w->tables[table].has_fingerprint = true;
		w->tables[table].fingerprint = fp;
	}
}

void
pgs_writer_table_snap(pgs_writer *w, uint32_t table, uint32_t snap_flags)
{
	if (table < w->ntables)
		w->tables[table].snap |= snap_flags;
}

void
pgs_writer_table_salt(pgs_writer *w, uint32_t table, uint64_t salt)
{
	if (table < w->ntables)
	{
		w->tables[table].has_salt = true;
		w->tables[table].salt = salt;
	}
}

void
pgs_writer_table_alias(pgs_writer *w, uint32_t table, uint32_t col, pgs_name name)
{
	if (table < w->ntables && col < w->tables[table].ncols)
	{
		pgs_wtable *t = &w->tables[table];

		pgs_buf_varint(&t->aliases, col);
		put_name(&t->aliases, name);
		t->nalias++;
	}
}

static void
put_head(pgs_writer *w, uint32_t table, pgs_group_kind kind)
{
	pgs_buf_varint(&w->groups, (uint64_t) table << 2 | (uint64_t) kind);
	w->ngroups++;
}

void
pgs_writer_row(pgs_writer *w, uint32_t table, bool whole, const pgs_value *pk, int64_t cl,
			   uint32_t cl_site, uint32_t n, const pgs_wchange *ch)
{
	pgs_buf *b = &w->groups;
	uint64_t ghlc;
	uint32_t gsite;
	int64_t	 prev_col = -1;

	put_head(w, table, whole && (cl & 1) ? PGS_GROUP_WHOLE : PGS_GROUP_CHANGES);
	pgs_key_encode(b, table < w->ntables ? w->tables[table].npk : 0, pk);
	pgs_buf_varint(b, (uint64_t) cl);
	pgs_buf_varint(b, cl_site);
	pgs_buf_varint(b, n);
	if (n == 0)
		return;
	ghlc = ch[0].hlc;
	gsite = ch[0].site;
	pgs_buf_svarint(b, (int64_t) (ghlc - w->prev_hlc));
	w->prev_hlc = ghlc;
	pgs_buf_varint(b, gsite);
	for (uint32_t k = 0; k < n; k++)
	{
		const pgs_wchange *c = &ch[k];
		bool			   own = c->hlc != ghlc || c->site != gsite;
		int64_t			   delta = (int64_t) c->col - prev_col - 1;

		pgs_buf_u8(b, (uint8_t) (c->value.type | (own ? 8 : 0) | (delta < 15 ? delta : 15) << 4));
		if (own)
		{
			pgs_buf_svarint(b, (int64_t) (c->hlc - ghlc));
			pgs_buf_varint(b, c->site);
		}
		if (delta >= 15)
			pgs_buf_varint(b, c->col);
		pgs_value_put(b, &c->value);
		prev_col = c->col;
	}
}

void
pgs_writer_candidate(pgs_writer *w, uint32_t table, uint64_t hash, int64_t cl, uint32_t cl_site)
{
	uint8_t h[8];

	put_head(w, table, PGS_GROUP_CANDIDATE);
	put_le(h, hash, 8);
	pgs_buf_put(&w->groups, h, 8);
	pgs_buf_varint(&w->groups, (uint64_t) cl);
	pgs_buf_varint(&w->groups, cl_site);
}

void
pgs_writer_absent(pgs_writer *w, uint32_t table, const pgs_value *pk)
{
	put_head(w, table, PGS_GROUP_ABSENT);
	pgs_key_encode(&w->groups, table < w->ntables ? w->tables[table].npk : 0, pk);
}

/* put_attrs: a table entry's format 2 attributes (tag, length, bytes). */
static void
put_attrs(pgs_buf *b, const pgs_wtable *t)
{
	uint8_t le[8];
	int		n = (t->has_fingerprint ? 1 : 0) + (t->snap ? 1 : 0) + (t->has_salt ? 1 : 0) +
			(t->nalias ? 1 : 0);

	pgs_buf_varint(b, (uint64_t) n);
	if (t->has_fingerprint)
	{
		pgs_buf_varint(b, 1);
		pgs_buf_varint(b, 8);
		put_le(le, t->fingerprint, 8);
		pgs_buf_put(b, le, 8);
	}
	if (t->snap)
	{
		pgs_buf_varint(b, 2);
		pgs_buf_varint(b, 1); /* snap <= 7: one varint byte */
		pgs_buf_varint(b, t->snap);
	}
	if (t->has_salt)
	{
		pgs_buf_varint(b, 3);
		pgs_buf_varint(b, 8);
		put_le(le, t->salt, 8);
		pgs_buf_put(b, le, 8);
	}
	if (t->nalias)
	{
		uint8_t tmp[10];
		int		k = pgs_varint_put(tmp, t->nalias);

		pgs_buf_varint(b, 4);
		pgs_buf_varint(b, (uint64_t) k + t->aliases.len);
		pgs_buf_put(b, tmp, (size_t) k);
		pgs_buf_put(b, t->aliases.p, t->aliases.len);
	}
}

pgs_rc
pgs_writer_seal(pgs_writer *w, const uint8_t origin[16], int64_t since, int64_t until,
				uint8_t flags, bool compress, pgs_buf *out, pgs_err *err)
{
	pgs_buf	 body;
	size_t	 stored;
	uint8_t	 zflag = 0;
	uint8_t *hdr;
	pgs_rc	 rc = PGS_OK;

	out->len = 0;
	pgs_buf_init(&body);
	pgs_buf_varint(&body, w->nsites);
	pgs_buf_put(&body, w->sites.p, w->sites.len);
	pgs_buf_varint(&body, w->ntables);
	for (uint32_t i = 0; i < w->ntables; i++)
	{
		pgs_buf_put(&body, w->tables[i].dict.p, w->tables[i].dict.len);
		put_attrs(&body, &w->tables[i]);
		w->oom |= w->tables[i].dict.oom || w->tables[i].aliases.oom;
	}
	pgs_buf_varint(&body, w->ngroups);
	pgs_buf_put(&body, w->groups.p, w->groups.len);
	if (w->oom || body.oom || w->groups.oom || w->sites.oom)
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
	stored = body.len;
	if (!pgs_buf_reserve(out, PGS_HEADER_LEN + body.len))
	{
		rc = pgs_fail(err, PGS_ERR_NOMEM, "out of memory building a payload", NULL, NULL);
		goto out;
	}
	if (compress && body.len >= 128)
	{
		size_t bound = ZSTD_compressBound(body.len);

		if (pgs_buf_reserve(out, PGS_HEADER_LEN + bound))
		{
			size_t z = ZSTD_compress(out->p + PGS_HEADER_LEN, bound, body.p, body.len, 1);

			if (!ZSTD_isError(z) && z < body.len)
			{
				zflag = PGS_FLAG_ZSTD;
				stored = z;
			}
		}
	}
	if (!zflag)
		memcpy(out->p + PGS_HEADER_LEN, body.p, body.len);
	hdr = out->p;
	memcpy(hdr, PGS_PAYLOAD_MAGIC, 4);
	hdr[4] = PGS_PAYLOAD_VERSION;
	hdr[5] = (uint8_t) (zflag | (flags & PGS_FLAG_MORE));
	hdr[6] = hdr[7] = 0;
	memcpy(hdr + 8, origin, PGS_SITE_LEN);
	put_le(hdr + 24, (uint64_t) since, 8);
	put_le(hdr + 32, (uint64_t) until, 8);
	put_le(hdr + 40, body.len, 4);
	put_le(hdr + 44, stored, 4);
	out->len = PGS_HEADER_LEN + stored;
	w->body_len = body.len;
	put_le(hdr + 48, pgs_payload_checksum(hdr, hdr + PGS_HEADER_LEN, stored), 8);
out:
	pgs_buf_free(&body);
	return rc;
}
