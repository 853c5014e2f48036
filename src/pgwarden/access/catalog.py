"""What the database says about roles, owners and privileges."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

Conn = psycopg.Connection[tuple[object, ...]]


MANAGED_MARK = "managed by pgwarden"


@dataclass(frozen=True)
class Role:
    name: str
    login: bool
    superuser: bool
    member_of: frozenset[str]
    managed: bool = False  # carries pgwarden's mark: inside the scope authoritative mode owns


@dataclass(frozen=True)
class OwnedObject:
    kind: str  # schema, table, view, materialized view, sequence, foreign table, function
    schema: str
    name: str  # for functions: the signature, e.g. f(integer)
    owner: str
    partitioned: bool = False


def server_major(conn: Conn) -> int:
    return int(conn.info.server_version // 10000)


def roles(conn: Conn) -> dict[str, Role]:
    rows = conn.execute(
        """
        SELECT r.rolname, r.rolcanlogin, r.rolsuper,
               COALESCE(array_agg(g.rolname) FILTER (WHERE g.rolname IS NOT NULL), '{}'),
               pg_catalog.shobj_description(r.oid, 'pg_authid') IS NOT DISTINCT FROM %s
        FROM pg_catalog.pg_roles r
        LEFT JOIN pg_catalog.pg_auth_members m ON m.member = r.oid
        LEFT JOIN pg_catalog.pg_roles g ON g.oid = m.roleid
        GROUP BY r.oid, r.rolname, r.rolcanlogin, r.rolsuper
        """,
        (MANAGED_MARK,),
    ).fetchall()
    return {
        str(n): Role(str(n), bool(login), bool(su), frozenset(str(x) for x in groups), bool(mark))  # type: ignore[attr-defined]
        for n, login, su, groups, mark in rows
    }


def membership_options(conn: Conn, member: str, group: str) -> tuple[bool, bool] | None:
    """(inherit, set) of a membership on PostgreSQL 16+; None when not a member."""
    row = conn.execute(
        """
        SELECT m.inherit_option, m.set_option FROM pg_catalog.pg_auth_members m
        JOIN pg_catalog.pg_roles r ON r.oid = m.member
        JOIN pg_catalog.pg_roles g ON g.oid = m.roleid
        WHERE r.rolname = %s AND g.rolname = %s
        """,
        (member, group),
    ).fetchone()
    return (bool(row[0]), bool(row[1])) if row else None


def stored_password(conn: Conn, role: str) -> str | None:
    """The stored verifier (readable by superusers only); None when not readable or unset."""
    try:
        with conn.transaction():
            row = conn.execute(
                "SELECT rolpassword FROM pg_catalog.pg_authid WHERE rolname = %s", (role,)
            ).fetchone()
    except psycopg.errors.InsufficientPrivilege:
        return None
    return str(row[0]) if row and row[0] else None


def owned_objects(conn: Conn, schemas: list[str]) -> list[OwnedObject]:
    """Schemas and the objects in them an owner can hold, minus extension members and the
    sequences that follow their table's owner (serial and identity columns)."""
    rows = conn.execute(
        """
        SELECT 'schema', n.nspname, n.nspname, pg_catalog.pg_get_userbyid(n.nspowner), false
        FROM pg_catalog.pg_namespace n WHERE n.nspname = ANY (%(s)s)
        UNION ALL
        SELECT CASE c.relkind WHEN 'r' THEN 'table' WHEN 'p' THEN 'table' WHEN 'v' THEN 'view'
                    WHEN 'm' THEN 'materialized view' WHEN 'S' THEN 'sequence'
                    WHEN 'f' THEN 'foreign table' END,
               n.nspname, c.relname, pg_catalog.pg_get_userbyid(c.relowner), c.relkind = 'p'
        FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = ANY (%(s)s) AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
          AND NOT c.relispartition
          AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                          WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = c.oid
                            AND d.deptype IN ('e', 'a', 'i'))
        UNION ALL
        SELECT CASE p.prokind WHEN 'p' THEN 'procedure' ELSE 'function' END, n.nspname,
               p.proname || '(' || pg_catalog.pg_get_function_identity_arguments(p.oid) || ')',
               pg_catalog.pg_get_userbyid(p.proowner), false
        FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = ANY (%(s)s) AND p.prokind IN ('f', 'p')
          AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                          WHERE d.classid = 'pg_catalog.pg_proc'::regclass AND d.objid = p.oid
                            AND d.deptype = 'e')
        ORDER BY 2, 1, 3
        """,
        {"s": schemas},
    ).fetchall()
    return [OwnedObject(str(k), str(s), str(n), str(o), bool(p)) for k, s, n, o, p in rows]


def table_privileges(conn: Conn, schemas: list[str]) -> dict[tuple[str, str, str], set[str]]:
    """(grantee, schema, table) → privileges granted directly on tables and views."""
    rows = conn.execute(
        """
        SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_catalog.pg_get_userbyid(a.grantee) END,
               n.nspname, c.relname, a.privilege_type
        FROM pg_catalog.pg_class c
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        CROSS JOIN LATERAL pg_catalog.aclexplode(c.relacl) a
        WHERE n.nspname = ANY (%s) AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
          AND NOT c.relispartition
        """,
        (schemas,),
    ).fetchall()
    result: dict[tuple[str, str, str], set[str]] = {}
    for grantee, nsp, rel, priv in rows:
        result.setdefault((str(grantee), str(nsp), str(rel)), set()).add(str(priv))
    return result


def relations_in(conn: Conn, schema: str) -> list[str]:
    """Tables and views of one schema (partitions not counted)."""
    rows = conn.execute(
        "SELECT c.relname FROM pg_catalog.pg_class c "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relkind IN ('r', 'p', 'v', 'm', 'f') AND NOT c.relispartition",
        (schema,),
    ).fetchall()
    return [str(r[0]) for r in rows]


def schema_usage(conn: Conn) -> dict[str, set[str]]:
    """role → schemas it has USAGE on by a direct grant (owners not counted)."""
    rows = conn.execute(
        """
        SELECT pg_catalog.pg_get_userbyid(a.grantee), n.nspname
        FROM pg_catalog.pg_namespace n, pg_catalog.aclexplode(n.nspacl) a
        WHERE a.privilege_type = 'USAGE' AND a.grantee <> 0 AND a.grantee <> n.nspowner
        """
    ).fetchall()
    result: dict[str, set[str]] = {}
    for role, schema in rows:
        result.setdefault(str(role), set()).add(str(schema))
    return result


def default_privileges(conn: Conn, owner: str) -> dict[tuple[str, str], set[str]]:
    """(grantee, schema) → table privileges granted by default on tables `owner` creates."""
    rows = conn.execute(
        """
        SELECT pg_catalog.pg_get_userbyid(a.grantee), n.nspname, a.privilege_type
        FROM pg_catalog.pg_default_acl d
        JOIN pg_catalog.pg_namespace n ON n.oid = d.defaclnamespace
        CROSS JOIN LATERAL pg_catalog.aclexplode(d.defaclacl) a
        WHERE d.defaclrole = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = %s)
          AND d.defaclobjtype = 'r'
        """,
        (owner,),
    ).fetchall()
    result: dict[tuple[str, str], set[str]] = {}
    for grantee, nsp, priv in rows:
        result.setdefault((str(grantee), str(nsp)), set()).add(str(priv))
    return result


def has_schema_privilege(conn: Conn, role: str, schema: str, privilege: str) -> bool:
    """A direct grant (not through PUBLIC or membership)."""
    row = conn.execute(
        """
        SELECT EXISTS (
            SELECT 1 FROM pg_catalog.pg_namespace n, pg_catalog.aclexplode(n.nspacl) a
            WHERE n.nspname = %s AND a.privilege_type = %s
              AND a.grantee = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = %s))
        """,
        (schema, privilege, role),
    ).fetchone()
    return bool(row and row[0])


def public_has_schema_create(conn: Conn, schema: str) -> bool:
    row = conn.execute(
        """
        SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace n,
                              pg_catalog.aclexplode(COALESCE(n.nspacl,
                                  pg_catalog.acldefault('n', n.nspowner))) a
                       WHERE n.nspname = %s AND a.grantee = 0 AND a.privilege_type = 'CREATE')
        """,
        (schema,),
    ).fetchone()
    return bool(row and row[0])


def database_grants(conn: Conn) -> dict[str, set[str]]:
    """grantee ('PUBLIC' for 0) → privileges on the current database (defaults included)."""
    rows = conn.execute(
        """
        SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_catalog.pg_get_userbyid(a.grantee) END,
               a.privilege_type
        FROM pg_catalog.pg_database d,
             pg_catalog.aclexplode(COALESCE(d.datacl, pg_catalog.acldefault('d', d.datdba))) a
        WHERE d.datname = pg_catalog.current_database()
        """
    ).fetchall()
    result: dict[str, set[str]] = {}
    for grantee, priv in rows:
        result.setdefault(str(grantee), set()).add(str(priv))
    return result


def tables_in(conn: Conn, schemas: list[str]) -> list[tuple[str, str]]:
    rows = conn.execute(
        """
        SELECT n.nspname, c.relname FROM pg_catalog.pg_class c
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND NOT c.relispartition
          AND (%s::text[] IS NULL OR n.nspname = ANY (%s))
          AND n.nspname NOT IN ('pg_catalog', 'information_schema')
          AND n.nspname !~ '^pg_(toast|temp_)'
        ORDER BY 1, 2
        """,
        (schemas or None, schemas or None),
    ).fetchall()
    return [(str(a), str(b)) for a, b in rows]


def schema_exists(conn: Conn, schema: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = %s", (schema,)
    ).fetchone()
    return row is not None
