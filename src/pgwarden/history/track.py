"""`pgwarden track` / `untrack`: imperative tracking, outside the config's patterns."""

from __future__ import annotations

from collections.abc import Sequence

from pgwarden.config import Config
from pgwarden.errors import UserError
from pgwarden.history import catalog
from pgwarden.history.catalog import Conn, HistorySchema
from pgwarden.history.names import TableName
from pgwarden.history.planner import (
    TableSettings,
    desired_settings,
    install_operations,
    track_operation,
    untrack_operation,
)
from pgwarden.plan import Operation, apply_plan


def _existing(conn: Conn, schema: HistorySchema, names: Sequence[TableName]) -> None:
    live = {t.name: t for t in catalog.live_tables(conn, schema)}
    for name in names:
        table = live.get(name)
        if table is None:
            raise UserError(f"table {name} does not exist", hint="names are schema.table")


def install(conn: Conn, config: Config) -> list[Operation]:
    """Install (or upgrade) the history schema without tracking anything; returns what ran."""
    schema = HistorySchema(config.history.schema_name)
    with conn.transaction():
        ops = install_operations(conn, schema, config.history.trigger.value)
    apply_plan(conn, ops)
    return ops


def track(
    conn: Conn,
    config: Config,
    names: Sequence[TableName],
    *,
    mode: str | None = None,
    exclude_columns: Sequence[str] = (),
) -> list[Operation]:
    """Track tables now (source 'manual': `apply` leaves them alone). Returns what was run."""
    schema = HistorySchema(config.history.schema_name)
    with conn.transaction():
        _existing(conn, schema, names)
        ops = install_operations(conn, schema, config.history.trigger.value)
        for name in names:
            base = desired_settings(config.history, name)
            settings = TableSettings(
                mode=mode or base.mode,
                exclude_columns=tuple(sorted(set(base.exclude_columns) | set(exclude_columns))),
                truncate_mode=base.truncate_mode,
            )
            ops.append(track_operation(schema, name, settings, "manual", f"track {name}"))
    apply_plan(conn, ops)
    return ops


def untrack(conn: Conn, config: Config, names: Sequence[TableName]) -> list[Operation]:
    schema = HistorySchema(config.history.schema_name)
    with conn.transaction():
        tracked = {t.name for t in catalog.tracked_tables(conn, schema)}
        missing = [str(n) for n in names if n not in tracked]
        if missing:
            raise UserError(
                f"not tracked: {', '.join(missing)}", hint="`pgwarden verify` lists tracked tables"
            )
        ops = [untrack_operation(schema, name, "asked") for name in names]
    apply_plan(conn, ops)
    return ops
