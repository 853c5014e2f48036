"""Undo one transaction with compensating statements, which history records in turn.

Set-based: one statement per statement of the transaction (and table and operation), reading
the old rows straight from the history table, so a 100,000-row UPDATE is undone by one UPDATE.
Refused when rows it changed were changed again later (naming every later transaction and the
row), and when it was already reverted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from pgwarden.errors import UserError
from pgwarden.history import catalog
from pgwarden.history.actor import set_context
from pgwarden.history.catalog import DEFAULT_SCHEMA, Conn, HistorySchema
from pgwarden.history.layout import (
    TableLog,
    dump_json,
    load_json,
    table_logs,
    taken_sql,
    value_sql,
)
from pgwarden.history.read import Column, live_columns, ready

REVERT_CONTEXT = "revert of tx {}"


@dataclass(frozen=True)
class LaterChange:
    tx: int
    op: str
    at: str


@dataclass(frozen=True)
class Conflict:
    table: str
    key: Any
    later: tuple[LaterChange, ...]  # empty: changed while history was not recording

    def describe(self) -> str:
        if not self.later:
            return "changed while history was not recording (see pgwarden verify)"
        return ", ".join(f"{c.op} in tx {c.tx} at {c.at}" for c in self.later)


@dataclass(frozen=True)
class Step:
    summary: str
    rows: int  # the rows it must change; any other count rolls the revert back
    statement: sql.Composed


@dataclass
class RevertPlan:
    tx: int
    steps: list[Step] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    reverted_by: int | None = None  # the transaction that already reverted this one

    @property
    def statements(self) -> list[tuple[str, sql.Composed]]:
        return [(s.summary, s.statement) for s in self.steps]

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.steps)


@dataclass(frozen=True)
class _Statement:
    log: TableLog
    stmt: int
    op: str
    rows: int


def _contexts(conn: Conn, schema: HistorySchema, tx: int) -> list[int]:
    rows = conn.execute(
        sql.SQL("SELECT x.id FROM {} x WHERE x.tx = %s ORDER BY x.id").format(schema.table("tx")),
        (tx,),
    ).fetchall()
    return [int(str(r[0])) for r in rows]


def _reverted_by(conn: Conn, schema: HistorySchema, tx: int) -> int | None:
    """The transaction that reverted `tx`, unless that revert was itself reverted since."""
    row = conn.execute(
        sql.SQL("SELECT x.tx FROM {} x WHERE x.context = %s ORDER BY x.id DESC LIMIT 1").format(
            schema.table("tx")
        ),
        (REVERT_CONTEXT.format(tx),),
    ).fetchone()
    if row is None:
        return None
    by = int(str(row[0]))
    return None if _reverted_by(conn, schema, by) is not None else by


def _statements(
    conn: Conn, schema: HistorySchema, logs: list[TableLog], ctxs: list[int]
) -> list[_Statement]:
    found: list[_Statement] = []
    for log in logs:
        rows = conn.execute(
            sql.SQL(
                "SELECT h.stmt, h.op, count(*) FROM {} h WHERE h.ctx = ANY (%s) GROUP BY 1, 2"
            ).format(log.table(schema)),
            (ctxs,),
        ).fetchall()
        found.extend(_Statement(log, int(str(stmt)), str(op), int(str(n))) for stmt, op, n in rows)
    return sorted(found, key=lambda s: s.stmt)


def _captured(conn: Conn, log: TableLog) -> tuple[list[Column], list[Column]]:
    """(captured columns a compensation may write, key columns) of the live table."""
    assert log.oid is not None
    generated = {
        int(str(r[0]))
        for r in conn.execute(
            "SELECT attnum FROM pg_catalog.pg_attribute WHERE attrelid = %s AND attnum > 0 "
            "AND NOT attisdropped AND attgenerated <> ''",
            (log.oid,),
        ).fetchall()
    }
    columns = live_columns(conn, log.oid)
    writable = [c for c in columns if c.attnum not in generated and log.current_slot(c.attnum)]
    by_attnum = {c.attnum: c for c in columns}
    keys = [by_attnum[a] for a in log.key_attnums or () if a in by_attnum]
    return writable, keys


def _sets(columns: list[Column], source: str) -> sql.Composable:
    """`col = source.cN, …`: the captured columns set from a subquery's c0, c1, …"""
    return sql.SQL(", ").join(
        sql.SQL("{} = {}").format(sql.Identifier(c.name), sql.Identifier(source, f"c{i}"))
        for i, c in enumerate(columns)
    )


def _row_text(columns: list[Column], expr: Any) -> sql.Composable:
    return sql.SQL("ROW({})::text").format(
        sql.SQL(", ").join(expr(c) for c in columns) if columns else sql.SQL("NULL")
    )


def _conflicts(
    conn: Conn, schema: HistorySchema, log: TableLog, statements: list[_Statement], ctxs: list[int]
) -> list[Conflict]:
    """Rows this transaction left whose live content is no longer what it left, with every
    later transaction that changed them."""
    assert log.oid is not None
    columns, keys = _captured(conn, log)
    table = sql.Identifier(log.name.schema, log.name.table)
    shadow = log.table(schema)
    mine = sql.SQL("h.ctx = ANY ({})").format(sql.Literal(ctxs))
    if log.keyless:
        # Rows the transaction inserted or updated must be there, as many as it left.
        rows = conn.execute(
            sql.SQL(
                "SELECT w.t, w.n, (SELECT count(*) FROM ONLY {table} s WHERE {live} = w.t) "
                "FROM (SELECT {new} AS t, count(*) AS n FROM {shadow} h "
                "      WHERE {mine} AND h.op IN ('I', 'U') GROUP BY 1) w"
            ).format(
                table=table,
                live=_row_text(columns, lambda c: sql.Identifier("s", c.name)),
                new=_row_text(columns, lambda c: value_sql(log, "n", c.attnum, "h", c.type)),
                shadow=shadow,
                mine=mine,
            )
        ).fetchall()
        return [
            Conflict(str(log.name), str(t), ())
            for t, n, live in rows
            if int(str(live)) < int(str(n))
        ]
    k_names = [sql.Identifier(f"k{i}") for i in range(len(keys))]

    def keyed(side: str) -> sql.Composable:
        return sql.SQL(", ").join(
            sql.SQL("{} AS {}").format(value_sql(log, side, c.attnum, "h", c.type), k)
            for c, k in zip(keys, k_names, strict=True)
        )

    taken = sql.SQL(", ").join(
        sql.SQL("{} AS {}").format(taken_sql(log, c.attnum, "h", c.type), k)
        for c, k in zip(keys, k_names, strict=True)
    )
    new_image = _row_text(columns, lambda c: value_sql(log, "n", c.attnum, "h", c.type))
    old_key = sql.SQL(", ").join(value_sql(log, "o", c.attnum, "h", c.type) for c in keys)
    new_key = sql.SQL(", ").join(value_sql(log, "n", c.attnum, "h", c.type) for c in keys)
    rows = conn.execute(
        sql.SQL(
            "SELECT pg_catalog.json_build_object({pairs})::text, f.last FROM ("
            "  SELECT DISTINCT ON ({ks}) e.*, pg_catalog.max(e.stmt) OVER () AS last FROM ("
            "    SELECT {taken}, h.stmt, 1 AS prio, "
            "           CASE WHEN h.op IN ('I', 'U') THEN {new_image} END AS img "
            "    FROM {shadow} h WHERE {mine} "
            "    UNION ALL "
            "    SELECT {vacated}, h.stmt, 0 AS prio, NULL FROM {shadow} h WHERE {mine} "
            "    AND h.op = 'U' AND ROW({old_key}) IS DISTINCT FROM ROW({new_key})"
            "  ) e ORDER BY {ks}, e.stmt DESC, e.prio DESC"
            ") f WHERE f.img IS DISTINCT FROM "
            "  (SELECT {live} FROM ONLY {table} s WHERE {same})"
        ).format(
            pairs=sql.SQL(", ").join(
                sql.SQL("{}, f.{}").format(sql.Literal(c.name), k)
                for c, k in zip(keys, k_names, strict=True)
            ),
            ks=sql.SQL(", ").join(sql.SQL("e.{}").format(k) for k in k_names),
            taken=taken,
            new_image=new_image,
            shadow=shadow,
            mine=mine,
            vacated=keyed("o"),
            old_key=old_key,
            new_key=new_key,
            live=_row_text(columns, lambda c: sql.Identifier("s", c.name)),
            table=table,
            same=sql.SQL(" AND ").join(
                sql.SQL("s.{} = f.{}").format(sql.Identifier(c.name), k)
                for c, k in zip(keys, k_names, strict=True)
            ),
        )
    ).fetchall()
    conflicts = []
    for key_text, last in rows:
        key = load_json(str(key_text))
        later = conn.execute(
            sql.SQL(
                "SELECT DISTINCT ON (x.tx) x.tx, h.op, x.at::text, h.stmt FROM {shadow} h "
                "JOIN {tx} x ON x.id = h.ctx WHERE h.stmt > %s AND NOT ({mine}) AND "
                "(({taken_key}) = ({values}) OR (h.op = 'U' AND ({old_key}) = ({values}))) "
                "ORDER BY x.tx, h.stmt"
            ).format(
                shadow=shadow,
                tx=schema.table("tx"),
                mine=mine,
                taken_key=sql.SQL(", ").join(taken_sql(log, c.attnum, "h", c.type) for c in keys),
                old_key=old_key,
                values=sql.SQL(", ").join(
                    sql.SQL("{}::{}").format(sql.Literal(_plain(key[c.name])), sql.SQL(c.type))
                    for c in keys
                ),
            ),
            (int(str(last)),),
        ).fetchall()
        # In the order they happened (each transaction once, at its first change of the row).
        changes = sorted(
            ((LaterChange(int(str(t)), _OPS.get(str(op), str(op)), str(at)), int(str(s)))
             for t, op, at, s in later),
            key=lambda pair: pair[1],
        )  # fmt: skip
        conflicts.append(Conflict(str(log.name), key, tuple(c for c, _ in changes)))
    return conflicts


_OPS = {"I": "INSERT", "U": "UPDATE", "D": "DELETE", "T": "TRUNCATE", "X": "TRUNCATE"}


def _plain(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _compensation(conn: Conn, schema: HistorySchema, s: _Statement) -> Step | None:
    log = s.log
    assert log.oid is not None
    columns, keys = _captured(conn, log)
    table = sql.Identifier(log.name.schema, log.name.table)

    def source(select: sql.Composable) -> sql.Composed:
        """The statement's rows in the history table, as a subquery."""
        return sql.SQL("(SELECT {} FROM {} h WHERE h.stmt = {} AND h.op = {})").format(
            select, log.table(schema), sql.Literal(s.stmt), sql.Literal(s.op)
        )

    names = sql.SQL(", ").join(sql.Identifier(c.name) for c in columns)

    def vals(side: str) -> sql.Composable:
        return sql.SQL(", ").join(
            sql.SQL("{} AS {}").format(
                value_sql(log, side, c.attnum, "h", c.type), sql.Identifier(f"c{i}")
            )
            for i, c in enumerate(columns)
        )

    label = f"{log.name}: {s.rows} row{'s' if s.rows != 1 else ''}"
    if s.op == "S":
        return None  # a snapshot records state, not a change
    if s.op == "X":
        raise UserError(
            f"cannot revert the TRUNCATE of {log.name}: it was recorded as a marker only",
            hint="set history.overrides.<table>.truncate: rows to record removed rows",
        )
    if s.op in ("D", "T"):
        return Step(
            f"re-insert {label} ({'deleted' if s.op == 'D' else 'truncated'})",
            s.rows,
            sql.SQL(
                "INSERT INTO {t} ({names}) OVERRIDING SYSTEM VALUE SELECT {outs} FROM {src} m"
            ).format(
                t=table,
                names=names,
                outs=sql.SQL(", ").join(sql.Identifier("m", f"c{i}") for i in range(len(columns))),
                src=source(vals("o")),
            ),
        )
    if log.keyless:
        # Rows are matched by their whole content, one live row per recorded row.
        live_text = _row_text(columns, lambda c: sql.Identifier("s", c.name))
        new_text = _row_text(columns, lambda c: value_sql(log, "n", c.attnum, "h", c.type))
        paired = sql.SQL(
            "(SELECT v.ctid, m.* FROM (SELECT s.ctid, {live} AS t, pg_catalog.row_number() OVER "
            "(PARTITION BY {live}) AS rn FROM ONLY {t} s) v "
            "JOIN (SELECT x.*, pg_catalog.row_number() "
            "OVER (PARTITION BY x.t) AS rn FROM {src} x) m ON m.t = v.t AND m.rn = v.rn)"
        ).format(
            live=live_text,
            t=table,
            src=source(sql.SQL("{} AS t, {}").format(new_text, vals("o"))),
        )
        if s.op == "I":
            return Step(
                f"delete {label} (inserted)",
                s.rows,
                sql.SQL(
                    "DELETE FROM ONLY {t} WHERE ctid IN (SELECT p.ctid FROM {paired} p)"
                ).format(t=table, paired=paired),
            )
        return Step(
            f"restore {label} (updated)",
            s.rows,
            sql.SQL("UPDATE ONLY {t} SET {sets} FROM {paired} p WHERE {t}.ctid = p.ctid").format(
                t=table, sets=_sets(columns, "p"), paired=paired
            ),
        )
    k_names = [sql.Identifier(f"k{i}") for i in range(len(keys))]
    new_keys = sql.SQL(", ").join(
        sql.SQL("{} AS {}").format(value_sql(log, "n", c.attnum, "h", c.type), k)
        for c, k in zip(keys, k_names, strict=True)
    )
    same = sql.SQL(" AND ").join(
        sql.SQL("{t}.{c} = m.{k}").format(t=table, c=sql.Identifier(c.name), k=k)
        for c, k in zip(keys, k_names, strict=True)
    )
    if s.op == "I":
        return Step(
            f"delete {label} (inserted)",
            s.rows,
            sql.SQL("DELETE FROM {t} USING {src} m WHERE {same}").format(
                t=table, src=source(new_keys), same=same
            ),
        )
    # One UPDATE for the whole statement matches every row by its key before any of them
    # moves: row by row, a key shift (7→4, 4→1) would pass through two rows holding one key.
    return Step(
        f"restore {label} (updated)",
        s.rows,
        sql.SQL("UPDATE {t} SET {sets} FROM {src} m WHERE {same}").format(
            t=table,
            sets=_sets(columns, "m"),
            src=source(sql.SQL("{}, {}").format(new_keys, vals("o"))),
            same=same,
        ),
    )


def plan_revert(conn: Conn, tx: int, *, schema: HistorySchema = DEFAULT_SCHEMA) -> RevertPlan:
    with conn.transaction():
        ready(conn, schema)
        ctxs = _contexts(conn, schema, tx)
        if not ctxs:
            raise UserError(
                f"no history for transaction {tx}",
                hint="`pgwarden history` lists transactions (tx) and their changes",
            )
        plan = RevertPlan(tx=tx, reverted_by=_reverted_by(conn, schema, tx))
        statements = _statements(conn, schema, table_logs(conn, schema), ctxs)
        if not statements:
            raise UserError(f"transaction {tx} changed no tracked row")
        if plan.reverted_by is not None:
            return plan
        by_log: dict[int, list[_Statement]] = {}
        for s in statements:
            if s.log.oid is None:
                raise UserError(f"cannot revert: {s.log.name} no longer exists")
            by_log.setdefault(s.log.id, []).append(s)
        tracked = {t.oid: t for t in catalog.tracked_tables(conn, schema)}
        for group in by_log.values():
            plan.conflicts.extend(_conflicts(conn, schema, group[0].log, group, ctxs))
        for s in reversed(statements):
            step = _compensation(conn, schema, s)
            if step is not None:
                plan.steps.append(step)
            t = tracked.get(s.log.oid) if s.log.oid is not None else None
            if t and t.exclude_columns and s.op in ("D", "T"):
                plan.warnings.append(
                    f"{s.log.name}: excluded columns ({', '.join(t.exclude_columns)}) were never "
                    "recorded; re-inserted rows get their defaults"
                )
    plan.warnings = sorted(set(plan.warnings))
    return plan


def revert(
    conn: Conn,
    tx: int,
    *,
    dry_run: bool = False,
    schema: HistorySchema = DEFAULT_SCHEMA,
    progress: Callable[[int, int, str], None] | None = None,
) -> RevertPlan:
    """Undo transaction `tx`. Refuses (UserError) when later changes conflict, naming them, and
    when `tx` was already reverted; changes nothing then. `progress(rows_done, rows_total,
    step_summary)` is called before each step and after the last: a bulk revert is a few long
    set-based statements, so a step is the granularity there is."""
    plan = plan_revert(conn, tx, schema=schema)
    if plan.reverted_by is not None:
        raise UserError(
            f"transaction {tx} was already reverted, by transaction {plan.reverted_by}; "
            "nothing to do",
            hint=f"`pgwarden revert {plan.reverted_by}` undoes that revert",
        )
    if plan.conflicts:
        lines = [f"  {c.table} {_key_text(c.key)}: {c.describe()}" for c in plan.conflicts[:20]]
        more = f"\n  … and {len(plan.conflicts) - 20} more" if len(plan.conflicts) > 20 else ""
        later = sorted({c.tx for conflict in plan.conflicts for c in conflict.later}, reverse=True)
        hint = (
            f"revert the later transactions first, newest first ({', '.join(map(str, later))}), "
            "or change these rows back by hand"
            if later
            else "change these rows back by hand, then revert"
        )
        raise UserError(
            f"cannot revert transaction {tx}: rows it changed were changed again later:\n"
            + "\n".join(lines)
            + more,
            hint=hint,
        )
    if dry_run:
        return plan
    with conn.transaction():
        set_context(conn, REVERT_CONTEXT.format(tx))
        # Undoing a multi-row key shift passes through transient duplicates; keys declared
        # DEFERRABLE are then checked at commit, as the original statement was.
        conn.execute("SET CONSTRAINTS ALL DEFERRED")
        rows_done = 0
        for step in plan.steps:
            if progress is not None:
                progress(rows_done, plan.rows, step.summary)
            try:
                done = conn.execute(step.statement).rowcount
            except psycopg.errors.IntegrityError as exc:
                raise UserError(
                    f"cannot revert transaction {tx}: {step.summary}: {exc.diag.message_primary}",
                    hint="a constraint refuses the old rows now; nothing was changed",
                ) from None
            if done != step.rows:
                raise UserError(
                    f"cannot revert transaction {tx}: {step.summary} changed {done} rows, "
                    f"not {step.rows}; nothing was changed",
                    hint="the rows changed while the revert was being planned: try again",
                )
            rows_done += done
        if progress is not None:
            progress(rows_done, plan.rows, "committing")
    return plan


def _key_text(key: Any) -> str:
    return dump_json(key) if isinstance(key, dict) else str(key)
