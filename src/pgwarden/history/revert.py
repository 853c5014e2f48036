"""Undo one transaction with compensating statements, which history records in turn."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from psycopg import sql

from pgwarden.errors import UserError
from pgwarden.history import catalog
from pgwarden.history.catalog import DEFAULT_SCHEMA, Conn, HistorySchema
from pgwarden.history.names import TableName, parse_table
from pgwarden.history.read import Event, EventFilter, events


@dataclass(frozen=True)
class Conflict:
    table: str
    key: Any
    later_tx: int
    later_op: str
    at: str


@dataclass
class RevertPlan:
    tx: int
    statements: list[tuple[str, sql.Composed]] = field(default_factory=list)  # (summary, SQL)
    conflicts: list[Conflict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _old_key(event: Event) -> Any:
    if not event.key or not event.old:
        return event.key
    return {col: event.old.get(col) for col in event.key}


def _final_states(evs: list[Event]) -> dict[tuple[str, str], Any]:
    """(table, key) → the row image the transaction left (None: it left no row there)."""
    state: dict[tuple[str, str], Any] = {}
    statements: dict[int, list[Event]] = {}
    for e in evs:
        statements.setdefault(e.stmt_id, []).append(e)
    for stmt_id in sorted(statements):
        group = statements[stmt_id]
        # Inside one statement a key being vacated comes before it being taken (key shifts).
        for e in group:
            old_key = _old_key(e)
            if e.op == "UPDATE" and old_key != e.key:
                state[(e.table, json.dumps(old_key, sort_keys=True))] = None
        for e in group:
            if e.key is not None:
                image = None if e.op in ("DELETE", "TRUNCATE") else e.new
                state[(e.table, json.dumps(e.key, sort_keys=True))] = image
    return state


def _conflicts(conn: Conn, schema: HistorySchema, tx: int, evs: list[Event]) -> list[Conflict]:
    """Rows this transaction touched whose live content is no longer what it left: reverting
    them would overwrite later work. Later changes that were themselves undone are fine."""
    tracked = {str(t.name): t for t in catalog.tracked_tables(conn, schema)}
    found: list[Conflict] = []
    last = max((e.stmt_id, e.id) for e in evs)
    for (table, key_text), image in _final_states(evs).items():
        name = TableName(*_split(table))
        if catalog.table_oid(conn, name) is None:
            continue  # reported by _compensate
        excluded = list(tracked[table].exclude_columns) if table in tracked else []
        tbl = sql.Identifier(name.schema, name.table)
        row = conn.execute(
            sql.SQL("SELECT pg_catalog.to_jsonb(t) - %s::text[] FROM {tbl} t WHERE {match}").format(
                tbl=tbl, match=_key_match(tbl, json.loads(key_text))
            ),
            (excluded,),
        ).fetchone()
        live = row[0] if row else None
        if live == image:
            continue
        later = conn.execute(
            sql.SQL(
                "SELECT e.tx, e.op, e.tx_at::text FROM {} e "
                "WHERE e.schema_name = %s AND e.table_name = %s AND (e.stmt_id, e.id) > (%s, %s) "
                "AND e.tx <> %s ORDER BY e.stmt_id DESC, e.id DESC LIMIT 1"
            ).format(schema.table("event")),
            (name.schema, name.table, *last, tx),
        ).fetchone()
        if later:
            tx_later, op, at = (str(v) for v in later)
            found.append(Conflict(table, json.loads(key_text), int(tx_later), op, at))
        else:
            found.append(Conflict(table, json.loads(key_text), 0, "unrecorded change", "?"))
    return found


def _split(table: str) -> tuple[str, str]:
    name = parse_table(table)
    return name.schema, name.table


def _generated_columns(conn: Conn, name: TableName) -> set[str]:
    rows = conn.execute(
        "SELECT a.attname FROM pg_catalog.pg_attribute a "
        "JOIN pg_catalog.pg_class c ON c.oid = a.attrelid "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped "
        "AND a.attgenerated <> ''",
        (name.schema, name.table),
    ).fetchall()
    return {str(r[0]) for r in rows}


def _key_match(tbl: sql.Identifier, key: dict[str, Any]) -> sql.Composed:
    cols = sorted(key)
    return sql.SQL(
        "({cols}) = (SELECT {rcols} "
        "FROM pg_catalog.jsonb_populate_record(NULL::{tbl}, {key}::jsonb) r)"
    ).format(
        cols=sql.SQL(", ").join(sql.Identifier(c) for c in cols),
        rcols=sql.SQL(", ").join(sql.Identifier("r", c) for c in cols),
        tbl=tbl,
        key=sql.Literal(json.dumps(key)),
    )


def _columns(cols: list[str]) -> dict[str, sql.Composed]:
    """`cols` as a column list and as the same columns of the populated record `r`."""
    return {
        "cols": sql.SQL(", ").join(sql.Identifier(c) for c in cols),
        "rcols": sql.SQL(", ").join(sql.Identifier("r", c) for c in cols),
    }


def _compensate(conn: Conn, e: Event, plan: RevertPlan) -> None:
    name = TableName(*_split(e.table))
    if catalog.table_oid(conn, name) is None:
        raise UserError(f"cannot revert: {name} no longer exists")
    tbl = sql.Identifier(name.schema, name.table)
    generated = _generated_columns(conn, name)
    if e.op == "INSERT":
        plan.statements.append(
            (
                f"delete {e.table} {e.key} (inserted)",
                sql.SQL("DELETE FROM {} WHERE {}").format(tbl, _key_match(tbl, e.key)),
            )
        )
    elif e.op == "UPDATE":
        changed = [
            c
            for c in (e.old or {})
            if (e.old or {}).get(c) != (e.new or {}).get(c) and c not in generated
        ]
        if not changed:
            return
        plan.statements.append(
            (
                f"restore {e.table} {_old_key(e)} ({', '.join(sorted(changed))})",
                sql.SQL(
                    "UPDATE {tbl} SET ({cols}) = (SELECT {rcols} "
                    "FROM pg_catalog.jsonb_populate_record(NULL::{tbl}, {old}::jsonb) r) "
                    "WHERE {match}"
                ).format(
                    tbl=tbl,
                    **_columns(sorted(changed)),
                    old=sql.Literal(json.dumps(e.old)),
                    match=_key_match(tbl, e.key),
                ),
            )
        )
    elif e.op in ("DELETE", "TRUNCATE"):
        if e.old is None:
            raise UserError(
                f"cannot revert the TRUNCATE of {e.table}: it was recorded as a marker only",
                hint="set history.overrides.<table>.truncate: rows to record removed rows",
            )
        cols = [c for c in e.old if c not in generated]
        plan.statements.append(
            (
                f"re-insert {e.table} {e.key} ({e.op.lower()}d)",
                sql.SQL(
                    "INSERT INTO {tbl} ({cols}) OVERRIDING SYSTEM VALUE SELECT {rcols} "
                    "FROM pg_catalog.jsonb_populate_record(NULL::{tbl}, {old}::jsonb) r"
                ).format(
                    tbl=tbl,
                    **_columns(cols),
                    old=sql.Literal(json.dumps(e.old)),
                ),
            )
        )
    # SNAPSHOT events record state, not a change: nothing to undo.


def _groups(evs: list[Event]) -> list[list[Event]]:
    """The key-moving UPDATE events of one statement on one table form one group (undone by
    one statement, placed where the first of them comes); every other event is a group of its
    own. A row the statement did not move never shares a key with a moved one, before or
    after, so its own undo can come before or after the group."""
    moved: dict[tuple[int, str], list[Event]] = {}
    for e in evs:
        if e.op == "UPDATE" and _old_key(e) != e.key:
            moved.setdefault((e.stmt_id, e.table), []).append(e)
    moved_ids = {e.id for group in moved.values() for e in group}
    groups: list[list[Event]] = []
    for e in evs:
        if e.id not in moved_ids:
            groups.append([e])
        elif e.id == moved[(e.stmt_id, e.table)][0].id:
            groups.append(moved[(e.stmt_id, e.table)])
    return groups


def _compensate_updates(conn: Conn, group: list[Event], plan: RevertPlan) -> None:
    """Undo the rows of one key-moving UPDATE statement in one UPDATE. Row by row, a key shift
    (7→4, 4→1) passes through two rows holding one key, and the next row's `WHERE id = 4` then
    matches both; one statement matches every row by its key before any of them moves."""
    first = group[0]
    name = TableName(*_split(first.table))
    if catalog.table_oid(conn, name) is None:
        raise UserError(f"cannot revert: {name} no longer exists")
    tbl = sql.Identifier(name.schema, name.table)
    generated = _generated_columns(conn, name)
    changed = sorted(
        {
            c
            for e in group
            for c in (e.old or {})
            if (e.old or {}).get(c) != (e.new or {}).get(c) and c not in generated
        }
    )
    keys = sorted(first.key or {})
    rows = json.dumps([{"key": e.key, "old": e.old} for e in group])
    plan.statements.append(
        (
            f"restore {first.table}: {len(group)} rows moved by one statement "
            f"({', '.join(changed)})",
            sql.SQL(
                "UPDATE {tbl} t SET ({cols}) = (SELECT {rcols} "
                "FROM pg_catalog.jsonb_populate_record(NULL::{tbl}, m.old) r) "
                "FROM (SELECT x.value -> 'old' AS old, {mkeys} "
                "      FROM pg_catalog.jsonb_array_elements({rows}::jsonb) x "
                "      CROSS JOIN LATERAL pg_catalog.jsonb_populate_record("
                "          NULL::{tbl}, x.value -> 'key') k) m "
                "WHERE ({tkeys}) = ({mcols})"
            ).format(
                tbl=tbl,
                **_columns(changed),
                mkeys=sql.SQL(", ").join(
                    sql.SQL("k.{} AS {}").format(sql.Identifier(c), sql.Identifier(f"key_{i}"))
                    for i, c in enumerate(keys)
                ),
                rows=sql.Literal(rows),
                tkeys=sql.SQL(", ").join(sql.Identifier("t", c) for c in keys),
                mcols=sql.SQL(", ").join(sql.Identifier("m", f"key_{i}") for i in range(len(keys))),
            ),
        )
    )


def plan_revert(conn: Conn, tx: int, *, schema: HistorySchema = DEFAULT_SCHEMA) -> RevertPlan:
    with conn.transaction():
        evs = list(events(conn, EventFilter(tx=tx), schema=schema))
    if not evs:
        raise UserError(
            f"no history for transaction {tx}", hint="`pgwarden history --tx N` lists its events"
        )
    plan = RevertPlan(tx=tx)
    plan.conflicts = _conflicts(conn, schema, tx, evs)
    tracked = {str(t.name): t for t in catalog.tracked_tables(conn, schema)}
    for group in _groups(list(reversed(evs))):
        if len(group) > 1:
            _compensate_updates(conn, group, plan)
            continue
        e = group[0]
        _compensate(conn, e, plan)
        t = tracked.get(e.table)
        if t and t.exclude_columns and e.op in ("DELETE", "TRUNCATE"):
            plan.warnings.append(
                f"{e.table}: excluded columns ({', '.join(t.exclude_columns)}) were never "
                "recorded; re-inserted rows get their defaults"
            )
    plan.warnings = sorted(set(plan.warnings))
    return plan


def revert(
    conn: Conn, tx: int, *, dry_run: bool = False, schema: HistorySchema = DEFAULT_SCHEMA
) -> RevertPlan:
    """Undo transaction `tx`. Refuses (UserError listing them) when later changes conflict."""
    plan = plan_revert(conn, tx, schema=schema)
    if plan.conflicts:
        lines = [
            f"  {c.table} {json.dumps(c.key)}: {c.later_op} in tx {c.later_tx} at {c.at}"
            for c in plan.conflicts[:20]
        ]
        more = f"\n  … and {len(plan.conflicts) - 20} more" if len(plan.conflicts) > 20 else ""
        raise UserError(
            f"cannot revert transaction {tx}: rows it changed were changed again later:\n"
            + "\n".join(lines)
            + more,
            hint="revert the later transactions first (newest first)",
        )
    if dry_run:
        return plan
    with conn.transaction():
        conn.execute(
            "SELECT pg_catalog.set_config('pgwarden.context', %s, true)", (f"revert of tx {tx}",)
        )
        # Undoing a multi-row key shift row by row passes through transient duplicates; keys
        # declared DEFERRABLE are then checked at commit, as the original statement was.
        conn.execute("SET CONSTRAINTS ALL DEFERRED")
        for _summary, statement in plan.statements:
            conn.execute(statement)
    return plan
