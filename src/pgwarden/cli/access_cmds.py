"""`pgwarden access report`."""

from __future__ import annotations

import json

import click
from rich.table import Table

from pgwarden.access import access_report
from pgwarden.cli.app import out
from pgwarden.cli.context import AppContext, pass_app
from pgwarden.connect import connect


@click.group("access")
def access_group() -> None:
    """Roles and privileges (declared under `access:` in pgwarden.yaml).

    `pgwarden plan`, `apply` and `check` converge them; this group inspects them.

    \b
    Example:
      pgwarden access report
    """


@access_group.command("report")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@pass_app
def report_cmd(app: AppContext, fmt: str) -> None:
    """Who can do what: roles, memberships, owners, table and column privileges, and who may
    change the schema.

    \b
    Example:
      pgwarden access report
      pgwarden access report --format json | jq '.schema_changers'
    """
    with connect(app.target()) as conn:
        report = access_report(conn, app.loaded.config)
    if fmt == "json":
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    sections = [
        ("Roles", ["role", "login", "superuser", "member_of"], report.roles),
        ("Owners", ["kind", "schema", "name", "owner"], report.owners),
        ("Table privileges", ["grantee", "table", "privileges"], report.table_privileges),
        (
            "Column privileges",
            ["grantee", "table", "column", "privilege"],
            report.column_privileges,
        ),
        ("Who may change the schema", ["owner", "members", "superusers"], report.schema_changers),
    ]
    for title, columns, rows in sections:
        table = Table(title=title, title_justify="left", header_style="bold")
        for col in columns:
            table.add_column(col, overflow="fold")
        for row in rows:
            table.add_row(
                *(
                    ", ".join(v) if isinstance(v, list) else str(v)
                    for v in (row[c] for c in columns)
                )
            )
        out.print(table)
