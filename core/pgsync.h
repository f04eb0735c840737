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

#define PGS_VERSION "0.1.0"

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
	PGS_ERR_DB			/* any other engine error */
} pgs_rc;

typedef struct pgs_err
{
	pgs_rc rc;
	char   msg[256];
	char   detail[1024];
	char   hint[256];
} pgs_err;

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
/* pgs_uuid7 fills out with a fresh UUIDv7 (48-bit ms time, random rest). */
pgs_rc pgs_uuid7(uint8_t out[16], pgs_err *err);
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
/* pgs_hlc_tick returns the next local stamp after last (>= now). */
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
#define PGS_PAYLOAD_VERSION 1
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
/* pgs_payload_until: the header's until, after full header verification. */
pgs_rc pgs_payload_until(const uint8_t *p, size_t len, int64_t *until, pgs_err *err);
/* pgs_payload_info renders the payload as JSON text (caller pgs_free()s). */
pgs_rc pgs_payload_info(const uint8_t *p, size_t len, char **json, pgs_err *err);

/* ---- decoded body ------------------------------------------------------ */

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
} pgs_dict_table;

typedef struct pgs_change
{
	uint32_t  col; /* column index in the sender's dictionary */
	uint64_t  hlc;
	uint32_t  site; /* index into the payload's site dictionary */
	pgs_value value;
} pgs_change;

typedef struct pgs_group
{
	uint32_t	table;
	int64_t		cl;
	uint32_t	cl_site;
	uint32_t	nchanges;
	pgs_value  *pk;		 /* npk values, reader-owned scratch */
	pgs_change *changes; /* nchanges, reader-owned scratch */
} pgs_group;

/* A streaming reader over a verified body: dictionaries first, then groups. */
typedef struct pgs_reader
{
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

pgs_rc pgs_reader_open(pgs_reader *r, const uint8_t *body, size_t len, pgs_err *err);
/* pgs_reader_next: PGS_OK with *done=false and g filled, or *done=true at the end
 * (trailing bytes are an error). g's arrays live until the next call. */
pgs_rc pgs_reader_next(pgs_reader *r, pgs_group *g, bool *done, pgs_err *err);
void   pgs_reader_close(pgs_reader *r);

/* pgs_value_put / pgs_value_get: the value encodings of docs/PAYLOAD.md. */
void   pgs_value_put(pgs_buf *b, const pgs_value *v); /* without type byte */
pgs_rc pgs_value_get(const uint8_t **p, const uint8_t *end, uint8_t type, pgs_value *v,
					 pgs_err *err);
int	   pgs_value_cmp(const pgs_value *a, const pgs_value *b);

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
} pgs_build_opts;

/* Header flag bits (docs/PAYLOAD.md). */
#define PGS_FLAG_ZSTD 1
#define PGS_FLAG_MORE 2 /* a chunk: more chunks of this pull follow */
#define PGS_TOKEN_VERSION 1
#define PGS_MAX_TOKEN 65536 /* continuation token bytes (long keys) */

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
	const uint8_t *table; /* the table's payload name (points into the token) */
	uint32_t	   table_len;
	uint32_t	   npk;
	pgs_value	   pk[PGS_TOKEN_MAX_PK];
} pgs_token;

pgs_rc pgs_token_decode(const uint8_t *p, size_t len, pgs_token *t, pgs_err *err);
void   pgs_token_encode(pgs_buf *b, int64_t since, int64_t until, const uint8_t *table,
						uint32_t table_len, uint32_t npk, const pgs_value *pk);
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
	uint64_t changes;
	uint64_t value_bytes; /* raw bytes of the values, keys included */
	uint64_t body_len;
} pgs_build_stats;

/* pgs_build: a payload of every synced table's changes in (since, until].
 * out is left empty (len 0) when there is no change. */
pgs_rc pgs_build(struct db_conn *db, const pgs_build_opts *o, pgs_buf *out, pgs_build_stats *st,
				 pgs_err *err);

typedef struct pgs_apply_stats
{
	int64_t won; /* winning column changes + row-life changes */
	int64_t lost;
	int64_t rejected; /* rows the engine refused (permissions) */
	int64_t changes;  /* column changes read */
} pgs_apply_stats;

/* pgs_apply merges a payload. The engine wraps it in a savepoint and rolls back
 * on any error: either everything (minus reported rejections) or nothing. */
pgs_rc pgs_apply(struct db_conn *db, const uint8_t *payload, size_t len, pgs_apply_stats *st,
				 pgs_err *err);

#endif /* PGSYNC_CORE_H */
