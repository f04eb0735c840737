/*
 * test_same_scenarios.c — the local-edit scenarios of
 * test/scenarios/local_edits.json on the core's mock.
 *
 * The same file runs on SQLite and Postgres (test/pg/test_same_scenarios.py);
 * here each scenario's transactions go through mock_local_insert/update/
 * delete (which call core/local.c as both engines' capture does), the
 * mock's payload is read back through pgs_payload_info and reduced the same
 * way: per row its causal length, whether it is deleted, and each stamped
 * column's value with the rank of its stamp among the row's stamps. Every
 * scenario must give exactly its "expect".
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "mockdb.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#define SCENARIOS "test/scenarios/local_edits.json"

static char *
read_all(const char *path)
{
	FILE *f = fopen(path, "rb");
	char *buf;
	long  n;

	if (!f)
		return NULL;
	fseek(f, 0, SEEK_END);
	n = ftell(f);
	fseek(f, 0, SEEK_SET);
	buf = malloc((size_t) n + 1);
	if (buf && fread(buf, 1, (size_t) n, f) != (size_t) n)
	{
		free(buf);
		buf = NULL;
	}
	if (buf)
		buf[n] = '\0';
	fclose(f);
	return buf;
}

/* value: a JSON scalar of the file as a mock value (strings point into j) */
static pgs_value
value(const cJSON *j)
{
	if (cJSON_IsString(j))
		return mock_text(j->valuestring);
	if (cJSON_IsNumber(j))
		return mock_int((int64_t) j->valuedouble);
	return mock_null();
}

static int
col_index(const char *name)
{
	return strcmp(name, "a") == 0 ? 0 : strcmp(name, "b") == 0 ? 1 : -1;
}

static void
run_edit(db_conn *db, db_table *t, const cJSON *op)
{
	const char *kind = cJSON_GetArrayItem(op, 0)->valuestring;
	pgs_value	pk = mock_text(cJSON_GetArrayItem(op, 1)->valuestring);

	if (strcmp(kind, "insert") == 0)
	{
		pgs_value vals[2] = {value(cJSON_GetArrayItem(op, 2)), value(cJSON_GetArrayItem(op, 3))};

		assert_int_equal(mock_local_insert(db, t, &pk, vals), PGS_OK);
	}
	else if (strcmp(kind, "update") == 0)
	{
		const cJSON *set = cJSON_GetArrayItem(op, 2), *c;
		int			 cols[2], n = 0;
		pgs_value	 vals[2];

		cJSON_ArrayForEach(c, set)
		{
			cols[n] = col_index(c->string);
			assert_true(cols[n] >= 0);
			vals[n++] = value(c);
		}
		assert_int_equal(mock_local_update(db, t, &pk, n, cols, vals), PGS_OK);
	}
	else if (strcmp(kind, "delete") == 0)
		assert_int_equal(mock_local_delete(db, t, &pk), PGS_OK);
	else if (strcmp(kind, "rekey") == 0)
	{
		/* UPDATE t SET id = new: the old key's life ends, the new key's
		 * begins with the row's values (what both engines capture) */
		pgs_value		 to = mock_text(cJSON_GetArrayItem(op, 2)->valuestring), vals[2];
		const pgs_value *row = mock_row_get(db, t, &pk);

		assert_non_null(row);
		memcpy(vals, row, sizeof vals);
		/* the values point into the row, which the delete frees: copy texts */
		for (int i = 0; i < 2; i++)
			if (vals[i].type == PGS_TEXT)
			{
				char *s = malloc(vals[i].len + 1);

				memcpy(s, vals[i].v.p, vals[i].len);
				s[vals[i].len] = '\0';
				vals[i] = mock_text(s);
			}
		assert_int_equal(mock_local_delete(db, t, &pk), PGS_OK);
		assert_int_equal(mock_local_insert(db, t, &to, vals), PGS_OK);
		for (int i = 0; i < 2; i++)
			if (vals[i].type == PGS_TEXT)
				free((void *) vals[i].v.p);
	}
	else
		fail_msg("unknown edit %s", kind);
}

/* reduce: the rules' outcome from a payload_info JSON (see the file's about) */
static cJSON *
reduce(const cJSON *info)
{
	cJSON		*out = cJSON_CreateArray();
	const cJSON *r;

	cJSON_ArrayForEach(r, cJSON_GetObjectItem(info, "rows"))
	{
		cJSON		*o = cJSON_CreateObject(), *cols = cJSON_CreateObject();
		const cJSON *changes = cJSON_GetObjectItem(r, "changes"), *c, *d;

		cJSON_AddItemToObject(
			o, "key", cJSON_Duplicate(cJSON_GetArrayItem(cJSON_GetObjectItem(r, "key"), 0), 1));
		cJSON_AddItemToObject(o, "cl", cJSON_Duplicate(cJSON_GetObjectItem(r, "cl"), 1));
		cJSON_AddItemToObject(o, "deleted", cJSON_Duplicate(cJSON_GetObjectItem(r, "deleted"), 1));
		cJSON_ArrayForEach(c, changes)
		{
			double h = cJSON_GetObjectItem(c, "hlc")->valuedouble;
			int	   rank = 0;
			cJSON *pair = cJSON_CreateArray();

			/* dense rank: the distinct stamps below this one */
			cJSON_ArrayForEach(d, changes)
			{
				double hd = cJSON_GetObjectItem(d, "hlc")->valuedouble;
				bool   seen = false;

				if (hd >= h)
					continue;
				for (const cJSON *e = changes->child; e != d; e = e->next)
					if (cJSON_GetObjectItem(e, "hlc")->valuedouble == hd)
						seen = true;
				rank += !seen;
			}
			cJSON_AddItemToArray(pair, cJSON_Duplicate(cJSON_GetObjectItem(c, "value"), 1));
			cJSON_AddItemToArray(pair, cJSON_CreateNumber(rank));
			cJSON_AddItemToObject(cols, cJSON_GetObjectItem(c, "column")->valuestring, pair);
		}
		cJSON_AddItemToObject(o, "cols", cols);
		cJSON_AddItemToArray(out, o);
	}
	return out; /* the mock builds rows in key order, as the file lists them */
}

static void
test_scenarios_on_the_mock(void **state)
{
	static const char *const pk[] = {"id"}, *const cols[] = {"a", "b"};
	char  *text = read_all(SCENARIOS);
	cJSON *file, *sc;
	int	   n = 0, bad = 0;

	(void) state;
	assert_non_null(text); /* run from the top of the tree, as make test does */
	file = cJSON_Parse(text);
	assert_non_null(file);
	cJSON_ArrayForEach(sc, cJSON_GetObjectItem(file, "scenarios"))
	{
		db_conn		*db = mock_open(NULL);
		db_table	*t = mock_add_table(db, "t", DB_ALGO_CLS, 1, pk, 2, cols);
		const cJSON *txn, *op;
		pgs_buf		 buf;
		pgs_err		 err;
		char		*json = NULL;
		cJSON		*got, *info = NULL;

		/* a small clock: the stamps stay exact as the doubles cJSON reads */
		mock_set_clock(db, 1000000);

		cJSON_ArrayForEach(txn, cJSON_GetObjectItem(sc, "txns"))
		{
			mock_begin(db);
			cJSON_ArrayForEach(op, txn) run_edit(db, t, op);
			mock_commit(db);
			mock_advance(db, 1);
		}
		pgs_buf_init(&buf);
		assert_int_equal(mock_build(db, 0, NULL, 0, &buf, &err), PGS_OK);
		if (buf.len)
		{
			assert_int_equal(pgs_payload_info(buf.p, buf.len, &json, &err), PGS_OK);
			info = cJSON_Parse(json);
		}
		got = info ? reduce(info) : cJSON_CreateArray();
		if (!cJSON_Compare(got, cJSON_GetObjectItem(sc, "expect"), true))
		{
			char *g = cJSON_PrintUnformatted(got),
				 *e = cJSON_PrintUnformatted(cJSON_GetObjectItem(sc, "expect"));

			printf("not ok - %s on the mock:\n  got    %s\n  expect %s\n",
				   cJSON_GetObjectItem(sc, "name")->valuestring, g, e);
			free(g);
			free(e);
			bad++;
		}
		n++;
		cJSON_Delete(got);
		cJSON_Delete(info);
		pgs_free(json);
		pgs_buf_free(&buf);
		mock_close(db);
	}
	printf("%d scenarios on the mock, %d differ\n", n, bad);
	cJSON_Delete(file);
	free(text);
	assert_true(n >= 10);
	assert_int_equal(bad, 0);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_scenarios_on_the_mock),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
