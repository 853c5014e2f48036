"""What the database holds now: tables, what is tracked, the installed history objects."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from pgwarden.history.names import TableName

Conn = psycopg.Connection[tuple[object, ...]]


@dataclass(frozen=True)
class HistorySchema:
    """Names of the history objects. The schema name is validated to a plain identifier."""

    name: str = "pgwarden"

    @property
    def owner(self) -> str:
        return f"{self.name}_owner"

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.name)

    def table(self, name: str) -> sql.Identifier:
        return sql.Identifier(self.name, name)

    def func(self, name: str) -> sql.Identifier:
        return sql.Identifier(self.name, name)

    def placeholders(self) -> dict[str, sql.Composable]:
        return {
            "schema": self.ident,
            "owner": sql.Identifier(self.owner),
            "schema_name": sql.Literal(self.name),
            "owner_name": sql.Literal(self.owner),
        }


DEFAULT_SCHEMA = HistorySchema()


# `as-of --into` marks the tables it makes with this comment: scratch copies, which patterns
# in history.tables do not track (naming one exactly does).
AS_OF_COPY = "pgwarden: as-of copy"


@dataclass(frozen=True)
class LiveTable:
    oid: int
    name: TableName
    has_key: bool  # a primary key or replica identity index; without one, rows are told apart
    # by their whole content
    as_of_copy: bool = False


@dataclass(frozen=True)
class TrackedTable:
    oid: int
    name: TableName
    mode: str
    exclude_columns: tuple[str, ...]
    truncate_mode: str
    source: str
    triggers_ok: bool  # all four capture triggers present, ENABLE ALWAYS, arguments current
    # (WAL capture: in the publication, REPLICA IDENTITY FULL, no capture trigger)
    capture: str = "trigger"  # or "wal"


CAPTURE_TRIGGERS = (
    "pgwarden_capture_insert",
    "pgwarden_capture_update",
    "pgwarden_capture_delete",
    "pgwarden_capture_truncate",
)


def is_installed(conn: Conn, schema: HistorySchema) -> bool:
    """History of this release's layout is there (not only an older release's, which `apply`
    upgrades)."""
    row = conn.execute(
        "SELECT pg_catalog.to_regclass(pg_catalog.quote_ident(%s) || '.logged_table') IS NOT NULL",
        (schema.name,),
    ).fetchone()
    return bool(row and row[0])


def has_meta(conn: Conn, schema: HistorySchema) -> bool:
    row = conn.execute(
        "SELECT pg_catalog.to_regclass(pg_catalog.quote_ident(%s) || '.meta') IS NOT NULL",
        (schema.name,),
    ).fetchone()
    return bool(row and row[0])


def meta(conn: Conn, schema: HistorySchema) -> dict[str, str]:
    if not has_meta(conn, schema):
        return {}
    rows = conn.execute(sql.SQL("SELECT key, value FROM {}").format(schema.table("meta")))
    return {str(k): str(v) for k, v in rows.fetchall()}


def live_tables(conn: Conn, schema: HistorySchema) -> list[LiveTable]:
    rows = conn.execute(
        """
        SELECT c.oid, n.nspname, c.relname,
               EXISTS (SELECT 1 FROM pg_catalog.pg_index i
                       WHERE i.indrelid = c.oid AND (i.indisprimary OR i.indisreplident)),
               pg_catalog.starts_with(COALESCE(pg_catalog.obj_description(c.oid, 'pg_class'), ''),
                                      %s)
        FROM pg_catalog.pg_class c
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
          AND n.nspname NOT IN ('pg_catalog', 'information_schema', %s)
          AND n.nspname !~ '^pg_(toast|temp_)'
        ORDER BY n.nspname, c.relname
        """,
        (AS_OF_COPY, schema.name),
    ).fetchall()
    return [
        LiveTable(int(str(oid)), TableName(str(nsp), str(rel)), bool(has_key), bool(copy))
        for oid, nsp, rel, has_key, copy in rows
    ]


def tracked_tables(conn: Conn, schema: HistorySchema) -> list[TrackedTable]:
    if not is_installed(conn, schema):
        return []
    query = sql.SQL(
        """
        SELECT t.table_oid, t.schema_name, t.table_name, t.mode, t.exclude_columns,
               t.truncate_mode, t.source,
               {state}(t.table_oid) = 'ok' AS triggers_ok,
               -- (a history from before migration 0003 has no capture column yet)
               COALESCE(pg_catalog.to_jsonb(t) ->> 'capture', 'trigger') AS capture
        FROM {} t ORDER BY t.schema_name, t.table_name
        """
    ).format(schema.table("tracked"), state=schema.func("trigger_state"))
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(query).fetchall()
    return [
        TrackedTable(
            oid=int(r["table_oid"]),
            name=TableName(r["schema_name"], r["table_name"]),
            mode=r["mode"],
            exclude_columns=tuple(r["exclude_columns"]),
            truncate_mode=r["truncate_mode"],
            source=r["source"],
            triggers_ok=bool(r["triggers_ok"]),
            capture=str(r["capture"]),
        )
        for r in rows
    ]


def database_setting(conn: Conn, name: str) -> str | None:
    """The value set with ALTER DATABASE (current database, all roles) for `name`, if any."""
    row = conn.execute(
        "SELECT substr(c, length(%s) + 2) FROM pg_catalog.pg_db_role_setting s,"
        " pg_catalog.unnest(s.setconfig) AS c"
        " WHERE s.setrole = 0 AND s.setdatabase ="
        " (SELECT d.oid FROM pg_catalog.pg_database d WHERE d.datname = current_database())"
        " AND pg_catalog.starts_with(c, %s || '=')",
        (name, name),
    ).fetchone()
    return str(row[0]) if row else None


def setting(conn: Conn, name: str) -> str:
    row = conn.execute("SELECT pg_catalog.current_setting(%s)", (name,)).fetchone()
    assert row is not None
    return str(row[0])


def server_version(conn: Conn) -> int:
    return int(setting(conn, "server_version_num"))


def publication_exists(conn: Conn, name: str) -> bool:
    return (
        conn.execute(
            "SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = %s", (name,)
        ).fetchone()
        is not None
    )


def slot_exists(conn: Conn, name: str) -> bool:
    return (
        conn.execute(
            "SELECT 1 FROM pg_catalog.pg_replication_slots WHERE slot_name = %s", (name,)
        ).fetchone()
        is not None
    )


def is_superuser(conn: Conn) -> bool:
    row = conn.execute(
        "SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user"
    ).fetchone()
    return bool(row and row[0])


def role_exists(conn: Conn, name: str) -> bool:
    return (
        conn.execute("SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = %s", (name,)).fetchone()
        is not None
    )


def event_triggers_ok(conn: Conn) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM pg_catalog.pg_event_trigger "
        "WHERE evtname IN ('pgwarden_ddl_end', 'pgwarden_sql_drop') AND evtenabled = 'A'"
    ).fetchone()
    return bool(row and row[0] == 2)


def table_oid(conn: Conn, name: TableName) -> int | None:
    row = conn.execute(
        "SELECT c.oid FROM pg_catalog.pg_class c "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
        (name.schema, name.table),
    ).fetchone()
    return int(row[0]) if row else None  # type: ignore[call-overload]


def key_columns(conn: Conn, oid: int) -> list[str]:
    rows = conn.execute(
        """
        SELECT a.attname
        FROM (SELECT i.indrelid, i.indkey FROM pg_catalog.pg_index i
              WHERE i.indrelid = %s AND (i.indisprimary OR i.indisreplident)
              ORDER BY i.indisprimary DESC LIMIT 1) idx
        CROSS JOIN LATERAL pg_catalog.unnest(idx.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
        JOIN pg_catalog.pg_attribute a ON a.attrelid = idx.indrelid AND a.attnum = k.attnum
        ORDER BY k.ord
        """,
        (oid,),
    ).fetchall()
    return [str(r[0]) for r in rows]
