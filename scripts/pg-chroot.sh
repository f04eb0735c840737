#!/usr/bin/env bash
# scripts/pg-chroot.sh SUITE [VERSION...] — a cached Debian chroot with the
# given PostgreSQL major versions (server, headers) and everything pgsync's
# Postgres tests need. Prints the chroot's path.
#
#   bash scripts/pg-chroot.sh trixie 17
#   bash scripts/pg-chroot.sh sid 18
#
# The chroot lives outside the checkout, in $PGSYNC_CHROOT_CACHE/SUITE
# (default /var/cache/pgsync-chroots/SUITE), and is reused when its stamp
# file lists the same packages; delete the directory to start over. It is
# made with debootstrap from Debian's own mirror (needs root). No cluster is
# created and no service is started inside it: the tests run their own
# throwaway clusters (test/pg/cluster.sh).
set -euo pipefail
SUITE=${1:?usage: pg-chroot.sh SUITE [VERSION...]}
shift
CACHE=${PGSYNC_CHROOT_CACHE:-/var/cache/pgsync-chroots}
MIRROR=${PGSYNC_CHROOT_MIRROR:-http://deb.debian.org/debian}
R=$CACHE/$SUITE

pkgs=(build-essential pkg-config make sqlite3 libsqlite3-dev libzstd-dev libxxhash-dev
      libcjson-dev libcurl4-openssl-dev python3 python3-psycopg2)
for v in "$@"; do
	pkgs+=("postgresql-$v" "postgresql-server-dev-$v")
done
want="${pkgs[*]}"

if [ "$(id -u)" != 0 ]; then
	echo "pg-chroot.sh: needs root (debootstrap, chroot)" >&2
	exit 1
fi
mkdir -p "$CACHE"
exec 9>"$CACHE/$SUITE.lock"	# one run at a time builds a given suite
flock 9
if [ -f "$R/.pgsync-stamp" ] && [ "$(cat "$R/.pgsync-stamp")" = "$want" ]; then
	echo "$R"
	exit 0
fi

if ! command -v debootstrap >/dev/null; then
	echo "pg-chroot.sh: installing debootstrap" >&2
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi

log=$CACHE/$SUITE.log
if [ ! -x "$R/usr/bin/apt-get" ] || [ ! -f "$R/.pgsync-base" ]; then
	echo "pg-chroot.sh: debootstrap $SUITE into $R (log: $log)" >&2
	rm -rf --one-file-system "$R"
	# in a private mount namespace: what debootstrap mounts in the target
	# never outlives it, even when it fails
	unshare --mount --propagation private -- \
		debootstrap --variant=minbase "$SUITE" "$R" "$MIRROR" >"$log" 2>&1 ||
		{ tail -n 20 "$log" >&2; exit 1; }
	touch "$R/.pgsync-base"
fi

# in the chroot: /proc and /dev for apt and maintainer scripts, in a private
# mount namespace so nothing stays mounted when this script ends
in_chroot() {
	unshare --mount --propagation private -- sh -c '
		R=$1; shift
		mount -t proc proc "$R/proc"
		mount --rbind /dev "$R/dev"
		exec chroot "$R" "$@"' sh "$R" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
		HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"
}

echo "pg-chroot.sh: installing ${pkgs[*]} into $R (log: $log)" >&2
# no services start in the chroot; postgresql-common creates no cluster
printf '#!/bin/sh\nexit 101\n' >"$R/usr/sbin/policy-rc.d"
chmod 755 "$R/usr/sbin/policy-rc.d"
cp /etc/resolv.conf "$R/etc/resolv.conf" 2>/dev/null || true
mkdir -p "$R/etc/postgresql-common/createcluster.d"
echo "create_main_cluster = false" >"$R/etc/postgresql-common/createcluster.d/pgsync.conf"
# sid's Release file is only valid for a week and the mirror may serve an
# older one; the signature is still checked
apt=(apt-get -o Acquire::Check-Valid-Until=false)
{
	in_chroot "${apt[@]}" update -q &&
		in_chroot "${apt[@]}" install -y -q --no-install-recommends "${pkgs[@]}" &&
		in_chroot apt-get clean
} >>"$log" 2>&1 || { tail -n 30 "$log" >&2; exit 1; }
echo "$want" >"$R/.pgsync-stamp"
echo "$R"
