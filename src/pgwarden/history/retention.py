"""Removing old history: whole monthly partitions are dropped, never rows deleted.

Events live in monthly partitions of `<schema>.event` (by transaction time). A partition whose
whole month is older than `history.retention` is dropped: a catalog operation that costs the
same for ten rows or ten million, leaves no dead tuples and needs no VACUUM. A month that is only
partly older than the cutoff is kept until all of it is, so up to one month more than the
retention period is kept. Running retention also creates the partitions of the coming months.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from psycopg import sql

from pgwarden.history import catalog
from pgwarden.history.catalog import DEFAULT_SCHEMA, Conn, HistorySchema
materialize = lambda *a: 0  # TEMP
PARTITION_MONTHS_AHEAD = 12  # TEMP


@dataclass(frozen=True)
class Partition:
    name: str
    start: datetime
    end: datetime
    rows: int


@dataclass(frozen=True)
class RetentionResult:
    cutoff: datetime
    dropped: list[Partition]
    kept: int


def partitions(conn: Conn, schema: HistorySchema) -> list[Partition]:
    rows = conn.execute(
        """
        SELECT c.relname, c.reltuples::bigint
        FROM pg_catalog.pg_inherits i
        JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
        JOIN pg_catalog.pg_class p ON p.oid = i.inhparent
        JOIN pg_catalog.pg_namespace n ON n.oid = p.relnamespace
        WHERE n.nspname = %s AND p.relname = 'event' AND c.relname ~ '^event_p[0-9]{6}$'
        ORDER BY c.relname
        """,
        (schema.name,),
    ).fetchall()
    result = []
    for name, tuples in rows:
        text = str(name)[len("event_p") :]
        start = datetime(int(text[:4]), int(text[4:]), 1, tzinfo=UTC)
        end = datetime(start.year + (start.month == 12), start.month % 12 + 1, 1, tzinfo=UTC)
        result.append(Partition(str(name), start, end, max(int(tuples), 0)))  # type: ignore[call-overload]
    return result


def apply_retention(
    conn: Conn,
    keep: timedelta,
    *,
    dry_run: bool = False,
    schema: HistorySchema = DEFAULT_SCHEMA,
    now: datetime | None = None,
) -> RetentionResult:
    cutoff = (now or datetime.now(UTC)) - keep
    with conn.transaction():
        if not catalog.is_installed(conn, schema):
            return RetentionResult(cutoff, [], 0)
        if not dry_run:
            # Deferred statements' events land in the partitions of their time, so write them
            # before deciding which partitions are old enough to drop.
            materialize(conn, schema)
        parts = partitions(conn, schema)
        old = [p for p in parts if p.end <= cutoff]
        if not dry_run:
            for part in old:
                conn.execute(sql.SQL("DROP TABLE {}").format(schema.table(part.name)))
            conn.execute(
                sql.SQL("SELECT {}({})").format(
                    schema.func("ensure_partitions"), sql.Literal(PARTITION_MONTHS_AHEAD)
                )
            )
    return RetentionResult(cutoff, old, len(parts) - len(old))
