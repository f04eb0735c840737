-- pgsync_types: how Postgres types travel (docs/TYPES.md) and how incoming
-- values are converted to the column type.
\set regress :DBNAME
CREATE DATABASE pgsync_regress_ta;
CREATE DATABASE pgsync_regress_tb;
\c pgsync_regress_ta
\set main :DBNAME
SET client_min_messages = warning;
CREATE EXTENSION pgsync;
RESET client_min_messages;
SET extra_float_digits = 0;

CREATE FUNCTION try_apply(p bytea) RETURNS text LANGUAGE plpgsql AS $$
DECLARE s text; m text; d text;
BEGIN
	RETURN 'ok: ' || sync_apply_payload(p);
EXCEPTION WHEN OTHERS THEN
	GET STACKED DIAGNOSTICS s = RETURNED_SQLSTATE, m = MESSAGE_TEXT, d = PG_EXCEPTION_DETAIL;
	RETURN s || ': ' || m || ' / ' || coalesce(d, '');
END $$;

CREATE TABLE alltypes (
	id int PRIMARY KEY, i2 smallint, i4 int, i8 bigint, f4 real, f8 double precision,
	num numeric, num2 numeric(10,2), t text, vc varchar(5), ch char(3), b bytea,
	bo boolean, u uuid, d date, ts timestamp, tstz timestamptz, j json, jb jsonb);
SELECT sync_init('alltypes');
INSERT INTO alltypes VALUES
 (1, -32768, 2147483647, -9223372036854775808, 0.1, '-0', 12345678901234567890.123456789, 3.14,
  'héllo ✓ "q"', 'abc', 'ab', '\x00ff10', true, 'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11',
  '2024-02-29', '2024-01-02 03:04:05.123456', '2024-01-02 03:04:05.5+02', '{"a": [1, 2]}', '{"b": null, "a": 1}'),
 (2, 32767, -1, 9223372036854775807, 'NaN', 'Infinity', 'NaN', -0.5,
  '', 'xyz', 'abc', '', false, '00000000-0000-0000-0000-000000000000',
  'infinity', '-infinity', '2000-01-01 00:00:00+00', '[]', '[]'),
 (3, NULL, NULL, NULL, NULL, 4.9406564584124654e-324, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL),
 (4, 0, 0, 0, -3.4e38, 1.7976931348623157e308, 0, 0, 'x', 'x', 'x', '\x', false,
  'ffffffff-ffff-ffff-ffff-ffffffffffff', '0001-01-01', '1999-12-31 23:59:59', '1970-01-01 00:00:00.000001+00',
  'null', '"s"');
SELECT sync_payload(0) AS p \gset
-- the payload form of each column (TEXT values quoted, BLOB as hex, REAL as numbers)
SELECT (r->'key'->>0)::int AS id, c->>'column' AS col, c->'value' AS value
FROM jsonb_array_elements(sync_payload_info(:'p')->'rows') r,
	 jsonb_array_elements(r->'changes') c
ORDER BY 1, c->>'column';

\c pgsync_regress_tb
SET client_min_messages = warning;
CREATE EXTENSION pgsync;
RESET client_min_messages;
SET extra_float_digits = 0;
CREATE FUNCTION try_apply(p bytea) RETURNS text LANGUAGE plpgsql AS $$
DECLARE s text; m text; d text;
BEGIN
	RETURN 'ok: ' || sync_apply_payload(p);
EXCEPTION WHEN OTHERS THEN
	GET STACKED DIAGNOSTICS s = RETURNED_SQLSTATE, m = MESSAGE_TEXT, d = PG_EXCEPTION_DETAIL;
	RETURN s || ': ' || m || ' / ' || coalesce(d, '');
END $$;
CREATE TABLE alltypes (
	id int PRIMARY KEY, i2 smallint, i4 int, i8 bigint, f4 real, f8 double precision,
	num numeric, num2 numeric(10,2), t text, vc varchar(5), ch char(3), b bytea,
	bo boolean, u uuid, d date, ts timestamp, tstz timestamptz, j json, jb jsonb);
SELECT sync_init('alltypes');
SELECT sync_apply_payload(:'p') AS won;
SET TimeZone = 'UTC';
SELECT * FROM alltypes ORDER BY id;
-- REAL is bit-exact (-0, NaN, subnormals, extremes)
SELECT id, float8send(f8) AS f8_bits, float4send(f4) AS f4_bits FROM alltypes ORDER BY id;
\c :main
SET TimeZone = 'UTC';
SELECT id, float8send(f8) AS f8_bits, float4send(f4) AS f4_bits FROM alltypes ORDER BY id;

-- ---- conversions: the same table name with other column types ------------------
CREATE TABLE conv (id int PRIMARY KEY, a text, b text, c bigint, d double precision,
				   e text, f bytea, g text, h bigint, k double precision, m text);
SELECT sync_init('conv');
INSERT INTO conv VALUES (1, '42', '3.50', 7, 2.5, '2024-05-06', '\xa0eebc999c0b4ef8bb6d6bb9bd380a11',
						 'true', 1, 3, '{"k": 1}');
SELECT sync_payload(0) AS pc \gset
CREATE TABLE bad (id int PRIMARY KEY, a text, r double precision, n bigint);
SELECT sync_init('bad');
INSERT INTO bad VALUES (1, '12', 1.0, 5), (2, '13', 1.0, 5);
SELECT sync_payload(0) AS pb0 \gset
UPDATE bad SET a = 'not a number' WHERE id = 2;
SELECT sync_payload(sync_payload_until(:'pb0'), NULL) AS pb1 \gset
UPDATE bad SET a = '14', r = 0.1 WHERE id = 2;
SELECT sync_payload(sync_payload_until(:'pb0'), NULL) AS pb2 \gset
UPDATE bad SET r = 1.0, n = 99999 WHERE id = 2;
SELECT sync_payload(sync_payload_until(:'pb0'), NULL) AS pb3 \gset
UPDATE bad SET n = 5, r = 1e300 WHERE id = 2;
SELECT sync_payload(sync_payload_until(:'pb0'), NULL) AS pb4 \gset

\c pgsync_regress_tb
CREATE TABLE conv (id int PRIMARY KEY, a int, b numeric, c numeric(5,1), d real,
				   e date, f uuid, g boolean, h boolean, k smallint, m jsonb);
SELECT sync_init('conv');
SELECT try_apply(:'pc');
SELECT * FROM conv;

CREATE TABLE bad (id int PRIMARY KEY, a int, r real, n smallint);
SELECT sync_init('bad');
SELECT try_apply(:'pb0');
SELECT * FROM bad ORDER BY id;
-- each value Postgres cannot store is its row's rejection, with the reason
SET client_min_messages = error;
SELECT try_apply(:'pb1');		-- TEXT 'not a number' into int
SELECT table_name, pk, sqlstate, message FROM sync_rejections();
SELECT try_apply(:'pb2');		-- REAL 0.1 is not exact in real
SELECT table_name, pk, sqlstate, message FROM sync_rejections();
SELECT try_apply(:'pb3');		-- 99999 is out of smallint range
SELECT table_name, pk, sqlstate, message FROM sync_rejections();
SELECT try_apply(:'pb4');		-- 1e300 out of real range
SELECT table_name, pk, sqlstate, message FROM sync_rejections();
RESET client_min_messages;
-- nothing of the refused rows was applied
SELECT * FROM bad ORDER BY id;
SELECT id, cl FROM bad__sync_clock ORDER BY id;

\c :regress
DROP DATABASE pgsync_regress_ta;
DROP DATABASE pgsync_regress_tb;
