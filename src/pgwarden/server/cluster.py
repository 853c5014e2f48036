"""The local PostgreSQL server behind `pgwarden up | down | status | url | psql | logs`."""

from __future__ import annotations

import contextlib
import errno
import getpass
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pgwarden.backup.repo import Cluster, Repository
from pgwarden.backup.store import S3Location, S3Store
from pgwarden.config import Config
from pgwarden.errors import BinariesNotFound, DataDirRefused, PortInUse, ServerError
from pgwarden.server import pgconf
from pgwarden.server.binaries import Binaries, find_binaries
from pgwarden.server.osuser import RunAs, reachable_bindir, service_user
from pgwarden.server.state import MARKER, StateDir

CONF_INCLUDE = "pgwarden.conf"
INCLUDE_LINE = f"include = '{CONF_INCLUDE}'  # added by pgwarden\n"
MAX_SOCKET_DIR = 90  # sun_path is 108 bytes; leave room for "/.s.PGSQL.65535"


class ServerState(StrEnum):
    NOT_INITIALIZED = "not-initialized"
    STOPPED = "stopped"
    CRASHED = "crashed"  # stopped without a clean shutdown: `up` will run crash recovery
    RUNNING = "running"


class StartOutcome(StrEnum):
    ALREADY_RUNNING = "already-running"
    STARTED = "started"
    RECOVERED = "recovered"  # started after an unclean stop; crash recovery ran
    INITIALIZED = "initialized"  # a fresh cluster was created and started


class StopOutcome(StrEnum):
    STOPPED = "stopped"
    NOT_RUNNING = "not-running"


@dataclass(frozen=True)
class Status:
    state: ServerState
    state_dir: str
    data_dir: str
    binaries: str
    version: str
    port: int | None
    pid: int | None
    url: str | None
    last_start: dict[str, Any] | None
    detail: str

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if data["url"]:
            data["url"] = mask_url(data["url"])
        return data


def free_port() -> int:
    """A TCP port nobody listens on right now, for throwaway servers (bootstrap SQL, tests)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def client_host(address: str) -> str:
    """Where a client on this machine reaches a server listening on `address`."""
    return "127.0.0.1" if address in ("*", "0.0.0.0", "localhost", "") else address  # noqa: S104


def mask_url(url: str) -> str:
    """A libpq URI with its password replaced, for printing and logging."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.split("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else url


# /proc/<pid>/stat flag of a task that has begun to exit (include/linux/sched.h).
_PF_EXITING = 0x4
_SIGKILL_BIT = 1 << (signal.SIGKILL - 1)


def _dying(pid: int) -> bool:
    """True while a process is killed but not yet gone: SIGKILL pending, exiting, or a zombie.
    A postmaster killed a moment ago is still 'running' to kill(pid, 0) for a while (longer
    on a loaded machine), and `pgwarden up` must not take it for a live server (seen once in
    CI: `up` said it was running, and the next connection was refused)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
        status = Path(f"/proc/{pid}/status").read_text()
    except (OSError, IndexError):
        return False
    if not fields or fields[0] in ("Z", "X") or int(fields[6]) & _PF_EXITING:
        return True
    for line in status.splitlines():
        if line.startswith(("SigPnd:", "ShdPnd:")) and int(line.split()[1], 16) & _SIGKILL_BIT:
            return True
    return False


class LocalServer:
    """One local cluster in one state directory."""

    def __init__(
        self,
        config: Config,
        state_dir: Path,
        *,
        pg_bin: Path | None = None,
        port: int | None = None,
        backup_root: Path | S3Location | None = None,
    ) -> None:
        self.config = config
        self.state = StateDir(state_dir.absolute())
        # backup.location, resolved (a directory or an S3 location): WAL is archived there.
        self.backup_root = backup_root
        self._pg_bin = pg_bin
        self._port = port
        self._binaries: Binaries | None = None
        self._runas: RunAs | None = None

    # -- what we run, as whom -------------------------------------------------------------
    @property
    def runas(self) -> RunAs:
        if self._runas is None:
            self._runas = service_user(self.config.server.service_user)
        return self._runas

    @property
    def binaries(self) -> Binaries:
        if self._binaries is None:
            recorded = self.state.read().get("bindir")
            self._binaries = find_binaries(
                self._pg_bin,
                self.config.server.pg_bin,
                Path(recorded) if recorded else None,
                self.state.read().get("bin_source"),
            )
        return self._binaries

    def tool(self, name: str) -> Path:
        return reachable_bindir(self.binaries.bindir, self.runas) / name

    @property
    def port(self) -> int:
        """--port, else the port a running server (or an earlier `up --port`) uses, else config."""
        if self._port is not None:
            return self._port
        data = self.state.read()
        recorded = data.get("port")
        if recorded and (data.get("port_from_cli") or self.is_running()):
            return int(recorded)
        return self.config.server.port

    # -- observation --------------------------------------------------------------------
    def _pidfile_pid(self) -> int | None:
        try:
            return int((self.state.data_dir / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _wait_for_zombie(self, timeout: float = 15.0) -> None:
        """Wait until a killed postmaster is gone and reaped: while it exits, and as a zombie
        until reaped, PostgreSQL itself believes it still runs (kill(pid, 0) succeeds) and
        refuses to start."""
        pid = self._pidfile_pid()
        deadline = time.monotonic() + timeout
        while pid is not None and time.monotonic() < deadline:
            if not _dying(pid):
                return
            time.sleep(0.1)

    def _pid(self) -> int | None:
        """The postmaster's pid if it is alive, else None."""
        pid = self._pidfile_pid()
        if pid is None:
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, owned by another user
        # A recycled pid could belong to anything, and a killed postmaster whose parent never
        # reaps it (pid 1 in many containers) lingers as a zombie: neither is a running server.
        with contextlib.suppress(OSError):
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            if "postgres" not in comm or _dying(pid):
                return None
        return pid

    def is_running(self) -> bool:
        return self._pid() is not None

    def _cluster_state(self) -> str | None:
        """'shut down', 'in production', … as pg_controldata reports it."""
        return self._controldata().get("Database cluster state")

    def status(self) -> Status:
        data = self.state.read()
        initialized = (self.state.data_dir / "PG_VERSION").is_file()
        pid = self._pid() if initialized else None
        if not initialized:
            state, detail = ServerState.NOT_INITIALIZED, "no cluster yet: `pgwarden up` creates one"
        elif pid is not None:
            state, detail = ServerState.RUNNING, "accepting connections"
        elif self._cluster_state() in ("shut down", "shut down in recovery"):
            state, detail = ServerState.STOPPED, "cleanly shut down; data is kept"
        else:
            state = ServerState.CRASHED
            detail = (
                "the server stopped without a clean shutdown (killed or crashed); "
                "`pgwarden up` will run crash recovery"
            )
        last = data.get("last_start")
        if state is ServerState.RUNNING and last and last.get("outcome") == StartOutcome.RECOVERED:
            detail = f"accepting connections; recovered from a crash at {last.get('at')}"
        try:
            binaries = self.binaries
            bin_desc, version = binaries.describe(), binaries.version
        except (ServerError, BinariesNotFound) as exc:
            bin_desc, version = f"unavailable: {exc.message}", "unknown"
        return Status(
            state=state,
            state_dir=str(self.state.root),
            data_dir=str(self.state.data_dir),
            binaries=bin_desc,
            version=version,
            port=int(data["port"]) if pid and data.get("port") else None,
            pid=pid,
            url=self.url() if pid else None,
            last_start=last,
            detail=detail,
        )

    # -- start and stop -----------------------------------------------------------------
    def up(self) -> StartOutcome:
        if self.is_running():
            running_port = self.state.read().get("port")
            if self._port is not None and running_port and int(running_port) != self._port:
                raise ServerError(
                    f"the server in {self.state.root} already runs on port {running_port}",
                    hint="stop it with `pgwarden down` before starting it on another port",
                )
            self._prepare_backup_root()
            self._claim_backup_root()
            self._write_config()  # so a changed config is at least on disk; reload below
            self._pg_ctl("reload")
            return StartOutcome.ALREADY_RUNNING
        self.state.prepare(self.runas)
        self._prepare_backup_root()
        fresh = self._check_data_dir()
        # The port first: a busy port must not leave a half-made cluster behind.
        self._settle_port(fresh)
        if fresh:
            self._initdb()
            outcome = StartOutcome.INITIALIZED
        else:
            crashed = self._cluster_state() not in ("shut down", "shut down in recovery")
            outcome = StartOutcome.RECOVERED if crashed else StartOutcome.STARTED
        self._claim_backup_root()
        self._wait_for_zombie()
        self._check_port_free()
        self._write_config()
        started = time.monotonic()
        self._start()
        self.state.update(
            port=self.port,
            port_from_cli=self._port is not None or bool(self.state.read().get("port_from_cli")),
            bindir=str(self.binaries.bindir),
            bin_source=self.binaries.source.split(",")[0],
            version=self.binaries.version,
            last_start={
                "at": datetime.now(UTC).isoformat(timespec="seconds"),
                "outcome": str(outcome),
                "seconds": round(time.monotonic() - started, 3),
            },
        )
        return outcome

    def down(self) -> StopOutcome:
        if not self.is_running():
            return StopOutcome.NOT_RUNNING
        try:
            self._pg_ctl("stop", "-m", "fast", "-w", "-t", "120")
        except ServerError:
            # It may have died on its own meanwhile (a crash racing the stop): that is stopped.
            self._wait_for_zombie()
            if self.is_running():
                raise
        return StopOutcome.STOPPED

    def purge(self) -> None:
        """Stop the server and delete its cluster (data, logs). The caller has asked the user."""
        self.down()
        link = self.state.root / "cluster"
        target = link.resolve()
        if target.exists():
            shutil.rmtree(target)
        if link.is_symlink():
            link.unlink()
        for name in ("state.json", "admin-password"):
            with contextlib.suppress(FileNotFoundError):
                (self.state.root / name).unlink()

    def _start(self) -> None:
        # After a crash, backends of the dead postmaster keep its shared memory until they
        # notice they are orphans (at their next wait): PostgreSQL then refuses to start with
        # "pre-existing shared memory block is still in use". They go within moments; retry.
        for _ in range(10):
            result = self._pg_ctl_start()
            if result.returncode == 0 or "pre-existing shared memory block" not in self.log_tail(5):
                break
            time.sleep(0.5)
        self._check_started(result)

    def _pg_ctl_start(self) -> subprocess.CompletedProcess[str]:
        return self.runas.run(
            [
                self.tool("pg_ctl"),
                "start",
                "-D",
                self.state.data_dir,
                "-l",
                self.state.log_file,
                "-w",
                "-t",
                "120",
            ],
            timeout=180,
        )

    def _check_started(self, result: subprocess.CompletedProcess[str]) -> None:
        if result.returncode != 0 or not self.is_running():
            tail = self.log_tail(15)
            if "Address already in use" in tail:
                raise PortInUse(
                    f"port {self.port} is already in use",
                    hint=f"stop what listens there, or pick another: pgwarden up --port "
                    f"{self.port + 1} (or server.port in pgwarden.yaml)",
                )
            raise ServerError(
                f"PostgreSQL did not start (pg_ctl exit {result.returncode}). "
                f"Last lines of {self.state.log_file}:\n{tail}",
                hint="fix the cause shown above, then run `pgwarden up` again",
            )

    def _pg_ctl(self, *args: str | Path) -> None:
        result = self.runas.run([self.tool("pg_ctl"), *args, "-D", self.state.data_dir])
        if result.returncode != 0:
            raise ServerError(f"pg_ctl {args[0]} failed: {result.stderr.strip()}")

    def _settle_port(self, fresh: bool) -> None:
        """Refuse a busy port before creating anything; on the very first `up` with no port
        asked for anywhere (the default 5432 taken by another PostgreSQL, say), take a free
        one instead and keep it, so that README's first command works on any machine."""
        try:
            self._check_port_free()
        except PortInUse:
            asked = (
                self._port is not None
                or "port" in self.config.server.model_fields_set
                or self.state.read().get("port") is not None
            )
            if asked or not fresh:
                raise
            self._port = free_port()
            self.chosen_port = True
            self._check_port_free()

    chosen_port = False  # set when _settle_port picked a free port

    def _check_port_free(self) -> None:
        for address in self.config.server.listen_addresses:
            host = client_host(address)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((host, self.port))
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE:
                        raise PortInUse(
                            f"port {self.port} on {host} is already in use by another process",
                            hint=f"stop it, or choose another port: pgwarden up --port "
                            f"{self.port + 1} (or set server.port in pgwarden.yaml)",
                        ) from None
                    if exc.errno == errno.EADDRNOTAVAIL:
                        raise ServerError(
                            f"server.listen_addresses: {address} is not an address of this machine",
                        ) from None
                    raise

    @property
    def archive_dir(self) -> Path | None:
        return self.backup_root / "wal" if isinstance(self.backup_root, Path) else None

    @property
    def s3_location_file(self) -> Path:
        """The S3 location, for the archive and restore commands PostgreSQL runs."""
        return self.state.cluster / "backup-location.json"

    def backup_repository(self) -> Repository | None:
        return Repository.at(self.backup_root) if self.backup_root is not None else None

    def wal_command(self, verb: str) -> str:
        """archive_command / restore_command for an S3 location: pgwarden's own, run by
        PostgreSQL with this Python."""
        quoted = [shlex.quote(str(a)) for a in (sys.executable, self.s3_location_file)]
        command = f"{quoted[0]} -m pgwarden.backup.walcmd {verb} {quoted[1]}"
        command = command.replace("%", "%%")
        return command + (" %p" if verb == "push" else " %f %p")

    def _prepare_backup_root(self) -> None:
        """The backup location's folders, owned by the user PostgreSQL runs as (its archiver
        writes there); refused up front when that user cannot reach them."""
        if self.backup_root is None:
            return
        if isinstance(self.backup_root, S3Location):
            self._prepare_s3(self.backup_root)
            return
        root = self.backup_root
        try:
            for sub in (root, root / "wal", root / "backups"):
                sub.mkdir(mode=0o700, parents=True, exist_ok=True)
                self.runas.chown(sub)
        except OSError as exc:
            raise ServerError(
                f"backup.location {root}: cannot create it ({exc.strerror})",
                hint="create it yourself, writable by the user pgwarden runs as, or choose "
                "another directory",
            ) from None
        if not self.runas.can_access(root / "wal", "-w"):
            raise ServerError(
                f"backup.location {root}: the user PostgreSQL runs as ({self.runas.name}) "
                "cannot write there",
                hint=f"give {self.runas.name} write access to it, or choose another directory",
            )

    def _prepare_s3(self, location: S3Location) -> None:
        S3Store(location).check_reachable()  # no bucket, no credentials: said before starting
        self.s3_location_file.write_text(json.dumps(location.to_json(), indent=2) + "\n")
        os.chmod(self.s3_location_file, 0o644)  # names a bucket, holds no secret
        import pgwarden  # noqa: PLC0415  (where this pgwarden's code is)

        for needed in (Path(sys.executable), Path(pgwarden.__file__)):
            if not self.runas.can_access(needed, "-r"):
                raise ServerError(
                    f"the user PostgreSQL runs as ({self.runas.name}) cannot read {needed}, "
                    "and its archive_command runs pgwarden to put WAL into S3",
                    hint=f"install pgwarden where {self.runas.name} can read it (not under a "
                    "private home directory)",
                )

    def _claim_backup_root(self) -> None:
        """Record whose archive the location is on first use, and refuse, before the server
        archives anything there, a location that holds another cluster's WAL."""
        repo = self.backup_repository()
        if repo is None:
            return
        control = self._controldata()
        if "Database system identifier" not in control:
            raise ServerError(f"pg_controldata could not read {self.state.data_dir}")
        repo.claim(
            Cluster(
                system_identifier=control["Database system identifier"],
                pg_major=self.binaries.major,
                wal_segment_size=int(control["Bytes per WAL segment"]),
                data_checksums=control.get("Data page checksum version", "0") != "0",
            )
        )

    def _controldata(self) -> dict[str, str]:
        """pg_controldata's fields; empty when it could not read the data directory."""
        result = self.runas.run([self.tool("pg_controldata"), "-D", self.state.data_dir])
        fields = {}
        for line in result.stdout.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        return fields

    # -- the data directory -------------------------------------------------------------
    def _check_data_dir(self) -> bool:
        """True when the data dir is absent/empty (fresh); refuse anything not ours."""
        data = self.state.data_dir
        if not data.exists() or not any(data.iterdir()):
            return True
        if not (data / MARKER).is_file():
            raise DataDirRefused(
                f"{data} holds files pgwarden did not create; refusing to touch it",
                hint="use another --state-dir, or move that directory away yourself",
            )
        version_file = data / "PG_VERSION"
        if not version_file.is_file() or not (data / "global" / "pg_control").is_file():
            raise DataDirRefused(
                f"{data} is damaged: PG_VERSION or global/pg_control is missing",
                hint="restore it from a backup; pgwarden will not rewrite or delete it "
                "(`pgwarden down --purge` deletes it if you are sure)",
            )
        major = version_file.read_text().strip()
        if major != str(self.binaries.major):
            raise DataDirRefused(
                f"{data} was created by PostgreSQL {major}, but the binaries in use are "
                f"{self.binaries.describe()}",
                hint=f"pass --pg-bin with PostgreSQL {major} binaries "
                "(moving to another major version needs pg_upgrade)",
            )
        return False

    def _initdb(self) -> None:
        password = self.state.ensure_password()
        data = self.state.data_dir
        pwfile = self.state.cluster / ".initdb-pw"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(password + "\n")
        self.runas.chown(pwfile)
        try:
            result = self.runas.run(
                [
                    self.tool("initdb"),
                    "-D",
                    data,
                    "-U",
                    self.config.server.admin_user,
                    f"--pwfile={pwfile}",
                    "--auth-local=peer",
                    "--auth-host=scram-sha-256",
                    "--data-checksums",
                    "--encoding=UTF8",
                    "--no-locale",
                    "--no-instructions",
                ],
                timeout=300,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise ServerError(f"initdb failed:\n{result.stderr.strip()}")
        marker = data / MARKER
        marker.write_text(
            json.dumps({"created_by": "pgwarden", "at": datetime.now(UTC).isoformat()}) + "\n"
        )
        self.runas.chown(marker)
        conf = data / "postgresql.conf"
        with conf.open("a") as handle:
            handle.write("\n" + INCLUDE_LINE)

    def _placement(self) -> pgconf.Placement:
        server = self.config.server
        socket_dir = str(self.state.socket_dir)
        sockets = [socket_dir] if len(socket_dir) <= MAX_SOCKET_DIR else []
        return pgconf.Placement(
            listen_addresses=server.listen_addresses,
            port=self.port,
            socket_dirs=sockets,
            allowed_cidrs=server.allowed_cidrs,
            ident_users=(self.runas.name, getpass.getuser()),
            admin_user=server.admin_user,
            archive_dir=str(self.archive_dir) if self.archive_dir is not None else None,
            archive_command=(
                self.wal_command("push") if isinstance(self.backup_root, S3Location) else None
            ),
            archive_timeout=self.config.backup.archive_timeout,
            summarize_wal=self.binaries.major >= 17,
            logical_decoding=self.config.history.uses_wal,
            slot_wal_keep=self.config.history.wal_keep_limit,
        )

    def _write_config(self) -> None:
        rendered = pgconf.render_all(self.config.server, self._placement())
        data = self.state.data_dir
        targets = {
            CONF_INCLUDE: rendered["postgresql.conf"],
            "pg_hba.conf": rendered["pg_hba.conf"],
            "pg_ident.conf": rendered["pg_ident.conf"],
        }
        for name, text in targets.items():
            path = data / name
            tmp = data / f".{name}.tmp"
            tmp.write_text(text)
            os.chmod(tmp, 0o600)
            self.runas.chown(tmp)
            os.replace(tmp, path)

    # -- connecting -----------------------------------------------------------------------
    def url(
        self, database: str | None = None, *, host: str | None = None, port: int | None = None
    ) -> str:
        """The admin's URL; `host` and `port` for another cluster of the same roles (a
        restored copy)."""
        password = self.state.password()
        if password is None:
            raise ServerError(
                f"no admin password in {self.state.password_file}",
                hint="was this state dir created by `pgwarden up`?",
            )
        user = quote(self.config.server.admin_user, safe="")
        dbname = quote(database or self.config.database, safe="")
        host = host or client_host(self.config.server.listen_addresses[0])
        if ":" in host:
            host = f"[{host}]"
        return f"postgresql://{user}:{quote(password, safe='')}@{host}:{port or self.port}/{dbname}"

    def log_tail(self, lines: int = 50) -> str:
        return file_tail(self.state.log_file, lines)


def file_tail(path: Path, lines: int) -> str:
    """The last lines of a log file; empty when it cannot be read."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "".join(text.splitlines(keepends=True)[-lines:])
