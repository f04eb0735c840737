/*
 * filter.c — make pulls obey row-level security.
 *
 * sync_payload reads every synced row (it runs as the owner of the pgsync
 * metadata, like a replication slot), so the server narrows each pull to
 * the rows the token's role may see:
 *
 *   1. decode the payload with the core reader (it is verified: checksum,
 *      bounds) and collect the key of every live row, per table;
 *   2. for each table with row-level security, as the token's role (a
 *      transaction begun lazily with SET LOCAL ROLE and its claims), ask
 *      which keys it can see:
 *        SELECT v.i FROM unnest($1::text[], ...) WITH ORDINALITY v(k1, ..., i)
 *        WHERE EXISTS (SELECT 1 FROM tbl b WHERE b.pk1 = v.k1::type1 AND ...)
 *      (one query per 5,000 keys); tables without RLS are all-or-nothing by
 *      the role's SELECT privilege (cached metadata, no round trip);
 *   3. re-encode the visible row groups with the same dictionaries, and
 *      zstd-compress when smaller, exactly as core/build.c does.
 *
 * Deletions (even causal length) are always kept: their row is gone, so no
 * policy can be evaluated; they reveal only the key of a deleted row.
 * Rows that later move into a user's visibility arrive with the columns
 * changed since the user's cursor only (a limitation shared with every
 * cursor-based partial sync; see docs/SERVER.md). When every group is kept
 * the original payload is sent untouched.
 */
#include "filter.h"

#include "../core/pgsync.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <zstd.h>

#define BATCH 5000

uint64_t pgs_payload_checksum(const uint8_t *header48, const uint8_t *body, size_t len);

typedef struct tbl
{
	bool	  checked; /* metadata read */
	bool	  all;	   /* every row visible (no RLS) */
	bool	  none;	   /* no row visible (no table, no privilege) */
	char	 *qname;   /* quoted, qualified */
	char	**types;   /* npk type names */
	uint32_t  npk;
	pgs_buf	 *keys;	  /* npk array literals being built */
	uint64_t *groups; /* group index of each key tuple */
	size_t	  nkeys;
	size_t	  cap;
} tbl;

typedef struct ctx
{
	PGconn			*conn;
	const auth_info *a;
	bool			 in_txn; /* begun as the token's role (for checks) */
	pgs_reader		 r;
	tbl				*t;
	uint8_t			*keep; /* per group: 0 drop, 1 keep, 2 pending */
	bool			*broken;
	srv_error		*e;
} ctx;

static bool
oom(srv_error *e)
{
	return srv_fail(e, 500, "internal error", NULL, "Out of memory filtering a pull.");
}

static void
free_tbl(tbl *t)
{
	PQfreemem(t->qname);
	for (uint32_t i = 0; t->types && i < t->npk; i++)
		free(t->types[i]);
	free(t->types);
	for (uint32_t i = 0; t->keys && i < t->npk; i++)
		pgs_buf_free(&t->keys[i]);
	free(t->keys);
	free(t->groups);
}

/* quoted_name turns a payload table name (rel or nsp.rel) into "nsp"."rel". */
static char *
quoted_name(PGconn *conn, const uint8_t *name, uint32_t len)
{
	const uint8_t *dot = memchr(name, '.', len);
	char		  *a, *b = NULL, *out;

	if (!dot)
		return PQescapeIdentifier(conn, (const char *) name, len);
	a = PQescapeIdentifier(conn, (const char *) name, (size_t) (dot - name));
	b = PQescapeIdentifier(conn, (const char *) dot + 1, len - (uint32_t) (dot - name) - 1);
	out = a && b ? malloc(strlen(a) + strlen(b) + 2) : NULL;
	if (out)
		sprintf(out, "%s.%s", a, b);
	PQfreemem(a);
	PQfreemem(b);
	return out;
}

/* array_text builds a text[] literal {"a","b"} from the names of a dictionary. */
static void
array_put(pgs_buf *b, const uint8_t *s, size_t n, bool first)
{
	pgs_buf_put(b, first ? "\"" : ",\"", first ? 1 : 2);
	for (size_t i = 0; i < n; i++)
	{
		if (s[i] == '"' || s[i] == '\\')
			pgs_buf_u8(b, '\\');
		pgs_buf_u8(b, s[i]);
	}
	pgs_buf_u8(b, '"');
}

/*
 * Table metadata (RLS on?, may the role SELECT?, key types) per (role,
 * table) is cached for META_TTL_MS, so that a pull of tables without RLS
 * costs no extra round trip. A GRANT, REVOKE or ENABLE ROW LEVEL SECURITY
 * therefore reaches pulls within that delay.
 */
#define META_TTL_MS 2000
#define META_SLOTS 256

typedef struct meta_slot
{
	char	*key;
	int64_t	 at;
	bool	 all;
	bool	 none;
	uint32_t npk;
	char   **types;
} meta_slot;

static meta_slot	   cache[META_SLOTS];
static pthread_mutex_t cache_mu = PTHREAD_MUTEX_INITIALIZER;

static unsigned
key_hash(const char *k)
{
	unsigned h = 2166136261u;

	for (; *k; k++)
		h = (h ^ (unsigned char) *k) * 16777619u;
	return h % META_SLOTS;
}

/* cache_get copies a fresh entry for key into t; false if none. */
static bool
cache_get(const char *key, tbl *t)
{
	meta_slot *m = &cache[key_hash(key)];
	bool	   hit;

	pthread_mutex_lock(&cache_mu);
	hit = m->key && strcmp(m->key, key) == 0 && srv_now_ms() - m->at < META_TTL_MS &&
		  m->npk == t->npk;
	if (hit)
	{
		t->all = m->all;
		t->none = m->none;
		for (uint32_t i = 0; i < t->npk && m->types; i++)
			if (!(t->types[i] = strdup(m->types[i])))
				hit = false;
	}
	pthread_mutex_unlock(&cache_mu);
	return hit;
}

static void
cache_put(const char *key, const tbl *t)
{
	meta_slot *m = &cache[key_hash(key)];
	char	 **types = t->none ? NULL : calloc(t->npk, sizeof(char *));
	char	  *k = strdup(key);

	for (uint32_t i = 0; types && i < t->npk; i++)
		types[i] = strdup(t->types[i] ? t->types[i] : "text");
	if (!k || (!t->none && !types))
	{
		free(k);
		free(types);
		return;
	}
	pthread_mutex_lock(&cache_mu);
	for (uint32_t i = 0; m->types && i < m->npk; i++)
		free(m->types[i]);
	free(m->types);
	free(m->key);
	m->key = k;
	m->at = srv_now_ms();
	m->all = t->all;
	m->none = t->none;
	m->npk = t->npk;
	m->types = types;
	pthread_mutex_unlock(&cache_mu);
}

/* meta learns whether the table has RLS, whether the token's role may read
 * it, and the types of its key columns (no role switch needed). */
static bool
meta(ctx *c, uint32_t ti)
{
	pgs_dict_table *d = &c->r.tables[ti];
	tbl			   *t = &c->t[ti];
	pgs_buf			names;
	const char	   *vals[3];
	PGresult	   *r;
	char		   *key;

	t->checked = true;
	t->npk = d->npk;
	t->qname = quoted_name(c->conn, d->name, d->name_len);
	t->types = calloc(d->npk ? d->npk : 1, sizeof(char *));
	t->keys = calloc(d->npk ? d->npk : 1, sizeof(pgs_buf));
	if (!t->qname || !t->types || !t->keys)
		return oom(c->e);
	pgs_buf_init(&names);
	pgs_buf_u8(&names, '{');
	for (uint32_t i = 0; i < d->npk; i++)
		array_put(&names, d->pk_names[i], d->pk_name_lens[i], i == 0);
	pgs_buf_put(&names, "}", 2);
	if (names.oom ||
		asprintf(&key, "%s\x1f%s\x1f%s", c->a->role, t->qname, (const char *) names.p) < 0)
	{
		pgs_buf_free(&names);
		return oom(c->e);
	}
	if (cache_get(key, t))
	{
		free(key);
		pgs_buf_free(&names);
		return true;
	}
	vals[0] = t->qname;
	vals[1] = (const char *) names.p;
	vals[2] = c->a->role;
	r = PQexecParams(c->conn,
					 "SELECT c.relrowsecurity, has_table_privilege($3, c.oid, 'SELECT'), "
					 "format_type(a.atttypid, a.atttypmod) "
					 "FROM pg_catalog.pg_class c "
					 "CROSS JOIN unnest($2::text[]) WITH ORDINALITY k(name, ord) "
					 "JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attname = k.name "
					 "WHERE c.oid = pg_catalog.to_regclass($1) ORDER BY k.ord",
					 3, NULL, vals, NULL, NULL, 0);
	pgs_buf_free(&names);
	if (PQresultStatus(r) != PGRES_TUPLES_OK)
	{
		*c->broken = sync_pg_error(c->conn, r, "reading table metadata", c->e);
		PQclear(r);
		free(key);
		return false;
	}
	if (PQntuples(r) != (int) d->npk || d->npk == 0 || PQgetvalue(r, 0, 1)[0] != 't')
		t->none = true; /* dropped table, renamed key, or no SELECT */
	else
	{
		t->all = PQgetvalue(r, 0, 0)[0] != 't';
		for (uint32_t i = 0; i < d->npk; i++)
			if (!(t->types[i] = strdup(PQgetvalue(r, (int) i, 2))))
			{
				PQclear(r);
				free(key);
				return oom(c->e);
			}
	}
	PQclear(r);
	cache_put(key, t);
	free(key);
	return true;
}

/* key_ok: can v travel as the text of an array element? */
static bool
key_ok(const pgs_value *v)
{
	if (v->type == PGS_TEXT)
		return memchr(v->v.p, 0, v->len) == NULL;
	return v->type == PGS_INT || v->type == PGS_REAL || v->type == PGS_BLOB;
}

/* key_put appends pk value v (key_ok) as an element of an array literal. */
static void
key_put(pgs_buf *b, const pgs_value *v, const char *type, bool first)
{
	char tmp[64];

	switch (v->type)
	{
		case PGS_INT:
			snprintf(tmp, sizeof tmp, "%lld", (long long) v->v.i);
			array_put(b, (const uint8_t *) tmp, strlen(tmp), first);
			return;
		case PGS_REAL:
			snprintf(tmp, sizeof tmp, "%.17g", v->v.r);
			array_put(b, (const uint8_t *) tmp, strlen(tmp), first);
			return;
		case PGS_TEXT:
			array_put(b, v->v.p, v->len, first);
			return;
		case PGS_BLOB:
			if (strcmp(type, "uuid") == 0 && v->len == 16)
			{
				pgs_uuid_format(v->v.p, tmp);
				array_put(b, (const uint8_t *) tmp, 36, first);
				return;
			}
			pgs_buf_put(b, first ? "\"\\\\x" : ",\"\\\\x", first ? 4 : 5);
			for (uint32_t i = 0; i < v->len; i++)
			{
				snprintf(tmp, sizeof tmp, "%02x", v->v.p[i]);
				pgs_buf_put(b, tmp, 2);
			}
			pgs_buf_u8(b, '"');
			return;
		default:
			return;
	}
}

/* check runs the visibility query for the pending keys of table ti. */
static bool
check(ctx *c, uint32_t ti)
{
	tbl			   *t = &c->t[ti];
	pgs_dict_table *d = &c->r.tables[ti];
	pgs_buf			sql;
	const char	  **vals;
	PGresult	   *r;
	bool			ok = true;
	char			num[32];

	if (t->nkeys == 0)
		return true;
	pgs_buf_init(&sql);
	pgs_buf_put(&sql, "SELECT v.i FROM unnest(", 23);
	for (uint32_t i = 0; i < t->npk; i++)
	{
		snprintf(num, sizeof num, "%s$%u::text[]", i ? ", " : "", i + 1);
		pgs_buf_put(&sql, num, strlen(num));
	}
	pgs_buf_put(&sql, ") WITH ORDINALITY v(", 20);
	for (uint32_t i = 0; i < t->npk; i++)
	{
		snprintf(num, sizeof num, "k%u, ", i);
		pgs_buf_put(&sql, num, strlen(num));
	}
	pgs_buf_put(&sql, "i) WHERE EXISTS (SELECT 1 FROM ", 31);
	pgs_buf_put(&sql, t->qname, strlen(t->qname));
	pgs_buf_put(&sql, " b WHERE ", 9);
	for (uint32_t i = 0; i < t->npk; i++)
	{
		char *col = PQescapeIdentifier(c->conn, (const char *) d->pk_names[i], d->pk_name_lens[i]);

		if (!col)
		{
			pgs_buf_free(&sql);
			return oom(c->e);
		}
		if (i)
			pgs_buf_put(&sql, " AND ", 5);
		pgs_buf_put(&sql, "b.", 2);
		pgs_buf_put(&sql, col, strlen(col));
		snprintf(num, sizeof num, " = v.k%u::", i);
		pgs_buf_put(&sql, num, strlen(num));
		pgs_buf_put(&sql, t->types[i], strlen(t->types[i]));
		PQfreemem(col);
	}
	pgs_buf_put(&sql, ")", 2);
	vals = calloc(t->npk, sizeof(char *));
	for (uint32_t i = 0; vals && i < t->npk; i++)
	{
		pgs_buf_put(&t->keys[i], "}", 2);
		vals[i] = (const char *) t->keys[i].p;
		ok &= !t->keys[i].oom;
	}
	if (!vals || sql.oom || !ok)
	{
		free(vals);
		pgs_buf_free(&sql);
		return oom(c->e);
	}
	if (!c->in_txn)
	{
		bool retry = false;

		/* RLS is evaluated as the token's role, with its claims */
		if (!sync_begin_as(c->conn, c->a, c->broken, &retry, c->e))
		{
			free(vals);
			pgs_buf_free(&sql);
			return false;
		}
		c->in_txn = true;
	}
	r = PQexecParams(c->conn, (const char *) sql.p, (int) t->npk, NULL, vals, NULL, NULL, 0);
	free(vals);
	pgs_buf_free(&sql);
	if (PQresultStatus(r) != PGRES_TUPLES_OK)
	{
		*c->broken = sync_pg_error(c->conn, r, "checking row visibility", c->e);
		PQclear(r);
		return false;
	}
	for (size_t i = 0; i < t->nkeys; i++)
		c->keep[t->groups[i]] = 0;
	for (int row = 0; row < PQntuples(r); row++)
	{
		long long k = strtoll(PQgetvalue(r, row, 0), NULL, 10);

		if (k >= 1 && (size_t) k <= t->nkeys)
			c->keep[t->groups[k - 1]] = 1;
	}
	PQclear(r);
	for (uint32_t i = 0; i < t->npk; i++)
	{
		t->keys[i].len = 0;
		pgs_buf_u8(&t->keys[i], '{');
	}
	t->nkeys = 0;
	return true;
}

/* collect decides each group: keep deletions, queue live rows for check. */
static bool
collect(ctx *c, uint64_t gi, const pgs_group *g)
{
	tbl *t = &c->t[g->table];

	if (!(g->cl & 1))
	{
		c->keep[gi] = 1;
		return true;
	}
	if (!t->checked && !meta(c, g->table))
		return false;
	if (t->all || t->none)
	{
		c->keep[gi] = t->all;
		return true;
	}
	if (t->nkeys == t->cap)
	{
		size_t	  cap = t->cap ? t->cap * 2 : 256;
		uint64_t *n = realloc(t->groups, cap * sizeof(uint64_t));

		if (!n)
			return oom(c->e);
		t->groups = n;
		t->cap = cap;
	}
	if (t->nkeys == 0)
		for (uint32_t i = 0; i < t->npk; i++)
		{
			t->keys[i].len = 0;
			pgs_buf_u8(&t->keys[i], '{');
		}
	for (uint32_t i = 0; i < t->npk; i++)
		if (!key_ok(&g->pk[i]))
		{
			c->keep[gi] = 0; /* a key no SQL text can carry: invisible */
			return true;
		}
	for (uint32_t i = 0; i < t->npk; i++)
		key_put(&t->keys[i], &g->pk[i], t->types[i], t->nkeys == 0);
	c->keep[gi] = 2;
	t->groups[t->nkeys++] = gi;
	return t->nkeys < BATCH || check(c, g->table);
}

static void
put_str(pgs_buf *b, const uint8_t *s, uint32_t n)
{
	pgs_buf_varint(b, n);
	pgs_buf_put(b, s, n);
}

static void
put_group(pgs_buf *b, const pgs_group *g, uint32_t npk, uint64_t *prev_hlc)
{
	uint64_t ghlc;
	uint32_t gsite;
	int64_t	 prev_col = -1;

	pgs_buf_varint(b, g->table);
	for (uint32_t i = 0; i < npk; i++)
	{
		pgs_buf_u8(b, g->pk[i].type);
		pgs_value_put(b, &g->pk[i]);
	}
	pgs_buf_varint(b, (uint64_t) g->cl);
	pgs_buf_varint(b, g->cl_site);
	pgs_buf_varint(b, g->nchanges);
	if (g->nchanges == 0)
		return;
	ghlc = g->changes[0].hlc;
	gsite = g->changes[0].site;
	pgs_buf_svarint(b, (int64_t) (ghlc - *prev_hlc));
	*prev_hlc = ghlc;
	pgs_buf_varint(b, gsite);
	for (uint32_t k = 0; k < g->nchanges; k++)
	{
		const pgs_change *ch = &g->changes[k];
		bool			  own = ch->hlc != ghlc || ch->site != gsite;
		int64_t			  delta = (int64_t) ch->col - prev_col - 1;

		pgs_buf_u8(b, (uint8_t) (ch->value.type | (own ? 8 : 0) | (delta < 15 ? delta : 15) << 4));
		if (own)
		{
			pgs_buf_svarint(b, (int64_t) (ch->hlc - ghlc));
			pgs_buf_varint(b, ch->site);
		}
		if (delta >= 15)
			pgs_buf_varint(b, ch->col);
		pgs_value_put(b, &ch->value);
		prev_col = ch->col;
	}
}

static void
put_le(uint8_t *p, uint64_t v, int n)
{
	for (int i = 0; i < n; i++)
		p[i] = (uint8_t) (v >> (8 * i));
}

/* encode writes header + (compressed) body of the kept groups into out. */
static bool
encode(ctx *c, const pgs_header *h, const uint8_t *body, size_t blen, uint64_t kept,
	   filter_result *out)
{
	pgs_reader r;
	pgs_buf	   b;
	pgs_err	   err;
	uint64_t   prev = 0, gi = 0;
	uint8_t	  *p;
	size_t	   stored;
	uint8_t	   flags = 0;

	pgs_buf_init(&b);
	if (pgs_reader_open(&r, body, blen, &err) != PGS_OK)
		return srv_fail(c->e, 500, "internal error", NULL, "Re-reading the payload failed: %s",
						err.msg);
	pgs_buf_varint(&b, r.nsites);
	pgs_buf_put(&b, r.sites, (size_t) r.nsites * PGS_SITE_LEN);
	pgs_buf_varint(&b, r.ntables);
	for (uint32_t t = 0; t < r.ntables; t++)
	{
		pgs_dict_table *d = &r.tables[t];

		put_str(&b, d->name, d->name_len);
		pgs_buf_varint(&b, d->npk);
		pgs_buf_varint(&b, d->ncols);
		for (uint32_t i = 0; i < d->npk; i++)
			put_str(&b, d->pk_names[i], d->pk_name_lens[i]);
		for (uint32_t i = 0; i < d->ncols; i++)
			put_str(&b, d->col_names[i], d->col_name_lens[i]);
	}
	pgs_buf_varint(&b, kept);
	for (;;)
	{
		pgs_group g;
		bool	  done;

		if (pgs_reader_next(&r, &g, &done, &err) != PGS_OK)
		{
			pgs_reader_close(&r);
			pgs_buf_free(&b);
			return srv_fail(c->e, 500, "internal error", NULL, "Re-reading the payload failed: %s",
							err.msg);
		}
		if (done)
			break;
		if (c->keep[gi++] == 1)
			put_group(&b, &g, r.tables[g.table].npk, &prev);
	}
	pgs_reader_close(&r);
	if (b.oom || !(p = malloc(56 + ZSTD_compressBound(b.len))))
	{
		pgs_buf_free(&b);
		return oom(c->e);
	}
	stored = b.len;
	if (b.len >= 128)
	{
		size_t z = ZSTD_compress(p + 56, ZSTD_compressBound(b.len), b.p, b.len, 1);

		if (!ZSTD_isError(z) && z < b.len)
		{
			flags = 1;
			stored = z;
		}
	}
	if (!flags)
		memcpy(p + 56, b.p, b.len);
	memcpy(p, PGS_PAYLOAD_MAGIC, 4);
	p[4] = PGS_PAYLOAD_VERSION;
	p[5] = flags | (h->flags & 2); /* keep "more follows" */
	p[6] = p[7] = 0;
	memcpy(p + 8, h->origin, 16);
	put_le(p + 24, (uint64_t) h->since, 8);
	put_le(p + 32, (uint64_t) h->until, 8);
	put_le(p + 40, b.len, 4);
	put_le(p + 44, stored, 4);
	put_le(p + 48, pgs_payload_checksum(p, p + 56, stored), 8);
	pgs_buf_free(&b);
	out->payload = p;
	out->len = 56 + stored;
	return true;
}

bool
filter_payload(PGconn *conn, const auth_info *a, const uint8_t *p, size_t len, filter_result *out,
			   bool *broken, srv_error *e)
{
	ctx			   c = {.conn = conn, .a = a, .broken = broken, .e = e};
	pgs_header	   h;
	const uint8_t *body;
	uint8_t		  *owned = NULL;
	pgs_err		   err;
	uint64_t	   gi = 0, kept = 0;
	bool		   ok = false;

	memset(out, 0, sizeof *out);
	if (pgs_payload_body(p, len, &h, &body, &owned, &err) != PGS_OK ||
		pgs_reader_open(&c.r, body, h.body_len, &err) != PGS_OK)
	{
		pgs_reader_close(&c.r);
		if (owned)
			pgs_free(owned);
		return srv_fail(e, 500, "internal error", NULL,
						"sync_payload returned an unreadable payload: %s", err.msg);
	}
	c.t = calloc(c.r.ntables ? c.r.ntables : 1, sizeof(tbl));
	c.keep = malloc(c.r.nrows ? c.r.nrows : 1);
	if (!c.t || !c.keep)
	{
		oom(e);
		goto out;
	}
	for (;;)
	{
		pgs_group g;
		bool	  done;

		if (pgs_reader_next(&c.r, &g, &done, &err) != PGS_OK)
		{
			srv_fail(e, 500, "internal error", NULL,
					 "sync_payload returned an unreadable payload: %s", err.msg);
			goto out;
		}
		if (done)
			break;
		if (!collect(&c, gi++, &g))
			goto out;
	}
	for (uint32_t t = 0; t < c.r.ntables; t++)
		if (!check(&c, t))
			goto out;
	for (uint64_t i = 0; i < gi; i++)
		kept += c.keep[i] == 1;
	out->kept = (int64_t) kept;
	out->dropped = (int64_t) (gi - kept);
	if (kept == gi)
		ok = true; /* nothing hidden: send the original */
	else
	{
		out->changed = true;
		ok = kept == 0 || encode(&c, &h, body, h.body_len, kept, out);
	}
out:
	out->in_txn = c.in_txn;
	for (uint32_t t = 0; c.t && t < c.r.ntables; t++)
		free_tbl(&c.t[t]);
	pgs_reader_close(&c.r);
	free(c.t);
	free(c.keep);
	if (owned)
		pgs_free(owned);
	return ok;
}
