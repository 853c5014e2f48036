"""The WAL capture consumer in Kubernetes (history.capture: wal).

It is `pgwarden history follow --wait`, run from `kubernetes.tools_image` (an image with
pgwarden in it: deploy/Dockerfile builds one on the postgres image). `--wait` because it starts
beside a server that is not up yet, and must outlive its restarts and failovers: the slot keeps
every change meanwhile, so nothing is lost while it reconnects.

- statefulset: a second container of the server's pod. It reaches the server through the pod's
  shared socket directory, as the image's `postgres` user (peer authentication, a superuser):
  no password, no network hop, and it moves with the pod.
- cloudnative-pg: a Deployment of one pod that connects to the primary's `-rw` Service as the
  managed role `pgwarden_consumer` (LOGIN REPLICATION, member of the history owner), whose
  password Secret the user creates, as for every other login role. After a failover the slot is
  on the new primary (logical slot synchronisation, PostgreSQL 17+) and the consumer reconnects
  to it through the same Service.

The consumer reads a pgwarden.yaml of its own, from a ConfigMap: only what it needs (the
database and the history schema), never a secret.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from pgwarden.config import Config
from pgwarden.kube.objects import Manifest, labels, meta, pod_security, require_tools_image

CONTAINER = "history-consumer"
ROLE = "pgwarden_consumer"  # cloudnative-pg: the consumer's login role
CONFIG_MOUNT = "/etc/pgwarden-consumer"
SOCKET_DIR = "/var/run/postgresql"
COMMAND = ["pgwarden", "--config", f"{CONFIG_MOUNT}/pgwarden.yaml", "history", "follow", "--wait"]
RESOURCES = {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}


def tools_image(config: Config) -> str:
    return require_tools_image(
        config,
        needs="history.capture: wal needs a consumer in the cluster",
        otherwise="or keep history.capture: trigger for Kubernetes",
    )


def config_map_name(config: Config) -> str:
    return f"{config.kubernetes.name}-history-consumer"


def config_map(config: Config) -> Manifest:
    """The consumer's pgwarden.yaml: where history lives, nothing else."""
    text = yaml.safe_dump(
        {"database": config.database, "history": {"schema": config.history.schema_name}},
        sort_keys=False,
    )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta(config.kubernetes, config_map_name(config)),
        "data": {"pgwarden.yaml": text},
    }


def _container(
    config: Config, *, env: list[dict[str, Any]], mounts: list[dict[str, Any]],
    security: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    return {
        "name": CONTAINER,
        "image": tools_image(config),
        "imagePullPolicy": "IfNotPresent",
        "command": COMMAND,
        # HOME: pgwarden's log of unexpected errors goes under it; the root is read-only.
        "env": [{"name": "HOME", "value": "/tmp"}, *env],  # noqa: S108 - an emptyDir
        "securityContext": copy.deepcopy(security),  # its own copy: no YAML alias
        "resources": copy.deepcopy(RESOURCES),
        "volumeMounts": [
            {"name": "history-consumer", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - a volume mount path
            *mounts,
        ],
    }


def config_volume(config: Config) -> dict[str, Any]:
    return {"name": "history-consumer", "configMap": {"name": config_map_name(config)}}


def sidecar(config: Config, *, security: dict[str, Any]) -> dict[str, Any]:
    """The consumer as a container of the statefulset's pod (mounting its socket directory)."""
    dsn = f"host={SOCKET_DIR} dbname={config.database} user=postgres"
    return _container(
        config,
        env=[{"name": "PGWARDEN_DSN", "value": dsn}],
        mounts=[{"name": "run", "mountPath": SOCKET_DIR}],
        security=security,
    )


def password_secret(config: Config) -> str:
    return f"{config.kubernetes.name}-role-{ROLE}".replace("_", "-")


def deployment(config: Config, *, security: dict[str, Any], uid: int) -> Manifest:
    """cloudnative-pg: the consumer as a Deployment of one, on the primary's Service."""
    k8s = config.kubernetes
    dsn = f"host={k8s.name}-rw port=5432 dbname={config.database} user={ROLE} sslmode=require"
    pod_labels = {**labels(k8s), "app.kubernetes.io/name": "pgwarden-history-consumer"}
    container = _container(
        config,
        env=[
            {"name": "PGWARDEN_DSN", "value": dsn},
            {
                "name": "PGPASSWORD",
                "valueFrom": {"secretKeyRef": {"name": password_secret(config), "key": "password"}},
            },
        ],
        mounts=[],
        security=security,
    )
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(k8s, f"{k8s.name}-history-consumer"),
        "spec": {
            "replicas": 1,
            # Never two at once during a rollout (they would only queue on the advisory lock).
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": dict(pod_labels)},
            "template": {
                "metadata": {"labels": dict(pod_labels)},
                "spec": {
                    "enableServiceLinks": False,
                    "automountServiceAccountToken": False,
                    "securityContext": pod_security(uid),
                    "containers": [container],
                    "volumes": [config_volume(config), {"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    }
