/*
 * auth.c — bearer-token authentication for /v1 requests.
 *
 * A token is accepted when (1) its header names an algorithm for which the
 * server holds a key — HS256 with jwt_secret, RS256 with jwt_public_key — so
 * an HS256 token is never verified with the RSA public key as its secret
 * (the classic algorithm-confusion attack) and "none" is never accepted;
 * (2) libjwt verifies the signature with that key; (3) exp and nbf, when
 * present, hold within jwt_leeway seconds; (4) its role claim (or
 * default_role) is in allowed_roles. Failures of (1)-(3) are 401, of (4) 403.
 * Keys and roles are the request's database's (each [database] section may
 * have its own). The verified claims go to Postgres verbatim as
 * request.jwt.claims; their canonical form (every claim but exp, iat, nbf
 * and jti, sorted by name: what pg_ext's device fingerprint hashes) is the
 * key under which pulls may share one computation (work.c).
 */
#include "server.h"

#include "../core/pgsync.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <jwt.h>

#define TOKEN_MAX 8192

static const char auth_hint[] =
	"Send Authorization: Bearer <token> with a token signed by your identity provider.";

/* b64url_text: a base64url part of a token as a NUL-terminated string in
 * out (cap bytes with the NUL); false when it does not decode or fit. */
static bool
b64url_text(const char *in, size_t n, char *out, size_t cap)
{
	long k = cap ? pgs_b64url_decode(in, n, (uint8_t *) out, cap - 1) : -1;

	if (k < 0)
		return false;
	out[k] = '\0';
	return true;
}

/* header_alg reads "alg" from the token's header without trusting it. */
static bool
header_alg(const char *token, char *alg, size_t alglen)
{
	const char *dot = strchr(token, '.');
	char		hdr[1024];
	cJSON	   *j, *a;
	bool		ok = false;

	if (!dot || !b64url_text(token, (size_t) (dot - token), hdr, sizeof hdr))
		return false;
	j = cJSON_Parse(hdr);
	a = cJSON_GetObjectItemCaseSensitive(j, "alg");
	if (cJSON_IsString(a) && strlen(a->valuestring) < alglen)
	{
		strcpy(alg, a->valuestring);
		ok = true;
	}
	cJSON_Delete(j);
	return ok;
}

static uint64_t
fnv1a(const char *s)
{
	uint64_t h = 1469598103934665603ULL;

	for (; *s; s++)
		h = (h ^ (unsigned char) *s) * 1099511628211ULL;
	return h;
}

static bool
role_allowed(const srv_db *db, const char *role)
{
	for (int i = 0; i < db->c.nroles; i++)
		if (strcmp(db->c.roles[i], role) == 0)
			return true;
	return false;
}

static int
cmp_name(const void *a, const void *b)
{
	return strcmp(*(char *const *) a, *(char *const *) b);
}

/*
 * canonical: the claims that decide a view, in a stable text form (malloc):
 * "name":value pairs sorted by name, without exp, iat, nbf and jti (the
 * fingerprint of pg_ext/pg_view.c ignores the same claims).
 */
static char *
canonical(const cJSON *claims)
{
	const cJSON *it;
	const char **names;
	int			 n = 0;
	cJSON		*sorted = cJSON_CreateObject();
	char		*text, *out;

	names = malloc(sizeof(char *) * (size_t) (cJSON_GetArraySize(claims) + 1));
	if (!names || !sorted)
	{
		free(names);
		cJSON_Delete(sorted);
		return NULL;
	}
	cJSON_ArrayForEach(it, claims)
	{
		if (strcmp(it->string, "exp") == 0 || strcmp(it->string, "iat") == 0 ||
			strcmp(it->string, "nbf") == 0 || strcmp(it->string, "jti") == 0)
			continue;
		names[n++] = it->string;
	}
	qsort(names, (size_t) n, sizeof(char *), cmp_name);
	/* references: printed in insertion order, owned by claims */
	for (int i = 0; i < n; i++)
		cJSON_AddItemReferenceToObject(sorted, names[i],
									   cJSON_GetObjectItemCaseSensitive(claims, names[i]));
	text = cJSON_PrintUnformatted(sorted);
	cJSON_Delete(sorted);
	free(names);
	out = text ? strdup(text) : NULL;
	cJSON_free(text);
	return out;
}

/* payload_json: the token's claims, parsed without verifying anything. */
static cJSON *
payload_json(const char *token)
{
	const char *a = strchr(token, '.'), *b;
	char		buf[TOKEN_MAX];

	if (!a || !(b = strchr(a + 1, '.')) || (size_t) (b - a - 1) >= sizeof buf ||
		!b64url_text(a + 1, (size_t) (b - a - 1), buf, sizeof buf))
		return NULL;
	return cJSON_Parse(buf);
}

bool
auth_peek_claim(const char *token, const char *name, char *out, size_t outlen)
{
	cJSON		*j = token && strlen(token) <= TOKEN_MAX ? payload_json(token) : NULL;
	const cJSON *c = cJSON_GetObjectItemCaseSensitive(j, name);
	bool		 ok = cJSON_IsString(c) && strlen(c->valuestring) < outlen;

	if (ok)
		strcpy(out, c->valuestring);
	cJSON_Delete(j);
	return ok;
}

char *
auth_claim_string(const auth_info *a, const char *name)
{
	cJSON		*j = a->claims ? cJSON_Parse(a->claims) : NULL;
	const cJSON *c = cJSON_GetObjectItemCaseSensitive(j, name);
	char		*out = cJSON_IsString(c) ? strdup(c->valuestring) : NULL;

	cJSON_Delete(j);
	return out;
}

/* auth_check verifies token and fills out (auth_free it even on failure). */
/*
 * time_claim reads a NumericDate claim (RFC 7519: seconds since the epoch).
 * Absent is fine; anything else than a finite number in [0, 253402300799]
 * (year 9999) is a 401: such a value cannot be compared without overflow.
 */
static bool
time_claim(const cJSON *claims, const char *name, int64_t *out, bool *present, srv_error *e)
{
	const cJSON *c = cJSON_GetObjectItemCaseSensitive(claims, name);
	double		 v;

	*present = c != NULL;
	*out = 0;
	if (!c)
		return true;
	if (!cJSON_IsNumber(c))
		return srv_fail(e, 401, "invalid token", auth_hint, "The %s claim is not a number.", name);
	v = c->valuedouble;
	if (!(v >= 0 && v <= 253402300799.0)) /* also false for NaN */
		return srv_fail(e, 401, "invalid token", auth_hint,
						"The %s claim is out of range: a time in seconds since 1970, before the "
						"year 10000, is expected.",
						name);
	*out = (int64_t) v;
	return true;
}

/*
 * claims_refused: why libjwt refused a token whose signature may be fine:
 * it refuses claims that are not JSON and time claims beyond a 64-bit
 * integer (exp 2^63, iat 10^30) before we see them. Read from the
 * unverified payload for the message only: the token is refused either
 * way. True with e filled when the claims are not a JSON object or a time
 * claim is out of range.
 */
static bool
claims_refused(const char *token, srv_error *e)
{
	static const char *const names[] = {"exp", "nbf", "iat"};
	const char				*p = strchr(token, '.'), *q = p ? strchr(p + 1, '.') : NULL;
	size_t					 n = q ? (size_t) (q - p - 1) : 0;
	char					*text = q ? malloc(n + 1) : NULL;
	cJSON					*claims = NULL;
	bool					 bad = false;

	if (text && b64url_text(p + 1, n, text, n + 1) && !cJSON_IsObject(claims = cJSON_Parse(text)))
	{
		srv_fail(e, 401, "invalid token", auth_hint, "The token's claims are not a JSON object.");
		bad = true;
	}
	for (int i = 0; cJSON_IsObject(claims) && i < 3 && !bad; i++)
	{
		int64_t v;
		bool	has;

		bad = !time_claim(claims, names[i], &v, &has, e);
	}
	cJSON_Delete(claims);
	free(text);
	return bad;
}

bool
auth_check(const srv_db *db, const char *token, auth_info *out, srv_error *e)
{
	const srv_dbconf	*dc = &db->c;
	char				 alg[32];
	jwt_t				*jwt = NULL;
	jwt_alg_t			 want;
	const unsigned char *key;
	int					 keylen, rc;
	char				*grants = NULL;
	cJSON				*claims = NULL, *c;
	int64_t				 now = srv_wall_s();
	const char			*role;
	bool				 ok = false;

	memset(out, 0, sizeof *out);
	if (!token || !*token)
		return srv_fail(e, 401, "missing token", auth_hint, "The request has no bearer token.");
	if (strlen(token) > TOKEN_MAX)
		return srv_fail(e, 401, "invalid token", auth_hint, "The token is longer than %d bytes.",
						TOKEN_MAX);
	if (!header_alg(token, alg, sizeof alg))
		return srv_fail(e, 401, "invalid token", auth_hint,
						"The token is not a JWT (header.payload.signature).");
	if (strcmp(alg, "HS256") == 0 && dc->jwt_secret)
	{
		want = JWT_ALG_HS256;
		key = (const unsigned char *) dc->jwt_secret;
		keylen = (int) strlen(dc->jwt_secret);
	}
	else if (strcmp(alg, "RS256") == 0 && dc->jwt_public_pem)
	{
		want = JWT_ALG_RS256;
		key = (const unsigned char *) dc->jwt_public_pem;
		keylen = (int) strlen(dc->jwt_public_pem);
	}
	else
		return srv_fail(e, 401, "invalid token",
						"Sign tokens with an algorithm this server has a key for.",
						"Tokens signed with \"%s\" are not accepted here (accepted:%s%s).", alg,
						dc->jwt_secret ? " HS256" : "", dc->jwt_public_pem ? " RS256" : "");
	rc = jwt_decode(&jwt, token, key, keylen);
	if (rc != 0 || !jwt || jwt_get_alg(jwt) != want)
	{
		if (!claims_refused(token, e))
			srv_fail(e, 401, "invalid token", auth_hint,
					 "The token's signature does not verify with the server's %s key.", alg);
		goto out;
	}
	grants = jwt_get_grants_json(jwt, NULL);
	claims = grants ? cJSON_Parse(grants) : NULL;
	if (!cJSON_IsObject(claims))
	{
		srv_fail(e, 401, "invalid token", auth_hint, "The token's claims are not a JSON object.");
		goto out;
	}
	/* times: numbers of seconds in [0, year 9999], checked before any arithmetic */
	{
		int64_t exp = 0, nbf = 0, iat = 0;
		bool	has_exp, has_nbf, has_iat;

		if (!time_claim(claims, "exp", &exp, &has_exp, e) ||
			!time_claim(claims, "nbf", &nbf, &has_nbf, e) ||
			!time_claim(claims, "iat", &iat, &has_iat, e))
			goto out;
		if (has_exp)
		{
			out->exp = exp;
			/* RFC 7519 4.1.4: not accepted on or after exp */
			if (now >= exp + cfg.jwt_leeway)
			{
				srv_fail(e, 401, "token expired",
						 "Get a new token from your identity provider and retry.",
						 "The token expired %lld seconds ago.", (long long) (now - exp));
				goto out;
			}
		}
		if (has_nbf && now + cfg.jwt_leeway < nbf)
		{
			srv_fail(e, 401, "token not yet valid",
					 "Check the clocks of the server and of the token issuer.",
					 "The token's nbf claim is %lld seconds in the future.",
					 (long long) (nbf - now));
			goto out;
		}
		if (has_iat && now + cfg.jwt_leeway < iat)
		{
			srv_fail(e, 401, "token not yet valid",
					 "Check the clocks of the server and of the token issuer.",
					 "The token's iat claim says it was issued %lld seconds in the future.",
					 (long long) (iat - now));
			goto out;
		}
	}
	c = cJSON_GetObjectItemCaseSensitive(claims, cfg.role_claim);
	if (c && !cJSON_IsString(c))
	{
		srv_fail(e, 403, "role not allowed", "Put a role name (a string) in the token.",
				 "The %s claim is not a string.", cfg.role_claim);
		goto out;
	}
	role = c ? c->valuestring : dc->default_role;
	if (!role)
	{
		srv_fail(e, 403, "role not allowed",
				 "Add the role claim to the token, or configure default_role.",
				 "The token has no \"%s\" claim.", cfg.role_claim);
		goto out;
	}
	if (strlen(role) >= sizeof out->role || !role_allowed(db, role))
	{
		srv_fail(e, 403, "role not allowed",
				 "Use a token for one of the roles in the server's allowed_roles.",
				 "The role \"%.64s\" is not in this server's allow-list.", role);
		goto out;
	}
	strcpy(out->role, role);
	c = cJSON_GetObjectItemCaseSensitive(claims, "sub");
	if (cJSON_IsString(c) && strlen(c->valuestring) < sizeof out->subject - 4)
		snprintf(out->subject, sizeof out->subject, "sub:%s", c->valuestring);
	else
		snprintf(out->subject, sizeof out->subject, "tok:%016llx",
				 (unsigned long long) fnv1a(token));
	/* the principal that owns the devices it syncs: the subject, else the role */
	if (cJSON_IsString(c) && c->valuestring[0] && strlen(c->valuestring) < sizeof out->principal)
		snprintf(out->principal, sizeof out->principal, "%s", c->valuestring);
	else
		snprintf(out->principal, sizeof out->principal, "role:%s", role);
	if (!(out->canon = canonical(claims)))
	{
		srv_fail(e, 500, "internal error", NULL, "Out of memory reading the token.");
		goto out;
	}
	out->claims = grants;
	grants = NULL;
	ok = true;
out:
	cJSON_Delete(claims);
	free(grants);
	if (jwt)
		jwt_free(jwt);
	return ok;
}

bool
auth_copy(auth_info *dst, const auth_info *src)
{
	*dst = *src;
	dst->claims = src->claims ? strdup(src->claims) : NULL;
	dst->canon = src->canon ? strdup(src->canon) : NULL;
	if ((src->claims && !dst->claims) || (src->canon && !dst->canon))
	{
		auth_free(dst);
		return false;
	}
	return true;
}

void
auth_free(auth_info *a)
{
	free(a->claims);
	free(a->canon);
	a->claims = NULL;
	a->canon = NULL;
}
