"""Prototype capture designs (prototypes.sql), measured beside pgwarden in W1 and W2."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import psycopg
from psycopg import sql

SQL = (Path(__file__).parent / "prototypes.sql").read_text()

# The transition tables each event's statement trigger gets.
TRANSITIONS = {
    "INSERT": "NEW TABLE AS new_rows",
    "UPDATE": "OLD TABLE AS old_rows NEW TABLE AS new_rows",
    "DELETE": "OLD TABLE AS old_rows",
}


def trigger_name(event: str) -> sql.Identifier:
    return sql.Identifier(f"proto_{event.lower()}")


def add_triggers(
    conn: psycopg.Connection[tuple[object, ...]],
    table: sql.Identifier,
    function: str,
    events: Sequence[str],
    argument: str | None = None,
) -> None:
    """Statement-level AFTER triggers, with transition tables, calling proto.`function`."""
    for event in events:
        conn.execute(
            sql.SQL(
                "CREATE TRIGGER {name} AFTER {event} ON {table} REFERENCING {transition} "
                "FOR EACH STATEMENT EXECUTE FUNCTION {function}({argument})"
            ).format(
                name=trigger_name(event),
                event=sql.SQL(event),
                table=table,
                transition=sql.SQL(TRANSITIONS[event]),
                function=sql.Identifier("proto", function),
                argument=sql.Literal(argument) if argument is not None else sql.SQL(""),
            )
        )
