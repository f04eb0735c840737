#!/usr/bin/env bash
# scripts/run-bench.sh — `make bench`: prints the benchmark tables.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo
./build/bench_sqlite "$PWD/build/sqlitesync.so"
if [ -x bench/pg_bench.sh ]; then
  echo
  bash bench/pg_bench.sh
fi
if [ -x bench/server_bench.sh ]; then
  echo
  bash bench/server_bench.sh
fi
if [ -x bench/bg_bench.sh ]; then
  echo
  bash bench/bg_bench.sh
fi
if [ -x bench/gc_bench.sh ]; then
  echo
  bash bench/gc_bench.sh
fi
