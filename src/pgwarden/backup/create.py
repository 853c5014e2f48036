"""`pgwarden backup create`: a base backup into the backup location, of the local server or
(`--dsn`) of a server elsewhere (the statefulset flavor's CronJob backs up its server so).

Into a directory: pg_basebackup in plain format with its WAL streamed alongside (`-X stream`):
each backup is restorable and checkable (`pg_verifybackup` parses its WAL) on its own; the
archive carries everything after it. Into an object store: one tar piped from pg_basebackup
straight into the upload (`-D - -X none`), so that nothing the size of the database is staged
on this machine's disk (the statefulset's CronJob pod has only its node's ephemeral storage);
the backup's own WAL is then the archive's, which the server has archived before pg_basebackup
returns. With `--incremental` (PostgreSQL 17+) only blocks changed since the newest backup are
copied, and a restore combines the chain with pg_combinebackup.
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
import tempfile
import threading
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
from pgwarden.backup.tarscan import TarScan
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
    """What a base backup is taken of, and this machine's side of it: where its lock (and an
    incremental's parent manifest, for an object store) lives, which pg_basebackup runs, as
    whom."""

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
    """A server that is not pgwarden's local one, by its connection string: the lock is in
    this machine's temporary directory ($TMPDIR)."""
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
        # An interrupted create's leftovers: the parent manifest of an incremental one, and
        # the whole staged tar that earlier pgwarden versions wrote here for object stores.
        # Nobody else writes there (the lock).
        for leftover in ("backup-staging", "backup-parent"):
            shutil.rmtree(source.work / leftover, ignore_errors=True)
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
        spaces = conn.execute(
            "SELECT pg_catalog.string_agg(spcname, ', ' ORDER BY spcname) "
            "FROM pg_catalog.pg_tablespace WHERE spcname NOT IN ('pg_default', 'pg_global')"
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
    streamed = repo.root is None
    if streamed and spaces is not None and spaces[0]:
        # pg_basebackup writes only one tablespace to a pipe: said before anything starts.
        raise UserError(
            f"the server has tablespaces ({spaces[0]}); backups to an object store hold the "
            "main data directory only",
            hint="use a directory backup.location for a server with tablespaces",
        )
    if not streamed:
        home = repo.backup_dir(label)  # the backup's folder, where its marker goes first
        home.mkdir(mode=0o700)
        source.runas.chown(home)
    writer = Writing(socket.gethostname(), os.getpid(), datetime.now(UTC))
    try:
        repo.begin(label, writer)
        if streamed:
            described = _stream_to_store(source, label, parent, progress)
        else:
            described = _write_plain(source, label, parent, progress)
        with connect(target, autocommit=True) as conn:
            stopped = conn.execute("SELECT pg_catalog.now()").fetchone()
        assert stopped is not None
        stop_time = stopped[0]
        assert isinstance(stop_time, datetime)
        info = _describe(label, described, parent, cluster, version, stop_time=stop_time)
        repo.record(info)  # last: a backup without its record is not listed as one
    except BaseException:
        # Our own half-written copy, never anything of the user's: pg_basebackup removes
        # the data directory it created on failure; the label folder is ours too.
        with contextlib.suppress(Exception):  # the original error is the one to show
            repo.remove_backup(label)
        if not streamed:
            shutil.rmtree(repo.backup_dir(label), ignore_errors=True)
        raise
    finally:
        shutil.rmtree(source.work / "backup-parent", ignore_errors=True)
    if not streamed:
        source.runas.chown(repo.backup_dir(label) / BACKUP_FILE)
    return info


@dataclass(frozen=True)
class _Written:
    """What _describe needs of a backup just written, wherever it went."""

    fmt: str
    backup_label: str
    manifest: dict[str, Any]
    size: int


def _basebackup_args(
    source: Source, label: str, dest: str | Path, fmt: str, wal: str, progress: Progress | None
) -> list[str | Path]:
    args: list[str | Path] = [
        source.pg_basebackup,
        "-D", dest, "-F", fmt, "-X", wal, "-c", "fast", "-l", f"pgwarden {label}",
        "-d", _conninfo(source.target),
    ]  # fmt: skip
    if progress is not None:
        # Only for a progress bar: -P has the server estimate the total size first, one more
        # pass over the data directory.
        args.append("-P")
    return args


def _write_plain(
    source: Source, label: str, parent: BackupInfo | None, progress: Progress | None
) -> _Written:
    """A directory location: a plain backup written in place, its WAL beside it."""
    data = source.repo.backup_dir(label) / "data"
    args = _basebackup_args(source, label, data, "p", "stream", progress)
    if parent is not None:
        args += ["--incremental", _parent_manifest(source, parent)]
    _run_with_progress(source, args, progress)
    manifest = json.loads((data / "backup_manifest").read_text())
    return _Written(
        fmt="plain",
        backup_label=(data / "backup_label").read_text(),
        manifest=manifest,
        size=_plain_size(data, manifest),
    )


def _stream_to_store(
    source: Source, label: str, parent: BackupInfo | None, progress: Progress | None
) -> _Written:
    """An object store: base.tar piped into the upload as pg_basebackup writes it (which puts
    the manifest inside the tar when it writes to stdout); backup_label and backup_manifest
    are kept on the way, and the manifest stored beside the tar too, for an incremental
    backup's parent and for `verify` without unpacking."""
    repo = source.repo
    args = _basebackup_args(source, label, "-", "t", "none", progress)
    if parent is not None:
        args += ["--incremental", _parent_manifest(source, parent)]
    scan = TarScan(("backup_label", "backup_manifest"))

    def upload(stdout: IO[bytes]) -> None:
        repo.store.upload(f"backups/{label}/base.tar", _Tee(stdout, scan))

    _run_with_progress(source, args, progress, stdout=upload)
    found = scan.finish()  # a tar cut short is refused here, before it is recorded
    repo.store.write(f"backups/{label}/backup_manifest", found["backup_manifest"])
    return _Written(
        fmt="base-tar",
        backup_label=found["backup_label"].decode(),
        manifest=json.loads(found["backup_manifest"]),
        size=scan.total + len(found["backup_manifest"]),
    )


class _Tee:
    """pg_basebackup's output as the uploader reads it, shown to a TarScan on the way. Not
    seekable: the uploader reads it once, in parts."""

    def __init__(self, stream: IO[bytes], scan: TarScan) -> None:
        self.stream = stream
        self.scan = scan

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.scan.feed(data)
        return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False


def _parent_manifest(source: Source, parent: BackupInfo) -> Path:
    own = source.repo.plain_dir(parent)
    if own is not None:
        return own / "backup_manifest"
    # Fetched for pg_basebackup to read, as its user; removed when the backup is done.
    home = source.work / "backup-parent"
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    source.runas.chown(home)
    path = home / "backup_manifest"
    source.repo.fetch_part(parent.label, "backup_manifest", path)
    source.runas.chown(path)
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


def _run_with_progress(
    source: Source,
    args: list[str | Path],
    progress: Progress | None,
    *,
    stdout: Callable[[IO[bytes]], None] | None = None,
) -> None:
    """Run pg_basebackup, its progress read from stderr here; with `stdout`, its output is
    handed to that (an upload) in a thread of its own. If that fails, the pipe is closed, so
    pg_basebackup stops too, and its error is the one raised."""
    env = clean_env()
    if source.password:
        env["PGPASSWORD"] = source.password  # the child's environment only, never its argv
    failed: list[BaseException] = []
    with source.runas.popen(args, env=env, stdout=stdout is not None) as proc:
        worker: threading.Thread | None = None
        if stdout is not None:
            assert proc.stdout is not None
            out = proc.stdout

            def pump() -> None:
                try:
                    stdout(out)
                except BaseException as exc:  # handed to the main thread, raised there
                    failed.append(exc)
                    out.close()  # pg_basebackup's next write fails: it stops

            worker = threading.Thread(target=pump, name="backup-upload", daemon=True)
            worker.start()
        try:
            tail = _read_progress(proc, progress)
        except BaseException:
            proc.kill()
            raise
        finally:
            if worker is not None:
                worker.join()  # before anything is cleaned up behind it
        code = proc.wait()
    if failed:
        raise failed[0]
    if code != 0:
        raise ServerError(
            "pg_basebackup failed: " + (" / ".join(tail) or f"exit {code}"),
            hint="the server log (`pgwarden logs`) may say more",
        )


def _read_progress(proc: subprocess.Popen[bytes], progress: Progress | None) -> list[str]:
    """pg_basebackup's stderr to its end: progress lines to `progress`, the last ten others
    kept for an error message."""
    assert proc.stderr is not None
    tail: list[str] = []
    buffer = ""
    while True:
        chunk = os.read(proc.stderr.fileno(), 4096)  # what is there: progress as it comes
        if not chunk:
            break
        buffer += chunk.decode("utf-8", "replace")
        *parts, buffer = re.split(r"[\r\n]", buffer)
        for part in parts:
            found = _PROGRESS_RE.search(part)
            if found and progress is not None:
                progress(int(found.group(1)), int(found.group(2)))
            elif part.strip() and not found:
                tail = [*tail, part.strip()][-10:]
    if buffer.strip() and not _PROGRESS_RE.search(buffer):
        tail = [*tail, buffer.strip()][-10:]
    return tail


def _describe(
    label: str,
    written: _Written,
    parent: BackupInfo | None,
    cluster: Cluster,
    version: str,
    *,
    stop_time: datetime,
) -> BackupInfo:
    """The backup's own record, from its backup_label and manifest."""
    fields: dict[str, str] = {}
    for line in written.backup_label.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            fields[key.strip()] = value.strip()
    start_lsn = fields["START WAL LOCATION"].split()[0]
    try:
        start_time = datetime.strptime(fields["START TIME"], "%Y-%m-%d %H:%M:%S UTC")
        start_time = start_time.replace(tzinfo=UTC)
    except (KeyError, ValueError):  # log_timezone set to something else by the user
        start_time = stop_time
    ranges = written.manifest.get("WAL-Ranges") or [{}]
    stop_lsn = str(ranges[-1].get("End-LSN", start_lsn))
    timeline = int(ranges[-1].get("Timeline", fields.get("START TIMELINE", 1)))
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
        size_bytes=written.size,
        system_identifier=cluster.system_identifier,
        pg_major=cluster.pg_major,
        pg_version=version,
        data_checksums=cluster.data_checksums,
        format=written.fmt,
    )


def _plain_size(data: Path, manifest: dict[str, Any]) -> int:
    """Bytes a plain backup takes: the manifest's files (it lists every one with its size, so
    no walk over thousands of files and a stat each: a measurable share of a small backup's
    time) plus the WAL streamed into pg_wal, which the manifest leaves out, plus the manifest
    itself."""
    size = sum(int(entry.get("Size", 0)) for entry in manifest.get("Files", []))
    wal = data / "pg_wal"
    if wal.is_dir():
        size += sum(part.stat().st_size for part in wal.iterdir() if part.is_file())
    return size + (data / "backup_manifest").stat().st_size
