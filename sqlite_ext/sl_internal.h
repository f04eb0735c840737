/*
 * sl_internal.h — private declarations of the SQLite extension sqlitesync.
 *
 * One db_conn per sqlite3 connection holds the cached statements, the table
 * metadata and the per-transaction clock state. It is created when the
 * extension is loaded into the connection and freed with it.
 */
#ifndef SL_INTERNAL_H
#define SL_INTERNAL_H

#include "../database.h"

#include <sqlite3ext.h>
SQLITE_EXTENSION_INIT3

/* Newer SQLite (3.45+) refuses sqlite3_result_subtype() from a function not
 * registered with this flag; older ones ignore the bit. Our JSON results
 * carry the 'J' subtype, so their functions say so on every version. */
#ifndef SQLITE_RESULT_SUBTYPE
#define SQLITE_RESULT_SUBTYPE 0x001000000
#endif

#define SL_STMT_CACHE 8

typedef struct sl_stmt_slot
{
	uint64_t	  key; /* column mask | kind bits */
	sqlite3_stmt *stmt;
} sl_stmt_slot;

/*
 * sl_cap: what capture knows about one table in the current transaction
 * (sl_log.c): how many rows it captured, whether it switched to bulk mode,
 * and which keys the bulk marker of this version covers.
 */
typedef struct sl_cap
{
	int64_t	   ver;	   /* transaction version this is about; 0 = nothing yet */
	int		   rows;   /* rows captured at ver */
	bool	   bulk;   /* more than SL_LOG_ROWS: rows go unindexed, under a marker */
	bool	   marked; /* the marker of ver covers keys >= lo (every key if all) */
	bool	   all;
	int		   widen; /* marker writes at ver */
	pgs_value *lo;	  /* npk values; TEXT and BLOB bytes in lobuf */
	pgs_buf	   lobuf;
} sl_cap;

struct db_table
{
	int64_t id; /* sync_tables.id */
	/* synced tables this one references (db_table_parents), by id, once
	 * parents_read (a db_table lives for one schema: sl_load rebuilds them all) */
	int64_t		 *parent_ids;
	int			  nparent_ids;
	bool		  parents_read;
	char		 *name;	  /* table name (unquoted) */
	char		 *qname;  /* quoted table identifier */
	char		 *qclock; /* quoted clock table identifier */
	db_algo		  algo;
	int			  npk;
	int			  ncols;
	char		**pk_names;
	char		**col_names;
	char		**pk_q; /* quoted pk identifiers */
	char		**col_q;
	db_table_info info;
	sqlite3_stmt *clock_get;
	sqlite3_stmt *clock_ins; /* INSERT of a new clock row */
	sqlite3_stmt *clock_upd; /* UPDATE of an existing one */
	sqlite3_stmt *row_delete;
	sl_stmt_slot  cache[SL_STMT_CACHE];
	int			  cache_next;
	/* new rows merged by sync_apply_payload, written SL_BATCH at a time */
	int			  batch_rows;  /* rows per batch statement */
	int			  nbatch;	   /* rows waiting */
	int			  nclock;	   /* clock rows waiting */
	pgs_value	 *batch_ckeys; /* nclock * npk */
	pgs_value	 *batch_vals;  /* nbatch * (npk + ncols) */
	int64_t		 *batch_clock; /* nbatch * 2: cl, ver */
	pgs_buf		  batch_blobs; /* clock blobs, back to back */
	size_t		 *batch_blob_len;
	sqlite3_stmt *batch_rows_st;
	sqlite3_stmt *batch_clock_st;
	/* schema changes (sl_alter.c) */
	int	   nhist; /* former column names: hist_names[i] is column hist_cols[i] (-1 dropped) */
	char **hist_names;
	int	  *hist_cols;
	int	  *cids;		/* the SQLite column id of each synced column */
	int	   renames;		/* renames found at load, the first entries of hist */
	bool   alter_dirty; /* positions or renames to record at the next write */
	/* change log (sl_log.c): 0 not looked at yet, 1 legacy layout (pulls scan
	 * the clock table), 2 indexed clock table with bulk markers */
	int			  layout;
	int			  keycmp;	  /* key order comparable in C: -1 unknown, 0 no, 1 yes */
	uint8_t		 *key_nocase; /* npk flags: the key column is COLLATE NOCASE */
	sl_cap		  cap;
	sqlite3_stmt *mark_put;
	sqlite3_stmt *mark_min;
	sqlite3_stmt *log_count;
	pgs_value	 *pull_lo; /* lower bound of a pull's bulk scan (bytes in pull_lobuf) */
	pgs_buf		  pull_lobuf;
	int64_t		  gc_floor; /* largest cl collected here (sl_gc.c); lives start above it */
	/* change events of the running apply (sl_events.c) */
	int64_t ev_count;
	int64_t ev_seq;
};

/* one entry of a connection's statement cache (sl_sql.c, sl_stmt) */
typedef struct sl_text_stmt
{
	char		 *sql; /* the text it was prepared from (sqlite3_malloc'd) */
	uint32_t	  hash;
	bool		  out; /* handed out, not given back yet */
	uint64_t	  used;
	sqlite3_stmt *st;
} sl_text_stmt;

#define SL_TEXT_STMTS 64

struct db_conn
{
	sqlite3	  *db;
	bool	   ready; /* metadata tables exist and are loaded */
	uint8_t	   site[16];
	bool	   applying;	  /* writes come from sync_apply_payload */
	bool	   pending;		  /* batched rows wait in some table */
	bool	   flushing;	  /* row-by-row retry of a failed batch */
	int64_t	   txn_ver;		  /* version of the open write txn, 0 = none */
	uint64_t   hlc;			  /* last stamp issued in this txn */
	bool	   clock_suspect; /* the persisted HLC was past the format's range at load */
	bool	   alter_dirty;	  /* some table has schema changes to record (sl_alter.c) */
	bool	   alter_lenient; /* loading for sync_cleanup: a changed table is no error */
	db_table **tables;
	int		   ntables;
	uint8_t (*sites)[16];
	uint32_t	  nsites;
	uint32_t	  sites_cap;
	sqlite3_stmt *st_ver_get;
	sqlite3_stmt *st_ver_bump;
	sqlite3_stmt *st_site_add;
	int64_t		  loaded_fp[2]; /* schema cookie and number of sites at the last load */
	pgs_buf		  clockbuf;		/* copy of the last clock blob read */
	pgs_buf		  scratch;
	pgs_stamp	 *stamps;
	int			  stamps_cap;
	/* apply: careful mode, held changes, what forgetting protects (sl_fate.c) */
	bool		  careful;
	bool		  held_again;	  /* db_held_put wrote during this apply */
	int64_t		  protect_ver;	  /* clock versions above are not acknowledged: kept */
	bool		  protect_capped; /* applying a pull: protect_ver <= protect_cap */
	int64_t		  protect_cap;	  /* the send_cursor when the pull was requested */
	bool		  protect_rejected;
	sqlite3_stmt *st_held_get;
	sqlite3_stmt *st_held_put;
	sqlite3_stmt *st_held_del;
	pgs_buf		  heldbuf;
	db_table	**parents;
	int			  parents_cap;
	sqlite3_stmt *st_row_read; /* db_row_read: kept until the next one */
	pgs_value	 *row_vals;
	int			  row_vals_cap;
	/* change log (sl_log.c, sl_clock.c) */
	int			  has_seq; /* sync_state has seq: -1 unknown, 0 no, 1 yes */
	int64_t		  seq;	   /* sync_state.seq after this transaction last wrote it */
	sqlite3_stmt *st_seq_bump;
	/* the capture trigger firing in progress (sl_capture.c) */
	db_table *fire_t;
	int		  fire_op;		/* 2 UPDATE, 3 DELETE: clock row expected */
	bool	  fire_pending; /* the trigger's clock UPDATE found no row yet */
	bool	  fire_bulk;	/* the row goes unindexed, under the marker */
	int64_t	  fire_ver;
	uint64_t *fire_mask; /* changed columns of an UPDATE */
	int		  fire_mask_cap;
	bool	 *fire_changed; /* the same, one flag per column (pgs_local_edit) */
	int		  fire_changed_cap;
	pgs_buf	  fire_blob;
	/* tombstone GC (sl_gc.c) */
	bool	pushing;	  /* sync_payload builds a push to the server (known lives partial) */
	int64_t gc_floor_ver; /* fire_ver at which the tables' floors were last read */
	/* change events (sl_events.c) and the last apply's counts */
	bool			ev_ready;  /* the event tables exist */
	bool			ev_failed; /* an event could not be kept: the apply fails with ev_err */
	pgs_err			ev_err;
	int64_t			ev_keep; /* changes_keep; 0 = no events */
	int64_t			ev_base; /* max(seq) when the apply's first event came; -1 not read */
	int64_t			ev_n;	 /* events of the running apply */
	struct sl_ev   *evs;	 /* the newest of them not yet written (a ring) */
	int				ev_cap;
	sqlite3_stmt   *st_event;
	pgs_apply_stats last_apply;
	bool			started_syncer; /* this connection ran sync_network_start */
	/* statements prepared once by their text (sl_stmt) */
	sl_text_stmt   stmts[SL_TEXT_STMTS];
	int			   nstmts;
	uint64_t	   stmt_tick;
	struct sl_net *net; /* its network client (sl_network.c) */
};

/* sqlitesync.c: the extension's set-up of a connection (also the syncer's own) */
int sl_attach(sqlite3 *db, char **errmsg, db_conn **out);

/* sl_database.c */
pgs_rc	  sl_flush(db_conn *c, pgs_err *err); /* write batched rows */
void	  sl_discard(db_conn *c);			  /* drop batched rows (apply failed) */
int		  sl_load(db_conn *c, pgs_err *err);  /* (re)load metadata if present and changed */
int		  sl_reload(db_conn *c,
					pgs_err *err); /* load again: after this connection's own metadata writes */
void	  sl_unload_tables(db_conn *c);
db_table *sl_table_by_id(db_conn *c, int64_t id, pgs_err *err);
db_table *sl_table_by_name(db_conn *c, const char *name);
pgs_rc	  sl_prepare(db_conn *c, sqlite3_stmt **st, const char *sql, pgs_err *err);
pgs_rc	  sl_dberr(db_conn *c, pgs_err *err, const char *what);
void	  sl_bind_value(sqlite3_stmt *st, int i, const pgs_value *v);
void	  sl_column_value(sqlite3_stmt *st, int i, pgs_value *v);
pgs_rc	  sl_exec(db_conn *c, const char *sql, pgs_err *err);
/*
 * sl_stmt: a prepared statement for one SQL statement, kept by the
 * connection between calls (the text is the key: the same text, the same
 * statement); NULL with the connection's error when it cannot be prepared.
 * Give it back with sl_stmt_done, which resets it and clears its bindings.
 * A statement already handed out and not given back (a nested use) is
 * prepared afresh and finalized by sl_stmt_done. sl_stmt_exec runs one
 * statement that way (no results); sl_stmt_clear finalizes them all.
 */
sqlite3_stmt *sl_stmt(db_conn *c, const char *sql);
void		  sl_stmt_done(db_conn *c, sqlite3_stmt *st);
bool		  sl_stmt_exec(db_conn *c, const char *sql);
void		  sl_stmt_clear(db_conn *c);
bool		  sl_table_exists(db_conn *c, const char *name); /* a table of that name in main */
/* sl_stmt_prepare: sl_stmt in the shape of sqlite3_prepare_v2 (SQLITE_OK or an error code) */
static inline int
sl_stmt_prepare(db_conn *c, const char *sql, sqlite3_stmt **st)
{
	int e;

	if ((*st = sl_stmt(c, sql)) != NULL)
		return SQLITE_OK;
	e = sqlite3_errcode(c->db);
	return e != SQLITE_OK ? e : SQLITE_ERROR;
}
/* sl_result_json: j (consumed) as the function's JSON text result, subtype 'J'
 * (register the function with SQLITE_RESULT_SUBTYPE). */
struct cJSON;
void sl_result_json(sqlite3_context *ctx, struct cJSON *j);
/* sl_execf: sl_exec of a sqlite3_mprintf format (%Q, %w, ...). */
pgs_rc sl_execf(db_conn *c, pgs_err *err, const char *fmt, ...);
char  *sl_quote(const char *ident); /* sqlite3_malloc'd "ident" */
/* sl_pk_where: "<prefix>k1 = ?first AND <prefix>k2 = ?first+1 ..." over t's
 * key; sl_pk_list: "<prefix>k1, <prefix>k2, ...". sqlite3_malloc'd, NULL when
 * out of memory. */
char *sl_pk_where(const db_table *t, const char *prefix, int first);
char *sl_pk_list(const db_table *t, const char *prefix);

/* sl_alter.c */
extern const char *sl_alter_meta_sql;
pgs_rc			   sl_alter_resolve(db_conn *c, db_table *t, pgs_err *err);
pgs_rc			   sl_alter_persist(db_conn *c, pgs_err *err);
int				   sl_alter_register(sqlite3 *db, db_conn *c);

/* sl_clock.c */
pgs_rc	   sl_txn_version(db_conn *c, bool verify, int64_t *ver, pgs_err *err);
uint64_t   sl_tick(db_conn *c);
pgs_rc	   sl_repair_clock(db_conn *c, int64_t ver, pgs_err *err);
void	   sl_txn_end(db_conn *c);
pgs_stamp *sl_stamps(db_conn *c, int n);

/* sl_capture.c */
void   sl_capture(sqlite3_context *ctx, int argc, sqlite3_value **argv);
pgs_rc sl_capture_insert(db_conn *c, db_table *t, sqlite3_value **pk, pgs_err *err);
/* the functions the bodies of the capture triggers call (layout 2) */
void sl_fire_ver(sqlite3_context *ctx, int argc, sqlite3_value **argv);
void sl_fire_bulk(sqlite3_context *ctx, int argc, sqlite3_value **argv);
void sl_fire_fresh(sqlite3_context *ctx, int argc, sqlite3_value **argv);
void sl_fire_relife(sqlite3_context *ctx, int argc, sqlite3_value **argv);
void sl_fire_touch(sqlite3_context *ctx, int argc, sqlite3_value **argv);
void sl_fire_tomb(sqlite3_context *ctx, int argc, sqlite3_value **argv);
void sl_fire_done(sqlite3_context *ctx, int argc, sqlite3_value **argv);

/* sl_log.c */
#define SL_LOG_ROWS 256	  /* rows a transaction indexes per table before bulk mode */
#define SL_LOG_WIDEN 8	  /* marker writes per table and version before it covers all */
#define SL_LOG_MARKS 64	  /* markers per table before the older ones are coalesced */
#define SL_LOG_SCAN 20000 /* indexed changes above which a pull scans instead */
pgs_rc sl_log_layout(db_conn *c, db_table *t, pgs_err *err); /* sets t->layout */
pgs_rc sl_log_version(db_conn *c, int64_t seq, pgs_err *err);
void   sl_log_load(db_conn *c);
pgs_rc sl_log_row(db_conn *c, db_table *t, const pgs_value *pk, pgs_err *err);
void   sl_log_reset(db_conn *c);
void   sl_log_free(db_table *t);
pgs_rc sl_log_plan(db_conn *c, db_table *t, int64_t since, bool *use, int *lo_kind, pgs_err *err);
char  *sl_log_select(const db_table *t, const char *sel, const char *on, const char *keys,
					 bool by_key, bool after, int lo_kind);

/* sl_fate.c */
extern const char sl_fate_meta_sql[];
pgs_rc			  sl_apply_held(db_conn *c, const char *table, int64_t *applied, pgs_err *err);
void			  sl_protect_load(db_conn *c);
char			 *sl_pk_json(const db_table *t, const pgs_value *pk); /* sqlite3_malloc'd */
bool   sl_pk_from_json(db_conn *c, db_table *t, const char *json, pgs_value *pk, char **store);
pgs_rc sl_touch_row(db_conn *c, db_table *t, const pgs_value *pk, bool *found, pgs_err *err);
pgs_rc sl_touch_row_above(db_conn *c, db_table *t, const pgs_value *pk, int64_t floor, bool *found,
						  pgs_err *err);
pgs_rc sl_forget_now(db_conn *c, db_table *t, const pgs_value *pk, pgs_err *err);
/* sl_row_error: a failed row write: PGS_ERR_ROW (careful) or PGS_ERR_CAREFUL,
 * with err->code the closest SQLSTATE; any other error is the engine's. */
pgs_rc sl_row_error(db_conn *c, pgs_err *err, const char *what);

/* sl_gc.c */
int64_t sl_gc_life(db_conn *c, db_table *t, bool del);
int64_t sl_gc_floor_known(db_conn *c, db_table *t);
pgs_rc	sl_gc_renumber(db_conn *c, db_table *t, const pgs_value *pk, int64_t floor, bool *found,
					   pgs_err *err);
int		sl_gc_register(sqlite3 *db, db_conn *c);
/* sl_events.c: change events of applies (docs/CLIENT.md) */
pgs_rc sl_events_begin(db_conn *c, pgs_err *err);
void   sl_event(db_conn *c, db_table *t, const pgs_value *pk, const char *kind);
pgs_rc sl_events_end(db_conn *c, pgs_err *err);
void   sl_events_reset(db_conn *c);
void   sl_events_free(db_conn *c);

/* sl_schema.c */
pgs_rc sl_init_table(db_conn *c, const char *table, const char *algo, pgs_err *err);
pgs_rc sl_cleanup_table(db_conn *c, const char *table, pgs_err *err);
pgs_rc sl_ensure_meta(db_conn *c, pgs_err *err);

#endif
