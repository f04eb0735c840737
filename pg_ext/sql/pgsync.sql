/*
 * sql/pgsync.sql — the install script of the current version of pgsync
 * (built into pgsync--<version>.sql by the Makefile; released versions'
 * scripts and the upgrade scripts pgsync--A--B.sql are never edited).
 * Offline-first sync (CRDT) for PostgreSQL.
 */

\echo Use "CREATE EXTENSION pgsync" to load this file. \quit

-- Metadata lives in schema pgsync; the functions in the extension's schema
-- (normally public) so that SELECT sync_init('todos') works as on SQLite.
CREATE SCHEMA pgsync;
COMMENT ON SCHEMA pgsync IS 'pgsync metadata: sites, synced tables, persisted clock';

-- Sites: local index -> site id. idx 0 is this database.
CREATE TABLE pgsync.sites (
	idx integer PRIMARY KEY,
	site uuid NOT NULL UNIQUE
);
CREATE SEQUENCE pgsync.sites_idx_seq AS integer START 1;

-- Synced tables. cols is the column order of the row clock blobs: fixed at
-- sync_init and never reordered.
CREATE TABLE pgsync.tables (
	name text PRIMARY KEY,				-- name in payloads: rel, or schema.rel
	tbl regclass NOT NULL UNIQUE,
	clock regclass NOT NULL,
	algo text NOT NULL CHECK (algo IN ('cls', 'gset')),
	pk_cols text[] NOT NULL,
	cols text[] NOT NULL,
	created_at timestamptz NOT NULL DEFAULT now(),
	rls text				-- row-level security at the last look: off, on, forced
);

-- Devices (docs/DESIGN.md, "Visibility" and "Device identity"): the principal
-- (token subject) that first presented a site id owns it; fingerprint is a
-- hash of what decides the device's view beyond the rows (role, memberships,
-- claims, access to each table), fp_gen its generation (in the device's cursor);
-- acked is the since of the device's last pull (everything at or below it
-- was applied there), for the garbage-collection horizon.
CREATE TABLE pgsync.devices (
	site uuid PRIMARY KEY,
	principal text NOT NULL,
	first_seen timestamptz NOT NULL DEFAULT now(),
	last_seen timestamptz NOT NULL DEFAULT now(),
	fingerprint bytea,
	fp_gen integer NOT NULL DEFAULT 0,
	acked bigint NOT NULL DEFAULT 0
);
CREATE INDEX ON pgsync.devices (principal);

-- Visibility log: something that may change who sees tbl committed at ver
-- (a write to a table its policies read, a policy or grant change). A pull
-- from since to until sends tbl as a snapshot when a row has since < ver <= until.
CREATE TABLE pgsync.vis_log (
	tbl oid NOT NULL,
	ver bigint NOT NULL,
	at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ON pgsync.vis_log (tbl, ver);

-- What the visibility of a synced table depends on: found in its policies
-- (auto) or declared with sync_watch.
CREATE TABLE pgsync.watches (
	tbl regclass NOT NULL,
	depends_on regclass NOT NULL,
	auto boolean NOT NULL,
	PRIMARY KEY (tbl, depends_on)
);

-- Changes this database cannot store now (a table or column it does not
-- have yet), with their clocks, one row per table and key.
CREATE TABLE pgsync.held (
	tbl text NOT NULL,
	k bytea NOT NULL,
	code text,
	message text,
	frag bytea NOT NULL,
	first_at timestamptz NOT NULL DEFAULT now(),
	last_at timestamptz NOT NULL DEFAULT now(),
	attempts integer NOT NULL DEFAULT 1,
	PRIMARY KEY (tbl, k)
);

-- The key of chunk cursors' MAC and encryption (never leaves the database).
CREATE TABLE pgsync.secret (
	id integer PRIMARY KEY CHECK (id = 1),
	secret bytea NOT NULL
);
INSERT INTO pgsync.secret VALUES (1, decode(replace(gen_random_uuid()::text, '-', '')
	|| replace(gen_random_uuid()::text, '-', ''), 'hex'));
REVOKE ALL ON pgsync.secret FROM PUBLIC;

-- Persisted hybrid logical clock floor. A sequence, not a row: it is
-- non-transactional and never blocks concurrent writers.
CREATE SEQUENCE pgsync.hlc AS bigint MINVALUE 0 START 0;

-- ---- functions (same order as the SQLite registration table) ----

CREATE FUNCTION sync_init(tbl regclass, algo text DEFAULT 'cls')
RETURNS void AS 'MODULE_PATHNAME', 'sync_init' LANGUAGE C STRICT VOLATILE;
COMMENT ON FUNCTION sync_init(regclass, text) IS
'start syncing a table (algo ''cls'': rows can be updated and deleted; ''gset'': insert only); the table needs a primary key; existing rows are backfilled; idempotent';

-- the same for a table name in a text value (a literal resolves here too)
CREATE FUNCTION sync_init(tbl text, algo text DEFAULT 'cls')
RETURNS void LANGUAGE sql VOLATILE STRICT
AS $$ SELECT @extschema@.sync_init(tbl::pg_catalog.regclass, algo) $$;
COMMENT ON FUNCTION sync_init(text, text) IS
'sync_init for a table name given as text (quoted and schema-qualified names as in regclass)';

CREATE FUNCTION sync_cleanup(tbl regclass)
RETURNS void AS 'MODULE_PATHNAME', 'sync_cleanup' LANGUAGE C STRICT VOLATILE;
COMMENT ON FUNCTION sync_cleanup(regclass) IS
'stop syncing a table: drops its capture triggers, clock table and metadata (the rows stay)';

CREATE FUNCTION sync_cleanup(tbl text)
RETURNS void LANGUAGE sql VOLATILE STRICT
AS $$ SELECT @extschema@.sync_cleanup(tbl::pg_catalog.regclass) $$;
COMMENT ON FUNCTION sync_cleanup(text) IS 'sync_cleanup for a table name given as text';

CREATE FUNCTION sync_site_id()
RETURNS uuid AS 'MODULE_PATHNAME', 'sync_site_id' LANGUAGE C STRICT STABLE;
COMMENT ON FUNCTION sync_site_id() IS 'the site id (UUIDv7) of this database';

CREATE FUNCTION sync_db_version()
RETURNS bigint AS 'MODULE_PATHNAME', 'sync_db_version' LANGUAGE C STRICT VOLATILE;
COMMENT ON FUNCTION sync_db_version() IS
'the newest local version whose changes are all committed and visible: sync_payload never hands out anything newer';

CREATE FUNCTION sync_payload(since bigint, exclude_site uuid DEFAULT NULL)
RETURNS bytea AS 'MODULE_PATHNAME', 'sync_payload' LANGUAGE C CALLED ON NULL INPUT VOLATILE;
COMMENT ON FUNCTION sync_payload(bigint, uuid) IS
'a payload of the changes with a local version in (since, sync_db_version()], without those made by exclude_site, as the caller may see them (privileges and row-level security: rows the caller cannot see go out as key hashes only); NULL when there are none';

CREATE FUNCTION sync_payload(since bigint, exclude_site uuid, max_rows integer, cursor bytea)
RETURNS bytea AS 'MODULE_PATHNAME', 'sync_payload' LANGUAGE C CALLED ON NULL INPUT VOLATILE;
COMMENT ON FUNCTION sync_payload(bigint, uuid, integer, bytea) IS
'one chunk of a chunked pull: at most max_rows rows (0 or NULL = all) of the changes in (since, until], in key order, starting after cursor (NULL for the first chunk, then sync_payload_cursor of the previous chunk). Every chunk reports the until of the first; pass it as since after the last chunk. Rows as the caller may see them';

CREATE FUNCTION sync_payload_cursor(payload bytea)
RETURNS bytea AS 'MODULE_PATHNAME', 'sync_payload_cursor' LANGUAGE C STRICT VOLATILE;
COMMENT ON FUNCTION sync_payload_cursor(bytea) IS
'the cursor to pass to sync_payload for the chunk after this payload (built by this database), or NULL when it is the last chunk or not chunked';

CREATE FUNCTION sync_payload_until(payload bytea)
RETURNS bigint AS 'MODULE_PATHNAME', 'sync_payload_until' LANGUAGE C STRICT IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION sync_payload_until(bytea) IS
'the version a payload covers up to: pass it as since to the next sync_payload';

CREATE FUNCTION sync_apply_payload(payload bytea)
RETURNS bigint AS 'MODULE_PATHNAME', 'sync_apply_payload' LANGUAGE C STRICT VOLATILE;
COMMENT ON FUNCTION sync_apply_payload(bytea) IS
'merge a payload with the caller''s rights; returns the number of winning changes. Rows the caller may not write are skipped and listed by sync_rejections()';

CREATE FUNCTION sync_payload_info(payload bytea)
RETURNS jsonb AS 'MODULE_PATHNAME', 'sync_payload_info' LANGUAGE C STRICT IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION sync_payload_info(bytea) IS 'the content of a payload as jsonb (for debugging)';

CREATE FUNCTION sync_uuid()
RETURNS uuid AS 'MODULE_PATHNAME', 'sync_uuid' LANGUAGE C STRICT VOLATILE PARALLEL SAFE;
COMMENT ON FUNCTION sync_uuid() IS 'a new UUIDv7 (time-ordered), a good primary key for synced rows';

CREATE FUNCTION sync_version()
RETURNS text AS 'MODULE_PATHNAME', 'sync_version' LANGUAGE C STRICT IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION sync_version() IS 'the version of the pgsync extension';

-- Postgres only.
CREATE FUNCTION sync_device(device uuid, principal text)
RETURNS void AS 'MODULE_PATHNAME', 'sync_device' LANGUAGE C STRICT VOLATILE;
COMMENT ON FUNCTION sync_device(uuid, text) IS
'for the sync server: the rest of this transaction acts for device (a site id) of principal (the token subject). The first principal to present a site id owns it; another principal''s site is refused (42501). sync_pull then builds that device''s view and sync_apply_payload refuses payloads and changes attributed to other principals'' devices';

CREATE FUNCTION sync_pull(since bigint, max_rows integer DEFAULT 0, cursor bytea DEFAULT NULL,
	seen_gen integer DEFAULT 0,
	OUT payload bytea, OUT next_cursor bytea, OUT until bigint, OUT gen integer)
RETURNS record AS 'MODULE_PATHNAME', 'sync_pull' LANGUAGE C CALLED ON NULL INPUT VOLATILE;
COMMENT ON FUNCTION sync_pull(bigint, integer, bytea, integer) IS
'one pull of the device set by sync_device, as the caller may see it, in the statement''s snapshot: payload (NULL when nothing is new), next_cursor (the sealed cursor of the next chunk, NULL after the last), until (the since of the next pull) and gen (pass it as seen_gen next time: it changes when what decides the device''s view changes, and a pull with an older seen_gen is a snapshot of every table). Tables whose visibility may have changed without their rows changing come as snapshots (docs/DESIGN.md)';

CREATE FUNCTION sync_pull_group(since bigint, max_rows integer, seen_gen integer, devices uuid[],
	OUT payload bytea, OUT until bigint, OUT served boolean[])
RETURNS record AS 'MODULE_PATHNAME', 'sync_pull_group' LANGUAGE C CALLED ON NULL INPUT VOLATILE;
COMMENT ON FUNCTION sync_pull_group(bigint, integer, integer, uuid[]) IS
'for the sync server: one pull for several devices of the principal bound by sync_device, as the caller may see it, all with the same since and seen_gen (the long-polls one push wakes). served[i]: payload (NULL when nothing is new) and until are exactly what sync_pull would return to devices[i], with gen = seen_gen, and its pull is recorded; the others must call sync_pull themselves (their own changes are in the payload, their view changed, or the result needs chunks)';

CREATE FUNCTION sync_rows(keys jsonb)
RETURNS bytea AS 'MODULE_PATHNAME', 'sync_rows' LANGUAGE C STRICT VOLATILE;
COMMENT ON FUNCTION sync_rows(jsonb) IS
'a payload of the rows named by keys ([{"table": ..., "pk": {...}}]), whole, as the caller may see them; keys it may not see come back absent. For a receiver that lacks a row (POST /v1/rows)';

CREATE FUNCTION sync_watch(tbl regclass, depends_on regclass)
RETURNS void AS 'MODULE_PATHNAME', 'sync_watch' LANGUAGE C STRICT VOLATILE;
COMMENT ON FUNCTION sync_watch(regclass, regclass) IS
'declare that who may see the synced table tbl depends on the table depends_on (read by a function in tbl''s policies, where pgsync cannot see it): every write to depends_on makes the next pulls send tbl as a snapshot';

CREATE FUNCTION sync_visibility_changed(tbl regclass)
RETURNS void AS 'MODULE_PATHNAME', 'sync_visibility_changed' LANGUAGE C STRICT VOLATILE;
COMMENT ON FUNCTION sync_visibility_changed(regclass) IS
'record that who may see the synced table tbl may have changed (e.g. after changing a function its policies call): the next pulls send it as a snapshot';

CREATE FUNCTION sync_vis_trigger()
RETURNS trigger AS 'MODULE_PATHNAME', 'sync_vis_trigger' LANGUAGE C;
COMMENT ON FUNCTION sync_vis_trigger() IS 'statement trigger on tables that policies of synced tables read; not to be called directly';

CREATE FUNCTION sync_rejections(OUT table_name text, OUT pk jsonb, OUT sqlstate text, OUT message text)
RETURNS SETOF record AS 'MODULE_PATHNAME', 'sync_rejections' LANGUAGE C STRICT VOLATILE;
COMMENT ON FUNCTION sync_rejections() IS
'the rows the last sync_apply_payload of this session refused (permissions or row-level security), with the reason';

CREATE FUNCTION sync_capture()
RETURNS trigger AS 'MODULE_PATHNAME', 'sync_capture' LANGUAGE C;
COMMENT ON FUNCTION sync_capture() IS 'capture trigger installed by sync_init; not to be called directly';

-- sync_payload and sync_pull read as the caller (privileges, row-level
-- security): anybody may call them. sync_device is the server's: grant it to
-- the server's login role only (docs/SERVER.md).
REVOKE ALL ON FUNCTION sync_device(uuid, text) FROM PUBLIC;

-- This database's identity.
INSERT INTO pgsync.sites (idx, site) VALUES (0, sync_uuid());

-- Convenience view, same columns as SQLite's sync_state.
CREATE VIEW pgsync.state AS
	SELECT sync_db_version() AS db_version,
		   (SELECT last_value FROM pgsync.hlc) AS hlc,
		   (SELECT site FROM pgsync.sites WHERE idx = 0) AS site;

-- pg_dump keeps the metadata (clock tables are ordinary tables and dumped anyway).
SELECT pg_catalog.pg_extension_config_dump('pgsync.sites', 'WHERE idx <> 0');
SELECT pg_catalog.pg_extension_config_dump('pgsync.tables', '');
SELECT pg_catalog.pg_extension_config_dump('pgsync.devices', '');
SELECT pg_catalog.pg_extension_config_dump('pgsync.watches', '');
SELECT pg_catalog.pg_extension_config_dump('pgsync.held', '');
SELECT pg_catalog.pg_extension_config_dump('pgsync.secret', '');

-- Dropping a synced table drops its clock table and metadata.
CREATE FUNCTION pgsync.on_sql_drop() RETURNS event_trigger
LANGUAGE plpgsql AS $$
DECLARE
	r record;
BEGIN
	FOR r IN
		SELECT t.name, n.nspname, c.relname
		FROM pg_catalog.pg_event_trigger_dropped_objects() d
		JOIN pgsync.tables t ON t.tbl::pg_catalog.oid = d.objid
		LEFT JOIN pg_catalog.pg_class c ON c.oid = t.clock::pg_catalog.oid
		LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
		WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.objsubid = 0
	LOOP
		IF r.relname IS NOT NULL THEN
			EXECUTE pg_catalog.format('DROP TABLE IF EXISTS %I.%I', r.nspname, r.relname);
		END IF;
		DELETE FROM pgsync.tables WHERE name = r.name;
	END LOOP;
	DELETE FROM pgsync.watches w USING pg_catalog.pg_event_trigger_dropped_objects() d
		WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.objsubid = 0
		  AND d.objid IN (w.tbl::pg_catalog.oid, w.depends_on::pg_catalog.oid);
END;
$$;
CREATE EVENT TRIGGER pgsync_sql_drop ON sql_drop EXECUTE FUNCTION pgsync.on_sql_drop();

-- A policy, row-level security or privilege change of a synced table may change
-- who sees which rows without any row changing: log it (the next pulls send the
-- table as a snapshot) and refresh what its policies read.
CREATE FUNCTION pgsync.on_ddl_end() RETURNS event_trigger
LANGUAGE C AS 'MODULE_PATHNAME', 'sync_on_ddl_end';
CREATE EVENT TRIGGER pgsync_ddl_end ON ddl_command_end
	WHEN TAG IN ('CREATE POLICY', 'ALTER POLICY', 'DROP POLICY', 'ALTER TABLE', 'GRANT', 'REVOKE')
	EXECUTE FUNCTION pgsync.on_ddl_end();
