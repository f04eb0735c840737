/*
 * pg_types.c — mapping between PostgreSQL Datums and core pgs_values.
 *
 * Outgoing (Datum -> value) every supported type has one payload form, chosen
 * so that a SQLite replica stores something natural (docs/TYPES.md):
 * integers -> INTEGER, float4/float8 -> REAL (bit-exact, float4 widened
 * exactly), numeric -> TEXT decimal, text-like -> TEXT, bytea -> BLOB,
 * boolean -> INTEGER 0/1, uuid -> TEXT canonical, date/timestamp/timestamptz
 * -> TEXT ISO 8601 (timestamptz in UTC with 'Z'), json/jsonb -> TEXT, any
 * other type -> TEXT through its output function.
 *
 * Incoming (value -> Datum) converts to the column type: integers and reals
 * are range- and exactness-checked, TEXT goes through the type's input
 * function (so typmods and domain constraints apply), BLOB is accepted by
 * bytea, uuid (16 bytes) and text columns (valid UTF-8). A value that cannot
 * be converted raises an ERROR that names table, column and key and keeps the
 * SQLSTATE of the underlying failure.
 */
#include "pg_internal.h"

#include <math.h>

#include "catalog/pg_type.h"
#include "common/shortest_dec.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/date.h"
#include "utils/datetime.h"
#include "utils/json.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

static void value_json(StringInfo b, const pgs_value *v);

/* pgsync_type_kind classifies a (base) type. */
pgsync_kind
pgsync_type_kind(Oid basetyp)
{
	switch (basetyp)
	{
		case INT2OID:
			return PGK_INT2;
		case INT4OID:
			return PGK_INT4;
		case INT8OID:
			return PGK_INT8;
		case FLOAT4OID:
			return PGK_FLOAT4;
		case FLOAT8OID:
			return PGK_FLOAT8;
		case NUMERICOID:
			return PGK_NUMERIC;
		case TEXTOID:
		case VARCHAROID:
		case BPCHAROID:
			return PGK_TEXT;
		case BYTEAOID:
			return PGK_BYTEA;
		case BOOLOID:
			return PGK_BOOL;
		case UUIDOID:
			return PGK_UUID;
		case DATEOID:
			return PGK_DATE;
		case TIMESTAMPOID:
			return PGK_TIMESTAMP;
		case TIMESTAMPTZOID:
			return PGK_TIMESTAMPTZ;
		case JSONOID:
			return PGK_JSON;
		case JSONBOID:
			return PGK_JSONB;
		default:
			return PGK_OTHER;
	}
}

/* pgsync_kind_pk_ok: types whose equality is the equality of their payload form. */
bool
pgsync_kind_pk_ok(pgsync_kind k)
{
	switch (k)
	{
		case PGK_INT2:
		case PGK_INT4:
		case PGK_INT8:
		case PGK_TEXT:
		case PGK_BYTEA:
		case PGK_BOOL:
		case PGK_UUID:
		case PGK_DATE:
		case PGK_TIMESTAMP:
		case PGK_TIMESTAMPTZ:
			return true;
		default:
			return false;
	}
}

/* pgsync_col_setup fills the type information of c (name and attnum set). */
void
pgsync_col_setup(pgsync_col *c, Oid typid, int32 typmod)
{
	int32 basemod = typmod;
	bool  isdomain;

	c->typid = typid;
	c->typmod = typmod;
	c->basetyp = getBaseTypeAndTypmod(typid, &basemod);
	isdomain = c->basetyp != typid;
	c->kind = pgsync_type_kind(c->basetyp);
	getTypeInputInfo(typid, &c->typinput, &c->typioparam);
	{
		bool varlena;

		getTypeOutputInfo(c->basetyp, &c->typoutput, &varlena);
	}
	get_typlenbyval(typid, &c->typlen, &c->typbyval);
	c->isdomain = isdomain;
	c->text_fast = c->kind == PGK_TEXT && typmod < 0 && !isdomain && c->basetyp != BPCHAROID;
	c->infn_ok = false;
}

/* ---- Datum -> value ---------------------------------------------------- */

static void
set_text(pgs_value *out, const char *p, size_t len)
{
	if (GetDatabaseEncoding() != PG_UTF8)
	{
		char *u = pg_server_to_any(p, (int) len, PG_UTF8);

		if (u != p)
		{
			p = u;
			len = strlen(u);
		}
	}
	out->type = PGS_TEXT;
	out->len = (uint32) len;
	out->v.p = (const uint8_t *) p;
}

static void
set_cstring(pgs_value *out, const char *s)
{
	set_text(out, s, strlen(s));
}

/* put_num writes v (>= 0) in decimal, zero-padded to width digits (printf's %0*d) */
static char *
put_num(char *p, int v, int width)
{
	char tmp[12];
	int	 n = 0;

	do
	{
		tmp[n++] = (char) ('0' + v % 10);
		v /= 10;
	} while (v > 0);
	while (n < width)
		tmp[n++] = '0';
	while (n > 0)
		*p++ = tmp[--n];
	return p;
}

/*
 * format_ymd, format_tm: "YYYY-MM-DD" and "YYYY-MM-DD HH:MM:SS.ffffff[Z]",
 * the bytes of psprintf("%04d-%02d-%02d ...") without its cost: every
 * timestamp is formatted on each pull and, to check its form, on each apply.
 */
static char *
format_ymd(char *p, int y, int m, int d)
{
	p = put_num(p, y, 4);
	*p++ = '-';
	p = put_num(p, m, 2);
	*p++ = '-';
	return put_num(p, d, 2);
}

static char *
format_tm(struct pg_tm *tm, fsec_t fsec, bool utc)
{
	char *s, *p;

	if (tm->tm_year < 0 || tm->tm_mon < 0 || tm->tm_mday < 0 || tm->tm_hour < 0 || tm->tm_min < 0 ||
		tm->tm_sec < 0 || fsec < 0)
		return psprintf("%04d-%02d-%02d %02d:%02d:%02d.%06d%s", tm->tm_year, tm->tm_mon,
						tm->tm_mday, tm->tm_hour, tm->tm_min, tm->tm_sec, (int) fsec,
						utc ? "Z" : "");
	s = p = palloc(48);
	p = format_ymd(p, tm->tm_year, tm->tm_mon, tm->tm_mday);
	*p++ = ' ';
	p = put_num(p, tm->tm_hour, 2);
	*p++ = ':';
	p = put_num(p, tm->tm_min, 2);
	*p++ = ':';
	p = put_num(p, tm->tm_sec, 2);
	*p++ = '.';
	p = put_num(p, (int) fsec, 6);
	if (utc)
		*p++ = 'Z';
	*p = '\0';
	return s;
}

/*
 * pgsync_datum_value converts a column Datum to its payload value. TEXT and BLOB
 * values point into memory of CurrentMemoryContext (or into d).
 */
void
pgsync_datum_value(pgsync_col *c, Datum d, bool isnull, pgs_value *out)
{
	memset(out, 0, sizeof(*out));
	if (isnull)
	{
		out->type = PGS_NULL;
		return;
	}
	switch (c->kind)
	{
		case PGK_INT2:
			out->type = PGS_INT;
			out->v.i = DatumGetInt16(d);
			return;
		case PGK_INT4:
			out->type = PGS_INT;
			out->v.i = DatumGetInt32(d);
			return;
		case PGK_INT8:
			out->type = PGS_INT;
			out->v.i = DatumGetInt64(d);
			return;
		case PGK_BOOL:
			out->type = PGS_INT;
			out->v.i = DatumGetBool(d) ? 1 : 0;
			return;
		case PGK_FLOAT4:
			out->type = PGS_REAL;
			out->v.r = (double) DatumGetFloat4(d);
			return;
		case PGK_FLOAT8:
			out->type = PGS_REAL;
			out->v.r = DatumGetFloat8(d);
			return;
		case PGK_TEXT:
		case PGK_JSON:
		{
			text *t = DatumGetTextPP(d);

			set_text(out, VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t));
			return;
		}
		case PGK_BYTEA:
		{
			bytea *b = DatumGetByteaPP(d);

			out->type = PGS_BLOB;
			out->len = VARSIZE_ANY_EXHDR(b);
			out->v.p = (const uint8_t *) VARDATA_ANY(b);
			return;
		}
		case PGK_UUID:
		{
			char *s = palloc(37);

			pgs_uuid_format(DatumGetUUIDP(d)->data, s);
			set_text(out, s, 36);
			return;
		}
		case PGK_DATE:
		{
			DateADT date = DatumGetDateADT(d);
			int		y, m, dd;

			if (!DATE_NOT_FINITE(date))
			{
				j2date(date + POSTGRES_EPOCH_JDATE, &y, &m, &dd);
				if (y > 0 && m > 0 && dd > 0)
				{
					char *s = palloc(16);

					*format_ymd(s, y, m, dd) = '\0';
					set_cstring(out, s);
					return;
				}
			}
			break; /* infinity, BC: output function */
		}
		case PGK_TIMESTAMP:
		case PGK_TIMESTAMPTZ:
		{
			Timestamp	 ts = DatumGetTimestamp(d);
			struct pg_tm tm;
			fsec_t		 fsec;

			if (!TIMESTAMP_NOT_FINITE(ts) && timestamp2tm(ts, NULL, &tm, &fsec, NULL, NULL) == 0 &&
				tm.tm_year > 0)
			{
				set_cstring(out, format_tm(&tm, fsec, c->kind == PGK_TIMESTAMPTZ));
				return;
			}
			if (TIMESTAMP_NOT_FINITE(ts))
			{
				set_cstring(out, TIMESTAMP_IS_NOBEGIN(ts) ? "-infinity" : "infinity");
				return;
			}
			break;
		}
		default:
			break;
	}
	set_cstring(out, OidOutputFunctionCall(c->typoutput, d));
}

/* ---- value -> Datum ---------------------------------------------------- */

static char *
real_text(double r)
{
	char *buf;

	if (isnan(r))
		return pstrdup("NaN");
	if (isinf(r))
		return pstrdup(r > 0 ? "Infinity" : "-Infinity");
	buf = palloc(DOUBLE_SHORTEST_DECIMAL_LEN + 1);
	double_to_shortest_decimal_buf(r, buf);
	return buf;
}

static void
check_text(const pgs_value *v)
{
	if (memchr(v->v.p, 0, v->len) != NULL)
		ereport(ERROR, (errcode(ERRCODE_CHARACTER_NOT_IN_REPERTOIRE),
						errmsg("text value contains a NUL byte")));
}

/* text_server returns v's UTF-8 text as a NUL-terminated server string. */
static char *
text_server(const pgs_value *v)
{
	check_text(v);
	if (GetDatabaseEncoding() == PG_UTF8)
	{
		pg_verifymbstr((const char *) v->v.p, (int) v->len, false);
		return pnstrdup((const char *) v->v.p, v->len);
	}
	else
	{
		char *s = pnstrdup((const char *) v->v.p, v->len);
		char *c = pg_any_to_server(s, (int) v->len, PG_UTF8);

		return c;
	}
}

static Datum
input_call(pgsync_col *c, char *s)
{
	if (!c->infn_ok)
	{
		fmgr_info_cxt(c->typinput, &c->infn, CacheMemoryContext);
		c->infn_ok = true;
	}
	return InputFunctionCall(&c->infn, s, c->typioparam, c->typmod);
}

static int64
int_range(pgsync_col *c, int64 i)
{
	if ((c->kind == PGK_INT2 && (i < PG_INT16_MIN || i > PG_INT16_MAX)) ||
		(c->kind == PGK_INT4 && (i < PG_INT32_MIN || i > PG_INT32_MAX)))
		ereport(ERROR, (errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
						errmsg("%s out of range", format_type_be(c->basetyp))));
	return i;
}

static Datum
int_datum(pgsync_col *c, int64 i)
{
	switch (c->kind)
	{
		case PGK_INT2:
			return Int16GetDatum((int16) i);
		case PGK_INT4:
			return Int32GetDatum((int32) i);
		default:
			return Int64GetDatum(i);
	}
}

static Datum
convert(pgsync_col *c, const pgs_value *v)
{
	switch (v->type)
	{
		case PGS_INT:
			switch (c->kind)
			{
				case PGK_INT2:
				case PGK_INT4:
				case PGK_INT8:
					return int_datum(c, int_range(c, v->v.i));
				case PGK_FLOAT4:
				case PGK_FLOAT8:
				{
					double r = (double) v->v.i;
					bool   exact = r < 9223372036854775808.0 && (int64) r == v->v.i;

					if (c->kind == PGK_FLOAT4)
						exact = exact && (double) (float) r == r;
					if (!exact)
						ereport(ERROR, (errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
										errmsg("integer %lld cannot be stored exactly in type %s",
											   (long long) v->v.i, format_type_be(c->basetyp))));
					return c->kind == PGK_FLOAT4 ? Float4GetDatum((float4) r) : Float8GetDatum(r);
				}
				case PGK_BOOL:
					if (v->v.i != 0 && v->v.i != 1)
						ereport(ERROR, (errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
										errmsg("integer %lld is not a boolean (0 or 1)",
											   (long long) v->v.i)));
					return BoolGetDatum(v->v.i == 1);
				case PGK_BYTEA:
					break;
				default:
					return input_call(c, psprintf(INT64_FORMAT, (int64) v->v.i));
			}
			break;
		case PGS_REAL:
			switch (c->kind)
			{
				case PGK_FLOAT8:
					return Float8GetDatum(v->v.r);
				case PGK_FLOAT4:
					if (!isnan(v->v.r) && (double) (float) v->v.r != v->v.r)
						ereport(ERROR, (errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
										errmsg("value %s cannot be stored exactly in type real",
											   real_text(v->v.r))));
					return Float4GetDatum((float4) v->v.r);
				case PGK_INT2:
				case PGK_INT4:
				case PGK_INT8:
					if (!(v->v.r >= -9223372036854775808.0 && v->v.r < 9223372036854775808.0) ||
						floor(v->v.r) != v->v.r)
						ereport(ERROR, (errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
										errmsg("value %s is not an integer of type %s",
											   real_text(v->v.r), format_type_be(c->basetyp))));
					return int_datum(c, int_range(c, (int64) v->v.r));
				case PGK_BYTEA:
				case PGK_BOOL:
					break;
				default:
					return input_call(c, real_text(v->v.r));
			}
			break;
		case PGS_TEXT:
			switch (c->kind)
			{
				case PGK_BYTEA:
					return PointerGetDatum(pgsync_bytea(CurrentMemoryContext, v->v.p, v->len));
				case PGK_UUID:
				{
					pg_uuid_t *u = palloc(sizeof(pg_uuid_t));

					if (pgs_uuid_parse((const char *) v->v.p, v->len, u->data))
						return UUIDPGetDatum(u);
					return input_call(c, text_server(v));
				}
				default:
					if (c->text_fast)
					{
						char *s = text_server(v);

						return PointerGetDatum(cstring_to_text(s));
					}
					return input_call(c, text_server(v));
			}
			break;
		case PGS_BLOB:
			switch (c->kind)
			{
				case PGK_BYTEA:
					return PointerGetDatum(pgsync_bytea(CurrentMemoryContext, v->v.p, v->len));
				case PGK_UUID:
					if (v->len == 16)
					{
						pg_uuid_t *u = palloc(sizeof(pg_uuid_t));

						memcpy(u->data, v->v.p, 16);
						return UUIDPGetDatum(u);
					}
					break;
				case PGK_TEXT:
				case PGK_JSON:
				case PGK_JSONB:
					return input_call(c, text_server(v));
				default:
					break;
			}
			break;
		default:
			break;
	}
	ereport(ERROR,
			(errcode(ERRCODE_DATATYPE_MISMATCH), errmsg("a payload %s cannot be stored in type %s",
														v->type == PGS_INT	  ? "INTEGER"
														: v->type == PGS_REAL ? "REAL"
														: v->type == PGS_TEXT ? "TEXT"
														: v->type == PGS_BLOB ? "BLOB"
																			  : "value",
														format_type_be(c->typid))));
	pg_unreachable();
}

bytea *
pgsync_bytea(MemoryContext cxt, const void *p, size_t len)
{
	bytea *b = MemoryContextAlloc(cxt, len + VARHDRSZ);

	SET_VARSIZE(b, len + VARHDRSZ);
	memcpy(VARDATA(b), p, len);
	return b;
}

/*
 * pgsync_value_datum converts a payload value for column c of table t (row pk,
 * for the error message). Raises ERROR naming table, column and key, with
 * the SQLSTATE of the failed conversion. Memory: CurrentMemoryContext.
 */
Datum
pgsync_value_datum(pgsync_col *c, const pgs_value *v, bool *isnull, db_table *t,
				   const pgs_value *pk)
{
	MemoryContext  cxt = CurrentMemoryContext;
	volatile Datum d = (Datum) 0;

	*isnull = v->type == PGS_NULL;
	if (*isnull)
		return (Datum) 0;
	PG_TRY();
	{
		d = convert(c, v);
		if (c->isdomain)
			domain_check(d, false, c->typid, NULL, cxt);
	}
	PG_CATCH();
	{
		ErrorData *ed;

		MemoryContextSwitchTo(cxt);
		ed = CopyErrorData();
		if (ed->elevel > ERROR)
			PG_RE_THROW();
		FlushErrorState();
		ereport(ERROR, (errcode(ed->sqlerrcode),
						errmsg("cannot store a synced value in column \"%s\" of table \"%s\"",
							   c->name, t->name),
						errdetail("Key %s: %s", pgsync_pk_text(t, pk), ed->message),
						errhint("Make the column type accept the value, or fix the value on the "
								"replica that wrote it; nothing of this payload was applied.")));
	}
	PG_END_TRY();
	return d;
}

/*
 * pgsync_form_differs: would this database send d (v converted for column c by
 * pgsync_value_datum) as a value other than v, byte for byte? Then the core
 * re-stamps the cell with the stored form (db_row_forms; docs/TYPES.md, "One
 * form on every replica"). The conversions that keep every value as it is
 * (integers into integers, bit-exact reals, plain text, bytes) answer
 * without converting back; the others compare with pgsync_datum_value.
 */
bool
pgsync_form_differs(pgsync_col *c, const pgs_value *v, Datum d, bool isnull)
{
	pgs_value out;

	if (isnull)
		return v->type != PGS_NULL;
	switch (v->type)
	{
		case PGS_INT:
			if (c->kind == PGK_INT2 || c->kind == PGK_INT4 || c->kind == PGK_INT8 ||
				c->kind == PGK_BOOL)
				return false; /* range-checked, 0 or 1 */
			break;
		case PGS_REAL:
			if (c->kind == PGK_FLOAT8 || c->kind == PGK_FLOAT4)
				return false; /* exactness-checked */
			break;
		case PGS_TEXT:
			if (c->text_fast && GetDatabaseEncoding() == PG_UTF8)
				return false; /* the same bytes */
			break;
		case PGS_BLOB:
			if (c->kind == PGK_BYTEA)
				return false;
			break;
		default:
			break;
	}
	pgsync_datum_value(c, d, false, &out);
	return pgs_value_cmp(&out, v) != 0;
}

/*
 * pgsync_key_forms: a key must arrive in the form Postgres stores it. Unlike a
 * column value a key cannot be re-stamped: it names the row, and a device
 * that wrote 'A0EEBC99-...' would keep its row beside the 'a0eebc99-...' one
 * Postgres sends (and removal candidates, hashed over the key's bytes, would
 * never match it). So such a row is refused (PS007) with the form to use.
 * pgsync_key_canonical only answers whether every key column is in that form.
 */
bool
pgsync_key_canonical(db_table *t, const pgs_value *pk, const Datum *d)
{
	for (int i = 0; i < t->npk; i++)
		if (pgsync_form_differs(&t->pk[i], &pk[i], d[i], false))
			return false;
	return true;
}

void
pgsync_key_forms(db_table *t, const pgs_value *pk, const Datum *d)
{
	for (int i = 0; i < t->npk; i++)
		if (pgsync_form_differs(&t->pk[i], &pk[i], d[i], false))
		{
			pgs_value	   out;
			StringInfoData b;

			pgsync_datum_value(&t->pk[i], d[i], false, &out);
			initStringInfo(&b);
			value_json(&b, &out);
			ereport(ERROR,
					(errcode(MAKE_SQLSTATE('P', 'S', '0', '0', '7')),
					 errmsg("key column \"%s\" of table \"%s\" is not in the form Postgres stores",
							t->pk[i].name, t->name),
					 errdetail("Key %s: Postgres stores it as %s.", pgsync_pk_text(t, pk), b.data),
					 errhint("Write keys in their canonical form (sync_uuid() for uuid keys; "
							 "docs/TYPES.md, \"Key columns\"), then sync_network_discard "
							 "this row.")));
		}
}

/* ---- keys as text ------------------------------------------------------- */

static void
value_json(StringInfo b, const pgs_value *v)
{
	switch (v->type)
	{
		case PGS_NULL:
			appendStringInfoString(b, "null");
			break;
		case PGS_INT:
			appendStringInfo(b, INT64_FORMAT, (int64) v->v.i);
			break;
		case PGS_REAL:
			if (isnan(v->v.r) || isinf(v->v.r))
				escape_json(b, real_text(v->v.r));
			else
				appendStringInfoString(b, real_text(v->v.r));
			break;
		case PGS_TEXT:
		{
			char *s = pnstrdup((const char *) v->v.p, v->len);

			if (GetDatabaseEncoding() == PG_UTF8 && !pg_verifymbstr(s, (int) v->len, true))
				s = pstrdup("(invalid UTF-8)");
			escape_json(b, s);
			break;
		}
		case PGS_BLOB:
		{
			StringInfoData h;
			uint32		   i;

			initStringInfo(&h);
			appendStringInfoString(&h, "\\x");
			for (i = 0; i < v->len && i < 1024; i++)
				appendStringInfo(&h, "%02x", v->v.p[i]);
			escape_json(b, h.data);
			break;
		}
		default:
			appendStringInfoString(b, "null");
	}
}

/* pgsync_pk_json renders pk as a JSON object {"col": value, ...} (palloc'd). */
char *
pgsync_pk_json(db_table *t, const pgs_value *pk)
{
	StringInfoData b;
	int			   i;

	initStringInfo(&b);
	appendStringInfoChar(&b, '{');
	for (i = 0; i < t->npk; i++)
	{
		if (i > 0)
			appendStringInfoString(&b, ", ");
		escape_json(&b, t->pk[i].name);
		appendStringInfoString(&b, ": ");
		value_json(&b, &pk[i]);
	}
	appendStringInfoChar(&b, '}');
	return b.data;
}

/* pgsync_pk_text renders pk like Postgres' key details: (a, b)=(1, x). */
char *
pgsync_pk_text(db_table *t, const pgs_value *pk)
{
	StringInfoData b;
	int			   i;

	initStringInfo(&b);
	appendStringInfoChar(&b, '(');
	for (i = 0; i < t->npk; i++)
		appendStringInfo(&b, "%s%s", i ? ", " : "", t->pk[i].name);
	appendStringInfoString(&b, ")=(");
	for (i = 0; i < t->npk; i++)
	{
		const pgs_value *v = &pk[i];

		if (i > 0)
			appendStringInfoString(&b, ", ");
		switch (v->type)
		{
			case PGS_INT:
				appendStringInfo(&b, INT64_FORMAT, (int64) v->v.i);
				break;
			case PGS_REAL:
				appendStringInfoString(&b, real_text(v->v.r));
				break;
			case PGS_TEXT:
				appendBinaryStringInfo(&b, (const char *) v->v.p, Min(v->len, 200));
				break;
			case PGS_BLOB:
				appendStringInfo(&b, "<%u bytes>", v->len);
				break;
			default:
				appendStringInfoString(&b, "null");
		}
	}
	appendStringInfoChar(&b, ')');
	return b.data;
}
