#!/usr/bin/env bash
# scripts/test-pg-matrix.sh [VERSION...] — build pg_ext and run the Postgres
# suite (test/pg/cluster.sh: pg_regress + test/pg/test_*.py on a throwaway
# cluster) against each PostgreSQL major version. `make test-pg
# VERSIONS="15 16 17 18"` calls it; the default is all four.
#
#   15  the host (Debian 12), as in `make test`
#   17  a Debian trixie chroot (scripts/pg-chroot.sh)
#   18  a Debian sid chroot
#   16  no Debian suite ships it (bookworm has 15, trixie 17, sid 18), so
#       there is nothing to build against or run here: reported as SKIP
#
# In a chroot the tracked and untracked (not ignored) files of this checkout
# are copied to a private directory there, the SQLite extension is built
# (test_chunk.py and test_cross.py load it) and cluster.sh runs against a
# private copy of that version's PostgreSQL (scripts/pg-tree.sh), as root
# with the cluster as the chroot's postgres user. The checkout's own build
# output is never touched by another version's build.
#
# Prints "PASS pgN" / "FAIL pgN" / "SKIP pgN" per version with its time, the
# full log of each in build/pg-matrix/pgN.log, and a closing
# "matrix: N passed, N failed, N skipped"; exits 1 when a version failed.
# Needs root (chroot, debootstrap on first use). Chroots are cached in
# $PGSYNC_CHROOT_CACHE (default /var/cache/pgsync-chroots).
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VERSIONS=${*:-15 16 17 18}
LOGDIR=$ROOT/build/pg-matrix
mkdir -p "$LOGDIR"

suite_of() {
	case "$1" in
	15) echo host ;;
	17) echo trixie ;;
	18) echo sid ;;
	16) echo none ;;
	*) echo unsupported ;;
	esac
}

# run_chroot V SUITE LOG: the suite for version V inside the SUITE chroot
run_chroot() {
	local v=$1 suite=$2 log=$3 R W rc
	R=$(bash "$ROOT/scripts/pg-chroot.sh" "$suite" "$v" 2>>"$log") || return 1
	W=$(mktemp -d "$R/tmp/pgsync-src.XXXXXX") && chmod 755 "$W" || return 1
	(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
		tar --null -T - -cf - 2>/dev/null) | tar -xf - -C "$W" || { rm -rf "$W"; return 1; }
	# /proc and /dev (shared memory) in a private mount namespace: gone when
	# the run ends, whatever happens
	unshare --mount --propagation private -- sh -c '
		R=$1; shift
		mount -t proc proc "$R/proc" && mount --rbind /dev "$R/dev" || exit 1
		exec chroot "$R" "$@"' sh "$R" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
		HOME=/root LANG=C.UTF-8 SYS_PG_CONFIG="/usr/lib/postgresql/$v/bin/pg_config" \
		bash -c 'cd "$1" || exit 1
			rc=0
			if make -s all >sqlite-build.log 2>&1; then
				echo "PASS build/sqlitesync.so"
			else
				cat sqlite-build.log; echo "FAIL build/sqlitesync.so"; rc=1
			fi
			bash test/pg/cluster.sh || rc=1
			exit $rc' sh "${W#"$R"}" >>"$log" 2>&1
	rc=$?
	rm -rf "$W"
	return $rc
}

passed=0
failed=0
skipped=0
start_all=$(date +%s)
for v in $VERSIONS; do
	log=$LOGDIR/pg$v.log
	: >"$log"
	suite=$(suite_of "$v")
	t0=$(date +%s)
	case "$suite" in
	none)
		echo "SKIP pg$v (no Debian suite ships PostgreSQL $v: bookworm has 15, trixie 17, sid 18; docs/PG.md)"
		skipped=$((skipped + 1))
		continue
		;;
	unsupported)
		echo "FAIL pg$v (pgsync supports PostgreSQL 15 to 18)"
		failed=$((failed + 1))
		continue
		;;
	host)
		SYS_PG_CONFIG=/usr/lib/postgresql/$v/bin/pg_config bash "$ROOT/test/pg/cluster.sh" >"$log" 2>&1
		rc=$?
		;;
	*)
		run_chroot "$v" "$suite" "$log"
		rc=$?
		;;
	esac
	secs=$(($(date +%s) - t0))
	counts=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$log" | tail -n 1)
	server=$(sed -nE 's/^server: postgres \(PostgreSQL\) ([^ ]+).*/\1/p' "$log" | head -n 1)
	what="${suite}, ${server:-server not started}, ${counts:-no count}, ${secs} s"
	if [ "$rc" = 0 ]; then
		echo "PASS pg$v ($what)"
		passed=$((passed + 1))
	else
		echo "FAIL pg$v ($what; log: ${log#"$ROOT"/})"
		grep -E '^FAIL ' "$log" | sed 's/^/    /'
		failed=$((failed + 1))
	fi
done
echo "matrix took $(($(date +%s) - start_all)) s"
echo "matrix: $passed passed, $failed failed, $skipped skipped"
[ "$failed" = 0 ]
