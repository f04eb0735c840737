/*
 * mockdb_int.h — the mock engine's private layout, shared by mockdb.c (the
 * row store, local edits, the database.h functions of the first seam) and
 * mockdb_view.c (views, removals, snapshots and held changes).
 */
#ifndef PGSYNC_MOCKDB_INT_H
#define PGSYNC_MOCKDB_INT_H

#include "mockdb.h"

typedef struct mrow
{
	uint8_t	  *key;
	size_t	   keylen;
	pgs_value *pk; /* npk, owned */
	bool	   alive;
	pgs_value *vals; /* ncols, owned, meaningful when alive */
	bool	   has_clock;
	int64_t	   cl;
	int64_t	   ver;
	uint8_t	  *clk;
	size_t	   clk_len;
} mrow;

typedef struct mrows
{
	mrow *rows;
	int	  nrows;
	int	  cap;
	int	 *hash; /* entry index + 1, 0 = empty */
	int	  hcap; /* power of two */
} mrows;

struct db_table
{
	db_conn		 *db;
	char		 *name;
	db_algo		  algo;
	int			  npk;
	int			  ncols;
	char		**pk_names;
	char		**col_names;
	db_table_info info;
	mrows		  r;
};

typedef struct mdeny
{
	db_table *t;
	uint8_t	 *key;
	size_t	  keylen;
} mdeny;

struct db_conn
{
	uint8_t (*sites)[16];
	uint32_t   nsites;
	uint32_t   sites_cap;
	db_table **tables;
	int		   ntables;
	int64_t	   version;
	int64_t	   txn_ver;
	bool	   in_txn;
	uint64_t   hlc;
	uint64_t   clock_ms;
	int		   rejections;
	mdeny	  *deny;
	int		   ndeny;
	void	  *eph;		  /* memory lent to the core until the next call */
	pgs_buf	   key;		  /* scratch for key encoding */
	bool	   careful;	  /* db_apply_careful */
	int		   forgotten; /* db_row_forget calls that removed a row */
	/* snapshots being received: the keys seen, per table (mockdb_view.c) */
	struct msnap *snaps;
	int			  nsnaps;
	/* held changes: (table name, key) -> fragment */
	struct mheld *held;
	int			  nheld;
	/* sites whose stamps db_site_check refuses, and foreign keys between tables */
	uint8_t (*bad_sites)[16];
	int		   nbad_sites;
	db_table **parent_of; /* pairs: child, parent */
	int		   nparent_of;
	/* rows db_apply_lock announced in the running apply; a row write, delete,
	 * forget or clock write of any other row is an error (mdb_check_locked) */
	db_lock_key *locked;
	uint32_t	 nlocked;
	uint32_t	 locked_cap;
	/* mock_canonical: values stored in forms of the replica's own */
	int	  canonical; /* 0, 1 lower case, 2 upper case */
	bool  forms_any; /* the last db_row_write stored some value differently */
	bool *forms;	 /* ... which (per value of that write) */
	int	  forms_cap;
};

struct db_cursor
{
	db_conn	  *db;
	db_table  *t;
	int64_t	   since;
	int64_t	   until;
	int		   next;
	bool	   by_key; /* chunked: key order, after last */
	bool	   has_last;
	pgs_value *last; /* npk copies: the previous key (by_key) */
	pgs_value *vals; /* npk + ncols copies of the current row */
	uint8_t	  *blob;
	bool	   snapshot; /* every live row, whatever its version */
	bool	   keys;	 /* db_keys_*: live keys only */
};

typedef struct mtable_snap
{
	mrows r;
} mtable_snap;

struct mock_snap
{
	uint8_t (*sites)[16];
	uint32_t	 nsites;
	int64_t		 version;
	int64_t		 txn_ver;
	bool		 in_txn;
	uint64_t	 hlc;
	int			 ntables;
	mtable_snap *tables;
};

void	   *mdb_xmalloc(size_t n);
char	   *mdb_xstrdup(const char *s);
void	   *mdb_xmemdup(const void *p, size_t n);
void		mdb_eph_reset(db_conn *db);
const void *mdb_eph_lend(db_conn *db, const void *p, size_t n);
void		mdb_value_copy(pgs_value *dst, const pgs_value *src);
void		mdb_value_free(pgs_value *v);
bool		mdb_value_ok(const pgs_value *v);
void		mdb_encode_key(db_conn *db, db_table *t, const pgs_value *pk);
mrow	   *mdb_find_row(db_table *t, const pgs_value *pk);
mrow	   *mdb_rows_find(mrows *r, const uint8_t *k, size_t n);
void		mdb_rows_free(db_table *t, mrows *r);
void		mdb_rows_copy(db_table *t, mrows *dst, const mrows *src); /* dst: empty */
mrow	   *mdb_get_row(db_table *t, const pgs_value *pk);
void		mdb_row_clear_vals(db_table *t, mrow *row);
pgs_rc		mdb_check_pk(db_table *t, const pgs_value *pk, pgs_err *err);
/* mdb_check_locked: PGS_ERR_DB unless the running apply announced pk of t. */
pgs_rc	 mdb_check_locked(db_conn *db, db_table *t, const pgs_value *pk, pgs_err *err);
int		 mdb_key_cmp(db_table *t, const pgs_value *a, const pgs_value *b);
int64_t	 mdb_take_version(db_conn *db);
uint64_t mdb_tick(db_conn *db);
uint64_t mdb_now_ms(db_conn *db);

#endif
