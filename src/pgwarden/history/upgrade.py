"""Installing and upgrading the history schema: its migrations and its functions.

What persists (tables, indexes) changes only through the numbered migrations in
sql/history/migrations/, each applied once and recorded as meta.schema_version; an install
from an older release is upgraded in place, keeping its history. Functions are re-created when
the shipped files change (meta.functions_version), then every tracked table's generated capture
function and triggers are brought up to date. The capture engine is native.py's.
"""

from __future__ import annotations

from psycopg import sql

from pgwarden.history import catalog
from pgwarden.history.catalog import Conn, HistorySchema
from pgwarden.plan import Operation
from pgwarden.sqlfiles import compose, migrations, sql_version

DOMAIN = "history"
FUNCTION_FILES = (
    "history/common.sql",
    "history/capture.sql",
    "history/track.sql",
    "history/wal.sql",
    "history/read.sql",
    "history/grants.sql",
)


def set_meta(schema: HistorySchema, key: str, value: str) -> sql.Composed:
    return sql.SQL(
        "\nINSERT INTO {} (key, value) VALUES ({}, {}) "
        "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value;\n"
    ).format(schema.table("meta"), sql.Literal(key), sql.Literal(value))


def refresh_tracked(schema: HistorySchema) -> sql.Composed:
    """Every tracked table's capture function, triggers and column map brought up to date."""
    return sql.SQL(
        "\nSELECT {refresh}(t.table_oid) FROM {tracked} t ORDER BY t.table_oid;\n"
        "SELECT {part}(l.id) FROM {tables} l;\n"
    ).format(
        refresh=schema.func("refresh"),
        tracked=schema.table("tracked"),
        part=schema.func("set_view_part"),
        tables=schema.table("logged_table"),
    )


def schema_operations(conn: Conn, schema: HistorySchema) -> list[Operation]:
    """The history owner role, and the schema brought to this release."""
    ops: list[Operation] = []
    if not catalog.role_exists(conn, schema.owner):
        ops.append(
            Operation(
                DOMAIN,
                f"create the NOLOGIN role {schema.owner} that owns history",
                sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(schema.owner)),
            )
        )
    names = schema.placeholders()
    current = catalog.meta(conn, schema)
    # An install of 0.1 (which had no migrations) has no schema_version: migration 0001 is
    # written to bring any 0.1 install to that release's final shape.
    have = int(current.get("schema_version", "0"))
    pending = [m for m in migrations() if m.number > have]
    functions = sql_version(*FUNCTION_FILES)
    if not pending and current.get("functions_version") == functions:
        return ops
    parts: list[sql.Composable] = [compose("history/base.sql", **names)]
    # Functions first, so that migrations can use them; their bodies may name tables that a
    # migration below creates.
    parts.append(sql.SQL("SET LOCAL check_function_bodies = off;\n"))
    parts.extend(compose(name, **names) for name in FUNCTION_FILES)
    parts.append(sql.SQL("SET LOCAL check_function_bodies = on;\n"))
    for migration in pending:
        parts.append(compose(migration.path, **names))
        parts.append(set_meta(schema, "schema_version", str(migration.number)))
    parts.append(set_meta(schema, "functions_version", functions))
    parts.append(refresh_tracked(schema))
    verb = "install" if not current else "upgrade"
    steps = ["functions", *(f"migration {m.name}" for m in pending)]
    ops.append(
        Operation(
            DOMAIN,
            f"{verb} the history schema {schema.name} ({', '.join(steps)})",
            sql.Composed(parts),
            display=f"-- pgwarden/sql/history/: {', '.join(steps)}; functions version {functions}",
        )
    )
    return ops


def ddl_operations(conn: Conn, schema: HistorySchema) -> list[Operation]:
    """The event triggers (a superuser only): DDL log, auto-tracking, history tables that
    follow schema changes."""
    if not catalog.is_superuser(conn):
        return []
    current = catalog.meta(conn, schema)
    ddl_version = sql_version("history/ddl.sql")
    if current.get("ddl_version") == ddl_version and catalog.event_triggers_ok(conn):
        return []
    return [
        Operation(
            DOMAIN,
            "install the DDL log, auto-tracking and schema-following event triggers",
            sql.Composed(
                [
                    compose("history/ddl.sql", **schema.placeholders()),
                    set_meta(schema, "ddl_version", ddl_version),
                ]
            ),
            display=f"-- pgwarden/sql/history/ddl.sql, version {ddl_version}",
        )
    ]
