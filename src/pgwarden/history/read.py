"""Reading history: events (streamed with a server-side cursor) and tables as of a time.

History tables hold native rows (layout.py); events come out as JSON built by the database
(read.sql), parsed here with every number exact. A table as of a time is rebuilt natively: per
key, the last word before that time since tracking last (re)started, or, for a table without a
key, the rows counted in and out; `--into` writes it straight into a table of the same types.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row

from pgwarden.errors import UserError
from pgwarden.history import catalog, wal
from pgwarden.history.catalog import DEFAULT_SCHEMA, Conn, HistorySchema
from pgwarden.history.layout import (
    OLD_SIDE,
    OP_NAMES,
    TableLog,
    event_sql,
    key_sql,
    load_json,
    table_logs,
    value_sql,
)
from pgwarden.history.names import TableName
from pgwarden.history.replay import replay_sql

OPS = ("INSERT", "UPDATE", "DELETE", "TRUNCATE", "SNAPSHOT")
OP_CODES = {"INSERT": ("I",), "UPDATE": ("U",), "DELETE": ("D",), "TRUNCATE": ("T", "X"),
            "SNAPSHOT": ("S",)}  # fmt: skip
AS_OF_WORK_MEM = "256MB"


@dataclass(frozen=True)
class Event:
    stmt_id: int
    ctx: int
    tx: int
    at: datetime
    table: str
    op: str
    key: Any
    old: Any
    new: Any
    db_user: str
    role: str
    app_user: str | None
    application: str | None
    client_addr: str | None
    context: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "tx": self.tx,
            "at": self.at.isoformat(),
            "table": self.table,
            "op": self.op,
            "key": self.key,
            "old": self.old,
            "new": self.new,
            "db_user": self.db_user,
            "app_user": self.app_user,
            "application": self.application,
            "client_addr": self.client_addr,
            "context": self.context,
        }

    def changed_columns(self) -> dict[str, tuple[Any, Any]]:
        """column → (before, after) for the columns this event changed."""
        old = self.old or {}
        new = self.new or {}
        return {
            col: (old.get(col), new.get(col))
            for col in sorted(set(old) | set(new), key=lambda c: (c not in (self.key or {}), c))
            if old.get(col) != new.get(col) or col not in old or col not in new
        }


@dataclass(frozen=True)
class EventFilter:
    table: TableName | None = None
    key: Mapping[str, str] | None = None
    since: datetime | None = None
    until: datetime | None = None
    actor: str | None = None
    op: str | None = None
    tx: int | None = None
    limit: int | None = None
    contexts: Sequence[int] | None = None  # these transaction contexts only (tx table ids)
    # These rows only, by history table (log id → ctids, as `locate` found them): a TID scan.
    rows: Mapping[int, Sequence[str]] | None = None


def ready(conn: Conn, schema: HistorySchema) -> None:
    """Before reading: history is installed, and has every change committed before now (WAL
    capture writes it a moment later; the reader catches up first, so it sees its own
    writes)."""
    require_installed(conn, schema)
    wal.catch_up(conn, schema)


def require_installed(conn: Conn, schema: HistorySchema) -> None:
    if catalog.is_installed(conn, schema):
        return
    if catalog.has_meta(conn, schema):
        raise UserError(
            f"the history in schema {schema.name} was written by an older pgwarden",
            hint="run `pgwarden apply` once to upgrade it in place (every event is kept)",
        )
    raise UserError(
        f"no pgwarden history in this database (schema {schema.name} is not installed)",
        hint="list tables under history.tables in pgwarden.yaml and run `pgwarden apply`, "
        "or `pgwarden track TABLE`",
    )


def logs_of(conn: Conn, schema: HistorySchema, table: TableName) -> list[TableLog]:
    """The history of one table: the live table's, else a dropped table's of that name."""
    oid = catalog.table_oid(conn, table)
    logs = table_logs(conn, schema, oid=oid) if oid is not None else []
    if not logs:
        logs = [log for log in table_logs(conn, schema, name=table) if log.oid is None]
    if not logs:
        hint = (
            f"{table} is not tracked: `pgwarden track {table}` starts its history"
            if oid is not None
            else "names are schema.table; `pgwarden verify` lists tracked tables"
        )
        what = "exists but has no history" if oid is not None else "has no history"
        raise UserError(f"{table} {what}", hint=hint)
    return logs


def _tracked(conn: Conn, schema: HistorySchema, oid: int) -> catalog.TrackedTable | None:
    return next((t for t in catalog.tracked_tables(conn, schema) if t.oid == oid), None)


def completeness_note(conn: Conn, schema: HistorySchema, table: TableName) -> str | None:
    """Why the history of a live table may stop short of now, or None when capture is on.

    A table that was untracked keeps its history, and reading it is right; but its latest
    changes are not there, and a reader must be told rather than shown a stale answer."""
    oid = catalog.table_oid(conn, table)
    if oid is None:
        return None
    tracked = _tracked(conn, schema, oid)
    if tracked is None:
        return (
            f"{table} is not tracked now: changes made since it was untracked are not in its "
            f"history (`pgwarden track {table}` resumes it)"
        )
    if not tracked.triggers_ok:
        return f"capture of {table} is not working: `pgwarden verify` says why"
    return None


def transaction_began(conn: Conn, tx: int, *, schema: HistorySchema = DEFAULT_SCHEMA) -> datetime:
    """When transaction `tx` began, from history; a clear error when history never saw it."""
    ready(conn, schema)
    row = conn.execute(
        sql.SQL("SELECT min(x.at) FROM {} x WHERE x.tx = {}").format(
            schema.table("tx"), sql.Literal(tx)
        )
    ).fetchone()
    if row is None or row[0] is None:
        raise UserError(
            f"transaction {tx} is not in history",
            hint="`pgwarden history` lists transactions (the tx column)",
        )
    began = row[0]
    assert isinstance(began, datetime)
    return began


def _context_filter(schema: HistorySchema, flt: EventFilter) -> sql.Composable | None:
    """Conditions on who and when (the tx table), or None."""
    clauses: list[sql.Composable] = []
    if flt.since is not None:
        clauses.append(sql.SQL("x.at >= {}").format(sql.Literal(flt.since)))
    if flt.until is not None:
        clauses.append(sql.SQL("x.at <= {}").format(sql.Literal(flt.until)))
    if flt.actor is not None:
        clauses.append(
            sql.SQL("{} IN (x.app_user, x.db_user, x.role_name)").format(sql.Literal(flt.actor))
        )
    if flt.tx is not None:
        clauses.append(sql.SQL("x.tx = {}").format(sql.Literal(flt.tx)))
    if not clauses:
        return None
    return sql.SQL("h.ctx IN (SELECT x.id FROM {} x WHERE {})").format(
        schema.table("tx"), sql.SQL(" AND ").join(clauses)
    )


def _key_filter(log: TableLog, key: Mapping[str, str]) -> sql.Composable:
    """Rows with these column values. The table's exact key goes through the key index."""
    names = {s.name for s in log.slots}
    unknown = sorted(set(key) - names)
    if unknown:
        raise UserError(
            f"{log.name} has no column {', '.join(unknown)}",
            hint=f"its columns are: {', '.join(sorted(names))}",
        )
    if not log.keyless and sorted(key) == sorted(log.key_names()):
        exprs = key_sql(log, "h")
        values = []
        for attnum, expr in zip(log.key_attnums or (), exprs, strict=True):
            slot = log.current_slot(attnum)
            assert slot is not None
            values.append(
                sql.SQL("{} = {}::{}").format(expr, sql.Literal(key[slot.name]), sql.SQL(slot.type))
            )
        return sql.SQL(" AND ").join(values)
    # Any other columns: compared as text, on either side, in every generation.
    clauses = []
    for column, value in key.items():
        sides = [
            sql.SQL("{}::text = {}").format(sql.Identifier("h", s.col(side)), sql.Literal(value))
            for s in log.slots
            if s.name == column
            for side in ("o", "n")
        ]
        clauses.append(sql.SQL("({})").format(sql.SQL(" OR ").join(sides)))
    return sql.SQL(" AND ").join(clauses)


def _where(schema: HistorySchema, log: TableLog, flt: EventFilter) -> sql.Composable:
    """The conditions of a filter on one history table (alias h)."""
    context = _context_filter(schema, flt)
    op_codes: tuple[str, ...] | None = None
    if flt.op is not None:
        op = flt.op.upper()
        if op not in OPS:
            raise UserError(f"unknown operation {flt.op!r}", hint=f"use one of {', '.join(OPS)}")
        op_codes = OP_CODES[op]
    where: list[sql.Composable] = []
    if flt.key:
        where.append(_key_filter(log, flt.key))
    if context is not None:
        where.append(context)
    if op_codes is not None:
        where.append(sql.SQL("h.op = ANY ({})").format(sql.Literal(list(op_codes))))
    if flt.contexts is not None:
        # BRIN on (ctx, stmt): a few recent contexts read a few recent block ranges.
        where.append(sql.SQL("h.ctx = ANY ({}::bigint[])").format(sql.Literal(list(flt.contexts))))
    if flt.rows is not None:
        where.append(
            sql.SQL("h.ctid = ANY ({}::tid[])").format(sql.Literal(list(flt.rows.get(log.id, []))))
        )
    return sql.SQL(" AND ").join(where) if where else sql.SQL("TRUE")


def _events_query(
    conn: Conn,
    schema: HistorySchema,
    logs: Sequence[TableLog],
    flt: EventFilter,
    newest_first: bool,
) -> sql.Composed:
    parts = []
    if flt.rows is not None:
        logs = [log for log in logs if flt.rows.get(log.id)]
    for log in logs:
        columns = event_sql(conn, schema, log, "h")
        parts.append(
            sql.SQL(
                "SELECT {id}::int AS log_id, h.ctid AS pos, h.ctx, h.stmt, h.op, "
                "({k})::text AS row_key, ({o})::text AS old_row, ({n})::text AS new_row "
                "FROM {shadow} h WHERE {where}"
            ).format(
                id=sql.Literal(log.id),
                k=columns.row_key,
                o=columns.old_row,
                n=columns.new_row,
                shadow=log.table(schema),
                where=_where(schema, log, flt),
            )
        )
    order = sql.SQL("DESC" if newest_first else "ASC")
    return sql.SQL(
        "SELECT e.*, x.tx, x.at, x.db_user, x.role_name, x.app_user, x.application, "
        "host(x.client_addr) AS client_addr, x.context "
        "FROM ({parts}) e JOIN {tx} x ON x.id = e.ctx "
        # Statement order (statement ids are taken as statements run, across sessions), then
        # the rows of one statement as they were written.
        "ORDER BY e.stmt {order}, e.log_id {order}, e.pos {order} {limit}"
    ).format(
        parts=sql.SQL(" UNION ALL ").join(parts),
        tx=schema.table("tx"),
        order=order,
        limit=sql.SQL("LIMIT {}").format(sql.Literal(flt.limit)) if flt.limit else sql.SQL(""),
    )


@dataclass(frozen=True)
class Located:
    """Where a context's matching events are: how many, and the first `cap` of them."""

    count: int
    rows: dict[int, list[str]]  # log id → ctids, in write order


def locate(
    conn: Conn, flt: EventFilter, cap: int, *, schema: HistorySchema = DEFAULT_SCHEMA
) -> dict[int, Located]:
    """Per transaction context, how many events match and where the first `cap` are, in one
    scan per history table that builds no image: a context of a million rows costs a count;
    `events(rows=…)` then builds the images of those rows only, by TID."""
    ready(conn, schema)
    logs = logs_of(conn, schema, flt.table) if flt.table is not None else table_logs(conn, schema)
    found: dict[int, Located] = {}
    for log in logs:
        rows = conn.execute(
            sql.SQL(
                "SELECT h.ctx, count(*), "
                "(pg_catalog.array_agg(h.ctid::text ORDER BY h.stmt, h.ctid))[1:{}] "
                "FROM {} h WHERE {} GROUP BY h.ctx"
            ).format(sql.Literal(cap), log.table(schema), _where(schema, log, flt))
        ).fetchall()
        for ctx, n, tids in rows:
            key = int(str(ctx))
            at = found.setdefault(key, Located(0, {}))
            found[key] = Located(at.count + int(str(n)), {**at.rows, log.id: list(tids)})  # type: ignore[call-overload]
    return found


def events(
    conn: Conn,
    flt: EventFilter = EventFilter(),
    *,
    schema: HistorySchema = DEFAULT_SCHEMA,
    newest_first: bool = False,
    batch: int = 2000,
) -> Iterator[Event]:
    """Matching events in order, streamed through a server-side cursor (constant memory).

    Must run inside a transaction (psycopg opens one unless the connection is autocommit).
    """
    ready(conn, schema)
    if flt.table is not None:
        logs = logs_of(conn, schema, flt.table)
    else:
        if flt.key:
            raise UserError(
                "--key needs a TABLE", hint="e.g. pgwarden history public.users --key id=7"
            )
        logs = table_logs(conn, schema)
    if not logs:
        return
    names = {log.id: str(log.name) for log in logs}
    query = _events_query(conn, schema, logs, flt, newest_first)
    name = f"pgwarden_history_{uuid.uuid4().hex[:8]}"
    try:
        with conn.cursor(name=name, row_factory=dict_row) as cur:
            cur.itersize = batch
            cur.execute(query)
            for r in cur:
                yield Event(
                    stmt_id=r["stmt"],
                    ctx=r["ctx"],
                    tx=r["tx"],
                    at=r["at"],
                    table=names[r["log_id"]],
                    op=OP_NAMES[r["op"]],
                    key=load_json(r["row_key"]),
                    old=load_json(r["old_row"]),
                    new=load_json(r["new_row"]),
                    db_user=r["db_user"],
                    role=r["role_name"],
                    app_user=r["app_user"],
                    application=r["application"],
                    client_addr=r["client_addr"],
                    context=r["context"],
                )
    except psycopg.errors.InvalidTextRepresentation as exc:
        raise UserError(f"bad key value: {exc.diag.message_primary}") from None


# --- tables as of a time -----------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    attnum: int
    name: str
    type: str


def live_columns(conn: Conn, oid: int) -> list[Column]:
    rows = conn.execute(
        "SELECT attnum, attname, pg_catalog.format_type(atttypid, atttypmod) "
        "FROM pg_catalog.pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped "
        "ORDER BY attnum",
        (oid,),
    ).fetchall()
    return [Column(int(str(a)), str(n), str(t)) for a, n, t in rows]


def _single_log(conn: Conn, schema: HistorySchema, table: TableName) -> TableLog:
    ready(conn, schema)
    return logs_of(conn, schema, table)[0]


def as_of(
    conn: Conn,
    table: TableName,
    at: datetime,
    *,
    key: Mapping[str, str] | None = None,
    schema: HistorySchema = DEFAULT_SCHEMA,
) -> list[dict[str, Any]]:
    """The rows of `table` as they were at `at` (transaction time), rebuilt from history, as
    JSON images: each holds the columns the table had when the row was last written."""
    log = _single_log(conn, schema, table)
    image = event_sql(conn, schema, log, "h")
    query = replay_sql(
        schema, log, at, [("img", lambda side: image.new_row if side == "n" else image.old_row)]
    )
    with conn.transaction():
        conn.execute(sql.SQL("SET LOCAL work_mem = {}").format(sql.Literal(AS_OF_WORK_MEM)))
        found = conn.execute(sql.SQL("SELECT r.img::text FROM ({}) r").format(query)).fetchall()
    rows = [load_json(str(r[0])) for r in found]
    if key:
        _key_filter(log, key)  # unknown columns are an error, as for `history --key`
        rows = [r for r in rows if all(str(r.get(c)) == v for c, v in key.items())]
    return rows


AsOfMethod = Literal["auto", "replay", "rewind"]


@dataclass(frozen=True)
class AsOfInto:
    """What `as_of_into` built, and how."""

    rows: int
    method: str  # "replay" or "rewind"
    note: str | None = None  # why auto did not rewind, when it did not; columns filled with NULL


def as_of_into(
    conn: Conn,
    table: TableName,
    at: datetime,
    target: TableName,
    *,
    method: AsOfMethod = "auto",
    schema: HistorySchema = DEFAULT_SCHEMA,
) -> AsOfInto:
    """Rebuild the whole table as of `at` into a new table `target`, with the table's columns
    as they are now (a column renamed since comes under its new name; one added since, or
    excluded from history, is NULL, and the result says which).

    Two ways, same rows: *replay* folds every event up to `at` (works for any history);
    *rewind* copies the live table and undoes the changes made after `at`, which costs a copy
    plus the recent changes when few rows changed since. `auto` rewinds when history after
    `at` is complete (see rewind_blocker) and shorter than the table.
    """
    # Rewinding reads the live table and the events after `at` in two places of one statement,
    # and checks first that history since `at` is complete: only a snapshot held for the whole
    # transaction makes all of that agree, so take one when the transaction is ours (decided
    # before any query, which would open one).
    own = conn.info.transaction_status == TransactionStatus.IDLE
    with conn.transaction():
        if own:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        log = _single_log(conn, schema, table)
        if catalog.table_oid(conn, target) is not None:
            raise UserError(
                f"{target} already exists; pgwarden will not overwrite it",
                hint="choose another name for --into, or drop that table yourself",
            )
        if log.oid is None:
            raise UserError(
                f"{table} no longer exists, so its column types are unknown",
                hint="use --format json to read its rows as of that time",
            )
        source = sql.Identifier(table.schema, table.table)
        dest = sql.Identifier(target.schema, target.table)
        # Replaying sorts every event of the table by key: give that sort memory for this
        # transaction only, instead of spilling to disk in 4 MB runs (about twice as fast).
        conn.execute(sql.SQL("SET LOCAL work_mem = {}").format(sql.Literal(AS_OF_WORK_MEM)))
        # LIKE also locks the source against schema changes until we are done. A scratch copy:
        # patterns in history.tables leave it untracked (the comment says so, in_track makes
        # the DDL event trigger skip it).
        try:
            with conn.transaction():
                conn.execute("SELECT pg_catalog.set_config('pgwarden.in_track', 'on', true)")
                conn.execute(sql.SQL("CREATE TABLE {} (LIKE {})").format(dest, source))
                conn.execute(
                    sql.SQL("COMMENT ON TABLE {} IS {}").format(
                        dest, sql.Literal(f"{catalog.AS_OF_COPY} of {table} at {at.isoformat()}")
                    )
                )
                conn.execute("SELECT pg_catalog.set_config('pgwarden.in_track', '', true)")
        except psycopg.errors.InvalidSchemaName:
            raise UserError(
                f"cannot create {target}: schema {target.schema} does not exist",
                hint="create the schema first, or choose a table in an existing one",
            ) from None
        except psycopg.errors.InsufficientPrivilege as exc:
            raise UserError(
                f"cannot create {target}: {exc.diag.message_primary}",
                hint="choose a schema you may create tables in",
            ) from None
        columns = live_columns(conn, log.oid)
        missing = [c.name for c in columns if log.current_slot(c.attnum) is None]
        later = _added_after(conn, schema, log, at, [c for c in columns if c.name not in missing])
        chosen, note = _choose_method(conn, schema, log, at, method)
        if chosen == "rewind":
            query = _rewind_query(conn, schema, log, at, source, dest, columns)
        else:
            outputs = [(c.name, _column_value(log, c)) for c in columns]
            query = sql.SQL("INSERT INTO {dest} ({cols}) {rows}").format(
                dest=dest,
                cols=sql.SQL(", ").join(sql.Identifier(c.name) for c in columns),
                rows=replay_sql(schema, log, at, outputs),
            )
        try:
            cur = conn.execute(query)
        except psycopg.errors.DataException as exc:
            raise UserError(
                f"cannot rebuild {table} as of {at}: a recorded value does not fit the "
                f"column's type now ({exc.diag.message_primary})",
                hint="use --format json, which shows every value in the type it was written in",
            ) from None
        notes = [note] if note else []
        if missing:
            notes.append(f"not in history, so NULL in every row: {', '.join(missing)} (excluded)")
        if later:
            notes.append(
                f"added to the table after that time, so NULL in every row: {', '.join(later)}"
            )
        return AsOfInto(rows=cur.rowcount, method=chosen, note="; ".join(notes) or None)


def _added_after(
    conn: Conn, schema: HistorySchema, log: TableLog, at: datetime, columns: Sequence[Column]
) -> list[str]:
    """The columns that did not exist yet at `at`: their first generation began after it (a
    column there when tracking started began with it; if that is after `at`, so are all)."""
    first = {c.attnum: min(s.since for s in log.generations(c.attnum)) for c in columns}
    if not first:
        return []
    rows = conn.execute(
        sql.SQL(
            "SELECT s.stmt FROM {} s WHERE s.log_id = %s AND s.stmt = ANY (%s) AND s.at > %s"
        ).format(schema.table("shape_change")),
        (log.id, [v for v in first.values() if v > 0], at),
    ).fetchall()
    after = {int(str(r[0])) for r in rows}
    started = conn.execute(
        sql.SQL("SELECT min(r.stmt) FROM {} r WHERE r.log_id = %s").format(schema.table("reset")),
        (log.id,),
    ).fetchone()
    first_reset = int(str(started[0])) if started and started[0] is not None else None
    # Columns added after tracking began, not all of the table's columns at its start.
    return [
        c.name
        for c in columns
        if first[c.attnum] in after and (first_reset is None or first[c.attnum] > first_reset)
    ]


def _column_value(log: TableLog, column: Column) -> Any:
    def value(side: str) -> sql.Composable:
        return value_sql(log, side, column.attnum, "h", column.type)

    return value


def rewind_blocker(conn: Conn, schema: HistorySchema, log: TableLog, at: datetime) -> str | None:
    """Why the events after `at` may not describe every change since (None: they do)."""
    tracked = _tracked(conn, schema, log.oid) if log.oid is not None else None
    if tracked is None:
        return "the table is not tracked now"
    if tracked.exclude_columns:
        return "some columns are excluded from history"
    if not tracked.triggers_ok:
        return "its capture triggers are not all in place"
    row = conn.execute(
        sql.SQL(
            "SELECT EXISTS (SELECT 1 FROM {reset} r JOIN {tx} x ON x.id = r.ctx "
            "               WHERE r.log_id = %(log)s AND x.at > %(at)s AND r.kind = 'S'), "
            "       EXISTS (SELECT 1 FROM {reset} r JOIN {tx} x ON x.id = r.ctx "
            "               WHERE r.log_id = %(log)s AND x.at > %(at)s AND r.kind = 'X'), "
            "       EXISTS (SELECT 1 FROM {failure} f "
            "               WHERE f.table_oid = %(oid)s AND f.at > %(at)s), "
            "       EXISTS (SELECT 1 FROM {shape} c WHERE c.log_id = %(log)s AND c.at > %(at)s)"
        ).format(
            reset=schema.table("reset"),
            tx=schema.table("tx"),
            failure=schema.table("capture_failure"),
            shape=schema.table("shape_change"),
        ),
        {"log": log.id, "at": at, "oid": log.oid},
    ).fetchone()
    assert row is not None
    restarted, marker, failed, reshaped = (bool(v) for v in row)
    if restarted:
        return "tracking (re)started after that time"
    if marker:
        return "a TRUNCATE recorded as a marker only since"
    if failed:
        return "a fail-open change went unrecorded since"
    if reshaped:
        return "the table's columns or key changed since"
    return None


def _choose_method(
    conn: Conn, schema: HistorySchema, log: TableLog, at: datetime, method: str
) -> tuple[str, str | None]:
    if method == "replay":
        return "replay", None
    if log.keyless:
        why = "the table has no key, so changed rows cannot be matched to live ones"
        if method == "rewind":
            raise UserError(f"cannot rewind {log.name}: {why}", hint="use --method replay")
        return "replay", f"replayed: {why}"
    row = conn.execute(
        "SELECT pg_catalog.current_setting('transaction_isolation'), "
        "(SELECT c.reltuples FROM pg_catalog.pg_class c WHERE c.oid = %s)",
        (log.oid,),
    ).fetchone()
    assert row is not None
    isolation, reltuples = row
    blocker = rewind_blocker(conn, schema, log, at)
    if blocker is None and isolation not in ("repeatable read", "serializable"):
        blocker = "the caller's transaction is not REPEATABLE READ, so live rows could move"
    if blocker is not None:
        if method == "rewind":
            raise UserError(
                f"cannot rewind {log.name} to {at}: {blocker}", hint="use --method replay"
            )
        return "replay", f"replayed: {blocker}"
    if method == "rewind":
        return "rewind", None
    # Rewinding costs a copy plus the changes since; replaying, all events. When more rows
    # changed since than the table holds, replay.
    limit = max(int(float(str(reltuples or 0))), 1000)
    counted = conn.execute(
        sql.SQL(
            "SELECT count(*) FROM (SELECT 1 FROM {} h WHERE h.ctx IN "
            "(SELECT x.id FROM {} x WHERE x.at > %s) LIMIT %s) c"
        ).format(log.table(schema), schema.table("tx")),
        (at, limit + 1),
    ).fetchone()
    assert counted is not None
    if int(str(counted[0])) > limit:
        return "replay", "replayed: more rows changed since than the table holds"
    return "rewind", None


def _rewind_query(
    conn: Conn,
    schema: HistorySchema,
    log: TableLog,
    at: datetime,
    source: sql.Identifier,
    dest: sql.Identifier,
    columns: Sequence[Column],
) -> sql.Composed:
    """One statement (one snapshot): live rows of keys unchanged since `at`, plus, for the keys
    changed since, their rows as of `at`. The first change after `at` decides: a change of an
    existing row (UPDATE, DELETE, TRUNCATE) holds its earlier image; a key being taken (INSERT,
    or an UPDATE moving a row onto it) means it was free, unless the same statement vacated it
    first (a key shift), hence prio."""
    by_attnum = {c.attnum: c for c in columns}
    keys = [by_attnum[a] for a in log.key_attnums or ()]
    k_names = [sql.Identifier(f"k{i}") for i in range(len(keys))]
    after = sql.SQL("h.ctx IN (SELECT x.id FROM {} x WHERE x.at > {})").format(
        schema.table("tx"), sql.Literal(at)
    )
    old_vals = sql.SQL(", ").join(
        sql.SQL("{} AS {}").format(
            value_sql(log, "o", c.attnum, "h", c.type), sql.Identifier(f"c{i}")
        )
        for i, c in enumerate(columns)
    )
    nulls = sql.SQL(", ").join(
        sql.SQL("NULL::{} AS {}").format(sql.SQL(c.type), sql.Identifier(f"c{i}"))
        for i, c in enumerate(columns)
    )
    partitioned = conn.execute(
        "SELECT relkind = 'p' FROM pg_catalog.pg_class WHERE oid = %s", (log.oid,)
    ).fetchone()
    # ONLY: rows of inheritance children are not this table's (a partitioned table has none
    # of its own, so it is read whole).
    only = sql.SQL("") if partitioned and partitioned[0] else sql.SQL("ONLY ")
    cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in columns)
    return sql.SQL(
        "WITH changed AS MATERIALIZED (SELECT DISTINCT ON ({ks}) e.* FROM ("
        "  SELECT {old_keys}, h.stmt, 0 AS prio, {old_vals} FROM {shadow} h "
        "  WHERE {after} AND h.op = ANY ({oldside}) "
        "  UNION ALL "
        "  SELECT {new_keys}, h.stmt, 1 AS prio, {nulls} FROM {shadow} h "
        "  WHERE {after} AND h.op IN ('I', 'U')"
        ") e ORDER BY {ks}, e.stmt, e.prio) "
        "INSERT INTO {dest} ({cols}) "
        "SELECT {cols} FROM {only}{src} s WHERE NOT EXISTS "
        "  (SELECT 1 FROM changed c WHERE {same}) "
        "UNION ALL "
        "SELECT {outs} FROM changed c WHERE c.prio = 0"
    ).format(
        ks=sql.SQL(", ").join(sql.SQL("e.{}").format(k) for k in k_names),
        old_keys=sql.SQL(", ").join(
            sql.SQL("{} AS {}").format(value_sql(log, "o", c.attnum, "h", c.type), k)
            for c, k in zip(keys, k_names, strict=True)
        ),
        new_keys=sql.SQL(", ").join(
            sql.SQL("{} AS {}").format(value_sql(log, "n", c.attnum, "h", c.type), k)
            for c, k in zip(keys, k_names, strict=True)
        ),
        old_vals=old_vals,
        nulls=nulls,
        shadow=log.table(schema),
        after=after,
        oldside=sql.Literal(list(OLD_SIDE)),
        dest=dest,
        cols=cols,
        only=only,
        src=source,
        same=sql.SQL(" AND ").join(
            sql.SQL("c.{} = s.{}").format(k, sql.Identifier(c.name))
            for c, k in zip(keys, k_names, strict=True)
        ),
        outs=sql.SQL(", ").join(sql.Identifier("c", f"c{i}") for i in range(len(columns))),
    )


def columns_of(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        for col in row:
            seen.setdefault(col, None)
    return list(seen)
