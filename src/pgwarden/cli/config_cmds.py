"""`pgwarden init` and `pgwarden config …`."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import click

from pgwarden.cli.app import out
from pgwarden.cli.context import AppContext, pass_app
from pgwarden.config import DEFAULT_CONFIG_NAME, config_json_schema
from pgwarden.errors import UserError


def starter_config() -> str:
    return resources.files("pgwarden").joinpath("templates/pgwarden.yaml").read_text()


@click.command("init")
@click.argument("path", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def init_cmd(path: Path | None, force: bool) -> None:
    """Write an annotated starter pgwarden.yaml.

    \b
    Example:
      pgwarden init              # ./pgwarden.yaml
      pgwarden init prod.yaml
    """
    target = path or Path.cwd() / DEFAULT_CONFIG_NAME
    if target.exists() and not force:
        raise UserError(
            f"{target} already exists; left unchanged",
            hint="edit it, or pass --force to replace it with the starter file",
        )
    target.write_text(starter_config())
    out.print(f"wrote {target}; next: pgwarden up")


@click.group("config")
def config_group() -> None:
    """Inspect pgwarden.yaml.

    \b
    Example:
      pgwarden config schema > pgwarden.schema.json
      pgwarden config show
    """


@config_group.command("schema")
def schema_cmd() -> None:
    """Print the JSON Schema of pgwarden.yaml.

    \b
    Example:
      pgwarden config schema | jq '.properties | keys'
    """
    click.echo(json.dumps(config_json_schema(), indent=2))


@config_group.command("show")
@pass_app
def show_cmd(app: AppContext) -> None:
    """Validate the config and print it with every default filled in (JSON).

    \b
    Example:
      pgwarden --config prod.yaml config show
    """
    loaded = app.loaded
    source = str(loaded.path) if loaded.path else "(no pgwarden.yaml found: defaults)"
    click.echo(f"# {source}", err=True)
    click.echo(json.dumps(loaded.config.model_dump(mode="json", by_alias=True), indent=2))
