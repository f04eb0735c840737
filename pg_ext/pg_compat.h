/*
 * pg_compat.h — what differs between the PostgreSQL major versions pgsync
 * supports (15 to 18), in one place.
 *
 * pg_ext is written against the newest API; for older servers this header
 * supplies it in terms of what they have, so the .c files need no
 * PG_VERSION_NUM blocks. When support for a version ends, delete its block.
 * Included from pg_internal.h, after postgres.h.
 */
#ifndef PGSYNC_PG_COMPAT_H
#define PGSYNC_PG_COMPAT_H

#if PG_VERSION_NUM < 150000
#error "pgsync needs PostgreSQL 15 or later"
#endif

#include "catalog/pg_class.h" /* RelationRelationId, for object_ownercheck */

/*
 * 18 replaced the trailing pg_attribute_noreturn() with a leading
 * pg_noreturn (C11 _Noreturn). GCC and clang accept the attribute in front
 * of a declaration too, so older servers can spell it the new way.
 */
#if PG_VERSION_NUM < 180000
#define pg_noreturn pg_attribute_noreturn()
#endif

/*
 * 16 folded the per-catalog ownership checks (pg_class_ownercheck, ...)
 * into object_ownercheck(classid, objectid, roleid). pg_ext only asks about
 * relations.
 */
#if PG_VERSION_NUM < 160000
#include "utils/acl.h"

static inline bool
object_ownercheck(Oid classid, Oid objectid, Oid roleid)
{
	Assert(classid == RelationRelationId);
	return pg_class_ownercheck(objectid, roleid);
}

/* and the privilege checks into object_aclcheck; pg_ext asks about schemas */
#include "catalog/pg_namespace.h"

static inline AclResult
object_aclcheck(Oid classid, Oid objectid, Oid roleid, AclMode mode)
{
	Assert(classid == NamespaceRelationId);
	return pg_namespace_aclcheck(objectid, roleid, mode);
}
#endif

/*
 * 18 added RelationGetPrimaryKeyIndex(rel, deferrable_ok); before, a
 * deferrable primary key was never returned (deferrable_ok = false).
 * 18 also added the instrumentation argument of index_beginscan.
 * The old prototypes must be seen before these macros; inside a macro its
 * own name is not expanded again, so each calls the real function.
 */
#if PG_VERSION_NUM < 180000
#include "access/genam.h"
#include "utils/relcache.h"

#define RelationGetPrimaryKeyIndex(rel, deferrable_ok) RelationGetPrimaryKeyIndex(rel)
#define index_beginscan(heap, index, snapshot, instrument, nkeys, norderbys)                       \
	index_beginscan(heap, index, snapshot, nkeys, norderbys)
#endif

#endif /* PGSYNC_PG_COMPAT_H */
