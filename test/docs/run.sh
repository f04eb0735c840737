#!/usr/bin/env bash
# test/docs/run.sh — run every SQL example of README.md and docs/*.md
# (test_examples.py) against build/sqlitesync.so and a throwaway Postgres
# with this checkout's extension (test/pg/cluster.sh run). Arguments: file
# names (PG.md ...) to run only those. Prints PASS/FAIL/SKIP lines.
set -u
cd "$(dirname "$0")/../.."
make -s all || { echo "FAIL build (make all)"; exit 1; }
# LD_LIBRARY_PATH: load_extension('sqlitesync') finds the extension by name,
# as it does once installed with PREFIX=/usr
# (cluster.sh's own "PASS build" is not an example: left out of the count)
bash test/pg/cluster.sh run env LD_LIBRARY_PATH="$PWD/build" \
	/usr/bin/python3 test/docs/test_examples.py "$@" | sed -u '/^PASS build$/d'
exit "${PIPESTATUS[0]}"
