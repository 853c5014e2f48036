"""Telling history who the application's user is.

History records the database roles by itself. To also record the *application's* user (the
person behind a web request on a pooled connection), set two transaction-local settings before
the writes; they vanish at commit, so a pooled connection never leaks them to the next request:

    with conn.transaction():
        set_actor(conn, "alice@example.com", context={"request": "r-123"})
        conn.execute("UPDATE accounts SET …")

Plain SQL does the same: `SELECT set_config('pgwarden.actor', 'alice', true)` or
`SET LOCAL pgwarden.actor = 'alice'`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import psycopg

from pgwarden.errors import UserError


def set_actor(
    conn: psycopg.Connection[Any],
    actor: str | None,
    *,
    context: str | Mapping[str, Any] | None = None,
) -> None:
    """Set `pgwarden.actor` and `pgwarden.context` for the current transaction only."""
    if conn.autocommit and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
        raise UserError(
            "set_actor needs an open transaction (it is transaction-local)",
            hint="call it inside `with conn.transaction():`",
        )
    text = context if isinstance(context, str) or context is None else json.dumps(context)
    conn.execute(
        "SELECT pg_catalog.set_config('pgwarden.actor', %s, true), "
        "pg_catalog.set_config('pgwarden.context', %s, true)",
        (actor or "", text or ""),
    )
