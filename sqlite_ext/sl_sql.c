/*
 * sl_sql.c — the small SQLite helpers every file of the extension uses:
 * quoting identifiers, turning SQLite errors into pgs_err, preparing and
 * running statements, and moving values between statements and pgs_values.
 * It calls nothing of the extension: the bottom of sqlite_ext/.
 */
#include "sl_internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <cjson/cJSON.h>

char *
sl_quote(const char *ident)
{
	return sqlite3_mprintf("\"%w\"", ident);
}

char *
sl_pk_where(const db_table *t, const char *prefix, int first)
{
	char *w = sqlite3_mprintf("");

	for (int i = 0; i < t->npk && w; i++)
	{
		char *n =
			sqlite3_mprintf("%s%s%s%s = ?%d", w, i ? " AND " : "", prefix, t->pk_q[i], first + i);

		sqlite3_free(w);
		w = n;
	}
	return w;
}

char *
sl_pk_list(const db_table *t, const char *prefix)
{
	char *w = sqlite3_mprintf("");

	for (int i = 0; i < t->npk && w; i++)
	{
		char *n = sqlite3_mprintf("%s%s%s%s", w, i ? ", " : "", prefix, t->pk_q[i]);

		sqlite3_free(w);
		w = n;
	}
	return w;
}

pgs_rc
sl_dberr(db_conn *c, pgs_err *err, const char *what)
{
	int code = sqlite3_extended_errcode(c->db);

	pgs_failf(err, PGS_ERR_DB, NULL, "%s: %s", what, sqlite3_errmsg(c->db));
	if ((code & 0xff) == SQLITE_CONSTRAINT || (code & 0xff) == SQLITE_MISMATCH)
		err->rc = PGS_ERR_VALUE;
	return err ? err->rc : PGS_ERR_DB;
}

/*
 * sl_row_error: a row write failed. Constraint, type and size errors belong
 * to the row (its own fate: careful mode rejects it alone, the fast path
 * starts over carefully); anything else (I/O, locks, memory) is the
 * engine's and aborts the apply.
 */
pgs_rc
sl_row_error(db_conn *c, pgs_err *err, const char *what)
{
	int			code = sqlite3_extended_errcode(c->db);
	const char *state = NULL;

	switch (code)
	{
		case SQLITE_CONSTRAINT_NOTNULL:
			state = "23502";
			break;
		case SQLITE_CONSTRAINT_CHECK:
			state = "23514";
			break;
		case SQLITE_CONSTRAINT_UNIQUE:
		case SQLITE_CONSTRAINT_PRIMARYKEY:
			state = "23505";
			break;
		case SQLITE_CONSTRAINT_FOREIGNKEY:
			state = "23503";
			break;
		case SQLITE_CONSTRAINT_TRIGGER:
		case SQLITE_CONSTRAINT_FUNCTION:
			state = "P0001";
			break;
		case SQLITE_CONSTRAINT_DATATYPE:
		case SQLITE_MISMATCH:
			state = "42804";
			break;
		case SQLITE_TOOBIG:
			state = "54000";
			break;
		default:
			if ((code & 0xff) == SQLITE_CONSTRAINT)
				state = "23000";
	}
	if (!state)
		return sl_dberr(c, err, what);
	pgs_failf(err, c->careful ? PGS_ERR_ROW : PGS_ERR_CAREFUL, NULL, "%s", sqlite3_errmsg(c->db));
	pgs_err_code(err, state);
	return err->rc;
}

pgs_rc
sl_prepare(db_conn *c, sqlite3_stmt **st, const char *sql, pgs_err *err)
{
	if (*st)
		return PGS_OK;
	if (sqlite3_prepare_v3(c->db, sql, -1, SQLITE_PREPARE_PERSISTENT, st, NULL) != SQLITE_OK)
	{
		*st = NULL;
		return sl_dberr(c, err, "could not prepare statement");
	}
	return PGS_OK;
}

static pgs_rc
exec_text(db_conn *c, const char *sql, bool keep, pgs_err *err)
{
	char *msg = NULL;

	if (keep && !strchr(sql, ';'))
	{
		/* one statement (SAVEPOINT, RELEASE, ...): prepared once per connection */
		if (sl_stmt_exec(c, sql))
			return PGS_OK;
		pgs_failf(err, PGS_ERR_DB, NULL, "%s", sqlite3_errmsg(c->db));
		return PGS_ERR_DB;
	}
	if (sqlite3_exec(c->db, sql, NULL, NULL, &msg) != SQLITE_OK)
	{
		pgs_failf(err, PGS_ERR_DB, NULL, "%s", msg ? msg : sqlite3_errmsg(c->db));
		sqlite3_free(msg);
		return PGS_ERR_DB;
	}
	return PGS_OK;
}

pgs_rc
sl_exec(db_conn *c, const char *sql, pgs_err *err)
{
	return exec_text(c, sql, true, err);
}

/* ---- statements kept by their text ---- */

static uint32_t
text_hash(const char *s)
{
	uint32_t h = 2166136261u; /* FNV-1a */

	for (; *s; s++)
		h = (h ^ (uint8_t) *s) * 16777619u;
	return h;
}

sqlite3_stmt *
sl_stmt(db_conn *c, const char *sql)
{
	uint32_t	  h = text_hash(sql);
	sl_text_stmt *free_slot = NULL, *old = NULL;
	sqlite3_stmt *st = NULL;
	char		 *copy;
	bool		  nested = false;

	for (int i = 0; i < c->nstmts; i++)
	{
		sl_text_stmt *s = &c->stmts[i];

		if (s->hash == h && strcmp(s->sql, sql) == 0)
		{
			if (s->out)
			{
				nested = true;
				break;
			}
			s->out = true;
			s->used = ++c->stmt_tick;
			return s->st;
		}
		if (!s->out && (!old || s->used < old->used))
			old = s;
	}
	if (nested || (c->nstmts == SL_TEXT_STMTS && !old))
	{
		/* in use by an outer caller, or every slot is: not kept */
		if (sqlite3_prepare_v2(c->db, sql, -1, &st, NULL) != SQLITE_OK)
		{
			sqlite3_finalize(st);
			return NULL;
		}
		return st;
	}
	if (sqlite3_prepare_v3(c->db, sql, -1, SQLITE_PREPARE_PERSISTENT, &st, NULL) != SQLITE_OK ||
		!st)
	{
		sqlite3_finalize(st);
		return NULL;
	}
	if (!(copy = sqlite3_mprintf("%s", sql)))
		return st; /* not kept: sl_stmt_done finalizes it */
	if (c->nstmts < SL_TEXT_STMTS)
		free_slot = &c->stmts[c->nstmts++];
	else
	{
		/* the least recently used one makes room */
		sqlite3_finalize(old->st);
		sqlite3_free(old->sql);
		free_slot = old;
	}
	free_slot->sql = copy;
	free_slot->hash = h;
	free_slot->st = st;
	free_slot->out = true;
	free_slot->used = ++c->stmt_tick;
	return st;
}

void
sl_stmt_done(db_conn *c, sqlite3_stmt *st)
{
	if (!st)
		return;
	for (int i = 0; i < c->nstmts; i++)
		if (c->stmts[i].st == st)
		{
			sqlite3_reset(st);
			sqlite3_clear_bindings(st);
			c->stmts[i].out = false;
			return;
		}
	sqlite3_finalize(st);
}

bool
sl_stmt_exec(db_conn *c, const char *sql)
{
	sqlite3_stmt *st = sl_stmt(c, sql);
	int			  s = SQLITE_ERROR;

	if (st)
	{
		while ((s = sqlite3_step(st)) == SQLITE_ROW)
			;
		sl_stmt_done(c, st);
	}
	return s == SQLITE_DONE;
}

bool
sl_table_exists(db_conn *c, const char *name)
{
	/* looked up in the schema in memory (SQLite answers no for a view) */
	return sqlite3_table_column_metadata(c->db, "main", name, NULL, NULL, NULL, NULL, NULL, NULL) ==
		   SQLITE_OK;
}

void
sl_stmt_clear(db_conn *c)
{
	for (int i = 0; i < c->nstmts; i++)
	{
		sqlite3_finalize(c->stmts[i].st);
		sqlite3_free(c->stmts[i].sql);
	}
	c->nstmts = 0;
}

void
sl_bind_value(sqlite3_stmt *st, int i, const pgs_value *v)
{
	switch (v->type)
	{
		case PGS_INT:
			sqlite3_bind_int64(st, i, v->v.i);
			break;
		case PGS_REAL:
			sqlite3_bind_double(st, i, v->v.r);
			break;
		case PGS_TEXT:
			sqlite3_bind_text(st, i, (const char *) v->v.p, (int) v->len, SQLITE_STATIC);
			break;
		case PGS_BLOB:
			sqlite3_bind_blob(st, i, v->v.p, (int) v->len, SQLITE_STATIC);
			break;
		default:
			sqlite3_bind_null(st, i);
	}
}

void
sl_column_value(sqlite3_stmt *st, int i, pgs_value *v)
{
	v->len = 0;
	switch (sqlite3_column_type(st, i))
	{
		case SQLITE_INTEGER:
			v->type = PGS_INT;
			v->v.i = sqlite3_column_int64(st, i);
			break;
		case SQLITE_FLOAT:
			v->type = PGS_REAL;
			v->v.r = sqlite3_column_double(st, i);
			break;
		case SQLITE_TEXT:
			v->type = PGS_TEXT;
			v->v.p = sqlite3_column_text(st, i);
			v->len = (uint32_t) sqlite3_column_bytes(st, i);
			break;
		case SQLITE_BLOB:
			v->type = PGS_BLOB;
			v->v.p = sqlite3_column_blob(st, i);
			v->len = (uint32_t) sqlite3_column_bytes(st, i);
			if (!v->v.p)
				v->v.p = (const uint8_t *) "";
			break;
		default:
			v->type = PGS_NULL;
	}
}

pgs_rc
sl_execf(db_conn *c, pgs_err *err, const char *fmt, ...)
{
	va_list ap;
	char   *sql;
	pgs_rc	rc;

	va_start(ap, fmt);
	sql = sqlite3_vmprintf(fmt, ap);
	va_end(ap);
	if (!sql)
		return pgs_fail(err, PGS_ERR_NOMEM, "out of memory", NULL, NULL);
	rc = exec_text(c, sql, false, err); /* made for this call: not kept */
	sqlite3_free(sql);
	return rc;
}

/* ---- keys as JSON (the form sync_network_rejected shows) ---- */

char *
sl_pk_json(const db_table *t, const pgs_value *pk)
{
	cJSON *o = cJSON_CreateObject();
	char  *text, *out = NULL;

	for (int i = 0; o && i < t->npk; i++)
	{
		const pgs_value *v = &pk[i];
		cJSON			*j = NULL;

		switch (v->type)
		{
			case PGS_INT:
				j = cJSON_CreateNumber((double) v->v.i);
				if (j && (v->v.i > (INT64_C(1) << 53) || v->v.i < -(INT64_C(1) << 53)))
				{
					/* beyond a double: the exact digits */
					char num[24];

					cJSON_Delete(j);
					snprintf(num, sizeof num, "%lld", (long long) v->v.i);
					j = cJSON_CreateRaw(num);
				}
				break;
			case PGS_REAL:
				j = cJSON_CreateNumber(v->v.r);
				break;
			case PGS_TEXT:
			{
				char *s = sqlite3_mprintf("%.*s", (int) v->len, (const char *) v->v.p);

				j = cJSON_CreateString(s ? s : "");
				sqlite3_free(s);
				break;
			}
			case PGS_BLOB:
			{
				static const char hex[] = "0123456789abcdef";
				char			 *s = sqlite3_malloc64((size_t) v->len * 2 + 3);

				if (s)
				{
					s[0] = '\\';
					s[1] = 'x';
					for (uint32_t k = 0; k < v->len; k++)
					{
						s[2 + 2 * k] = hex[v->v.p[k] >> 4];
						s[3 + 2 * k] = hex[v->v.p[k] & 15];
					}
					s[2 + 2 * (size_t) v->len] = '\0';
					j = cJSON_CreateString(s);
					sqlite3_free(s);
				}
				break;
			}
			default:
				j = cJSON_CreateNull();
		}
		cJSON_AddItemToObject(o, t->pk_names[i], j);
	}
	text = o ? cJSON_PrintUnformatted(o) : NULL;
	if (text)
		out = sqlite3_mprintf("%s", text);
	cJSON_free(text);
	cJSON_Delete(o);
	return out;
}

void
sl_result_json(sqlite3_context *ctx, cJSON *j)
{
	char *t = j ? cJSON_PrintUnformatted(j) : NULL;

	cJSON_Delete(j);
	if (!t)
	{
		sqlite3_result_error_nomem(ctx);
		return;
	}
	sqlite3_result_text(ctx, t, -1, SQLITE_TRANSIENT);
	sqlite3_result_subtype(ctx, 'J');
	cJSON_free(t);
}
