"""`pgwarden backup verify`: every backup against its manifest, and the WAL chain for gaps."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from typing import Any

from pgwarden.backup.create import being_written
from pgwarden.backup.repo import Contents, Repository
from pgwarden.backup.restore import plain_copy, with_backup_wal
from pgwarden.errors import UserError
from pgwarden.server.cluster import LocalServer


@dataclass(frozen=True)
class BackupCheck:
    label: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class VerifyReport:
    backups: list[BackupCheck]
    missing_segment: str | None  # the first segment missing after the oldest backup
    unreadable: list[str]
    # Without a record (written last): being written, or interrupted. Not a failure of the
    # archive: no restore ever uses one.
    incomplete: list[dict[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            all(b.ok for b in self.backups)
            and self.missing_segment is None
            and not self.unreadable
            and bool(self.backups)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "backups": [b.__dict__ for b in self.backups],
            "missing_segment": self.missing_segment,
            "unreadable": self.unreadable,
            "incomplete": self.incomplete,
        }


def wal_gap(contents: Contents) -> str | None:
    """The name of the first WAL segment missing between the oldest backup and the newest
    archived segment, or None."""
    if not contents.backups or contents.cluster is None:
        return None
    gap = contents.gap_after(contents.backups[0])
    return gap.name(contents.cluster.wal_segment_size) if gap is not None else None


def verify_backups(server: LocalServer, repo: Repository) -> VerifyReport:
    """pg_verifybackup on each backup; one from an object store is fetched and unpacked into a
    scratch directory first (its own size in free disk space), then removed."""
    contents = repo.observe()
    checks = []
    scratch = server.state.cluster / "backup-verify"
    for info in contents.backups:
        try:
            data = plain_copy(repo, info, scratch)
            if contents.cluster is not None:
                with_backup_wal(repo, info, data, contents.cluster.wal_segment_size)
            if scratch.exists():
                server.runas.chown_tree(scratch)
            result = server.runas.run([server.tool("pg_verifybackup"), "-q", data], timeout=None)
        except UserError as exc:
            checks.append(BackupCheck(info.label, False, exc.message))
            continue
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        text = (result.stderr or result.stdout).strip()
        checks.append(
            BackupCheck(info.label, result.returncode == 0, text or "manifest and WAL verified")
        )
    return VerifyReport(
        backups=checks,
        missing_segment=wal_gap(contents),
        unreadable=contents.unreadable,
        incomplete=incomplete_of(server, contents),
    )


def incomplete_of(server: LocalServer, contents: Contents) -> list[dict[str, str]]:
    """Backups without a record: being written now (here or elsewhere), or interrupted."""
    writing = being_written(server, contents)
    return [
        {"label": label, "state": "in progress" if label in writing else "interrupted"}
        for label in contents.incomplete
    ]
