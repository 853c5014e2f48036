"""What every rendered object shares: its type, its metadata and the labels that select it."""

from __future__ import annotations

from typing import Any

from pgwarden.config import KubernetesConfig

Manifest = dict[str, Any]


def meta(k8s: KubernetesConfig, name: str, *, namespaced: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespaced:
        meta["namespace"] = k8s.namespace
    meta["labels"] = labels(k8s)
    return meta


def labels(k8s: KubernetesConfig) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "postgresql",
        "app.kubernetes.io/instance": k8s.name,
        "app.kubernetes.io/managed-by": "pgwarden",
    }


def selector(k8s: KubernetesConfig) -> dict[str, str]:
    """The server's pods (and nothing else: the backup job's pods carry another name)."""
    return {"app.kubernetes.io/name": "postgresql", "app.kubernetes.io/instance": k8s.name}
