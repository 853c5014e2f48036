"""`pgwarden plan | apply | check`: converge the database to pgwarden.yaml."""

from __future__ import annotations

import json

import click
from rich.syntax import Syntax

from pgwarden.cli.app import err_console, format_option, out
from pgwarden.cli.context import AppContext, pass_app
from pgwarden.connect import connect
from pgwarden.converge import Conn, apply_config, build_plan
from pgwarden.plan import Operation, Plan


def _subject(op: Operation) -> str:
    """What an operation is about ("role alice", "table public.t"): its description up to ':'."""
    head, sep, _ = op.description.partition(":")
    return head if sep else op.domain


def _print_plan(plan: Plan, conn: Conn, fmt: str) -> None:
    if fmt == "json":
        click.echo(
            json.dumps(
                [
                    {
                        "step": number,
                        "domain": op.domain,
                        "subject": _subject(op),
                        "description": op.description,
                        "sql": op.render(conn),
                    }
                    for number, op in enumerate(plan, 1)
                ],
                indent=2,
            )
        )
        return
    for warning in plan.warnings:
        err_console.print(f"warning: {warning}", markup=False)
    if not plan:
        out.print("nothing to do: the database matches the config")
        return
    # Grouped by domain, then by role or object; the step numbers give the order apply runs in.
    groups: dict[tuple[str, str], list[tuple[int, Operation]]] = {}
    for number, op in enumerate(plan, 1):
        groups.setdefault((op.domain, _subject(op)), []).append((number, op))
    for (domain, subject), ops in groups.items():
        out.print(f"[bold]{domain} · {subject}[/bold]", markup=True, highlight=False)
        for number, op in ops:
            out.print(f"  {number}. {op.description}", markup=False, highlight=False)
            out.print(Syntax(op.render(conn) + ";", "sql", word_wrap=True))


@click.command("plan")
@format_option("text", "json", default="text")
@pass_app
def plan_cmd(app: AppContext, fmt: str) -> None:
    """Show what `apply` would change, with the exact SQL.

    \b
    Example:
      pgwarden plan
      pgwarden --dsn postgresql://admin@db/app plan --format json
    """
    config = app.loaded.config
    with connect(app.target()) as conn:
        _print_plan(build_plan(conn, config), conn, fmt)


@click.command("apply")
@pass_app
def apply_cmd(app: AppContext) -> None:
    """Converge the database to pgwarden.yaml (one transaction where possible; idempotent).

    \b
    Example:
      pgwarden apply
    """
    config = app.loaded.config
    with connect(app.target()) as conn:
        done = apply_config(conn, config)
    if done:
        out.print(f"applied {len(done)} change(s)")
    else:
        out.print("nothing to do: the database matches the config")


@click.command("check")
@format_option("text", "json", default="text")
@click.pass_context
def check_cmd(ctx: click.Context, fmt: str) -> None:
    """Exit 1 when the database has drifted from pgwarden.yaml (for CI pipelines).

    With --format json it prints the plan as `plan --format json` does, and exits the same way.

    \b
    Example:
      pgwarden check || pgwarden plan
    """
    app = ctx.find_object(AppContext)
    assert app is not None
    with connect(app.target()) as conn:
        plan = build_plan(conn, app.loaded.config)
        if fmt == "json":
            _print_plan(plan, conn, fmt)
            ctx.exit(1 if plan else 0)
    if plan:
        err_console.print(f"drift: {len(plan)} change(s) needed; `pgwarden plan` shows them")
        ctx.exit(1)
    out.print("in sync: the database matches the config")
