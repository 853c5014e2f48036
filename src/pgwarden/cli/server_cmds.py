"""`pgwarden up | down | status | url | psql | logs`: the local server."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from rich.table import Table

from pgwarden.cli.app import err_console, format_option, out
from pgwarden.cli.backup_cmds import archiver_lines, archiver_of
from pgwarden.cli.context import AppContext, pass_app
from pgwarden.errors import ServerError, UserError
from pgwarden.server import consumer
from pgwarden.server.cluster import ServerState, StartOutcome, StopOutcome, mask_url
from pgwarden.server.local import bring_up
from pgwarden.sizes import format_size

_OUTCOME_TEXT = {
    StartOutcome.INITIALIZED: "created a new cluster and started it",
    StartOutcome.STARTED: "started",
    StartOutcome.RECOVERED: "started after an unclean stop: crash recovery ran",
    StartOutcome.ALREADY_RUNNING: "already running (config reloaded)",
}


@click.command("up")
@click.option(
    "--pg-bin",
    type=click.Path(file_okay=False, path_type=Path),
    help="PostgreSQL bin directory (default: $PGWARDEN_PG_BIN, the embedded wheel, pg_config).",
)
@click.option("--port", type=click.IntRange(1, 65535), help="TCP port (default: server.port).")
@pass_app
def up_cmd(app: AppContext, pg_bin: Path | None, port: int | None) -> None:
    """Start the local PostgreSQL, create the database, apply pgwarden.yaml, print its URL.

    Idempotent: when the server already runs, it reloads the config and applies it again.

    \b
    Example:
      pgwarden up
      pgwarden up --port 5433 --pg-bin /usr/lib/postgresql/15/bin
    """
    if app.loaded.path is None:
        err_console.print("no pgwarden.yaml found: using defaults (`pgwarden init` writes one)")
    server = app.server(pg_bin=pg_bin, port=port)
    started = time.monotonic()
    result = bring_up(server)
    elapsed = time.monotonic() - started
    err_console.print(
        f"{_OUTCOME_TEXT[result.outcome]}: {server.binaries.describe()} "
        f"on port {server.port} ({elapsed:.1f}s)"
    )
    if server.chosen_port:
        err_console.print(
            f"port {server.config.server.port} was taken, so this new cluster uses port "
            f"{server.port} (kept for it; --port or server.port in pgwarden.yaml choose one)"
        )
    if result.database_created:
        err_console.print(f"created database {server.config.database!r}")
    if result.applied:
        err_console.print(f"applied {len(result.applied)} change(s) from the config")
    if result.restart_needed:
        err_console.print(
            f"restart needed for {', '.join(result.restart_needed)} to take effect (WAL "
            "archiving among them when backup.location was just set): "
            "`pgwarden down && pgwarden up`"
        )
    if server.config.history.uses_wal:
        pid, fresh = consumer.start(server.state, result.url, app.loaded.path)
        err_console.print(
            f"WAL capture consumer {'started' if fresh else 'running'} (pid {pid}; log "
            f"{consumer.log_file(server.state)})"
        )
    # The URL (with password) goes to stdout alone so `$(pgwarden up)` is usable as-is.
    click.echo(result.url)


@click.command("down")
@click.option("--purge", is_flag=True, help="Also delete the cluster: data, logs, password.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before --purge deletes data.")
@pass_app
def down_cmd(app: AppContext, purge: bool, yes: bool) -> None:
    """Stop the local server (fast shutdown). Data stays unless --purge.

    \b
    Example:
      pgwarden down
      pgwarden down --purge --yes   # deletes every database in the local cluster
    """
    server = app.server()
    if consumer.stop(server.state):
        err_console.print("stopped the WAL capture consumer")
    if purge:
        data = server.state.data_dir
        if not yes:
            if not sys.stdin.isatty():
                raise UserError(
                    f"--purge would delete {data} and no terminal is attached to confirm",
                    hint="add --yes to confirm deleting the data",
                )
            click.confirm(f"Delete {data} and everything in it?", abort=True)
        server.purge()
        out.print(f"stopped and deleted {data}")
        return
    if server.down() is StopOutcome.NOT_RUNNING:
        out.print("not running; nothing to stop")
    else:
        out.print(f"stopped; data kept in {server.state.data_dir}")


@click.command("status")
@format_option("table", "json", legacy_json=True)
@click.pass_context
def status_cmd(ctx: click.Context, fmt: str, as_json: bool) -> None:
    """Show whether the local server runs, on which binaries and port, and how it last started.

    Exits 0 when it runs, 3 when it does not (as `pg_ctl status`).

    \b
    Example:
      pgwarden status
      pgwarden status -o json | jq .state
    """
    app = ctx.find_object(AppContext)
    assert app is not None
    server = app.server()
    status = server.status()
    code = 0 if status.state is ServerState.RUNNING else 3
    archiving = archiver_of(server) if server.backup_root is not None else None
    capture = consumer.capture_state(server) if server.config.history.uses_wal else None
    if as_json or fmt == "json":
        data = status.to_json()
        data["archiver"] = archiving.to_json() if archiving is not None else None
        data["wal_capture"] = capture.to_json() if capture is not None else None
        click.echo(json.dumps(data, indent=2))
        ctx.exit(code)
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("state", f"{status.state.value}: {status.detail}")
    table.add_row("binaries", status.binaries)
    table.add_row("data", status.data_dir)
    if status.port:
        table.add_row("port", str(status.port))
    if status.pid:
        table.add_row("pid", str(status.pid))
    if status.url:
        table.add_row("url", mask_url(status.url) + "  (`pgwarden url` prints it whole)")
    if status.last_start:
        last = status.last_start
        table.add_row("last start", f"{last.get('at')} ({last.get('outcome')})")
    if capture is not None:
        table.add_row(
            "wal capture",
            f"consumer running (pid {capture.consumer_pid})"
            if capture.consumer_pid
            else "consumer not running: `pgwarden up` "
            "starts it; history catches up when read, and the slot keeps WAL until then",
        )
        if capture.lag is not None:
            table.add_row("wal slot", capture.lag.summary())
        if capture.disk_free is not None:
            table.add_row("wal disk", f"{format_size(capture.disk_free)} free")
    out.print(table)
    if capture is not None:
        for line in capture.warnings():
            out.print(f"[red]{line}[/red]")
    if archiving is not None:
        for line in archiver_lines(archiving):
            out.print(line)
    ctx.exit(code)


def _running_server(app: AppContext):  # type: ignore[no-untyped-def]
    server = app.server()
    if not server.is_running():
        raise ServerError(
            f"the local server in {server.state.root} is not running",
            hint="start it with `pgwarden up`",
        )
    return server


@click.command("url")
@pass_app
def url_cmd(app: AppContext) -> None:
    """Print the libpq URI of the managed database (admin user, password included).

    Works as-is with psql, pgbench and psycopg.

    \b
    Example:
      psql "$(pgwarden url)"
      pgbench -i "$(pgwarden url)"
    """
    click.echo(_running_server(app).url())


@click.command(
    "psql", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False}
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@pass_app
def psql_cmd(app: AppContext, args: tuple[str, ...]) -> None:
    """Open psql on the managed database; extra ARGS go to psql.

    Uses --dsn / $PGWARDEN_DSN / $DATABASE_URL / PG* when set, else the local server.

    \b
    Example:
      pgwarden psql
      pgwarden psql -c 'SELECT * FROM pgwarden.history LIMIT 5'
    """
    target = app.target()
    params = conninfo_to_dict(target.conninfo) if target.conninfo else {}
    env = dict(os.environ)
    password = params.pop("password", None)
    if password is not None:
        env["PGPASSWORD"] = str(password)  # not on the command line, where `ps` shows it
    server = app.server()
    psql = str(server.binaries.tool("psql"))
    argv = [psql]
    if params:
        argv.append(make_conninfo(**params))  # type: ignore[arg-type]
    argv.extend(args)
    sys.stdout.flush()
    os.execve(psql, argv, env)  # noqa: S606 - replace ourselves with psql, no shell


@click.command("logs")
@click.option("-n", "--lines", default=50, show_default=True, help="How many lines to show.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines (Ctrl-C stops).")
@pass_app
def logs_cmd(app: AppContext, lines: int, follow: bool) -> None:
    """Print the local server's log.

    \b
    Example:
      pgwarden logs -n 100
      pgwarden logs -f
    """
    server = app.server()
    log_file = server.state.log_file
    if not log_file.exists():
        raise ServerError(
            f"no server log at {log_file}", hint="start the server once with `pgwarden up`"
        )
    click.echo(server.log_tail(lines), nl=False)
    if not follow:
        return
    with log_file.open(errors="replace") as handle:
        handle.seek(0, os.SEEK_END)
        while True:
            chunk = handle.readline()
            if chunk:
                click.echo(chunk, nl=False)
            else:
                time.sleep(0.3)


__all__ = ["ServerState"]
