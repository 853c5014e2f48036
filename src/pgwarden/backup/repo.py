"""The backup location (a directory or an S3 prefix): its contents, read in one pass.

    <location>/
        pgwarden-backups.json    whose archive this is: system identifier, major, segment size
        wal/                     archived WAL segments and timeline .history files
        backups/<label>/
            data/                a plain-format base backup with its backup_manifest (a
                                 directory location), or base.tar and backup_manifest (an
                                 object store, where one object per file of a data directory
                                 would be thousands of requests; the tar streamed there, its
                                 WAL in wal/; earlier pgwarden versions also wrote pg_wal.tar)
            pgwarden-backup.json what pgwarden knows of it: kind, parent, LSNs, times, size

The repository file is what lets a restore refuse another cluster's archive or another major
version up front, instead of failing halfway through recovery.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pgwarden.backup.store import DirStore, S3Location, S3Store, Store
from pgwarden.backup.wal import (
    HISTORY_RE,
    Segment,
    first_gap,
    parse_segment,
    segment_of,
)
from pgwarden.errors import UserError
from pgwarden.lsn import parse_lsn

REPO_FILE = "pgwarden-backups.json"
BACKUP_FILE = "pgwarden-backup.json"
# Written first by whoever writes a backup, removed after its record: who is writing it, so
# that a prune or verify elsewhere (a laptop, while a CronJob backs up) tells a backup being
# written from an interrupted one.
WRITING_FILE = "pgwarden-writing.json"


@dataclass(frozen=True)
class Writing:
    """A backup's writer, as its marker says."""

    host: str
    pid: int
    started: datetime

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "pid": self.pid, "started": self.started.isoformat()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Writing:
        return cls(str(data["host"]), int(data["pid"]), datetime.fromisoformat(data["started"]))


FORMAT = 1


@dataclass(frozen=True)
class Cluster:
    """What identifies a cluster's WAL: an archive belongs to exactly one of these."""

    system_identifier: str
    pg_major: int
    wal_segment_size: int
    data_checksums: bool


@dataclass(frozen=True)
class BackupInfo:
    label: str
    kind: str  # "full" or "incremental"
    parent: str | None
    timeline: int
    start_lsn: str
    stop_lsn: str
    start_time: datetime
    stop_time: datetime  # the earliest moment a restore from this backup can reach
    size_bytes: int
    system_identifier: str
    pg_major: int
    pg_version: str
    data_checksums: bool
    # "plain": a data directory; "base-tar": base.tar streamed to an object store, its WAL in
    # the archive; "tar": base.tar + pg_wal.tar (object stores, by earlier pgwarden versions)
    format: str = "plain"

    def start_segment(self, segment_size: int) -> Segment:
        """The first WAL segment a restore from this backup reads."""
        return segment_of(parse_lsn(self.start_lsn), self.timeline, segment_size)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["start_time"] = self.start_time.isoformat()
        data["stop_time"] = self.stop_time.isoformat()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BackupInfo:
        values = dict(data)
        values["start_time"] = datetime.fromisoformat(values["start_time"])
        values["stop_time"] = datetime.fromisoformat(values["stop_time"])
        return cls(**values)


@dataclass(frozen=True)
class Contents:
    """One observation of the location."""

    cluster: Cluster | None
    backups: list[BackupInfo]  # oldest first
    segments: set[Segment]
    timelines: dict[int, int]  # timeline → segment number where it began
    newest_segment_time: datetime | None
    segment_times: dict[Segment, datetime] = field(default_factory=dict)  # when archived
    unreadable: list[str] = field(default_factory=list)  # a record there, but not usable
    # No record at all: a backup being written, or one interrupted (a crash, a kill) before its
    # record, which is written last. Never restored from; `prune` removes interrupted ones.
    incomplete: list[str] = field(default_factory=list)
    writing: dict[str, Writing] = field(default_factory=dict)  # incomplete ones' markers

    def backup(self, label: str) -> BackupInfo:
        for info in self.backups:
            if info.label == label:
                return info
        known = ", ".join(b.label for b in self.backups) or "none"
        raise UserError(
            f"no backup labelled {label!r} here", hint=f"`pgwarden backup list` shows them: {known}"
        )

    def gap_after(self, info: BackupInfo) -> Segment | None:
        """The first archived WAL segment missing on the way from `info` to the newest one."""
        assert self.cluster is not None
        start = info.start_segment(self.cluster.wal_segment_size)
        return first_gap(self.segments, start, self.timelines)

    def chain(self, label: str) -> list[BackupInfo]:
        """The full backup and the incrementals leading to `label`, oldest first."""
        chain = [self.backup(label)]
        while chain[0].parent is not None:
            chain.insert(0, self.backup(chain[0].parent))
        return chain


@dataclass(frozen=True)
class Repository:
    """A backup location, whichever kind: the layout and the metadata, over a Store."""

    store: Store

    @classmethod
    def at(cls, root: Path | S3Location) -> Repository:
        """The repository in a directory or at an S3 location."""
        return cls(DirStore(root) if isinstance(root, Path) else S3Store(root))

    @property
    def where(self) -> str:
        return self.store.where

    @property
    def root(self) -> Path | None:
        """The directory, for a directory location; None for an object store."""
        return self.store.root if isinstance(self.store, DirStore) else None

    @property
    def wal_dir(self) -> Path | None:
        return self.root / "wal" if self.root is not None else None

    def backup_dir(self, label: str) -> Path:
        """A plain-format backup's folder (directory locations only)."""
        assert self.root is not None
        return self.root / "backups" / label

    def has_label(self, label: str) -> bool:
        return label in self.store.children("backups/")

    def read_cluster(self) -> Cluster | None:
        where = f"{self.where}/{REPO_FILE}"
        try:
            raw = self.store.read(REPO_FILE)
            if raw is None:
                return None
            data = json.loads(raw)
        except (OSError, ValueError) as exc:
            raise UserError(
                f"{where} is unreadable ({exc}); it says whose archive this is",
                hint="restore the file from a copy, or point backup.location elsewhere",
            ) from None
        if data.get("format") != FORMAT:
            raise UserError(f"{where} is of a format this pgwarden does not know")
        return Cluster(
            system_identifier=str(data["system_identifier"]),
            pg_major=int(data["pg_major"]),
            wal_segment_size=int(data["wal_segment_size"]),
            data_checksums=bool(data["data_checksums"]),
        )

    def claim(self, cluster: Cluster) -> None:
        """Record whose archive this is; refuse a location that holds another cluster's."""
        recorded = self.read_cluster()
        if recorded is None:
            self.store.write(REPO_FILE, _json_bytes({"format": FORMAT, **asdict(cluster)}))
            return
        check_same_cluster(recorded, cluster, self.where)

    def begin(self, label: str, writer: Writing) -> None:
        """Mark a backup as being written (before anything else of it)."""
        self.store.write(f"backups/{label}/{WRITING_FILE}", _json_bytes(writer.to_json()))

    def record(self, info: BackupInfo) -> None:
        """A backup's metadata, written last: a backup without it is not a backup."""
        self.store.write(f"backups/{info.label}/{BACKUP_FILE}", _json_bytes(info.to_json()))
        self.store.delete([f"backups/{info.label}/{WRITING_FILE}"])

    def remove_backup(self, label: str) -> None:
        self.store.delete_tree(f"backups/{label}")

    def remove_wal(self, names: list[str]) -> None:
        self.store.delete([f"wal/{name}" for name in names])

    def put_wal(self, source: Path) -> bool:
        """Archive one WAL file; False when the same one is already there."""
        return self.store.put_new(f"wal/{source.name}", source)

    def plain_dir(self, info: BackupInfo) -> Path | None:
        """The backup's own data directory, when it is one (a plain backup in a directory
        location); None when it must be fetched and unpacked."""
        if info.format == "plain" and self.root is not None:
            return self.backup_dir(info.label) / "data"
        return None

    def fetch_part(self, label: str, name: str, dest: Path) -> None:
        """One file of a backup (base.tar, backup_manifest, …) to a local path."""
        if not self.store.fetch(f"backups/{label}/{name}", dest):
            raise UserError(f"backup {label} in {self.where} has lost its {name}")

    def fetch_wal(self, name: str, dest: Path) -> bool:
        return self.store.fetch(f"wal/{name}", dest)

    def observe(self) -> Contents:
        cluster = self.read_cluster()
        size = cluster.wal_segment_size if cluster else 16 * 1024 * 1024
        segments: set[Segment] = set()
        timelines: dict[int, int] = {1: 0}
        times: dict[Segment, datetime] = {}
        for entry in self.store.entries("wal/"):
            name = entry.key.rpartition("/")[2]
            segment = parse_segment(name, size)
            if segment is not None:
                segments.add(segment)
                times[segment] = entry.modified
                continue
            history = HISTORY_RE.match(name)
            if history:
                timeline = int(history.group(1), 16)
                timelines[timeline] = _timeline_start(self.store.read(entry.key), timeline, size)
        backups: list[BackupInfo] = []
        unreadable: list[str] = []
        incomplete: list[str] = []
        writing: dict[str, Writing] = {}
        for label in self.store.children("backups/"):
            try:
                raw = self.store.read(f"backups/{label}/{BACKUP_FILE}")
                if raw is None:
                    incomplete.append(label)
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        marker = self.store.read(f"backups/{label}/{WRITING_FILE}")
                        if marker is not None:
                            writing[label] = Writing.from_json(json.loads(marker))
                    continue
                backups.append(BackupInfo.from_json(json.loads(raw)))
            except (OSError, ValueError, KeyError, TypeError):
                unreadable.append(label)
        backups.sort(key=lambda b: (b.stop_time, b.label))
        return Contents(
            cluster=cluster,
            backups=backups,
            segments=segments,
            timelines=timelines,
            newest_segment_time=max(times.values()) if times else None,
            segment_times=times,
            unreadable=unreadable,
            incomplete=incomplete,
            writing=writing,
        )


def _json_bytes(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def _timeline_start(text: bytes | None, timeline: int, segment_size: int) -> int:
    """Where a timeline began: the switch point on the last line of its .history file."""
    switch = 0
    try:
        for line in (text or b"").decode().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0].isdigit():
                switch = parse_lsn(parts[1])
    except (UnicodeDecodeError, ValueError):
        return 0
    return segment_of(switch, timeline, segment_size).number


def check_same_cluster(recorded: Cluster, actual: Cluster, where: str | Path) -> None:
    if recorded.system_identifier != actual.system_identifier:
        raise UserError(
            f"{where} holds the archive of another cluster (system identifier "
            f"{recorded.system_identifier}; this one is {actual.system_identifier})",
            hint="point backup.location at a directory of this cluster's own; WAL of two "
            "clusters in one archive cannot be restored",
        )
    if recorded.pg_major != actual.pg_major:
        raise UserError(
            f"{where} holds backups of PostgreSQL {recorded.pg_major}, this server runs "
            f"{actual.pg_major}",
            hint="a restore needs the major version that took the backup; use another location",
        )
