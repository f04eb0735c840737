#!/usr/bin/env bash
# bench/pg_bench.sh — the PostgreSQL benchmark (`make bench`): a throwaway
# cluster (test/pg/cluster.sh) running bench/pg_bench.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash test/pg/cluster.sh bench
