"""`pgwarden backup …`: base backups, the recoverable window, restores, checks, retention."""

from __future__ import annotations

import json
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.progress import DownloadColumn, TimeRemainingColumn
from rich.table import Table

from pgwarden.backup.create import (
    being_written,
    create_backup,
    local_source,
    remote_source,
    repository,
    require_running,
)
from pgwarden.backup.observe import Archiver, archiver
from pgwarden.backup.prune import apply_prune, plan_prune
from pgwarden.backup.repo import Contents
from pgwarden.backup.restore import (
    RecoveryTarget,
    plan_restore,
    replace_live,
    run_restore,
    staging_dir,
)
from pgwarden.backup.verify import incomplete_of, verify_backups, wal_gap
from pgwarden.cli.app import err_console, format_option, out, progress_bar
from pgwarden.cli.context import AppContext, pass_app
from pgwarden.cli.timeparse import TIME
from pgwarden.connect import connect
from pgwarden.errors import UserError
from pgwarden.history import HistorySchema
from pgwarden.history.read import transaction_began
from pgwarden.server.cluster import LocalServer
from pgwarden.sizes import format_size


@click.group("backup")
def backup_group() -> None:
    """Base backups, WAL archiving and point-in-time restores of the local server.

    Configured by `backup.location` in pgwarden.yaml (a directory, or s3://bucket/prefix
    like a `backup.s3` section); `pgwarden up` turns WAL archiving on there. `backup create`
    also backs up a server elsewhere (--dsn) that archives into the same location.

    \b
    Example:
      pgwarden backup create
      pgwarden backup list
      pgwarden backup restore --before-tx 7791 --target-dir ./restored --start
    """


@backup_group.command("create")
@click.option(
    "--incremental", is_flag=True, help="Only what changed since the newest backup (PG 17+)."
)
@pass_app
def create_cmd(app: AppContext, incremental: bool) -> None:
    """Take a base backup (with its manifest) into backup.location.

    Of the local server; or, given --dsn (or $PGWARDEN_DSN), of that server, which must
    archive its WAL into the same location (the statefulset flavor's CronJob runs this).
    A backup to S3 is streamed into the bucket, not staged on disk.

    \b
    Example:
      pgwarden backup create
      pgwarden backup create --incremental
      pgwarden --dsn 'host=db.example.com user=postgres dbname=postgres' backup create
    """
    elsewhere = app.explicit_target()
    if elsewhere is not None:
        source = remote_source(elsewhere, app.backup_repository())
    else:
        source = local_source(app.server())
    if sys.stderr.isatty():
        with progress_bar(DownloadColumn(), TimeRemainingColumn()) as bar:
            task = bar.add_task("backing up", total=None)

            def update(done_kb: int, total_kb: int) -> None:
                bar.update(task, completed=done_kb * 1024, total=total_kb * 1024)

            info = create_backup(source, incremental=incremental, progress=update)
    else:
        info = create_backup(source, incremental=incremental)
    err_console.print(
        f"{info.kind} backup {info.label}: {format_size(info.size_bytes)}, WAL {info.start_lsn} → "
        f"{info.stop_lsn} on timeline {info.timeline}; restorable from "
        f"{info.stop_time.isoformat(timespec='seconds')}"
    )
    click.echo(info.label)


def archiver_of(server: LocalServer) -> Archiver | None:
    """The archiver's state of the local server; None when it is not running."""
    if not server.is_running():
        return None
    with connect(require_running(server), autocommit=True) as conn:
        return archiver(conn)


def window(contents: Contents, state: Archiver | None) -> tuple[datetime | None, datetime | None]:
    """The earliest and (about) the latest moment a restore can reach: from the end of the
    oldest backup to the newest archived WAL; changes after that are not archived yet."""
    if not contents.backups:
        return None, None
    earliest = contents.backups[0].stop_time
    latest = contents.newest_segment_time
    if state is not None and state.last_archived_time is not None:
        latest = max(latest or state.last_archived_time, state.last_archived_time)
    if latest is not None and latest < contents.backups[-1].stop_time:
        latest = contents.backups[-1].stop_time
    return earliest, latest


@backup_group.command("list")
@format_option("table", "json")
@pass_app
def list_cmd(app: AppContext, fmt: str) -> None:
    """List backups, the recoverable window and the state of WAL archiving.

    \b
    Example:
      pgwarden backup list
      pgwarden backup list -o json | jq '.window'
    """
    server = app.server()
    repo = repository(server)
    contents = repo.observe()
    state = archiver_of(server)
    earliest, latest = window(contents, state)
    if fmt == "json":
        data: dict[str, Any] = {
            "location": repo.where,
            "backups": [b.to_json() for b in contents.backups],
            "window": {
                "earliest": earliest.isoformat() if earliest else None,
                "latest": latest.isoformat() if latest else None,
            },
            "archiver": state.to_json() if state else None,
            "missing_segment": wal_gap(contents),
            "incomplete": incomplete_of(server, contents),
        }
        click.echo(json.dumps(data, indent=2))
        return
    table = Table(header_style="bold")
    for col in ("label", "kind", "parent", "finished", "size", "WAL", "timeline"):
        table.add_column(col, overflow="fold")
    for b in contents.backups:
        table.add_row(
            b.label,
            b.kind,
            b.parent or "",
            b.stop_time.astimezone().strftime("%Y-%m-%d %H:%M:%S"),
            format_size(b.size_bytes),
            f"{b.start_lsn} → {b.stop_lsn}",
            str(b.timeline),
        )
    out.print(table)
    if earliest:
        assert latest is not None
        err_console.print(
            f"recoverable: {earliest.isoformat(timespec='seconds')} → about "
            f"{latest.isoformat(timespec='seconds')}"
        )
    else:
        err_console.print("no backups yet: `pgwarden backup create` takes one")
    for line in archiver_lines(state):
        err_console.print(line)
    gap = wal_gap(contents)
    if gap:
        err_console.print(f"[red]WAL segment {gap} is missing: no restore can pass it[/red]")
    for item in incomplete_of(server, contents):
        err_console.print(incomplete_line(item))


def incomplete_line(item: dict[str, str]) -> str:
    if item["state"] == "in progress":
        return f"{item['label']}: being written (no record yet)"
    return (
        f"[yellow]{item['label']}: interrupted before it finished (no record): not a backup, "
        "never restored from; `pgwarden backup prune` removes it[/yellow]"
    )


def archiver_lines(state: Archiver | None) -> list[str]:
    """What `status` and `backup list` say about archiving."""
    if state is None:
        return ["archiving: the server is not running"]
    if not state.active:
        return ["archiving: off"]
    lines = []
    if state.pending_restart:
        lines.append("archiving: waits for a restart (`pgwarden down && pgwarden up`)")
    last = (
        f"{state.last_archived_wal} at {state.last_archived_time.isoformat(timespec='seconds')}"
        if state.last_archived_wal and state.last_archived_time
        else "nothing yet"
    )
    lines.append(f"archiving: last archived {last}")
    if state.lag_bytes is not None:
        lines.append(f"archive lag: {format_size(state.lag_bytes)} of WAL not archived yet")
    if state.last_failed_wal and state.last_failed_time:
        when = state.last_failed_time.isoformat(timespec="seconds")
        if state.failing:
            lines.append(
                f"[red]archiving FAILS: {state.last_failed_wal} at {when} "
                f"({state.failed_count} failure(s)); `pgwarden logs` says why[/red]"
            )
        else:
            lines.append(f"last archive failure: {state.last_failed_wal} at {when} (recovered)")
    return lines


@backup_group.command("restore")
@click.option("--to-time", "to_time", type=TIME, help="The state at this time.")
@click.option("--to-latest", is_flag=True, help="Everything archived.")
@click.option("--to-lsn", help="The state at this WAL position (e.g. 0/3000060).")
@click.option(
    "--before-tx",
    type=int,
    help="The state just before this transaction (a tx from `pgwarden history`).",
)
@click.option(
    "--target-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="New data directory to restore into (absent or empty).",
)
@click.option("--start", is_flag=True, help="Leave it running on a free port; print its URL.")
@click.option(
    "--replace",
    is_flag=True,
    help="Instead of a new directory: put the restored data in place of the managed server's "
    "(stops it; the old data directory is kept aside, never deleted). Needs --yes.",
)
@click.option("--yes", "-y", is_flag=True, help="Confirm --replace.")
@pass_app
def restore_cmd(
    app: AppContext,
    to_time: datetime | None,
    to_latest: bool,
    to_lsn: str | None,
    before_tx: int | None,
    target_dir: Path | None,
    start: bool,
    replace: bool,
    yes: bool,
) -> None:
    """Restore a backup into a new data directory, recovered to a moment.

    Into a new directory, the managed cluster left as it is; or, with --replace --yes, in place
    of the managed server, its old data directory kept aside. The plan is printed first;
    recovery replays archived WAL to the target, promotes, and ends.

    \b
    Example:
      pgwarden backup restore --to-time '2026-12-02 10:15' --target-dir /srv/pg-restored
      pgwarden backup restore --before-tx 7791 --target-dir ./restored --start
      pgwarden backup restore --to-time 10m --replace --yes
    """
    chosen = [x for x in (to_time, to_lsn, before_tx) if x is not None] + ([1] if to_latest else [])
    if len(chosen) != 1:
        raise UserError(
            "say where to restore to: one of --to-time, --to-latest, --to-lsn, --before-tx"
        )
    if replace and (target_dir is not None or start):
        raise UserError(
            "--replace restores in place of the managed server: drop --target-dir and --start"
        )
    if not replace and target_dir is None:
        raise UserError(
            "say where to restore: --target-dir DIR (a new directory), or --replace --yes "
            "(in place of the managed server, keeping its old data aside)"
        )
    server = app.server()
    repo = repository(server)
    if replace and not server.state.exists():
        raise UserError(f"no managed server in {server.state.root} to replace")
    if to_time is not None:
        target = RecoveryTarget("time", time=to_time.astimezone(UTC))
    elif to_lsn is not None:
        _check_lsn(to_lsn)
        target = RecoveryTarget("lsn", lsn=to_lsn)
    elif before_tx is not None:
        with connect(app.target()) as conn:
            schema = HistorySchema(app.loaded.config.history.schema_name)
            began = transaction_began(conn, before_tx, schema=schema)
        target = RecoveryTarget("xid", xid=before_tx, xid_began=began)
    else:
        target = RecoveryTarget("latest")
    live = server.state.data_dir if server.state.exists() else None
    into = staging_dir(server) if replace else target_dir
    assert into is not None
    plan = plan_restore(repo.observe(), repo, target, into.absolute(), live_data_dir=live)
    err_console.print(f"restore plan (backup {plan.backup.label}):")
    for step in plan.steps:
        err_console.print(f"  - {step}")
    if replace:
        err_console.print(
            f"  - stop the managed server, move {server.state.data_dir} aside (kept), put the "
            "restored data in its place, start it"
        )
        if not yes:
            raise UserError(
                "--replace stops the server and swaps its data directory: nothing was done",
                hint="add --yes to go ahead (the current data is kept aside, not deleted)",
            )
    err_console.print("restoring…")
    result = run_restore(server, plan, start=start)
    if replace:
        aside = replace_live(server, result.target_dir, repo)
        if result.stopped_at:
            err_console.print(f"recovery: {result.stopped_at}")
        err_console.print(
            f"the managed server now runs the restored data on port {server.port}; its "
            f"previous data directory is kept in {aside}"
        )
        return
    if result.stopped_at:
        err_console.print(f"recovery: {result.stopped_at}")
    if start:
        assert result.url is not None
        err_console.print(
            f"restored server running on port {result.port} (data in {result.target_dir}); "
            f"stop it with: {server.tool('pg_ctl')} stop -D {result.target_dir}"
        )
        click.echo(result.url)
    else:
        err_console.print(
            f"restored into {result.target_dir} (stopped; log in {result.log_file}); "
            "--start runs it"
        )


def _check_lsn(text: str) -> None:
    if not re.fullmatch(r"[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}", text):
        raise UserError(f"--to-lsn {text!r} is not a WAL position", hint="e.g. 0/3000060")


@backup_group.command("verify")
@format_option("table", "json")
@click.pass_context
def verify_cmd(ctx: click.Context, fmt: str) -> None:
    """Check every backup against its manifest (pg_verifybackup) and the archived WAL for gaps.

    Exits 1 when a check fails, naming the backup or the first missing WAL segment.

    \b
    Example:
      pgwarden backup verify
    """
    app = ctx.find_object(AppContext)
    assert app is not None
    server = app.server()
    repo = repository(server)
    report = verify_backups(server, repo)
    if fmt == "json":
        click.echo(json.dumps(report.to_json(), indent=2))
        ctx.exit(0 if report.ok else 1)
    for check in report.backups:
        mark = "ok" if check.ok else "[red]FAILED[/red]"
        out.print(f"{check.label}: {mark}  {check.detail}", markup=True)
    if not report.backups:
        out.print("no backups to verify")
    for label in report.unreadable:
        out.print(f"[red]{label}: no readable pgwarden-backup.json[/red]")
    for item in report.incomplete:
        out.print(incomplete_line(item))
    if report.missing_segment:
        out.print(
            f"[red]WAL chain broken: segment {report.missing_segment} is missing[/red] "
            "(restores cannot reach past it; take a new backup)"
        )
    elif report.backups:
        out.print("WAL chain: complete from the oldest backup to the newest archived segment")
    ctx.exit(0 if report.ok else 1)


@backup_group.command("prune")
@click.option("--dry-run", is_flag=True, help="Show what would be removed, remove nothing.")
@pass_app
def prune_cmd(app: AppContext, dry_run: bool) -> None:
    """Remove backups beyond backup.keep / backup.keep_days, and WAL no kept backup needs.

    An incremental backup goes only with the full backup it was built on. Interrupted
    backups (no record: a create killed midway) go too.

    \b
    Example:
      pgwarden backup prune --dry-run
      pgwarden backup prune
    """
    server = app.server()
    repo = repository(server)
    backup = app.loaded.config.backup
    contents = repo.observe()
    plan = plan_prune(
        contents, keep=backup.keep, keep_days=backup.keep_days, now=datetime.now(UTC),
        writing=being_written(server, contents),
    )  # fmt: skip
    verb = "would remove" if dry_run else "removing"
    for label in plan.remove_interrupted:
        out.print(f"{verb} interrupted backup {label} (it has no record: it never finished)")
    for info in plan.remove_backups:
        out.print(f"{verb} backup {info.label} ({info.kind}, {format_size(info.size_bytes)})")
    if plan.remove_segments:
        out.print(
            f"{verb} {len(plan.remove_segments)} WAL segment(s): {plan.remove_segments[0]} … "
            f"{plan.remove_segments[-1]}"
        )
    if plan.empty:
        out.print("nothing to prune")
    out.print(f"keeping {len(plan.keep_backups)} backup(s)")
    if not dry_run:
        apply_prune(repo, plan)
