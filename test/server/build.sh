#!/usr/bin/env bash
# test/server/build.sh WORKDIR — build what the server tests, the server
# benchmark and the full demo need, and write WORKDIR/env.sh with the paths:
#   - pg_ext installed into a private copy of PostgreSQL (scripts/pg-tree.sh);
#   - server/pgsync-server (SANITIZE=1: server/pgsync-server-asan);
#   - the SQLite extension with the sync_network_* functions. Until the lead
#     registers sl_network in sqlite_ext/sqlitesync.c, a patched copy of that
#     entry point is compiled instead (the real file is not touched).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
WORK=${1:?usage: build.sh WORKDIR}
log="$WORK/build.log"
fail() { cat "$log" >&2; echo "FAIL build-$1"; exit 1; }

echo "build: pg_ext (into a private PostgreSQL tree, scripts/pg-tree.sh)" >&2
PG_CONFIG=$(bash scripts/pg-tree.sh 2>"$log") || fail pg_ext

echo "build: server" >&2
if [ "${SANITIZE:-0}" = 1 ]; then
  make -C server pgsync-server-asan >"$log" 2>&1 || fail server
  SERVER_BIN=$ROOT/server/pgsync-server-asan
else
  make -C server >"$log" 2>&1 || fail server
  SERVER_BIN=$ROOT/server/pgsync-server
fi

echo "build: sqlite extension with sync_network_*" >&2
mkdir -p "$WORK/ext"
CFLAGS_EXT="-O2 -g"
[ "${SANITIZE:-0}" = 1 ] && CFLAGS_EXT="-O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer"
ENTRY=sqlite_ext/sqlitesync.c
if ! grep -q sl_network_register "$ENTRY"; then
  sed -e 's|#include "sl_internal.h"|#include "sl_internal.h"\n#include "sl_network.h"|' \
      -e 's|^\tsqlite3_commit_hook(db, on_commit, c);|\tif (sl_network_register(db, c) != SQLITE_OK)\n\t\treturn SQLITE_ERROR;\n\tsqlite3_commit_hook(db, on_commit, c);|' \
      "$ENTRY" > "$WORK/ext/sqlitesync.c"
  ENTRY=$WORK/ext/sqlitesync.c
fi
# shellcheck disable=SC2046,SC2086
gcc -std=c11 -D_GNU_SOURCE -fPIC -shared $CFLAGS_EXT -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes \
  -I"$ROOT" -I"$ROOT/sqlite_ext" -o "$WORK/ext/sqlitesync.so" core/*.c \
  $(ls sqlite_ext/*.c | grep -v '/sqlitesync.c$') "$ENTRY" \
  -lzstd -lxxhash -lcjson -lm -lcurl >"$log" 2>&1 || fail sqlite-extension

if [ "${VALGRIND:-0}" = 1 ]; then   # run.sh reads the logs after the tests
  mkdir -p "$WORK/valgrind"
  cat > "$WORK/pgsync-server-vg" <<WRAP
#!/bin/sh
exec valgrind --quiet --leak-check=full --show-leak-kinds=definite,indirect \\
  --errors-for-leak-kinds=definite,indirect --log-file=$WORK/valgrind/server.%p.log $SERVER_BIN "\$@"
WRAP
  chmod +x "$WORK/pgsync-server-vg"
  SERVER_BIN=$WORK/pgsync-server-vg
fi

cat > "$WORK/env.sh" <<ENV
export PGSYNC_PGBIN=$($PG_CONFIG --bindir)
export PGSYNC_SERVER_BIN=$SERVER_BIN
export PGSYNC_SQLITE_EXT=$WORK/ext/sqlitesync.so
export PGSYNC_TEST_TMP=$WORK
ENV
