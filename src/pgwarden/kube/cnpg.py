"""The cloudnative-pg flavor: a CloudNativePG `Cluster` (HA, quorum synchronous replication),
its bootstrap SQL, managed roles, and backups through the Barman Cloud plugin.

The objects are built from typed models of exactly the fields we emit, so a typo in a field name
is a type error here rather than a surprise in the cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pgwarden.config import Config
from pgwarden.errors import ConfigError
from pgwarden.history.catalog import HistorySchema
from pgwarden.kube import consumer
from pgwarden.kube.objects import Manifest, meta
from pgwarden.kube.render import (
    CONTAINER_SECURITY,
    POSTGRES_UID,
    Rendered,
    check_storage,
    storage_class_name,
    storage_objects,
)
from pgwarden.server import pgconf

CNPG_API = "postgresql.cnpg.io/v1"
BARMAN_API = "barmancloud.cnpg.io/v1"
BARMAN_PLUGIN = "barman-cloud.cloudnative-pg.io"
DEFAULT_IMAGE = "ghcr.io/cloudnative-pg/postgresql:18"
OWNER = "app"  # the database owner CloudNativePG's initdb creates
# Settings CloudNativePG manages itself and refuses in spec.postgresql.parameters.
_CNPG_FIXED = {"listen_addresses", "port", "unix_socket_directories", "unix_socket_permissions",
               "logging_collector", "log_destination", "wal_level", "max_wal_senders",
               "fsync", "full_page_writes", "password_encryption", "log_line_prefix"}  # fmt: skip


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def dump(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


class SecretRef(_Model):
    name: str


class ManagedRole(_Model):
    name: str
    ensure: str = "present"
    login: bool
    inherit: bool = True
    replication: bool | None = None
    in_roles: list[str] | None = Field(None, alias="inRoles")
    password_secret: SecretRef | None = Field(None, alias="passwordSecret")
    comment: str | None = None


class ConfigMapKeyRef(_Model):
    name: str
    key: str


class SqlRefs(_Model):
    config_map_refs: list[ConfigMapKeyRef] = Field(alias="configMapRefs")


class InitDb(_Model):
    database: str
    owner: str
    data_checksums: bool = Field(True, alias="dataChecksums")
    encoding: str = "UTF8"
    post_init_application_sql_refs: SqlRefs = Field(alias="postInitApplicationSQLRefs")


class Synchronous(_Model):
    method: str = "any"  # quorum
    number: int
    data_durability: str = Field("required", alias="dataDurability")


class PostgresSection(_Model):
    parameters: dict[str, str]
    pg_hba: list[str]
    synchronous: Synchronous | None = None


class Affinity(_Model):
    enable_pod_anti_affinity: bool = Field(True, alias="enablePodAntiAffinity")
    pod_anti_affinity_type: str = Field("required", alias="podAntiAffinityType")
    topology_key: str = Field("topology.kubernetes.io/zone", alias="topologyKey")


class Storage(_Model):
    size: str
    storage_class: str | None = Field(None, alias="storageClass")


class Plugin(_Model):
    name: str
    is_wal_archiver: bool = Field(True, alias="isWALArchiver")
    parameters: dict[str, str]


class TargetTime(_Model):
    target_time: str = Field(alias="targetTime")


class Recovery(_Model):
    source: str
    database: str
    owner: str
    recovery_target: TargetTime = Field(alias="recoveryTarget")


class SourcePlugin(_Model):
    name: str
    parameters: dict[str, str]


class ExternalCluster(_Model):
    name: str
    plugin: SourcePlugin


@dataclass(frozen=True)
class RestoreRequest:
    """`k8s render --restore-to-time T`: a new cluster recovered from the object store."""

    to_time: datetime
    name: str  # the restored cluster's own name (it archives under it: never into the source's)


class SlotsHighAvailability(_Model):
    enabled: bool = True
    # Logical slots follow a failover (PostgreSQL 17+: slots made with failover = true).
    synchronize_logical_decoding: bool = Field(True, alias="synchronizeLogicalDecoding")


class ReplicationSlots(_Model):
    high_availability: SlotsHighAvailability = Field(alias="highAvailability")


class ClusterSpec(_Model):
    instances: int
    image_name: str = Field(alias="imageName")
    postgresql: PostgresSection
    bootstrap: dict[str, InitDb | Recovery]
    storage: Storage
    resources: dict[str, dict[str, str]]
    affinity: Affinity
    enable_superuser_access: bool = Field(False, alias="enableSuperuserAccess")
    managed: dict[str, list[ManagedRole]] | None = None
    plugins: list[Plugin] | None = None
    replication_slots: ReplicationSlots | None = Field(None, alias="replicationSlots")
    external_clusters: list[ExternalCluster] | None = Field(None, alias="externalClusters")


def _parameters(config: Config) -> dict[str, str]:
    placement = pgconf.Placement(listen_addresses=["*"], port=5432)
    settings = pgconf.settings_for(config.server, placement)
    # CloudNativePG takes plain strings and quotes them itself.
    return {
        name: value if isinstance(value, str) else pgconf.quote_setting(value)
        for name, value in settings.items()
        if name not in _CNPG_FIXED
    }


def _managed_roles(config: Config) -> list[ManagedRole]:
    access = config.access
    roles = [
        ManagedRole(name=access.manager_role, login=False, comment="managed by pgwarden"),
        ManagedRole(name=access.auditor_role, login=False, comment="managed by pgwarden"),
    ]
    for name, role in sorted(access.roles.items()):
        groups = list(role.member_of)
        if name in access.managers:
            groups.append(access.manager_role)
        if name in access.auditors:
            groups.append(access.auditor_role)
        roles.append(
            ManagedRole(
                name=name,
                login=role.login,
                # Managers act as manager only after SET ROLE (like sudo), as with pgwarden apply.
                inherit=name not in access.managers,
                in_roles=groups or None,
                password_secret=SecretRef(
                    name=f"{config.kubernetes.name}-role-{name}".replace("_", "-")
                )
                if role.login
                else None,
                comment="managed by pgwarden",
            )
        )
    if config.history.uses_wal:
        roles.append(
            ManagedRole(
                name=consumer.ROLE,
                login=True,
                replication=True,  # reads and advances the logical slot
                in_roles=[HistorySchema(config.history.schema_name).owner],
                password_secret=SecretRef(name=consumer.password_secret(config)),
                # Not pgwarden's access mark: `apply` must not drop a role it did not declare.
                comment="pgwarden WAL capture consumer",
            )
        )
    return roles


def check_cnpg(config: Config) -> None:
    """Refuse what cannot work with several instances, before anything is started."""
    storage = config.kubernetes.storage
    check_storage(config.kubernetes)
    if config.history.uses_wal:
        consumer.tools_image(config)
    if storage.kind == "efs-static":
        raise ConfigError(
            "kubernetes.storage.kind: efs-static cannot be used with cloudnative-pg: every "
            "instance needs a volume of its own",
            hint="use ebs (recommended) or a StorageClass that provisions one volume per claim",
        )


def render_cnpg(
    config: Config, bootstrap: dict[str, str], restore: RestoreRequest | None = None
) -> Rendered:
    check_cnpg(config)
    if restore is not None:
        return _render_restore(config, restore)
    k8s = config.kubernetes
    storage = k8s.storage
    warnings: list[str] = []
    if storage.kind == "efs":
        warnings.append(
            "PGDATA on EFS: each instance still gets its own access point, but every fsync "
            "crosses the network; EBS is the better home for PGDATA, EFS or S3 for backups."
        )
    objects: list[Manifest] = [*storage_objects(k8s)]
    bootstrap_name = f"{k8s.name}-bootstrap"
    objects.append(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": meta(k8s, bootstrap_name),
            "data": bootstrap,
        }
    )
    hba = [f"host all all {cidr} scram-sha-256" for cidr in k8s.allowed_cidrs]
    plugins = None
    backup = config.backup
    if backup.s3 is not None:
        plugins = [_archiver(k8s.name, k8s.name)]
    spec = ClusterSpec(
        instances=k8s.instances,
        image_name=k8s.image or DEFAULT_IMAGE,
        postgresql=PostgresSection(
            parameters=_parameters(config),
            pg_hba=hba,
            synchronous=Synchronous(number=1) if k8s.instances > 1 else None,
        ),
        bootstrap={
            "initdb": InitDb(
                database=config.database,
                owner=OWNER,
                post_init_application_sql_refs=SqlRefs(
                    config_map_refs=[
                        ConfigMapKeyRef(name=bootstrap_name, key=key) for key in bootstrap
                    ]
                ),
            )
        },
        storage=Storage(size=storage.size, storage_class=storage_class_name(k8s)),
        resources={"requests": dict(k8s.resources.requests), "limits": dict(k8s.resources.limits)},
        affinity=Affinity(),
        managed={"roles": _managed_roles(config)},
        plugins=plugins,
        replication_slots=ReplicationSlots(high_availability=SlotsHighAvailability())
        if config.history.uses_wal
        else None,
    )
    objects.append(
        {
            "apiVersion": CNPG_API,
            "kind": "Cluster",
            "metadata": meta(k8s, k8s.name),
            "spec": spec.dump(),
        }
    )
    if config.history.uses_wal:
        objects.append(consumer.config_map(config))
        objects.append(consumer.deployment(config, security=CONTAINER_SECURITY, uid=POSTGRES_UID))
    if backup.s3 is not None:
        objects.append(_object_store(config))
        objects.append(_scheduled_backup(config, k8s.name))
    else:
        warnings.append(
            "no backup section: the cluster has replicas but no backups (add backup.s3)"
        )
    return Rendered(objects, warnings)


def _archiver(cluster: str, source: str) -> Plugin:
    """Barman Cloud as WAL archiver and backup method; each cluster under its own server name,
    so that a restored cluster never writes into the archive it was restored from."""
    return Plugin(
        name=BARMAN_PLUGIN,
        parameters={"barmanObjectName": f"{source}-backup", "serverName": cluster},
    )


def _scheduled_backup(config: Config, cluster: str) -> Manifest:
    return {
        "apiVersion": CNPG_API,
        "kind": "ScheduledBackup",
        "metadata": meta(config.kubernetes, f"{cluster}-daily"),
        "spec": {
            "schedule": config.backup.schedule,
            "backupOwnerReference": "self",
            "cluster": {"name": cluster},
            "method": "plugin",
            "pluginConfiguration": {"name": BARMAN_PLUGIN},
        },
    }


def _render_restore(config: Config, restore: RestoreRequest) -> Rendered:
    """A Cluster bootstrapped by recovery from the source's base backups and WAL in the object
    store, up to a time; the source cluster and its archive are left as they are."""
    k8s = config.kubernetes
    if config.backup.s3 is None:
        raise ConfigError(
            "--restore-to-time needs backups: there is no backup.s3 section",
            hint="backups for cloudnative-pg go to S3 through the Barman Cloud plugin",
        )
    if restore.name == k8s.name:
        raise ConfigError(
            f"the restored cluster needs a name of its own, not {k8s.name}",
            hint="--restore-as NAME; the source cluster stays as it is",
        )
    when = restore.to_time.astimezone(UTC).isoformat()  # RFC 3339, which CloudNativePG parses
    spec = ClusterSpec(
        instances=k8s.instances,
        image_name=k8s.image or DEFAULT_IMAGE,
        postgresql=PostgresSection(
            parameters=_parameters(config),
            pg_hba=[f"host all all {cidr} scram-sha-256" for cidr in k8s.allowed_cidrs],
            synchronous=Synchronous(number=1) if k8s.instances > 1 else None,
        ),
        bootstrap={
            "recovery": Recovery(
                source="origin",
                database=config.database,
                owner=OWNER,
                recovery_target=TargetTime(target_time=when),
            )
        },
        storage=Storage(size=k8s.storage.size, storage_class=storage_class_name(k8s)),
        resources={"requests": dict(k8s.resources.requests), "limits": dict(k8s.resources.limits)},
        affinity=Affinity(),
        managed={"roles": _managed_roles(config)},
        plugins=[_archiver(restore.name, k8s.name)],
        external_clusters=[
            ExternalCluster(
                name="origin",
                plugin=SourcePlugin(
                    name=BARMAN_PLUGIN,
                    parameters={"barmanObjectName": f"{k8s.name}-backup", "serverName": k8s.name},
                ),
            )
        ],
    )
    objects: list[Manifest] = [
        {
            "apiVersion": CNPG_API,
            "kind": "Cluster",
            "metadata": meta(k8s, restore.name),
            "spec": spec.dump(),
        },
        _scheduled_backup(config, restore.name),
    ]
    for obj in objects:
        obj["metadata"]["labels"]["app.kubernetes.io/instance"] = restore.name
    warnings = [
        f"a new cluster {restore.name}, recovered to {when} from {k8s.name}'s backups; "
        f"{k8s.name} is not touched. Check the data (kubectl cnpg psql {restore.name}), then "
        f"point applications at {restore.name}-rw.",
    ]
    return Rendered(objects, warnings)


def _object_store(config: Config) -> Manifest:
    k8s = config.kubernetes
    backup = config.backup
    s3 = backup.s3
    assert s3 is not None
    path = f"s3://{s3.bucket}/{s3.prefix.strip('/')}".rstrip("/")
    configuration: dict[str, Any] = {
        "destinationPath": path,
        "s3Credentials": {
            "accessKeyId": {"name": s3.credentials_secret, "key": s3.access_key_id_key},
            "secretAccessKey": {"name": s3.credentials_secret, "key": s3.secret_access_key_key},
        },
        "wal": {"compression": "gzip"},
        "data": {"compression": "gzip"},
    }
    if s3.endpoint_url:
        configuration["endpointURL"] = s3.endpoint_url
    return {
        "apiVersion": BARMAN_API,
        "kind": "ObjectStore",
        "metadata": meta(k8s, f"{k8s.name}-backup"),
        "spec": {"configuration": configuration, "retentionPolicy": backup.retention},
    }
