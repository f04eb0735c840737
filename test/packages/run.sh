#!/usr/bin/env bash
# test/packages/run.sh — `make test-packages` (and part of `make test`):
#
#   1. build the Debian source and binary packages from a copy of this
#      checkout (tracked and new files, no build products) the Debian way:
#      pg_buildext updatecontrol, dpkg-buildpackage;
#   2. lintian on them (source and binaries): errors and warnings fail
#      (overrides in debian/ say why they are there), info, pedantic and
#      experimental tags are printed;
#   3. make install / make uninstall into a staging DESTDIR;
#   4. dpkg -i the packages on this machine and run test/packages/smoke.py,
#      which uses the installed files only;
#   5. dpkg --purge them and check that nothing is left; put back any file
#      the packages replaced that was there before (say, a pgsync installed
#      into the system PostgreSQL by hand), and delete the pgsync user if
#      this test created it. The machine is left as it was found.
#
# Needs root (dpkg -i); prints "SKIP" and succeeds otherwise. Runs one at a
# time on a machine (flock), prints "PASS name" / "FAIL name" and timings.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
passed=0
failed=0
t_start=$(date +%s)

result() { # result NAME STATUS [SECONDS]
	if [ "$2" = 0 ]; then
		echo "PASS $1${3:+ (${3}s)}"
		passed=$((passed + 1))
	else
		echo "FAIL $1${3:+ (${3}s)}"
		failed=$((failed + 1))
	fi
}
since() { echo $(($(date +%s) - $1)); }

if [ "$(id -u)" != 0 ]; then
	echo "SKIP test-packages: installing packages needs root (sudo make test-packages)"
	exit 0
fi
exec 9>/run/lock/pgsync-test-packages.lock
if ! flock -w 600 9; then
	echo "FAIL test-packages: another package test has held the lock for 10 minutes"
	exit 1
fi
bash scripts/deps packages || { echo "FAIL test-packages (missing packages)"; exit 1; }

WORK=$(mktemp -d /tmp/pgsync-pkg-XXXXXX)
chmod 755 "$WORK"
INSTALLED=()
USER_CREATED=0
getent passwd pgsync >/dev/null || USER_CREATED=1

cleanup() {
	if [ ${#INSTALLED[@]} -gt 0 ]; then
		dpkg --purge "${INSTALLED[@]}" >>"$WORK/purge.log" 2>&1
	fi
	if [ -d "$WORK/backup" ]; then
		(cd "$WORK/backup" && find . -type f -print0 | xargs -0 -r cp -a --parents -t /)
	fi
	if [ "$USER_CREATED" = 1 ] && getent passwd pgsync >/dev/null; then
		deluser --system pgsync >/dev/null 2>&1
		getent group pgsync >/dev/null && delgroup --system pgsync >/dev/null 2>&1
	fi
	rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- 1. build -------------------------------------------------------------------
t=$(date +%s)
mkdir -p "$WORK/src"
git ls-files -co --exclude-standard | tar -cf - -T - | tar -xf - -C "$WORK/src"
(cd "$WORK/src" && pg_buildext updatecontrol && dpkg-buildpackage -us -uc) >"$WORK/build.log" 2>&1
rc=$?
[ $rc = 0 ] || tail -40 "$WORK/build.log"
result "package build (dpkg-buildpackage source and binaries, pg_buildext for $(cd "$WORK/src" && pg_buildext supported-versions | xargs))" $rc "$(since "$t")"
[ $rc = 0 ] || exit 1
mapfile -t DEBS < <(ls "$WORK"/*.deb | grep -v -- '-dbgsym_')
PKGS=()
for d in "${DEBS[@]}"; do PKGS+=("$(dpkg-deb -f "$d" Package)"); done
echo "  built: ${PKGS[*]}"

# ---- 2. lintian -----------------------------------------------------------------
t=$(date +%s)
lintian --pedantic --display-info --display-experimental --show-overrides "$WORK"/*.dsc "${DEBS[@]}" \
	>"$WORK/lintian.log" 2>&1
grep -E '^[EWIPXO]: ' "$WORK/lintian.log" | sed 's/^/  /'
n_bad=$(grep -cE '^[EW]: ' "$WORK/lintian.log")
echo "  lintian: $n_bad errors and warnings, $(grep -cE '^[IPX]: ' "$WORK/lintian.log") info/pedantic/experimental tags," \
	"$(grep -c '^O: ' "$WORK/lintian.log") overridden (debian/*.lintian-overrides say why)"
result "lintian (no errors or warnings)" $((n_bad > 0)) "$(since "$t")"

# ---- 3. make install / uninstall --------------------------------------------------
t=$(date +%s)
stage=$WORK/stage
(
	cd "$WORK/src" &&
		make -s install DESTDIR="$stage" PREFIX=/usr PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config &&
		for f in usr/bin/pgsync-server usr/lib/sqlitesync.so usr/lib/systemd/system/pgsync-server.service \
			usr/lib/sysusers.d/pgsync-server.conf etc/pgsync/pgsync-server.conf usr/share/man/man1/pgsync-server.1 \
			usr/share/doc/pgsync/SERVER.md usr/lib/postgresql/15/lib/pgsync.so \
			usr/share/postgresql/15/extension/pgsync.control; do
			[ -f "$stage/$f" ] || { echo "make install did not install /$f"; exit 1; }
		done &&
		grep -q '^ExecStart=/usr/bin/pgsync-server --config /etc/pgsync/pgsync-server.conf$' \
			"$stage/usr/lib/systemd/system/pgsync-server.service" &&
		make -s uninstall DESTDIR="$stage" PREFIX=/usr PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config &&
		left=$(find "$stage" -type f) && { [ -z "$left" ] || { echo "make uninstall left: $left"; exit 1; }; }
) >"$WORK/install.log" 2>&1
rc=$?
[ $rc = 0 ] || tail -20 "$WORK/install.log"
result "make install / make uninstall (DESTDIR, PREFIX=/usr)" $rc "$(since "$t")"

# ---- 4. install on this machine, smoke test ---------------------------------------
t=$(date +%s)
for p in "${PKGS[@]}"; do
	if dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed'; then
		echo "FAIL package install: $p is already installed; this test installs and purges it, remove it first"
		exit 1
	fi
done
# files the packages would overwrite that dpkg does not know (make install by hand)
for d in "${DEBS[@]}"; do
	dpkg-deb -c "$d" | awk '$1 !~ /^d/ {print substr($6, 2)}'
done | while read -r f; do
	if [ -e "$f" ] && ! dpkg -S "$f" >/dev/null 2>&1; then
		mkdir -p "$WORK/backup$(dirname "$f")" && cp -a "$f" "$WORK/backup$f"
	fi
done
if [ -d "$WORK/backup" ]; then
	echo "  $(find "$WORK/backup" -type f | wc -l) files of the packages exist outside dpkg (installed by hand?), in:" \
		"$(cd "$WORK/backup" && find . -type f -printf '/%h\n' | sed 's#^/\./#/#' | sort -u | xargs)"
	echo "  kept aside, put back after the purge"
fi
INSTALLED=("${PKGS[@]}")
# apt-daily on a freshly booted machine may hold dpkg's lock: wait for it
# (up to 10 minutes), as apt-get's DPkg::Lock::Timeout does in scripts/deps
for _ in $(seq 60); do
	dpkg -i "${DEBS[@]}" >"$WORK/dpkg.log" 2>&1
	rc=$?
	[ $rc = 0 ] || ! grep -qE "frontend lock|database is locked" "$WORK/dpkg.log" || { sleep 10; continue; }
	break
done
[ $rc = 0 ] || cat "$WORK/dpkg.log"
result "dpkg -i ${PKGS[*]}" $rc "$(since "$t")"
if [ $rc = 0 ]; then
	t=$(date +%s)
	mkdir -p "$WORK/smoke"
	cp test/packages/smoke.py "$WORK/smoke.py"
	# from the work directory, with nothing of the tree on any path
	(cd "$WORK" && env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 /usr/bin/python3 "$WORK/smoke.py" "$WORK/smoke") \
		>"$WORK/smoke.log" 2>&1
	rc=$?
	sed 's/^/  /' "$WORK/smoke.log"
	result "smoke test against the installed files" $rc "$(since "$t")"
fi

# ---- 5. purge: nothing left -------------------------------------------------------
t=$(date +%s)
dpkg --purge "${INSTALLED[@]}" >"$WORK/purge.log" 2>&1
rc=$?
INSTALLED=()
left=$(for d in "${DEBS[@]}"; do dpkg-deb -c "$d" | awk '$1 !~ /^d/ {print substr($6, 2)}'; done |
	while read -r f; do [ -e "$f" ] && [ ! -e "$WORK/backup$f" ] && echo "$f"; done)
[ -d /etc/pgsync ] && left="$left /etc/pgsync"
ls /var/lib/systemd/deb-systemd-helper-enabled/ 2>/dev/null | grep -q pgsync && left="$left deb-systemd-helper state"
[ -n "$left" ] && { echo "  left after purge: $left"; rc=1; }
[ $rc = 0 ] || cat "$WORK/purge.log"
result "dpkg --purge leaves nothing behind" $rc "$(since "$t")"

echo "test-packages: $passed passed, $failed failed in $(since "$t_start")s"
[ "$failed" = 0 ]
