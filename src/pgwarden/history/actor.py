"""Telling history who the application's user is.

History records the database roles by itself. To also record the *application's* user (the
person behind a web request on a pooled connection), set two transaction-local settings before
the writes; they vanish at commit, so a pooled connection never leaks them to the next request:

    with conn.transaction():
        set_actor(conn, "alice@example.com", context={"request": "r-123"})
        conn.execute("UPDATE accounts SET …")

Plain SQL does the same: `SELECT set_config('pgwarden.actor', 'alice', true)` or
`SET LOCAL pgwarden.actor = 'alice'`.

Capture from the WAL (history.capture: wal) has no trigger to read those settings: it reads one
transactional logical message (prefix `pgwarden`, JSON) that the same call sends when the
server has wal_level = logical. Any role may send such a message, so what it says is what the
client says: the login role, application and address in it are filled in by the server, but a
client that writes its own message can claim anything (as with the settings).
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
    conn.execute(CONTEXT_SQL, {"actor": actor or "", "context": text or ""})


# Both engines' context in one statement: the settings the triggers read, and the message the
# WAL consumer reads (history/wal.py). `actor` NULL keeps the actor already set.
CONTEXT_SQL = """
SELECT pg_catalog.set_config('pgwarden.actor',
           COALESCE(%(actor)s, pg_catalog.current_setting('pgwarden.actor', true), ''), true),
       pg_catalog.set_config('pgwarden.context', %(context)s, true),
       CASE WHEN pg_catalog.current_setting('wal_level') = 'logical' THEN
           pg_catalog.pg_logical_emit_message(true, 'pgwarden', pg_catalog.json_build_object(
               'db_user', pg_catalog.session_user(),
               'role', CASE WHEN pg_catalog.current_setting('role') = 'none'
                            THEN pg_catalog.session_user()::text
                            ELSE pg_catalog.current_setting('role') END,
               'application', NULLIF(pg_catalog.current_setting('application_name'), ''),
               'client_addr', pg_catalog.inet_client_addr(),
               'actor', NULLIF(COALESCE(%(actor)s,
                                        pg_catalog.current_setting('pgwarden.actor', true)), ''),
               'context', NULLIF(%(context)s, ''))::text)
       END
"""


def set_context(conn: psycopg.Connection[Any], context: str) -> None:
    """Set `pgwarden.context` (keeping the actor) for the current transaction, both engines."""
    conn.execute(CONTEXT_SQL, {"actor": None, "context": context})
