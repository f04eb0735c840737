-- pgsync_gc: tombstone GC with a horizon (docs/DESIGN.md): what sync_gc
-- collects, the floor, lives started above it, PS410 for pulls from below
-- what was collected, misuse. Versions are transaction ids: numbers masked.
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS pgsync;
RESET client_min_messages;
CREATE TABLE gct (id int PRIMARY KEY, v text);
SELECT sync_init('gct');
INSERT INTO gct SELECT g, 'v' || g FROM generate_series(1, 10) g;
SELECT sync_db_version() AS before_deletes \gset
DELETE FROM gct WHERE id <= 4;
SELECT clock::text AS clk FROM pgsync.tables WHERE name = 'gct' \gset
SELECT count(*) FILTER (WHERE cl % 2 = 0) AS tombstones, count(*) FILTER (WHERE cl % 2 = 1) AS live
FROM :clk;

-- no device has pulled: nothing holds the horizon back but running transactions
-- (other tests' tables are collected too: only gct's part is shown)
SELECT g->'tables'->'gct' AS gct, g->'busy' AS busy,
       (g->>'collected')::int >= 4 AS total_counts_gct,
       (g->>'horizon')::bigint <= (g->>'safe')::bigint AS horizon_below_safe
FROM (SELECT sync_gc('30 days') AS g) s;
SELECT count(*) FILTER (WHERE cl % 2 = 0) AS tombstones, count(*) FILTER (WHERE cl % 2 = 1) AS live
FROM :clk;
SELECT floor FROM pgsync.gc_floor WHERE tbl = 'gct';
-- a second run finds nothing
SELECT g->'tables'->'gct' AS gct FROM (SELECT sync_gc() AS g) s;

-- a key whose tombstone was collected starts its next life above the floor
-- (insert, and an update of a row written without capture); a delete of
-- such a key is above it too
INSERT INTO gct VALUES (1, 'again');
SELECT id, cl FROM :clk WHERE id = 1;
SET session_replication_role = replica;   -- no capture trigger
INSERT INTO gct VALUES (2, 'uncaptured');
RESET session_replication_role;
UPDATE gct SET v = 'captured' WHERE id = 2;
SELECT id, cl FROM :clk WHERE id = 2;
SET session_replication_role = replica;
INSERT INTO gct VALUES (3, 'uncaptured');
RESET session_replication_role;
DELETE FROM gct WHERE id = 3;
SELECT id, cl FROM :clk WHERE id = 3;
-- keys never used before start above the floor as well (the floor is per table)
INSERT INTO gct VALUES (11, 'new');
SELECT id, cl FROM :clk WHERE id = 11;

-- a pull from below what was collected would miss deletes: PS410
CREATE FUNCTION gc_msg(since bigint) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	st text; det text; hint text;
BEGIN
	PERFORM sync_payload(since);
	RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
	GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, det = PG_EXCEPTION_DETAIL,
		hint = PG_EXCEPTION_HINT;
	RETURN st || ': ' || SQLERRM || E'\nDETAIL: ' || regexp_replace(det, '[0-9]+', 'N', 'g')
		|| E'\nHINT: ' || hint;
END $$;
SELECT gc_msg(:before_deletes);
SELECT gc_msg(0);                          -- a snapshot is always possible
SELECT gc_msg(sync_db_version());          -- a cursor past the collected deletes
SELECT count(*) AS refused FROM (SELECT 1) s WHERE gc_msg(1) LIKE 'PS410%';

-- how often a pull records its device's cursor (the horizon): a setting
SHOW pgsync.record_interval;
SET pgsync.record_interval = 0;
SHOW pgsync.record_interval;
-- out of range (the message's wording differs between majors: the SQLSTATE)
DO $$ BEGIN SET pgsync.record_interval = -1; EXCEPTION WHEN invalid_parameter_value THEN RAISE NOTICE 'refused: %', SQLSTATE; END $$;
RESET pgsync.record_interval;
SET pgsync.no_such_setting = 1;

-- misuse
SELECT sync_gc('-1 day');
SELECT sync_gc(NULL);
CREATE ROLE gc_nobody NOLOGIN;
SET ROLE gc_nobody;
SELECT sync_gc();
RESET ROLE;
DROP ROLE gc_nobody;

DROP FUNCTION gc_msg(bigint);
SELECT sync_cleanup('gct');
SELECT count(*) AS floors_left FROM pgsync.gc_floor WHERE tbl = 'gct';
DROP TABLE gct;
