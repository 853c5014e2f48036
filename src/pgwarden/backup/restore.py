"""`pgwarden backup restore`: a new data directory, recovered to a moment, never the live one.

The plan (which backup, which target, which settings) is a pure function of what the location
holds and what was asked; it is printed before anything is copied. Running it copies the backup
(or combines an incremental chain), replays archived WAL up to the target, promotes, and waits
until recovery has really ended: `pg_is_in_recovery()` false, not merely "accepting read-only
connections", which a hot standby already is.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import tarfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Literal, cast

import psycopg

from pgwarden.backup.repo import BackupInfo, Cluster, Contents, Repository, check_same_cluster
from pgwarden.backup.store import Readable
from pgwarden.backup.wal import Segment
from pgwarden.config import SettingValue
from pgwarden.errors import ServerError, UserError
from pgwarden.lsn import parse_lsn
from pgwarden.server import pgconf
from pgwarden.server.cluster import CONF_INCLUDE, INCLUDE_LINE, LocalServer, file_tail, free_port

TargetKind = Literal["time", "latest", "lsn", "xid"]
RESTORED_HOST = "127.0.0.1"  # a restored copy listens here only, on a port of its own


@dataclass(frozen=True)
class RecoveryTarget:
    kind: TargetKind
    time: datetime | None = None
    lsn: str | None = None
    xid: int | None = None  # restore to just before this transaction
    xid_began: datetime | None = None  # when it began (from history): picks the backup

    def describe(self) -> str:
        if self.kind == "time":
            assert self.time is not None
            return f"the state at {self.time.isoformat()}"
        if self.kind == "lsn":
            return f"WAL position {self.lsn}"
        if self.kind == "xid":
            return f"just before transaction {self.xid} committed"
        return "the end of the archived WAL"

    def settings(self) -> dict[str, SettingValue]:
        if self.kind == "time":
            assert self.time is not None
            return {
                "recovery_target_time": self.time.isoformat(),
                "recovery_target_inclusive": True,
            }
        if self.kind == "lsn":
            assert self.lsn is not None
            return {"recovery_target_lsn": self.lsn}
        if self.kind == "xid":
            assert self.xid is not None
            # recovery_target_xid compares 32-bit ids; history keeps the 64-bit one.
            return {
                "recovery_target_xid": str(self.xid % (1 << 32)),
                "recovery_target_inclusive": False,
            }
        return {}


@dataclass(frozen=True)
class RestorePlan:
    chain: list[BackupInfo]  # the full backup, then incrementals to combine, oldest first
    target: RecoveryTarget
    target_dir: Path
    repo: Repository
    steps: list[str] = field(default_factory=list)

    @property
    def backup(self) -> BackupInfo:
        return self.chain[-1]


def plan_restore(
    contents: Contents, repo: Repository, target: RecoveryTarget, target_dir: Path,
    *, live_data_dir: Path | None,
) -> RestorePlan:  # fmt: skip
    """Which backup, and what will be done; refuses what cannot work, before any copying."""
    _check_target_dir(target_dir, live_data_dir)
    if contents.cluster is None or not contents.backups:
        raise UserError(
            f"no backups in {repo.where}", hint="take one first: `pgwarden backup create`"
        )
    for info in contents.backups:
        check_same_cluster(contents.cluster, _cluster_of(info), f"{repo.where}/{info.label}")
    candidates = contents.backups
    if target.kind == "time":
        assert target.time is not None
        candidates = [b for b in contents.backups if b.stop_time <= target.time]
        if not candidates:
            raise UserError(
                f"{target.time.isoformat()} is before the earliest moment a backup can reach "
                f"({contents.backups[0].stop_time.isoformat()})",
                hint="`pgwarden backup list` shows the recoverable window",
            )
    elif target.kind == "xid":
        assert target.xid_began is not None
        candidates = [b for b in contents.backups if b.stop_time < target.xid_began]
        if not candidates:
            raise UserError(
                f"transaction {target.xid} began before the earliest backup had finished, so "
                "no backup holds the state before it",
                hint="`pgwarden backup list` shows the recoverable window",
            )
    elif target.kind == "lsn":
        assert target.lsn is not None
        wanted = parse_lsn(target.lsn)
        candidates = [b for b in contents.backups if parse_lsn(b.stop_lsn) <= wanted]
        if not candidates:
            raise UserError(
                f"WAL position {target.lsn} is before the end of the earliest backup "
                f"({contents.backups[0].stop_lsn})"
            )
    chosen = candidates[-1]
    _check_wal_reaches(contents, chosen, target)
    chain = contents.chain(chosen.label)
    steps = []
    if len(chain) == 1:
        steps.append(f"copy base backup {chosen.label} into {target_dir}")
    else:
        labels = " + ".join(b.label for b in chain)
        steps.append(f"combine backups {labels} into {target_dir} (pg_combinebackup)")
    steps += [
        f"replay archived WAL from {repo.where}/wal up to {target.describe()}",
        "promote, and wait until recovery has ended",
    ]
    return RestorePlan(chain=chain, target=target, target_dir=target_dir, repo=repo,
                       steps=steps)  # fmt: skip


def _check_wal_reaches(contents: Contents, chosen: BackupInfo, target: RecoveryTarget) -> None:
    """Refuse, before anything is copied, a target beyond a missing WAL segment: recovery would
    stop at the gap, and --to-latest would even promote there without a word."""
    assert contents.cluster is not None
    size = contents.cluster.wal_segment_size
    gap = contents.gap_after(chosen)
    if gap is None:
        return
    before = [t for s, t in contents.segment_times.items() if s.number == gap.number - 1]
    reach = max(before) if before else chosen.stop_time
    when = target.time if target.kind == "time" else target.xid_began
    if target.kind == "lsn":
        assert target.lsn is not None
        beyond = parse_lsn(target.lsn) >= gap.number * size
    elif when is not None:
        beyond = when >= reach
    else:
        beyond = True  # latest
    if beyond:
        raise UserError(
            f"WAL segment {gap.name(size)} is missing from the archive: a restore from backup "
            f"{chosen.label} cannot replay past it (archived WAL before it ends about "
            f"{reach.isoformat(timespec='seconds')})",
            hint="put the segment back into the archive, or restore to an earlier time; "
            "`pgwarden backup verify` checks the chain",
        )


def _cluster_of(info: BackupInfo) -> Cluster:
    return Cluster(info.system_identifier, info.pg_major, 0, info.data_checksums)


def _check_target_dir(target_dir: Path, live_data_dir: Path | None) -> None:
    if target_dir.exists() and (not target_dir.is_dir() or any(target_dir.iterdir())):
        raise UserError(
            f"{target_dir} exists and is not empty; a restore never writes over anything",
            hint="name a new directory with --target-dir",
        )
    if live_data_dir is not None:
        live = live_data_dir.resolve()
        new = target_dir.resolve()
        if new == live or live in new.parents or new in live.parents:
            raise UserError(
                f"{target_dir} is (or holds, or is inside) the data directory of the managed "
                "server; a restore goes to a new directory",
                hint="name a directory outside the state directory with --target-dir",
            )


@dataclass(frozen=True)
class RestoreResult:
    target_dir: Path
    port: int
    url: str | None  # when left running (--start)
    stopped_at: str | None  # what PostgreSQL said about where recovery stopped
    log_file: Path


def run_restore(server: LocalServer, plan: RestorePlan, *, start: bool) -> RestoreResult:
    target_dir = plan.target_dir.absolute()
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    if target_dir.exists():
        target_dir.rmdir()  # empty (checked by the plan): recreated below by the copy
    runas = server.runas
    if len(plan.chain) == 1:
        materialize(plan.repo, plan.backup, target_dir)
        runas.chown_tree(target_dir)
    else:
        # pg_combinebackup fills an empty directory, as the user PostgreSQL runs as.
        scratch = target_dir.with_name(f".{target_dir.name}.pgwarden-fetch")
        try:
            inputs = [plain_copy(plan.repo, b, scratch) for b in plan.chain]
            if scratch.exists():
                runas.chown_tree(scratch)
            target_dir.mkdir(mode=0o700)
            runas.chown(target_dir)
            result = runas.run(
                [server.tool("pg_combinebackup"), *inputs, "-o", target_dir], timeout=None
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if result.returncode != 0:
            raise ServerError(f"pg_combinebackup failed: {result.stderr.strip()}")
    os.chmod(target_dir, 0o700)
    port = free_port()
    _write_recovery_config(server, plan, target_dir, port)
    log_file = target_dir / "pgwarden-restore.log"
    started = runas.run(
        [server.tool("pg_ctl"), "start", "-D", target_dir, "-l", log_file, "-w", "-t", "600"],
        timeout=700,
    )
    url = server.url("postgres", host=RESTORED_HOST, port=port)
    try:
        _wait_promoted(started.returncode, url, log_file, plan, target_dir)
    except BaseException:
        runas.run([server.tool("pg_ctl"), "stop", "-D", target_dir, "-m", "fast"], timeout=120)
        raise
    stopped_at = _where_it_stopped(log_file)
    if not start:
        runas.run([server.tool("pg_ctl"), "stop", "-D", target_dir, "-m", "fast", "-w"],
                  timeout=300)  # fmt: skip
    return RestoreResult(
        target_dir=target_dir, port=port, url=url if start else None,
        stopped_at=stopped_at, log_file=log_file,
    )  # fmt: skip


def _write_recovery_config(
    server: LocalServer, plan: RestorePlan, target_dir: Path, port: int
) -> None:
    # The restored copy listens on its own port, TCP only, and does not archive: its new
    # timeline must not mix into the archive the managed server keeps writing.
    placement = pgconf.Placement(
        listen_addresses=[RESTORED_HOST],
        port=port,
        allowed_cidrs=server.config.server.allowed_cidrs,
        admin_user=server.config.server.admin_user,
    )
    conf = pgconf.render_postgresql_conf(server.config.server, placement)
    if plan.repo.wal_dir is not None:
        wal = str(plan.repo.wal_dir).replace("%", "%%")
        restore_command = f"cp {shlex.quote(wal + '/')}%f %p"
    else:
        restore_command = server.wal_command("get")
    recovery: dict[str, SettingValue] = {
        "archive_mode": "off",
        "restore_command": restore_command,
        "recovery_target_action": "promote",
        "recovery_target_timeline": "latest",
        **plan.target.settings(),
    }
    conf += "# recovery, written by `pgwarden backup restore`\n"
    conf += "".join(f"{k} = {pgconf.quote_setting(v)}\n" for k, v in recovery.items())
    include = target_dir / CONF_INCLUDE
    include.write_text(conf)
    main = target_dir / "postgresql.conf"
    if INCLUDE_LINE not in main.read_text():
        with main.open("a") as handle:
            handle.write("\n" + INCLUDE_LINE)
    (target_dir / "recovery.signal").write_text("")
    for path in (include, main, target_dir / "recovery.signal"):
        server.runas.chown(path)


def _wait_promoted(
    pg_ctl_code: int, url: str, log_file: Path, plan: RestorePlan, target_dir: Path
) -> None:
    deadline = time.monotonic() + 3600
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(url, connect_timeout=5, autocommit=True) as conn:
                row = conn.execute("SELECT pg_catalog.pg_is_in_recovery()").fetchone()
                if row is not None and not row[0]:
                    return
        except psycopg.OperationalError:
            if not (target_dir / "postmaster.pid").exists():
                break  # it stopped: recovery failed, the log says why
        time.sleep(0.3)
    tail = file_tail(log_file, 12)
    if "recovery ended before configured recovery target was reached" in tail:
        raise UserError(
            f"the archived WAL ends before {plan.target.describe()}: nothing later was archived",
            hint=f"choose an earlier target (`pgwarden backup list` shows the window); the "
            f"half-recovered copy is left in {plan.target_dir} for inspection",
        )
    raise ServerError(
        f"the restored server did not finish recovery (pg_ctl exit {pg_ctl_code}). "
        f"Last lines of {log_file}:\n{tail}",
        hint=f"the copy is left in {plan.target_dir} for inspection",
    )


_STOP_RE = re.compile(
    r"(recovery stopping [^\n]*|last completed transaction was at log time [^\n]*)"
)


def _where_it_stopped(log_file: Path) -> str | None:
    try:
        text = log_file.read_text(errors="replace")
    except OSError:
        return None
    found = _STOP_RE.findall(text)
    return "; ".join(dict.fromkeys(found)) if found else None


def staging_dir(server: LocalServer) -> Path:
    """Where `--replace` restores first: beside the live data directory, on the same file
    system, so that the swap is two renames."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return server.state.cluster / f"data.restored-{stamp}"


def replace_live(server: LocalServer, restored: Path, repo: Repository) -> Path:
    """Put a restored (stopped, promoted) data directory in place of the managed server's and
    start it. The old data directory is kept aside, never deleted; returns where it went."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    live = server.state.data_dir
    aside = live.with_name(f"data.before-restore-{stamp}")
    server.down()
    os.rename(live, aside)
    try:
        os.rename(restored, live)
    except OSError:
        os.rename(aside, live)  # put the old one back: nothing is lost either way
        raise
    # The promotion wrote the new timeline's .history file while the copy did not archive; a
    # later restore that follows timelines needs it in the archive.
    for history in sorted((live / "pg_wal").glob("*.history")):
        if repo.put_wal(history) and repo.wal_dir is not None:
            server.runas.chown(repo.wal_dir / history.name)
    for leftover in ("pgwarden-restore.log",):
        (live / leftover).unlink(missing_ok=True)
    server.up()  # rewrites its settings: its own port and sockets, archiving on again
    return aside


def plain_copy(repo: Repository, info: BackupInfo, scratch: Path) -> Path:
    """A plain-format data directory of one backup to read: the backup itself in a directory
    location, an extracted copy under `scratch` for an object store."""
    own = repo.plain_dir(info)
    if own is not None:
        return own
    dest = scratch / info.label
    materialize(repo, info, dest)
    return dest


def materialize(repo: Repository, info: BackupInfo, dest: Path) -> None:
    """Write one backup out as a plain data directory at `dest` (which must not exist). From
    an object store, each tar is unpacked as it downloads (no copy of it on disk: the
    target's free space need only hold the database). A backup streamed there ("base-tar")
    has an empty pg_wal: its WAL is in the archive, where recovery's restore_command finds it
    (and `with_backup_wal` for a check). On any failure `dest`, ours, is removed again."""
    own = repo.plain_dir(info)
    if own is not None:
        shutil.copytree(own, dest, symlinks=True)
        return
    parts = [("base.tar", dest)]
    if info.format == "tar":  # written by earlier pgwarden versions
        parts.append(("pg_wal.tar", dest / "pg_wal"))
    dest.mkdir(mode=0o700, parents=True)
    try:
        for name, into in parts:
            into.mkdir(mode=0o700, exist_ok=True)
            with repo.store.reading(f"backups/{info.label}/{name}") as stream:
                if stream is None:
                    raise UserError(f"backup {info.label} in {repo.where} has lost its {name}")
                _extract(stream, name, into)
        (dest / "pg_wal").mkdir(mode=0o700, exist_ok=True)
        repo.fetch_part(info.label, "backup_manifest", dest / "backup_manifest")
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def with_backup_wal(repo: Repository, info: BackupInfo, data: Path, segment_size: int) -> None:
    """Put the WAL a backup's own consistency needs (from its start to its end position) into
    its pg_wal from the archive, when the backup does not carry it, so that pg_verifybackup
    can parse it. A segment missing there is a UserError naming it."""
    if info.format != "base-tar":
        return
    start, stop = parse_lsn(info.start_lsn), parse_lsn(info.stop_lsn)
    last = max(start, stop - 1) // segment_size
    for number in range(start // segment_size, stop // segment_size + 1):
        name = Segment(number, info.timeline).name(segment_size)
        # An end exactly on a segment boundary needs nothing of the next one, which may not
        # be archived yet: fetched when there, not required.
        if not repo.fetch_wal(name, data / "pg_wal" / name) and number <= last:
            raise UserError(
                f"backup {info.label} needs WAL segment {name}, which is missing from {repo.where}",
                hint="the backup cannot be restored; take a new one (`pgwarden backup create`)",
            )


def _extract(stream: Readable, name: str, into: Path) -> None:
    """Unpack a backup's tar as it is read, refusing any member that would land outside
    `into` (a tampered bucket must not write elsewhere on this machine) before it is written.
    Python's own "data" filter does this from 3.11.4 on; Debian 12's 3.11.2 lacks it, so the
    check is here."""
    with tarfile.open(fileobj=cast(IO[bytes], stream), mode="r|", bufsize=1 << 20) as tar:
        for member in tar:
            path = Path(member.name)
            if path.is_absolute() or ".." in path.parts:
                raise UserError(f"{name} holds a path outside the data directory: {path}")
            if not (member.isfile() or member.isdir()):
                raise UserError(
                    f"{name} holds {path}, neither a file nor a directory "
                    "(tablespace links are not restored from an object store)"
                )
            if hasattr(tarfile, "data_filter"):
                tar.extract(member, into, filter="data")
            else:
                tar.extract(member, into)  # checked just above (no "data" filter here)
