"""`pgwarden k8s render` as one function: check, bootstrap, render, validate."""

from __future__ import annotations

from pathlib import Path

from pgwarden.config import Config
from pgwarden.errors import UserError
from pgwarden.kube.bootstrap import bootstrap_files
from pgwarden.kube.cnpg import OWNER, RestoreRequest, check_cnpg, render_cnpg
from pgwarden.kube.render import Rendered, check_config, k8s_password, render_statefulset
from pgwarden.kube.validate import validate_objects


def render(
    config: Config,
    state_dir: Path,
    *,
    pg_bin: Path | None = None,
    version: str | None = None,
    restore: RestoreRequest | None = None,
) -> Rendered:
    k8s = config.kubernetes
    if restore is not None:
        if k8s.flavor != "cloudnative-pg":
            raise UserError(
                "--restore-to-time renders a recovered cloudnative-pg cluster; the statefulset "
                "flavor is restored with `pgwarden backup restore` from its backup volume",
                hint="mount the backup volume where pgwarden runs, set backup.location to it, "
                "and run `pgwarden backup restore --to-time T --target-dir DIR`",
            )
        rendered = render_cnpg(config, {}, restore)
    elif k8s.flavor == "cloudnative-pg":
        check_cnpg(config)
        # CloudNativePG's initdb creates the database owner itself: plan with it present.
        rendered = render_cnpg(config, bootstrap_files(config, pg_bin, existing_roles=[OWNER]))
    else:
        check_config(config)  # refuse bad settings before starting anything
        password = None if k8s.existing_secret else k8s_password(state_dir)
        rendered = render_statefulset(config, bootstrap_files(config, pg_bin), password)
    report = validate_objects(rendered.objects, version or k8s.kubernetes_version)
    if not report.ok:
        raise UserError(
            "the rendered objects do not validate:\n  " + "\n  ".join(report.errors),
            hint="a pgwarden bug unless the config asks for something odd; nothing was written",
        )
    rendered.warnings.extend(report.warnings)
    return rendered
