/*
 * chunk.c — continuation tokens of chunked builds (docs/PAYLOAD.md, "Chunks").
 *
 * token := version:u8 (2)  since:varint  until:varint  flags:varint  table:str
 *          npk:varint  pk_value{npk}          (version 1: no flags)
 *
 * since/until are the pull's bounds (until pinned by the first chunk), table
 * the payload name of the last row group's table (a name, not an index: the
 * set of synced tables may change between chunks) and pk_value its key,
 * encoded like a payload's pk_value; flags pin what the first chunk decided
 * (PGS_TOKEN_VIEW, PGS_TOKEN_SNAPSHOT_ALL). The next chunk starts after that
 * key.
 * Tokens come back from clients: everything is range-checked.
 */
#include "pgsync.h"
#include "../database.h"

#include <string.h>

static pgs_rc
bad_token(pgs_err *err, const char *detail)
{
	return pgs_fail(
		err, PGS_ERR_CORRUPT, "invalid continuation token", detail,
		"Pass the cursor of the previous chunk unchanged, or restart the pull without one.");
}

void
pgs_token_encode(pgs_buf *b, int64_t since, int64_t until, uint32_t flags, const uint8_t *table,
				 uint32_t table_len, uint32_t npk, const pgs_value *pk)
{
	pgs_buf_u8(b, PGS_TOKEN_VERSION);
	pgs_buf_varint(b, (uint64_t) since);
	pgs_buf_varint(b, (uint64_t) until);
	pgs_buf_varint(b, flags);
	pgs_buf_varint(b, table_len);
	pgs_buf_put(b, table, table_len);
	pgs_buf_varint(b, npk);
	for (uint32_t i = 0; i < npk; i++)
	{
		pgs_buf_u8(b, pk[i].type);
		pgs_value_put(b, &pk[i]);
	}
}

pgs_rc
pgs_token_decode(const uint8_t *p, size_t len, pgs_token *t, pgs_err *err)
{
	const uint8_t *end = p + len;
	uint64_t	   u;
	int			   n;
	uint8_t		   version;
	pgs_rc		   rc;

	memset(t, 0, sizeof *t);
	if (!p || len < 1 || len > PGS_MAX_TOKEN)
		return bad_token(err, "The token is empty or too long.");
	version = *p++;
	if (version < 1 || version > PGS_TOKEN_VERSION)
		return bad_token(err, "Unknown token version.");
	if (!(n = pgs_varint_get(p, end, &u)) || u > (uint64_t) INT64_MAX)
		return bad_token(err, "Malformed since.");
	p += n;
	t->since = (int64_t) u;
	if (!(n = pgs_varint_get(p, end, &u)) || u > (uint64_t) INT64_MAX)
		return bad_token(err, "Malformed until.");
	p += n;
	t->until = (int64_t) u;
	if (version >= 2)
	{
		if (!(n = pgs_varint_get(p, end, &u)) || u > 3)
			return bad_token(err, "Malformed flags.");
		p += n;
		t->flags = (uint32_t) u;
	}
	/* a pull from since to until >= since; equal only for a forced snapshot */
	if (t->until < t->since || (t->until == t->since && !(t->flags & PGS_TOKEN_SNAPSHOT_ALL)))
		return bad_token(err, "until is not above since.");
	if (!(n = pgs_varint_get(p, end, &u)) || u == 0 || u > PGS_MAX_NAME ||
		u > (uint64_t) (end - p - n))
		return bad_token(err, "Malformed table name.");
	p += n;
	t->table = p;
	t->table_len = (uint32_t) u;
	if (!pgs_utf8_valid(p, (size_t) u))
		return bad_token(err, "Malformed table name.");
	p += u;
	if (!(n = pgs_varint_get(p, end, &u)) || u == 0 || u > PGS_TOKEN_MAX_PK)
		return bad_token(err, "Malformed key count.");
	p += n;
	t->npk = (uint32_t) u;
	for (uint32_t i = 0; i < t->npk; i++)
	{
		uint8_t type;

		if (p >= end)
			return bad_token(err, "The token is truncated.");
		type = *p++;
		if (type < PGS_INT || type > PGS_BLOB)
			return bad_token(err, "A key value has an invalid type.");
		if ((rc = pgs_value_get(&p, end, type, &t->pk[i], err)) != PGS_OK)
			return bad_token(err, "A key value is malformed.");
	}
	if (p != end)
		return bad_token(err, "Trailing bytes.");
	return PGS_OK;
}

pgs_rc
pgs_payload_next_token(db_conn *db, const uint8_t *p, size_t len, pgs_buf *tok, pgs_err *err)
{
	pgs_header	   h;
	const uint8_t *body;
	uint8_t		  *owned = NULL;
	pgs_reader	   r;
	pgs_group	   g;
	bool		   done, any = false;
	uint32_t	   last_table = 0;
	pgs_value	   last_pk[PGS_TOKEN_MAX_PK];
	uint32_t	   npk = 0;
	db_table	  *t;
	pgs_rc		   rc;

	tok->len = 0;
	if ((rc = pgs_payload_header(p, len, &h, err)) != PGS_OK)
		return rc;
	if (!(h.flags & PGS_FLAG_MORE))
		return PGS_OK;
	if ((rc = pgs_payload_body(p, len, &h, &body, &owned, err)) != PGS_OK)
		return rc;
	if ((rc = pgs_reader_open(&r, h.version, body, h.body_len, err)) != PGS_OK)
		goto out;
	for (;;)
	{
		if ((rc = pgs_reader_next(&r, &g, &done, err)) != PGS_OK)
			goto close;
		if (done)
			break;
		if (g.kind == PGS_GROUP_CANDIDATE)
		{
			any = false; /* its key is not in the payload */
			continue;
		}
		any = true;
		last_table = g.table;
		npk = r.tables[g.table].npk;
		if (npk == 0 || npk > PGS_TOKEN_MAX_PK)
		{
			rc = bad_token(err, "The payload's table has too many key columns for a chunk.");
			goto close;
		}
		/* TEXT/BLOB point into the body, which outlives the loop */
		memcpy(last_pk, g.pk, sizeof(pgs_value) * npk);
	}
	if (!any)
	{
		rc = pgs_fail(err, PGS_ERR_MISUSE, "cannot continue after this chunk",
					  "The chunk ends with rows hidden from the caller, whose keys it does not "
					  "carry.",
					  "Use the cursor returned with the chunk (sync_pull), or pull without "
					  "max_rows.");
		goto close;
	}
	if (memcmp(h.origin, db_site_id(db), PGS_SITE_LEN) != 0)
	{
		rc = pgs_fail(err, PGS_ERR_MISUSE, "payload was not built by this database",
					  "A continuation token can only be made where the chunk was built.", NULL);
		goto close;
	}
	/* the table must be synced here (a payload of this database) */
	if ((rc = db_table_find(db, r.tables[last_table].name, r.tables[last_table].name_len, &t,
							err)) != PGS_OK)
		goto close;
	pgs_token_encode(tok, h.since, h.until, 0, r.tables[last_table].name,
					 r.tables[last_table].name_len, npk, last_pk);
	rc = tok->oom ? pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL) : PGS_OK;
	if (rc == PGS_OK && tok->len > PGS_MAX_TOKEN)
	{
		tok->len = 0;
		rc = pgs_failf(err, PGS_ERR_TOO_BIG, "Pull this table without max_rows.",
					   "primary key too long for a continuation token (limit %d bytes)",
					   PGS_MAX_TOKEN);
	}
close:
	pgs_reader_close(&r);
out:
	pgs_free(owned);
	return rc;
}
