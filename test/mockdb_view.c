/*
 * mockdb_view.c — the mock engine's side of views and fates: table views
 * (always full access: the mock has no roles), careful mode, removals
 * (forget), key scans, snapshots being received, held changes, site checks
 * and foreign keys between tables. Layout in mockdb_int.h.
 */
#include "mockdb_int.h"

#include <stdlib.h>
#include <string.h>

typedef struct msnap
{
	db_table *t;
	bool	  active;
	uint8_t **keys; /* encoded keys seen */
	size_t	 *lens;
	int		  n;
} msnap;

typedef struct mheld
{
	char	*table;
	uint8_t *key;
	size_t	 keylen;
	uint8_t *frag;
	size_t	 len;
	char	 code[6];
} mheld;

pgs_rc
db_table_view(db_conn *db, db_table *t, bool view, int64_t since, int64_t until, db_access *access,
			  bool *snapshot, pgs_err *err)
{
	(void) db, (void) t, (void) view, (void) since, (void) until, (void) err;
	*access = DB_ACCESS_FULL;
	*snapshot = false;
	return PGS_OK;
}

void
db_apply_careful(db_conn *db, bool careful)
{
	db->careful = careful;
}

static pgs_rc
forget_row(db_conn *db, db_table *t, const pgs_value *pk, bool *forgot, pgs_err *err)
{
	mrow  *row;
	pgs_rc rc;

	mdb_eph_reset(db);
	*forgot = false;
	if ((rc = mdb_check_pk(t, pk, err)) != PGS_OK)
		return rc;
	row = mdb_find_row(t, pk);
	if (!row || (!row->alive && !row->has_clock))
		return PGS_OK;
	/* entries stay in the store; forgetting clears the row and its clock */
	mdb_row_clear_vals(t, row);
	row->alive = false;
	pgs_free(row->clk);
	row->clk = NULL;
	row->clk_len = 0;
	row->has_clock = false;
	row->cl = 0;
	row->ver = 0;
	db->forgotten++;
	*forgot = true;
	return PGS_OK;
}

/* db_row_forget: the core forgets only rows it announced (db_apply_lock). */
pgs_rc
db_row_forget(db_conn *db, db_table *t, const pgs_value *pk, bool *forgot, pgs_err *err)
{
	pgs_rc rc;

	*forgot = false;
	if ((rc = mdb_check_pk(t, pk, err)) != PGS_OK ||
		(rc = mdb_check_locked(db, t, pk, err)) != PGS_OK)
		return rc;
	return forget_row(db, t, pk, forgot, err);
}

pgs_rc
db_site_check(db_conn *db, uint32_t idx, pgs_err *err)
{
	for (int i = 0; i < db->nbad_sites; i++)
		if (idx < db->nsites && memcmp(db->sites[idx], db->bad_sites[i], 16) == 0)
		{
			pgs_fail(err, PGS_ERR_PERMISSION, "mockdb: change attributed to a refused site", NULL,
					 NULL);
			pgs_err_code(err, PGS_CODE_FOREIGN_SITE);
			return PGS_ERR_PERMISSION;
		}
	return PGS_OK;
}

pgs_rc
db_table_parents(db_conn *db, db_table *t, db_table ***parents, int *n, pgs_err *err)
{
	static db_table *found[16];
	int				 k = 0;

	(void) err;
	for (int i = 0; i + 1 < db->nparent_of && k < 16; i += 2)
		if (db->parent_of[i] == t)
			found[k++] = db->parent_of[i + 1];
	*parents = found;
	*n = k;
	return PGS_OK;
}

void
mock_add_parent(db_conn *db, db_table *child, db_table *parent)
{
	db_table **n = pgs_realloc(db->parent_of, sizeof(db_table *) * (size_t) (db->nparent_of + 2));

	if (!n)
		abort();
	n[db->nparent_of++] = child;
	n[db->nparent_of++] = parent;
	db->parent_of = n;
}

void
mock_refuse_site(db_conn *db, const uint8_t site[16])
{
	uint8_t(*n)[16] = pgs_realloc(db->bad_sites, 16 * (size_t) (db->nbad_sites + 1));

	if (!n)
		abort();
	memcpy(n[db->nbad_sites++], site, 16);
	db->bad_sites = n;
}

pgs_rc
db_keys_open(db_conn *db, db_table *t, db_cursor **cur, pgs_err *err)
{
	db_cursor *c;
	pgs_rc	   rc = db_changes_open(db, t, 0, 0, false, NULL, DB_ACCESS_FULL, false, &c, err);

	if (rc == PGS_OK)
	{
		c->keys = true;
		*cur = c;
	}
	return rc;
}

pgs_rc
db_keys_next(db_cursor *c, bool *done, const pgs_value **pk, int64_t *cl, pgs_err *err)
{
	const uint8_t	*blob;
	size_t			 len;
	bool			 alive;
	const pgs_value *cols;
	db_vis			 vis;

	return db_changes_next(c, done, pk, cl, &blob, &len, &alive, &cols, &vis, err);
}

/* ---- snapshots ---- */

static msnap *
snap_of(db_conn *db, db_table *t)
{
	msnap *n;

	for (int i = 0; i < db->nsnaps; i++)
		if (db->snaps[i].t == t)
			return &db->snaps[i];
	n = pgs_realloc(db->snaps, sizeof(msnap) * (size_t) (db->nsnaps + 1));
	if (!n)
		abort();
	db->snaps = n;
	memset(&n[db->nsnaps], 0, sizeof(msnap));
	n[db->nsnaps].t = t;
	return &n[db->nsnaps++];
}

static void
snap_clear(msnap *s)
{
	for (int i = 0; i < s->n; i++)
		pgs_free(s->keys[i]);
	pgs_free(s->keys);
	pgs_free(s->lens);
	s->keys = NULL;
	s->lens = NULL;
	s->n = 0;
}

static bool
snap_has(const msnap *s, const uint8_t *k, size_t n)
{
	for (int i = 0; i < s->n; i++)
		if (s->lens[i] == n && memcmp(s->keys[i], k, n) == 0)
			return true;
	return false;
}

pgs_rc
db_snapshot(db_conn *db, db_table *t, db_snap_op op, const pgs_value *pk, int64_t *nforgot,
			pgs_err *err)
{
	msnap *s = snap_of(db, t);

	mdb_eph_reset(db);
	switch (op)
	{
		case DB_SNAP_BEGIN:
			snap_clear(s);
			s->active = true;
			return PGS_OK;
		case DB_SNAP_SEEN:
			if (!s->active)
				return PGS_OK;
			mdb_encode_key(db, t, pk);
			if (snap_has(s, db->key.p, db->key.len))
				return PGS_OK;
			s->keys = pgs_realloc(s->keys, sizeof(uint8_t *) * (size_t) (s->n + 1));
			s->lens = pgs_realloc(s->lens, sizeof(size_t) * (size_t) (s->n + 1));
			if (!s->keys || !s->lens)
				abort();
			s->keys[s->n] = mdb_xmemdup(db->key.p, db->key.len);
			s->lens[s->n] = db->key.len;
			s->n++;
			return PGS_OK;
		case DB_SNAP_END:
			if (!s->active)
				return PGS_OK; /* an end without its beginning: forget nothing */
			for (int i = 0; i < t->r.nrows; i++)
			{
				mrow  *row = &t->r.rows[i];
				bool   forgot;
				pgs_rc rc;

				if (!row->alive || snap_has(s, row->key, row->keylen))
					continue;
				if ((rc = forget_row(db, t, row->pk, &forgot, err)) != PGS_OK)
					return rc;
				if (forgot && nforgot)
					(*nforgot)++;
			}
			snap_clear(s);
			s->active = false;
			return PGS_OK;
	}
	return PGS_OK;
}

/* ---- held changes ---- */

static mheld *
held_find(db_conn *db, pgs_name table, pgs_name key)
{
	for (int i = 0; i < db->nheld; i++)
	{
		mheld *h = &db->held[i];

		if (strlen(h->table) == table.len && memcmp(h->table, table.p, table.len) == 0 &&
			h->keylen == key.len && memcmp(h->key, key.p, key.len) == 0)
			return h;
	}
	return NULL;
}

pgs_rc
db_held_get(db_conn *db, pgs_name table, pgs_name key, const uint8_t **frag, size_t *len,
			pgs_err *err)
{
	mheld *h = held_find(db, table, key);

	(void) err;
	mdb_eph_reset(db);
	*frag = NULL;
	*len = 0;
	if (h)
	{
		*frag = mdb_eph_lend(db, h->frag, h->len);
		*len = h->len;
	}
	return PGS_OK;
}

pgs_rc
db_held_put(db_conn *db, pgs_name table, pgs_name key, const char *code, const char *message,
			const uint8_t *frag, size_t len, pgs_err *err)
{
	mheld *h = held_find(db, table, key);

	(void) message, (void) err;
	mdb_eph_reset(db);
	if (!frag)
	{
		if (h)
		{
			pgs_free(h->table);
			pgs_free(h->key);
			pgs_free(h->frag);
			*h = db->held[--db->nheld];
		}
		return PGS_OK;
	}
	if (!h)
	{
		mheld *n = pgs_realloc(db->held, sizeof(mheld) * (size_t) (db->nheld + 1));
		char  *name = mdb_xmalloc(table.len + 1);

		if (!n)
			abort();
		db->held = n;
		h = &n[db->nheld++];
		memcpy(name, table.p, table.len);
		name[table.len] = '\0';
		h->table = name;
		h->key = mdb_xmemdup(key.p, key.len);
		h->keylen = key.len;
		h->frag = NULL;
	}
	pgs_free(h->frag);
	h->frag = mdb_xmemdup(frag, len);
	h->len = len;
	snprintf(h->code, sizeof h->code, "%s", code ? code : "");
	return PGS_OK;
}

int
mock_held_count(db_conn *db)
{
	return db->nheld;
}

/*
 * mock_apply_held re-applies every held change (after a table or column was
 * added): each fragment is removed from the store first and whatever still
 * cannot be stored is held again by the apply.
 */
pgs_rc
mock_apply_held(db_conn *db, pgs_apply_stats *st, pgs_err *err)
{
	int n = db->nheld;

	for (int k = 0; k < n && db->nheld > 0; k++)
	{
		mheld  h = db->held[0];
		pgs_rc rc;

		db->held[0] = db->held[--db->nheld];
		rc = mock_apply(db, h.frag, h.len, st, err);
		pgs_free(h.table);
		pgs_free(h.key);
		pgs_free(h.frag);
		if (rc != PGS_OK)
			return rc;
	}
	return PGS_OK;
}

int
mock_forgotten(db_conn *db)
{
	return db->forgotten;
}

void
mock_view_free(db_conn *db)
{
	for (int i = 0; i < db->nsnaps; i++)
		snap_clear(&db->snaps[i]);
	pgs_free(db->snaps);
	for (int i = 0; i < db->nheld; i++)
	{
		pgs_free(db->held[i].table);
		pgs_free(db->held[i].key);
		pgs_free(db->held[i].frag);
	}
	pgs_free(db->held);
	pgs_free(db->bad_sites);
	pgs_free(db->parent_of);
}

bool
db_hold_rejected(db_conn *db)
{
	(void) db;
	return false;
}

pgs_rc
db_row_read(db_conn *db, db_table *t, const pgs_value *pk, bool *visible, int64_t *cl,
			const uint8_t **blob, size_t *blob_len, const pgs_value **cols, pgs_err *err)
{
	mrow  *row;
	pgs_rc rc;

	mdb_eph_reset(db);
	*visible = false;
	if ((rc = mdb_check_pk(t, pk, err)) != PGS_OK)
		return rc;
	row = mdb_find_row(t, pk);
	if (!row || !row->alive || !row->has_clock || !(row->cl & 1))
		return PGS_OK;
	*visible = true;
	*cl = row->cl;
	*blob = mdb_eph_lend(db, row->clk, row->clk_len);
	*blob_len = row->clk_len;
	*cols = row->vals;
	return PGS_OK;
}

/* db_table_floor: the mock collects nothing, so it refuses no first life. */
pgs_rc
db_table_floor(db_conn *db, db_table *t, int64_t *floor, pgs_err *err)
{
	(void) db, (void) t, (void) err;
	*floor = 0;
	return PGS_OK;
}
