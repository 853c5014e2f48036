"""Rendering Kubernetes objects from pgwarden.yaml (the statefulset flavor).

Plain dicts in a fixed order, dumped as YAML with stable key order: the same config (and the same
generated password in the state directory) gives byte-identical output.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pgwarden.config import Config, KubernetesConfig
from pgwarden.errors import ConfigError
from pgwarden.kube import backups, consumer
from pgwarden.kube.objects import (
    Manifest,
    efs_storage_class,
    labels,
    meta,
    pod_security,
    selector,
)
from pgwarden.server import pgconf

PG_PORT = 5432
PGDATA_MOUNT = "/var/lib/postgresql/data"
PGDATA = f"{PGDATA_MOUNT}/pgdata"  # a subdirectory: volumes may carry lost+found at their root
CONFIG_DIR = "/etc/pgwarden"
POSTGRES_UID = 999  # the official postgres image's user
DEFAULT_IMAGE = "postgres:18"
CONTAINER_SECURITY: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
}


@dataclass
class Rendered:
    objects: list[Manifest]
    warnings: list[str] = field(default_factory=list)

    def stream(self) -> str:
        return "".join("---\n" + dump(obj) for obj in self.objects)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (config files, SQL) as readable literal blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(obj: Manifest) -> str:
    return yaml.dump(
        obj,
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        width=100,
        allow_unicode=True,
    )


def check_storage(k8s: KubernetesConfig) -> None:
    """Settings every flavor needs for its storage kind."""
    storage = k8s.storage
    if storage.kind in ("efs", "efs-static") and storage.efs is None:
        raise ConfigError(
            f"kubernetes.storage.efs.file_system_id is required for storage kind {storage.kind}",
            hint="add `efs: {file_system_id: fs-0123456789abcdef0}` under kubernetes.storage",
        )
    if storage.kind == "existing" and not storage.class_name:
        raise ConfigError(
            "kubernetes.storage.class_name is required for storage kind existing",
            hint="name a StorageClass that exists in the cluster",
        )


def check_config(config: Config) -> list[str]:
    """Refuse unsafe or incomplete settings; return warnings for questionable ones."""
    k8s = config.kubernetes
    storage = k8s.storage
    warnings: list[str] = []
    if k8s.flavor == "statefulset" and k8s.replicas > 1:
        shared = storage.kind in ("efs", "efs-static")
        raise ConfigError(
            f"kubernetes.replicas: {k8s.replicas} instances of the statefulset flavor "
            + (
                "would run several postmasters on one shared PGDATA: the classic way to corrupt "
                "a cluster (EFS locking is advisory and does not stop it)"
                if shared
                else "would be independent primaries with diverging data, not replicas"
            ),
            hint="keep replicas: 1, or use flavor: cloudnative-pg for real high availability "
            "(streaming replicas, each on its own volume, with automatic failover)",
        )
    check_storage(k8s)
    # Refused now, before the bootstrap is planned.
    if config.history.uses_wal:
        consumer.tools_image(config)
    if _s3_backups(config):
        backups.s3_tools_image(config)
    if storage.kind in ("efs", "efs-static"):
        warnings.append(
            "PGDATA on EFS: every write and fsync crosses the network (~2.7 ms each), locking is "
            "advisory only, and AWS lists EBS, not EFS, for databases. EBS (storage.kind: ebs) is "
            "the better home for PGDATA; EFS or S3 is the better place for backups."
        )
    return warnings


def storage_class_name(k8s: KubernetesConfig) -> str:
    storage = k8s.storage
    if storage.kind == "existing":
        assert storage.class_name is not None
        return storage.class_name
    return {
        "ebs": f"{k8s.name}-gp3",
        "efs": f"{k8s.name}-efs",
        "efs-static": f"{k8s.name}-efs-static",
    }[storage.kind]


def storage_objects(k8s: KubernetesConfig) -> list[Manifest]:
    storage = k8s.storage
    name = storage_class_name(k8s)
    if storage.kind == "existing":
        return []
    if storage.kind == "ebs":
        return [
            {
                "apiVersion": "storage.k8s.io/v1",
                "kind": "StorageClass",
                "metadata": meta(k8s, name, namespaced=False),
                "provisioner": "ebs.csi.aws.com",
                "parameters": {"type": "gp3", "encrypted": "true", "fsType": "ext4"},
                "reclaimPolicy": "Retain",
                "allowVolumeExpansion": True,
                "volumeBindingMode": "WaitForFirstConsumer",
            }
        ]
    assert storage.efs is not None
    efs = storage.efs
    if storage.kind == "efs":
        # The access point forces the postgres image's user, so initdb never needs to chown.
        return [
            efs_storage_class(
                k8s, name, file_system_id=efs.file_system_id,
                directory_perms=efs.directory_perms, uid=efs.uid, gid=efs.gid,
                base_path=f"/{k8s.namespace}-{k8s.name}",
            )
        ]  # fmt: skip
    # The seed's shape: a static PV on the file system, and a claim bound to it.
    return [
        {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": meta(k8s, name, namespaced=False),
            "provisioner": "efs.csi.aws.com",
            "reclaimPolicy": "Retain",
            "volumeBindingMode": "Immediate",
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": meta(k8s, f"{k8s.name}-data", namespaced=False),
            "spec": {
                "capacity": {"storage": storage.size},
                "volumeMode": "Filesystem",
                "accessModes": ["ReadWriteOncePod"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": name,
                "csi": {"driver": "efs.csi.aws.com", "volumeHandle": efs.file_system_id},
                "claimRef": {"namespace": k8s.namespace, "name": f"{k8s.name}-data"},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": meta(k8s, f"{k8s.name}-data"),
            "spec": {
                "accessModes": ["ReadWriteOncePod"],
                "storageClassName": name,
                "volumeName": f"{k8s.name}-data",
                "resources": {"requests": {"storage": storage.size}},
            },
        },
    ]


def k8s_password(state_dir: Path) -> str:
    """The superuser password for the cluster, generated once and kept in the state dir (0600),
    so that rendering again gives the same Secret."""
    path = state_dir / "k8s-password"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    state_dir.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")
    return value


def render_statefulset(config: Config, bootstrap: dict[str, str], password: str | None) -> Rendered:
    k8s = config.kubernetes
    warnings = check_config(config)
    secret_name = k8s.existing_secret or f"{k8s.name}-credentials"
    placement = pgconf.Placement(
        listen_addresses=["*"],
        port=PG_PORT,
        socket_dirs=["/var/run/postgresql"],  # the image's entrypoint initialises over it
        allowed_cidrs=k8s.allowed_cidrs,
        ident_users=("postgres",),
        admin_user="postgres",
        # The backup volume: basic_archive never overwrites a different file of a name;
        # S3: pgwarden's own command, which never does either.
        archive_dir=backups.WAL_DIR if config.backup.volume is not None else None,
        archive_command=backups.S3_ARCHIVE_COMMAND if _s3_backups(config) else None,
        archive_timeout=config.backup.archive_timeout,
        logical_decoding=config.history.uses_wal,
        slot_wal_keep=config.history.wal_keep_limit,
    )
    files = pgconf.render_all(config.server, placement)
    objects: list[Manifest] = [*storage_objects(k8s)]
    if config.backup.volume is not None:
        objects += backups.volume_objects(
            config, image=k8s.image or DEFAULT_IMAGE, secret_name=secret_name, port=PG_PORT,
            uid=POSTGRES_UID, security=CONTAINER_SECURITY,
        )  # fmt: skip
    elif _s3_backups(config):
        objects += backups.s3_objects(
            config, secret_name=secret_name, port=PG_PORT, uid=POSTGRES_UID,
            security=CONTAINER_SECURITY,
        )  # fmt: skip
    else:
        warnings.append(
            "no backups: add backup.volume (an EFS volume for WAL and base backups); EFS under "
            "PGDATA protects against a lost disk, not against a bad DELETE"
        )
    if not k8s.existing_secret:
        assert password is not None
        warnings.append(
            f"the output holds the Secret {secret_name} with a generated superuser password: "
            "keep it out of version control, or create the Secret yourself and set "
            "kubernetes.existing_secret to its name"
        )
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": meta(k8s, secret_name),
                "type": "Opaque",
                "stringData": {"password": password},
            }
        )
    objects.append(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": meta(k8s, f"{k8s.name}-config"),
            "data": {
                "postgresql.conf": f"data_directory = '{PGDATA}'\n" + files["postgresql.conf"],
                "pg_hba.conf": files["pg_hba.conf"],
                "pg_ident.conf": files["pg_ident.conf"],
            },
        }
    )
    objects.append(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": meta(k8s, f"{k8s.name}-bootstrap"),
            "data": bootstrap,
        }
    )
    service_port = {
        "name": "postgres",
        "port": PG_PORT,
        "targetPort": "postgres",
        "protocol": "TCP",
    }
    objects.append(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta(k8s, f"{k8s.name}-headless"),
            "spec": {
                "clusterIP": "None",
                "publishNotReadyAddresses": True,
                "selector": selector(k8s),
                "ports": [service_port],
            },
        }
    )
    objects.append(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta(k8s, k8s.name),
            "spec": {"type": "ClusterIP", "selector": selector(k8s), "ports": [service_port]},
        }
    )
    if config.history.uses_wal:
        objects.append(consumer.config_map(config))
    objects.append(_statefulset(config, secret_name))
    objects.append(
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": meta(k8s, k8s.name),
            # One instance: voluntary evictions (node drains) wait until an operator moves the
            # database on purpose, instead of stopping it in the middle of the day.
            "spec": {"minAvailable": 1, "selector": {"matchLabels": selector(k8s)}},
        }
    )
    ingress: list[dict[str, Any]] = [
        {
            "from": [{"ipBlock": {"cidr": cidr}} for cidr in k8s.allowed_cidrs],
            "ports": [{"protocol": "TCP", "port": PG_PORT}],
        }
    ]
    if config.backup.volume is not None or _s3_backups(config):
        ingress.append(
            {
                "from": [{"podSelector": {"matchLabels": backups.job_labels(config)}}],
                "ports": [{"protocol": "TCP", "port": PG_PORT}],
            }
        )
    objects.append(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": meta(k8s, k8s.name),
            "spec": {
                "podSelector": {"matchLabels": selector(k8s)},
                "policyTypes": ["Ingress"],
                "ingress": ingress,
            },
        }
    )
    return Rendered(objects, warnings)


def _s3_backups(config: Config) -> bool:
    """Backups to S3 from the statefulset flavor (a backup volume, when there is one, wins)."""
    return config.backup.volume is None and config.backup.s3 is not None


def _probe(config: Config, **timing: int) -> dict[str, Any]:
    return {
        "exec": {
            "command": [
                "pg_isready",
                "-h",
                "127.0.0.1",
                "-p",
                str(PG_PORT),
                "-U",
                "postgres",
                "-d",
                config.database,
            ]
        },
        **timing,
    }


def _statefulset(config: Config, secret_name: str) -> Manifest:
    k8s = config.kubernetes
    storage = k8s.storage
    grace = 120
    mounts: list[dict[str, Any]] = [
        {"name": "data", "mountPath": PGDATA_MOUNT},
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "bootstrap", "mountPath": "/docker-entrypoint-initdb.d", "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},  # noqa: S108 - a volume mount path
        {"name": "run", "mountPath": "/var/run/postgresql"},
        {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - a volume mount path
    ]
    # Archiving to S3 runs pgwarden in the server's container: the tools image (the postgres
    # image with pgwarden added).
    image = backups.s3_tools_image(config) if _s3_backups(config) else k8s.image or DEFAULT_IMAGE
    env: list[dict[str, Any]] = [
        {"name": "PGDATA", "value": PGDATA},
        {"name": "POSTGRES_DB", "value": config.database},
        {"name": "POSTGRES_USER", "value": "postgres"},
        {
            "name": "POSTGRES_PASSWORD",
            "valueFrom": {"secretKeyRef": {"name": secret_name, "key": "password"}},
        },
        {
            "name": "POSTGRES_INITDB_ARGS",
            "value": "--data-checksums --auth-host=scram-sha-256 --auth-local=peer",
        },
    ]
    if _s3_backups(config):
        env += backups.s3_env(config)
    container = {
        "name": "postgres",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": [
            "-c",
            f"config_file={CONFIG_DIR}/postgresql.conf",
            "-c",
            f"hba_file={CONFIG_DIR}/pg_hba.conf",
            "-c",
            f"ident_file={CONFIG_DIR}/pg_ident.conf",
        ],
        "env": env,
        "ports": [{"name": "postgres", "containerPort": PG_PORT, "protocol": "TCP"}],
        "startupProbe": _probe(config, periodSeconds=5, failureThreshold=120, timeoutSeconds=5),
        "readinessProbe": _probe(config, periodSeconds=5, failureThreshold=3, timeoutSeconds=5),
        "livenessProbe": _probe(config, periodSeconds=10, failureThreshold=6, timeoutSeconds=5),
        "lifecycle": {
            # A fast shutdown (roll back sessions, checkpoint) instead of SIGTERM's smart
            # shutdown, which waits for clients and then gets SIGKILLed.
            "preStop": {
                "exec": {"command": ["/bin/sh", "-c", 'pg_ctl -D "$PGDATA" -m fast -w -t 100 stop']}
            }
        },
        "securityContext": CONTAINER_SECURITY,
        "resources": {
            "requests": dict(k8s.resources.requests),
            "limits": dict(k8s.resources.limits),
        },
        "volumeMounts": mounts,
    }
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": f"{k8s.name}-config"}},
        {"name": "bootstrap", "configMap": {"name": f"{k8s.name}-bootstrap"}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
        {"name": "run", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    containers = [container]
    if config.history.uses_wal:
        containers.append(consumer.sidecar(config, security=CONTAINER_SECURITY))
        volumes.append(consumer.config_volume(config))
    spec: dict[str, Any] = {
        "replicas": k8s.replicas,
        "serviceName": f"{k8s.name}-headless",
        "podManagementPolicy": "OrderedReady",
        "updateStrategy": {"type": "RollingUpdate"},
        "selector": {"matchLabels": selector(k8s)},
        "template": {
            "metadata": {"labels": labels(k8s)},
            "spec": {
                "terminationGracePeriodSeconds": grace,
                "enableServiceLinks": False,
                "securityContext": pod_security(
                    POSTGRES_UID, fsGroup=POSTGRES_UID, fsGroupChangePolicy="OnRootMismatch"
                ),
                "containers": containers,
                "volumes": volumes,
            },
        },
    }
    if _s3_backups(config):
        mounts.append(dict(backups.S3_MOUNT))
        volumes.append(backups.s3_volume(config))
    if config.backup.volume is not None:
        parts = backups.server_parts(
            config, image=k8s.image or DEFAULT_IMAGE, security=CONTAINER_SECURITY
        )
        volumes.append(parts.volume)
        mounts.append(parts.mount)
        spec["template"]["spec"]["initContainers"] = [parts.init_container]
    if storage.kind == "efs-static":
        volumes.insert(
            0, {"name": "data", "persistentVolumeClaim": {"claimName": f"{k8s.name}-data"}}
        )
    else:
        spec["volumeClaimTemplates"] = [
            {
                "metadata": {"name": "data", "labels": labels(k8s)},
                "spec": {
                    "accessModes": ["ReadWriteOncePod"],
                    "storageClassName": storage_class_name(k8s),
                    "resources": {"requests": {"storage": storage.size}},
                },
            }
        ]
        spec["persistentVolumeClaimRetentionPolicy"] = {
            "whenDeleted": "Retain",
            "whenScaled": "Retain",
        }
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": meta(k8s, k8s.name),
        "spec": spec,
    }
