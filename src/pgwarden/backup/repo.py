"""The backup location on disk: what is in it, read in one pass, and its metadata files.

    <location>/
        pgwarden-backups.json    whose archive this is: system identifier, major, segment size
        wal/                     archived WAL segments and timeline .history files
        backups/<label>/
            data/                a plain-format base backup with its backup_manifest
            pgwarden-backup.json what pgwarden knows of it: kind, parent, LSNs, times, size

The repository file is what lets a restore refuse another cluster's archive or another major
version up front, instead of failing halfway through recovery.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pgwarden.backup.wal import (
    HISTORY_RE,
    Segment,
    first_gap,
    parse_lsn,
    parse_segment,
    segment_of,
)
from pgwarden.errors import UserError

REPO_FILE = "pgwarden-backups.json"
BACKUP_FILE = "pgwarden-backup.json"
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
    unreadable: list[str] = field(default_factory=list)  # backup dirs without usable metadata

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
    root: Path

    @property
    def wal_dir(self) -> Path:
        return self.root / "wal"

    @property
    def backups_dir(self) -> Path:
        return self.root / "backups"

    def backup_dir(self, label: str) -> Path:
        return self.backups_dir / label

    def read_cluster(self) -> Cluster | None:
        path = self.root / REPO_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise UserError(
                f"{path} is unreadable ({exc}); it says whose archive this is",
                hint="restore the file from a copy, or point backup.location elsewhere",
            ) from None
        if data.get("format") != FORMAT:
            raise UserError(f"{path} is of a format this pgwarden does not know")
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
            write_json(self.root / REPO_FILE, {"format": FORMAT, **asdict(cluster)})
            return
        check_same_cluster(recorded, cluster, self.root)

    def observe(self) -> Contents:
        cluster = self.read_cluster()
        size = cluster.wal_segment_size if cluster else 16 * 1024 * 1024
        segments: set[Segment] = set()
        timelines: dict[int, int] = {1: 0}
        newest: float | None = None
        times: dict[Segment, datetime] = {}
        if self.wal_dir.is_dir():
            with os.scandir(self.wal_dir) as entries:
                for entry in entries:
                    segment = parse_segment(entry.name, size)
                    if segment is not None:
                        segments.add(segment)
                        mtime = entry.stat().st_mtime
                        times[segment] = datetime.fromtimestamp(mtime, UTC)
                        newest = mtime if newest is None else max(newest, mtime)
                        continue
                    history = HISTORY_RE.match(entry.name)
                    if history:
                        timeline = int(history.group(1), 16)
                        timelines[timeline] = _timeline_start(Path(entry.path), timeline, size)
        backups: list[BackupInfo] = []
        unreadable: list[str] = []
        if self.backups_dir.is_dir():
            for path in sorted(self.backups_dir.iterdir()):
                try:
                    backups.append(
                        BackupInfo.from_json(json.loads((path / BACKUP_FILE).read_text()))
                    )
                except (OSError, ValueError, KeyError, TypeError):
                    unreadable.append(path.name)
        backups.sort(key=lambda b: (b.stop_time, b.label))
        return Contents(
            cluster=cluster,
            backups=backups,
            segments=segments,
            timelines=timelines,
            newest_segment_time=datetime.fromtimestamp(newest, UTC) if newest else None,
            segment_times=times,
            unreadable=unreadable,
        )


def _timeline_start(path: Path, timeline: int, segment_size: int) -> int:
    """Where a timeline began: the switch point on the last line of its .history file."""
    switch = 0
    try:
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0].isdigit():
                switch = parse_lsn(parts[1])
    except (OSError, ValueError):
        return 0
    return segment_of(switch, timeline, segment_size).number


def check_same_cluster(recorded: Cluster, actual: Cluster, where: Path) -> None:
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


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Written whole or not at all: a temporary file, fsynced, renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as handle:
        handle.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
