"""`pgwarden backup create`: a base backup into the backup location, of the local server or
(`--dsn`) of a server elsewhere (the statefulset flavor's CronJob backs up its server so).

pg_basebackup in plain format with its WAL streamed alongside (`-X stream`): each backup is
restorable and checkable (`pg_verifybackup` parses its WAL) on its own; the archive carries
everything after it. With `--incremental` (PostgreSQL 17+) only blocks changed since the newest
backup are copied, and a restore combines the chain with pg_combinebackup.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgwarden.backup.observe import archiver, cluster_identity
from pgwarden.backup.repo import (
    BACKUP_FILE,
    BackupInfo,
    Cluster,
    Contents,
    Repository,
    Writing,
)
from pgwarden.connect import Target, connect
from pgwarden.errors import ServerError, UserError
from pgwarden.lsn import parse_lsn
from pgwarden.server.binaries import embedded_bindir
from pgwarden.server.cluster import LocalServer
from pgwarden.server.osuser import RunAs, clean_env, current_user

# A backup being written elsewhere (its marker names another machine) is taken for interrupted
# once its marker is this old: nothing here can see whether that writer still lives.
WRITING_STALE_AFTER = timedelta(hours=24)

Progress = Callable[[int, int], None]  # (kB done, kB total)
_PROGRESS_RE = re.compile(r"(\d+)/(\d+) kB")


def repository(server: LocalServer) -> Repository:
    repo = server.backup_repository()
    if repo is None:
        raise UserError(
            "no backup location configured",
            hint="set backup.location in pgwarden.yaml (a directory or s3://bucket/prefix), "
            "then `pgwarden up`",
        )
    return repo


def require_running(server: LocalServer) -> Target:
    if not server.is_running():
        raise UserError(
            f"the local server in {server.state.root} is not running", hint="`pgwarden up`"
        )
    return Target(server.url("postgres"), "the local server")


@dataclass(frozen=True)
class Source:
    """What a base backup is taken of, and this machine's side of it: where its lock and an
    object store's staging copy live, which pg_basebackup runs, as whom."""

    target: Target
    repo: Repository
    work: Path
    pg_basebackup: Path
    runas: RunAs
    password: str | None  # for pg_basebackup's environment, never its command line
    tool_major: int | None = None  # pg_basebackup's major version, when not the server's own


def newest_pg_basebackup() -> tuple[int, Path] | None:
    """The newest pg_basebackup here (embedded, Debian's, on PATH): it backs up servers of its
    own major version and older ones, never newer ones."""
    candidates: list[Path] = []
    bindir = embedded_bindir()
    if bindir is not None:
        candidates.append(Path(bindir) / "pg_basebackup")
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_basebackup"))
    found = shutil.which("pg_basebackup")
    if found:
        candidates.append(Path(found))
    best: tuple[int, Path] | None = None
    for path in candidates:
        try:
            done = subprocess.run(
                [str(path), "--version"], capture_output=True, text=True, timeout=30, check=True
            )
            major = int(done.stdout.split()[-1].split(".")[0])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            continue
        if best is None or major > best[0]:
            best = (major, path)
    return best


def local_source(server: LocalServer) -> Source:
    repo = repository(server)
    return Source(
        target=require_running(server),
        repo=repo,
        work=server.state.cluster,
        pg_basebackup=server.tool("pg_basebackup"),
        runas=server.runas,
        password=server.state.password(),
    )


def remote_source(target: Target, repo: Repository | None) -> Source:
    """A server that is not pgwarden's local one, by its connection string: the backup is
    staged (object stores) in this machine's temporary directory ($TMPDIR)."""
    if repo is None:
        raise UserError(
            "no backup location configured",
            hint="set backup.location (a directory or s3://bucket/prefix) in pgwarden.yaml",
        )
    tool = newest_pg_basebackup()
    if tool is None:
        raise UserError(
            "pg_basebackup is not installed here",
            hint="install PostgreSQL's client programs, or pgwarden with its embedded server",
        )
    # pg_basebackup's environment is cleaned of PG* variables: it gets the password from here.
    password = conninfo_to_dict(target.conninfo).get("password") or os.environ.get("PGPASSWORD")
    return Source(
        target=target,
        repo=repo,
        work=Path(tempfile.gettempdir()) / f"pgwarden-backup-{os.geteuid()}",
        pg_basebackup=tool[1],
        tool_major=tool[0],
        runas=current_user(),
        password=str(password) if password else None,
    )


def _lock_file(work: Path) -> Path:
    return work / "backup-create.lock"


def _try_lock(handle: IO[str]) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def create_lock(work: Path) -> Iterator[None]:
    """One `backup create` at a time per server. The kernel drops the lock when the process
    dies, however it dies: a backup without its record and without a holder of this lock was
    interrupted, and `prune` may remove it."""
    path = _lock_file(work)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with path.open("a") as handle:
        if not _try_lock(handle):
            raise UserError(
                "another `pgwarden backup create` is running for this server",
                hint="wait for it to finish; `pgwarden backup list` shows it as in progress",
            )
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def create_running(server: LocalServer) -> bool:
    path = _lock_file(server.state.cluster)
    if not path.exists():
        return False
    with path.open("a") as handle:
        if not _try_lock(handle):
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def still_writing(
    label: str, contents: Contents, *, local_create: bool, now: datetime | None = None
) -> bool:
    """Whether a backup without its record is being written now, not interrupted: a create of
    the local server holds its lock (`local_create`), or the backup's marker names a live
    process on this machine, or another machine less than WRITING_STALE_AFTER ago."""
    if local_create:
        return True
    writer = contents.writing.get(label)
    if writer is None:
        return False
    if writer.host == socket.gethostname():
        try:
            os.kill(writer.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # alive, someone else's
        return True
    return (now or datetime.now(UTC)) - writer.started < WRITING_STALE_AFTER


def being_written(server: LocalServer, contents: Contents) -> frozenset[str]:
    """The backups without a record that are being written now (still_writing), as seen
    from the local server's machine."""
    local = create_running(server)
    return frozenset(
        label for label in contents.incomplete
        if still_writing(label, contents, local_create=local)
    )  # fmt: skip


def create_backup(
    source: Source, *, incremental: bool = False, progress: Progress | None = None
) -> BackupInfo:
    with create_lock(source.work):
        # An interrupted create's staging copy (object stores): nobody else writes there.
        shutil.rmtree(source.work / "backup-staging", ignore_errors=True)
        return _create(source, incremental=incremental, progress=progress)


def _create(source: Source, *, incremental: bool, progress: Progress | None) -> BackupInfo:
    repo = source.repo
    target = source.target
    with connect(target, autocommit=True) as conn:
        cluster = cluster_identity(conn)
        state = archiver(conn)
        version = str(conn.execute("SELECT pg_catalog.current_setting('server_version')")
                      .fetchone()[0])  # type: ignore[index]  # fmt: skip
        summarizing = conn.execute(
            "SELECT pg_catalog.current_setting('summarize_wal', true)"
        ).fetchone()
    if not state.active or state.pending_restart:
        raise UserError(
            f"WAL archiving is not on yet ({target.source}): a base backup without the "
            "WAL after it restores to one moment only",
            hint="for the local server, restart it (`pgwarden down && pgwarden up`) since "
            "backup.location was set; elsewhere, set archive_mode and archive_command (the "
            "statefulset flavor renders them), then back up",
        )
    if source.tool_major is not None and source.tool_major < cluster.pg_major:
        raise UserError(
            f"the server runs PostgreSQL {cluster.pg_major} and the newest pg_basebackup here is "
            f"{source.tool_major} ({source.pg_basebackup}): it cannot back up a newer server",
            hint=f"install PostgreSQL {cluster.pg_major}'s client programs here",
        )
    repo.claim(cluster)
    contents = repo.observe()
    parent: BackupInfo | None = None
    if incremental:
        if cluster.pg_major < 17:
            raise UserError(
                f"incremental backups need PostgreSQL 17 or later; this server runs "
                f"{cluster.pg_major}",
                hint="run `pgwarden backup create` without --incremental (a full backup)",
            )
        if not summarizing or summarizing[0] != "on":
            raise UserError(
                "incremental backups need summarize_wal = on, which `pgwarden up` sets",
                hint="`pgwarden up` (a reload), then take a full backup first",
            )
        if not contents.backups:
            raise UserError(
                "no backup to build an incremental one on",
                hint="take a full one first: `pgwarden backup create`",
            )
        parent = contents.backups[-1]
    label = _new_label(repo)
    # An object store gets the tar format, staged here first: three objects instead of one
    # per file. A directory gets a plain backup written in place.
    staged = repo.root is None
    runas = source.runas
    if not staged:
        home = repo.backup_dir(label)
        home.mkdir(mode=0o700)
        runas.chown(home)
        written = home / "data"
        fmt = "plain"
    else:
        home = source.work / "backup-staging" / label
        home.mkdir(mode=0o700, parents=True)
        runas.chown(home.parent)
        runas.chown(home)
        written = home / "data"
        fmt = "tar"
    writer = Writing(socket.gethostname(), os.getpid(), datetime.now(UTC))
    args: list[str | Path] = [
        source.pg_basebackup,
        "-D", written, "-F", fmt[0], "-X", "stream", "-c", "fast", "-l", f"pgwarden {label}",
        "-d", _conninfo(target),
    ]  # fmt: skip
    if progress is not None:
        # Only for a progress bar: -P has the server estimate the total size first, one more
        # pass over the data directory.
        args.append("-P")
    try:
        repo.begin(label, writer)
        if parent is not None:
            args += ["--incremental", _parent_manifest(runas, repo, parent, home)]
        _run_with_progress(source, args, progress)
        with connect(target, autocommit=True) as conn:
            stopped = conn.execute("SELECT pg_catalog.now()").fetchone()
        assert stopped is not None
        stop_time = stopped[0]
        assert isinstance(stop_time, datetime)
        info = _describe(label, written, fmt, parent, cluster, version, stop_time=stop_time)
        if staged:
            for part in sorted(written.iterdir()):
                if part.name not in ("base.tar", "pg_wal.tar", "backup_manifest"):
                    raise UserError(
                        f"the server has a tablespace ({part.name}); backups to an object "
                        "store hold the main data directory only",
                        hint="use a directory backup.location for a server with tablespaces",
                    )
                repo.store.upload(f"backups/{label}/{part.name}", part)
        repo.record(info)  # last: a backup without its record is not listed as one
    except BaseException:
        # Our own half-written copy, never anything of the user's: pg_basebackup removes
        # the data directory it created on failure; the label folder is ours too.
        if staged:
            with contextlib.suppress(Exception):  # the original error is the one to show
                repo.remove_backup(label)
        shutil.rmtree(home, ignore_errors=True)
        raise
    if staged:
        shutil.rmtree(home, ignore_errors=True)
    else:
        runas.chown(home / BACKUP_FILE)
    return info


def _parent_manifest(runas: RunAs, repo: Repository, parent: BackupInfo, home: Path) -> Path:
    own = repo.plain_dir(parent)
    if own is not None:
        return own / "backup_manifest"
    path = home / "parent_manifest"
    repo.fetch_part(parent.label, "backup_manifest", path)
    runas.chown(path)
    return path


def _new_label(repo: Repository) -> str:
    base = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    label, n = base, 1
    while repo.has_label(label):
        n += 1
        label = f"{base}-{n}"
    return label


def _conninfo(target: Target) -> str:
    """The server's connection string without its password (that goes in PGPASSWORD)."""
    params = conninfo_to_dict(target.conninfo)
    params.pop("password", None)
    return make_conninfo("", **params)


def _run_with_progress(source: Source, args: list[str | Path], progress: Progress | None) -> None:
    env = clean_env()
    if source.password:
        env["PGPASSWORD"] = source.password  # the child's environment only, never its argv
    with source.runas.popen(args, env=env) as proc:
        assert proc.stderr is not None
        tail: list[str] = []
        buffer = ""
        while True:
            chunk = proc.stderr.read(256)
            if not chunk:
                break
            buffer += chunk
            *parts, buffer = re.split(r"[\r\n]", buffer)
            for part in parts:
                found = _PROGRESS_RE.search(part)
                if found and progress is not None:
                    progress(int(found.group(1)), int(found.group(2)))
                elif part.strip() and not found:
                    tail = [*tail, part.strip()][-10:]
        code = proc.wait()
    if code != 0:
        raise ServerError(
            "pg_basebackup failed: " + (" / ".join(tail) or f"exit {code}"),
            hint="the server log (`pgwarden logs`) may say more",
        )


def _describe(
    label: str,
    data: Path,
    fmt: str,
    parent: BackupInfo | None,
    cluster: Cluster,
    version: str,
    *,
    stop_time: datetime,
) -> BackupInfo:
    """The backup's own record, from its backup_label and manifest."""
    fields: dict[str, str] = {}
    if fmt == "tar":
        with tarfile.open(data / "base.tar") as tar:
            member = tar.extractfile("backup_label")
            assert member is not None
            label_text = member.read().decode()
    else:
        label_text = (data / "backup_label").read_text()
    for line in label_text.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            fields[key.strip()] = value.strip()
    start_lsn = fields["START WAL LOCATION"].split()[0]
    try:
        start_time = datetime.strptime(fields["START TIME"], "%Y-%m-%d %H:%M:%S UTC")
        start_time = start_time.replace(tzinfo=UTC)
    except (KeyError, ValueError):  # log_timezone set to something else by the user
        start_time = stop_time
    manifest = json.loads((data / "backup_manifest").read_text())
    ranges = manifest.get("WAL-Ranges") or [{}]
    stop_lsn = str(ranges[-1].get("End-LSN", start_lsn))
    timeline = int(ranges[-1].get("Timeline", fields.get("START TIMELINE", 1)))
    size = _written_size(data, fmt, manifest)
    parse_lsn(stop_lsn)  # a malformed manifest fails here, before it is recorded
    return BackupInfo(
        label=label,
        kind="incremental" if parent is not None else "full",
        parent=parent.label if parent is not None else None,
        timeline=timeline,
        start_lsn=start_lsn,
        stop_lsn=stop_lsn,
        start_time=start_time,
        stop_time=stop_time,
        size_bytes=size,
        system_identifier=cluster.system_identifier,
        pg_major=cluster.pg_major,
        pg_version=version,
        data_checksums=cluster.data_checksums,
        format=fmt,
    )


def _written_size(data: Path, fmt: str, manifest: dict[str, Any]) -> int:
    """Bytes the backup takes. A tar backup is a few files side by side; a plain one is the
    manifest's files (it lists every one with its size, so no walk over thousands of files
    and a stat each: a measurable share of a small backup's time) plus the WAL streamed into
    pg_wal, which the manifest leaves out, plus the manifest itself."""
    if fmt == "tar":
        return sum(part.stat().st_size for part in data.iterdir() if part.is_file())
    size = sum(int(entry.get("Size", 0)) for entry in manifest.get("Files", []))
    wal = data / "pg_wal"
    if wal.is_dir():
        size += sum(part.stat().st_size for part in wal.iterdir() if part.is_file())
    return size + (data / "backup_manifest").stat().st_size
