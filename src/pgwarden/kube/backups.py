"""Backups for the statefulset flavor: a ReadWriteMany volume (EFS), WAL archived into it by the
server itself, and a CronJob writing base backups beside it, in the layout `pgwarden backup`
reads. Mount the same file system where pgwarden runs, point backup.location at it, and
`pgwarden backup list | verify | restore` work on what the cluster wrote.

The job runs the postgres image (pg_basebackup and psql are there; pgwarden is not), so its
work is a small shell script and two SQL files shipped with pgwarden, in a ConfigMap.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

from pgwarden.config import Config, EfsConfig
from pgwarden.errors import ConfigError
from pgwarden.kube.objects import Manifest, efs_storage_class, labels, meta, pod_security
from pgwarden.sqlfiles import sql_text

MOUNT = "/backup"
WAL_DIR = f"{MOUNT}/wal"
SCRIPTS_DIR = "/scripts"


def script_text() -> str:
    return resources.files("pgwarden").joinpath("kube/scripts/backup.sh").read_text("utf-8")


def script_files() -> dict[str, str]:
    """The ConfigMap's files: what the job runs."""
    return {
        "backup.sh": script_text(),
        "claim.sql": sql_text("backup/claim.sql"),
        "describe.sql": sql_text("backup/describe.sql"),
    }


def cron_schedule(schedule: str) -> str:
    """backup.schedule is six fields, seconds first (CloudNativePG's form); a CronJob takes five."""
    fields = schedule.split()
    if len(fields) != 6:
        raise ConfigError(
            f"backup.schedule {schedule!r} is not six cron fields (seconds first)",
            hint="for example '0 0 2 * * *': every day at 02:00",
        )
    if fields[0] != "0":
        raise ConfigError(
            f"backup.schedule {schedule!r}: a Kubernetes CronJob cannot run at a given second",
            hint="start it with 0 (seconds), e.g. '0 0 2 * * *'",
        )
    return " ".join(fields[1:])


@dataclass(frozen=True)
class ServerParts:
    """What the server's pod gains: a volume, its mount, and a container that makes the
    folders before PostgreSQL starts archiving into them."""

    volume: dict[str, Any]
    mount: dict[str, Any]
    init_container: dict[str, Any]


def claim_name(config: Config) -> str:
    return f"{config.kubernetes.name}-backup"


def _efs(config: Config) -> EfsConfig | None:
    volume = config.backup.volume
    assert volume is not None
    if volume.efs is not None:
        return volume.efs
    if volume.class_name is None:
        if config.kubernetes.storage.efs is None:
            raise ConfigError(
                "backup.volume needs a ReadWriteMany volume: set backup.volume.efs "
                "(file_system_id) or backup.volume.class_name",
                hint="EFS is the usual home for backups: multi-zone, elastic, one writer",
            )
        return config.kubernetes.storage.efs
    return None


def class_name(config: Config) -> str:
    volume = config.backup.volume
    assert volume is not None
    return volume.class_name or f"{config.kubernetes.name}-backup-efs"


def volume_objects(
    config: Config, *, image: str, secret_name: str, port: int, uid: int, security: dict[str, Any]
) -> list[Manifest]:
    k8s = config.kubernetes
    volume = config.backup.volume
    assert volume is not None
    objects: list[Manifest] = []
    efs = _efs(config)
    if volume.class_name is None and efs is not None:
        # Backups outlive everything else: deleting the claim never deletes them (Retain).
        objects.append(
            efs_storage_class(
                k8s, class_name(config), file_system_id=efs.file_system_id,
                directory_perms="700", uid=uid, gid=uid,
                base_path=f"/{k8s.namespace}-{k8s.name}-backup",
            )
        )  # fmt: skip
    objects.append(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": meta(k8s, claim_name(config)),
            "spec": {
                "accessModes": ["ReadWriteMany"],  # the server and the job, maybe on two nodes
                "storageClassName": class_name(config),
                "resources": {"requests": {"storage": volume.size}},
            },
        }
    )
    objects.append(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": meta(k8s, f"{k8s.name}-backup-scripts"),
            "data": script_files(),
        }
    )
    job = _cronjob(config, image=image, secret_name=secret_name, port=port, uid=uid,
                   security=security)  # fmt: skip
    objects.append(job)
    return objects


def job_labels(config: Config) -> dict[str, str]:
    """Not the server's selector: a Service must never send clients to a backup job."""
    return {
        **labels(config.kubernetes),
        "app.kubernetes.io/name": "postgresql-backup",
        "app.kubernetes.io/component": "backup",
    }


def _cronjob(
    config: Config, *, image: str, secret_name: str, port: int, uid: int, security: dict[str, Any]
) -> Manifest:
    k8s = config.kubernetes
    container = {
        "name": "backup",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["/bin/sh", f"{SCRIPTS_DIR}/backup.sh"],
        "env": [
            {"name": "BACKUP_ROOT", "value": MOUNT},
            {"name": "PGWARDEN_SCRIPTS", "value": SCRIPTS_DIR},
            {"name": "PGHOST", "value": f"{k8s.name}.{k8s.namespace}.svc"},
            {"name": "PGPORT", "value": str(port)},
            {"name": "PGUSER", "value": "postgres"},
            {
                "name": "PGPASSWORD",
                "valueFrom": {"secretKeyRef": {"name": secret_name, "key": "password"}},
            },
        ],
        "securityContext": security,
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
        "volumeMounts": [
            {"name": "backup", "mountPath": MOUNT},
            {"name": "scripts", "mountPath": SCRIPTS_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - a volume mount path
        ],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": meta(k8s, f"{k8s.name}-backup"),
        "spec": {
            "schedule": cron_schedule(config.backup.schedule),
            "timeZone": "Etc/UTC",
            "concurrencyPolicy": "Forbid",  # one base backup at a time
            "startingDeadlineSeconds": 3600,
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 5,
            "jobTemplate": {
                "spec": {
                    "backoffLimit": 2,
                    "template": {
                        "metadata": {"labels": job_labels(config)},
                        "spec": {
                            "restartPolicy": "Never",
                            "enableServiceLinks": False,
                            "automountServiceAccountToken": False,
                            "securityContext": pod_security(uid, fsGroup=uid),
                            "containers": [container],
                            "volumes": [
                                {
                                    "name": "backup",
                                    "persistentVolumeClaim": {"claimName": claim_name(config)},
                                },
                                {
                                    "name": "scripts",
                                    "configMap": {"name": f"{k8s.name}-backup-scripts"},
                                },
                                {"name": "tmp", "emptyDir": {}},
                            ],
                        },
                    },
                }
            },
        },
    }


def server_parts(config: Config, *, image: str, security: dict[str, Any]) -> ServerParts:
    return ServerParts(
        volume={"name": "backup", "persistentVolumeClaim": {"claimName": claim_name(config)}},
        mount={"name": "backup", "mountPath": MOUNT},
        init_container={
            "name": "prepare-backup",
            "image": image,
            "imagePullPolicy": "IfNotPresent",
            # basic_archive fails (visibly, and retries) into a folder that is not there.
            "command": ["mkdir", "-p", WAL_DIR, f"{MOUNT}/backups"],
            "securityContext": security,
            "volumeMounts": [{"name": "backup", "mountPath": MOUNT}],
        },
    )
