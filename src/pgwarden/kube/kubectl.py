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


def status(namespace: str, selector: str) -> str:
    return run(["get", "statefulsets,pods,pvc,services", "-n", namespace, "-l", selector,
                "-o", "wide"])  # fmt: skip


def exec_psql(namespace: str, pod: str, database: str, extra: Sequence[str]) -> None:
    exe = kubectl()
    argv = [exe, "exec", "-it", "-n", namespace, pod, "--", "psql", "-U", "postgres", "-d",
            database, *extra]  # fmt: skip
    os.execv(exe, argv)  # noqa: S606 - replace ourselves with kubectl, no shell
