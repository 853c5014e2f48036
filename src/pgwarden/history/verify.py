"""`pgwarden verify`: is history complete and is tracking intact?"""

from __future__ import annotations

from dataclasses import dataclass, field

from psycopg import sql

from pgwarden.history import catalog
from pgwarden.history.catalog import CAPTURE_TRIGGERS, DEFAULT_SCHEMA, Conn, HistorySchema
materialize = lambda *a: 0  # TEMP
from pgwarden.history.names import TableName


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


def _trigger_problems(
    conn: Conn, schema: HistorySchema, table: catalog.TrackedTable
) -> list[Problem]:
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
    """Rows whose live content differs from what history says they are now."""
    tbl = sql.Identifier(table.name.schema, table.name.table)
    query = sql.SQL(
        """
        WITH live AS (
            SELECT pg_catalog.to_jsonb(t) - %(excl)s::text[] AS img FROM ONLY {tbl} t
        ), hist AS (
            SELECT img FROM {rows_as_of}(%(oid)s, 'infinity') AS r(img)
        )
        SELECT (SELECT count(*) FROM (SELECT img FROM live EXCEPT ALL SELECT img FROM hist) a),
               (SELECT count(*) FROM (SELECT img FROM hist EXCEPT ALL SELECT img FROM live) b)
        """
    ).format(tbl=tbl, rows_as_of=schema.func("rows_as_of"))
    row = conn.execute(query, {"excl": list(table.exclude_columns), "oid": table.oid}).fetchone()
    assert row is not None
    unrecorded, stale = int(row[0]), int(row[1])  # type: ignore[call-overload]
    if unrecorded == 0 and stale == 0:
        return None
    return Problem(
        str(table.name),
        "gap",
        f"{unrecorded} live row(s) differ from or are missing in history and {stale} "
        "recorded row(s) are not live: changes were made while tracking was off",
    )


def verify(
    conn: Conn, *, schema: HistorySchema = DEFAULT_SCHEMA, deep: bool = True
) -> VerifyReport:
    report = VerifyReport()
    with conn.transaction():
        if not catalog.is_installed(conn, schema):
            report.problems.append(
                Problem(None, "not-installed", f"history schema {schema.name} is not installed")
            )
            return report
        materialize(conn, schema)  # deferred statements' events are checked like the rest
        tracked = catalog.tracked_tables(conn, schema)
        report.tracked = len(tracked)
        if deep:
            count = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(schema.table("event")))
        else:  # the planner's estimate: free, but 0 until the partitions were analyzed
            count = conn.execute(
                "SELECT COALESCE(sum(GREATEST(c.reltuples, 0)), 0)::bigint "
                "FROM pg_catalog.pg_inherits i JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = %s::regclass",
                (f"{schema.name}.event",),
            )
        row = count.fetchone()
        report.events = int(str(row[0])) if row else 0
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
                ORDER BY 1, 2
                """
            ).format(rule=schema.table("rule"), tracked=schema.table("tracked")),
            (schema.name,),
        ).fetchall()
        for nsp, rel in rules:
            report.problems.append(
                Problem(
                    str(TableName(str(nsp), str(rel))),
                    "untracked",
                    "matches history.tables but is not tracked (no primary key?)",
                )
            )
        if catalog.is_superuser(conn) and not catalog.event_triggers_ok(conn):
            report.problems.append(
                Problem(None, "ddl-log", "the DDL log event triggers are missing or disabled")
            )
        stray = conn.execute(
            sql.SQL("SELECT count(*) FROM {}").format(schema.table("event_default"))
        ).fetchone()
        if stray and int(stray[0]):  # type: ignore[call-overload]
            report.problems.append(
                Problem(
                    None,
                    "partitions",
                    f"{stray[0]} event(s) fell into the default partition: "
                    "run `pgwarden retention` (it creates monthly partitions) regularly",
                )
            )
    return report
