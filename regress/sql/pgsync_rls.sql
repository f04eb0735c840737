-- pgsync_rls: sync_apply_payload runs with the caller's rights; rows the role
-- may not write are rejected and reported, the rest is applied.
\set regress :DBNAME
CREATE DATABASE pgsync_regress_ra;
CREATE DATABASE pgsync_regress_rb;
\c pgsync_regress_ra
SET client_min_messages = warning;
CREATE EXTENSION pgsync;
RESET client_min_messages;
CREATE TABLE notes (id int PRIMARY KEY, owner text NOT NULL, body text);
CREATE TABLE audit (id int PRIMARY KEY, what text);
SELECT sync_init('notes'), sync_init('audit');
INSERT INTO notes VALUES (1, 'alice', 'a1'), (2, 'bob', 'b1'), (3, 'alice', 'a2');
INSERT INTO audit VALUES (1, 'x');
SELECT sync_payload(0) AS p1 \gset
UPDATE notes SET body = 'a1 edited' WHERE id = 1;
UPDATE notes SET body = 'b1 edited' WHERE id = 2;
DELETE FROM notes WHERE id = 3;
SELECT sync_payload(sync_payload_until(:'p1'), NULL) AS p2 \gset

\c pgsync_regress_rb
SET client_min_messages = warning;
CREATE EXTENSION pgsync;
RESET client_min_messages;
CREATE TABLE notes (id int PRIMARY KEY, owner text NOT NULL, body text);
CREATE TABLE audit (id int PRIMARY KEY, what text);
SELECT sync_init('notes'), sync_init('audit');
CREATE ROLE pgsync_alice;
GRANT SELECT, INSERT, UPDATE, DELETE ON notes TO pgsync_alice;
GRANT SELECT ON audit TO pgsync_alice;
GRANT EXECUTE ON FUNCTION sync_payload(bigint, uuid) TO pgsync_alice;
ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
CREATE POLICY own ON notes USING (owner = 'alice') WITH CHECK (owner = 'alice');

SET ROLE pgsync_alice;
SELECT sync_apply_payload(:'p1') AS won;
SELECT table_name, pk, sqlstate, message FROM sync_rejections() ORDER BY 1, 2::text;
SELECT * FROM notes ORDER BY id;
RESET ROLE;
SELECT * FROM notes ORDER BY id;		-- bob's row and audit were not written
SELECT count(*) AS audit_rows FROM audit;
SELECT id, cl FROM notes__sync_clock ORDER BY id;	-- and left no clock

-- the owner applies the same payload: everything arrives
SELECT sync_apply_payload(:'p1') AS won;
SELECT * FROM sync_rejections();
SELECT * FROM notes ORDER BY id;

-- alice applies the later changes: hers apply, bob's edit is rejected
SET ROLE pgsync_alice;
SELECT sync_apply_payload(:'p2') AS won;
SELECT table_name, pk, sqlstate, message FROM sync_rejections();
RESET ROLE;
SELECT * FROM notes ORDER BY id;
SELECT id, cl FROM notes__sync_clock ORDER BY id;
-- a later apply by someone allowed still brings bob's edit (not lost)
SELECT sync_apply_payload(:'p2') AS won;
SELECT * FROM notes ORDER BY id;

\c :regress
DROP DATABASE pgsync_regress_ra;
DROP DATABASE pgsync_regress_rb;
DROP ROLE pgsync_alice;
