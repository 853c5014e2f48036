"""Where errors leave pgwarden (the CLI, the web UI): database errors that are the user's
doing, told apart from the rest, and the log that keeps the traceback of everything else."""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from pathlib import Path

import psycopg


def log_path() -> Path:
    """pgwarden's own log: $PGWARDEN_LOG, else $XDG_STATE_HOME/pgwarden/pgwarden.log."""
    explicit = os.environ.get("PGWARDEN_LOG")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "pgwarden" / "pgwarden.log"


def write_crash_log(exc: BaseException) -> Path:
    """The traceback, appended to pgwarden's log; returns where it went."""
    text = "".join(traceback.format_exception(exc))
    for candidate in (log_path(), Path(tempfile.gettempdir()) / "pgwarden.log"):
        try:
            candidate.parent.mkdir(parents=True, exist_ok=True)
            with candidate.open("a") as handle:
                handle.write(f"--- pgwarden {' '.join(sys.argv[1:])}\n{text}\n")
            return candidate
        except OSError:
            continue
    return Path("(no writable log location)")


# Database errors that are the user's doing (rights, names, values), not pgwarden's: said as
# one message with what to do, exit 2, wherever in a command they come from.
_USER_DB_ERRORS: tuple[tuple[type[psycopg.Error], str], ...] = (
    (psycopg.errors.InsufficientPrivilege,
     "the database role in use lacks a right this needs: connect as a role that has it "
     "(reading history needs the auditor role's rights)"),
    (psycopg.errors.InvalidSchemaName, "check the schema name"),
    (psycopg.errors.UndefinedTable, "check the table name (schema.table)"),
    (psycopg.errors.UndefinedColumn, "check the column name"),
    (psycopg.errors.DataException, "check the value given"),
    (psycopg.errors.ReadOnlySqlTransaction, "connect to the primary, not a read-only standby"),
)  # fmt: skip


def user_db_error(exc: psycopg.Error) -> str | None:
    """What to do about a database error that is the user's doing; None for any other."""
    for kind, hint in _USER_DB_ERRORS:
        if isinstance(exc, kind):
            return hint
    return None
