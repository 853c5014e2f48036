"""Reading history for a browser: what is tracked and how much, changes over time, capture
failures, schema changes, and transactions newest first, a page at a time.

Pages are keyed, never offset: a page of transactions starts below the last context id the
previous page showed, found through the tx table's primary key, and its events through the
history tables' BRIN index on (ctx, stmt); so the first page costs the same at 10M events as at
10k. The web UI (pgwarden.web) reads history only through this module and read.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from psycopg import sql
from psycopg.rows import dict_row

from pgwarden.history import catalog
from pgwarden.history.catalog import DEFAULT_SCHEMA, Conn, HistorySchema
from pgwarden.history.layout import dump_json, table_logs
from pgwarden.history.names import TableName
from pgwarden.history.read import (
    Event,
    EventFilter,
    events,
    locate,
    logs_of,
    ready,
)

EXACT_COUNT_BELOW = 1_000_000  # above this, the planner's estimate (shown as such)
SCAN_PER_PAGE = 5000  # transactions looked at per page before "load more" takes over
EVENTS_PER_GROUP = 20  # a timeline entry shows this many events of its transaction
EVENTS_PER_TX_PAGE = 500  # a transaction's page shows this many of a bulk transaction


@dataclass(frozen=True)
class TableStat:
    name: str
    tracked: bool  # False: history of a table untracked or dropped since
    exists: bool
    events: int
    estimated: bool  # `events` is the planner's estimate, not a count
    capture_ok: bool  # triggers present and enabled (tracked tables)


def table_stats(conn: Conn, *, schema: HistorySchema = DEFAULT_SCHEMA) -> list[TableStat]:
    ready(conn, schema)
    tracked = {t.oid: t for t in catalog.tracked_tables(conn, schema)}
    stats = []
    for log in table_logs(conn, schema):
        shadow = log.table(schema)
        found = _rows(
            conn,
            sql.SQL("SELECT c.reltuples::bigint AS n FROM pg_catalog.pg_class c "
                    "WHERE c.oid = {}::regclass").format(sql.Literal(shadow.as_string(conn))),
        )  # fmt: skip
        estimate = int(found[0]["n"]) if found and found[0]["n"] is not None else -1
        if estimate >= EXACT_COUNT_BELOW:
            count, estimated = estimate, True
        else:
            got = _rows(conn, sql.SQL("SELECT count(*) AS n FROM {}").format(shadow))
            count, estimated = int(got[0]["n"]), False
        t = tracked.get(log.oid) if log.oid is not None else None
        stats.append(
            TableStat(
                name=str(log.name),
                tracked=t is not None,
                exists=log.oid is not None,
                events=count,
                estimated=estimated,
                capture_ok=t.triggers_ok if t is not None else True,
            )
        )
    stats.sort(key=lambda s: (not s.tracked, s.name))
    return stats


def table_names(conn: Conn, *, schema: HistorySchema = DEFAULT_SCHEMA) -> list[str]:
    """Every table with history, by name (no counting: for a filter's choices)."""
    ready(conn, schema)
    return sorted({str(log.name) for log in table_logs(conn, schema)})


@dataclass(frozen=True)
class Activity:
    """Events per time bucket, table and operation."""

    bucket: datetime
    table: str
    op: str
    events: int


def activity(
    conn: Conn,
    since: datetime,
    until: datetime,
    *,
    unit: str = "day",
    table: TableName | None = None,
    schema: HistorySchema = DEFAULT_SCHEMA,
) -> list[Activity]:
    if unit not in ("hour", "day", "week"):
        raise ValueError(unit)
    ready(conn, schema)
    logs = logs_of(conn, schema, table) if table is not None else table_logs(conn, schema)
    found: list[Activity] = []
    for log in logs:
        rows = _rows(
            conn,
            sql.SQL(
                "SELECT pg_catalog.date_trunc({unit}, x.at) AS bucket, h.op, count(*) AS n "
                "FROM {shadow} h JOIN {tx} x ON x.id = h.ctx "
                "WHERE x.at >= {since} AND x.at < {until} AND h.op IN ('I', 'U', 'D', 'T') "
                "GROUP BY 1, 2"
            ).format(
                unit=sql.Literal(unit),
                shadow=log.table(schema),
                tx=schema.table("tx"),
                since=sql.Literal(since),
                until=sql.Literal(until),
            ),
        )
        names = {"I": "INSERT", "U": "UPDATE", "D": "DELETE", "T": "TRUNCATE"}
        found += [
            Activity(r["bucket"], str(log.name), names[str(r["op"])], int(r["n"])) for r in rows
        ]
    found.sort(key=lambda a: (a.bucket, a.table, a.op))
    return found


@dataclass(frozen=True)
class CaptureFailure:
    at: datetime
    tx: int
    table: str
    op: str
    sqlstate: str | None
    message: str | None


def capture_failures(
    conn: Conn, *, limit: int = 20, schema: HistorySchema = DEFAULT_SCHEMA
) -> list[CaptureFailure]:
    """Fail-open capture's failures, newest first: changes that were made but not recorded."""
    ready(conn, schema)
    rows = _rows(
        conn,
        sql.SQL(
            "SELECT f.at, f.tx::text::bigint AS tx, f.schema_name, f.table_name, f.op, "
            "f.sqlstate, f.message FROM {} f ORDER BY f.id DESC LIMIT {}"
        ).format(schema.table("capture_failure"), sql.Literal(limit)),
    )
    return [
        CaptureFailure(
            at=r["at"],
            tx=int(r["tx"]),
            table=str(TableName(r["schema_name"], r["table_name"])),
            op=r["op"],
            sqlstate=r["sqlstate"],
            message=r["message"],
        )
        for r in rows
    ]


@dataclass(frozen=True)
class SchemaChange:
    id: int
    at: datetime
    tx: int
    db_user: str
    role: str
    command: str
    object_type: str | None
    object_identity: str | None
    statement: str | None


def schema_changes(
    conn: Conn,
    *,
    before: int | None = None,
    limit: int = 50,
    schema: HistorySchema = DEFAULT_SCHEMA,
) -> list[SchemaChange]:
    """The DDL log, newest first, a page at a time (`before`: the last id shown)."""
    ready(conn, schema)
    where = sql.SQL("d.id < {}").format(sql.Literal(before)) if before else sql.SQL("TRUE")
    rows = _rows(
        conn,
        sql.SQL(
            "SELECT d.id, d.at, d.tx::text::bigint AS tx, d.db_user, d.role_name, "
            "d.command_tag, d.object_type, d.object_identity, d.statement FROM {} d WHERE {} "
            "ORDER BY d.id DESC LIMIT {}"
        ).format(schema.table("ddl_log"), where, sql.Literal(limit)),
    )
    return [
        SchemaChange(
            int(r["id"]),
            r["at"],
            int(r["tx"]),
            r["db_user"],
            r["role_name"],
            r["command_tag"],
            r["object_type"],
            r["object_identity"],
            r["statement"],
        )
        for r in rows
    ]


def _rows(conn: Conn, query: sql.Composed) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query).fetchall()


@dataclass(frozen=True)
class TxFilter:
    table: TableName | None = None
    op: str | None = None
    key: Mapping[str, str] | None = None
    db_user: str | None = None
    app_user: str | None = None
    since: datetime | None = None
    until: datetime | None = None


@dataclass
class TxGroup:
    """One transaction context: who and when, and its events in order."""

    ctx: int
    tx: int
    at: datetime
    db_user: str
    role: str
    app_user: str | None
    application: str | None
    context: str | None
    events: list[Event] = field(default_factory=list)
    total: int = 0  # matching events in all; more than len(events) for a bulk transaction


@dataclass(frozen=True)
class TxPage:
    groups: list[TxGroup]
    next_before: int | None  # pass as `before` for the next page; None: nothing older


def transactions(
    conn: Conn,
    flt: TxFilter = TxFilter(),
    *,
    before: int | None = None,
    limit: int = 25,
    schema: HistorySchema = DEFAULT_SCHEMA,
) -> TxPage:
    """Transactions newest first with their (matching) events, `limit` at most, keyed by
    context id; a page looks at SCAN_PER_PAGE transactions at most, so a filter that matches
    rarely returns a short page with a cursor instead of scanning all history at once."""
    ready(conn, schema)
    clauses: list[sql.Composable] = []
    for column, value in (("db_user", flt.db_user), ("app_user", flt.app_user)):
        if value:
            clauses.append(
                sql.SQL("{} = {}").format(sql.Identifier("x", column), sql.Literal(value))
            )
    if flt.since is not None:
        clauses.append(sql.SQL("x.at >= {}").format(sql.Literal(flt.since)))
    if flt.until is not None:
        clauses.append(sql.SQL("x.at <= {}").format(sql.Literal(flt.until)))
    groups: list[TxGroup] = []
    scanned = 0
    cursor = before
    chunk = limit  # enough when every transaction matches; grown while a filter rarely does
    while scanned < SCAN_PER_PAGE:
        where = list(clauses)
        if cursor is not None:
            where.append(sql.SQL("x.id < {}").format(sql.Literal(cursor)))
        rows = _rows(
            conn,
            sql.SQL("{} WHERE {} ORDER BY x.id DESC LIMIT {}").format(
                _TX_SELECT.format(tx=schema.table("tx")),
                sql.SQL(" AND ").join(where) if where else sql.SQL("TRUE"),
                sql.Literal(chunk),
            ),
        )
        if not rows:
            return TxPage(groups, None)
        scanned += len(rows)
        found = {r["id"]: _group(r) for r in rows}
        matching = EventFilter(table=flt.table, op=flt.op, key=flt.key, contexts=list(found))
        _fill(conn, schema, found, matching, EVENTS_PER_GROUP)
        for r in rows:
            cursor = r["id"]
            if found[cursor].total:
                groups.append(found[cursor])
                if len(groups) == limit:
                    return TxPage(groups, cursor)
        if len(rows) < chunk:
            return TxPage(groups, None)
        chunk = min(chunk * 4, 1000)
    return TxPage(groups, cursor)


_TX_SELECT = sql.SQL(
    "SELECT x.id, x.tx, x.at, x.db_user, x.role_name, x.app_user, x.application, x.context "
    "FROM {tx} x"
)


def _group(r: Mapping[str, Any]) -> TxGroup:
    return TxGroup(
        ctx=r["id"], tx=r["tx"], at=r["at"], db_user=r["db_user"], role=r["role_name"],
        app_user=r["app_user"], application=r["application"], context=r["context"],
    )  # fmt: skip


def transaction(conn: Conn, tx: int, *, schema: HistorySchema = DEFAULT_SCHEMA) -> list[TxGroup]:
    """Every event of one transaction, by context."""
    ready(conn, schema)
    rows = _rows(
        conn,
        sql.SQL("{} WHERE x.tx = {} ORDER BY x.id").format(
            _TX_SELECT.format(tx=schema.table("tx")), sql.Literal(tx)
        ),
    )
    groups = {r["id"]: _group(r) for r in rows}
    if groups:
        _fill(conn, schema, groups, EventFilter(contexts=list(groups)), EVENTS_PER_TX_PAGE)
    return list(groups.values())


def _fill(
    conn: Conn, schema: HistorySchema, groups: dict[int, TxGroup], flt: EventFilter, cap: int
) -> None:
    """Each group's matching events: located first (counted, and the first `cap` rows found,
    without building an image), then the images of those rows only, by TID; so a bulk
    transaction of a million rows costs a count and `cap` images."""
    located = locate(conn, flt, cap, schema=schema)
    rows: dict[int, list[str]] = {}
    for ctx, where in located.items():
        if ctx in groups:
            groups[ctx].total = where.count
            for log_id, tids in where.rows.items():
                rows.setdefault(log_id, []).extend(tids)
    if rows:
        for event in events(conn, replace(flt, contexts=None, rows=rows), schema=schema):
            if event.ctx in groups:
                groups[event.ctx].events.append(event)


def row_history(
    conn: Conn, table: TableName, key: Mapping[str, str], *, schema: HistorySchema = DEFAULT_SCHEMA
) -> list[Event]:
    """The whole life of one row, oldest first (through the history table's key index)."""
    return list(events(conn, EventFilter(table=table, key=key), schema=schema))


def describe_value(value: Any) -> str:
    """A value as text for display, exact: JSON for anything that is not a string."""
    if isinstance(value, str):
        return value
    return dump_json(value)
