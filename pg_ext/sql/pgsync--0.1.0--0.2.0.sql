/* pgsync--0.1.0--0.2.0.sql — upgrade from 0.1.0: device views (RLS-exact
 * pulls in one snapshot), sealed cursors, held changes. Payload format 2. */

\echo Use "ALTER EXTENSION pgsync UPDATE TO '0.2.0'" to load this file. \quit

ALTER TABLE pgsync.tables ADD COLUMN rls text;
UPDATE pgsync.tables t SET rls = CASE WHEN NOT r.relrowsecurity THEN 'off'
	WHEN r.relforcerowsecurity THEN 'forced' ELSE 'on' END
	FROM pg_catalog.pg_class r WHERE r.oid = t.tbl::pg_catalog.oid;

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

CREATE TABLE pgsync.vis_log (
	tbl oid NOT NULL,
	ver bigint NOT NULL,
	at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ON pgsync.vis_log (tbl, ver);

CREATE TABLE pgsync.watches (
	tbl regclass NOT NULL,
	depends_on regclass NOT NULL,
	auto boolean NOT NULL,
	PRIMARY KEY (tbl, depends_on)
);

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

CREATE TABLE pgsync.secret (
	id integer PRIMARY KEY CHECK (id = 1),
	secret bytea NOT NULL
);
INSERT INTO pgsync.secret VALUES (1, decode(replace(gen_random_uuid()::text, '-', '')
	|| replace(gen_random_uuid()::text, '-', ''), 'hex'));
REVOKE ALL ON pgsync.secret FROM PUBLIC;

COMMENT ON FUNCTION sync_payload(bigint, uuid) IS
'a payload of the changes with a local version in (since, sync_db_version()], without those made by exclude_site, as the caller may see them (privileges and row-level security: rows the caller cannot see go out as key hashes only); NULL when there are none';
COMMENT ON FUNCTION sync_payload(bigint, uuid, integer, bytea) IS
'one chunk of a chunked pull: at most max_rows rows (0 or NULL = all) of the changes in (since, until], in key order, starting after cursor (NULL for the first chunk, then sync_payload_cursor of the previous chunk). Every chunk reports the until of the first; pass it as since after the last chunk. Rows as the caller may see them';
GRANT EXECUTE ON FUNCTION sync_payload(bigint, uuid) TO PUBLIC;
GRANT EXECUTE ON FUNCTION sync_payload(bigint, uuid, integer, bytea) TO PUBLIC;

CREATE FUNCTION sync_device(device uuid, principal text)
RETURNS void AS 'MODULE_PATHNAME', 'sync_device' LANGUAGE C STRICT VOLATILE;
COMMENT ON FUNCTION sync_device(uuid, text) IS
'for the sync server: the rest of this transaction acts for device (a site id) of principal (the token subject). The first principal to present a site id owns it; another principal''s site is refused (42501). sync_pull then builds that device''s view and sync_apply_payload refuses payloads and changes attributed to other principals'' devices';
REVOKE ALL ON FUNCTION sync_device(uuid, text) FROM PUBLIC;

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

SELECT pg_catalog.pg_extension_config_dump('pgsync.devices', '');
SELECT pg_catalog.pg_extension_config_dump('pgsync.watches', '');
SELECT pg_catalog.pg_extension_config_dump('pgsync.held', '');
SELECT pg_catalog.pg_extension_config_dump('pgsync.secret', '');

CREATE OR REPLACE FUNCTION pgsync.on_sql_drop() RETURNS event_trigger
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

CREATE FUNCTION pgsync.on_ddl_end() RETURNS event_trigger
LANGUAGE C AS 'MODULE_PATHNAME', 'sync_on_ddl_end';
CREATE EVENT TRIGGER pgsync_ddl_end ON ddl_command_end
	WHEN TAG IN ('CREATE POLICY', 'ALTER POLICY', 'DROP POLICY', 'ALTER TABLE', 'GRANT', 'REVOKE')
	EXECUTE FUNCTION pgsync.on_ddl_end();
