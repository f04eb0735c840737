/*
 * pg_internal.h — private declarations shared by the files of the pgsync
 * PostgreSQL extension.
 *
 *   pgsync.c       SQL-callable functions, allocator hooks, the error mapper,
 *                  rejection log, per-call state
 *   pg_table.c     the synced-table cache (metadata, prepared plans),
 *                  sync_init / sync_cleanup internals
 *   pg_database.c  the database.h seam used by core/ (apply and build)
 *   pg_capture.c   the row trigger that records local edits in clock tables
 *   pg_types.c     mapping between Postgres Datums and core pgs_values
 *   pg_lock.c      concurrent applies: row locks in one order, giving way to
 *                  local writers, waiting between attempts
 *
 * Metadata (pgsync.*, clock tables) is always read and written as the owner
 * of the pgsync schema objects ("meta owner"), the way RI triggers switch to
 * the table owner; base tables are written with the caller's rights, so
 * privileges and row-level security apply to sync_apply_payload.
 */
#ifndef PGSYNC_PG_INTERNAL_H
#define PGSYNC_PG_INTERNAL_H

#include "postgres.h"

#include "pg_compat.h"

#include "access/transam.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "storage/lock.h"
#include "utils/hsearch.h"

#include "../database.h"

/* How a Postgres type maps to payload values (see docs/TYPES.md). */
typedef enum pgsync_kind
{
	PGK_INT2,
	PGK_INT4,
	PGK_INT8,
	PGK_FLOAT4,
	PGK_FLOAT8,
	PGK_NUMERIC,
	PGK_TEXT, /* text, varchar, bpchar */
	PGK_BYTEA,
	PGK_BOOL,
	PGK_UUID,
	PGK_DATE,
	PGK_TIMESTAMP,
	PGK_TIMESTAMPTZ,
	PGK_JSON,
	PGK_JSONB,
	PGK_OTHER /* any other type: its text form */
} pgsync_kind;

typedef struct pgsync_col
{
	char	   *name;
	AttrNumber	attnum; /* in the base table */
	Oid			typid;	/* declared type (maybe a domain) */
	int32		typmod;
	Oid			coll;	 /* column collation (InvalidOid if none) */
	Oid			basetyp; /* domain base type */
	pgsync_kind kind;
	bool		isdomain;
	int16		typlen;
	bool		typbyval;
	Oid			typinput;
	Oid			typioparam;
	Oid			typoutput;
	bool		text_fast; /* text-like without typmod: no input call */
	FmgrInfo	infn;	   /* input function, set up lazily */
	bool		infn_ok;
} pgsync_col;

/* A merge-write plan for one set of columns. */
typedef struct pgsync_merge_plan
{
	char	   key[64];	 /* hash key: hex of the column bitmap (prefix) */
	char	  *cols_key; /* full key when longer than 63 chars */
	SPIPlanPtr upd;
	SPIPlanPtr ins;
} pgsync_merge_plan;

/*
 * struct db_table: one synced table, cached per backend in CacheMemoryContext
 * and rebuilt when a relcache invalidation for the base or clock table
 * arrives (entries in use are not freed until the transaction ends).
 */
struct db_table
{
	Oid			  relid; /* hash key */
	bool		  valid;
	int			  busy; /* calls using it in this transaction */
	MemoryContext cxt;	/* owns everything below except plans */
	Oid			  clock_relid;
	Oid			  meta_relid; /* pgsync.tables when loaded: dropping it drops the entry */
	char		 *name;		  /* payload name: rel, or nsp.rel */
	char		 *q_base;	  /* quoted, qualified */
	char		 *q_clock;
	db_algo		  algo;
	int			  npk;
	int			  ncols;
	pgsync_col	 *pk;
	pgsync_col	 *cols;
	const char	**pk_names;
	const char	**col_names;
	db_table_info info;
	Oid			 *pk_types;	 /* npk */
	Oid			 *row_types; /* npk + ncols: pk then columns */
	/* plans (SPI_keepplan) */
	SPIPlanPtr p_clock_get;
	SPIPlanPtr p_clock_upsert;
	SPIPlanPtr p_clock_insnew;
	SPIPlanPtr p_clock_cas;
	SPIPlanPtr p_row_replace;
	SPIPlanPtr p_row_delete;
	SPIPlanPtr p_read[8][3]; /* pgsync_plan_read(kind, order): PGR_NKINDS kinds */
	SPIPlanPtr p_probe_base;
	SPIPlanPtr p_probe_clock;
	SPIPlanPtr p_row_exists;
	HTAB	  *merge_plans;
	int		   nmerge_plans;
	/* tombstone GC (pg_gc.c): the largest cl collected, read under the clock lock */
	int64 gc_floor;
	bool  gc_floor_known;
	/* capture: the clock blob of a fresh row in the current transaction */
	FullTransactionId fresh_xid;
	uint8_t			 *fresh_blob;
	size_t			  fresh_len;
	bytea			 *fresh_bytea; /* the same as a bytea (in cxt) */
	/* capture fast path: direct heap + index insert into the clock table */
	int				   direct_state; /* 0 unknown, 1 usable, -1 not */
	Oid				   pk_index;
	int				   nindexes;
	RegProcedure	  *eq_proc; /* npk, equality of the clock key index */
	Oid				  *eq_coll;
	struct IndexInfo **index_info; /* per index of the clock table, list order */
};

/* Per-call state handed to the core as its db_conn. */
struct db_conn
{
	MemoryContext cxt;
	uint64		  call_id;
	uint8_t		  site[PGS_SITE_LEN];
	Oid			  sites_relid; /* pgsync.sites, what the backend's site caches belong to */
	bool		  have_ver;
	int64_t		  ver;
	HTAB		 *by_idx;
	HTAB		 *by_site;
	db_table	**tables;
	int			  ntables;
	bool		  tables_loaded;
	int64_t		  rejected;
	bool		  careful; /* db_apply_careful: isolate every row write */
	/* the clock row db_clock_get read last (for the compare-and-set) */
	bool	last_found;
	int64_t last_cl;
	bytea  *last_blob;
	size_t	last_cap;
	/* pg_lock.c: > 0 inside sync_apply_payload's retry loop: lock waits of
	 * the merge last at most this long, and a row being written by another
	 * transaction makes the apply give way */
	int					 lock_wait_ms;
	struct pgsync_locks *locks; /* what db_apply_lock took in this attempt */
	/* db_row_forms: which values of the last row write were stored in another form */
	bool *forms;
	int	  forms_cap;
	bool  forms_any;
};

/* ---- pgsync.c ---- */
extern int	pgsync_record_interval; /* pgsync.record_interval, seconds (pgsync.c) */
extern bool pgsync_applying;		/* true while sync_apply_payload merges */
/* the row the apply is writing now (its clock is the apply's): the capture
 * skips exactly that row, and records what the write causes elsewhere
 * (ON DELETE CASCADE, triggers writing other synced rows) */
extern Oid	  pgsync_apply_relid;
extern Datum *pgsync_apply_key;
extern bool	  pgsync_apply_conflict; /* a local write raced with the apply */
void		  pgsync_core_memory(MemoryContext cxt);
void		  pgsync_session_setup(void); /* _PG_init: the core allocates through palloc */

/* one row the running apply refused (sync_rejections()) */
typedef struct pgsync_rejection
{
	char *table;
	char *pk_json;
	char  sqlstate[6];
	char *message;
} pgsync_rejection;
void  pgsync_reject_reset(void);
List *pgsync_rejections(void);
void  pgsync_conn_init(db_conn *db, MemoryContext cxt);
Oid	  pgsync_meta_relid(const char *name);
void  pgsync_reject_add(const char *table, const char *pk_json, const char *sqlstate,
						const char *message);
Oid	  pgsync_meta_owner(void);
/* pg_gc.c */
int64 pgsync_gc_lock_floor(db_table *t);
int64 pgsync_gc_life(db_table *t, bool del);
void  pgsync_gc_check_since(int64 since);

pg_noreturn void pgsync_raise(const pgs_err *err);
void			 pgsync_capture_backfill(Oid relid); /* clocks for a new synced table's rows */
void pgsync_pk_list(StringInfo b, const db_table *t, const char *alias); /* "k1", "k2" */
void pgsync_payload_guard(void);	   /* ERROR in a transaction that changed synced rows */
bool pgsync_row_error(int sqlerrcode); /* an error that is one row's own fate */

typedef struct pgsync_user_save
{
	Oid user;
	int sec;
} pgsync_user_save;
SPIPlanPtr pgsync_plan_keep(const char *sql, int nargs, Oid *types);
void	   pgsync_as_meta(pgsync_user_save *s);
void	   pgsync_as_caller(const pgsync_user_save *s);

/* ---- pg_table.c ---- */
db_table *pgsync_table_get(Oid relid, bool missing_ok);
db_table *pgsync_table_cached(Oid relid);
void	  pgsync_table_release_all(void);
/* pgsync_pk_datums: a key's values as Datums of the table's key types (extra slots after) */
Datum *pgsync_pk_datums(db_table *t, const pgs_value *pk, int extra);
/* pgsync_text_array_elem: element i of a text[] Datum (NULL past the end); *n its length */
char *pgsync_text_array_elem(Datum arr, int i, int *n);
/* pgsync_table_init: sync_init's metadata and triggers; true for a table synced
 * now (its rows need clocks: pgsync_capture_backfill), false when it was already. */
bool pgsync_table_init(Oid relid, db_algo algo, Oid func_nsp, const char *want_name,
					   bool allow_seq_keys);
void pgsync_table_reload(Oid relid);
/* pgsync_table_reconcile: after ALTER TABLE of a synced table (the DDL event trigger) */
void			   pgsync_table_reconcile(Oid relid);
void			   pgsync_table_cleanup(Oid relid);
int				   pgsync_table_list(Oid **relids);
Oid				   pgsync_table_by_name(const char *name, size_t len);
pgsync_merge_plan *pgsync_table_merge_plan(db_table *t, int n, const int *cols);
void			   pgsync_table_cache_setup(void);
SPIPlanPtr		   pgsync_plan_clock_get(db_table *t);
SPIPlanPtr		   pgsync_plan_clock_upsert(db_table *t);
SPIPlanPtr		   pgsync_plan_clock_insnew(db_table *t);
SPIPlanPtr		   pgsync_plan_clock_cas(db_table *t);
SPIPlanPtr		   pgsync_plan_row_replace(db_table *t);
SPIPlanPtr		   pgsync_plan_row_delete(db_table *t);
/*
 * What a build or a key scan reads (pgsync_plan_read). Parameters: $1 since,
 * $2 until, then the npk key values of "after" (order 2), then (the _IN
 * kinds) one array of keys per key column.
 */
typedef enum pgsync_read_kind
{
	PGR_CHANGES = 0,	  /* clock rows with ver > $1 joined to their base row */
	PGR_SNAPSHOT = 1,	  /* every clock row (tombstones too) joined to its base row */
	PGR_CLOCKS = 2,		  /* clock rows with ver > $1 only (RLS: rows probed as the caller) */
	PGR_BASE = 3,		  /* base rows only, read as the caller (RLS snapshot) */
	PGR_KEYS = 4,		  /* keys of live clock rows */
	PGR_CHANGED_KEYS = 5, /* keys of clock rows with ver > $1, at most PG_KEYED_MAX + 1 */
	PGR_CHANGES_IN = 6,	  /* PGR_CHANGES of the keys in the arrays */
	PGR_CLOCKS_IN = 7	  /* PGR_CLOCKS of the keys in the arrays */
} pgsync_read_kind;
#define PGR_NKINDS 8 /* the size of db_table.p_read */
/* an incremental pull of at most this many rows of a table reads them by key */
#define PG_KEYED_MAX 10000
SPIPlanPtr pgsync_plan_read(db_table *t, pgsync_read_kind kind,
							int order); /* 0 any, 1 key, 2 after */
/* pgsync_plan_probe: the base rows (as the caller) or clock rows (as the metadata
 * owner) of the keys in arrays $1.. (one per key column). */
SPIPlanPtr pgsync_plan_probe(db_table *t, bool clock);
SPIPlanPtr pgsync_plan_row_exists(db_table *t);

/* ---- pg_lock.c ---- */
/* an apply of more rows than this locks their tables instead of the rows */
#define PG_LOCK_ROWS_MAX 64
/* how long an apply that holds rows may wait for a lock */
#define PG_LOCK_WAIT_MS 1
/* why the running attempt gave way: what to wait for before the next one */
typedef struct pgsync_yield
{
	bool		  armed; /* our lock_timeout is in effect (db_apply_lock) */
	bool		  set;
	TransactionId xid; /* a transaction writing a row the apply writes */
	bool		  have_tag;
	LOCKTAG		  tag; /* or another apply's lock on a row found late */
	LOCKMODE	  tag_mode;
} pgsync_yield;
extern pgsync_yield pgsync_apply_yield;
void				pgsync_lock_row(db_conn *db, db_table *t, const pgs_value *pk);
void				pgsync_lock_clock(db_table *t, const pgs_value *pk);
void				pgsync_apply_wait(int round);
void				pgsync_apply_yield_reset(void);

/* ---- pg_types.c ---- */
pgsync_kind pgsync_type_kind(Oid basetyp);
const char *pgsync_kind_name(pgsync_kind k);
bool		pgsync_kind_pk_ok(pgsync_kind k);
void		pgsync_col_setup(pgsync_col *c, Oid typid, int32 typmod);
void		pgsync_datum_value(pgsync_col *c, Datum d, bool isnull, pgs_value *out);
Datum		pgsync_value_datum(pgsync_col *c, const pgs_value *v, bool *isnull, db_table *t,
							   const pgs_value *pk);
bool		pgsync_form_differs(pgsync_col *c, const pgs_value *v, Datum d, bool isnull);
bool		pgsync_key_canonical(db_table *t, const pgs_value *pk, const Datum *d);
void		pgsync_key_forms(db_table *t, const pgs_value *pk, const Datum *d);
/* pgsync_bytea: a bytea copy of len bytes at p, allocated in cxt. */
bytea *pgsync_bytea(MemoryContext cxt, const void *p, size_t len);
char  *pgsync_pk_json(db_table *t, const pgs_value *pk);
char  *pgsync_pk_text(db_table *t, const pgs_value *pk);

/* ---- pg_view.c ---- */
extern bool	   pgsync_have_device; /* sync_device was called in this transaction */
extern uint8_t pgsync_cur_device[PGS_SITE_LEN];
extern char	   pgsync_cur_principal[256];
void		   pgsync_device_reset(void);
void		   pgsync_vis_bump(Oid relid);
bool		   pgsync_vis_changed_in(Oid relid, int64 since, int64 until);
void		   pgsync_watch_refresh(Oid relid);
db_access	   pgsync_table_access(db_table *t);
bytea		  *pgsync_cursor_seal(MemoryContext cxt, const uint8_t *tok, size_t len);
uint8_t		  *pgsync_cursor_open(const uint8_t *p, size_t len, size_t *tok_len);

/* ---- pg_changes.c ---- */
void pgsync_changes_setup(void);

/* ---- pg_capture.c ---- */
extern FullTransactionId pgsync_wrote_xid;
int64_t					 pgsync_txn_version(void);
uint64_t				 pgsync_txn_tick(void);
void					 pgsync_hlc_observe(uint64_t hlc);
uint64_t				 pgsync_hlc_floor(void);
void					 pgsync_capture_fresh(db_table *t, uint8_t **blob, size_t *len);
bool					 pgsync_clock_direct(db_table *t);
int						 pgsync_clock_lookup_direct(db_table *t, Datum *pk, int64 *cl, bytea **clk);
bool pgsync_clock_insert_direct(db_table *t, Datum *pk, int64 cl, int64 ver, bytea *clk);

#endif /* PGSYNC_PG_INTERNAL_H */
