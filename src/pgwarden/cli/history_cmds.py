"""`pgwarden history | as-of | revert | retention | track | untrack | verify`."""

from __future__ import annotations

import contextlib
import csv
import json
import signal
import sys
import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import click
import psycopg
from rich.progress import MofNCompleteColumn, TimeElapsedColumn
from rich.table import Table

from pgwarden.cli.app import err_console, format_option, out, progress_bar
from pgwarden.cli.context import AppContext, pass_app
from pgwarden.cli.timeparse import TIME
from pgwarden.connect import connect
from pgwarden.errors import ConnectionFailed, UserError
from pgwarden.history import (
    Event,
    EventFilter,
    HistorySchema,
    apply_retention,
    as_of,
    as_of_into,
    catalog,
    events,
    parse_table,
    revert,
    track,
    untrack,
    verify,
    wal,
)
from pgwarden.history.layout import dump_json
from pgwarden.history.names import TableName, parse_key
from pgwarden.history.read import OPS, AsOfMethod, columns_of, completeness_note
from pgwarden.lsn import format_lsn

TABLE_PAGE = 50  # events the table format shows by default


def _keys(pairs: tuple[str, ...]) -> dict[str, str] | None:
    return parse_key(pairs) if pairs else None


def _schema(app: AppContext) -> HistorySchema:
    return HistorySchema(app.loaded.config.history.schema_name)


def _short(value: Any, *, quoted: bool = False) -> str:
    """A value for a table cell. `quoted` keeps text in JSON quotes, so that in a list of
    changes SQL NULL (null) and the text 'null' ("null") stay apart."""
    text = dump_json(value) if quoted or not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "…"


def _cell(value: Any) -> str:
    """A value for csv: text as it is, anything else as exact JSON."""
    return value if isinstance(value, str) else dump_json(value)


def _csv_field(value: Any) -> str:
    """One as-of csv field as PostgreSQL's COPY … CSV writes it: NULL (or a column the row did
    not have then) is an empty field; any value that could be read as one, or that holds a
    quote, separator or line break, is quoted. Python's csv module (before 3.12) writes ''
    and None alike."""
    if value is None:
        return ""
    text = _cell(value)
    if text == "" or any(ch in text for ch in ',"\r\n') or text != text.strip():
        return '"' + text.replace('"', '""') + '"'
    return text


def _change_text(event: Event) -> str:
    if event.op in ("INSERT", "SNAPSHOT"):
        return ", ".join(f"{c}={_short(v, quoted=True)}" for c, v in (event.new or {}).items())
    if event.op in ("DELETE", "TRUNCATE"):
        if event.old is None:
            return "(all rows; marker only)"
        return ", ".join(f"{c}={_short(v, quoted=True)}" for c, v in event.old.items())
    return ", ".join(
        f"{c}: {_short(b, quoted=True)} → {_short(a, quoted=True)}"
        for c, (b, a) in event.changed_columns().items()
    )


def _render_table(rows: Iterable[Event]) -> int:
    table = Table(show_lines=False, header_style="bold")
    for col in ("at", "tx", "table", "op", "key", "change", "who"):
        table.add_column(col, overflow="fold")
    count = 0
    for e in rows:
        who = e.app_user or e.db_user if not e.app_user else f"{e.app_user} ({e.db_user})"
        table.add_row(
            e.at.astimezone().strftime("%Y-%m-%d %H:%M:%S"),
            str(e.tx),
            e.table,
            e.op,
            _short(e.key),
            _change_text(e),
            who,
        )
        count += 1
    out.print(table)
    return count


def _render_json(rows: Iterable[Event]) -> int:
    # Streamed object by object: memory stays flat whatever the number of events.
    write = sys.stdout.write
    write("[")
    count = 0
    for e in rows:
        write(",\n" if count else "\n")
        write(dump_json(e.to_json()))
        count += 1
    write("\n]\n" if count else "]\n")
    return count


def _render_csv(rows: Iterable[Event]) -> int:
    fields = ["tx", "at", "table", "op", "key", "old", "new", "db_user", "app_user",
              "application", "client_addr", "context"]  # fmt: skip
    writer = csv.DictWriter(sys.stdout, fieldnames=fields)
    writer.writeheader()
    count = 0
    for e in rows:
        data = e.to_json()
        for col in ("key", "old", "new"):
            data[col] = "" if data[col] is None else dump_json(data[col])
        writer.writerow(data)
        count += 1
    return count


@click.command("history")
@click.argument("table", required=False)
@click.option("--key", "key_pairs", multiple=True, metavar="COL=VAL", help="Only this row.")
@click.option("--since", type=TIME, help="From this time (ISO 8601, 'now', or 2h/3d ago).")
@click.option("--until", type=TIME, help="Up to this time.")
@click.option("--actor", help="Application user, login role or role that made the change.")
@click.option("--op", type=click.Choice(OPS, case_sensitive=False), help="Only this operation.")
@click.option("--tx", type=int, help="Only this transaction.")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    help=f"At most N events, the newest (table format: {TABLE_PAGE} unless --all).",
)
@click.option(
    "--all", "show_all", is_flag=True, help="Every matching event, in the table format too."
)
@click.option(
    "--batch",
    type=click.IntRange(min=1),
    default=wal.BATCH_CHANGES,
    show_default=True,
    help="With `history follow`: changes decoded per batch.",
)
@click.option(
    "--wait",
    is_flag=True,
    help="With `history follow`: wait for the server and for WAL capture to be set up, and "
    "reconnect when the connection drops, instead of exiting (for a container beside the "
    "server).",
)
@format_option("table", "json", "csv")
@pass_app
def history_cmd(
    app: AppContext,
    table: str | None,
    key_pairs: tuple[str, ...],
    since: datetime | None,
    until: datetime | None,
    actor: str | None,
    op: str | None,
    tx: int | None,
    limit: int | None,
    show_all: bool,
    batch: int,
    wait: bool,
    fmt: str,
) -> None:
    """Show recorded changes: who changed what, when, before → after.

    The table format shows the newest events (a page, oldest of them first), as `git log`
    would in a pager; json and csv stream every matching event in constant memory.

    `pgwarden history follow` runs the consumer of WAL capture (history.capture: wal) in the
    foreground until interrupted: it writes decoded changes into history as they commit
    (`pgwarden up` runs one beside the local server; in Kubernetes it runs with --wait). A
    table named follow: public.follow.

    \b
    Example:
      pgwarden history public.test_table --key id=1
      pgwarden history --since 2h --actor alice --format json
      pgwarden history --tx 7791 --format csv > tx.csv
      pgwarden history follow
    """
    if table == "follow":
        _follow(app, batch, wait=wait)
        return
    page = limit is None and not show_all and fmt == "table"
    if page:
        limit = TABLE_PAGE + 1  # one more than shown: whether there is more
    flt = EventFilter(
        table=parse_table(table) if table else None,
        key=_keys(key_pairs),
        since=since,
        until=until,
        actor=actor,
        op=op.upper() if op else None,
        tx=tx,
        limit=limit,
    )
    with connect(app.target()) as conn:
        _catch_up(conn, app)
        with conn.transaction():
            rows: Iterable[Event] = events(conn, flt, schema=_schema(app), newest_first=bool(limit))
            more = False
            if limit:
                newest = list(rows)  # at most `limit`
                more = page and len(newest) > TABLE_PAGE
                rows = sorted(newest[:TABLE_PAGE] if page else newest, key=lambda e: e.stmt_id)
            renderer = {"table": _render_table, "json": _render_json, "csv": _render_csv}[fmt]
            count = renderer(rows)
            note = completeness_note(conn, _schema(app), flt.table) if flt.table else None
    if note:
        err_console.print(note)
    if fmt == "table":
        if more:
            err_console.print(
                f"the newest {count} event(s) shown; --limit N shows more, --all every one, "
                "--format json or csv streams them all"
            )
        else:
            err_console.print(f"{count} event(s)")


@click.command("as-of")
@click.argument("table")
@click.argument("time", type=TIME)
@click.option("--key", "key_pairs", multiple=True, metavar="COL=VAL", help="Only this row.")
@click.option(
    "--into", "into", metavar="NEW_TABLE", help="Rebuild the whole table into a new table."
)
@click.option(
    "--method",
    type=click.Choice(["auto", "replay", "rewind"]),
    default="auto",
    show_default=True,
    help="With --into: replay history up to TIME, or rewind the live table past the changes "
    "made since (fast when few rows changed; needs complete history since TIME). auto picks.",
)
@format_option("table", "json", "csv")
@pass_app
def as_of_cmd(
    app: AppContext,
    table: str,
    time: datetime,
    key_pairs: tuple[str, ...],
    into: str | None,
    method: AsOfMethod,  # one of the click.Choice values
    fmt: str,
) -> None:
    """Show a table (or one row) as it was at TIME, rebuilt from history.

    TIME is transaction time: a change counts from the moment its transaction began.

    \b
    Example:
      pgwarden as-of public.test_table '2026-11-26 10:00' --key id=1
      pgwarden as-of public.orders 1d --into public.orders_yesterday
    """
    name = parse_table(table)
    with connect(app.target()) as conn:
        # In a transaction of its own: as_of_into picks its method from the caller's isolation.
        with conn.transaction():
            note = completeness_note(conn, _schema(app), name)
        if note:
            err_console.print(note)
        if into:
            target = parse_table(into)
            if key_pairs:
                raise UserError("--into rebuilds the whole table; drop --key")
            built = as_of_into(
                conn,
                name,
                time,
                target,
                method=method,
                schema=_schema(app),
            )
            out.print(
                f"created {target} with {built.rows} row(s) as of {time.isoformat()} "
                f"({built.method})"
            )
            if built.note:
                err_console.print(built.note)
            return
        rows = as_of(conn, name, time, key=_keys(key_pairs), schema=_schema(app))
    if fmt == "json":
        click.echo("[" + ",\n ".join(dump_json(r) for r in rows) + "]")
        return
    if fmt == "csv":
        cols = columns_of(rows)
        write = sys.stdout.write
        write(",".join(_csv_field(c) for c in cols) + "\r\n")
        for row in rows:
            write(",".join(_csv_field(row.get(c)) for c in cols) + "\r\n")
        return
    view = Table(header_style="bold")
    cols = columns_of(rows)
    for col in cols:
        view.add_column(col, overflow="fold")
    for row in rows:
        view.add_row(*(_short(row.get(c)) if row.get(c) is not None else "" for c in cols))
    out.print(view)
    err_console.print(f"{len(rows)} row(s) in {name} as of {time.isoformat()}")


@click.command("revert")
@click.argument("tx", type=int)
@click.option("--dry-run", is_flag=True, help="Say what it would do, change nothing.")
@click.option("--sql", "show_sql", is_flag=True, help="Also print the compensating SQL.")
@pass_app
def revert_cmd(app: AppContext, tx: int, dry_run: bool, show_sql: bool) -> None:
    """Undo transaction TX with compensating statements (recorded in history too).

    One statement per statement of TX (and table and operation), however many rows. Refuses,
    naming the rows and every later transaction, when a row it changed was changed again
    later, and when TX was already reverted.

    \b
    Example:
      pgwarden history --since 1h          # find the transaction
      pgwarden revert 7791 --dry-run --sql
      pgwarden revert 7791
    """
    with connect(app.target()) as conn:
        if dry_run or not sys.stderr.isatty():
            plan = revert(conn, tx, dry_run=dry_run, schema=_schema(app))
        else:
            with progress_bar(MofNCompleteColumn(), TimeElapsedColumn()) as bar:
                task = bar.add_task("reverting", total=None)

                def update(done: int, total: int, summary: str) -> None:
                    bar.update(task, completed=done, total=total, description=summary)

                plan = revert(conn, tx, schema=_schema(app), progress=update)
        shown = [(s.summary, s.statement.as_string(conn)) for s in plan.steps]
    for warning in plan.warnings:
        err_console.print(f"warning: {warning}")
    for summary, statement in shown:
        out.print(f"-- {summary}", markup=False)
        if show_sql:
            out.print(statement + ";", markup=False)
    verb = "would change" if dry_run else "reverted:"
    err_console.print(f"transaction {tx}: {verb} {plan.rows} row(s) with {len(shown)} statement(s)")


@click.command("retention")
@click.option("--dry-run", is_flag=True, help="Count what would be removed, remove nothing.")
@pass_app
def retention_cmd(app: AppContext, dry_run: bool) -> None:
    """Remove history older than history.retention, keeping the state at the cutoff.

    Per row, the last event before the cutoff stays (unless it deleted the row): as-of and
    verify give the same answers from the cutoff on. Run it regularly (cron, CronJob).

    \b
    Example:
      pgwarden retention --dry-run
      pgwarden retention
    """
    keep = app.loaded.config.history.retention
    if keep is None:
        raise UserError(
            "history.retention is not set, so no history is old enough to remove",
            hint="set it in pgwarden.yaml, e.g. `history: {retention: 400d}`",
        )
    with connect(app.target()) as conn:
        result = apply_retention(conn, keep, dry_run=dry_run, schema=_schema(app))
    verb = "would remove" if dry_run else "removed"
    for t in result.tables:
        out.print(f"{t.table}: {verb} {t.removed} event(s), {t.kept} kept")
    out.print(
        f"cutoff {result.cutoff.isoformat(timespec='seconds')}: {verb} {result.removed} "
        "event(s) older than history.retention"
    )


@click.command("track")
@click.argument("tables", nargs=-1, required=True)
@click.option("--mode", type=click.Choice(["fail-closed", "fail-open"]), help="Capture mode.")
@click.option("--exclude-column", "exclude", multiple=True, metavar="COL", help="Never store COL.")
@pass_app
def track_cmd(
    app: AppContext, tables: tuple[str, ...], mode: str | None, exclude: tuple[str, ...]
) -> None:
    """Start recording the history of TABLEs now (existing rows get a SNAPSHOT event).

    Tables tracked this way stay tracked whatever history.tables says; `untrack` stops it.

    \b
    Example:
      pgwarden track public.users --exclude-column password_hash
      pgwarden track sales.orders --mode fail-open
    """
    names = [parse_table(t) for t in tables]
    started = time.monotonic()
    # A large table's snapshot takes a while: say so on a terminal while it runs.
    with connect(app.target()) as conn, err_console.status(f"tracking {len(names)} table(s)…"):
        track(conn, app.loaded.config, names, mode=mode, exclude_columns=exclude)
    for name in names:
        out.print(f"tracking {name}")
    err_console.print(
        f"done in {time.monotonic() - started:.1f}s (existing rows: a SNAPSHOT event each)"
    )


@click.command("untrack")
@click.argument("tables", nargs=-1, required=True)
@pass_app
def untrack_cmd(app: AppContext, tables: tuple[str, ...]) -> None:
    """Stop recording the history of TABLEs; what was recorded stays.

    A table that history.tables still matches is tracked again by the next `apply`.

    \b
    Example:
      pgwarden untrack public.scratch
    """
    names = [parse_table(t) for t in tables]
    with connect(app.target()) as conn:
        untrack(conn, app.loaded.config, names)
    for name in names:
        out.print(f"no longer tracking {name}; its history is kept")


@click.command("verify")
@click.option("--quick", is_flag=True, help="Skip comparing live rows with history.")
@format_option("table", "json", legacy_json=True)
@click.pass_context
def verify_cmd(ctx: click.Context, quick: bool, fmt: str, as_json: bool) -> None:
    """Check history is intact; exit 1 on any problem.

    Reports tracked tables whose triggers are missing or disabled, rows changed while tracking
    was off (live rows that differ from history), fail-open capture failures, tables a pattern
    matches that are not tracked, and missing DDL-log triggers.

    \b
    Example:
      pgwarden verify && echo "history intact"
    """
    app = ctx.find_object(AppContext)
    assert app is not None
    with connect(app.target()) as conn:
        report = verify(conn, schema=_schema(app), deep=not quick)
    if as_json or fmt == "json":
        click.echo(json.dumps({
            "ok": report.ok, "tracked": report.tracked, "events": report.events,
            "problems": [p.__dict__ for p in report.problems],
        }, indent=2))  # fmt: skip
    else:
        about = "~" if quick else ""
        out.print(f"{report.tracked} tracked table(s), {about}{report.events} event(s)")
        for p in report.problems:
            where = f"{p.table}: " if p.table else ""
            out.print(f"[red]✗[/red] {where}{p.detail} [{p.kind}]", markup=True, highlight=False)
        if report.ok:
            out.print("history intact")
    if not report.ok:
        ctx.exit(1)


def _catch_up(conn: Any, app: AppContext) -> None:
    """WAL capture: history first takes in what was committed before this command (outside
    the command's own transaction, so that the slot may move on)."""
    wal.catch_up(conn, _schema(app))


# `history follow --wait`: how often it tries again to connect, or to find WAL capture set up.
WAIT_SECONDS = 5


def _follow(app: AppContext, batch: int, *, wait: bool) -> None:
    schema = _schema(app)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    def pause(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.2)

    def report(step: wal.BatchResult) -> None:
        err_console.print(
            f"{step.transactions} transaction(s), {step.events} event(s) up to "
            f"{format_lsn(step.lsn or 0)}"
            + (f", {step.skipped} already recorded" if step.skipped else "")
        )

    signal.signal(signal.SIGTERM, stop)
    said = ""
    with contextlib.suppress(KeyboardInterrupt):
        while not stopping:
            try:
                with connect(app.target(), long_lived=True) as conn:
                    conn.autocommit = True
                    if not catalog.is_installed(conn, schema) or wal.setup(conn, schema) is None:
                        if not wait:
                            raise UserError(
                                "no table is captured from the WAL in this database",
                                hint="set history.capture: wal in pgwarden.yaml and run "
                                "`pgwarden apply`",
                            )
                        if said != "setup":
                            err_console.print(
                                "waiting for WAL capture to be set up (`pgwarden apply`, or the "
                                "bootstrap SQL)"
                            )
                            said = "setup"
                        pause(WAIT_SECONDS)
                        continue
                    err_console.print("following the WAL into history (Ctrl-C stops)")
                    said = ""
                    wal.follow(conn, schema, batch=batch, stop=lambda: stopping, report=report)
                    return
            except (ConnectionFailed, psycopg.OperationalError) as exc:
                if not wait:
                    raise
                # The server restarts, fails over or is not up yet: the slot kept everything.
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc)
                if said != "connection":
                    err_console.print(f"no connection ({reason}); retrying every {WAIT_SECONDS} s")
                    said = "connection"
                pause(WAIT_SECONDS)


COMMANDS = [history_cmd, as_of_cmd, revert_cmd, retention_cmd, track_cmd, untrack_cmd, verify_cmd]
__all__ = ["COMMANDS", "TableName"]
