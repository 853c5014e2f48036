"""`pgwarden verify`: is history complete and is tracking intact?"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from psycopg import sql

from pgwarden.history import catalog, native, wal, walstate
from pgwarden.history.catalog import CAPTURE_TRIGGERS, DEFAULT_SCHEMA, Conn, HistorySchema
from pgwarden.history.layout import table_logs, value_sql
from pgwarden.history.names import TableName
from pgwarden.history.read import live_columns
from pgwarden.history.replay import replay_sql


@dataclass(frozen=True)
class Problem:
    table: str | None
    kind: str  # missing-trigger, disabled-trigger, capture-failures, gap, untracked, ddl-log, …
    detail: str


@dataclass
class VerifyReport:
    tracked: int = 0
    events: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


_TRIGGER_STATE = {"O": "enabled (not ALWAYS: session_replication_role=replica skips it)",
                  "D": "disabled", "R": "enabled only for replicas"}  # fmt: skip


_WAL_STATE = {
    "missing": "wal-capture-off",
    "disabled": "wal-capture-partial",
    "stale": "stale-trigger",
}
_WAL_DETAIL = {
    "missing": "captured from the WAL, but it is not in the publication or the replication "
    "slot is gone: its changes are not recorded; run `pgwarden apply`",
    "disabled": "captured from the WAL, but its REPLICA IDENTITY is not FULL: the WAL lacks "
    "complete before-images; run `pgwarden apply`",
    "stale": "captured from the WAL, but capture triggers are left on it: run `pgwarden apply`",
}


def _trigger_problems(
    conn: Conn, schema: HistorySchema, table: catalog.TrackedTable
) -> list[Problem]:
    if table.capture == "wal":
        row = conn.execute(
            sql.SQL("SELECT {}(%s)").format(schema.func("trigger_state")), (table.oid,)
        ).fetchone()
        wal_state = str(row[0]) if row else "missing"
        if wal_state == "ok":
            return []
        return [Problem(str(table.name), _WAL_STATE[wal_state], _WAL_DETAIL[wal_state])]
    rows = conn.execute(
        "SELECT tgname, tgenabled FROM pg_catalog.pg_trigger "
        "WHERE tgrelid = %s AND tgname = ANY (%s)",
        (table.oid, list(CAPTURE_TRIGGERS)),
    ).fetchall()
    present = {str(name): str(state) for name, state in rows}
    problems = []
    stale = conn.execute(
        sql.SQL("SELECT {}(%s)").format(schema.func("trigger_state")), (table.oid,)
    ).fetchone()
    if stale and stale[0] == "stale":
        problems.append(
            Problem(
                str(table.name),
                "stale-trigger",
                "capture triggers carry outdated settings or key columns: run `pgwarden apply`",
            )
        )
    for trigger in CAPTURE_TRIGGERS:
        state = present.get(trigger)
        if state is None:
            problems.append(Problem(str(table.name), "missing-trigger", f"{trigger} is missing"))
        elif state != "A":
            problems.append(
                Problem(
                    str(table.name),
                    "disabled-trigger",
                    f"{trigger} is {_TRIGGER_STATE.get(state, state)}",
                )
            )
    return problems


def _gap(conn: Conn, schema: HistorySchema, table: catalog.TrackedTable) -> Problem | None:
    """Rows whose live content differs from what history says they are now (compared as
    text, so that every type compares, and duplicates count)."""
    logs = table_logs(conn, schema, oid=table.oid)
    if not logs:
        return Problem(str(table.name), "gap", "tracked, but it has no history table")
    log = logs[0]
    columns = [c for c in live_columns(conn, table.oid) if log.current_slot(c.attnum)]
    tbl = sql.Identifier(table.name.schema, table.name.table)
    partitioned = conn.execute(
        "SELECT relkind = 'p' FROM pg_catalog.pg_class WHERE oid = %s", (table.oid,)
    ).fetchone()
    only = sql.SQL("") if partitioned and partitioned[0] else sql.SQL("ONLY ")
    replayed = replay_sql(
        schema,
        log,
        datetime.max.replace(tzinfo=UTC),
        [(c.name, _value(log, c)) for c in columns],
    )
    names = (
        sql.SQL(", ").join(sql.Identifier(c.name) for c in columns) if columns else sql.SQL("NULL")
    )
    query = sql.SQL(
        """
        WITH live AS (SELECT ROW({names})::text AS t FROM {only}{tbl}),
             hist AS (SELECT ROW({names})::text AS t FROM ({replayed}) r)
        SELECT (SELECT count(*) FROM (SELECT t FROM live EXCEPT ALL SELECT t FROM hist) a),
               (SELECT count(*) FROM (SELECT t FROM hist EXCEPT ALL SELECT t FROM live) b)
        """
    ).format(names=names, only=only, tbl=tbl, replayed=replayed)
    row = conn.execute(query).fetchone()
    assert row is not None
    unrecorded, stale = int(str(row[0])), int(str(row[1]))
    if unrecorded == 0 and stale == 0:
        return None
    return Problem(
        str(table.name),
        "gap",
        f"{unrecorded} live row(s) differ from or are missing in history and {stale} "
        "recorded row(s) are not live: changes were made while tracking was off",
    )


def _value(log: Any, column: Any) -> Any:
    return lambda side: value_sql(log, side, column.attnum, "h", column.type)


def _engine_problem(conn: Conn, schema: HistorySchema) -> Problem | None:
    """The compiled trigger in use, but its library gone (pgwarden moved or uninstalled):
    every write to a tracked table would fail."""
    path = native.installed_library(conn, schema)
    if path is None or catalog.meta(conn, schema).get("engine") != "c":
        return None
    row = (
        conn.execute("SELECT (pg_catalog.pg_stat_file(%s, true)).size IS NULL", (path,)).fetchone()
        if catalog.is_superuser(conn)
        else None
    )
    if row and row[0]:
        return Problem(
            None,
            "capture-engine",
            f"the compiled capture trigger {path} is gone: writes to tracked tables fail "
            "until `pgwarden apply` points capture at this installation's library or at PL/pgSQL",
        )
    return None


def _wal_problems(conn: Conn, schema: HistorySchema) -> list[Problem]:
    """WAL capture: the slot is there and usable, and no stretch of WAL was lost to history."""
    setup = wal.setup(conn, schema)
    if setup is None:
        return []
    problems = []
    row = conn.execute(
        "SELECT wal_status FROM pg_catalog.pg_replication_slots WHERE slot_name = %s",
        (setup.slot,),
    ).fetchone()
    if row is not None and row[0] == "lost":
        problems.append(
            Problem(
                None,
                "wal-slot-lost",
                f"the replication slot {setup.slot} was invalidated (max_slot_wal_keep_size): "
                "changes since it fell behind are not in history",
            )
        )
    gaps = conn.execute(
        sql.SQL("SELECT from_lsn::text, to_lsn::text, at::text, reason FROM {} ORDER BY id").format(
            schema.table("wal_gap")
        )
    ).fetchall()
    for start, end, at, reason in gaps:
        problems.append(
            Problem(None, "wal-gap", f"no history from WAL {start} to {end} ({reason}, at {at})")
        )
    return problems


def verify(
    conn: Conn, *, schema: HistorySchema = DEFAULT_SCHEMA, deep: bool = True
) -> VerifyReport:
    report = VerifyReport()
    if catalog.is_installed(conn, schema):
        # Measured before this check catches up (which hides it): the slot holding more WAL
        # than history.wal_lag_alarm means nothing has been consuming it.
        behind = walstate.lag(conn, schema)
        if behind is not None and behind.alarming:
            report.problems.append(Problem(None, "wal-lag", behind.warning()))
        wal.catch_up(conn, schema)
    with conn.transaction():
        if not catalog.is_installed(conn, schema):
            detail = (
                f"history in schema {schema.name} is from an older pgwarden: run `pgwarden apply`"
                if catalog.has_meta(conn, schema)
                else f"history schema {schema.name} is not installed"
            )
            report.problems.append(Problem(None, "not-installed", detail))
            return report
        tracked = catalog.tracked_tables(conn, schema)
        report.tracked = len(tracked)
        shadows = [log.table(schema) for log in table_logs(conn, schema)]
        if not shadows:
            report.events = 0
        elif deep:
            row = conn.execute(
                sql.SQL("SELECT {}").format(
                    sql.SQL(" + ").join(
                        sql.SQL("(SELECT count(*) FROM {})").format(t) for t in shadows
                    )
                )
            ).fetchone()
            report.events = int(str(row[0])) if row else 0
        else:  # the planner's estimate: free, but 0 until the tables were analyzed
            row = conn.execute(
                "SELECT COALESCE(sum(GREATEST(c.reltuples, 0)), 0)::bigint "
                "FROM pg_catalog.pg_class c "
                "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = %s AND c.relname ~ '^rows_[0-9]+$' AND c.relkind = 'r'",
                (schema.name,),
            ).fetchone()
            report.events = int(str(row[0])) if row else 0
        engine = _engine_problem(conn, schema)
        if engine:
            report.problems.append(engine)
        for table in tracked:
            report.problems.extend(_trigger_problems(conn, schema, table))
            if deep:
                gap = _gap(conn, schema, table)
                if gap:
                    report.problems.append(gap)
        failures = conn.execute(
            sql.SQL(
                "SELECT schema_name, table_name, count(*), max(at)::text, "
                "(array_agg(message ORDER BY id DESC))[1] FROM {} GROUP BY 1, 2 ORDER BY 1, 2"
            ).format(schema.table("capture_failure"))
        ).fetchall()
        for nsp, rel, n, last, message in failures:
            report.problems.append(
                Problem(
                    str(TableName(str(nsp), str(rel))),
                    "capture-failures",
                    f"{n} statement(s) in fail-open mode were not recorded "
                    f"(last at {last}: {message})",
                )
            )
        rules = conn.execute(
            sql.SQL(
                """
                SELECT n.nspname, c.relname FROM pg_catalog.pg_class c
                JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND n.nspname <> %s
                  AND EXISTS (SELECT 1 FROM {rule} r
                              WHERE n.nspname ~ r.schema_regex AND c.relname ~ r.table_regex)
                  AND NOT EXISTS (SELECT 1 FROM {tracked} t WHERE t.table_oid = c.oid)
                  AND NOT pg_catalog.starts_with(
                      COALESCE(pg_catalog.obj_description(c.oid, 'pg_class'), ''), %s)
                ORDER BY 1, 2
                """
            ).format(rule=schema.table("rule"), tracked=schema.table("tracked")),
            (schema.name, catalog.AS_OF_COPY),
        ).fetchall()
        for nsp, rel in rules:
            report.problems.append(
                Problem(
                    str(TableName(str(nsp), str(rel))),
                    "untracked",
                    "matches history.tables but is not tracked (created before the pattern, or "
                    "while the DDL event trigger was missing): run `pgwarden apply`",
                )
            )
        report.problems.extend(_wal_problems(conn, schema))
        if catalog.is_superuser(conn) and not catalog.event_triggers_ok(conn):
            report.problems.append(
                Problem(None, "ddl-log", "the DDL log event triggers are missing or disabled")
            )
    return report
