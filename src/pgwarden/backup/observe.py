"""What the running server says about archiving and about itself, in one query each."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from pgwarden.backup.repo import Cluster
from pgwarden.backup.wal import parse_segment
from pgwarden.lsn import parse_lsn

Conn = psycopg.Connection[Any]


@dataclass(frozen=True)
class Archiver:
    """pg_stat_archiver and the settings behind it."""

    mode: str  # archive_mode: off, on, always
    library: str
    command: str
    pending_restart: bool  # archive_mode was changed in the config, not yet in effect
    archived_count: int
    last_archived_wal: str | None
    last_archived_time: datetime | None
    failed_count: int
    last_failed_wal: str | None
    last_failed_time: datetime | None
    lag_bytes: int | None  # WAL written but not archived yet (from the last archived segment)

    @property
    def active(self) -> bool:
        return self.mode != "off" and bool(self.library or self.command)

    @property
    def failing(self) -> bool:
        """The last attempt failed: a failure newer than the last success."""
        if self.last_failed_time is None:
            return False
        return self.last_archived_time is None or self.last_failed_time > self.last_archived_time

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "active": self.active,
            "pending_restart": self.pending_restart,
            "archived_count": self.archived_count,
            "last_archived_wal": self.last_archived_wal,
            "last_archived_time": _iso(self.last_archived_time),
            "failed_count": self.failed_count,
            "last_failed_wal": self.last_failed_wal,
            "last_failed_time": _iso(self.last_failed_time),
            "failing": self.failing,
            "lag_bytes": self.lag_bytes,
        }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def cluster_identity(conn: Conn) -> Cluster:
    row = conn.execute(
        """
        SELECT (SELECT system_identifier::text FROM pg_catalog.pg_control_system()),
               pg_catalog.current_setting('server_version_num')::int / 10000,
               (SELECT setting::bigint FROM pg_catalog.pg_settings
                 WHERE name = 'wal_segment_size'),
               pg_catalog.current_setting('data_checksums') = 'on'
        """
    ).fetchone()
    assert row is not None
    return Cluster(
        system_identifier=str(row[0]),
        pg_major=int(row[1]),
        wal_segment_size=int(row[2]),
        data_checksums=bool(row[3]),
    )


def archiver(conn: Conn) -> Archiver:
    row = conn.execute(
        """
        SELECT pg_catalog.current_setting('archive_mode'),
               pg_catalog.current_setting('archive_library', true),
               pg_catalog.current_setting('archive_command'),
               EXISTS (SELECT FROM pg_catalog.pg_settings
                        WHERE name IN ('archive_mode', 'archive_library') AND pending_restart),
               a.archived_count, a.last_archived_wal, a.last_archived_time,
               a.failed_count, a.last_failed_wal, a.last_failed_time,
               CASE WHEN pg_catalog.pg_is_in_recovery() THEN NULL
                    ELSE pg_catalog.pg_current_wal_lsn()::text END,
               (SELECT setting::bigint FROM pg_catalog.pg_settings
                 WHERE name = 'wal_segment_size')
        FROM pg_catalog.pg_stat_archiver a
        """
    ).fetchone()
    assert row is not None
    (mode, library, command, pending, archived, last_wal, last_time, failed, failed_wal,
     failed_time, current, segment_size) = row  # fmt: skip
    lag = None  # unknown until something was archived (and on a standby)
    segment = parse_segment(str(last_wal)[:24], int(segment_size)) if last_wal else None
    if current is not None and segment is not None:
        done = (segment.number + 1) * int(segment_size)
        lag = max(parse_lsn(str(current)) - done, 0)
    return Archiver(
        mode=str(mode),
        library=str(library or ""),
        command=str(command or ""),
        pending_restart=bool(pending),
        archived_count=int(archived),
        last_archived_wal=last_wal,
        last_archived_time=last_time,
        failed_count=int(failed),
        last_failed_wal=failed_wal,
        last_failed_time=failed_time,
        lag_bytes=lag,
    )
