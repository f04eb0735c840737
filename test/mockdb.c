/*
 * mockdb.c — the in-memory engine of mockdb.h.
 *
 * Layout: a replica (db_conn) owns its tables; a table owns an array of
 * entries, one per primary key ever seen, found through a small open
 * addressing hash of the encoded key (type byte + payload value encoding per
 * key column, so REAL keys compare by bit pattern). An entry is both the base
 * row (alive + values) and the clock row (cl, ver, blob). Entries are never
 * removed: a deleted row keeps its clock as a tombstone, like the engines.
 *
 * Pointers handed to the core (clock blobs, site ids, cursor rows) are fresh
 * copies freed on the next db_ call, so AddressSanitizer reports a core that
 * keeps one longer than database.h promises.
 */
#include "mockdb.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "mockdb_int.h"

/* ---- small helpers ---- */

void *
mdb_xmalloc(size_t n)
{
	void *p = pgs_malloc(n);

	if (!p)
	{
		fprintf(stderr, "mockdb: out of memory (%zu bytes)\n", n);
		abort();
	}
	return p;
}

char *
mdb_xstrdup(const char *s)
{
	size_t n = strlen(s) + 1;
	char  *d = mdb_xmalloc(n);

	memcpy(d, s, n);
	return d;
}

void *
mdb_xmemdup(const void *p, size_t n)
{
	void *d = mdb_xmalloc(n ? n : 1);

	if (n)
		memcpy(d, p, n);
	return d;
}

void
mdb_eph_reset(db_conn *db)
{
	pgs_free(db->eph);
	db->eph = NULL;
}

const void *
mdb_eph_lend(db_conn *db, const void *p, size_t n)
{
	mdb_eph_reset(db);
	db->eph = mdb_xmemdup(p, n);
	return db->eph;
}

void
mdb_value_copy(pgs_value *dst, const pgs_value *src)
{
	*dst = *src;
	if (src->type == PGS_TEXT || src->type == PGS_BLOB)
		dst->v.p = mdb_xmemdup(src->v.p, src->len);
}

void
mdb_value_free(pgs_value *v)
{
	if (v->type == PGS_TEXT || v->type == PGS_BLOB)
		pgs_free((void *) v->v.p);
	v->type = PGS_NULL;
	v->len = 0;
	v->v.i = 0;
}

bool
mdb_value_ok(const pgs_value *v)
{
	if (v->type > PGS_BLOB)
		return false;
	if ((v->type == PGS_TEXT || v->type == PGS_BLOB) &&
		(v->len > PGS_MAX_VALUE || (v->len && !v->v.p)))
		return false;
	return true;
}

uint64_t
mdb_now_ms(db_conn *db)
{
	return db->clock_ms ? db->clock_ms : pgs_now_ms();
}

/* ---- keys and the row store ---- */

void
mdb_encode_key(db_conn *db, db_table *t, const pgs_value *pk)
{
	db->key.len = 0;
	for (int i = 0; i < t->npk; i++)
	{
		pgs_buf_u8(&db->key, pk[i].type);
		pgs_value_put(&db->key, &pk[i]);
	}
	if (db->key.oom)
		abort();
}

static uint64_t
key_hash(const uint8_t *k, size_t n)
{
	return XXH3_64bits(k, n);
}

static void
rows_rehash(mrows *r, int hcap)
{
	pgs_free(r->hash);
	r->hash = mdb_xmalloc(sizeof(int) * (size_t) hcap);
	memset(r->hash, 0, sizeof(int) * (size_t) hcap);
	r->hcap = hcap;
	for (int i = 0; i < r->nrows; i++)
	{
		uint64_t h = key_hash(r->rows[i].key, r->rows[i].keylen) & (uint64_t) (hcap - 1);

		while (r->hash[h])
			h = (h + 1) & (uint64_t) (hcap - 1);
		r->hash[h] = i + 1;
	}
}

mrow *
mdb_rows_find(mrows *r, const uint8_t *k, size_t n)
{
	uint64_t h;

	if (!r->hcap)
		return NULL;
	h = key_hash(k, n) & (uint64_t) (r->hcap - 1);
	while (r->hash[h])
	{
		mrow *row = &r->rows[r->hash[h] - 1];

		if (row->keylen == n && memcmp(row->key, k, n) == 0)
			return row;
		h = (h + 1) & (uint64_t) (r->hcap - 1);
	}
	return NULL;
}

mrow *
mdb_find_row(db_table *t, const pgs_value *pk)
{
	mdb_encode_key(t->db, t, pk);
	return mdb_rows_find(&t->r, t->db->key.p, t->db->key.len);
}

/* get_row finds or creates the entry of pk (new: dead, no clock). */
mrow *
mdb_get_row(db_table *t, const pgs_value *pk)
{
	mrow  *row = mdb_find_row(t, pk);
	mrows *r = &t->r;

	if (row)
		return row;
	if (r->nrows == r->cap)
	{
		int	  cap = r->cap ? r->cap * 2 : 16;
		mrow *n = pgs_realloc(r->rows, sizeof(mrow) * (size_t) cap);

		if (!n)
			abort();
		r->rows = n;
		r->cap = cap;
	}
	row = &r->rows[r->nrows++];
	memset(row, 0, sizeof *row);
	row->key = mdb_xmemdup(t->db->key.p, t->db->key.len);
	row->keylen = t->db->key.len;
	row->pk = mdb_xmalloc(sizeof(pgs_value) * (size_t) (t->npk ? t->npk : 1));
	for (int i = 0; i < t->npk; i++)
		mdb_value_copy(&row->pk[i], &pk[i]);
	row->vals = mdb_xmalloc(sizeof(pgs_value) * (size_t) (t->ncols ? t->ncols : 1));
	memset(row->vals, 0, sizeof(pgs_value) * (size_t) (t->ncols ? t->ncols : 1));
	if (r->nrows * 2 > r->hcap)
		rows_rehash(r, r->hcap ? r->hcap * 2 : 32);
	else
	{
		uint64_t h = key_hash(row->key, row->keylen) & (uint64_t) (r->hcap - 1);

		while (r->hash[h])
			h = (h + 1) & (uint64_t) (r->hcap - 1);
		r->hash[h] = r->nrows;
	}
	return row;
}

void
mdb_row_clear_vals(db_table *t, mrow *row)
{
	for (int i = 0; i < t->ncols; i++)
		mdb_value_free(&row->vals[i]);
}

void
mdb_rows_free(db_table *t, mrows *r)
{
	for (int i = 0; i < r->nrows; i++)
	{
		mrow *row = &r->rows[i];

		for (int k = 0; k < t->npk; k++)
			mdb_value_free(&row->pk[k]);
		mdb_row_clear_vals(t, row);
		pgs_free(row->pk);
		pgs_free(row->vals);
		pgs_free(row->key);
		pgs_free(row->clk);
	}
	pgs_free(r->rows);
	pgs_free(r->hash);
	memset(r, 0, sizeof *r);
}

void
mdb_rows_copy(db_table *t, mrows *dst, const mrows *src)
{
	memset(dst, 0, sizeof *dst);
	dst->cap = src->nrows ? src->nrows : 1;
	dst->rows = mdb_xmalloc(sizeof(mrow) * (size_t) dst->cap);
	dst->nrows = src->nrows;
	for (int i = 0; i < src->nrows; i++)
	{
		const mrow *s = &src->rows[i];
		mrow	   *d = &dst->rows[i];

		*d = *s;
		d->key = mdb_xmemdup(s->key, s->keylen);
		d->pk = mdb_xmalloc(sizeof(pgs_value) * (size_t) (t->npk ? t->npk : 1));
		for (int k = 0; k < t->npk; k++)
			mdb_value_copy(&d->pk[k], &s->pk[k]);
		d->vals = mdb_xmalloc(sizeof(pgs_value) * (size_t) (t->ncols ? t->ncols : 1));
		memset(d->vals, 0, sizeof(pgs_value) * (size_t) (t->ncols ? t->ncols : 1));
		for (int k = 0; k < t->ncols; k++)
			mdb_value_copy(&d->vals[k], &s->vals[k]);
		d->clk = s->clk ? mdb_xmemdup(s->clk, s->clk_len) : NULL;
	}
	if (src->hcap)
		rows_rehash(dst, src->hcap);
}

/* ---- replicas and tables ---- */

db_conn *
mock_open(const uint8_t site[16])
{
	db_conn *db = mdb_xmalloc(sizeof *db);

	memset(db, 0, sizeof *db);
	db->sites_cap = 4;
	db->sites = mdb_xmalloc(16 * db->sites_cap);
	if (site)
		memcpy(db->sites[0], site, 16);
	else if (pgs_uuid7(db->sites[0], NULL) != PGS_OK)
		abort();
	db->nsites = 1;
	pgs_buf_init(&db->key);
	return db;
}

static void
table_free(db_table *t)
{
	mdb_rows_free(t, &t->r);
	for (int i = 0; i < t->npk; i++)
		pgs_free(t->pk_names[i]);
	for (int i = 0; i < t->ncols; i++)
		pgs_free(t->col_names[i]);
	pgs_free(t->pk_names);
	pgs_free(t->col_names);
	pgs_free(t->name);
	pgs_free(t);
}

void
mock_close(db_conn *db)
{
	if (!db)
		return;
	for (int i = 0; i < db->ntables; i++)
		table_free(db->tables[i]);
	pgs_free(db->tables);
	mock_allow_all(db);
	mock_view_free(db);
	pgs_free(db->sites);
	pgs_free(db->locked);
	pgs_free(db->forms);
	pgs_buf_free(&db->key);
	mdb_eph_reset(db);
	pgs_free(db);
}

db_table *
mock_add_table(db_conn *db, const char *name, db_algo algo, int npk, const char *const *pk_names,
			   int ncols, const char *const *col_names)
{
	db_table *t = mdb_xmalloc(sizeof *t);

	memset(t, 0, sizeof *t);
	t->db = db;
	t->name = mdb_xstrdup(name);
	t->algo = algo;
	t->npk = npk;
	t->ncols = ncols;
	t->pk_names = mdb_xmalloc(sizeof(char *) * (size_t) (npk ? npk : 1));
	t->col_names = mdb_xmalloc(sizeof(char *) * (size_t) (ncols ? ncols : 1));
	for (int i = 0; i < npk; i++)
		t->pk_names[i] = mdb_xstrdup(pk_names[i]);
	for (int i = 0; i < ncols; i++)
		t->col_names[i] = mdb_xstrdup(col_names[i]);
	t->info.name = t->name;
	t->info.algo = algo;
	t->info.npk = npk;
	t->info.ncols = ncols;
	t->info.pk_names = (const char *const *) t->pk_names;
	t->info.col_names = (const char *const *) t->col_names;
	{
		db_table **n = pgs_realloc(db->tables, sizeof(db_table *) * (size_t) (db->ntables + 1));

		if (!n)
			abort();
		db->tables = n;
		db->tables[db->ntables++] = t;
	}
	return t;
}

db_table *
mock_table(db_conn *db, const char *name)
{
	for (int i = 0; i < db->ntables; i++)
		if (strcmp(db->tables[i]->name, name) == 0)
			return db->tables[i];
	return NULL;
}

void
mock_add_std_tables(db_conn *db)
{
	static const char *const items_pk[] = {"id"};
	static const char *const items_cols[] = {"name", "qty", "price", "data"};
	static const char *const tags_pk[] = {"k1", "k2"};
	static const char *const tags_cols[] = {"a", "b"};
	static const char *const log_pk[] = {"id"};
	static const char *const log_cols[] = {"msg"};

	mock_add_table(db, "items", DB_ALGO_CLS, 1, items_pk, 4, items_cols);
	mock_add_table(db, "tags", DB_ALGO_CLS, 2, tags_pk, 2, tags_cols);
	mock_add_table(db, "log", DB_ALGO_GSET, 1, log_pk, 1, log_cols);
}

/* ---- clocks and transactions ---- */

void
mock_set_clock(db_conn *db, uint64_t ms)
{
	db->clock_ms = ms;
}

void
mock_advance(db_conn *db, int64_t ms)
{
	db->clock_ms = (uint64_t) ((int64_t) db->clock_ms + ms);
}

int64_t
mock_version(db_conn *db)
{
	return db->version;
}

uint64_t
mock_hlc(db_conn *db)
{
	return db->hlc;
}

void
mock_begin(db_conn *db)
{
	db->in_txn = true;
	db->txn_ver = 0;
}

void
mock_commit(db_conn *db)
{
	db->in_txn = false;
	db->txn_ver = 0;
}

/* take_version: the version of the open transaction, as sl_txn_version. */
int64_t
mdb_take_version(db_conn *db)
{
	uint64_t now;

	if (db->in_txn && db->txn_ver)
		return db->txn_ver;
	db->version++;
	now = pgs_hlc_from_ms(mdb_now_ms(db));
	db->hlc = db->hlc + 1 > now ? db->hlc + 1 : now;
	if (db->in_txn)
		db->txn_ver = db->version;
	return db->version;
}

uint64_t
mdb_tick(db_conn *db)
{
	db->hlc = pgs_hlc_tick(db->hlc, mdb_now_ms(db));
	return db->hlc;
}

/* ---- database.h ---- */

pgs_rc
db_tables(db_conn *db, db_table ***tables, int *ntables, pgs_err *err)
{
	(void) err;
	mdb_eph_reset(db);
	*tables = db->tables;
	*ntables = db->ntables;
	return PGS_OK;
}

pgs_rc
db_table_find(db_conn *db, const uint8_t *name, size_t len, db_table **out, pgs_err *err)
{
	mdb_eph_reset(db);
	for (int i = 0; i < db->ntables; i++)
		if (strlen(db->tables[i]->name) == len && memcmp(db->tables[i]->name, name, len) == 0)
		{
			*out = db->tables[i];
			return PGS_OK;
		}
	return pgs_failf(err, PGS_ERR_SCHEMA, NULL, "unknown table \"%.*s\" in payload",
					 (int) (len > 200 ? 200 : len), (const char *) name);
}

const db_table_info *
db_table_describe(db_table *t)
{
	return &t->info;
}

const uint8_t *
db_site_id(db_conn *db)
{
	return db->sites[0];
}

pgs_rc
db_site_intern(db_conn *db, const uint8_t site[16], uint32_t *idx, pgs_err *err)
{
	(void) err;
	mdb_eph_reset(db);
	for (uint32_t i = 0; i < db->nsites; i++)
		if (memcmp(db->sites[i], site, 16) == 0)
		{
			*idx = i;
			return PGS_OK;
		}
	if (db->nsites == db->sites_cap)
	{
		void *n = pgs_realloc(db->sites, 16 * (size_t) db->sites_cap * 2);

		if (!n)
			abort();
		db->sites = n;
		db->sites_cap *= 2;
	}
	memcpy(db->sites[db->nsites], site, 16);
	*idx = db->nsites++;
	return PGS_OK;
}

pgs_rc
db_site_lookup(db_conn *db, uint32_t idx, const uint8_t **site, pgs_err *err)
{
	mdb_eph_reset(db);
	if (idx >= db->nsites)
		return pgs_failf(err, PGS_ERR_DB, NULL, "mockdb: unknown site index %u", idx);
	*site = mdb_eph_lend(db, db->sites[idx], 16);
	return PGS_OK;
}

pgs_rc
db_apply_version(db_conn *db, int64_t *ver, pgs_err *err)
{
	(void) err;
	mdb_eph_reset(db);
	*ver = mdb_take_version(db);
	return PGS_OK;
}

/* db_apply_lock: the mock remembers the rows, to refuse writes of others. */
pgs_rc
db_apply_lock(db_conn *db, const db_lock_key *keys, uint32_t n, pgs_err *err)
{
	mdb_eph_reset(db);
	if (db->nlocked + n > db->locked_cap)
	{
		uint32_t	 cap = (db->nlocked + n) * 2;
		db_lock_key *k = pgs_realloc(db->locked, sizeof(db_lock_key) * cap);

		if (!k)
			return pgs_fail(err, PGS_ERR_NOMEM, "mockdb: out of memory", NULL, NULL);
		db->locked = k;
		db->locked_cap = cap;
	}
	for (uint32_t i = 0; i < n; i++)
		if (!keys[i].t)
			return pgs_failf(err, PGS_ERR_DB, NULL, "mockdb: db_apply_lock of a NULL table");
	if (n)
		memcpy(db->locked + db->nlocked, keys, sizeof(db_lock_key) * n);
	db->nlocked += n;
	return PGS_OK;
}

pgs_rc
mdb_check_locked(db_conn *db, db_table *t, const pgs_value *pk, pgs_err *err)
{
	uint64_t h = pgs_key_hash(PGS_LOCK_SALT, (uint32_t) t->npk, pk);

	for (uint32_t i = 0; i < db->nlocked; i++)
		if (db->locked[i].t == t && db->locked[i].hash == h)
			return PGS_OK;
	return pgs_failf(err, PGS_ERR_DB, NULL,
					 "mockdb: row of table \"%s\" written without db_apply_lock", t->name);
}

pgs_rc
db_apply_end(db_conn *db, pgs_err *err)
{
	/* the mock writes through: nothing was deferred */
	(void) err;
	mdb_eph_reset(db);
	db->nlocked = 0; /* the next apply announces its own rows */
	return PGS_OK;
}

pgs_rc
db_hlc_observe(db_conn *db, uint64_t hlc, pgs_err *err)
{
	(void) err;
	mdb_eph_reset(db);
	if (hlc > db->hlc)
		db->hlc = hlc;
	return PGS_OK;
}

pgs_rc
mdb_check_pk(db_table *t, const pgs_value *pk, pgs_err *err)
{
	for (int i = 0; i < t->npk; i++)
		if (pk[i].type == PGS_NULL || !mdb_value_ok(&pk[i]))
			return pgs_failf(err, PGS_ERR_VALUE, NULL, "mockdb: bad key value in table \"%s\"",
							 t->name);
	return PGS_OK;
}

pgs_rc
db_clock_get(db_conn *db, db_table *t, const pgs_value *pk, bool *found, int64_t *cl,
			 const uint8_t **blob, size_t *blob_len, pgs_err *err)
{
	mrow  *row;
	pgs_rc rc;

	mdb_eph_reset(db);
	if ((rc = mdb_check_pk(t, pk, err)) != PGS_OK)
		return rc;
	row = mdb_find_row(t, pk);
	*found = row && row->has_clock;
	if (*found)
	{
		*cl = row->cl;
		*blob = mdb_eph_lend(db, row->clk, row->clk_len);
		*blob_len = row->clk_len;
	}
	return PGS_OK;
}

static pgs_rc
clock_put(db_conn *db, db_table *t, const pgs_value *pk, bool exists, int64_t cl, int64_t ver,
		  const uint8_t *blob, size_t blob_len, pgs_err *err)
{
	mrow		*row;
	pgs_stamp	*stamps;
	pgs_rowclock rc;
	pgs_rc		 r;

	mdb_eph_reset(db);
	if ((r = mdb_check_pk(t, pk, err)) != PGS_OK)
		return r;
	row = mdb_find_row(t, pk);
	if ((row && row->has_clock) != exists)
		return pgs_failf(err, PGS_ERR_DB, NULL,
						 "mockdb: db_clock_put(exists=%d) but the clock row %s", exists,
						 exists ? "is missing" : "exists");
	if (cl <= 0)
		return pgs_failf(err, PGS_ERR_DB, NULL, "mockdb: causal length %lld", (long long) cl);
	/* the blob must decode, and ver must be its largest version */
	stamps = mdb_xmalloc(sizeof(pgs_stamp) * (size_t) (t->ncols + 1));
	rc.ncols = t->ncols;
	rc.cols = stamps;
	r = pgs_rowclock_decode(blob, blob_len, &rc, err);
	if (r == PGS_OK && pgs_rowclock_max_ver(&rc) != ver)
		r = pgs_failf(err, PGS_ERR_DB, NULL,
					  "mockdb: clock ver %lld is not the blob's largest version %lld",
					  (long long) ver, (long long) pgs_rowclock_max_ver(&rc));
	if (r == PGS_OK)
		for (uint32_t i = 0; i < (uint32_t) t->ncols && r == PGS_OK; i++)
			if (stamps[i].hlc && stamps[i].site >= db->nsites)
				r = pgs_failf(err, PGS_ERR_DB, NULL, "mockdb: clock refers to unknown site %u",
							  stamps[i].site);
	if (r == PGS_OK && rc.cl_site >= db->nsites)
		r = pgs_failf(err, PGS_ERR_DB, NULL, "mockdb: clock refers to unknown site %u", rc.cl_site);
	pgs_free(stamps);
	if (r != PGS_OK)
		return r;
	row = mdb_get_row(t, pk);
	pgs_free(row->clk);
	row->clk = mdb_xmemdup(blob, blob_len);
	row->clk_len = blob_len;
	row->cl = cl;
	row->ver = ver;
	row->has_clock = true;
	return PGS_OK;
}

pgs_rc
db_clock_put(db_conn *db, db_table *t, const pgs_value *pk, bool exists, int64_t cl, int64_t ver,
			 const uint8_t *blob, size_t blob_len, pgs_err *err)
{
	pgs_rc r;

	if ((r = mdb_check_pk(t, pk, err)) != PGS_OK ||
		(r = mdb_check_locked(db, t, pk, err)) != PGS_OK)
		return r;
	return clock_put(db, t, pk, exists, cl, ver, blob, blob_len, err);
}

static bool
denied(db_conn *db, db_table *t, const pgs_value *pk)
{
	mdb_encode_key(db, t, pk);
	for (int i = 0; i < db->ndeny; i++)
		if (db->deny[i].t == t && db->deny[i].keylen == db->key.len &&
			memcmp(db->deny[i].key, db->key.p, db->key.len) == 0)
			return true;
	return false;
}

pgs_rc
db_row_write(db_conn *db, db_table *t, const pgs_value *pk, db_write_mode mode, int n,
			 const int *cols, const pgs_value *vals, pgs_err *err)
{
	mrow  *row;
	pgs_rc rc;

	mdb_eph_reset(db);
	db->forms_any = false;
	if ((rc = mdb_check_pk(t, pk, err)) != PGS_OK ||
		(rc = mdb_check_locked(db, t, pk, err)) != PGS_OK)
		return rc;
	if (mode != DB_WRITE_MERGE && mode != DB_WRITE_REPLACE && mode != DB_WRITE_INSERT)
		return pgs_failf(err, PGS_ERR_DB, NULL, "mockdb: write mode %d", (int) mode);
	if (n < 0 || n > t->ncols)
		return pgs_failf(err, PGS_ERR_DB, NULL, "mockdb: row write of %d columns, table has %d", n,
						 t->ncols);
	for (int i = 0; i < n; i++)
	{
		if (cols[i] < 0 || cols[i] >= t->ncols)
			return pgs_failf(err, PGS_ERR_DB, NULL, "mockdb: column index %d out of range",
							 cols[i]);
		for (int k = 0; k < i; k++)
			if (cols[k] == cols[i])
				return pgs_failf(err, PGS_ERR_DB, NULL,
								 "mockdb: column %d written twice in one row write", cols[i]);
		if (!mdb_value_ok(&vals[i]))
			return pgs_failf(err, PGS_ERR_VALUE, NULL, "mockdb: bad value for column %d", cols[i]);
	}
	if (denied(db, t, pk))
		return pgs_failf(err, PGS_ERR_PERMISSION, NULL,
						 "mockdb: permission denied for table \"%s\"", t->name);
	row = mdb_get_row(t, pk);
	if (mode != DB_WRITE_MERGE || !row->alive)
		mdb_row_clear_vals(t, row); /* a new life (or a fresh row): start from NULLs */
	row->alive = true;
	if (db->canonical && n > db->forms_cap)
	{
		pgs_free(db->forms);
		db->forms = mdb_xmalloc(sizeof(bool) * (size_t) n);
		db->forms_cap = n;
	}
	for (int i = 0; i < n; i++)
	{
		pgs_value *v = &row->vals[cols[i]];

		mdb_value_free(v);
		mdb_value_copy(v, &vals[i]);
		if (db->canonical)
		{
			bool differs = false;

			uint8_t from = db->canonical == 1 ? 'A' : 'a', to = db->canonical == 1 ? 'a' : 'A';

			if (v->type == PGS_TEXT)
				for (uint32_t k = 0; k < v->len; k++)
					if (v->v.p[k] >= from && v->v.p[k] <= from + 25)
					{
						((uint8_t *) v->v.p)[k] = (uint8_t) (v->v.p[k] - from + to);
						differs = true;
					}
			if (db->canonical == 1 && v->type == PGS_REAL && v->v.r == 0 && signbit(v->v.r))
			{
				v->v.r = 0.0;
				differs = true;
			}
			db->forms[i] = differs;
			db->forms_any |= differs;
		}
	}
	return PGS_OK;
}

bool
db_row_forms(db_conn *db, int n, bool *differs)
{
	if (!db->forms_any)
		return false;
	memcpy(differs, db->forms, sizeof(bool) * (size_t) n);
	return true;
}

void
mock_canonical(db_conn *db, int mode)
{
	db->canonical = mode;
}

pgs_rc
db_row_delete(db_conn *db, db_table *t, const pgs_value *pk, pgs_err *err)
{
	mrow  *row;
	pgs_rc rc;

	mdb_eph_reset(db);
	if ((rc = mdb_check_pk(t, pk, err)) != PGS_OK ||
		(rc = mdb_check_locked(db, t, pk, err)) != PGS_OK)
		return rc;
	if (denied(db, t, pk))
		return pgs_failf(err, PGS_ERR_PERMISSION, NULL,
						 "mockdb: permission denied for table \"%s\"", t->name);
	row = mdb_find_row(t, pk);
	if (row && row->alive)
	{
		mdb_row_clear_vals(t, row);
		row->alive = false;
	}
	return PGS_OK;
}

void
db_reject(db_conn *db, db_table *t, const pgs_value *pk, const pgs_err *why)
{
	mdb_eph_reset(db);
	(void) t, (void) pk;
	if (getenv("MOCK_DEBUG"))
		fprintf(stderr, "mockdb: reject %s: %s %s\n", t->name, why->code, why->msg);
	db->rejections++;
}

pgs_rc
db_version_safe(db_conn *db, int64_t *until, pgs_err *err)
{
	(void) err;
	mdb_eph_reset(db);
	*until = db->version;
	return PGS_OK;
}

pgs_rc
db_changes_open(db_conn *db, db_table *t, int64_t since, int64_t until, bool by_key,
				const pgs_value *after_pk, db_access access, bool snapshot, db_cursor **cur,
				pgs_err *err)
{
	db_cursor *c;

	(void) err, (void) access;
	mdb_eph_reset(db);
	c = mdb_xmalloc(sizeof *c);
	memset(c, 0, sizeof *c);
	c->db = db;
	c->t = t;
	c->since = since;
	c->until = until;
	c->by_key = by_key;
	c->snapshot = snapshot;
	if (by_key)
	{
		c->last = mdb_xmalloc(sizeof(pgs_value) * (size_t) t->npk);
		if (after_pk)
		{
			for (int i = 0; i < t->npk; i++)
				mdb_value_copy(&c->last[i], &after_pk[i]);
			c->has_last = true;
		}
	}
	*cur = c;
	return PGS_OK;
}

int
mdb_key_cmp(db_table *t, const pgs_value *a, const pgs_value *b)
{
	for (int i = 0; i < t->npk; i++)
	{
		int r = pgs_value_cmp(&a[i], &b[i]);

		if (r)
			return r;
	}
	return 0;
}

static void
cursor_drop_row(db_cursor *c)
{
	if (c->vals)
		for (int i = 0; i < c->t->npk + c->t->ncols; i++)
			mdb_value_free(&c->vals[i]);
	pgs_free(c->vals);
	pgs_free(c->blob);
	c->vals = NULL;
	c->blob = NULL;
}

/* in_cursor: does this cursor enumerate row? */
static bool
in_cursor(const db_cursor *c, const mrow *row)
{
	if (!row->has_clock)
		return false;
	if (c->snapshot || c->keys)
		return row->alive && (row->cl & 1);
	return row->ver > c->since;
}

pgs_rc
db_changes_next(db_cursor *c, bool *done, const pgs_value **pk, int64_t *cl, const uint8_t **blob,
				size_t *blob_len, bool *alive, const pgs_value **cols, db_vis *vis, pgs_err *err)
{
	db_table *t = c->t;

	(void) err;
	*vis = c->snapshot ? DB_VIS_WHOLE : DB_VIS_CHANGES;
	cursor_drop_row(c);
	if (c->by_key)
	{
		/* the smallest key above the last one (O(n) a row: tests only) */
		int best = -1;

		for (int k = 0; k < t->r.nrows; k++)
		{
			mrow *row = &t->r.rows[k];

			if (!in_cursor(c, row))
				continue;
			if (c->has_last && mdb_key_cmp(t, row->pk, c->last) <= 0)
				continue;
			if (best < 0 || mdb_key_cmp(t, row->pk, t->r.rows[best].pk) < 0)
				best = k;
		}
		if (best < 0)
			c->next = t->r.nrows;
		else
		{
			c->next = best;
			for (int i = 0; i < t->npk; i++)
			{
				if (c->has_last)
					mdb_value_free(&c->last[i]);
				mdb_value_copy(&c->last[i], &t->r.rows[best].pk[i]);
			}
			c->has_last = true;
		}
	}
	while (c->next < t->r.nrows)
	{
		mrow *row = &t->r.rows[c->next++];

		/* database.h: every row above since; rows above until are welcome */
		if (!in_cursor(c, row))
			continue;
		c->vals = mdb_xmalloc(sizeof(pgs_value) * (size_t) (t->npk + t->ncols + 1));
		for (int i = 0; i < t->npk; i++)
			mdb_value_copy(&c->vals[i], &row->pk[i]);
		for (int i = 0; i < t->ncols; i++)
		{
			if (row->alive)
				mdb_value_copy(&c->vals[t->npk + i], &row->vals[i]);
			else
				memset(&c->vals[t->npk + i], 0, sizeof(pgs_value));
		}
		c->blob = mdb_xmemdup(row->clk, row->clk_len);
		*done = false;
		*pk = c->vals;
		*cols = c->vals + t->npk;
		*cl = row->cl;
		*blob = c->blob;
		*blob_len = row->clk_len;
		*alive = row->alive;
		return PGS_OK;
	}
	*done = true;
	return PGS_OK;
}

void
db_changes_close(db_cursor *c)
{
	if (!c)
		return;
	cursor_drop_row(c);
	if (c->last)
	{
		if (c->has_last)
			for (int i = 0; i < c->t->npk; i++)
				mdb_value_free(&c->last[i]);
		pgs_free(c->last);
	}
	pgs_free(c);
}

/* ---- local edits ---- */

static pgs_rc
put_local_clock(db_conn *db, db_table *t, const pgs_value *pk, bool exists, pgs_rowclock *rc)
{
	pgs_buf b;
	pgs_err err;
	pgs_rc	r;

	pgs_buf_init(&b);
	pgs_rowclock_encode(rc, &b);
	if (b.oom)
		abort();
	r = clock_put(db, t, pk, exists, rc->cl, pgs_rowclock_max_ver(rc), b.p, b.len, &err);
	pgs_buf_free(&b);
	if (r != PGS_OK)
	{
		fprintf(stderr, "mockdb: local clock write failed: %s\n", err.msg);
		abort();
	}
	return PGS_OK;
}

/*
 * local_edit: the clock change of a local write, by the core's rules
 * (core/local.c), written like the engines write it. PGS_ERR_VALUE when a
 * grow-only table refuses it.
 */
static pgs_rc
local_edit(db_conn *db, db_table *t, const pgs_value *pk, mrow *row, pgs_local_op op,
		   const bool *mask, int64_t ver)
{
	pgs_stamp		*s = mdb_xmalloc(sizeof(pgs_stamp) * (size_t) (t->ncols + 1));
	pgs_rowclock	 rc = {.ncols = t->ncols, .cols = s};
	bool			 found = row && row->has_clock;
	pgs_local_result res;
	pgs_err			 err;

	memset(s, 0, sizeof(pgs_stamp) * (size_t) (t->ncols + 1));
	if (found)
	{
		rc.cl = row->cl;
		if (pgs_rowclock_decode(row->clk, row->clk_len, &rc, &err) != PGS_OK)
			abort();
	}
	res = pgs_local_edit(&rc, found, op, t->algo, mask, ver,
						 op == PGS_LOCAL_DELETE ? 0 : mdb_tick(db));
	if (res == PGS_LOCAL_WRITE)
		put_local_clock(db, t, pk, found, &rc);
	pgs_free(s);
	return res == PGS_LOCAL_GSET ? PGS_ERR_VALUE : PGS_OK;
}

static void
set_row(db_table *t, mrow *row, const pgs_value *vals)
{
	mdb_row_clear_vals(t, row);
	row->alive = true;
	if (vals)
		for (int i = 0; i < t->ncols; i++)
			mdb_value_copy(&row->vals[i], &vals[i]);
}

pgs_rc
mock_local_insert(db_conn *db, db_table *t, const pgs_value *pk, const pgs_value *vals)
{
	bool	autocommit = !db->in_txn;
	pgs_rc	r = PGS_OK;
	int64_t ver;
	mrow   *row;

	mdb_eph_reset(db);
	if (mdb_check_pk(t, pk, NULL) != PGS_OK)
		return PGS_ERR_VALUE;
	row = mdb_find_row(t, pk);
	if (row && row->alive && t->algo == DB_ALGO_GSET)
		return PGS_ERR_VALUE;
	if (autocommit)
		mock_begin(db);
	ver = mdb_take_version(db);
	row = mdb_get_row(t, pk);
	r = local_edit(db, t, pk, row, PGS_LOCAL_INSERT, NULL, ver);
	row = mdb_find_row(t, pk);
	set_row(t, row, vals);
	if (autocommit)
		mock_commit(db);
	return r;
}

pgs_rc
mock_local_update(db_conn *db, db_table *t, const pgs_value *pk, int n, const int *cols,
				  const pgs_value *vals)
{
	bool	autocommit = !db->in_txn;
	bool   *mask;
	int64_t ver;
	mrow   *row;

	mdb_eph_reset(db);
	row = mdb_find_row(t, pk);
	if (!row || !row->alive)
		return PGS_OK;
	if (t->algo == DB_ALGO_GSET)
		return PGS_ERR_VALUE;
	if (autocommit)
		mock_begin(db);
	ver = mdb_take_version(db);
	mask = mdb_xmalloc(sizeof(bool) * (size_t) (t->ncols + 1));
	memset(mask, 0, sizeof(bool) * (size_t) (t->ncols + 1));
	for (int i = 0; i < n; i++)
	{
		int c = cols[i];

		if (c < 0 || c >= t->ncols)
			abort();
		if (pgs_value_cmp(&row->vals[c], &vals[i]) != 0)
			mask[c] = true; /* OLD.c IS NOT NEW.c */
		mdb_value_free(&row->vals[c]);
		mdb_value_copy(&row->vals[c], &vals[i]);
	}
	local_edit(db, t, pk, row, PGS_LOCAL_UPDATE, mask, ver);
	pgs_free(mask);
	if (autocommit)
		mock_commit(db);
	return PGS_OK;
}

pgs_rc
mock_local_delete(db_conn *db, db_table *t, const pgs_value *pk)
{
	bool	autocommit = !db->in_txn;
	int64_t ver;
	mrow   *row;

	mdb_eph_reset(db);
	row = mdb_find_row(t, pk);
	if (!row || !row->alive)
		return PGS_OK;
	if (t->algo == DB_ALGO_GSET)
		return PGS_ERR_VALUE;
	if (autocommit)
		mock_begin(db);
	ver = mdb_take_version(db);
	mdb_row_clear_vals(t, row);
	row->alive = false;
	local_edit(db, t, pk, row, PGS_LOCAL_DELETE, NULL, ver);
	if (autocommit)
		mock_commit(db);
	return PGS_OK;
}

/* ---- inspection ---- */

const pgs_value *
mock_row_get(db_conn *db, db_table *t, const pgs_value *pk)
{
	mrow *row;

	(void) db;
	row = mdb_find_row(t, pk);
	return row && row->alive ? row->vals : NULL;
}

bool
mock_clock(db_conn *db, db_table *t, const pgs_value *pk, pgs_rowclock *out)
{
	mrow *row;

	(void) db;
	row = mdb_find_row(t, pk);
	if (!row || !row->has_clock)
		return false;
	out->ncols = t->ncols;
	if (pgs_rowclock_decode(row->clk, row->clk_len, out, NULL) != PGS_OK)
		abort();
	out->cl = row->cl;
	return true;
}

int
mock_row_count(db_conn *db, db_table *t)
{
	int n = 0;

	(void) db;
	for (int i = 0; i < t->r.nrows; i++)
		n += t->r.rows[i].alive;
	return n;
}

int
mock_clock_count(db_conn *db, db_table *t)
{
	int n = 0;

	(void) db;
	for (int i = 0; i < t->r.nrows; i++)
		n += t->r.rows[i].has_clock;
	return n;
}

uint32_t
mock_site_count(db_conn *db)
{
	return db->nsites;
}

/* ---- permissions ---- */

void
mock_deny(db_conn *db, db_table *t, const pgs_value *pk)
{
	mdeny *n = pgs_realloc(db->deny, sizeof(mdeny) * (size_t) (db->ndeny + 1));

	if (!n)
		abort();
	db->deny = n;
	mdb_encode_key(db, t, pk);
	db->deny[db->ndeny].t = t;
	db->deny[db->ndeny].key = mdb_xmemdup(db->key.p, db->key.len);
	db->deny[db->ndeny].keylen = db->key.len;
	db->ndeny++;
}

void
mock_allow_all(db_conn *db)
{
	for (int i = 0; i < db->ndeny; i++)
		pgs_free(db->deny[i].key);
	pgs_free(db->deny);
	db->deny = NULL;
	db->ndeny = 0;
}

int
mock_rejections(db_conn *db)
{
	return db->rejections;
}

/* ---- payload surgery, values ---- */

void
mock_reseal(uint8_t *p, size_t len)
{
	uint64_t c;

	if (len < PGS_HEADER_LEN)
		return;
	c = XXH3_64bits_withSeed(p + PGS_HEADER_LEN, len - PGS_HEADER_LEN, XXH3_64bits(p, 48));
	for (int i = 0; i < 8; i++)
		p[48 + i] = (uint8_t) (c >> (8 * i));
}

pgs_value
mock_int(int64_t i)
{
	pgs_value v = {.type = PGS_INT};

	v.v.i = i;
	return v;
}

pgs_value
mock_real(double r)
{
	pgs_value v = {.type = PGS_REAL};

	v.v.r = r;
	return v;
}

pgs_value
mock_text(const char *s)
{
	pgs_value v = {.type = PGS_TEXT, .len = (uint32_t) strlen(s)};

	v.v.p = (const uint8_t *) s;
	return v;
}

pgs_value
mock_blob(const void *p, uint32_t len)
{
	pgs_value v = {.type = PGS_BLOB, .len = len};

	v.v.p = len ? p : (const uint8_t *) "";
	return v;
}

pgs_value
mock_null(void)
{
	pgs_value v = {.type = PGS_NULL};

	return v;
}
