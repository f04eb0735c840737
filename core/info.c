/*
 * info.c — sync_payload_info: a payload rendered as JSON, for people
 * debugging sync. Uses cJSON. Integers are emitted as exact JSON numbers,
 * REALs with 17 significant digits (NaN and infinities as strings), BLOBs as
 * {"hex": "..."}, TEXT that is not valid UTF-8 or holds NUL as {"text_hex": "..."}. At most
 * PGS_INFO_MAX_ROWS row groups are listed.
 */
#include "pgsync.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#define PGS_INFO_MAX_ROWS 10000

/* json_str: a JSON string of p; bytes that are not valid UTF-8 (or NUL) become '?' */
static cJSON *
json_str(const uint8_t *p, uint32_t len)
{
	char	*s = pgs_malloc((size_t) len + 1);
	cJSON	*j;
	uint32_t i = 0;

	if (!s)
		return NULL;
	while (i < len)
	{
		uint32_t n = 1;

		while (n <= 4 && i + n <= len && !pgs_utf8_valid(p + i, n))
			n++;
		if (n <= 4 && i + n <= len)
		{
			memcpy(s + i, p + i, n);
			i += n;
		}
		else
			s[i++] = '?';
	}
	s[len] = '\0';
	j = cJSON_CreateString(s);
	pgs_free(s);
	return j;
}

static cJSON *json_value(const pgs_value *v);

static cJSON *
json_value(const pgs_value *v)
{
	char num[40];

	switch (v->type)
	{
		case PGS_INT:
			snprintf(num, sizeof num, "%lld", (long long) v->v.i);
			return cJSON_CreateRaw(num);
		case PGS_REAL:
			if (isnan(v->v.r))
				return cJSON_CreateString("NaN");
			if (isinf(v->v.r))
				return cJSON_CreateString(v->v.r > 0 ? "Infinity" : "-Infinity");
			snprintf(num, sizeof num, "%.17g", v->v.r);
			if (!strpbrk(num, ".eE"))
				strcat(num, ".0");
			return cJSON_CreateRaw(num);
		case PGS_TEXT:
			if (pgs_utf8_valid(v->v.p, v->len))
				return json_str(v->v.p, v->len);
			/* NUL or invalid UTF-8: JSON text cannot carry it as is */
			{
				cJSON *o = json_value(&(pgs_value){.type = PGS_BLOB, .len = v->len, .v.p = v->v.p});
				cJSON *h = o ? cJSON_DetachItemFromObject(o, "hex") : NULL;

				cJSON_Delete(o);
				o = cJSON_CreateObject();
				if (h)
					cJSON_AddItemToObject(o, "text_hex", h);
				return o;
			}
		case PGS_BLOB:
		{
			static const char hex[] = "0123456789abcdef";
			char			 *s = pgs_malloc((size_t) v->len * 2 + 1);
			cJSON			 *o;

			if (!s)
				return NULL;
			for (uint32_t i = 0; i < v->len; i++)
			{
				s[2 * i] = hex[v->v.p[i] >> 4];
				s[2 * i + 1] = hex[v->v.p[i] & 15];
			}
			s[2 * (size_t) v->len] = '\0';
			o = cJSON_CreateObject();
			cJSON_AddStringToObject(o, "hex", s);
			pgs_free(s);
			return o;
		}
		default:
			return cJSON_CreateNull();
	}
}

static cJSON *
json_site(const uint8_t *site)
{
	char u[37];

	pgs_uuid_format(site, u);
	return cJSON_CreateString(u);
}

pgs_rc
pgs_payload_info(const uint8_t *p, size_t len, char **out, pgs_err *err)
{
	pgs_header	   h;
	const uint8_t *body;
	uint8_t		  *owned = NULL;
	pgs_reader	   r;
	pgs_rc		   rc;
	cJSON		  *root, *arr;
	char		  *text;
	uint64_t	   shown = 0, changes = 0;

	*out = NULL;
	if ((rc = pgs_payload_body(p, len, &h, &body, &owned, err)) != PGS_OK)
		return rc;
	if ((rc = pgs_reader_open(&r, h.version, body, h.body_len, err)) != PGS_OK)
	{
		pgs_reader_close(&r);
		pgs_free(owned);
		return rc;
	}
	root = cJSON_CreateObject();
	cJSON_AddNumberToObject(root, "format_version", h.version);
	cJSON_AddBoolToObject(root, "compressed", h.flags & 1);
	cJSON_AddBoolToObject(root, "more", (h.flags & 2) != 0);
	cJSON_AddItemToObject(root, "origin", json_site(h.origin));
	cJSON_AddItemToObject(root, "since", json_value(&(pgs_value){.type = PGS_INT, .v.i = h.since}));
	cJSON_AddItemToObject(root, "until", json_value(&(pgs_value){.type = PGS_INT, .v.i = h.until}));
	cJSON_AddNumberToObject(root, "body_bytes", h.body_len);
	cJSON_AddNumberToObject(root, "stored_bytes", h.stored_len);
	arr = cJSON_AddArrayToObject(root, "sites");
	for (uint32_t i = 0; i < r.nsites; i++)
		cJSON_AddItemToArray(arr, json_site(r.sites + 16 * i));
	arr = cJSON_AddArrayToObject(root, "tables");
	for (uint32_t t = 0; t < r.ntables; t++)
	{
		pgs_dict_table *d = &r.tables[t];
		cJSON		   *o = cJSON_CreateObject(), *k, *c;

		cJSON_AddItemToObject(o, "name", json_str(d->name, d->name_len));
		k = cJSON_AddArrayToObject(o, "key");
		for (uint32_t i = 0; i < d->npk; i++)
			cJSON_AddItemToArray(k, json_str(d->pk_names[i], d->pk_name_lens[i]));
		c = cJSON_AddArrayToObject(o, "columns");
		for (uint32_t i = 0; i < d->ncols; i++)
			cJSON_AddItemToArray(c, json_str(d->col_names[i], d->col_name_lens[i]));
		if (d->has_fingerprint)
		{
			char fp[20];

			snprintf(fp, sizeof fp, "%016llx", (unsigned long long) d->fingerprint);
			cJSON_AddStringToObject(o, "fingerprint", fp);
		}
		if (d->nalias)
		{
			/* {"former name": "column"} */
			cJSON *al = cJSON_AddObjectToObject(o, "former_names");

			for (uint32_t i = 0; al && i < d->nalias; i++)
			{
				char *nm = pgs_malloc(d->alias_name_lens[i] + 1);

				if (!nm)
					break;
				memcpy(nm, d->alias_names[i], d->alias_name_lens[i]);
				nm[d->alias_name_lens[i]] = '\0';
				cJSON_AddItemToObject(
					al, nm,
					json_str(d->col_names[d->alias_cols[i]], d->col_name_lens[d->alias_cols[i]]));
				pgs_free(nm);
			}
		}
		if (d->snap)
		{
			cJSON_AddBoolToObject(o, "snapshot_begin", (d->snap & PGS_SNAP_BEGIN) != 0);
			cJSON_AddBoolToObject(o, "snapshot_end", (d->snap & PGS_SNAP_END) != 0);
		}
		cJSON_AddItemToArray(arr, o);
	}
	arr = cJSON_AddArrayToObject(root, "rows");
	for (;;)
	{
		pgs_group		g;
		bool			done;
		pgs_dict_table *d;
		cJSON		   *o, *k, *c;

		if ((rc = pgs_reader_next(&r, &g, &done, err)) != PGS_OK)
			break;
		if (done)
			break;
		changes += g.nchanges;
		if (shown >= PGS_INFO_MAX_ROWS)
			continue;
		shown++;
		d = &r.tables[g.table];
		o = cJSON_CreateObject();
		cJSON_AddItemToObject(o, "table", json_str(d->name, d->name_len));
		if (g.kind == PGS_GROUP_CANDIDATE)
		{
			char hx[20];

			snprintf(hx, sizeof hx, "%016llx", (unsigned long long) g.hash);
			cJSON_AddStringToObject(o, "kind", "candidate");
			cJSON_AddStringToObject(o, "key_hash", hx);
			cJSON_AddNumberToObject(o, "cl", (double) g.cl);
			cJSON_AddItemToArray(arr, o);
			continue;
		}
		cJSON_AddStringToObject(o, "kind",
								g.kind == PGS_GROUP_ABSENT ? "absent"
								: g.whole				   ? "whole"
														   : "changes");
		k = cJSON_AddArrayToObject(o, "key");
		for (uint32_t i = 0; i < d->npk; i++)
			cJSON_AddItemToArray(k, json_value(&g.pk[i]));
		if (g.kind == PGS_GROUP_ABSENT)
		{
			cJSON_AddItemToArray(arr, o);
			continue;
		}
		cJSON_AddNumberToObject(o, "cl", (double) g.cl);
		cJSON_AddBoolToObject(o, "deleted", (g.cl & 1) == 0);
		cJSON_AddItemToObject(o, "cl_site", json_site(r.sites + 16 * g.cl_site));
		c = cJSON_AddArrayToObject(o, "changes");
		for (uint32_t i = 0; i < g.nchanges; i++)
		{
			pgs_change *ch = &g.changes[i];
			cJSON	   *e = cJSON_CreateObject();

			cJSON_AddItemToObject(e, "column",
								  json_str(d->col_names[ch->col], d->col_name_lens[ch->col]));
			cJSON_AddItemToObject(e, "value", json_value(&ch->value));
			cJSON_AddItemToObject(
				e, "hlc", json_value(&(pgs_value){.type = PGS_INT, .v.i = (int64_t) ch->hlc}));
			cJSON_AddNumberToObject(e, "hlc_ms", (double) (ch->hlc >> PGS_HLC_LOGICAL_BITS));
			cJSON_AddItemToObject(e, "site", json_site(r.sites + 16 * ch->site));
			cJSON_AddItemToArray(c, e);
		}
		cJSON_AddItemToArray(arr, o);
	}
	if (rc == PGS_OK)
	{
		cJSON_AddNumberToObject(root, "row_count", (double) r.nrows);
		cJSON_AddNumberToObject(root, "change_count", (double) changes);
		if (shown < r.nrows)
			cJSON_AddNumberToObject(root, "rows_omitted", (double) (r.nrows - shown));
		text = cJSON_PrintUnformatted(root);
		if (!text)
			rc = pgs_fail(err, PGS_ERR_NOMEM, "out of memory rendering payload JSON", NULL, NULL);
		else
		{
			size_t n = strlen(text);

			*out = pgs_malloc(n + 1);
			if (*out)
				memcpy(*out, text, n + 1);
			else
				rc = pgs_fail(err, PGS_ERR_NOMEM, "out of memory rendering payload JSON", NULL,
							  NULL);
			cJSON_free(text);
		}
	}
	cJSON_Delete(root);
	pgs_reader_close(&r);
	pgs_free(owned);
	return rc;
}
