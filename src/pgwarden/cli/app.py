"""Where errors become messages and exit codes, in one place."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import psycopg
from rich.console import Console
from rich.text import Text

from pgwarden.errors import PgwardenError

err_console = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)

log = logging.getLogger("pgwarden")


def log_path() -> Path:
    """pgwarden's own log: $PGWARDEN_LOG, else $XDG_STATE_HOME/pgwarden/pgwarden.log."""
    explicit = os.environ.get("PGWARDEN_LOG")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "pgwarden" / "pgwarden.log"


def _write_crash_log(exc: BaseException) -> Path:
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


def _user_db_error(exc: psycopg.Error) -> str | None:
    for kind, hint in _USER_DB_ERRORS:
        if isinstance(exc, kind):
            return hint
    return None


class _ReaderGone(Exception):
    """stdout's reader went away. Not an OSError, so that click does not turn it into exit 1
    (its main() exits 1 on EPIPE even when standalone_mode is off)."""


class GuardedGroup(click.Group):
    """The root command group: a closed pipe leaves the command as `_ReaderGone`."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError as exc:
            raise _ReaderGone() from exc


def run_guarded(command: click.Command, argv: list[str] | None) -> int:
    try:
        result = command.main(args=argv, prog_name="pgwarden", standalone_mode=False)
    except click.exceptions.Abort:
        err_console.print("aborted")
        return 2
    except click.ClickException as exc:
        exc.show()
        return 2
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except PgwardenError as exc:
        err_console.print(Text("error: ", style="bold red") + Text(exc.message))
        if exc.hint:
            err_console.print(f"  hint: {exc.hint}", markup=False)
        return exc.exit_code
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except (BrokenPipeError, _ReaderGone):
        # The reader went away (`pgwarden history | head`): a normal end, as for `git log`.
        # Point stdout at nothing so that the interpreter's final flush does not fail too.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass  # not a real file descriptor (captured output)
        return 0
    except psycopg.Error as exc:
        hint = _user_db_error(exc)
        if hint is None:
            return _unexpected(exc)
        message = (exc.diag.message_primary or str(exc)).strip()
        err_console.print(Text("error: ", style="bold red") + Text(message))
        err_console.print(f"  hint: {hint}", markup=False)
        return 2
    except Exception as exc:
        return _unexpected(exc)
    # click returns the code of ctx.exit(N) instead of raising when standalone_mode is off.
    return result if isinstance(result, int) else 0


def _unexpected(exc: BaseException) -> int:
    where = _write_crash_log(exc)
    err_console.print(
        f"unexpected error: {type(exc).__name__}: {exc}\n"
        f"  the full traceback is in {where}; please include it in a bug report",
        markup=False,
    )
    return 1


F = TypeVar("F", bound=Callable[..., Any])


def format_option(
    *choices: str, default: str = "table", legacy_json: bool = False
) -> Callable[[F], F]:
    """The one output flag of every command that prints data: `--format/-o CHOICE`; with
    `legacy_json`, the older `--json` spelling is kept as a hidden alias of `--format json`."""

    def decorate(function: F) -> F:
        function = click.option(
            "--format", "-o", "fmt", type=click.Choice(list(choices)), default=default,
            show_default=True, help="Output format.",
        )(function)  # fmt: skip
        if legacy_json:
            function = click.option(
                "--json", "as_json", is_flag=True, hidden=True, help="Same as --format json."
            )(function)
        return function

    return decorate
