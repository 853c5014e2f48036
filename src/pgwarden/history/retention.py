"""Removing old history: events older than history.retention go, the state at the cutoff stays.

Deleting every event older than the cutoff would lose the rows that were last written before
it (a row inserted two years ago and never changed since would vanish from `as-of now` and
from `verify`). So per row (key) the last event before the cutoff is kept unless it removed the
row, and every earlier one is deleted: history from the cutoff on replays exactly as before.
A table without a key keeps everything since its last snapshot or TRUNCATE before the cutoff.
Who-and-when rows (tx) no event refers to any more go too. It runs as the history owner, the
only role allowed to delete from the append-only history tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from psycopg import sql

from pgwarden.history import catalog
from pgwarden.history.catalog import DEFAULT_SCHEMA, Conn, HistorySchema
from pgwarden.history.layout import TableLog, key_type, table_logs, taken_sql


@dataclass(frozen=True)
class TableRetention:
    table: str
    removed: int
    kept: int


@dataclass(frozen=True)
class RetentionResult:
    cutoff: datetime
    tables: list[TableRetention] = field(default_factory=list)
    contexts_removed: int = 0

    @property
    def removed(self) -> int:
        return sum(t.removed for t in self.tables)


def _old_rows(schema: HistorySchema, log: TableLog, cutoff: datetime) -> sql.Composed:
    """ctids of events before the cutoff that the state at the cutoff does not need."""
    before = sql.SQL("h.ctx IN (SELECT x.id FROM {} x WHERE x.at < {})").format(
        schema.table("tx"), sql.Literal(cutoff)
    )
    shadow = log.table(schema)
    if log.keyless:
        return sql.SQL(
            "SELECT h.ctid FROM {shadow} h WHERE {before} AND h.stmt < "
            "(SELECT COALESCE(pg_catalog.max(r.stmt), 0) FROM {reset} r "
            " JOIN {tx} x ON x.id = r.ctx WHERE r.log_id = {log} AND x.at < {cutoff})"
        ).format(
            shadow=shadow,
            before=before,
            reset=schema.table("reset"),
            tx=schema.table("tx"),
            log=sql.Literal(log.id),
            cutoff=sql.Literal(cutoff),
        )
    taken = sql.SQL(", ").join(
        taken_sql(log, a, "h", key_type(log, a)) for a in log.key_attnums or ()
    )
    # The last event per key before the cutoff, unless it left no row there (delete,
    # truncate); an UPDATE that moved a row away also leaves no row at its old key.
    return sql.SQL(
        "SELECT h.ctid FROM {shadow} h WHERE {before} EXCEPT "
        "SELECT w.pos FROM (SELECT DISTINCT ON (k) e.pos, e.op FROM ("
        "  SELECT ROW({taken}) AS k, h.ctid AS pos, h.stmt, 1 AS prio, h.op FROM {shadow} h "
        "  WHERE {before} "
        ") e ORDER BY k, e.stmt DESC, e.prio DESC) w WHERE w.op IN ('I', 'U', 'S')"
    ).format(shadow=shadow, before=before, taken=taken)


def apply_retention(
    conn: Conn,
    keep: timedelta,
    *,
    dry_run: bool = False,
    schema: HistorySchema = DEFAULT_SCHEMA,
    now: datetime | None = None,
) -> RetentionResult:
    cutoff = (now or datetime.now(UTC)) - keep
    tables: list[TableRetention] = []
    contexts = 0
    with conn.transaction():
        if not catalog.is_installed(conn, schema):
            return RetentionResult(cutoff)
        if not dry_run:
            # The history tables are append-only except to their owner during retention.
            conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(schema.owner)))
            conn.execute("SELECT pg_catalog.set_config('pgwarden.retention', 'on', true)")
        for log in table_logs(conn, schema):
            shadow = log.table(schema)
            old = _old_rows(schema, log, cutoff)
            if dry_run:
                row = conn.execute(sql.SQL("SELECT count(*) FROM ({}) o").format(old)).fetchone()
                removed = int(str(row[0])) if row else 0
            else:
                removed = conn.execute(
                    sql.SQL("DELETE FROM {} WHERE ctid IN ({})").format(shadow, old)
                ).rowcount
            total = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(shadow)).fetchone()
            kept = int(str(total[0])) - (removed if dry_run else 0) if total else 0
            if removed:
                tables.append(TableRetention(str(log.name), removed, kept))
        if not dry_run:
            logs = table_logs(conn, schema)
            used = (
                sql.SQL(" UNION ").join(
                    sql.SQL("SELECT h.ctx FROM {} h").format(log.table(schema)) for log in logs
                )
                if logs
                else sql.SQL("SELECT NULL::bigint")
            )
            contexts = conn.execute(
                sql.SQL(
                    "DELETE FROM {tx} x WHERE x.at < %s AND x.id NOT IN ({used}) "
                    "AND x.id NOT IN (SELECT r.ctx FROM {reset} r)"
                ).format(tx=schema.table("tx"), used=used, reset=schema.table("reset")),
                (cutoff,),
            ).rowcount
            conn.execute(
                sql.SQL(
                    "DELETE FROM {s} s WHERE NOT EXISTS (SELECT 1 FROM {tx} x WHERE x.id = s.ctx)"
                ).format(s=schema.table("statement"), tx=schema.table("tx"))
            )
            conn.execute("RESET ROLE")
    return RetentionResult(cutoff, tables, contexts)
