"""Rebuilding a table from its history alone: the rows as of a time, or just before a
statement (the WAL consumer's TRUNCATE: the rows it removed are the table's state then)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import sql

from pgwarden.history.catalog import HistorySchema
from pgwarden.history.layout import NEW_SIDE, OLD_SIDE, TableLog, key_type, taken_sql, value_sql


@dataclass(frozen=True)
class Before:
    """The state just before statement id `stmt`, in statement order."""

    stmt: int


def _visible(
    schema: HistorySchema, log: TableLog, at: datetime | Before, alias: str = "h"
) -> sql.Composed:
    """Events of transactions started at or before `at` (or of statements before a statement
    id), since the table's history last restarted at or before it: tracking began again (that
    statement's snapshot rows count), or a TRUNCATE (the table is empty after it: the rows it
    removed do not count)."""
    if isinstance(at, Before):
        restart = sql.SQL(
            "(SELECT COALESCE(pg_catalog.max(r.stmt), 0) FROM {reset} r "
            "WHERE r.log_id = {log} AND r.stmt < {stmt})"
        ).format(reset=schema.table("reset"), log=sql.Literal(log.id), stmt=sql.Literal(at.stmt))
        return sql.SQL(
            "{a}.stmt < {stmt} AND {a}.stmt >= {restart} "
            "AND NOT ({a}.op IN ('T', 'X') AND {a}.stmt = {restart})"
        ).format(a=sql.Identifier(alias), stmt=sql.Literal(at.stmt), restart=restart)
    names = {
        "a": sql.Identifier(alias),
        "tx": schema.table("tx"),
        "reset": schema.table("reset"),
        "at": sql.Literal(at),
        "log": sql.Literal(log.id),
    }
    restart = sql.SQL(
        "(SELECT COALESCE(pg_catalog.max(r.stmt), 0) FROM {reset} r JOIN {tx} x ON x.id = r.ctx "
        "WHERE r.log_id = {log} AND x.at <= {at})"
    ).format(**names)
    return sql.SQL(
        "{a}.ctx IN (SELECT x.id FROM {tx} x WHERE x.at <= {at}) AND {a}.stmt >= {restart} "
        "AND NOT ({a}.op IN ('T', 'X') AND {a}.stmt = {restart})"
    ).format(restart=restart, **names)


def replay_sql(
    schema: HistorySchema,
    log: TableLog,
    at: datetime | Before,
    outputs: Sequence[tuple[str, Any]],
) -> sql.Composed:
    """The rows of a table as of `at`, from its history alone. `outputs`: (name, f) pairs, f
    giving an expression for a side ('o'/'n') over the history table alias `h`.

    Per key the last word wins; an UPDATE that moved a row to a new key also vacates the old
    one, and inside one statement a key being taken beats it being vacated (a multi-row key
    shift vacates and retakes keys in any order). A table without a key: every row counted in
    (insert, update's new row, snapshot) and out (delete, update's old row, truncate), and what
    remains, duplicates included.
    """
    visible = _visible(schema, log, at)
    shadow = log.table(schema)
    out_names = [sql.Identifier(f"c{i}") for i in range(len(outputs))]

    def values(side: str) -> sql.Composable:
        return sql.SQL(", ").join(
            sql.SQL("{} AS {}").format(f(side), name)
            for (_, f), name in zip(outputs, out_names, strict=True)
        )

    final = sql.SQL(", ").join(
        sql.SQL("w.{} AS {}").format(name, sql.Identifier(label))
        for (label, _), name in zip(outputs, out_names, strict=True)
    )
    if log.keyless:
        # Rows are told apart by their whole content, compared as text (every type has one).
        text = {
            side: sql.SQL("ROW({})::text").format(
                sql.SQL(", ").join(f(side) for _, f in outputs) if outputs else sql.SQL("NULL")
            )
            for side in ("o", "n")
        }
        return sql.SQL(
            "SELECT {final} FROM (SELECT DISTINCT ON (e.t) e.*, "
            "pg_catalog.sum(e.d) OVER (PARTITION BY e.t) AS n FROM ("
            "SELECT {tn} AS t, 1 AS d, {vn} FROM {shadow} h "
            "WHERE {visible} AND h.op = ANY ({newside}) "
            "UNION ALL "
            "SELECT {to} AS t, -1 AS d, {vo} FROM {shadow} h "
            "WHERE {visible} AND h.op = ANY ({oldside})"
            ") e ORDER BY e.t) w CROSS JOIN LATERAL pg_catalog.generate_series(1, w.n::int) "
            "WHERE w.n > 0"
        ).format(
            final=final,
            tn=text["n"],
            to=text["o"],
            vn=values("n"),
            vo=values("o"),
            shadow=shadow,
            visible=visible,
            newside=sql.Literal(list(NEW_SIDE)),
            oldside=sql.Literal(list(OLD_SIDE)),
        )
    keys = [(attnum, key_type(log, attnum)) for attnum in log.key_attnums or ()]
    k_names = [sql.Identifier(f"k{i}") for i in range(len(keys))]

    def key_values(side: str) -> sql.Composable:
        if side == "taken":
            return sql.SQL(", ").join(
                sql.SQL("{} AS {}").format(taken_sql(log, a, "h", t), k)
                for (a, t), k in zip(keys, k_names, strict=True)
            )
        return sql.SQL(", ").join(
            sql.SQL("{} AS {}").format(value_sql(log, "o", a, "h", t), k)
            for (a, t), k in zip(keys, k_names, strict=True)
        )

    old_key = sql.SQL(", ").join(value_sql(log, "o", a, "h", t) for a, t in keys)
    new_key = sql.SQL(", ").join(value_sql(log, "n", a, "h", t) for a, t in keys)
    nulls = sql.SQL(", ").join(sql.SQL("NULL AS {}").format(name) for name in out_names)
    return sql.SQL(
        "SELECT {final} FROM (SELECT DISTINCT ON ({ks}) e.* FROM ("
        "SELECT {taken}, h.stmt, 1 AS prio, h.op, {vn} FROM {shadow} h WHERE {visible} "
        "UNION ALL "
        "SELECT {vacated}, h.stmt, 0 AS prio, h.op, {nulls} FROM {shadow} h WHERE {visible} "
        "AND h.op = 'U' AND ROW({old_key}) IS DISTINCT FROM ROW({new_key})"
        ") e ORDER BY {ks}, e.stmt DESC, e.prio DESC) w "
        "WHERE w.prio = 1 AND w.op = ANY ({newside})"
    ).format(
        final=final,
        ks=sql.SQL(", ").join(sql.SQL("e.{}").format(k) for k in k_names),
        taken=key_values("taken"),
        vacated=key_values("vacated"),
        vn=values("n"),
        nulls=nulls,
        shadow=shadow,
        visible=visible,
        old_key=old_key,
        new_key=new_key,
        newside=sql.Literal(list(NEW_SIDE)),
    )
