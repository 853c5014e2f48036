"""Backups for the statefulset flavor, in the layout `pgwarden backup` reads, into either:

- a ReadWriteMany volume (EFS; backup.volume): WAL archived into it by the server itself
  (basic_archive), and a CronJob writing base backups beside it. The job runs the postgres image
  (pg_basebackup and psql are there; pgwarden is not), so its work is a small shell script and
  two SQL files shipped with pgwarden, in a ConfigMap. Mount the same file system where pgwarden
  runs, point backup.location at it, and `pgwarden backup list | verify | restore` work on what
  the cluster wrote.
- S3 (backup.s3, or backup.location s3://…): the server archives with pgwarden's own
  archive_command, so it runs `kubernetes.tools_image` (the postgres image with pgwarden in it,
  deploy/Dockerfile), and the CronJob runs `pgwarden backup create` against it from the same
  image. The access keys come from the Secret backup.s3.credentials_secret, as environment
  variables, never from a file. Point backup.location at the same bucket where pgwarden runs.

Retention (backup.keep, backup.keep_days): the job's pod then runs `pgwarden backup prune` once
the backup is written (the backup runs as its init container, so a failed backup prunes
nothing), from `kubernetes.tools_image`: prune is pgwarden's own (an incremental never loses
its parent, no WAL a kept backup needs goes), not something to redo in shell.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from pgwarden.backup.store import S3Location
from pgwarden.config import Config, EfsConfig, S3BackupConfig
from pgwarden.errors import ConfigError
from pgwarden.kube.objects import (
    Manifest,
    efs_storage_class,
    labels,
    meta,
    pod_security,
    require_tools_image,
)
from pgwarden.sqlfiles import sql_text

MOUNT = "/backup"
WAL_DIR = f"{MOUNT}/wal"
SCRIPTS_DIR = "/scripts"
S3_CONFIG_DIR = "/etc/pgwarden-backup"  # the S3 location (JSON) and the job's pgwarden.yaml
S3_ARCHIVE_COMMAND = f"python3 -m pgwarden.backup.walcmd push {S3_CONFIG_DIR}/location.json %p"
S3_JOB_COMMAND = ["pgwarden", "--config", f"{S3_CONFIG_DIR}/pgwarden.yaml"]


def script_text() -> str:
    return resources.files("pgwarden").joinpath("kube/scripts/backup.sh").read_text("utf-8")


def script_files(config: Config) -> dict[str, str]:
    """The ConfigMap's files: what the job runs (and, with retention, the pgwarden.yaml its
    prune reads: the volume's mount as the location, and what to keep)."""
    files = {
        "backup.sh": script_text(),
        "claim.sql": sql_text("backup/claim.sql"),
        "describe.sql": sql_text("backup/describe.sql"),
    }
    if has_retention(config):
        files[PRUNE_CONFIG] = yaml.safe_dump(
            {"backup": {"location": MOUNT, **_keep(config)}}, sort_keys=False
        )
    return files


PRUNE_CONFIG = "pgwarden.yaml"


def has_retention(config: Config) -> bool:
    return config.backup.keep is not None or config.backup.keep_days is not None


def _keep(config: Config) -> dict[str, int]:
    keep = {"keep": config.backup.keep, "keep_days": config.backup.keep_days}
    return {k: v for k, v in keep.items() if v is not None}


def _prune_image(config: Config) -> str:
    return require_tools_image(
        config,
        needs="backup.keep / backup.keep_days: the backup job prunes with pgwarden",
        otherwise="or drop keep/keep_days and run `pgwarden backup prune` where the backup "
        "volume is mounted",
    )


def _prune_container(
    image: str, config_file: str, mounts: list[dict[str, Any]], env: list[dict[str, Any]],
    security: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    return {
        "name": "prune",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["pgwarden", "--config", config_file, "backup", "prune"],
        "env": [{"name": "HOME", "value": "/tmp"}, *env],  # noqa: S108 - an emptyDir
        "securityContext": copy.deepcopy(security),
        "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}},
        "volumeMounts": copy.deepcopy(mounts),
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
            "data": script_files(config),
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
    container: dict[str, Any] = {
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
    volumes = [
        {"name": "backup", "persistentVolumeClaim": {"claimName": claim_name(config)}},
        {"name": "scripts", "configMap": {"name": f"{k8s.name}-backup-scripts"}},
        {"name": "tmp", "emptyDir": {}},
    ]
    return _cron(config, container, volumes, uid=uid, security=security,
                 prune_config=f"{SCRIPTS_DIR}/{PRUNE_CONFIG}")  # fmt: skip


def _cron(
    config: Config, container: dict[str, Any], volumes: list[dict[str, Any]], *, uid: int,
    security: dict[str, Any], prune_config: str, prune_env: list[dict[str, Any]] | None = None,
) -> Manifest:  # fmt: skip
    """The CronJob around a backup container: one at a time, a few kept for their logs. With
    retention the backup is the pod's init container and prune (reading `prune_config`, with
    the backup's mounts) its container: prune runs only after the backup has succeeded."""
    k8s = config.kubernetes
    containers: dict[str, Any] = {"containers": [container]}
    if has_retention(config):
        prune = _prune_container(_prune_image(config), prune_config, container["volumeMounts"],
                                 prune_env or [], security)  # fmt: skip
        containers = {"initContainers": [container], "containers": [prune]}
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
                            **containers,
                            "volumes": volumes,
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
            # A copy: a dict shared by two containers comes out as a YAML anchor and alias.
            "securityContext": copy.deepcopy(security),
            "volumeMounts": [{"name": "backup", "mountPath": MOUNT}],
        },
    )


# -- S3 ----------------------------------------------------------------------------------------


def _s3(config: Config) -> S3BackupConfig:
    s3 = config.backup.s3
    assert s3 is not None
    return s3


def s3_tools_image(config: Config) -> str:
    where = S3Location(_s3(config).bucket, _s3(config).prefix).where
    return require_tools_image(
        config,
        needs=f"backups to {where} from the statefulset flavor need pgwarden in the cluster",
        otherwise="the server runs it to archive WAL into S3. Or use backup.volume (EFS), "
        "which needs no image of yours",
    )


def s3_env(config: Config) -> list[dict[str, Any]]:
    """The access keys, from the Secret, for boto3's usual chain."""
    s3 = _s3(config)
    return [
        {
            "name": name,
            "valueFrom": {"secretKeyRef": {"name": s3.credentials_secret, "key": key}},
        }
        for name, key in (
            ("AWS_ACCESS_KEY_ID", s3.access_key_id_key),
            ("AWS_SECRET_ACCESS_KEY", s3.secret_access_key_key),
        )
    ]


def s3_config_map_name(config: Config) -> str:
    return f"{config.kubernetes.name}-backup-s3"


def s3_config_map(config: Config) -> Manifest:
    """Where backups go (no secret): the archive_command's location file, and the job's
    pgwarden.yaml."""
    s3 = _s3(config)
    location = S3Location(s3.bucket, s3.prefix, s3.endpoint_url, s3.region)
    section = {k: v for k, v in location.to_json().items() if v}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta(config.kubernetes, s3_config_map_name(config)),
        "data": {
            "location.json": json.dumps(location.to_json(), indent=2, sort_keys=True) + "\n",
            "pgwarden.yaml": yaml.safe_dump(
                {"database": config.database, "backup": {"s3": section, **_keep(config)}},
                sort_keys=False,
            ),
        },
    }


def s3_volume(config: Config) -> dict[str, Any]:
    return {"name": "backup-s3", "configMap": {"name": s3_config_map_name(config)}}


S3_MOUNT = {"name": "backup-s3", "mountPath": S3_CONFIG_DIR, "readOnly": True}


def s3_objects(
    config: Config, *, secret_name: str, port: int, uid: int, security: dict[str, Any]
) -> list[Manifest]:
    k8s = config.kubernetes
    dsn = f"host={k8s.name}.{k8s.namespace}.svc port={port} user=postgres dbname=postgres"
    container: dict[str, Any] = {
        "name": "backup",
        "image": s3_tools_image(config),
        "imagePullPolicy": "IfNotPresent",
        "command": [*S3_JOB_COMMAND, "--dsn", dsn, "backup", "create"],
        "env": [
            # The lock, an incremental's parent manifest and pgwarden's log (the backup itself
            # is streamed into the bucket, not staged).
            {"name": "TMPDIR", "value": "/tmp"},  # noqa: S108 - an emptyDir
            {"name": "HOME", "value": "/tmp"},  # noqa: S108 - an emptyDir
            {
                "name": "PGPASSWORD",
                "valueFrom": {"secretKeyRef": {"name": secret_name, "key": "password"}},
            },
            *s3_env(config),
        ],
        "securityContext": security,
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
        "volumeMounts": [
            S3_MOUNT,
            {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - a volume mount path
        ],
    }
    # Bounded: the backup is streamed into the bucket, so /tmp holds only the lock, the log
    # and an incremental's parent manifest (about 150 bytes per file of the database); a
    # runaway write is this pod's eviction, not a full node.
    volumes = [s3_volume(config), {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}]
    job = _cron(
        config, container, volumes, uid=uid, security=security,
        prune_config=f"{S3_CONFIG_DIR}/pgwarden.yaml", prune_env=s3_env(config),
    )  # fmt: skip
    return [s3_config_map(config), job]
