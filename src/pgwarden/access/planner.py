"""access: desired roles and privileges (pgwarden.yaml) versus the catalog → operations.

Operations come grouped: roles first (they must exist before anything names them), then
memberships, the database, schemas, ownership, table privileges, and the auditor's read access
to history. Mode `additive` (the default) only creates and grants.
"""

from __future__ import annotations

from collections.abc import Sequence

from psycopg import sql

from pgwarden.access import catalog
from pgwarden.access.catalog import Conn
from pgwarden.access.secrets import read_password, scram_verifier, verifier_matches
from pgwarden.config import AccessConfig, Config
from pgwarden.errors import ConfigError, UserError
from pgwarden.history.catalog import HistorySchema, has_meta
from pgwarden.history.catalog import is_installed as history_installed
from pgwarden.history.catalog import meta as history_meta
from pgwarden.history.names import TableName, parse_pattern
from pgwarden.history.planner import install_operations
from pgwarden.history.upgrade import set_meta
from pgwarden.plan import Operation
from pgwarden.sqlfiles import compose, sql_version

DOMAIN = "access"
_KIND_SQL = {
    "schema": "SCHEMA",
    "table": "TABLE",
    "view": "VIEW",
    "materialized view": "MATERIALIZED VIEW",
    "sequence": "SEQUENCE",
    "foreign table": "FOREIGN TABLE",
}


def _op(
    description: str, statement: sql.Composed | sql.SQL, display: str | None = None
) -> Operation:
    return Operation(DOMAIN, description, statement, display=display)


def _ident(name: str) -> sql.Identifier:
    return sql.Identifier(name)


def _check_special_roles(access: AccessConfig) -> None:
    for special in (access.manager_role, access.auditor_role):
        if special in access.roles and access.roles[special].login:
            raise ConfigError(f"access.roles.{special}: the {special!r} role must not log in")


def _role_operations(
    conn: Conn, access: AccessConfig, existing: dict[str, catalog.Role], superuser: bool
) -> list[Operation]:
    ops: list[Operation] = []
    wanted: dict[str, bool] = {access.manager_role: False, access.auditor_role: False}
    wanted.update({name: role.login for name, role in access.roles.items()})
    for name, login in wanted.items():
        have = existing.get(name)
        if have is None:
            ops.append(
                _op(
                    f"role {name}: create ({'LOGIN' if login else 'NOLOGIN'})",
                    sql.SQL("CREATE ROLE {} {}; COMMENT ON ROLE {} IS {}").format(
                        _ident(name),
                        sql.SQL("LOGIN" if login else "NOLOGIN"),
                        _ident(name),
                        sql.Literal(catalog.MANAGED_MARK),
                    ),
                )
            )
            continue
        elif have.superuser:
            raise ConfigError(
                f"access.roles.{name}: {name!r} is a superuser; pgwarden never manages superusers",
                hint="remove it from access.roles",
            )
        if not have.managed:
            ops.append(
                _op(
                    f"role {name}: mark as managed by pgwarden",
                    sql.SQL("COMMENT ON ROLE {} IS {}").format(
                        _ident(name), sql.Literal(catalog.MANAGED_MARK)
                    ),
                )
            )
        if have.login != login:
            ops.append(
                _op(
                    f"role {name}: {'allow' if login else 'forbid'} login",
                    sql.SQL("ALTER ROLE {} {}").format(
                        _ident(name), sql.SQL("LOGIN" if login else "NOLOGIN")
                    ),
                )
            )
    for name, role in access.roles.items():
        password = read_password(name, role)
        if password is None:
            continue
        if not role.login:
            raise ConfigError(f"access.roles.{name}: a password needs login: true")
        if name in existing and verifier_matches(catalog.stored_password(conn, name), password):
            continue
        if name in existing and not superuser:
            continue  # cannot read the stored verifier: only set passwords of new roles
        verifier = scram_verifier(conn, name, password)
        quiet: tuple[sql.SQL, ...] = ()
        if superuser:
            quiet = (
                sql.SQL("SET LOCAL log_statement = 'none'"),
                sql.SQL("SET LOCAL log_min_duration_statement = -1"),
            )
        ops.append(
            Operation(
                DOMAIN,
                f"role {name}: set its password (SCRAM-SHA-256, hashed here, not logged)",
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(_ident(name), sql.Literal(verifier)),
                display=f"ALTER ROLE \"{name}\" PASSWORD '***'",
                prelude=quiet,
            )
        )
    return ops


def _membership_operations(
    conn: Conn, access: AccessConfig, existing: dict[str, catalog.Role], major: int
) -> list[Operation]:
    ops: list[Operation] = []
    known = set(existing) | set(access.roles) | {access.manager_role, access.auditor_role}
    pairs: list[tuple[str, str, bool]] = []  # (member, group, sudo-like)
    for name, role in access.roles.items():
        pairs.extend((name, group, False) for group in role.member_of)
    pairs.extend((m, access.manager_role, True) for m in access.managers)
    pairs.extend((a, access.auditor_role, False) for a in access.auditors)
    for member, group, sudo in pairs:
        for who in (member, group):
            if who not in known:
                raise ConfigError(
                    f"access: role {who!r} does not exist",
                    hint="create it, or declare it under access.roles",
                )
        have = existing.get(member)
        options = sql.SQL("")
        if sudo and major >= 16:
            # Like sudo: managers must SET ROLE manager to change the schema on purpose.
            options = sql.SQL(" WITH INHERIT FALSE, SET TRUE")
        if have is not None and group in have.member_of:
            if (
                sudo
                and major >= 16
                and catalog.membership_options(conn, member, group) != (False, True)
            ):
                ops.append(
                    _op(
                        f"role {member}: manager membership without INHERIT, with SET",
                        sql.SQL("GRANT {} TO {}{}").format(_ident(group), _ident(member), options),
                    )
                )
            continue
        ops.append(
            _op(
                f"role {member}: member of {group}",
                sql.SQL("GRANT {} TO {}{}").format(_ident(group), _ident(member), options),
            )
        )
    return ops


def _database_operations(conn: Conn, config: Config) -> list[Operation]:
    access = config.access
    ops: list[Operation] = []
    grants = catalog.database_grants(conn)
    db = sql.SQL("DATABASE {}").format(sql.Identifier(conn.info.dbname))
    if access.hardening and grants.get("PUBLIC"):
        ops.append(
            _op(
                "database: revoke every privilege from PUBLIC (connect is granted explicitly)",
                sql.SQL("REVOKE ALL ON {} FROM PUBLIC").format(db),
            )
        )
    connectors = [access.manager_role, access.auditor_role, *access.managers, *access.auditors]
    connectors += [name for name, role in access.roles.items() if role.connect]
    for name in dict.fromkeys(connectors):
        if "CONNECT" not in grants.get(name, set()):
            ops.append(
                _op(
                    f"role {name}: CONNECT on the database",
                    sql.SQL("GRANT CONNECT ON {} TO {}").format(db, _ident(name)),
                )
            )
    return ops


def _schema_operations(conn: Conn, access: AccessConfig) -> list[Operation]:
    ops: list[Operation] = []
    if (
        access.hardening
        and catalog.schema_exists(conn, "public")
        and catalog.public_has_schema_create(conn, "public")
    ):
        ops.append(
            _op(
                "schema public: revoke CREATE from PUBLIC",
                sql.SQL("REVOKE CREATE ON SCHEMA public FROM PUBLIC"),
            )
        )
    for name, role in access.roles.items():
        for schema in role.schemas:
            if not catalog.schema_exists(conn, schema):
                raise ConfigError(f"access.roles.{name}.schemas: schema {schema!r} does not exist")
            if not catalog.has_schema_privilege(conn, name, schema, "USAGE"):
                ops.append(
                    _op(
                        f"role {name}: USAGE on schema {schema}",
                        sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
                            _ident(schema), _ident(name)
                        ),
                    )
                )
    return ops


def _ownership_operations(conn: Conn, access: AccessConfig) -> list[Operation]:
    manager = access.manager_role
    ops: list[Operation] = []
    for schema in access.managed_schemas:
        if not catalog.schema_exists(conn, schema):
            raise ConfigError(f"access.managed_schemas: schema {schema!r} does not exist")
    for obj in catalog.owned_objects(conn, list(access.managed_schemas)):
        if obj.owner == manager:
            continue
        if obj.kind in ("function", "procedure"):
            target: sql.Composable = sql.SQL("{} {}.{}").format(
                sql.SQL(obj.kind.upper()),
                _ident(obj.schema),
                sql.SQL(_function_signature(conn, obj)),
            )
        elif obj.kind == "schema":
            target = sql.SQL("SCHEMA {}").format(_ident(obj.name))
        else:
            target = sql.SQL("{} {}").format(
                sql.SQL(_KIND_SQL[obj.kind]), sql.Identifier(obj.schema, obj.name)
            )
        label = obj.name if obj.kind == "schema" else f"{obj.schema}.{obj.name}"
        ops.append(
            _op(
                f"{obj.kind} {label}: owner {obj.owner} → {manager}",
                sql.SQL("ALTER {} OWNER TO {}").format(target, _ident(manager)),
            )
        )
    return ops


def _function_signature(conn: Conn, obj: catalog.OwnedObject) -> str:
    # pg_get_function_identity_arguments output is valid SQL for the argument list; the name is
    # quoted here. The signature comes from the catalog, never from user input.
    name, _, args = obj.name.partition("(")
    return sql.Identifier(name).as_string(conn) + "(" + args


TableGrants = dict[tuple[str, str, str], set[str]]  # (role, schema, table) → privileges
DefaultGrants = dict[tuple[str, str], set[str]]  # (role, schema) → privileges on future tables


def _desired_table_grants(conn: Conn, config: Config) -> tuple[TableGrants, DefaultGrants]:
    access = config.access
    history_schema = config.history.schema_name
    tables = [(s, t) for s, t in catalog.tables_in(conn, []) if s != history_schema]
    grants: TableGrants = {}
    defaults: DefaultGrants = {}
    for name, role in access.roles.items():
        for text, wanted in role.tables.items():
            try:
                pattern = parse_pattern(text)
            except UserError as exc:
                raise ConfigError(f"access.roles.{name}.tables: {exc.message}") from None
            privileges = {p.value for p in wanted}
            matches = [(s, t) for s, t in tables if pattern.matches(TableName(s, t))]
            if not pattern.is_glob and not matches:
                raise ConfigError(
                    f"access.roles.{name}.tables: table {pattern.exact()} does not exist",
                    hint="create it first, or use a pattern (e.g. 'public.*') that also covers "
                    "tables created later",
                )
            for schema, table in matches:
                grants.setdefault((name, schema, table), set()).update(privileges)
            if pattern.table == "*" and not pattern.is_glob_schema():
                defaults.setdefault((name, pattern.schema), set()).update(privileges)
    return grants, defaults


def _privilege_list(privileges: set[str]) -> sql.Composed:
    return sql.SQL(", ").join(sql.SQL(p) for p in sorted(privileges))


def _table_operations(
    conn: Conn, config: Config, desired: TableGrants, desired_defaults: DefaultGrants
) -> list[Operation]:
    manager = config.access.manager_role
    ops: list[Operation] = []
    if not desired and not desired_defaults:
        return ops
    granted = catalog.table_privileges(conn, sorted({s for _, s, _ in desired}))
    defaults = catalog.default_privileges(conn, manager)
    for (name, schema, table), privileges in sorted(desired.items()):
        missing = privileges - granted.get((name, schema, table), set())
        if missing:
            ops.append(
                _op(
                    f"role {name}: {', '.join(sorted(missing))} on {schema}.{table}",
                    sql.SQL("GRANT {} ON TABLE {} TO {}").format(
                        _privilege_list(missing), sql.Identifier(schema, table), _ident(name)
                    ),
                )
            )
    for (name, schema), privileges in sorted(desired_defaults.items()):
        missing = privileges - defaults.get((name, schema), set())
        if missing:
            ops.append(
                _op(
                    f"role {name}: {', '.join(sorted(missing))} on tables the manager creates "
                    f"later in {schema}",
                    sql.SQL(
                        "ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA {} GRANT {} ON TABLES TO {}"
                    ).format(
                        _ident(manager), _ident(schema), _privilege_list(missing), _ident(name)
                    ),
                )
            )
    return ops


def _auditor_operations(conn: Conn, config: Config) -> list[Operation]:
    schema = HistorySchema(config.history.schema_name)
    will_exist = history_installed(conn, schema) or bool(config.history.tables)
    if not will_exist:
        return []
    auditor = config.access.auditor_role
    if history_installed(conn, schema) and catalog.has_schema_privilege(
        conn, auditor, schema.name, "USAGE"
    ):
        granted = catalog.table_privileges(conn, [schema.name])
        if all(
            "SELECT" in granted.get((auditor, schema.name, t), set())
            for t in catalog.relations_in(conn, schema.name)
        ):
            return []
    # Every table and view of history; a history table made later gets the SELECT grants of
    # the tx table (history/track.sql), so the auditor can read it without another apply.
    return [
        _op(
            f"role {auditor}: read-only access to history (schema {schema.name})",
            sql.SQL(
                "GRANT USAGE ON SCHEMA {s} TO {a}; GRANT SELECT ON ALL TABLES IN SCHEMA {s} TO {a}"
            ).format(s=schema.ident, a=_ident(auditor)),
        )
    ]


def _guard_operations(conn: Conn, config: Config, superuser: bool) -> list[Operation]:
    schema = HistorySchema(config.history.schema_name)
    access = config.access
    present = {
        str(r[0])
        for r in conn.execute(
            "SELECT evtname FROM pg_catalog.pg_event_trigger "
            "WHERE evtname IN ('pgwarden_guard_end', 'pgwarden_guard_drop') AND evtenabled = 'A'"
        ).fetchall()
    }
    if not access.ddl_guard:
        if not present:
            return []
        return [
            _op(
                "DDL guard: remove (access.ddl_guard is off)",
                sql.SQL(
                    "DROP EVENT TRIGGER IF EXISTS pgwarden_guard_end; "
                    "DROP EVENT TRIGGER IF EXISTS pgwarden_guard_drop"
                ),
            )
        ]
    if not superuser:
        raise ConfigError(
            "access.ddl_guard needs a superuser to install its event triggers",
            hint="run pgwarden apply as a superuser, or set ddl_guard: false",
        )
    ops: list[Operation] = []
    installed = history_installed(conn, schema)
    if not has_meta(conn, schema) and not config.history.tables:
        # The guard lives beside history (the history planner installs it when tables are
        # tracked, or when an older release's history is there to upgrade).
        ops += install_operations(conn, schema, config.history.trigger.value)
    meta = history_meta(conn, schema)
    version = sql_version("guard.sql")
    if meta.get("guard_version") != version or len(present) < 2:
        ops.append(
            _op(
                "DDL guard: install (rejects DDL on managed schemas from non-managers)",
                sql.Composed(
                    [
                        compose("guard.sql", **schema.placeholders()),
                        set_meta(schema, "guard_version", version),
                    ]
                ),
                display=f"-- pgwarden/sql/guard.sql, version {version}",
            )
        )
    if meta.get("manager_role") != access.manager_role:
        ops.append(
            _op(
                f"DDL guard: schema changes need the {access.manager_role} role",
                set_meta(schema, "manager_role", access.manager_role),
            )
        )
    guarded: set[str] = set()
    if installed and conn.execute(
        "SELECT pg_catalog.to_regclass(%s) IS NOT NULL", (f"{schema.name}.guarded_schema",)
    ).fetchone() == (True,):
        guarded = {
            str(r[0])
            for r in conn.execute(
                sql.SQL("SELECT schema_name FROM {}").format(schema.table("guarded_schema"))
            ).fetchall()
        }
    wanted = set(access.managed_schemas)
    if guarded != wanted:
        ops.append(
            _op(
                f"DDL guard: guard schemas {', '.join(sorted(wanted)) or '(none)'}",
                sql.SQL(
                    "DELETE FROM {t}; INSERT INTO {t} (schema_name) SELECT unnest({s}::text[])"
                ).format(t=schema.table("guarded_schema"), s=sql.Literal(sorted(wanted))),
            )
        )
    return ops


def _desired_memberships(access: AccessConfig) -> set[tuple[str, str]]:
    pairs = {(name, group) for name, role in access.roles.items() for group in role.member_of}
    pairs |= {(m, access.manager_role) for m in access.managers}
    pairs |= {(a, access.auditor_role) for a in access.auditors}
    return pairs


def _authoritative_operations(
    conn: Conn,
    config: Config,
    existing: dict[str, catalog.Role],
    desired: TableGrants,
    desired_defaults: DefaultGrants,
) -> list[Operation]:
    """Revoke and drop, inside pgwarden's scope only, what the config does not list.

    The scope is the roles carrying pgwarden's mark (every role it created or was told to
    manage), the manager and the auditor. Superusers and pg_* roles are never in it.
    """
    access = config.access
    manager = access.manager_role
    special = {manager, access.auditor_role}
    declared = set(access.roles) | special
    scope = {
        r.name
        for r in existing.values()
        if (r.managed or r.name in special) and not r.superuser and not r.name.startswith("pg_")
    }
    ops: list[Operation] = []
    # Roles no longer declared: hand what they own to the manager first, then drop them.
    for name in sorted(scope - declared):
        ops.append(
            _op(
                f"role {name}: not in the config: reassign what it owns to {manager}, drop it",
                sql.SQL("REASSIGN OWNED BY {r} TO {m}; DROP OWNED BY {r}; DROP ROLE {r}").format(
                    r=_ident(name), m=_ident(manager)
                ),
            )
        )
    kept = scope & declared
    # Memberships in groups pgwarden manages, or of roles it manages, that are not listed.
    wanted = _desired_memberships(access)
    for role in sorted(existing.values(), key=lambda r: r.name):
        if role.superuser or role.name.startswith("pg_") or role.name in scope - declared:
            continue
        for group in sorted(role.member_of):
            in_scope = group in kept or (role.name in kept and group in scope)
            if in_scope and (role.name, group) not in wanted:
                ops.append(
                    _op(
                        f"role {role.name}: no longer a member of {group}",
                        sql.SQL("REVOKE {} FROM {}").format(_ident(group), _ident(role.name)),
                    )
                )
    db = sql.SQL("DATABASE {}").format(sql.Identifier(conn.info.dbname))
    grants = catalog.database_grants(conn)
    connectors = special | set(access.managers) | set(access.auditors)
    connectors |= {n for n, r in access.roles.items() if r.connect}
    for name in sorted(kept - connectors):
        if "CONNECT" in grants.get(name, set()):
            ops.append(
                _op(
                    f"role {name}: no CONNECT (connect: false)",
                    sql.SQL("REVOKE CONNECT ON {} FROM {}").format(db, _ident(name)),
                )
            )
    usage = catalog.schema_usage(conn)
    history_schema = config.history.schema_name
    for name in sorted(kept):
        allowed = set(access.roles[name].schemas) if name in access.roles else set()
        if name == access.auditor_role:
            allowed.add(history_schema)
        for schema in sorted(usage.get(name, set()) - allowed):
            ops.append(
                _op(
                    f"role {name}: no USAGE on schema {schema}",
                    sql.SQL("REVOKE USAGE ON SCHEMA {} FROM {}").format(
                        _ident(schema), _ident(name)
                    ),
                )
            )
    granted = catalog.table_privileges(
        conn, sorted(set(access.managed_schemas) | {s for _, s, _ in desired})
    )
    for (grantee, schema, table), privileges in sorted(granted.items()):
        if grantee not in kept or grantee == manager or schema == history_schema:
            continue
        extra = privileges - desired.get((grantee, schema, table), set())
        if extra:
            ops.append(
                _op(
                    f"role {grantee}: no {', '.join(sorted(extra))} on {schema}.{table}",
                    sql.SQL("REVOKE {} ON TABLE {} FROM {}").format(
                        _privilege_list(extra), sql.Identifier(schema, table), _ident(grantee)
                    ),
                )
            )
    for (grantee, schema), privileges in sorted(catalog.default_privileges(conn, manager).items()):
        if grantee not in kept:
            continue
        extra = privileges - desired_defaults.get((grantee, schema), set())
        if extra:
            ops.append(
                _op(
                    f"role {grantee}: no {', '.join(sorted(extra))} on future tables in {schema}",
                    sql.SQL(
                        "ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA {} "
                        "REVOKE {} ON TABLES FROM {}"
                    ).format(
                        _ident(manager), _ident(schema), _privilege_list(extra), _ident(grantee)
                    ),
                )
            )
    return ops


def plan_access(conn: Conn, config: Config) -> Sequence[Operation]:
    access = config.access
    _check_special_roles(access)
    existing = catalog.roles(conn)
    superuser = bool(existing.get(conn.info.user) and existing[conn.info.user].superuser)
    major = catalog.server_major(conn)
    ops: list[Operation] = []
    ops += _role_operations(conn, access, existing, superuser)
    ops += _membership_operations(conn, access, existing, major)
    ops += _database_operations(conn, config)
    ops += _schema_operations(conn, access)
    ops += _ownership_operations(conn, access)
    desired, desired_defaults = _desired_table_grants(conn, config)
    ops += _table_operations(conn, config, desired, desired_defaults)
    ops += _guard_operations(conn, config, superuser)
    # After the guard, whose table lives in the history schema too.
    ops += _auditor_operations(conn, config)
    if access.mode == "authoritative":
        ops += _authoritative_operations(conn, config, existing, desired, desired_defaults)
    return ops
