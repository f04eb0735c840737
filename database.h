/*
 * database.h — the seam between the pgsync core and a database engine.
 *
 * This file is the architecture in one page. The core (core/) owns the
 * formats and the rules: values, hybrid logical clocks, the row clock blob,
 * the merge ladder, payload encoding and the apply/build drivers. An engine
 * (sqlite_ext/ for SQLite, pg_ext/ for PostgreSQL) owns storage: where the
 * base rows and their row clocks live, how versions are handed out, how a
 * write is checked against permissions. The core calls the engine only
 * through the db_ functions below; each engine defines struct db_conn,
 * struct db_table and struct db_cursor privately.
 *
 *      SQL function (sync_apply_payload)        engine wrapper: args, savepoint
 *                 |                                          |
 *            pgs_apply (core/apply.c)  ---- db_table_find, db_clock_get, ...
 *                 |                                          |
 *       pgs_reader + pgs_merge_* (pure)            engine storage (tables)
 *
 * Storage model every engine keeps:
 *   - per synced table, one clock row per primary key (alive or tombstone):
 *     (pk..., cl, ver, clk) where clk is the pgs_rowclock blob and ver the
 *     largest local version inside it;
 *   - a site table mapping local site indexes (0 = self) to 16-byte site ids;
 *   - a current local version (db_version) and a persisted HLC.
 *
 * Errors: every function returns PGS_OK or an error code with err filled.
 * Under Postgres an engine function may also ereport (longjmp); the core
 * therefore keeps all its memory in pgs_malloc (a memory context there) and
 * holds no other resource across db_ calls.
 */
#ifndef PGSYNC_DATABASE_H
#define PGSYNC_DATABASE_H

#include "core/pgsync.h"

typedef struct db_conn	 db_conn;
typedef struct db_table	 db_table;
typedef struct db_cursor db_cursor;

/* What the core needs to know of a synced table. Names are UTF-8, not quoted. */
typedef enum db_algo
{
	DB_ALGO_CLS = 0, /* causal-length set + per-column LWW */
	DB_ALGO_GSET = 1 /* grow-only: no local update/delete */
} db_algo;

typedef struct db_table_info
{
	const char		  *name; /* name as it travels in payloads */
	db_algo			   algo;
	int				   npk;
	int				   ncols; /* non-key columns */
	const char *const *pk_names;
	const char *const *col_names;
	/*
	 * Former column names (docs/MIGRATIONS.md): hist_names[i] was renamed to
	 * column hist_cols[i], or dropped (-1). Payloads naming them still apply
	 * (renamed) or are ignored (dropped) instead of being held; a renamed
	 * column travels with its former names so that replicas that still use
	 * them can match it.
	 */
	int				   nhist;
	const char *const *hist_names;
	const int		  *hist_cols;
} db_table_info;

/* ---- schema ---------------------------------------------------------- */

/* db_tables lists the synced tables (array owned by the engine). */
pgs_rc db_tables(db_conn *db, db_table ***tables, int *ntables, pgs_err *err);
/* db_table_find resolves a payload table name; PGS_ERR_SCHEMA if not synced. */
pgs_rc db_table_find(db_conn *db, const uint8_t *name, size_t len, db_table **out, pgs_err *err);
const db_table_info *db_table_describe(db_table *t);

/* ---- sites and clocks -------------------------------------------------- */

/* db_site_id: this replica's 16-byte site id. */
const uint8_t *db_site_id(db_conn *db);
/* db_site_intern: local index of a site id, adding it if new. */
pgs_rc db_site_intern(db_conn *db, const uint8_t site[16], uint32_t *idx, pgs_err *err);
/* db_site_lookup: the site id of a local index (pointer valid for the call). */
pgs_rc db_site_lookup(db_conn *db, uint32_t idx, const uint8_t **site, pgs_err *err);

/*
 * db_apply_version: the local version and HLC that merged changes of this
 * call are stamped with (one version per apply, like a local transaction).
 */
pgs_rc db_apply_version(db_conn *db, int64_t *ver, pgs_err *err);
/*
 * db_apply_lock: the rows the apply may write, announced before it writes
 * any of them, so that an engine with concurrent writers can lock them in
 * one order (Postgres: docs/PG.md, "Concurrency"; SQLite has one writer and
 * does nothing). keys[i].hash is pgs_key_hash(PGS_LOCK_SALT, npk, pk), the
 * same for the same key in every apply; keys may repeat and come in any
 * order. Called once after the payload is resolved with every row it
 * carries, and again (fewer rows, after some were written) for rows found
 * later, such as local keys matched by removal candidates: an engine must
 * not wait for those while it holds the first ones.
 */
typedef struct db_lock_key
{
	db_table *t;
	uint64_t  hash;
} db_lock_key;
#define PGS_LOCK_SALT UINT64_C(0x7067737972776c6b) /* "pgsyrwlk" */
pgs_rc db_apply_lock(db_conn *db, const db_lock_key *keys, uint32_t n, pgs_err *err);
/* db_apply_end: the merge succeeded; write anything the engine deferred
 * (SQLite batches new rows) while the payload is still in memory. */
pgs_rc db_apply_end(db_conn *db, pgs_err *err);
/* db_hlc_observe: advance the persisted HLC after receiving stamps up to hlc
 * (the caller already applied pgs_hlc_receive's skew bound). */
pgs_rc db_hlc_observe(db_conn *db, uint64_t hlc, pgs_err *err);

/* ---- rows ---------------------------------------------------------------- */

/*
 * db_clock_get: the clock row of pk. *found = false when the key was never
 * seen. *blob points to engine memory valid until the next db_ call.
 */
pgs_rc db_clock_get(db_conn *db, db_table *t, const pgs_value *pk, bool *found, int64_t *cl,
					const uint8_t **blob, size_t *blob_len, pgs_err *err);
/* db_clock_put: write the clock row of pk; exists tells whether db_clock_get
 * found one (an engine may then use a plain UPDATE or INSERT: on SQLite an
 * INSERT OR REPLACE costs a statement journal per row). */
pgs_rc db_clock_put(db_conn *db, db_table *t, const pgs_value *pk, bool exists, int64_t cl,
					int64_t ver, const uint8_t *blob, size_t blob_len, pgs_err *err);

typedef enum db_write_mode
{
	DB_WRITE_MERGE = 0,	  /* update these columns; insert the row if absent */
	DB_WRITE_REPLACE = 1, /* new life of a live row: the row becomes exactly
						   * these columns */
	DB_WRITE_INSERT = 2	  /* new life of an absent row (unknown key or
						   * tombstone): insert these columns; an engine
						   * must still cope with a stray existing row */
} db_write_mode;

/*
 * db_apply_careful: the apply that follows runs in careful mode (every row
 * write isolated, so that a failing row can be rejected alone) or not (the
 * fast path; a row error then makes the core return PGS_ERR_CAREFUL and the
 * engine's wrapper applies again, carefully). docs/DESIGN.md, "fate".
 */
void db_apply_careful(db_conn *db, bool careful);

/*
 * db_row_write writes n columns (local column indexes cols[], values vals[])
 * of row pk in one statement (RLS WITH CHECK sees the whole row).
 * PGS_ERR_ROW (or PGS_ERR_PERMISSION) means this row cannot be written here
 * and nothing of it was: err has the reason and err->code its SQLSTATE; a
 * write that would silently affect no row (RLS hiding it) is such an error.
 * Any other error aborts the apply.
 */
pgs_rc db_row_write(db_conn *db, db_table *t, const pgs_value *pk, db_write_mode mode, int n,
					const int *cols, const pgs_value *vals, pgs_err *err);
/*
 * db_row_forms: after a db_row_write that succeeded, did the engine store
 * some of its values in a form of its own? When it returns true it fills
 * differs[0..n): differs[i] when the value this replica would now send for
 * that column is not vals[i] byte for byte (Postgres: jsonb spacing, a
 * timestamptz offset, a numeric's scale...). False, leaving differs alone,
 * when every value was stored as received (SQLite: always). The core then
 * re-stamps those cells (docs/TYPES.md, "One form on every replica"); the
 * engine writes nothing more.
 */
bool db_row_forms(db_conn *db, int n, bool *differs);
/* db_row_delete deletes row pk if it exists (errors as above). */
pgs_rc db_row_delete(db_conn *db, db_table *t, const pgs_value *pk, pgs_err *err);
/*
 * db_row_forget removes row pk and its clock locally, without a tombstone
 * and without capture (the row moved out of the caller's view), unless the
 * engine protects it (SQLite: local changes not acknowledged by the server,
 * or a pending rejection). *forgot tells which.
 */
pgs_rc db_row_forget(db_conn *db, db_table *t, const pgs_value *pk, bool *forgot, pgs_err *err);
/* db_reject records a refused row so the caller can report it (why->code). */
void db_reject(db_conn *db, db_table *t, const pgs_value *pk, const pgs_err *why);
/* db_hold_rejected: true when a row this replica refuses is also kept aside
 * (held) and tried again later (a SQLite device: the change is the server's
 * and must not be lost); false when reporting is enough (Postgres: the
 * sending device keeps its change and is told). */
bool db_hold_rejected(db_conn *db);
/*
 * db_table_floor: the causal length at or below which this replica refuses
 * a first life of a key it has no clock row for (docs/DESIGN.md, "Floors"):
 * the largest cl it collected in t. 0: no check (SQLite devices take the
 * server's lives as they are).
 */
pgs_rc db_table_floor(db_conn *db, db_table *t, int64_t *floor, pgs_err *err);
/* db_site_check: may this apply write a stamp of local site idx (Postgres:
 * not another principal's device)? PGS_ERR_PERMISSION otherwise. */
pgs_rc db_site_check(db_conn *db, uint32_t idx, pgs_err *err);

/* db_table_parents: the synced tables t references by foreign keys (array
 * owned by the engine, valid for the call). */
pgs_rc db_table_parents(db_conn *db, db_table *t, db_table ***parents, int *n, pgs_err *err);

/* ---- keys, snapshots and held changes (apply) -------------------------- */

/* db_keys_*: every key of t that has a live row here (removal candidates);
 * closed with db_changes_close. */
pgs_rc db_keys_open(db_conn *db, db_table *t, db_cursor **cur, pgs_err *err);
pgs_rc db_keys_next(db_cursor *cur, bool *done, const pgs_value **pk, int64_t *cl, pgs_err *err);

typedef enum db_snap_op
{
	DB_SNAP_BEGIN = 0, /* a snapshot of t starts: forget what was recorded */
	DB_SNAP_SEEN = 1,  /* key pk is part of it */
	DB_SNAP_END = 2	   /* complete: forget every live row not seen (db_row_forget rules) */
} db_snap_op;
/* db_snapshot: the receiving side of a snapshot (persisted across chunks).
 * DB_SNAP_END adds the number of rows it forgot to *forgot. */
pgs_rc db_snapshot(db_conn *db, db_table *t, db_snap_op op, const pgs_value *pk, int64_t *forgot,
				   pgs_err *err);

/*
 * Held changes (docs/DESIGN.md): changes this replica cannot store now
 * (unknown table or column, a row its own constraints refuse) kept with
 * their clocks as a one-group payload per (table name, encoded key).
 * db_held_get: *frag NULL when none (engine memory, valid until the next
 * db_ call); db_held_put: frag NULL deletes. code/message say why.
 */
pgs_rc db_held_get(db_conn *db, pgs_name table, pgs_name key, const uint8_t **frag, size_t *len,
				   pgs_err *err);
pgs_rc db_held_put(db_conn *db, pgs_name table, pgs_name key, const char *code, const char *message,
				   const uint8_t *frag, size_t len, pgs_err *err);

/* ---- change enumeration (payload building) -------------------------------- */

/* db_version_safe: the highest version every change <= which is visible and
 * final (SQLite: db_version; Postgres: below the oldest running writer). */
pgs_rc db_version_safe(db_conn *db, int64_t *until, pgs_err *err);

/*
 * How the caller of a build may read a table (docs/DESIGN.md, "Visibility").
 * SQLite: always FULL. Postgres: from the caller's privileges and RLS.
 */
typedef enum db_access
{
	DB_ACCESS_FULL = 0, /* sees every row: changes since `since` as they are */
	DB_ACCESS_RLS = 1,	/* sees some rows: visible rows whole, the rest as candidates */
	DB_ACCESS_NONE = 2	/* sees nothing */
} db_access;

/*
 * db_table_view: the caller's access to t, and (view builds only, when view
 * is true) whether t must go out as a snapshot because its visibility may
 * have changed in (since, until] without the rows changing.
 */
pgs_rc db_table_view(db_conn *db, db_table *t, bool view, int64_t since, int64_t until,
					 db_access *access, bool *snapshot, pgs_err *err);

/* What db_changes_next says about a row. */
typedef enum db_vis
{
	DB_VIS_CHANGES = 0, /* send the stamps newer than since (FULL access) */
	DB_VIS_WHOLE = 1,	/* visible: send every written column */
	DB_VIS_HIDDEN = 2	/* changed but not visible to the caller: a removal candidate */
} db_vis;

/* db_changes_open: rows of t whose clock ver is > since (committed rows above
 * until are welcome: the core sends every committed stamp newer than since
 * and reports until as the cursor; see core/build.c).
 * by_key (chunked builds): return the rows in the order of the clock table's
 * primary key (row-value order, the clock table's collation) and, when
 * after_pk (npk values) is not NULL, only rows whose key is > after_pk.
 * Without by_key the order is the engine's choice and after_pk is NULL. */
/* access is db_table_view's; snapshot: every live visible row whatever its
 * version (vis WHOLE), no tombstones. */
pgs_rc db_changes_open(db_conn *db, db_table *t, int64_t since, int64_t until, bool by_key,
					   const pgs_value *after_pk, db_access access, bool snapshot, db_cursor **cur,
					   pgs_err *err);
/*
 * db_changes_next: the next row: pk (npk values), cl, the clock blob, and the
 * current column values (ncols; meaningful only when *alive). Everything
 * points to engine memory valid until the next call. *done at the end.
 */
pgs_rc db_changes_next(db_cursor *cur, bool *done, const pgs_value **pk, int64_t *cl,
					   const uint8_t **blob, size_t *blob_len, bool *alive, const pgs_value **cols,
					   db_vis *vis, pgs_err *err);
void   db_changes_close(db_cursor *cur);

/*
 * db_row_read: row pk as the caller may see it now: *visible false when
 * there is no live row the caller may see (deleted, hidden, never there);
 * else its causal length, clock blob and ncols values (engine memory, valid
 * until the next db_ call).
 */
pgs_rc db_row_read(db_conn *db, db_table *t, const pgs_value *pk, bool *visible, int64_t *cl,
				   const uint8_t **blob, size_t *blob_len, const pgs_value **cols, pgs_err *err);

#endif /* PGSYNC_DATABASE_H */
