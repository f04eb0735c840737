-- pgsync_errors: malformed payloads, misuse, clear messages.
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS pgsync;
RESET client_min_messages;
CREATE TABLE errs (id int PRIMARY KEY, v text);
SELECT sync_init('errs');
INSERT INTO errs SELECT g, repeat('v', g % 50) FROM generate_series(1, 200) g;
SELECT sync_payload(0) AS p \gset
SELECT length(:'p'::bytea) > 56 AS has_body;

\set VERBOSITY default
-- too short, wrong magic, wrong version, truncated, checksum mismatch
SELECT sync_apply_payload('\x'::bytea);
SELECT sync_apply_payload(decode(repeat('00', 60), 'hex'));
SELECT sync_apply_payload(overlay(:'p'::bytea placing '\x09'::bytea from 5 for 1));
-- (payload lengths vary with clock values: numbers masked)
CREATE FUNCTION apply_msg(p bytea) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
	PERFORM sync_apply_payload(p);
	RETURN 'applied';
EXCEPTION WHEN OTHERS THEN
	RETURN SQLSTATE || ': ' || regexp_replace(SQLERRM, '[0-9]+', 'N', 'g');
END $$;
SELECT apply_msg(substring(:'p'::bytea from 1 for length(:'p'::bytea) - 1));
SELECT apply_msg(:'p'::bytea || '\x00'::bytea);
SELECT sync_apply_payload(overlay(:'p'::bytea placing '\xff'::bytea from 70 for 1));
SELECT sync_payload_until('\x0102'::bytea);
SELECT sync_payload_info(overlay(:'p'::bytea placing '\xff'::bytea from 70 for 1));
-- the good payload still applies (to itself: everything already known)
SELECT sync_apply_payload(:'p') AS won;
SELECT sync_payload_until(:'p') <= sync_db_version() AS until_ok;

-- the SQLSTATEs
\set VERBOSITY sqlstate
SELECT sync_apply_payload('\x'::bytea);
SELECT sync_apply_payload(overlay(:'p'::bytea placing '\x09'::bytea from 5 for 1));
SELECT sync_apply_payload(overlay(:'p'::bytea placing '\xff'::bytea from 70 for 1));
\set VERBOSITY default

-- misuse
SELECT sync_init(NULL);
SELECT sync_cleanup('pg_class');
CREATE TEMP TABLE tmp (id int PRIMARY KEY);
SELECT sync_init('tmp');
CREATE VIEW errs_v AS SELECT * FROM errs;
SELECT sync_init('errs_v');
CREATE TABLE floatkey (id float8 PRIMARY KEY, v text);
SELECT sync_init('floatkey');
CREATE TABLE clash (cl int PRIMARY KEY, v text);
SELECT sync_init('clash');
SELECT sync_capture();
-- a role that does not own the table
CREATE ROLE pgsync_stranger;
GRANT ALL ON errs TO pgsync_stranger;
SET ROLE pgsync_stranger;
SELECT sync_init('errs');
-- sync_payload reads as the caller: the stranger sees errs (GRANT ALL), nothing else
SELECT t->>'name' AS visible_table FROM jsonb_array_elements(sync_payload_info(sync_payload(0))->'tables') t;
-- capture works for a role that may write the table but not the metadata
UPDATE errs SET v = 'changed by stranger' WHERE id = 1;
RESET ROLE;
SELECT cl FROM errs__sync_clock WHERE id = 1;
-- renaming columns of a synced table is detected
ALTER TABLE errs RENAME COLUMN v TO w;
UPDATE errs SET w = 'x' WHERE id = 2;
ALTER TABLE errs RENAME COLUMN w TO v;
UPDATE errs SET v = 'x' WHERE id = 2;
ALTER TABLE errs ADD COLUMN extra int;
SELECT sync_init('errs');
DROP OWNED BY pgsync_stranger;
DROP ROLE pgsync_stranger;
-- a synced table dropped while the event triggers were off: named, no crash
CREATE TABLE stale(id text PRIMARY KEY, v text);
SELECT sync_init('stale');
INSERT INTO stale VALUES ('a', 'x');
CREATE TABLE stale_p AS SELECT sync_payload(0) AS p;
ALTER EVENT TRIGGER pgsync_sql_drop DISABLE;
DROP TABLE stale;
ALTER EVENT TRIGGER pgsync_sql_drop ENABLE;
\c
SELECT sync_apply_payload(p) FROM stale_p;
DELETE FROM pgsync.tables WHERE name = 'stale';
DROP TABLE stale__sync_clock, stale_p;
