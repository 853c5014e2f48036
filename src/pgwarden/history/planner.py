"""history: desired (pgwarden.yaml) versus observed (catalog) → operations."""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

from pgwarden.config import Config, HistoryConfig
from pgwarden.errors import ConfigError
from pgwarden.history import catalog, native, wal
from pgwarden.history.catalog import Conn, HistorySchema, TrackedTable
from pgwarden.history.names import TableName, TablePattern, parse_pattern, parse_table
from pgwarden.history.upgrade import DOMAIN, ddl_operations, schema_operations, set_meta
from pgwarden.plan import Operation


@dataclass(frozen=True)
class TableSettings:
    mode: str
    exclude_columns: tuple[str, ...]
    truncate_mode: str
    capture: str = "trigger"


def settings_by_table(history: HistoryConfig) -> dict[TableName, TableSettings]:
    """Per-table settings named in the config (exclude_columns and overrides)."""
    names: set[TableName] = set()
    excluded: dict[TableName, list[str]] = {}
    for key, columns in history.exclude_columns.items():
        name = _config_table(key, "history.exclude_columns")
        names.add(name)
        excluded.setdefault(name, []).extend(columns)
    overrides = {}
    for key, override in history.overrides.items():
        name = _config_table(key, "history.overrides")
        names.add(name)
        overrides[name] = override
        excluded.setdefault(name, []).extend(override.exclude_columns)
    result = {}
    for name in names:
        found = overrides.get(name)
        result[name] = TableSettings(
            mode=str((found.mode if found and found.mode else history.mode).value),
            exclude_columns=tuple(sorted(set(excluded.get(name, [])))),
            truncate_mode=found.truncate if found else "rows",
            capture=str((found.capture if found and found.capture else history.capture).value),
        )
    return result


def _config_table(key: str, where: str) -> TableName:
    try:
        return parse_table(key)
    except Exception as exc:
        raise ConfigError(f"{where}: {key!r}: {exc}") from None


def patterns(history: HistoryConfig) -> list[TablePattern]:
    result = []
    for text in history.tables:
        try:
            result.append(parse_pattern(text))
        except Exception as exc:
            raise ConfigError(f"history.tables: {exc}") from None
    return result


def desired_settings(history: HistoryConfig, name: TableName) -> TableSettings:
    return settings_by_table(history).get(
        name, TableSettings(str(history.mode.value), (), "rows", str(history.capture.value))
    )


def install_operations(conn: Conn, schema: HistorySchema, engine: str) -> list[Operation]:
    """History's schema, functions, capture engine and event triggers, for this release."""
    return [
        *schema_operations(conn, schema),
        *native.engine_operations(conn, schema, engine),
        *ddl_operations(conn, schema),
    ]


def regclass(name: TableName) -> sql.Composed:
    return sql.SQL("{}::regclass").format(
        sql.Literal(
            # A regclass literal is the quoted, qualified name as text.
            '"' + name.schema.replace('"', '""') + '"."' + name.table.replace('"', '""') + '"'
        )
    )


def track_operation(
    schema: HistorySchema,
    name: TableName,
    settings: TableSettings,
    source: str,
    description: str,
) -> Operation:
    return Operation(
        DOMAIN,
        description,
        sql.SQL("SELECT {}({}, {}, {}::text[], {}, {}, {})").format(
            schema.func("track"),
            regclass(name),
            sql.Literal(settings.mode),
            sql.Literal(list(settings.exclude_columns)),
            sql.Literal(settings.truncate_mode),
            sql.Literal(source),
            sql.Literal(settings.capture),
        ),
    )


def untrack_operation(schema: HistorySchema, name: TableName, why: str) -> Operation:
    return Operation(
        DOMAIN,
        f"stop tracking {name} ({why}); its history is kept",
        sql.SQL("SELECT {}({})").format(schema.func("untrack"), regclass(name)),
    )


def _rule_operations(conn: Conn, schema: HistorySchema, history: HistoryConfig) -> list[Operation]:
    desired = {
        # Exact names too: a table dropped and made again under its name is tracked again
        # at its CREATE TABLE, not at the next apply (its changes meanwhile would be lost).
        p.text: (p.schema_regex(), p.table_regex(), str(history.mode.value), "rows")
        for p in patterns(history)
    }
    current: dict[str, tuple[str, str, str, str]] = {}
    if catalog.is_installed(conn, schema):
        rows = conn.execute(
            sql.SQL(
                "SELECT pattern, schema_regex, table_regex, mode, truncate_mode FROM {}"
            ).format(schema.table("rule"))
        ).fetchall()
        current = {str(r[0]): (str(r[1]), str(r[2]), str(r[3]), str(r[4])) for r in rows}
    ops = []
    for pattern, values in sorted(desired.items()):
        if current.get(pattern) != values:
            ops.append(
                Operation(
                    DOMAIN,
                    f"track tables created later that match {pattern!r}",
                    sql.SQL(
                        "INSERT INTO {} (pattern, schema_regex, table_regex, mode, truncate_mode) "
                        "VALUES ({}, {}, {}, {}, {}) ON CONFLICT (pattern) DO UPDATE SET "
                        "schema_regex = EXCLUDED.schema_regex, table_regex = EXCLUDED.table_regex,"
                        " mode = EXCLUDED.mode, truncate_mode = EXCLUDED.truncate_mode"
                    ).format(schema.table("rule"), *(sql.Literal(v) for v in (pattern, *values))),
                )
            )
    for pattern in sorted(set(current) - set(desired)):
        ops.append(
            Operation(
                DOMAIN,
                f"stop auto-tracking new tables that match {pattern!r}",
                sql.SQL("DELETE FROM {} WHERE pattern = {}").format(
                    schema.table("rule"), sql.Literal(pattern)
                ),
            )
        )
    return ops


def _table_setting_operations(
    conn: Conn, schema: HistorySchema, history: HistoryConfig
) -> list[Operation]:
    desired = settings_by_table(history)
    current: dict[TableName, TableSettings] = {}
    if catalog.is_installed(conn, schema):
        rows = conn.execute(
            sql.SQL(
                "SELECT schema_name, table_name, mode, exclude_columns, truncate_mode, "
                "pg_catalog.to_jsonb(s) ->> 'capture' FROM {} s"
            ).format(schema.table("table_setting"))
        ).fetchall()
        current = {
            TableName(str(r[0]), str(r[1])): TableSettings(
                str(r[2]),
                tuple(r[3]),  # type: ignore[arg-type]
                str(r[4]),
                str(r[5] or "trigger"),
            )
            for r in rows
        }
    ops = []
    for name, settings in sorted(desired.items()):
        if current.get(name) != settings:
            ops.append(
                Operation(
                    DOMAIN,
                    f"remember history settings for {name} (applied when it is created)",
                    sql.SQL(
                        "INSERT INTO {} (schema_name, table_name, mode, exclude_columns, "
                        "truncate_mode, capture) VALUES ({}, {}, {}, {}::text[], {}, {}) "
                        "ON CONFLICT (schema_name, table_name) DO UPDATE SET mode = EXCLUDED.mode,"
                        " exclude_columns = EXCLUDED.exclude_columns,"
                        " truncate_mode = EXCLUDED.truncate_mode, capture = EXCLUDED.capture"
                    ).format(
                        schema.table("table_setting"),
                        sql.Literal(name.schema),
                        sql.Literal(name.table),
                        sql.Literal(settings.mode),
                        sql.Literal(list(settings.exclude_columns)),
                        sql.Literal(settings.truncate_mode),
                        sql.Literal(settings.capture),
                    ),
                )
            )
    for name in sorted(set(current) - set(desired)):
        ops.append(
            Operation(
                DOMAIN,
                f"forget history settings for {name}",
                sql.SQL("DELETE FROM {} WHERE schema_name = {} AND table_name = {}").format(
                    schema.table("table_setting"), sql.Literal(name.schema), sql.Literal(name.table)
                ),
            )
        )
    return ops


def _legacy_operations(conn: Conn) -> list[Operation]:
    """pgwarden 0.1's deferred capture was switched on with the database setting
    pgwarden.defer_rows; nothing reads it now."""
    if catalog.database_setting(conn, "pgwarden.defer_rows") is None:
        return []
    return [
        Operation(
            DOMAIN,
            "reset pgwarden.defer_rows, which pgwarden no longer uses",
            sql.SQL("ALTER DATABASE {} RESET pgwarden.defer_rows").format(
                sql.Identifier(str(conn.info.dbname))
            ),
        )
    ]


def _meta_operations(conn: Conn, schema: HistorySchema, history: HistoryConfig) -> list[Operation]:
    wanted = "on" if history.record_statement else "off"
    if catalog.meta(conn, schema).get("record_statement", "off") == wanted:
        return []
    return [
        Operation(
            DOMAIN,
            f"turn statement text recording {wanted}",
            set_meta(schema, "record_statement", wanted),
        )
    ]


def _capture_operations(
    conn: Conn, schema: HistorySchema, history: HistoryConfig, tracked: list[TrackedTable]
) -> list[Operation]:
    """What new tables get (history.capture), and what WAL capture needs: a logical slot on
    pgoutput (made before the transaction that tracks tables, so that it holds every change
    they make from then on) and its names in meta. Once no table is captured from the WAL
    (observed: `apply` plans again after switching the last one back, having taken in what
    the slot still held), the slot goes: left behind it would keep WAL forever."""
    current = catalog.meta(conn, schema)
    ops = []
    default = str(history.capture.value)
    if current.get("capture", "trigger") != default:
        ops.append(
            Operation(
                DOMAIN,
                f"capture tables tracked from now on with {default}",
                set_meta(schema, "capture", default),
            )
        )
    slot = wal_slot_name(conn, schema)
    exists = catalog.slot_exists(conn, slot)
    if history.uses_wal:
        level = catalog.setting(conn, "wal_level")
        if level != "logical":
            raise ConfigError(
                f"history.capture: wal needs wal_level = logical, and this server runs with "
                f"wal_level = {level}",
                hint="pgwarden's own server: `pgwarden down && pgwarden up` (up sets it from "
                "history.capture); another server: ALTER SYSTEM SET wal_level = logical, "
                "then restart it",
            )
        encoding = catalog.setting(conn, "server_encoding")
        if encoding != "UTF8":
            # The consumer copies pgoutput's text into history as it comes, which is in the
            # database's encoding; it reads it as UTF-8 (COPY, names, messages).
            raise ConfigError(
                f"history.capture: wal needs a UTF8 database, and this one is {encoding}",
                hint="capture this database with triggers (history.capture: trigger), or move "
                "its data to a UTF8 database",
            )
        publication = f"{schema.name}_capture"
        if not catalog.publication_exists(conn, publication):
            # Before the slot: pgoutput looks publications up as of each change it decodes,
            # and PostgreSQL 15 fails on changes from before the publication existed.
            ops.append(
                Operation(
                    DOMAIN,
                    f"create the publication {publication} that lists the tables captured from "
                    "the WAL",
                    sql.SQL("CREATE PUBLICATION {} WITH ({})").format(
                        sql.Identifier(publication),
                        sql.SQL(
                            "publish = 'insert, update, delete, truncate', "
                            "publish_via_partition_root = true"
                            # 18 can send stored generated columns (15-17: such tables refused)
                            + (", publish_generated_columns = stored"
                               if catalog.server_version(conn) >= 180000 else "")
                        ),
                    ),
                    transactional=False,
                )
            )  # fmt: skip
        if not exists:
            ops.append(
                Operation(
                    DOMAIN,
                    f"create the logical replication slot {slot} (pgoutput) that WAL capture "
                    "reads from",
                    sql.SQL("SELECT {}").format(
                        wal.create_slot_sql(_slot_name_sql(schema), catalog.server_version(conn))
                    ),
                    transactional=False,
                )
            )
        if (current.get("wal_slot"), current.get("wal_publication")) != (slot, publication):
            ops.append(
                Operation(
                    DOMAIN,
                    f"read WAL capture from slot {slot}, publication {publication}",
                    sql.SQL(
                        "INSERT INTO {meta} (key, value) VALUES ('wal_slot', {slot}), "
                        "('wal_publication', {publication}) "
                        "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
                    ).format(
                        meta=schema.table("meta"),
                        slot=_slot_name_sql(schema),
                        publication=sql.Literal(publication),
                    ),
                )
            )
        if catalog.server_version(conn) >= 160000 and not _owner_may_log_snapshots(conn, schema):
            # The consumer logs running-transactions records (history/wal.py, follow); a
            # consumer that is not a superuser does it through the history owner.
            ops.append(
                Operation(
                    DOMAIN,
                    f"let {schema.owner} log running-transactions records "
                    "(pg_log_standby_snapshot), so that the slot's restart point follows",
                    sql.SQL(
                        "GRANT EXECUTE ON FUNCTION pg_catalog.pg_log_standby_snapshot() TO {}"
                    ).format(sql.Identifier(schema.owner)),
                )
            )
        alarm = str(history.wal_lag_alarm_bytes)
        if current.get("wal_lag_alarm") != alarm:
            # In the database, so that `verify` from anywhere warns at the configured size.
            ops.append(
                Operation(
                    DOMAIN,
                    f"warn when the slot holds more than {history.wal_lag_alarm} of WAL",
                    set_meta(schema, "wal_lag_alarm", alarm),
                )
            )
    elif exists and not any(t.capture == "wal" for t in tracked):
        ops.append(
            Operation(
                DOMAIN,
                f"drop the logical replication slot {slot}: no table is captured from the WAL",
                sql.SQL(
                    "SELECT pg_catalog.pg_drop_replication_slot(slot_name) "
                    "FROM pg_catalog.pg_replication_slots WHERE slot_name = {}"
                ).format(sql.Literal(slot)),
                transactional=False,
                after_commit=True,
            )
        )
    return ops


def _owner_may_log_snapshots(conn: Conn, schema: HistorySchema) -> bool:
    row = conn.execute(
        "SELECT r.oid IS NOT NULL AND pg_catalog.has_function_privilege(r.oid, "
        "'pg_catalog.pg_log_standby_snapshot()', 'EXECUTE') "
        "FROM (SELECT 1) AS one LEFT JOIN pg_catalog.pg_roles r ON r.rolname = %s",
        (schema.owner,),
    ).fetchone()
    return bool(row and row[0])


def _slot_name_sql(schema: HistorySchema) -> sql.Composable:
    """One slot per database and history schema (slot names are cluster-wide): the schema's
    name and the database's oid. Computed where the SQL runs, not where it was planned: the
    Kubernetes bootstrap is planned on a throwaway server, whose database has another oid."""
    return sql.SQL(
        "{} || '_' || (SELECT d.oid FROM pg_catalog.pg_database d "
        "WHERE d.datname = pg_catalog.current_database())::text"
    ).format(sql.Literal(schema.name))


def wal_slot_name(conn: Conn, schema: HistorySchema) -> str:
    row = conn.execute(sql.SQL("SELECT {}").format(_slot_name_sql(schema))).fetchone()
    assert row is not None
    return str(row[0])


@dataclass(frozen=True)
class HistoryPlan:
    operations: list[Operation]
    warnings: list[str]


def plan_history(conn: Conn, config: Config) -> HistoryPlan:
    history = config.history
    schema = HistorySchema(history.schema_name)
    if not history.tables and not catalog.has_meta(conn, schema):
        return HistoryPlan([], [])  # nothing asked, nothing installed: stay out of the way
    warnings = []
    if history.defer_rows is not None:
        warnings.append(
            "history.defer_rows is no longer used (bulk statements are captured cheaply "
            "without it): remove it from pgwarden.yaml"
        )
    ops = install_operations(conn, schema, history.trigger.value)
    meta_ops = _meta_operations(conn, schema, history)
    ops.extend(meta_ops)
    ops.extend(_capture_operations(conn, schema, history, catalog.tracked_tables(conn, schema)))
    ops.extend(_legacy_operations(conn))
    ops.extend(_rule_operations(conn, schema, history))
    ops.extend(_table_setting_operations(conn, schema, history))

    live = catalog.live_tables(conn, schema)
    tracked = {t.oid: t for t in catalog.tracked_tables(conn, schema)}
    pats = patterns(history)
    wanted: dict[int, TableName] = {}
    for pattern in pats:
        if pattern.is_glob:
            continue
        name = pattern.exact()
        if not any(t.name == name for t in live):
            raise ConfigError(
                f"history.tables: table {name} does not exist",
                hint="create it first, or use a pattern (e.g. 'public.*') to track it "
                "when it is created",
            )
    for table in live:
        if any(p.matches(table.name) and not (p.is_glob and table.as_of_copy) for p in pats):
            wanted[table.oid] = table.name
    for oid, name in wanted.items():
        settings = desired_settings(history, name)
        have: TrackedTable | None = tracked.get(oid)
        if have is None:
            ops.append(
                track_operation(
                    schema, name, settings, "config", f"start tracking {name} ({settings.mode})"
                )
            )
        elif (
            meta_ops
            or (
                have.mode,
                tuple(sorted(have.exclude_columns)),
                have.truncate_mode,
                have.capture,
            )
            != (
                settings.mode,
                settings.exclude_columns,
                settings.truncate_mode,
                settings.capture,
            )
            or not have.triggers_ok
        ):
            why = "repair its triggers" if not have.triggers_ok else "update its settings"
            ops.append(track_operation(schema, name, settings, have.source, f"{why} on {name}"))
    for oid, have in tracked.items():
        if oid not in wanted and have.source != "manual":
            ops.append(untrack_operation(schema, have.name, "no longer in history.tables"))
    return HistoryPlan(ops, warnings)
