"""Talking to a cluster through kubectl (server-side apply, diff, status, exec)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence

from pgwarden.errors import UserError


def kubectl() -> str:
    exe = shutil.which("kubectl")
    if exe is None:
        raise UserError(
            "kubectl is not installed (or not on PATH)",
            hint="install kubectl and point it at your cluster (kubectl config current-context)",
        )
    return exe


def run(args: Sequence[str], *, stdin: str | None = None, ok_codes: tuple[int, ...] = (0,)) -> str:
    result = subprocess.run(
        [kubectl(), *args], input=stdin, capture_output=True, text=True, check=False, timeout=300
    )
    if result.returncode not in ok_codes:
        message = (result.stderr or result.stdout).strip().splitlines()
        raise UserError(
            f"kubectl {' '.join(args[:2])} failed: {message[-1] if message else result.returncode}",
            hint="check `kubectl config current-context` and that the cluster is reachable",
        )
    return result.stdout


def apply(stream: str, *, dry_run: bool) -> str:
    if dry_run:
        # kubectl diff exits 1 when there are differences: that is a result, not an error.
        return run(["diff", "--server-side", "--field-manager=pgwarden", "-f", "-"],
                   stdin=stream, ok_codes=(0, 1))  # fmt: skip
    return run(["apply", "--server-side", "--field-manager=pgwarden", "-f", "-"], stdin=stream)


def status(namespace: str, name: str, flavor: str) -> str:
    """Workload, pods (with readiness, and which is primary), claims and services."""
    if flavor == "cloudnative-pg":
        selector = f"cnpg.io/cluster={name}"
        cluster = run(["get", "clusters.postgresql.cnpg.io", name, "-n", namespace])
        rest = run(["get", "pods,pvc,services", "-n", namespace, "-l", selector,
                    "-L", "cnpg.io/instanceRole", "-o", "wide"])  # fmt: skip
        return cluster + rest
    selector = f"app.kubernetes.io/instance={name},app.kubernetes.io/managed-by=pgwarden"
    return run(["get", "statefulsets,pods,pvc,services", "-n", namespace, "-l", selector,
                "-o", "wide"])  # fmt: skip


def primary_pod(namespace: str, name: str, flavor: str) -> str:
    if flavor != "cloudnative-pg":
        return f"{name}-0"  # the single instance
    found = run(["get", "pods", "-n", namespace, "-o", "name", "-l",
                 f"cnpg.io/cluster={name},cnpg.io/instanceRole=primary"]).split()  # fmt: skip
    if not found:
        raise UserError(
            f"no primary pod of cluster {name} in namespace {namespace}",
            hint="`pgwarden k8s status` shows what runs",
        )
    return found[0].removeprefix("pod/")


def exec_psql(namespace: str, pod: str, database: str, extra: Sequence[str]) -> None:
    exe = kubectl()
    argv = [exe, "exec", "-it", "-n", namespace, pod, "--", "psql", "-U", "postgres", "-d",
            database, *extra]  # fmt: skip
    os.execv(exe, argv)  # noqa: S606 - replace ourselves with kubectl, no shell
