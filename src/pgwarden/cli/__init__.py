"""The `pgwarden` command: parses arguments, calls the core, renders results. Nothing more."""

from __future__ import annotations

import sys

import click

from pgwarden import __version__
from pgwarden.cli.access_cmds import access_group
from pgwarden.cli.app import GuardedGroup, run_guarded
from pgwarden.cli.backup_cmds import backup_group
from pgwarden.cli.config_cmds import config_group, init_cmd
from pgwarden.cli.context import AppContext
from pgwarden.cli.converge_cmds import apply_cmd, check_cmd, plan_cmd
from pgwarden.cli.history_cmds import COMMANDS as HISTORY_COMMANDS
from pgwarden.cli.k8s_cmds import k8s_group
from pgwarden.cli.server_cmds import down_cmd, logs_cmd, psql_cmd, status_cmd, up_cmd, url_cmd
from pgwarden.cli.ui_cmds import ui_cmd


@click.group(
    cls=GuardedGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="Example: pgwarden init && pgwarden up && pgwarden psql",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=str),
    help="pgwarden.yaml to use (default: $PGWARDEN_CONFIG, then ./pgwarden.yaml).",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=str),
    help="Where the local server keeps data, logs and its password (default: .pgwarden/ "
    "beside the config).",
)
@click.option(
    "--dsn",
    help="Database to work on (default: $PGWARDEN_DSN, $DATABASE_URL, PG* variables, then the "
    "local server).",
)
@click.version_option(__version__, prog_name="pgwarden")
@click.pass_context
def cli(
    ctx: click.Context, config_path: str | None, state_dir: str | None, dsn: str | None
) -> None:
    """pgwarden runs a PostgreSQL that loses no data, remembers every change made to it, and
    guards its schema, from one config file (pgwarden.yaml)."""
    ctx.obj = AppContext.create(config_path, state_dir, dsn)


for command in (
    init_cmd,
    config_group,
    up_cmd,
    down_cmd,
    status_cmd,
    url_cmd,
    psql_cmd,
    logs_cmd,
    plan_cmd,
    apply_cmd,
    check_cmd,
    *HISTORY_COMMANDS,
    access_group,
    backup_group,
    k8s_group,
    ui_cmd,
):
    cli.add_command(command)


def main(argv: list[str] | None = None) -> None:
    sys.exit(run_guarded(cli, argv))
