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

#define SL_STMT_CACHE 8

typedef struct sl_stmt_slot
{
	uint64_t	  key; /* column mask | kind bits */
	sqlite3_stmt *stmt;
} sl_stmt_slot;

struct db_table
{
	int64_t		  id;	  /* sync_tables.id */
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
	/* change events of the running apply (sl_events.c) */
	int64_t		  ev_count;
	int64_t		  ev_seq;
};

struct db_conn
{
	sqlite3	  *db;
	bool	   ready; /* metadata tables exist and are loaded */
	uint8_t	   site[16];
	bool	   applying; /* writes come from sync_apply_payload */
	bool	   pending;	 /* batched rows wait in some table */
	bool	   flushing; /* row-by-row retry of a failed batch */
	int64_t	   txn_ver;	 /* version of the open write txn, 0 = none */
	uint64_t   hlc;		 /* last stamp issued in this txn */
	bool	   clock_suspect; /* the persisted HLC was past the format's range at load */
	db_table **tables;
	int		   ntables;
	uint8_t (*sites)[16];
	uint32_t	  nsites;
	uint32_t	  sites_cap;
	sqlite3_stmt *st_ver_get;
	sqlite3_stmt *st_ver_bump;
	sqlite3_stmt *st_site_add;
	pgs_buf		  clockbuf; /* copy of the last clock blob read */
	pgs_buf		  scratch;
	pgs_stamp	 *stamps;
	int			  stamps_cap;
	/* apply: careful mode, held changes, what forgetting protects (sl_fate.c) */
	bool		  careful;
	bool		  held_again; /* db_held_put wrote during this apply */
	int64_t		  protect_ver; /* clock versions above are not acknowledged: kept */
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
	/* change events (sl_events.c) and the last apply's counts */
	bool			ev_ready; /* the event tables exist */
	bool			ev_any;	  /* the running apply recorded events */
	int64_t			ev_keep;  /* changes_keep; 0 = no events */
	sqlite3_stmt   *st_event;
	pgs_apply_stats last_apply;
	bool			started_syncer; /* this connection ran sync_network_start */
	struct sl_net  *net;			/* its network client (sl_network.c) */
};

/* sqlitesync.c: the extension's set-up of a connection (also the syncer's own) */
int sl_attach(sqlite3 *db, char **errmsg, db_conn **out);

/* sl_database.c */
pgs_rc	  sl_flush(db_conn *c, pgs_err *err); /* write batched rows */
void	  sl_discard(db_conn *c);			  /* drop batched rows (apply failed) */
int		  sl_load(db_conn *c, pgs_err *err);  /* (re)load metadata if present */
void	  sl_unload_tables(db_conn *c);
db_table *sl_table_by_id(db_conn *c, int64_t id, pgs_err *err);
db_table *sl_table_by_name(db_conn *c, const char *name);
pgs_rc	  sl_prepare(db_conn *c, sqlite3_stmt **st, const char *sql, pgs_err *err);
pgs_rc	  sl_dberr(db_conn *c, pgs_err *err, const char *what);
void	  sl_bind_value(sqlite3_stmt *st, int i, const pgs_value *v);
void	  sl_column_value(sqlite3_stmt *st, int i, pgs_value *v);
pgs_rc	  sl_exec(db_conn *c, const char *sql, pgs_err *err);
char	 *sl_quote(const char *ident); /* sqlite3_malloc'd "ident" */

/* sl_clock.c */
pgs_rc	   sl_txn_version(db_conn *c, bool verify, int64_t *ver, pgs_err *err);
uint64_t   sl_tick(db_conn *c);
pgs_rc	   sl_repair_clock(db_conn *c, int64_t ver, pgs_err *err);
void	   sl_txn_end(db_conn *c);
pgs_stamp *sl_stamps(db_conn *c, int n);

/* sl_capture.c */
void   sl_capture(sqlite3_context *ctx, int argc, sqlite3_value **argv);
pgs_rc sl_capture_insert(db_conn *c, db_table *t, sqlite3_value **pk, pgs_err *err);

/* sl_fate.c */
extern const char sl_fate_meta_sql[];
pgs_rc			  sl_apply_held(db_conn *c, const char *table, int64_t *applied, pgs_err *err);
void			  sl_protect_load(db_conn *c);
char			 *sl_pk_json(const db_table *t, const pgs_value *pk); /* sqlite3_malloc'd */
bool	sl_pk_from_json(db_conn *c, db_table *t, const char *json, pgs_value *pk, char **store);
pgs_rc	sl_touch_row(db_conn *c, db_table *t, const pgs_value *pk, bool *found, pgs_err *err);
pgs_rc	sl_forget_now(db_conn *c, db_table *t, const pgs_value *pk, pgs_err *err);
/* sl_row_error: a failed row write: PGS_ERR_ROW (careful) or PGS_ERR_CAREFUL,
 * with err->code the closest SQLSTATE; any other error is the engine's. */
pgs_rc sl_row_error(db_conn *c, pgs_err *err, const char *what);

/* sl_events.c: change events of applies (docs/CLIENT.md) */
pgs_rc sl_events_begin(db_conn *c, pgs_err *err);
void   sl_event(db_conn *c, db_table *t, const pgs_value *pk, const char *kind);
pgs_rc sl_events_end(db_conn *c, pgs_err *err);
void   sl_events_reset(db_conn *c);

/* sl_schema.c */
pgs_rc sl_init_table(db_conn *c, const char *table, const char *algo, pgs_err *err);
pgs_rc sl_cleanup_table(db_conn *c, const char *table, pgs_err *err);
pgs_rc sl_ensure_meta(db_conn *c, pgs_err *err);

#endif
