/*
 * filter.h — row-level security for pulls (see filter.c).
 */
#ifndef PGSYNC_SERVER_FILTER_H
#define PGSYNC_SERVER_FILTER_H

#include "server.h"

typedef struct filter_result
{
	bool	 changed; /* false: send the original payload */
	uint8_t *payload; /* malloc'd; NULL when every row was dropped */
	size_t	 len;
	int64_t	 kept;
	int64_t	 dropped;
	bool	 in_txn; /* a transaction was begun: COMMIT it */
} filter_result;

/*
 * filter_payload keeps the row groups of payload p whose row the token's
 * role (a) can SELECT. Deletions are kept. It may begin a transaction as
 * that role (out->in_txn: the caller commits or rolls back). Returns false
 * with e filled (and *broken when the connection died).
 */
bool filter_payload(PGconn *conn, const auth_info *a, const uint8_t *p, size_t len,
					filter_result *out, bool *broken, srv_error *e);
/* sync_begin_as (sync.c): BEGIN; SET LOCAL ROLE; claims — in one round trip. */
bool sync_begin_as(PGconn *conn, const auth_info *a, bool *broken, bool *retry, srv_error *e);

#endif
