"""Reading history: events (streamed with a server-side cursor) and tables as of a time."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row

from pgwarden.errors import UserError
from pgwarden.history import catalog
from pgwarden.history.catalog import DEFAULT_SCHEMA, Conn, HistorySchema
materialize = lambda *a: 0  # TEMP
from pgwarden.history.names import TableName

OPS = ("INSERT", "UPDATE", "DELETE", "TRUNCATE", "SNAPSHOT")
AS_OF_WORK_MEM = "256MB"


@dataclass(frozen=True)
class Event:
    id: int
    stmt_id: int
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
            "id": self.id,
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


def _require_installed(conn: Conn, schema: HistorySchema) -> None:
    """History is there, with the events of deferred statements written (see deferred.py)."""
    if not catalog.is_installed(conn, schema):
        raise UserError(
            f"no pgwarden history in this database (schema {schema.name} is not installed)",
            hint="list tables under history.tables in pgwarden.yaml and run `pgwarden apply`, "
            "or `pgwarden track TABLE`",
        )
    materialize(conn, schema)


def key_json(conn: Conn, table: TableName, key: Mapping[str, str]) -> tuple[str, bool]:
    """The stored form of a key given as text (`id=1` → `{"id": 1}`), and whether the given
    columns are exactly the table's key (so the key index applies)."""
    oid = catalog.table_oid(conn, table)
    if oid is None:
        # Table gone: values can only be matched as JSON text/numbers as given.
        return json.dumps({k: _guess(v) for k, v in key.items()}), False
    columns = catalog.key_columns(conn, oid)
    known = {
        str(r[0])
        for r in conn.execute(
            "SELECT attname FROM pg_catalog.pg_attribute "
            "WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped",
            (oid,),
        ).fetchall()
    }
    unknown = sorted(set(key) - known)
    if unknown:
        raise UserError(
            f"{table} has no column {', '.join(unknown)}",
            hint=f"its columns are: {', '.join(sorted(known))}",
        )
    # Let PostgreSQL convert the text values to the columns' own types.
    query = sql.SQL(
        "SELECT pg_catalog.jsonb_object_agg(k, pg_catalog.to_jsonb(r) -> k) "
        "FROM pg_catalog.jsonb_populate_record(NULL::{}, %s::jsonb) r, "
        "pg_catalog.unnest(%s::text[]) k"
    ).format(sql.Identifier(table.schema, table.table))
    try:
        with conn.transaction():
            row = conn.execute(query, (json.dumps(dict(key)), list(key))).fetchone()
    except Exception as exc:
        raise UserError(f"bad key value for {table}: {exc}") from None
    assert row is not None
    return json.dumps(row[0]), sorted(key) == sorted(columns)


def _guess(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def _where(
    conn: Conn, schema: HistorySchema, flt: EventFilter
) -> tuple[sql.Composable, sql.Composed]:
    """(what to read from, which rows): a row's events come from a narrower source."""
    source: sql.Composable = schema.table("event")
    clauses: list[sql.Composable] = []
    if flt.table is not None:
        oid = catalog.table_oid(conn, flt.table)
        if oid is not None:
            source = schema.table("table_event")  # by index: see history.sql
            clauses.append(sql.SQL("e.table_oid = {}").format(sql.Literal(oid)))
        else:
            clauses.append(
                sql.SQL("e.schema_name = {} AND e.table_name = {}").format(
                    sql.Literal(flt.table.schema), sql.Literal(flt.table.table)
                )
            )
        if flt.key:
            text, exact = key_json(conn, flt.table, flt.key)
            if exact and oid is not None:
                # Found by the hash of the key through table_event's indexes (the small-statement
                # key index, one probe per bulk statement); the key itself settles collisions.
                clauses.append(
                    sql.SQL(
                        "e.key_hash = pg_catalog.hashtextextended({}::jsonb::text, 0) "
                        "AND e.row_key = {}::jsonb"
                    ).format(sql.Literal(text), sql.Literal(text))
                )
            else:
                clauses.append(
                    sql.SQL("(e.old_row @> {0}::jsonb OR e.new_row @> {0}::jsonb)").format(
                        sql.Literal(text)
                    )
                )
    elif flt.key:
        raise UserError("--key needs a TABLE", hint="e.g. pgwarden history public.users --key id=7")
    if flt.since is not None:
        clauses.append(sql.SQL("e.tx_at >= {}").format(sql.Literal(flt.since)))
    if flt.until is not None:
        clauses.append(sql.SQL("e.tx_at <= {}").format(sql.Literal(flt.until)))
    if flt.actor is not None:
        clauses.append(
            sql.SQL("{} IN (e.app_user, e.db_user, e.role_name)").format(sql.Literal(flt.actor))
        )
    if flt.op is not None:
        op = flt.op.upper()
        if op not in OPS:
            raise UserError(f"unknown operation {flt.op!r}", hint=f"use one of {', '.join(OPS)}")
        clauses.append(sql.SQL("e.op = {}").format(sql.Literal(op)))
    if flt.tx is not None:
        clauses.append(sql.SQL("e.tx = {}").format(sql.Literal(flt.tx)))
    if not clauses:
        return source, sql.Composed([sql.SQL("TRUE")])
    return source, sql.SQL(" AND ").join(clauses)


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
    _require_installed(conn, schema)
    source, where = _where(conn, schema, flt)
    query = sql.SQL(
        "SELECT e.id, e.stmt_id, e.tx, e.tx_at, e.schema_name, e.table_name,"
        " e.op,"
        " e.row_key, e.old_row, e.new_row, e.db_user, e.role_name, e.app_user, e.application,"
        " host(e.client_addr) AS client_addr, e.context"
        # Statement order first: a deferred statement's events get their ids when they are
        # written, after those of statements that ran later.
        " FROM {source} e WHERE {where} ORDER BY e.stmt_id {order}, e.id {order} {limit}"
    ).format(
        source=source,
        where=where,
        order=sql.SQL("DESC" if newest_first else "ASC"),
        limit=sql.SQL("LIMIT {}").format(sql.Literal(flt.limit)) if flt.limit else sql.SQL(""),
    )
    name = f"pgwarden_history_{uuid.uuid4().hex[:8]}"
    with conn.cursor(name=name, row_factory=dict_row) as cur:
        cur.itersize = batch
        cur.execute(query)
        for r in cur:
            yield Event(
                id=r["id"],
                stmt_id=r["stmt_id"],
                tx=r["tx"],
                at=r["tx_at"],
                table=str(TableName(r["schema_name"], r["table_name"])),
                op=r["op"],
                key=r["row_key"],
                old=r["old_row"],
                new=r["new_row"],
                db_user=r["db_user"],
                role=r["role_name"],
                app_user=r["app_user"],
                application=r["application"],
                client_addr=r["client_addr"],
                context=r["context"],
            )


def _as_of_query(
    conn: Conn, schema: HistorySchema, oid: int, at: datetime, key: str | None
) -> sql.Composed:
    """Rows as of `at` (see rows_as_of in history.sql), optionally one key only."""
    query = sql.SQL("SELECT r.img FROM {}({}, {}) AS r(img)").format(
        schema.func("rows_as_of"), sql.Literal(oid), sql.Literal(at)
    )
    if key is None:
        return query
    # The key columns of the image, compared with the key asked for.
    return sql.SQL(
        "{} WHERE (SELECT pg_catalog.jsonb_object_agg(c, r.img -> c) "
        "FROM pg_catalog.jsonb_object_keys({}::jsonb) c) = {}::jsonb"
    ).format(query, sql.Literal(key), sql.Literal(key))


def _table_for_as_of(conn: Conn, schema: HistorySchema, table: TableName) -> int:
    _require_installed(conn, schema)
    oid = catalog.table_oid(conn, table)
    if oid is None:
        row = conn.execute(
            sql.SQL(
                "SELECT table_oid FROM {} WHERE schema_name = %s AND table_name = %s "
                "ORDER BY id DESC LIMIT 1"
            ).format(schema.table("event")),
            (table.schema, table.table),
        ).fetchone()
        if row is None:
            raise UserError(f"no history for {table}", hint="is it tracked? see `pgwarden verify`")
        oid = int(row[0])  # type: ignore[call-overload]
    return oid


def tracking_started(conn: Conn, schema: HistorySchema, oid: int) -> datetime | None:
    row = conn.execute(
        sql.SQL("SELECT min(tx_at) FROM {} WHERE table_oid = %s").format(
            schema.table("table_event")
        ),
        (oid,),
    ).fetchone()
    return row[0] if row else None  # type: ignore[return-value]


def as_of(
    conn: Conn,
    table: TableName,
    at: datetime,
    *,
    key: Mapping[str, str] | None = None,
    schema: HistorySchema = DEFAULT_SCHEMA,
) -> list[dict[str, Any]]:
    """The rows of `table` as they were at `at` (transaction time), rebuilt from history."""
    oid = _table_for_as_of(conn, schema, table)
    key_text = key_json(conn, table, key)[0] if key else None
    rows = conn.execute(_as_of_query(conn, schema, oid, at, key_text)).fetchall()
    return [r[0] for r in rows]  # type: ignore[misc]


AsOfMethod = Literal["auto", "replay", "rewind"]


@dataclass(frozen=True)
class AsOfInto:
    """What `as_of_into` built, and how."""

    rows: int
    method: str  # "replay" or "rewind"
    note: str | None = None  # why auto did not rewind, when it did not


def as_of_into(
    conn: Conn,
    table: TableName,
    at: datetime,
    target: TableName,
    *,
    method: AsOfMethod = "auto",
    schema: HistorySchema = DEFAULT_SCHEMA,
) -> AsOfInto:
    """Rebuild the whole table as of `at` into a new table `target`.

    Two ways, same rows: *replay* folds every event up to `at` (works for any history);
    *rewind* copies the live table and undoes the changes made after `at`, which costs a copy
    plus the recent changes when few rows changed since. `auto` rewinds when history after
    `at` is complete (see rewind_blocker in history.sql) and shorter than the table.
    """
    # Rewinding reads the live table and the events after `at` in two places of one statement,
    # and checks first that history since `at` is complete: only a snapshot held for the whole
    # transaction makes all of that agree, so take one when the transaction is ours (decided
    # before any query, which would open one).
    own = conn.info.transaction_status == TransactionStatus.IDLE
    if own:
        materialize(conn, schema)  # committed before the snapshot below is taken
    with conn.transaction():
        if own:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        oid = _table_for_as_of(conn, schema, table)
        if catalog.table_oid(conn, target) is not None:
            raise UserError(
                f"{target} already exists; pgwarden will not overwrite it",
                hint="choose another name for --into, or drop that table yourself",
            )
        if catalog.table_oid(conn, table) is None:
            raise UserError(
                f"{table} no longer exists, so its column types are unknown",
                hint="use --format json to read its rows as of that time",
            )
        source = sql.Identifier(table.schema, table.table)
        dest = sql.Identifier(target.schema, target.table)
        # Replaying sorts every event of the table by key: give that sort memory for this
        # transaction only, instead of spilling to disk in 4 MB runs (about twice as fast).
        conn.execute(sql.SQL("SET LOCAL work_mem = {}").format(sql.Literal(AS_OF_WORK_MEM)))
        # LIKE also locks the source against schema changes until we are done.
        conn.execute(sql.SQL("CREATE TABLE {} (LIKE {})").format(dest, source))
        chosen, note = _choose_method(conn, schema, oid, table, at, method)
        if chosen == "rewind":
            query = _rewind_query(conn, schema, oid, at, source, dest)
        else:
            query = sql.SQL(
                # LATERAL, not (f(img)).*: that form calls f once per column.
                "INSERT INTO {dest} SELECT r.* FROM ({history}) h "
                "CROSS JOIN LATERAL pg_catalog.jsonb_populate_record(NULL::{src}, h.img) r"
            ).format(dest=dest, src=source, history=_as_of_query(conn, schema, oid, at, None))
        cur = conn.execute(query)
        return AsOfInto(rows=cur.rowcount, method=chosen, note=note)


def _choose_method(
    conn: Conn, schema: HistorySchema, oid: int, table: TableName, at: datetime, method: str
) -> tuple[str, str | None]:
    if method == "replay":
        return "replay", None
    row = conn.execute(
        sql.SQL(
            "SELECT {}(%s, %s), pg_catalog.current_setting('transaction_isolation'), "
            "(SELECT c.reltuples FROM pg_catalog.pg_class c WHERE c.oid = %s)"
        ).format(schema.func("rewind_blocker")),
        (oid, at, oid),
    ).fetchone()
    assert row is not None
    blocker, isolation, live_estimate = row
    if blocker is None and isolation not in ("repeatable read", "serializable"):
        blocker = "it needs a transaction of its own (one snapshot for the table and history)"
    if blocker is not None:
        if method == "rewind":
            raise UserError(
                f"cannot rewind {table} to {at.isoformat()}: {blocker}",
                hint="use --method replay, which rebuilds from history alone",
            )
        return "replay", f"replayed: {blocker}"
    if method == "rewind":
        return "rewind", None
    # Rewinding costs a copy of the table plus the events after `at`; replaying costs every
    # event up to `at`, at least one per row. Count the later events only as far as it matters.
    limit = max(int(float(str(live_estimate))), 1000)
    counted = conn.execute(
        sql.SQL(
            "SELECT pg_catalog.count(*) FROM (SELECT 1 FROM {} e "
            "WHERE e.table_oid = %s AND e.tx_at > %s LIMIT %s) later"
        ).format(schema.table("table_event")),
        (oid, at, limit + 1),
    ).fetchone()
    assert counted is not None
    if int(str(counted[0])) > limit:
        return "replay", "replayed: more rows changed since than the table holds"
    return "rewind", None


def _rewind_query(
    conn: Conn,
    schema: HistorySchema,
    oid: int,
    at: datetime,
    source: sql.Identifier,
    dest: sql.Identifier,
) -> sql.Composed:
    """One statement (one snapshot): live rows of keys unchanged since `at`, plus the rows as
    of `at` of the keys changed since (rows_before in history.sql)."""
    keys = catalog.key_columns(conn, oid)
    same_key = sql.SQL(" AND ").join(
        sql.SQL("c.{k} = s.{k}").format(k=sql.Identifier(k)) for k in keys
    )
    partitioned = conn.execute(
        "SELECT relkind = 'p' FROM pg_catalog.pg_class WHERE oid = %s", (oid,)
    ).fetchone()
    # ONLY: rows of inheritance children are not this table's (a partitioned table has none
    # of its own, so it is read whole).
    only = sql.SQL("") if partitioned and partitioned[0] else sql.SQL("ONLY ")
    return sql.SQL(
        "WITH before AS MATERIALIZED (SELECT b.k, b.img FROM {rows_before}({oid}, {at}) b), "
        "changed AS (SELECT {key_cols} FROM before b "
        "  CROSS JOIN LATERAL pg_catalog.jsonb_populate_record(NULL::{src}, b.k) kr) "
        "INSERT INTO {dest} "
        "SELECT s.* FROM {only}{src} s WHERE NOT EXISTS (SELECT 1 FROM changed c WHERE {same}) "
        "UNION ALL "
        "SELECT r.* FROM before b "
        "  CROSS JOIN LATERAL pg_catalog.jsonb_populate_record(NULL::{src}, b.img) r "
        "WHERE b.img IS NOT NULL"
    ).format(
        rows_before=schema.func("rows_before"),
        oid=sql.Literal(oid),
        at=sql.Literal(at),
        key_cols=sql.SQL(", ").join(sql.SQL("kr.{}").format(sql.Identifier(k)) for k in keys),
        src=source,
        dest=dest,
        only=only,
        same=same_key,
    )


def columns_of(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        for col in row:
            seen.setdefault(col, None)
    return list(seen)
