/*
 * sl_network.h — the network client of the SQLite extension: sync with a
 * pgsync-server over HTTP (docs/PROTOCOL.md). See sl_network.c.
 */
#ifndef SL_NETWORK_H
#define SL_NETWORK_H

#include "sl_internal.h"

/*
 * sl_network_register adds the sync_network_* SQL functions to db; c is the
 * connection's sqlitesync state. Returns an SQLite result code.
 */
int			sl_network_register(sqlite3 *db, db_conn *c);

#endif
