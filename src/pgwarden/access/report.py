"""`pgwarden access report`: who can do what, straight from the catalog."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pgwarden.access import catalog
from pgwarden.access.catalog import Conn
from pgwarden.config import Config


@dataclass
class AccessReport:
    roles: list[dict[str, Any]] = field(default_factory=list)
    owners: list[dict[str, Any]] = field(default_factory=list)
    table_privileges: list[dict[str, Any]] = field(default_factory=list)
    column_privileges: list[dict[str, Any]] = field(default_factory=list)
    schema_changers: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def access_report(conn: Conn, config: Config) -> AccessReport:
    report = AccessReport()
    schemas = list(config.access.managed_schemas)
    everyone = catalog.roles(conn)
    for role in sorted(everyone.values(), key=lambda r: r.name):
        if role.name.startswith("pg_"):
            continue
        report.roles.append(
            {
                "role": role.name,
                "login": role.login,
                "superuser": role.superuser,
                "member_of": sorted(role.member_of),
            }
        )
    owners = catalog.owned_objects(conn, schemas)
    for obj in owners:
        report.owners.append(
            {"kind": obj.kind, "schema": obj.schema, "name": obj.name, "owner": obj.owner}
        )
    for (grantee, schema, table), privs in sorted(catalog.table_privileges(conn, schemas).items()):
        report.table_privileges.append(
            {"grantee": grantee, "table": f"{schema}.{table}", "privileges": sorted(privs)}
        )
    rows = conn.execute(
        """
        SELECT pg_catalog.pg_get_userbyid(a.grantee), n.nspname, c.relname, att.attname,
               a.privilege_type
        FROM pg_catalog.pg_attribute att
        JOIN pg_catalog.pg_class c ON c.oid = att.attrelid
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        CROSS JOIN LATERAL pg_catalog.aclexplode(att.attacl) a
        WHERE n.nspname = ANY (%s) AND att.attacl IS NOT NULL
        ORDER BY 1, 2, 3, 4
        """,
        (schemas,),
    ).fetchall()
    for row in rows:
        grantee, nsp, rel, col, priv = (str(v) for v in row)
        report.column_privileges.append(
            {
                "grantee": str(grantee),
                "table": f"{nsp}.{rel}",
                "column": str(col),
                "privilege": str(priv),
            }
        )
    # Who may ALTER/DROP a table: its owner, members that can act as the owner, superusers.
    table_owners = sorted({o.owner for o in owners if o.kind == "table"})
    for owner in table_owners:
        members = sorted(
            r.name
            for r in everyone.values()
            if owner in r.member_of and not r.name.startswith("pg_")
        )
        report.schema_changers.append(
            {
                "owner": owner,
                "members": members,
                "superusers": sorted(r.name for r in everyone.values() if r.superuser),
            }
        )
    return report
