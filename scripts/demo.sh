#!/usr/bin/env bash
# scripts/demo.sh — `make demo`: two offline replicas, conflicting edits,
# payload exchange, identical tables. Everything lives in a temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
EXT="$PWD/build/sqlitesync"
D=$(mktemp -d /tmp/pgsync-demo-XXXXXX)
trap 'rm -rf "$D"' EXIT
q() { local db=$1; shift; sqlite3 -batch "$D/$db.db" ".load $EXT" "$@"; }
show() { sqlite3 -batch -box "$D/$1.db" "SELECT id, title, done, note FROM todos ORDER BY title"; }

echo "== two replicas (phone and laptop) with the same table"
for r in phone laptop; do
  q "$r" "PRAGMA journal_mode=WAL" \
    "CREATE TABLE todos(id TEXT PRIMARY KEY NOT NULL DEFAULT (sync_uuid()), title TEXT NOT NULL, done INTEGER NOT NULL DEFAULT 0, note TEXT)" \
    "SELECT sync_init('todos')" >/dev/null
done

echo "== the phone creates three todos and syncs them to the laptop"
q phone "INSERT INTO todos(title) VALUES ('buy milk'), ('call mum'), ('fix bike')" >/dev/null
q phone "SELECT writefile('$D/p1', sync_payload(0))" >/dev/null
q laptop "SELECT 'laptop merged ' || sync_apply_payload(readfile('$D/p1')) || ' changes'"

echo "== both go offline and edit"
q phone  "UPDATE todos SET done = 1 WHERE title = 'buy milk'" \
         "UPDATE todos SET note = 'from the phone' WHERE title = 'call mum'" \
         "DELETE FROM todos WHERE title = 'fix bike'"
sleep 0.01
q laptop "UPDATE todos SET note = 'oat milk' WHERE title = 'buy milk'" \
         "UPDATE todos SET note = 'from the laptop (later)' WHERE title = 'call mum'" \
         "UPDATE todos SET note = 'needs a new chain' WHERE title = 'fix bike'" \
         "INSERT INTO todos(title) VALUES ('water plants')"
echo "-- phone (offline)";  show phone
echo "-- laptop (offline)"; show laptop

echo "== back online: exchange payloads both ways"
q phone  "SELECT writefile('$D/p2', sync_payload(0))" >/dev/null
q laptop "SELECT writefile('$D/l2', sync_payload(0))" >/dev/null
q phone  "SELECT 'phone merged '  || sync_apply_payload(readfile('$D/l2')) || ' winning changes'"
q laptop "SELECT 'laptop merged ' || sync_apply_payload(readfile('$D/p2')) || ' winning changes'"
echo "-- phone";  show phone
echo "-- laptop"; show laptop

a=$(sqlite3 "$D/phone.db" "SELECT group_concat(id||title||done||ifnull(note,'-'), '|') FROM (SELECT * FROM todos ORDER BY id)")
b=$(sqlite3 "$D/laptop.db" "SELECT group_concat(id||title||done||ifnull(note,'-'), '|') FROM (SELECT * FROM todos ORDER BY id)")
if [ "$a" = "$b" ]; then
  echo "== converged: both replicas hold identical tables"
  echo "   (different columns merged, the later note won, the delete beat the concurrent edit)"
else
  echo "== NOT converged"; exit 1
fi
