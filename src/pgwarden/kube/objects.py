"""What every rendered object shares: its type, its metadata and the labels that select it."""

from __future__ import annotations

from typing import Any

from pgwarden.config import Config, KubernetesConfig
from pgwarden.errors import ConfigError

Manifest = dict[str, Any]


def meta(k8s: KubernetesConfig, name: str, *, namespaced: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespaced:
        meta["namespace"] = k8s.namespace
    meta["labels"] = labels(k8s)
    return meta


def pod_security(uid: int, **volumes: Any) -> dict[str, Any]:
    """Every pod pgwarden renders runs as `uid`, never root, under the runtime's default
    seccomp profile; `volumes` adds what its volumes need (fsGroup, fsGroupChangePolicy)."""
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        **volumes,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def labels(k8s: KubernetesConfig) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "postgresql",
        "app.kubernetes.io/instance": k8s.name,
        "app.kubernetes.io/managed-by": "pgwarden",
    }


def selector(k8s: KubernetesConfig) -> dict[str, str]:
    """The server's pods (and nothing else: the backup job's pods carry another name)."""
    return {"app.kubernetes.io/name": "postgresql", "app.kubernetes.io/instance": k8s.name}


def efs_storage_class(
    k8s: KubernetesConfig, name: str, *, file_system_id: str, directory_perms: str, uid: int,
    gid: int, base_path: str,
) -> Manifest:  # fmt: skip
    """An EFS StorageClass giving each claim an access point of its own that forces `uid`/`gid`
    (so nothing needs to chown, which access points forbid); volumes are retained."""
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": meta(k8s, name, namespaced=False),
        "provisioner": "efs.csi.aws.com",
        "parameters": {
            "provisioningMode": "efs-ap",
            "fileSystemId": file_system_id,
            "directoryPerms": directory_perms,
            "uid": str(uid),
            "gid": str(gid),
            "basePath": base_path,
        },
        "reclaimPolicy": "Retain",
        "volumeBindingMode": "Immediate",
    }


def require_tools_image(config: Config, *, needs: str, otherwise: str) -> str:
    """kubernetes.tools_image (an image with pgwarden in it), where `needs` says what runs
    pgwarden in the cluster; without it a ConfigError whose hint ends with `otherwise`."""
    image = config.kubernetes.tools_image
    if image is None:
        raise ConfigError(
            f"{needs}, and kubernetes.tools_image is not set",
            hint="build an image with pgwarden in it (deploy/Dockerfile: the postgres image "
            f"plus pgwarden), push it and set kubernetes.tools_image; {otherwise}",
        )
    return image
