"""How a table's history is laid out (sql/history/capture.sql and track.sql), and the SQL pieces
every reader composes from it: one place that knows the history tables' columns.

Each table with history has a history table of native rows: ctx, stmt, op, then per column of
the table and per *generation* (a new one when its type changes) an old and a new slot. A slot
is written by statements with ids in [since, until).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from psycopg import sql

from pgwarden.history.catalog import Conn, HistorySchema
from pgwarden.history.names import TableName

# op codes of history rows, and what readers call them
OP_NAMES = {"I": "INSERT", "U": "UPDATE", "D": "DELETE", "T": "TRUNCATE", "X": "TRUNCATE",
            "S": "SNAPSHOT"}  # fmt: skip
OLD_SIDE = ("U", "D", "T")  # ops whose row has an old image
NEW_SIDE = ("I", "U", "S")  # ops whose row has a new image


@dataclass(frozen=True)
class Slot:
    attnum: int  # < 0: a column known only from 0.1's JSON history (jsonb)
    gen: int
    name: str
    type: str
    old_col: str
    new_col: str
    since: int
    until: int | None

    @property
    def current(self) -> bool:
        return self.until is None

    def col(self, side: str) -> str:
        return self.old_col if side == "o" else self.new_col


@dataclass(frozen=True)
class TableLog:
    """One table's history: its history table and column map."""

    id: int
    oid: int | None  # None once the table is dropped
    name: TableName
    shadow: str
    key_attnums: tuple[int, ...] | None  # None: no key, the whole row is its identity
    slots: tuple[Slot, ...]

    @property
    def keyless(self) -> bool:
        return self.key_attnums is None

    def table(self, schema: HistorySchema) -> sql.Identifier:
        return schema.table(self.shadow)

    def generations(self, attnum: int) -> list[Slot]:
        """Every generation of one column, newest first."""
        return sorted((s for s in self.slots if s.attnum == attnum), key=lambda s: -s.gen)

    def current_slot(self, attnum: int) -> Slot | None:
        return next((s for s in self.slots if s.attnum == attnum and s.current), None)

    def key_names(self) -> list[str]:
        names = []
        for attnum in self.key_attnums or ():
            gens = self.generations(attnum)
            names.append(gens[0].name if gens else f"#{attnum}")
        return names


def table_logs(
    conn: Conn,
    schema: HistorySchema,
    *,
    name: TableName | None = None,
    oid: int | None = None,
    log_id: int | None = None,
) -> list[TableLog]:
    """The history of every table, or of one (by its current oid, or by name: a dropped
    table's history is found by the name it last had; or by its id)."""
    where: sql.Composable = sql.SQL("TRUE")
    if log_id is not None:
        where = sql.SQL("t.id = {}").format(sql.Literal(log_id))
    elif oid is not None:
        where = sql.SQL("t.table_oid = {}").format(sql.Literal(oid))
    elif name is not None:
        where = sql.SQL("t.schema_name = {} AND t.table_name = {}").format(
            sql.Literal(name.schema), sql.Literal(name.table)
        )
    rows = conn.execute(
        sql.SQL(
            "SELECT t.id, t.table_oid, t.schema_name, t.table_name, t.shadow, t.key_attnums, "
            "COALESCE((SELECT pg_catalog.json_agg(pg_catalog.json_build_array(c.attnum, c.gen, "
            "c.name, c.type, c.old_col, c.new_col, c.since, c.until) ORDER BY c.attnum, c.gen) "
            "FROM {columns} c WHERE c.log_id = t.id), '[]') "
            "FROM {tables} t WHERE {where} ORDER BY t.table_oid IS NULL, t.id"
        ).format(
            columns=schema.table("logged_column"), tables=schema.table("logged_table"), where=where
        )
    ).fetchall()
    logs = []
    for found_id, table_oid, nsp, rel, shadow, key, slots in rows:
        logs.append(
            TableLog(
                id=int(str(found_id)),
                oid=int(str(table_oid)) if table_oid is not None else None,
                name=TableName(str(nsp), str(rel)),
                shadow=str(shadow),
                key_attnums=tuple(int(a) for a in key) if key else None,  # type: ignore[attr-defined]
                slots=tuple(Slot(*s) for s in slots),  # type: ignore[attr-defined]
            )
        )
    return logs


def value_sql(log: TableLog, side: str, attnum: int, alias: str, type_name: str) -> sql.Composable:
    """A column's value on one side of an event, in type `type_name` (its type now): the
    generation the event wrote, older ones cast, values kept as JSON cast from their text."""
    parts: list[sql.Composable] = []
    for slot in log.generations(attnum):
        column = sql.Identifier(alias, slot.col(side))
        if slot.type == type_name:
            parts.append(column)
        elif slot.type == "jsonb":
            parts.append(sql.SQL("({} #>> '{{}}')::{}").format(column, sql.SQL(type_name)))
        else:
            parts.append(sql.SQL("{}::{}").format(column, sql.SQL(type_name)))
    if not parts:
        return sql.SQL("NULL::{}").format(sql.SQL(type_name))
    if len(parts) == 1:
        return parts[0]
    return sql.SQL("COALESCE({})").format(sql.SQL(", ").join(parts))


def key_type(log: TableLog, attnum: int) -> str:
    """The type a key column's values are compared in: its current generation's."""
    return (log.current_slot(attnum) or log.generations(attnum)[0]).type


def taken_sql(log: TableLog, attnum: int, alias: str, type_name: str) -> sql.Composable:
    """A key column's value after the change: the new row's, or the old one's for a delete
    (what the key index holds, in every generation)."""
    return sql.SQL("COALESCE({}, {})").format(
        value_sql(log, "n", attnum, alias, type_name), value_sql(log, "o", attnum, alias, type_name)
    )


def key_sql(log: TableLog, alias: str) -> list[sql.Composable]:
    """The indexed key expressions: the key after the change (new, or old for a delete), as
    the key index is built (track.sql, refresh_keys)."""
    exprs: list[sql.Composable] = []
    for attnum in log.key_attnums or ():
        slot = log.current_slot(attnum)
        if slot is None:
            raise ValueError(f"key column {attnum} of {log.name} has no current slot")
        exprs.append(
            sql.SQL("COALESCE({}, {})").format(
                sql.Identifier(alias, slot.new_col), sql.Identifier(alias, slot.old_col)
            )
        )
    return exprs


@dataclass(frozen=True)
class EventSql:
    row_key: sql.Composable
    old_row: sql.Composable
    new_row: sql.Composable


def event_sql(conn: Conn, schema: HistorySchema, log: TableLog, alias: str) -> EventSql:
    """The JSON columns of an event (read.sql, event_sql: the same SQL the `event` view uses)."""
    row = conn.execute(
        sql.SQL("SELECT row_key, old_row, new_row FROM {}(%s, %s)").format(
            schema.func("event_sql")
        ),
        (log.id, alias),
    ).fetchone()
    assert row is not None
    # Built by our own function with format('%I', …) from catalog names: trusted as a literal.
    return EventSql(*(sql.SQL(str(part)) for part in row))


class Number(Decimal):
    """A number read from history, printed as PostgreSQL wrote it (no float on the way)."""

    text: str

    def __new__(cls, text: str) -> Number:
        number = super().__new__(cls, text)
        number.text = text
        return number

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"Number({self.text!r})"


def load_json(text: str | None) -> Any:
    """JSON from history with every number exact: integers as int, others as Number."""
    if text is None:
        return None
    return json.loads(text, parse_float=Number, parse_int=int)


def dump_json(value: Any) -> str:
    """JSON text of values read from history: Numbers as the digits they were read with."""
    if isinstance(value, Number):
        return value.text
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{json.dumps(str(k))}: {dump_json(v)}" for k, v in value.items()) + "}"
        )
    if isinstance(value, list | tuple):
        return "[" + ", ".join(dump_json(v) for v in value) + "]"
    return json.dumps(value, default=str)
