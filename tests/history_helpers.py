"""Helpers shared by the history tests."""

from __future__ import annotations

from typing import Any

import psycopg

from pgwarden.config import Config
from pgwarden.converge import apply_config

Conn = psycopg.Connection[Any]


def history_config(*tables: str, **history: Any) -> Config:
    return Config.model_validate({"history": {"tables": list(tables or ["public.*"]), **history}})


def setup_history(url: str, config: Config | None = None) -> Config:
    config = config or history_config()
    with psycopg.connect(url) as conn:
        apply_config(conn, config)
    return config


def events(conn: Conn, table: str | None = None) -> list[dict[str, Any]]:
    query = (
        "SELECT op, row_key, old_row, new_row, schema_name, table_name, db_user, role_name, "
        "app_user, context, tx::text AS tx FROM pgwarden.event"
    )
    params: tuple[Any, ...] = ()
    if table:
        query += " WHERE table_name = %s"
        params = (table,)
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute(query + " ORDER BY stmt_id, pos", params).fetchall()
