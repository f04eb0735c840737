-- pgsync_basic: sync_init, capture, payload round trip between two databases.
\set main :DBNAME
SET client_min_messages = warning;
CREATE EXTENSION pgsync;
RESET client_min_messages;

SELECT sync_version();
SELECT sync_site_id() IS NOT NULL AS has_site, sync_uuid() <> sync_uuid() AS uuids_differ;
SELECT substr(sync_uuid()::text, 15, 1) AS uuid_version;

-- ---- sync_init errors --------------------------------------------------
CREATE TABLE nokey (a int, b text);
SELECT sync_init('nokey');
SELECT sync_init('nosuchtable');
CREATE TABLE todos (id text PRIMARY KEY, title text, done boolean NOT NULL DEFAULT false, prio int);
SELECT sync_init('todos', 'lww');
SELECT sync_payload(0) IS NULL AS nothing_synced_yet;

-- ---- capture ------------------------------------------------------------
INSERT INTO todos VALUES ('a', 'buy milk', false, 1), ('b', 'walk dog', false, 2);
SELECT sync_init('todos');			-- backfills the two rows
SELECT sync_init('public.todos');	-- idempotent
SELECT sync_init(t) FROM (VALUES ('public.todos'::text)) v(t);	-- a text value works too
SELECT id, cl, ver = (SELECT max(ver) FROM todos__sync_clock) AS same_txn
FROM todos__sync_clock ORDER BY id;
SELECT name, algo, pk_cols, cols FROM pgsync.tables;

INSERT INTO todos VALUES ('c', 'call mom', false, 3);
UPDATE todos SET done = true WHERE id = 'a';
UPDATE todos SET title = title WHERE id = 'b';		-- no change: clock untouched
DELETE FROM todos WHERE id = 'c';
SELECT id, cl FROM todos__sync_clock ORDER BY id;
INSERT INTO todos VALUES ('c', 'call mom again', false, 3);	-- resurrect
SELECT id, cl FROM todos__sync_clock ORDER BY id;
UPDATE todos SET id = 'd' WHERE id = 'c';			-- key change = delete + insert
SELECT id, cl FROM todos__sync_clock ORDER BY id;

-- the versions of one transaction are equal and grow with each transaction
SELECT count(DISTINCT ver) AS versions FROM todos__sync_clock;
SELECT sync_db_version() >= (SELECT max(ver) FROM todos__sync_clock) AS db_version_covers_all;

-- no local TRUNCATE
TRUNCATE todos;

-- ---- payloads -------------------------------------------------------------
SELECT sync_payload(0) AS p0 \gset
SELECT sync_payload_until(:'p0') <= sync_db_version() AS until_within_db_version;
SELECT i->>'row_count' AS rows, i->>'change_count' AS changes, i->'tables' #- '{0,fingerprint}' AS tables
FROM sync_payload_info(:'p0') i;
SELECT r->>'table' AS tbl, r->'key' AS key, r->>'cl' AS cl, r->>'deleted' AS deleted,
	   jsonb_agg(c->>'column' || '=' || (c->>'value') ORDER BY c->>'column') AS changes
FROM jsonb_array_elements(sync_payload_info(:'p0')->'rows') r
LEFT JOIN LATERAL jsonb_array_elements(r->'changes') c ON true
GROUP BY 1, 2, 3, 4 ORDER BY 2;
SELECT sync_payload(sync_payload_until(:'p0')) IS NULL AS nothing_new;
SELECT sync_payload(0, sync_site_id()) IS NULL AS all_mine_excluded;
SELECT sync_payload(NULL);
SELECT sync_payload(-1);

-- ---- a second replica ---------------------------------------------------
CREATE DATABASE pgsync_regress_r2;
\c pgsync_regress_r2
SET client_min_messages = warning;
CREATE EXTENSION pgsync;
RESET client_min_messages;
CREATE TABLE todos (id text PRIMARY KEY, title text, done boolean NOT NULL DEFAULT false, prio int);
SELECT sync_apply_payload(:'p0');		-- not synced here yet: held
SELECT sync_init('todos');
SELECT sync_apply_payload(:'p0') AS won;
SELECT * FROM todos ORDER BY id;
SELECT sync_apply_payload(:'p0') AS won_again;	-- idempotent
SELECT id, cl FROM todos__sync_clock ORDER BY id;

-- concurrent edits: r2 edits title of a, main edits prio of a and deletes b
UPDATE todos SET title = 'buy oat milk' WHERE id = 'a';
INSERT INTO todos VALUES ('e', 'from r2', false, 5);
SELECT sync_payload(0) AS p1 \gset
\c :main
UPDATE todos SET prio = 10 WHERE id = 'a';
DELETE FROM todos WHERE id = 'b';
SELECT sync_payload(sync_payload_until(:'p0')) AS p2 \gset
SELECT sync_apply_payload(:'p1') AS won;
SELECT * FROM todos ORDER BY id;
\c pgsync_regress_r2
SELECT sync_apply_payload(:'p2') AS won;
SELECT * FROM todos ORDER BY id;
-- what r2 merged is relayed: a payload from r2 carries main's changes too
SELECT count(*) AS rows_relayed FROM jsonb_array_elements(sync_payload_info(sync_payload(0))->'rows');
-- and excluding main's site drops them again
\c :main
SELECT sync_site_id() AS main_site \gset
\c pgsync_regress_r2
SELECT r->'key' AS key FROM jsonb_array_elements(sync_payload_info(sync_payload(0, :'main_site'))->'rows') r ORDER BY 1;

-- ---- gset tables -------------------------------------------------------------
\c :main
CREATE TABLE events (id bigint PRIMARY KEY, what text);
SELECT sync_init('events', 'gset');
SELECT sync_init('events', 'cls');
INSERT INTO events VALUES (1, 'started');
UPDATE events SET what = 'x' WHERE id = 1;
DELETE FROM events WHERE id = 1;
SELECT * FROM events;

-- ---- quoted, schema-qualified, composite keys ------------------------------
CREATE SCHEMA "My Schema";
CREATE TABLE "My Schema"."Odd Table" ("Key 1" int, "key""2" text, "Value" text, PRIMARY KEY ("Key 1", "key""2"));
SELECT sync_init('"My Schema"."Odd Table"');
INSERT INTO "My Schema"."Odd Table" VALUES (1, 'x', 'v1'), (2, 'y''); DROP TABLE todos; --', 'v2');
UPDATE "My Schema"."Odd Table" SET "Value" = 'v1b' WHERE "Key 1" = 1;
SELECT name, pk_cols, cols FROM pgsync.tables WHERE tbl = '"My Schema"."Odd Table"'::regclass;
SELECT "Key 1", "key""2", cl FROM "My Schema"."Odd Table__sync_clock" ORDER BY 1;
SELECT sync_payload(0) AS p3 \gset
\c pgsync_regress_r2
CREATE SCHEMA "My Schema";
CREATE TABLE "My Schema"."Odd Table" ("Key 1" int, "key""2" text, "Value" text, PRIMARY KEY ("Key 1", "key""2"));
SELECT sync_init('"My Schema"."Odd Table"');
CREATE TABLE events (id bigint PRIMARY KEY, what text);
SELECT sync_init('events', 'gset');
SELECT sync_apply_payload(:'p3') > 0 AS applied;
SELECT * FROM "My Schema"."Odd Table" ORDER BY 1;
SELECT * FROM events;
SELECT count(*) AS todos_still_there FROM todos;

-- ---- cleanup ---------------------------------------------------------------
\c :main
SELECT sync_cleanup('events');
SELECT sync_cleanup('events');
SELECT count(*) FROM pgsync.tables WHERE name = 'events';
SELECT to_regclass('events__sync_clock') IS NULL AS clock_dropped;
UPDATE events SET what = 'now allowed' WHERE id = 1;
-- dropping a synced table drops its clock table and metadata
DROP TABLE "My Schema"."Odd Table";
SELECT count(*) FROM pgsync.tables WHERE name LIKE 'My Schema%';
SELECT to_regclass('"My Schema"."Odd Table__sync_clock"') IS NULL AS clock_dropped;
DROP DATABASE pgsync_regress_r2;
