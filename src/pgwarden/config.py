"""pgwarden.yaml: the pydantic models that are the one source of truth, and how the file is found.

The same models drive YAML loading, `pgwarden config schema`, the defaults written by
`pgwarden init`, and what every renderer and planner reads.
"""

from __future__ import annotations

import ipaddress
import os
import re
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)

from pgwarden.errors import ConfigError
from pgwarden.sizes import parse_size

CONFIG_ENV = "PGWARDEN_CONFIG"
DEFAULT_CONFIG_NAME = "pgwarden.yaml"

# A PostgreSQL identifier as users write it in the config. Anything goes inside the name (it is
# always quoted with psycopg.sql.Identifier), but empty names, NUL bytes and names longer than
# PostgreSQL's 63-byte limit are refused early, with the key path, instead of failing mid-apply.
_MAX_IDENT = 63


def _check_ident(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    if "\x00" in value:
        raise ValueError("must not contain NUL bytes")
    if len(value.encode()) > _MAX_IDENT:
        raise ValueError(f"is longer than PostgreSQL's {_MAX_IDENT}-byte identifier limit")
    return value


def _check_cidrs(value: list[str]) -> list[str]:
    for cidr in value:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ValueError(f"{cidr!r} is not a network such as 10.0.0.0/8") from None
    return value


_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d|w)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(value: object) -> timedelta:
    """Parse `400d`, `12h`, `30m`, `2w` or `45s` into a timedelta."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            amount, unit = match.groups()
            return timedelta(seconds=int(amount) * _UNIT_SECONDS[unit])
    raise ValueError(f"expected a duration such as '400d', '12h' or '2w', got {value!r}")


def _format_duration(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    for unit in ("w", "d", "h", "m"):
        size = _UNIT_SECONDS[unit]
        if seconds % size == 0 and seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(_format_duration, return_type=str),
]


class _Section(BaseModel):
    # Unknown keys are errors everywhere: a typo must never be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_default=True)


SettingValue = str | int | float | bool


class ServerConfig(_Section):
    """The local server started by `pgwarden up` (and the settings rendered for Kubernetes)."""

    port: int = Field(5432, ge=1, le=65535, description="TCP port of the local server.")
    listen_addresses: list[str] = Field(
        default_factory=lambda: ["127.0.0.1"],
        description="Addresses the local server listens on. Only loopback by default.",
    )
    admin_user: str = Field("postgres", description="Superuser created by initdb.")
    allowed_cidrs: list[str] = Field(
        default_factory=lambda: ["127.0.0.1/32", "::1/128"],
        description="Client networks allowed over TCP (always with scram-sha-256).",
    )
    service_user: str = Field(
        "pgwarden",
        description="Unprivileged system user that runs PostgreSQL when pgwarden runs as root.",
    )
    pg_bin: Path | None = Field(
        None,
        description="Directory with initdb/postgres. Default: the embedded PostgreSQL 18 wheel.",
    )
    settings: dict[str, SettingValue] = Field(
        default_factory=dict,
        description="Extra postgresql.conf settings, e.g. {shared_buffers: 256MB}.",
    )

    @field_validator("allowed_cidrs")
    @classmethod
    def _valid_cidrs(cls, value: list[str]) -> list[str]:
        return _check_cidrs(value)

    @field_validator("admin_user", "service_user")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return _check_ident(value)

    @field_validator("settings")
    @classmethod
    def _valid_setting_names(cls, value: dict[str, SettingValue]) -> dict[str, SettingValue]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", name):
                raise ValueError(f"{name!r} is not a PostgreSQL setting name")
        return value


class HistoryMode(StrEnum):
    FAIL_CLOSED = "fail-closed"
    FAIL_OPEN = "fail-open"


class CaptureEngine(StrEnum):
    TRIGGER = "trigger"
    WAL = "wal"


class TableHistory(_Section):
    """Per-table overrides of the history settings."""

    mode: HistoryMode | None = None
    capture: CaptureEngine | None = Field(
        None, description="trigger or wal for this table (default: history.capture)."
    )
    exclude_columns: list[str] = Field(default_factory=list)
    truncate: Literal["rows", "marker"] = Field(
        "rows", description="On TRUNCATE, record every removed row, or only a marker event."
    )


class CaptureTrigger(StrEnum):
    AUTO = "auto"
    COMPILED = "compiled"
    PLPGSQL = "plpgsql"


class HistoryConfig(_Section):
    """Change history: which tables are tracked and how."""

    schema_name: str = Field(
        "pgwarden", alias="schema", description="Schema that holds history and its functions."
    )
    tables: list[str] = Field(
        default_factory=list,
        description="Tables to track: 'schema.table' or a pattern such as 'public.*'.",
    )
    mode: HistoryMode = Field(HistoryMode.FAIL_CLOSED, description="Default capture mode.")
    exclude_columns: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Columns never stored, per table: {'public.users': [password_hash]}.",
    )
    overrides: dict[str, TableHistory] = Field(
        default_factory=dict, description="Per-table settings, keyed by 'schema.table'."
    )
    retention: Duration | None = Field(
        None, description="Events older than this are removed by `pgwarden retention`."
    )
    record_statement: bool = Field(
        False, description="Also store the statement text (off: it can carry secrets)."
    )
    capture: CaptureEngine = Field(
        CaptureEngine.TRIGGER,
        description="How changes reach history: trigger (capture triggers, in the writing "
        "transaction) or wal (logical decoding of the WAL: no trigger on the write path; needs "
        "wal_level = logical, which `pgwarden up` sets, and a consumer: `pgwarden up` starts "
        "one, `pgwarden history follow` runs it). Both write the same history; see "
        "docs/history.md.",
    )
    wal_keep_size: str = Field(
        "10GB",
        pattern=r"^[1-9][0-9]*(kB|MB|GB|TB)$",
        description="With capture: wal and mode: fail-open, the most WAL the replication slot "
        "may hold back (max_slot_wal_keep_size): past it the slot is dropped by the server, "
        "history records a gap (verify reports it) and capture resumes with a new snapshot. "
        "fail-closed keeps every WAL segment until history has it.",
    )
    wal_lag_alarm: str = Field(
        "1GB",
        pattern=r"^[1-9][0-9]*(kB|MB|GB|TB)$",
        description="With capture: wal, how much WAL the replication slot may hold back before "
        "`pgwarden status` and `pgwarden verify` warn (verify then exits 1): the consumer is "
        "down or behind, and in fail-closed the WAL grows until history has it. Set it well "
        "below the free space of the WAL's disk (and below wal_keep_size in fail-open).",
    )
    trigger: CaptureTrigger = Field(
        CaptureTrigger.AUTO,
        description="Which capture trigger writes history: auto (the compiled one where the "
        "server can load it, else PL/pgSQL), compiled (refuse otherwise) or plpgsql. Both "
        "write the same history; see docs/history.md.",
    )
    defer_rows: int | None = Field(
        None,
        ge=0,
        description="No longer used: bulk statements are captured cheaply without it. "
        "Accepted so that older files still load; `plan` says to remove it.",
    )

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True)

    @property
    def wal_keep_limit(self) -> str | None:
        """max_slot_wal_keep_size for WAL capture in fail-open mode; None: keep everything."""
        if self.uses_wal and self.mode == HistoryMode.FAIL_OPEN:
            return self.wal_keep_size
        return None

    @property
    def wal_lag_alarm_bytes(self) -> int:
        return parse_size(self.wal_lag_alarm)

    @property
    def uses_wal(self) -> bool:
        """Whether any table is captured from the WAL (the server needs wal_level = logical)."""
        return self.capture == CaptureEngine.WAL or any(
            o.capture == CaptureEngine.WAL for o in self.overrides.values()
        )

    @field_validator("schema_name")
    @classmethod
    def _valid_schema(cls, value: str) -> str:
        # Kept to a plain identifier: it is also the prefix of the history owner role's name.
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,50}", value):
            raise ValueError("must be a plain lower-case identifier such as 'pgwarden'")
        return value


class Privilege(StrEnum):
    SELECT = "SELECT"
    INSERT = "INSERT"
    UPDATE = "UPDATE"
    DELETE = "DELETE"
    TRUNCATE = "TRUNCATE"
    REFERENCES = "REFERENCES"
    TRIGGER = "TRIGGER"


def _upper_privileges(value: object) -> object:
    if isinstance(value, dict):
        return {
            key: [p.upper() if isinstance(p, str) else p for p in privs]
            if isinstance(privs, list)
            else privs
            for key, privs in value.items()
        }
    return value


class RoleConfig(_Section):
    """One role pgwarden manages: login or not, memberships, and what it may do."""

    login: bool = Field(False, description="Whether the role can log in.")
    member_of: list[str] = Field(default_factory=list, description="Roles it is a member of.")
    connect: bool = Field(True, description="CONNECT on the managed database.")
    schemas: list[str] = Field(default_factory=list, description="Schemas it gets USAGE on.")
    tables: Annotated[dict[str, list[Privilege]], BeforeValidator(_upper_privileges)] = Field(
        default_factory=dict,
        description="Table privileges by name or pattern: {'public.*': [SELECT, INSERT]}. "
        "A whole-schema pattern also covers tables created later (default privileges).",
    )
    password_env: str | None = Field(None, description="Environment variable with its password.")
    password_file: Path | None = Field(None, description="File whose first line is its password.")

    @field_validator("member_of", "schemas")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        for name in value:
            _check_ident(name)
        if len(set(value)) != len(value):
            raise ValueError("lists a name twice")
        return value

    def model_post_init(self, _context: Any) -> None:
        if self.password_env and self.password_file:
            raise ValueError("set password_env or password_file, not both")


class AccessConfig(_Section):
    """Roles and privileges, the manager role that owns the schema, and hardening."""

    mode: Literal["additive", "authoritative"] = Field(
        "additive",
        description="additive: grant and create only. authoritative: also revoke and drop, "
        "inside pgwarden's scope, what the config does not list.",
    )
    manager_role: str = Field("manager", description="Role that owns the managed objects.")
    managers: list[str] = Field(default_factory=list, description="Login roles that are managers.")
    managed_schemas: list[str] = Field(
        default_factory=lambda: ["public"],
        description="Schemas whose objects the manager role owns.",
    )
    auditor_role: str = Field("auditor", description="Role that may read history.")
    auditors: list[str] = Field(default_factory=list, description="Members of the auditor role.")
    hardening: bool = Field(
        True,
        description="REVOKE CREATE ON SCHEMA public and ALL ON DATABASE from PUBLIC, then grant "
        "CONNECT explicitly.",
    )
    ddl_guard: bool = Field(
        False,
        description="Event trigger rejecting DDL on managed schemas and history from non-managers "
        "(needs a superuser to install).",
    )
    roles: dict[str, RoleConfig] = Field(default_factory=dict, description="Roles to manage.")

    @field_validator("manager_role", "auditor_role")
    @classmethod
    def _valid_role(cls, value: str) -> str:
        return _check_ident(value)

    @field_validator("managers", "auditors", "managed_schemas")
    @classmethod
    def _valid_names(cls, value: list[str]) -> list[str]:
        for name in value:
            _check_ident(name)
        if len(set(value)) != len(value):
            raise ValueError("lists a name twice")
        return value

    @field_validator("roles")
    @classmethod
    def _valid_role_names(cls, value: dict[str, RoleConfig]) -> dict[str, RoleConfig]:
        for name in value:
            _check_ident(name)
            if name.startswith("pg_"):
                raise ValueError(f"{name!r}: names starting with pg_ are PostgreSQL's own")
        return value


_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m)?$")


def _quantity(value: str) -> str:
    if not _QUANTITY.match(value):
        hint = ""
        match = re.match(r"^([0-9.]+)\s*([KMGTPE])B$", value, re.IGNORECASE)
        if match:
            hint = f"; did you mean {match.group(1)}{match.group(2).upper()}i?"
        raise ValueError(f"{value!r} is not a Kubernetes quantity such as 20Gi or 500m{hint}")
    return value


Quantity = Annotated[str, BeforeValidator(lambda v: _quantity(str(v)))]


class EfsConfig(_Section):
    """EFS through the EFS CSI driver."""

    file_system_id: str = Field(
        ..., description="The EFS file system id, e.g. fs-0123456789abcdef0."
    )
    uid: int = Field(999, description="uid the access point forces (the postgres image's user).")
    gid: int = Field(999, description="gid the access point forces.")
    directory_perms: str = Field("700", description="Permissions of the access point's root.")

    @field_validator("file_system_id")
    @classmethod
    def _fs_id(cls, value: str) -> str:
        if not re.fullmatch(r"fs-[0-9a-f]{8,17}", value):
            raise ValueError(f"{value!r} is not an EFS file system id such as fs-0123456789abcdef0")
        return value


class StorageConfig(_Section):
    """Where PGDATA lives."""

    kind: Literal["ebs", "efs", "efs-static", "existing"] = Field(
        "ebs",
        description="ebs: gp3 volumes (recommended for PGDATA). efs: EFS with dynamic access "
        "points. efs-static: the seed's static EFS PV and PVC. existing: a StorageClass you have.",
    )
    size: Quantity = Field("20Gi", description="Volume size, e.g. 20Gi.")
    class_name: str | None = Field(None, description="StorageClass name (required for existing).")
    efs: EfsConfig | None = None


class ResourcesConfig(_Section):
    requests: dict[str, Quantity] = Field(default_factory=lambda: {"cpu": "500m", "memory": "1Gi"})
    limits: dict[str, Quantity] = Field(default_factory=lambda: {"memory": "2Gi"})


class KubernetesConfig(_Section):
    """Rendering for Kubernetes: `pgwarden k8s render`."""

    flavor: Literal["statefulset", "cloudnative-pg"] = Field(
        "statefulset", description="statefulset: one hardened instance. cloudnative-pg: HA."
    )
    namespace: str = Field("default", description="Namespace of every object.")
    name: str = Field("postgres", description="Base name of the objects.")
    image: str | None = Field(None, description="Container image (default per flavor).")
    tools_image: str | None = Field(
        None,
        description="An image with pgwarden in it (deploy/Dockerfile builds one on the postgres "
        "image). Needed with history.capture: wal: it runs the WAL capture consumer (a "
        "container of the statefulset's pod; a Deployment for cloudnative-pg); and for the "
        "statefulset flavor's backups to S3, where the server itself runs it (its "
        "archive_command is pgwarden's) and so does the backup CronJob.",
    )
    replicas: int = Field(1, ge=1, description="statefulset flavor: must stay 1.")
    instances: int = Field(3, ge=1, description="cloudnative-pg flavor: number of instances.")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    allowed_cidrs: list[str] = Field(
        default_factory=lambda: ["10.0.0.0/8"],
        description="Client networks allowed to connect (scram-sha-256 only).",
    )
    existing_secret: str | None = Field(
        None, description="Use this Secret (key: password) instead of a generated one."
    )
    kubernetes_version: str = Field("1.33", description="Version to validate against.")

    @field_validator("name", "namespace")
    @classmethod
    def _dns_label(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,50}[a-z0-9])?", value):
            raise ValueError(f"{value!r} is not a DNS label (lower case, digits, '-')")
        return value

    @field_validator("allowed_cidrs")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        return _check_cidrs(value)


class S3BackupConfig(_Section):
    """Base backups and WAL in S3: the local server's location, and CloudNativePG's (through
    the Barman Cloud plugin). Credentials come from the AWS chain, never from this file."""

    bucket: str = Field(..., description="S3 bucket name.")
    prefix: str = Field("", description="Path inside the bucket.")
    endpoint_url: str | None = Field(None, description="For S3-compatible stores (MinIO, …).")
    region: str | None = Field(None, description="The bucket's region (default: AWS_REGION).")
    credentials_secret: str = Field(
        "backup-s3-credentials", description="Secret holding the access keys (never in YAML)."
    )
    access_key_id_key: str = Field("ACCESS_KEY_ID", description="Key of the access key id.")
    secret_access_key_key: str = Field("ACCESS_SECRET_KEY", description="Key of the secret key.")

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", value):
            raise ValueError(f"{value!r} is not an S3 bucket name")
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        value = value.strip("/")
        if any(part in ("", ".", "..") for part in value.split("/")) and value:
            raise ValueError(f"{value!r} is not a usable prefix (empty or dot segments)")
        return value

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value


class BackupVolumeConfig(_Section):
    """Kubernetes, statefulset flavor: a ReadWriteMany volume (EFS) that the server archives
    its WAL into and a CronJob writes base backups to, in the layout `pgwarden backup` reads."""

    size: Quantity = Field("100Gi", description="Size requested for the claim (EFS is elastic).")
    class_name: str | None = Field(
        None, description="A ReadWriteMany StorageClass you have (instead of efs)."
    )
    efs: EfsConfig | None = Field(
        None,
        description="The EFS file system for backups (default: kubernetes.storage.efs, with an "
        "access point of its own).",
    )


class BackupConfig(_Section):
    """Backups and WAL archiving: `location` for the local server, `s3` for CloudNativePG."""

    location: str | None = Field(
        None,
        description="Where the local server's base backups and archived WAL go: a directory "
        "(relative to pgwarden.yaml; a mounted EFS or NFS share is a good home), or "
        "s3://bucket/prefix (the same as a backup.s3 section). Setting it turns WAL archiving "
        "on (a restart).",
    )
    keep: int | None = Field(
        None,
        ge=1,
        description="`backup prune` keeps this many newest full backups (in Kubernetes the "
        "statefulset flavor's backup job prunes after each backup).",
    )
    keep_days: int | None = Field(
        None, ge=1, description="`backup prune` keeps every backup younger than this many days."
    )
    archive_timeout: int = Field(
        60,
        ge=0,
        description="Seconds after which a partly filled WAL segment is archived anyway: the "
        "most recent changes a restore can lose when the server is lost (0: only when full).",
    )
    s3: S3BackupConfig | None = None
    volume: BackupVolumeConfig | None = None
    retention: str = Field("30d", description="Keep backups and WAL this long: 30d, 8w, 6m.")
    schedule: str = Field(
        "0 0 2 * * *", description="When to take base backups (6-field cron, seconds first)."
    )

    @model_validator(mode="before")
    @classmethod
    def _s3_location(cls, data: Any) -> Any:
        """`location: s3://bucket/prefix` is the same as a `backup.s3` section."""
        if not isinstance(data, dict):
            return data
        location = data.get("location")
        if not isinstance(location, str) or not location.startswith("s3://"):
            return data
        bucket, _, prefix = location.removeprefix("s3://").partition("/")
        section = data.get("s3")
        if isinstance(section, dict):
            if section.get("bucket") != bucket or (section.get("prefix") or "").strip(
                "/"
            ) != prefix.strip("/"):
                raise ValueError(
                    f"backup.location {location} and backup.s3 name different places; "
                    "keep one of them"
                )
            merged = dict(section)
        else:
            merged = {"bucket": bucket, "prefix": prefix}
        return {**data, "location": None, "s3": merged}

    @field_validator("location")
    @classmethod
    def _location(cls, value: str | None) -> str | None:
        if value is not None and value.startswith(("gs://", "http://", "https://", "azure://")):
            raise ValueError(
                "of object stores only S3 (s3://bucket/prefix, or a backup.s3 section) is a "
                "backup.location; or use a directory (a mounted EFS or NFS share)"
            )
        if value is not None and not value.strip():
            raise ValueError("backup.location is empty")
        return value

    @field_validator("retention")
    @classmethod
    def _retention(cls, value: str) -> str:
        if not re.fullmatch(r"[1-9][0-9]*[dwm]", value):
            raise ValueError(f"{value!r} is not a retention such as 30d, 8w or 6m")
        return value


class Config(_Section):
    """The whole of pgwarden.yaml."""

    database: str = Field("app", description="Name of the database pgwarden manages.")
    server: ServerConfig = Field(default_factory=ServerConfig)
    history: HistoryConfig = Field(default_factory=HistoryConfig)
    access: AccessConfig = Field(default_factory=AccessConfig)
    kubernetes: KubernetesConfig = Field(default_factory=KubernetesConfig)
    backup: BackupConfig = Field(default_factory=BackupConfig)

    @field_validator("database")
    @classmethod
    def _valid_db(cls, value: str) -> str:
        return _check_ident(value)


class LoadedConfig(BaseModel):
    """A validated config plus where it came from (None when defaults are used)."""

    model_config = ConfigDict(frozen=True)

    config: Config
    path: Path | None


def find_config(explicit: Path | None) -> Path | None:
    """`--config`, then $PGWARDEN_CONFIG, then ./pgwarden.yaml; None when none exists."""
    if explicit is not None:
        if not explicit.is_file():
            raise ConfigError(
                f"config file {explicit} does not exist",
                hint="check the --config path, or run `pgwarden init` to write one",
            )
        return explicit
    env = os.environ.get(CONFIG_ENV)
    if env:
        path = Path(env)
        if not path.is_file():
            raise ConfigError(
                f"config file {path} (from ${CONFIG_ENV}) does not exist",
                hint=f"fix or unset ${CONFIG_ENV}",
            )
        return path
    default = Path.cwd() / DEFAULT_CONFIG_NAME
    return default if default.is_file() else None


def load_config(explicit: Path | None = None) -> LoadedConfig:
    path = find_config(explicit)
    if path is None:
        return LoadedConfig(config=Config(), path=None)
    return LoadedConfig(config=parse_config_file(path), path=path)


def parse_config_file(path: Path) -> Config:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None
    return parse_config_text(text, source=str(path))


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _value in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"{key!r} is listed twice (first on line {seen[key]})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_config_text(text: str, *, source: str) -> Config:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level")
    # Empty sections (`history:` with nothing under it) are fine: treat them as defaults.
    data = {key: ({} if value is None else value) for key, value in data.items()}
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        lines = [_describe_error(err, node, source) for err in exc.errors()]
        first = lines[0]
        more = f" (and {len(lines) - 1} more problem(s):\n  " + "\n  ".join(lines[1:]) + ")"
        raise ConfigError(
            first + (more if len(lines) > 1 else ""),
            hint="`pgwarden config schema` prints every key and its type",
        ) from None


def _describe_error(err: Any, root: yaml.Node | None, source: str) -> str:
    loc = [part for part in err["loc"] if not str(part).startswith("function-")]
    path = ".".join(str(part) for part in loc) or "(top level)"
    line = _line_of(root, loc)
    where = f"{source}:{line}" if line else source
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown key {path!r} (not a pgwarden setting; is it misspelt?)"
    got = err.get("input")
    shown = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
    message = str(err["msg"]).removeprefix("Value error, ")
    return f"{where}: {path}: {message}{shown}"


def _line_of(node: yaml.Node | None, loc: list[Any]) -> int | None:
    """Best-effort line number of the key at `loc` in the YAML node tree."""
    line: int | None = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if str(key.value) == str(part):
                    line = key.start_mark.line + 1
                    node = value
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                return line
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def config_json_schema() -> dict[str, Any]:
    return Config.model_json_schema(by_alias=True)
