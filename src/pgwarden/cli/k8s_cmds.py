"""`pgwarden k8s render | validate | apply | status | psql`."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

import click

from pgwarden.cli.app import err_console, out
from pgwarden.cli.context import AppContext, pass_app
from pgwarden.cli.timeparse import TIME
from pgwarden.errors import UserError
from pgwarden.kube import kubectl
from pgwarden.kube.cnpg import RestoreRequest
from pgwarden.kube.output import read_objects, write_dir
from pgwarden.kube.service import render
from pgwarden.kube.validate import SUPPORTED, validate_objects
from pgwarden.server.local import default_state_dir


def _state_dir(app: AppContext) -> Path:
    return app.state_dir or default_state_dir(app.loaded.path)


@click.group("k8s")
def k8s_group() -> None:
    """Kubernetes: render, validate and apply manifests from the `kubernetes` section.

    \b
    Example:
      pgwarden k8s render --out deploy/
      pgwarden k8s apply --dry-run
    """


@k8s_group.command("render")
@click.option(
    "--flavor",
    type=click.Choice(["statefulset", "cloudnative-pg"]),
    help="Override kubernetes.flavor.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write one file per object here.",
)
@click.option(
    "--pg-bin",
    type=click.Path(file_okay=False, path_type=Path),
    help="PostgreSQL used to plan the bootstrap SQL.",
)
@click.option(
    "--restore-to-time",
    "restore_to",
    type=TIME,
    help="Render instead a new cloudnative-pg cluster recovered from the backups to this time.",
)
@click.option(
    "--restore-as",
    metavar="NAME",
    help="The recovered cluster's name (default: <kubernetes.name>-restored).",
)
@pass_app
def render_cmd(
    app: AppContext,
    flavor: str | None,
    out_dir: Path | None,
    pg_bin: Path | None,
    restore_to: datetime | None,
    restore_as: str | None,
) -> None:
    """Render the manifests (validated offline) to stdout, or to --out DIR with a kustomization.

    \b
    Example:
      pgwarden k8s render > postgres.yaml
      pgwarden k8s render --out deploy/ && kubectl apply -k deploy/
      pgwarden k8s render --restore-to-time '2026-12-02 10:15' | kubectl apply -f -
    """
    config = app.loaded.config
    restore = None
    if restore_as is not None and restore_to is None:
        raise UserError("--restore-as names the cluster of --restore-to-time, which is missing")
    if restore_to is not None:
        name = restore_as or f"{config.kubernetes.name}-restored"
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,48}[a-z0-9])?", name):
            raise UserError(f"--restore-as {name!r} is not a Kubernetes name (a DNS label)")
        restore = RestoreRequest(to_time=restore_to, name=name)
    if flavor:
        config = config.model_copy(
            update={"kubernetes": config.kubernetes.model_copy(update={"flavor": flavor})}
        )
    rendered = render(config, _state_dir(app), pg_bin=pg_bin, restore=restore)
    for warning in rendered.warnings:
        err_console.print(f"warning: {warning}", markup=False)
    if out_dir:
        written = write_dir(rendered.objects, out_dir)
        err_console.print(f"wrote {len(written)} files to {out_dir}", markup=False)
    else:
        click.echo(rendered.stream(), nl=False)


@k8s_group.command("validate")
@click.argument("path", required=False, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--kubernetes-version", type=click.Choice(SUPPORTED), help="Schemas to check against."
)
@click.pass_context
def validate_cmd(ctx: click.Context, path: Path | None, kubernetes_version: str | None) -> None:
    """Validate manifests offline (a file or a directory; default: render them first).

    Exits 1 when something is wrong.

    \b
    Example:
      pgwarden k8s validate deploy/ --kubernetes-version 1.29
    """
    app = ctx.find_object(AppContext)
    assert app is not None
    version = kubernetes_version or app.loaded.config.kubernetes.kubernetes_version
    if path is None:
        objects = render(app.loaded.config, _state_dir(app), version=version).objects
    else:
        objects = read_objects(path)
        if not objects:
            raise UserError(f"no Kubernetes objects in {path}")
    report = validate_objects(objects, version)
    for warning in report.warnings:
        err_console.print(f"warning: {warning}", markup=False)
    for error in report.errors:
        out.print(f"✗ {error}", markup=False)
    if report.errors:
        ctx.exit(1)
    out.print(f"{len(objects)} object(s) valid for Kubernetes {version}")


@k8s_group.command("apply")
@click.option("--dry-run", is_flag=True, help="Show `kubectl diff` instead of applying.")
@pass_app
def apply_cmd(app: AppContext, dry_run: bool) -> None:
    """Render, validate and server-side apply the manifests with kubectl.

    \b
    Example:
      pgwarden k8s apply --dry-run
      pgwarden k8s apply
    """
    kubectl.kubectl()  # fail early and clearly when kubectl is missing
    rendered = render(app.loaded.config, _state_dir(app))
    click.echo(kubectl.apply(rendered.stream(), dry_run=dry_run), nl=False)


@k8s_group.command("status")
@pass_app
def status_cmd(app: AppContext) -> None:
    """Pods, claims and services of the deployed database.

    \b
    Example:
      pgwarden k8s status
    """
    k8s = app.loaded.config.kubernetes
    click.echo(kubectl.status(k8s.namespace, k8s.name, k8s.flavor), nl=False)


@k8s_group.command("psql", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@pass_app
def psql_cmd(app: AppContext, args: tuple[str, ...]) -> None:
    """psql in the (primary) pod: the seed's `kubectl exec -it postgres-0 -- psql -U postgres`.

    \b
    Example:
      pgwarden k8s psql -c 'SELECT 1'
    """
    config = app.loaded.config
    k8s = config.kubernetes
    pod = kubectl.primary_pod(k8s.namespace, k8s.name, k8s.flavor)
    kubectl.exec_psql(k8s.namespace, pod, config.database, args)
