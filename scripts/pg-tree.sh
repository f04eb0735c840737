#!/usr/bin/env bash
# scripts/pg-tree.sh [DIR] — a private, relocated copy of the system's
# PostgreSQL 15 (binaries copied, libraries linked, share copied) under DIR
# (default build/pgtree), with this checkout's pgsync extension installed
# into it. Prints the path of its pg_config. SYS_PG_CONFIG names the pg_config
# of another installed major version to copy instead.
#
# Why: the tests install the extension they test into this tree instead of
# the system's PostgreSQL, so several checkouts (or a CI run beside a
# working copy) never overwrite each other's pgsync.so, and the tests need
# no root for the install. PostgreSQL finds its share and lib directories
# relative to its binaries, so the copy is self-contained.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SYS_PG_CONFIG=${SYS_PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
DIR=${1:-$ROOT/build/pgtree}
bindir=$($SYS_PG_CONFIG --bindir)
pkglibdir=$($SYS_PG_CONFIG --pkglibdir)
sharedir=$($SYS_PG_CONFIG --sharedir)
incdirs="$($SYS_PG_CONFIG --includedir) $($SYS_PG_CONFIG --pkgincludedir)"
T_BIN=$DIR$bindir
if [ ! -x "$T_BIN/postgres" ] || [ "$T_BIN/postgres" -ot "$bindir/postgres" ]; then
	rm -rf "$DIR"
	mkdir -p "$(dirname "$T_BIN")" "$(dirname "$DIR$pkglibdir")" "$(dirname "$DIR$sharedir")"
	cp -a "$bindir" "$T_BIN"
	[ -d "$DIR$pkglibdir" ] || cp -as "$pkglibdir" "$DIR$pkglibdir"
	cp -a "$sharedir" "$DIR$sharedir"
	for d in $incdirs; do	# headers for PGXS builds: links to the system's
		[ -e "$DIR$d" ] && continue
		mkdir -p "$(dirname "$DIR$d")"
		ln -s "$d" "$DIR$d"
	done
	chmod -R a+rX "$DIR"
fi
# The library directory is links to the system's files; pgsync's own must be
# real files of the tree, or installing into the tree would write through a
# link into the system's PostgreSQL (llvm-lto -o does follow the link of
# bitcode/pgsync.index.bc when the system has a pgsync of its own).
for f in "$DIR$pkglibdir/pgsync.so" "$DIR$pkglibdir/bitcode/pgsync.index.bc"; do
	if [ -L "$f" ]; then rm -f "$f"; fi
done
if [ -d "$DIR$pkglibdir/bitcode/pgsync" ]; then find "$DIR$pkglibdir/bitcode/pgsync" -type l -delete; fi
PG_CONFIG=$T_BIN/pg_config
if [ "${PG_TREE_NO_INSTALL:-0}" != 1 ]; then
	make -s -C "$ROOT/pg_ext" PG_CONFIG="$PG_CONFIG" >/dev/null
	make -s -C "$ROOT/pg_ext" PG_CONFIG="$PG_CONFIG" install >/dev/null
fi
echo "$PG_CONFIG"
