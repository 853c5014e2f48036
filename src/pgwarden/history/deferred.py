"""Deferred capture: with the setting `pgwarden.defer_rows`, a statement over that many rows
copies its rows into a spool table in their own column types (about one plain write per row)
instead of building JSON events in the application's transaction. `materialize()` in
history.sql writes those statements' events later, oldest first; every reader calls it first,
so readers never see history with a hole where a deferred statement is.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from pgwarden.errors import UserError
from pgwarden.history.catalog import HistorySchema

Conn = psycopg.Connection[tuple[object, ...]]


def materialize(conn: Conn, schema: HistorySchema) -> int:
    """Write the events of every deferred statement; returns how many statements there were.

    Runs in the caller's transaction when there is one (as a savepoint), else in its own.
    """
    try:
        with conn.transaction():
            row = conn.execute(sql.SQL("SELECT {}()").format(schema.func("materialize"))).fetchone()
    except psycopg.errors.UndefinedFunction:
        return 0  # history installed by an older pgwarden, which never deferred anything
    except psycopg.errors.ReadOnlySqlTransaction as exc:
        raise UserError(
            "history has deferred statements whose events are not written yet, and this "
            "server (or transaction) is read-only",
            hint="read history on the primary once (any `pgwarden history` command writes "
            "them), then the replicas have it too",
        ) from exc
    assert row is not None
    return int(str(row[0]))
