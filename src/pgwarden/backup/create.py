"""`pgwarden backup create`: a base backup of the local server into the backup location.

pg_basebackup in plain format with its WAL streamed alongside (`-X stream`): each backup is
restorable and checkable (`pg_verifybackup` parses its WAL) on its own; the archive carries
everything after it. With `--incremental` (PostgreSQL 17+) only blocks changed since the newest
backup are copied, and a restore combines the chain with pg_combinebackup.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
import shutil
import tarfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgwarden.backup.observe import archiver, cluster_identity
from pgwarden.backup.repo import BACKUP_FILE, BackupInfo, Cluster, Repository
from pgwarden.connect import Target, connect
from pgwarden.errors import ServerError, UserError
from pgwarden.lsn import parse_lsn
from pgwarden.server.cluster import LocalServer
from pgwarden.server.osuser import clean_env

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


def _lock_file(server: LocalServer) -> Path:
    return server.state.cluster / "backup-create.lock"


def _try_lock(handle: IO[str]) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def create_lock(server: LocalServer) -> Iterator[None]:
    """One `backup create` at a time per server. The kernel drops the lock when the process
    dies, however it dies: a backup without its record and without a holder of this lock was
    interrupted, and `prune` may remove it."""
    path = _lock_file(server)
    path.parent.mkdir(parents=True, exist_ok=True)
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
    path = _lock_file(server)
    if not path.exists():
        return False
    with path.open("a") as handle:
        if not _try_lock(handle):
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def create_backup(
    server: LocalServer, *, incremental: bool = False, progress: Progress | None = None
) -> BackupInfo:
    with create_lock(server):
        # An interrupted create's staging copy (object stores): nobody else writes there.
        shutil.rmtree(server.state.cluster / "backup-staging", ignore_errors=True)
        return _create(server, incremental=incremental, progress=progress)


def _create(server: LocalServer, *, incremental: bool, progress: Progress | None) -> BackupInfo:
    repo = repository(server)
    target = require_running(server)
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
            "WAL archiving is not on yet: the server was started before backup.location was "
            "set, and a base backup without the WAL after it restores to one moment only",
            hint="restart the server (`pgwarden down && pgwarden up`), then back up",
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
    if not staged:
        home = repo.backup_dir(label)
        home.mkdir(mode=0o700)
        server.runas.chown(home)
        written = home / "data"
        fmt = "plain"
    else:
        home = server.state.cluster / "backup-staging" / label
        home.mkdir(mode=0o700, parents=True)
        server.runas.chown(home.parent)
        server.runas.chown(home)
        written = home / "data"
        fmt = "tar"
    args: list[str | Path] = [
        server.tool("pg_basebackup"),
        "-D", written, "-F", fmt[0], "-X", "stream", "-c", "fast", "-l", f"pgwarden {label}",
        "-d", _conninfo(server),
    ]  # fmt: skip
    if progress is not None:
        # Only for a progress bar: -P has the server estimate the total size first, one more
        # pass over the data directory.
        args.append("-P")
    try:
        if parent is not None:
            args += ["--incremental", _parent_manifest(server, repo, parent, home)]
        _run_with_progress(server, args, progress)
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
        server.runas.chown(home / BACKUP_FILE)
    return info


def _parent_manifest(server: LocalServer, repo: Repository, parent: BackupInfo, home: Path) -> Path:
    own = repo.plain_dir(parent)
    if own is not None:
        return own / "backup_manifest"
    path = home / "parent_manifest"
    repo.fetch_part(parent.label, "backup_manifest", path)
    server.runas.chown(path)
    return path


def _new_label(repo: Repository) -> str:
    base = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    label, n = base, 1
    while repo.has_label(label):
        n += 1
        label = f"{base}-{n}"
    return label


def _conninfo(server: LocalServer) -> str:
    """The server's admin URL without its password (that goes in PGPASSWORD)."""
    params = conninfo_to_dict(server.url("postgres"))
    params.pop("password", None)
    return make_conninfo("", **params)


def _run_with_progress(
    server: LocalServer, args: list[str | Path], progress: Progress | None
) -> None:
    env = clean_env()
    password = server.state.password()
    if password:
        env["PGPASSWORD"] = password  # the child's environment only: never on a command line
    with server.runas.popen(args, env=env) as proc:
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
    size = 0
    for path in data.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink():
                size += path.stat().st_size
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
