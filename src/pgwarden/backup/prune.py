"""`pgwarden backup prune`: retention by count and age, as a plan first.

A full backup is kept when it is among the `keep` newest or younger than `keep_days`; an
incremental goes with the full backup it was built on (never orphaned); WAL older than the
start of the oldest kept backup goes, because no kept backup can replay it. Timeline history
files always stay: they are tiny and recovery needs them to follow timelines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pgwarden.backup.repo import BackupInfo, Contents, Repository
from pgwarden.errors import UserError
from pgwarden.lsn import parse_lsn


@dataclass(frozen=True)
class PrunePlan:
    remove_backups: list[BackupInfo]
    keep_backups: list[BackupInfo]
    remove_segments: list[str]
    remove_interrupted: list[str] = field(default_factory=list)  # labels without a record

    @property
    def empty(self) -> bool:
        return not self.remove_backups and not self.remove_segments and not self.remove_interrupted


def plan_prune(
    contents: Contents,
    *,
    keep: int | None,
    keep_days: int | None,
    now: datetime,
    writing: frozenset[str] = frozenset(),
) -> PrunePlan:
    """`writing`: backups without a record that are being written now (create.still_writing),
    not interrupted: those are left for a later prune."""
    interrupted = [label for label in contents.incomplete if label not in writing]
    if keep is None and keep_days is None:
        if interrupted:  # without retention, only what is not a backup goes
            return PrunePlan([], list(contents.backups), [], interrupted)
        raise UserError(
            "no retention configured: nothing would be pruned",
            hint="set backup.keep (a number of full backups) and/or backup.keep_days",
        )
    fulls = [b for b in contents.backups if b.kind == "full"]
    kept_fulls: set[str] = set()
    for rank, info in enumerate(reversed(fulls)):  # newest first
        young = keep_days is not None and now - info.stop_time < timedelta(days=keep_days)
        if (keep is not None and rank < keep) or young or rank == 0:
            kept_fulls.add(info.label)
    by_label = {b.label: b for b in contents.backups}

    def root_of(info: BackupInfo) -> str:
        while info.parent is not None and info.parent in by_label:
            info = by_label[info.parent]
        return info.label

    keep_backups = [b for b in contents.backups if root_of(b) in kept_fulls]
    remove_backups = [b for b in contents.backups if root_of(b) not in kept_fulls]
    remove_segments: list[str] = []
    if keep_backups and contents.cluster is not None:
        size = contents.cluster.wal_segment_size
        oldest = min(keep_backups, key=lambda b: parse_lsn(b.start_lsn))
        first_needed = oldest.start_segment(size).number
        remove_segments = sorted(s.name(size) for s in contents.segments if s.number < first_needed)
    return PrunePlan(remove_backups, keep_backups, remove_segments, interrupted)


def apply_prune(repo: Repository, plan: PrunePlan) -> None:
    for info in plan.remove_backups:
        repo.remove_backup(info.label)
    for label in plan.remove_interrupted:
        repo.remove_backup(label)
    repo.remove_wal(plan.remove_segments)
