/*
 * pgsync.h — the shared core of pgsync: values, clocks, merge, payloads.
 *
 * The core is engine-free: it never includes sqlite3.h, postgres.h or curl.h
 * and reaches the database only through the functions declared in
 * ../database.h, which each engine (sqlite_ext/, pg_ext/) implements.
 *
 * Conventions
 *   - Core functions are prefixed pgs_ and return a pgs_rc; on failure they
 *     fill a caller-owned pgs_err with a short lower-case message, a detail
 *     and a hint (PostgreSQL's message style). Nothing is kept in globals
 *     except the allocator hooks.
 *   - Memory comes from pgs_malloc/pgs_realloc/pgs_free, bound by the engine
 *     (palloc in a memory context under Postgres, sqlite3_malloc64 under
 *     SQLite, a tracking allocator in unit tests).
 *   - pgs_value never owns its bytes: TEXT/BLOB point into a payload buffer or
 *     into engine memory that outlives the call.
 */
#ifndef PGSYNC_CORE_H
#define PGSYNC_CORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define PGS_VERSION "0.2.0"

/* ---- errors ---------------------------------------------------------- */

typedef enum pgs_rc
{
	PGS_OK = 0,
	PGS_ERR_MISUSE,	 /* bad argument, or called before sync_init */
	PGS_ERR_CORRUPT, /* payload malformed, truncated, checksum mismatch */
	PGS_ERR_VERSION, /* payload format version we do not read */
	PGS_ERR_TOO_BIG, /* over a size limit */
	PGS_ERR_NOMEM,
	PGS_ERR_SCHEMA,		/* unknown table or column, schema mismatch */
	PGS_ERR_VALUE,		/* a value cannot be stored in the target column */
	PGS_ERR_PERMISSION, /* the role may not make this change (Postgres) */
	PGS_ERR_DB,			/* any other engine error */
	PGS_ERR_ROW,		/* this row cannot be stored here (a constraint, a conversion, a
						 * trigger...): the row's own fate, code says why */
	PGS_ERR_CAREFUL		/* a row failed on the fast path: apply again with careful set */
} pgs_rc;

typedef struct pgs_err
{
	pgs_rc rc;
	char   code[6]; /* SQLSTATE-style code of a row's rejection ("23502", "PS001"), or "" */
	char   msg[256];
	char   detail[1024];
	char   hint[256];
} pgs_err;

/*
 * Rejection codes of pgsync itself (SQLSTATE-shaped, class PS). Engines
 * report their own errors with their SQLSTATE (Postgres) or the closest one
 * (SQLite: 23502 NOT NULL, 23514 CHECK, 23505 UNIQUE, 23503 FOREIGN KEY,
 * P0001 trigger RAISE, 22000 other data errors).
 */
#define PGS_CODE_INCOMPLETE "PS001"	  /* a new life of a row without its whole row */
#define PGS_CODE_FOREIGN_SITE "PS002" /* a change attributed to another principal's device */
#define PGS_CODE_HELD "PS003"		  /* kept aside: unknown table or column here */
#define PGS_CODE_DELETED "PS004"	  /* a first life of a key already used and deleted here */
#define PGS_CODE_KEY_FORM "PS007"	  /* a key not in the form Postgres stores (docs/TYPES.md) */
/* a first life at or below the table's collected floor: renumber */
#define PGS_CODE_FLOOR "PS005"
/* changes of a life older than what was collected: it was deleted */
#define PGS_CODE_GONE "PS006"
/* pgs_err_code sets err->code (NULL or "" clears it). */
void pgs_err_code(pgs_err *err, const char *code);

/* pgs_fail fills err (may be NULL) and returns rc; detail/hint may be NULL. */
pgs_rc pgs_fail(pgs_err *err, pgs_rc rc, const char *msg, const char *detail, const char *hint);
pgs_rc pgs_failf(pgs_err *err, pgs_rc rc, const char *hint, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
/* pgs_err_detailf sets err->detail (keeps msg and rc). */
void pgs_err_detailf(pgs_err *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* pgs_utf8_valid: len bytes are valid UTF-8 without NUL. */
bool pgs_utf8_valid(const uint8_t *p, size_t len);
/* pgs_name_for_msg renders a (possibly forged) name for an error message:
 * at most 60 bytes of it, invalid UTF-8 replaced by '?', "..." if cut. */
const char *pgs_name_for_msg(char out[72], const uint8_t *name, size_t len);

/* ---- memory ----------------------------------------------------------- */

typedef struct pgs_allocator
{
	void *(*malloc_fn)(size_t);
	void *(*realloc_fn)(void *, size_t);
	void (*free_fn)(void *);
} pgs_allocator;

void  pgs_set_allocator(const pgs_allocator *a);
void *pgs_malloc(size_t n);
void *pgs_realloc(void *p, size_t n);
void  pgs_free(void *p);

/* A growable byte buffer (payload building, clock blobs). */
typedef struct pgs_buf
{
	uint8_t *p;
	size_t	 len;
	size_t	 cap;
	bool	 oom; /* sticky: an append failed */
} pgs_buf;

void pgs_buf_init(pgs_buf *b);
void pgs_buf_free(pgs_buf *b);
bool pgs_buf_reserve(pgs_buf *b, size_t extra);
void pgs_buf_put(pgs_buf *b, const void *src, size_t n);
void pgs_buf_u8(pgs_buf *b, uint8_t v);
void pgs_buf_varint(pgs_buf *b, uint64_t v);
void pgs_buf_svarint(pgs_buf *b, int64_t v);

/* ---- varints (LEB128) ------------------------------------------------ */

#define PGS_VARINT_MAX 10
/* pgs_varint_put writes v at out (>= 10 bytes free) and returns its length. */
int pgs_varint_put(uint8_t *out, uint64_t v);
/* pgs_varint_get reads a varint from [p, end); returns bytes used, 0 if malformed. */
int pgs_varint_get(const uint8_t *p, const uint8_t *end, uint64_t *v);
static inline uint64_t
pgs_zigzag(int64_t v)
{
	return ((uint64_t) v << 1) ^ (0 - ((uint64_t) v >> 63));
}
static inline int64_t
pgs_unzigzag(uint64_t v)
{
	return (int64_t) (v >> 1) ^ -(int64_t) (v & 1);
}

/* ---- values ---------------------------------------------------------- */

typedef enum pgs_type
{
	PGS_NULL = 0,
	PGS_INT = 1,
	PGS_REAL = 2,
	PGS_TEXT = 3,
	PGS_BLOB = 4
} pgs_type;

typedef struct pgs_value
{
	uint8_t	 type; /* pgs_type */
	uint32_t len;  /* TEXT/BLOB byte length */
	union
	{
		int64_t		   i;
		double		   r;
		const uint8_t *p;
	} v;
} pgs_value;

#define PGS_MAX_VALUE (1u << 30)	   /* 1 GiB per TEXT/BLOB value */
#define PGS_MAX_CL (UINT64_C(1) << 62) /* causal lengths above are forged */

/* ---- identity and clocks --------------------------------------------- */

#define PGS_SITE_LEN 16
/*
 * The site of canonical forms (docs/TYPES.md, "One form on every replica"):
 * a cell whose value Postgres stored in a form other than the one it
 * received is re-stamped (received hlc + 1, this site). The nil UUID, so that
 * it loses every tie: any real edit with the same hlc beats it.
 */
extern const uint8_t PGS_SITE_CANON[16];
/* pgs_uuid7 fills out with a fresh UUIDv7 (48-bit ms time, random rest). */
pgs_rc pgs_uuid7(uint8_t out[16], pgs_err *err);
/* pgs_b64url_decode decodes base64url (padding optional; the standard
 * alphabet's + and / accepted too) into out, at most cap bytes: the number of
 * bytes written, or -1 for a character outside the alphabet or a full out.
 * For reading JWT parts before a crypto library verifies them. */
long pgs_b64url_decode(const char *in, size_t n, uint8_t *out, size_t cap);

/* pgs_site_listed: is site one of the n site ids (16 bytes each) at list? */
bool pgs_site_listed(const uint8_t *list, size_t n, const uint8_t *site);
/* pgs_uuid_format writes the canonical 36-char form plus NUL into out[37]. */
void pgs_uuid_format(const uint8_t uuid[16], char out[37]);
/* pgs_uuid_parse accepts the canonical form (any case); false if malformed. */
bool pgs_uuid_parse(const char *s, size_t len, uint8_t out[16]);

/*
 * Hybrid logical clock: a uint64 whose upper 48 bits are Unix milliseconds and
 * lower 16 bits a logical counter. Stamps compare as plain integers.
 */
#define PGS_HLC_LOGICAL_BITS 16
#define PGS_HLC_MAX_DRIFT_MS (5 * 60 * 1000) /* see core/clock.c: skew policy */
uint64_t pgs_now_ms(void);
static inline uint64_t
pgs_hlc_from_ms(uint64_t ms)
{
	return ms << PGS_HLC_LOGICAL_BITS;
}
/* The largest stamp any replica accepts (physical part below 2^47 ms, year ~6429). */
#define PGS_HLC_MAX_MS ((UINT64_C(1) << 47) - 1)
#define PGS_HLC_MAX ((PGS_HLC_MAX_MS << PGS_HLC_LOGICAL_BITS) | 0xffff)
/*
 * pgs_hlc_tick returns the next local stamp after last (>= now): never one a
 * peer refuses. A wall clock past the format's range (a device whose clock
 * reads year 7000) is ignored and the clock moves logically, last + 1.
 */
uint64_t pgs_hlc_tick(uint64_t last, uint64_t now_ms);
/* pgs_hlc_receive returns last advanced by a remote stamp, bounded by skew policy. */
uint64_t pgs_hlc_receive(uint64_t last, uint64_t remote, uint64_t now_ms);
/* pgs_hlc_valid: false for stamps no honest clock makes (0, or past year ~6400). */
bool pgs_hlc_valid(uint64_t hlc);

/*
 * Row clock: the per-row metadata kept beside every synced row.
 *   cl      causal length: odd = alive, even = deleted
 *   cl_ver  local version at which cl last changed; cl_site who changed it
 *   cols[i] stamp of column i in the current life (hlc == 0: never written)
 * Sites are local indexes into the engine's site table (0 = this replica).
 */
typedef struct pgs_stamp
{
	uint64_t hlc;
	int64_t	 ver;
	uint32_t site;
} pgs_stamp;

typedef struct pgs_rowclock
{
	int64_t	   cl;
	int64_t	   cl_ver;
	uint32_t   cl_site;
	int		   ncols;
	pgs_stamp *cols; /* caller-provided array of ncols */
} pgs_rowclock;

/* pgs_rowclock_max_ver: the largest version in the clock (the indexed "ver"). */
int64_t pgs_rowclock_max_ver(const pgs_rowclock *rc);
/* pgs_rowclock_encode appends the compact blob form of rc to out. */
void pgs_rowclock_encode(const pgs_rowclock *rc, pgs_buf *out);
/* pgs_rowclock_decode parses a blob into rc (rc->cols/ncols preset; extra columns
 * in the blob beyond ncols are an error). */
pgs_rc pgs_rowclock_decode(const uint8_t *p, size_t len, pgs_rowclock *rc, pgs_err *err);
/*
 * pgs_rowclock_drop_col: the blob of a row clock of ncols columns without
 * column col (the later ones move down one), appended to out; the stamps
 * and versions of the others are kept (a dropped column, docs/MIGRATIONS.md).
 */
pgs_rc pgs_rowclock_drop_col(const uint8_t *p, size_t len, int ncols, int col, pgs_buf *out,
							 pgs_err *err);

/* ---- local edits (local.c) --------------------------------------------- */

typedef enum pgs_local_op
{
	PGS_LOCAL_INSERT,
	PGS_LOCAL_UPDATE,
	PGS_LOCAL_DELETE
} pgs_local_op;

typedef enum pgs_local_result
{
	PGS_LOCAL_WRITE, /* write rc as the row's clock */
	PGS_LOCAL_NONE,	 /* nothing to write (a delete of a deleted row, no column changed) */
	PGS_LOCAL_GSET	 /* refused: a grow-only table accepts only new rows */
} pgs_local_result;

/*
 * pgs_local_edit: the row clock after a local write (local.c has the rules).
 * rc: the row's clock as decoded (found) or with cl ignored (not found), its
 * ncols stamps set or zeroed; rewritten in place. changed[i]: column i was
 * written by an UPDATE (NULL: all). ver: this transaction's version; tick:
 * its HLC stamp. algo: the table's db_algo (database.h).
 */
pgs_local_result pgs_local_edit(pgs_rowclock *rc, bool found, pgs_local_op op, int algo,
								const bool *changed, int64_t ver, uint64_t tick);
/*
 * pgs_local_above_floor: after pgs_local_edit of a key without a clock row
 * (its cl 1, or 2 for a delete), moves the life above floor, the largest cl
 * a tombstone GC collected from the table (docs/DESIGN.md, "Tombstone GC
 * with a horizon"): to floor + 1 (+ 2), floor rounded up to even. floor 0
 * leaves it.
 */
void pgs_local_above_floor(pgs_rowclock *rc, int64_t floor);
/* pgs_local_stamp: one cell written locally: max(tick, stamp + 1), at ver, local site. */
void pgs_local_stamp(pgs_stamp *s, int64_t ver, uint64_t tick);

/* ---- merge ------------------------------------------------------------ */

typedef enum pgs_merge
{
	PGS_MERGE_LOSE = -1,
	PGS_MERGE_SAME = 0,
	PGS_MERGE_WIN = 1
} pgs_merge;

/* A stamp with its site resolved to the 16-byte site id (for tie breaks). */
typedef struct pgs_cellstamp
{
	uint64_t	   hlc;
	const uint8_t *site; /* 16 bytes */
} pgs_cellstamp;

pgs_merge pgs_merge_life(int64_t local_cl, int64_t in_cl);
pgs_merge pgs_merge_cell(int64_t local_cl, const pgs_cellstamp *local, int64_t in_cl,
						 const pgs_cellstamp *in);

/* ---- payloads -------------------------------------------------------- */

#define PGS_PAYLOAD_MAGIC "PGSY"
#define PGS_PAYLOAD_VERSION 2	  /* written */
#define PGS_PAYLOAD_VERSION_MIN 1 /* oldest read */
#define PGS_HEADER_LEN 56
#define PGS_MAX_BODY (1u << 30)
#define PGS_MAX_NAME 65535

typedef struct pgs_header
{
	uint8_t	 version;
	uint8_t	 flags;
	uint8_t	 origin[16];
	int64_t	 since;
	int64_t	 until;
	uint32_t body_len;
	uint32_t stored_len;
} pgs_header;

/* pgs_payload_header verifies magic, version, length and checksum and fills h. */
pgs_rc pgs_payload_header(const uint8_t *p, size_t len, pgs_header *h, pgs_err *err);
/* pgs_payload_body returns the (decompressed) body; *owned is set when the
 * caller must pgs_free(*body). Runs pgs_payload_header first. */
pgs_rc pgs_payload_body(const uint8_t *p, size_t len, pgs_header *h, const uint8_t **body,
						uint8_t **owned, pgs_err *err);
/* pgs_payload_origin: the site that built the payload, after full header verification. */
pgs_rc pgs_payload_origin(const uint8_t *p, size_t len, uint8_t origin[16]);
/* pgs_payload_until: the header's until, after full header verification. */
pgs_rc pgs_payload_until(const uint8_t *p, size_t len, int64_t *until, pgs_err *err);
/* pgs_payload_info renders the payload as JSON text (caller pgs_free()s). */
pgs_rc pgs_payload_info(const uint8_t *p, size_t len, char **json, pgs_err *err);

/* ---- decoded body ------------------------------------------------------ */

/* Table attributes (format 2): snapshot flags (docs/PAYLOAD.md). */
#define PGS_SNAP_BEGIN 1 /* this payload starts a snapshot of the table */
#define PGS_SNAP_END 2	 /* the snapshot is complete: forget rows not received */
#define PGS_SNAP_PART 4	 /* this payload's rows of the table are part of a snapshot */

typedef struct pgs_dict_table
{
	const uint8_t  *name;
	uint32_t		name_len;
	uint32_t		npk;
	uint32_t		ncols;
	const uint8_t **pk_names; /* npk name pointers (into the body) */
	uint32_t	   *pk_name_lens;
	const uint8_t **col_names;
	uint32_t	   *col_name_lens;
	bool			has_fingerprint;
	uint64_t		fingerprint; /* pgs_table_fingerprint of the sender's table */
	uint32_t		snap;		 /* PGS_SNAP_* */
	bool			has_salt;
	uint64_t		salt;	/* seed of the removal candidates' key hashes */
	uint32_t		nalias; /* former names of the sender's columns (attribute 4) */
	uint32_t	   *alias_cols;
	const uint8_t **alias_names;
	uint32_t	   *alias_name_lens;
} pgs_dict_table;

typedef struct pgs_change
{
	uint32_t  col; /* column index in the sender's dictionary */
	uint64_t  hlc;
	uint32_t  site; /* index into the payload's site dictionary */
	pgs_value value;
} pgs_change;

/* Kinds of row groups (format 2; a format 1 group is PGS_GROUP_CHANGES). */
typedef enum pgs_group_kind
{
	PGS_GROUP_CHANGES = 0,	 /* the row's changes since the pull's since */
	PGS_GROUP_WHOLE = 1,	 /* the same, carrying every written column of the row */
	PGS_GROUP_CANDIDATE = 2, /* a row the receiver may hold and must not keep: key hash only */
	PGS_GROUP_ABSENT = 3	 /* the sender has no row for this key the receiver may see */
} pgs_group_kind;

typedef struct pgs_group
{
	uint32_t	table;
	uint8_t		kind;	 /* pgs_group_kind */
	bool		whole;	 /* carries the whole row (kind WHOLE; format 1: every column) */
	uint64_t	hash;	 /* CANDIDATE: pgs_key_hash(salt, key) */
	int64_t		cl;		 /* CHANGES, WHOLE, CANDIDATE */
	uint32_t	cl_site; /* CHANGES, WHOLE, CANDIDATE */
	uint32_t	nchanges;
	pgs_value  *pk;		 /* npk values (not CANDIDATE), reader-owned scratch */
	pgs_change *changes; /* nchanges, reader-owned scratch */
} pgs_group;

/* A streaming reader over a verified body: dictionaries first, then groups. */
typedef struct pgs_reader
{
	uint8_t			version; /* payload format version */
	const uint8_t  *p;
	const uint8_t  *end;
	uint32_t		nsites;
	const uint8_t  *sites; /* nsites * 16 */
	uint32_t		ntables;
	pgs_dict_table *tables;
	uint64_t		nrows;
	uint64_t		row;
	uint64_t		prev_hlc;
	/* scratch for the current group */
	pgs_value  *pk_scratch;
	uint32_t	pk_cap;
	pgs_change *ch_scratch;
	uint32_t	ch_cap;
} pgs_reader;

pgs_rc pgs_reader_open(pgs_reader *r, uint8_t version, const uint8_t *body, size_t len,
					   pgs_err *err);
/* pgs_reader_next: PGS_OK with *done=false and g filled, or *done=true at the end
 * (trailing bytes are an error). g's arrays live until the next call. */
pgs_rc pgs_reader_next(pgs_reader *r, pgs_group *g, bool *done, pgs_err *err);
void   pgs_reader_close(pgs_reader *r);

/* pgs_value_put / pgs_value_get: the value encodings of docs/PAYLOAD.md. */
void   pgs_value_put(pgs_buf *b, const pgs_value *v); /* without type byte */
pgs_rc pgs_value_get(const uint8_t **p, const uint8_t *end, uint8_t type, pgs_value *v,
					 pgs_err *err);
int	   pgs_value_cmp(const pgs_value *a, const pgs_value *b);

/* pgs_key_encode appends a key as the payload encodes it (type byte + value each). */
void pgs_key_encode(pgs_buf *b, uint32_t npk, const pgs_value *pk);
/* pgs_key_hash: the hash of a key that removal candidates carry. */
uint64_t pgs_key_hash(uint64_t salt, uint32_t npk, const pgs_value *pk);
/* pgs_random64: 64 random bits (salts). */
uint64_t pgs_random64(void);

/* ---- the writer: the one place that writes the payload format ----------- */

typedef struct pgs_name
{
	const uint8_t *p;
	uint32_t	   len;
} pgs_name;

typedef struct pgs_wchange
{
	uint32_t  col;	/* index in the table's dictionary entry, strictly increasing */
	uint64_t  hlc;	/* valid stamp (pgs_hlc_valid) */
	uint32_t  site; /* payload site index (pgs_writer_site) */
	pgs_value value;
} pgs_wchange;

typedef struct pgs_wtable
{
	pgs_buf	 dict; /* name, key and column names, encoded */
	uint32_t npk;
	uint32_t ncols;
	bool	 has_fingerprint;
	uint64_t fingerprint;
	uint32_t snap;
	bool	 has_salt;
	uint64_t salt;
	uint32_t nalias;
	pgs_buf	 aliases; /* nalias x (varint column, name) */
} pgs_wtable;

/*
 * A payload being written. Sites and tables are added as they are used;
 * groups are appended; pgs_writer_seal writes header, dictionaries and the
 * groups and compresses. Appends never fail: an allocation failure is
 * sticky (oom) and reported by pgs_writer_seal.
 */
typedef struct pgs_writer
{
	pgs_buf		groups;
	uint64_t	ngroups;
	uint64_t	prev_hlc;
	pgs_buf		sites; /* nsites * 16 bytes */
	uint32_t	nsites;
	pgs_wtable *tables;
	uint32_t	ntables;
	uint32_t	tables_cap;
	bool		oom;
	size_t		body_len; /* set by pgs_writer_seal: the body before compression */
} pgs_writer;

void pgs_writer_init(pgs_writer *w);
void pgs_writer_free(pgs_writer *w);
/* pgs_writer_site: the payload index of a site, added if new (linear search). */
uint32_t pgs_writer_site(pgs_writer *w, const uint8_t site[16]);
/* pgs_writer_site_add: add a site known to be new; returns its index. */
uint32_t pgs_writer_site_add(pgs_writer *w, const uint8_t site[16]);
/* pgs_writer_table adds a dictionary entry and returns its index. */
uint32_t pgs_writer_table(pgs_writer *w, pgs_name name, uint32_t npk, const pgs_name *pk_names,
						  uint32_t ncols, const pgs_name *col_names);
void	 pgs_writer_table_fingerprint(pgs_writer *w, uint32_t table, uint64_t fp);
void	 pgs_writer_table_snap(pgs_writer *w, uint32_t table, uint32_t snap_flags); /* ORed */
void	 pgs_writer_table_salt(pgs_writer *w, uint32_t table, uint64_t salt);
/* pgs_writer_table_alias: column col of the table was once called name. */
void pgs_writer_table_alias(pgs_writer *w, uint32_t table, uint32_t col, pgs_name name);
/* pgs_writer_row: a row group (kind CHANGES or WHOLE) of n changes; a
 * deleted row (even cl) has none. */
void pgs_writer_row(pgs_writer *w, uint32_t table, bool whole, const pgs_value *pk, int64_t cl,
					uint32_t cl_site, uint32_t n, const pgs_wchange *ch);
void pgs_writer_candidate(pgs_writer *w, uint32_t table, uint64_t hash, int64_t cl,
						  uint32_t cl_site);
void pgs_writer_absent(pgs_writer *w, uint32_t table, const pgs_value *pk);
/*
 * pgs_writer_seal writes the payload into out (replacing its content):
 * header (origin, since, until, flags: PGS_FLAG_MORE may be passed), body,
 * zstd when compress and smaller, checksum. Errors: NOMEM, TOO_BIG.
 */
pgs_rc pgs_writer_seal(pgs_writer *w, const uint8_t origin[16], int64_t since, int64_t until,
					   uint8_t flags, bool compress, pgs_buf *out, pgs_err *err);

/* ---- the two drivers (engine calls these) --------------------------- */

struct db_conn;

typedef struct pgs_build_opts
{
	int64_t		   since;
	int64_t		   until;		 /* inclusive; from db_version_safe() */
	const uint8_t *exclude_site; /* NULL, or 16 bytes */
	int			   compress;	 /* 1 = zstd when smaller (default), 0 = never */
	uint32_t	   max_rows;	 /* chunking: at most this many row groups, 0 = all */
	const uint8_t *after;		 /* continuation token of the previous chunk, or NULL */
	size_t		   after_len;
	bool		   view;		 /* the receiver's view: snapshots (server pulls) */
	bool		   snapshot_all; /* view: every table is a snapshot (pinned in the token) */
	/*
	 * push to the only peer (a device's push to its server): a group is whole
	 * only when its life began here after since (made or learned); an edit of
	 * a life the receiver knew never is, so a receiver that lost the row to GC
	 * refuses it (PS001) instead of bringing it back (docs/DESIGN.md,
	 * "Tombstone GC").
	 */
	bool known_lives_partial;
	/*
	 * view builds, a group of receivers (exclude_site NULL): receives the
	 * 16-byte site id of every row left out as unseen (build.c), once per
	 * site; a receiver whose site is among them is not served by the build.
	 * NULL with exclude_site NULL: such rows go out as removal candidates.
	 */
	pgs_buf *unseen_sites;
} pgs_build_opts;

/* Header flag bits (docs/PAYLOAD.md). */
#define PGS_FLAG_ZSTD 1
#define PGS_FLAG_MORE 2 /* a chunk: more chunks of this pull follow */
#define PGS_TOKEN_VERSION 2
#define PGS_TOKEN_VIEW 1		 /* token flag: a view build */
#define PGS_TOKEN_SNAPSHOT_ALL 2 /* token flag: every table is a snapshot */
#define PGS_MAX_TOKEN 4000		 /* continuation token bytes (long keys: pull without max_rows) */
#define PGS_MAX_SEALED (PGS_MAX_TOKEN + 64) /* a token as an engine seals it (pg_view.c) */

/*
 * Pull cursors as clients store them (docs/PROTOCOL.md, "Cursors"), the one
 * text form of a pull position:
 *   "<since>[.<gen>]"                 the since of the next pull, and the
 *                                     generation of the device's view
 *   "c<since>.<gen>.<hex>"            inside a chunked pull: the since of the
 *                                     pull and the sealed continuation token
 * ASCII, at most PGS_MAX_CURSOR characters.
 */
#define PGS_MAX_CURSOR (1 + 20 + 1 + 10 + 1 + 2 * PGS_MAX_SEALED)
typedef struct pgs_cursor
{
	int64_t	 since;
	int32_t	 gen;
	uint8_t *sealed; /* NULL unless a chunk cursor: caller's buffer */
	size_t	 sealed_len;
} pgs_cursor;
/* pgs_cursor_parse: false when s is not a cursor; sealed bytes go to buf
 * (PGS_MAX_SEALED bytes). */
bool pgs_cursor_parse(const char *s, pgs_cursor *c, uint8_t *buf);
/* pgs_cursor_format writes the cursor text (NUL-terminated) into out. */
void pgs_cursor_format(pgs_buf *out, int64_t since, int32_t gen, const uint8_t *sealed,
					   size_t sealed_len);

/*
 * A continuation token (docs/PAYLOAD.md, "Chunks"): where the next chunk of a
 * chunked build starts. Decoded from untrusted bytes: pk points into the
 * token (TEXT/BLOB) or into pk_store; at most PGS_TOKEN_MAX_PK keys.
 */
#define PGS_TOKEN_MAX_PK 32
typedef struct pgs_token
{
	int64_t		   since;
	int64_t		   until;
	uint32_t	   flags; /* PGS_TOKEN_* */
	const uint8_t *table; /* the table's payload name (points into the token) */
	uint32_t	   table_len;
	uint32_t	   npk;
	pgs_value	   pk[PGS_TOKEN_MAX_PK];
} pgs_token;

pgs_rc pgs_token_decode(const uint8_t *p, size_t len, pgs_token *t, pgs_err *err);
void   pgs_token_encode(pgs_buf *b, int64_t since, int64_t until, uint32_t flags,
						const uint8_t *table, uint32_t table_len, uint32_t npk, const pgs_value *pk);
/*
 * pgs_payload_next_token: the continuation token for the chunk after this
 * payload (built by this replica), or tok->len == 0 when the payload is the
 * last chunk or was not chunked. Reads the payload's last row group.
 */
pgs_rc pgs_payload_next_token(struct db_conn *db, const uint8_t *p, size_t len, pgs_buf *tok,
							  pgs_err *err);

typedef struct pgs_build_stats
{
	uint64_t rows;
	uint64_t candidates; /* rows sent as removal candidates (included in rows) */
	uint64_t changes;
	uint64_t value_bytes; /* raw bytes of the values, keys included */
	uint64_t body_len;
} pgs_build_stats;

/* pgs_build: a payload of every synced table's changes in (since, until].
 * out is left empty (len 0) when there is nothing to send. When next_token
 * is not NULL it receives the continuation token of the next chunk (len 0
 * after the last chunk). */
pgs_rc pgs_build(struct db_conn *db, const pgs_build_opts *o, pgs_buf *out, pgs_buf *next_token,
				 pgs_build_stats *st, pgs_err *err);
/*
 * pgs_build_rows: a payload of exactly these rows, whole, as the caller may
 * see them, each row it may not see (or that is gone) as ABSENT: the answer
 * to a receiver that asks for rows it lacks (POST /v1/rows). since and
 * until are 0: it is not a pull.
 */
struct db_table;
typedef struct pgs_row_ref
{
	struct db_table *t;
	const pgs_value *pk;
} pgs_row_ref;
pgs_rc pgs_build_rows(struct db_conn *db, const pgs_row_ref *rows, uint32_t n, pgs_buf *out,
					  pgs_err *err);
/* pgs_table_fingerprint: hash of a table's key and column names (docs/PAYLOAD.md). */
struct db_table_info;
uint64_t pgs_table_fingerprint(const struct db_table_info *ti);

typedef struct pgs_apply_stats
{
	int64_t won; /* winning column changes + row-life changes */
	int64_t lost;
	int64_t rejected;	   /* rows refused (reported through db_reject) */
	int64_t changes;	   /* column changes read */
	int64_t rows_inserted; /* rows that started a life here */
	int64_t rows_updated;  /* existing rows with winning columns */
	int64_t rows_deleted;
	int64_t rows_forgotten; /* moved out of the view: removed locally */
	int64_t held;			/* groups kept aside (unknown table or column) */
	int64_t restamped;		/* winning cells stored in another form: re-stamped */
	int64_t rows;			/* row groups in the payload (rows, whatever their fate) */
} pgs_apply_stats;

/*
 * pgs_apply merges a payload. The engine wraps it in a savepoint and rolls
 * back on any error: either everything (minus reported rejections and held
 * changes) or nothing. With careful false, a failing row makes it return
 * PGS_ERR_CAREFUL: roll back and call it again with careful true.
 */
pgs_rc pgs_apply(struct db_conn *db, const uint8_t *payload, size_t len, bool careful,
				 pgs_apply_stats *st, pgs_err *err);

#endif /* PGSYNC_CORE_H */
