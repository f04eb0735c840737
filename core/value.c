/*
 * value.c — encoding of pgs_value inside payloads (see docs/PAYLOAD.md).
 *
 * INTEGER is a zigzag varint, REAL its 8-byte IEEE-754 bit pattern in
 * little-endian order (so -0.0, NaN payloads, infinities and subnormals
 * survive bit for bit), TEXT and BLOB a varint length plus the bytes.
 */
#include "pgsync.h"

#include <string.h>
#define XXH_STATIC_LINKING_ONLY /* XXH3_state_t on the stack */
#include <xxhash.h>

static void
put_le64(uint8_t *out, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		out[i] = (uint8_t) (v >> (8 * i));
}

static uint64_t
get_le64(const uint8_t *p)
{
	uint64_t v = 0;

	for (int i = 0; i < 8; i++)
		v |= (uint64_t) p[i] << (8 * i);
	return v;
}

void
pgs_value_put(pgs_buf *b, const pgs_value *v)
{
	switch (v->type)
	{
		case PGS_INT:
			pgs_buf_svarint(b, v->v.i);
			break;
		case PGS_REAL:
		{
			uint64_t bits;
			uint8_t	 tmp[8];

			memcpy(&bits, &v->v.r, 8);
			put_le64(tmp, bits);
			pgs_buf_put(b, tmp, 8);
			break;
		}
		case PGS_TEXT:
		case PGS_BLOB:
			pgs_buf_varint(b, v->len);
			pgs_buf_put(b, v->v.p, v->len);
			break;
		default:
			break;
	}
}

pgs_rc
pgs_value_get(const uint8_t **pp, const uint8_t *end, uint8_t type, pgs_value *v, pgs_err *err)
{
	const uint8_t *p = *pp;
	uint64_t	   u;
	int			   n;

	v->type = type;
	v->len = 0;
	switch (type)
	{
		case PGS_NULL:
			v->v.i = 0;
			break;
		case PGS_INT:
			if (!(n = pgs_varint_get(p, end, &u)))
				return pgs_fail(err, PGS_ERR_CORRUPT, "corrupt payload: truncated integer value",
								NULL, NULL);
			v->v.i = pgs_unzigzag(u);
			p += n;
			break;
		case PGS_REAL:
		{
			uint64_t bits;

			if (end - p < 8)
				return pgs_fail(err, PGS_ERR_CORRUPT, "corrupt payload: truncated real value", NULL,
								NULL);
			bits = get_le64(p);
			memcpy(&v->v.r, &bits, 8);
			p += 8;
			break;
		}
		case PGS_TEXT:
		case PGS_BLOB:
			if (!(n = pgs_varint_get(p, end, &u)))
				return pgs_fail(err, PGS_ERR_CORRUPT, "corrupt payload: truncated value length",
								NULL, NULL);
			p += n;
			if (u > PGS_MAX_VALUE || u > (uint64_t) (end - p))
				return pgs_fail(err, PGS_ERR_CORRUPT,
								"corrupt payload: value length exceeds the payload", NULL, NULL);
			v->len = (uint32_t) u;
			v->v.p = p;
			p += u;
			break;
		default:
			return pgs_failf(err, PGS_ERR_CORRUPT, NULL, "corrupt payload: unknown value type %u",
							 type);
	}
	*pp = p;
	return PGS_OK;
}

/*
 * pgs_value_cmp orders values by type first, then by content (REAL by bit
 * pattern, so the order is total even for NaN). Used by tests and tie checks.
 */
int
pgs_value_cmp(const pgs_value *a, const pgs_value *b)
{
	if (a->type != b->type)
		return a->type < b->type ? -1 : 1;
	switch (a->type)
	{
		case PGS_NULL:
			return 0;
		case PGS_INT:
			return a->v.i < b->v.i ? -1 : a->v.i > b->v.i;
		case PGS_REAL:
		{
			uint64_t x, y;

			memcpy(&x, &a->v.r, 8);
			memcpy(&y, &b->v.r, 8);
			return x < y ? -1 : x > y;
		}
		default:
		{
			uint32_t n = a->len < b->len ? a->len : b->len;
			int		 c = n ? memcmp(a->v.p, b->v.p, n) : 0;

			if (c)
				return c < 0 ? -1 : 1;
			return a->len < b->len ? -1 : a->len > b->len;
		}
	}
}

void
pgs_key_encode(pgs_buf *b, uint32_t npk, const pgs_value *pk)
{
	for (uint32_t i = 0; i < npk; i++)
	{
		pgs_buf_u8(b, pk[i].type);
		pgs_value_put(b, &pk[i]);
	}
}

uint64_t
pgs_key_hash(uint64_t salt, uint32_t npk, const pgs_value *pk)
{
	XXH3_state_t st;

	/* streamed: the same bytes as pgs_key_encode, without a buffer. The state
	 * is zeroed first: xxHash 0.8.1's reset_withSeed compares the seed with
	 * the state's previous one and skips making the secret when they match,
	 * so an uninitialised state could keep a garbage secret (valgrind). */
	memset(&st, 0, sizeof st);
	XXH3_64bits_reset_withSeed(&st, salt);
	for (uint32_t i = 0; i < npk; i++)
	{
		uint8_t tmp[1 + PGS_VARINT_MAX];
		int		n = 1;

		tmp[0] = pk[i].type;
		switch (pk[i].type)
		{
			case PGS_INT:
				n += pgs_varint_put(tmp + 1, pgs_zigzag(pk[i].v.i));
				XXH3_64bits_update(&st, tmp, (size_t) n);
				break;
			case PGS_REAL:
			{
				uint64_t bits;

				memcpy(&bits, &pk[i].v.r, 8);
				put_le64(tmp + 1, bits);
				XXH3_64bits_update(&st, tmp, 9);
				break;
			}
			case PGS_TEXT:
			case PGS_BLOB:
				n += pgs_varint_put(tmp + 1, pk[i].len);
				XXH3_64bits_update(&st, tmp, (size_t) n);
				XXH3_64bits_update(&st, pk[i].v.p, pk[i].len);
				break;
			default:
				XXH3_64bits_update(&st, tmp, 1);
		}
	}
	return XXH3_64bits_digest(&st);
}
