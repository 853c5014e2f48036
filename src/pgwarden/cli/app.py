"""Where errors become messages and exit codes, in one place."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
import psycopg
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn
from rich.text import Text

from pgwarden.boundary import user_db_error, write_crash_log
from pgwarden.errors import PgwardenError

err_console = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)


def progress_bar(*columns: ProgressColumn) -> Progress:
    """A bar on stderr that goes away when done (the command's summary line stays)."""
    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        *columns,
        console=err_console,
        transient=True,
    )


log = logging.getLogger("pgwarden")


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
        hint = user_db_error(exc)
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
    where = write_crash_log(exc)
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
