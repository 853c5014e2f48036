"""The WAL capture consumer beside the local server (history.capture: wal).

`pgwarden up` starts `pgwarden history follow` as a process of its own when any table is
captured from the WAL, and `pgwarden down` stops it before the server. Its pid and log live in
the state directory. It is a convenience, not what makes history correct: readers catch up by
themselves, and the slot keeps every change until one consumer or another has written it.
`capture_state` is what `status` shows of it: the process, the slot's lag and the WAL's disk.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgwarden.connect import Target, connect
from pgwarden.errors import ConnectionFailed
from pgwarden.history import HistorySchema, catalog, walstate
from pgwarden.history.walstate import SlotLag
from pgwarden.server.cluster import LocalServer
from pgwarden.server.state import StateDir
from pgwarden.sizes import format_size

PID_FILE = "consumer.pid"
LOG_FILE = "consumer.log"
# Consumers started by this process: kept, so that their exit can be collected (a long-lived
# caller such as a test run would otherwise leave zombies and unclosed handles).
_started: dict[int, subprocess.Popen[bytes]] = {}


def pid_file(state: StateDir) -> Path:
    return state.root / PID_FILE


def log_file(state: StateDir) -> Path:
    return state.root / LOG_FILE


def running_pid(state: StateDir) -> int | None:
    """The consumer's pid, when the process in the pid file is alive and is ours."""
    try:
        pid = int(pid_file(state).read_text().strip())
    except (OSError, ValueError):
        return None
    started = _started.get(pid)
    if started is not None:  # ours, maybe not yet past exec: /proc would show our own cmdline
        return pid if started.poll() is None else None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        try:
            os.kill(pid, 0)  # no /proc (macOS): alive is the best we can tell
        except OSError:
            return None
        return pid
    return pid if b"follow" in cmdline and b"history" in cmdline else None


def start(state: StateDir, url: str, config_path: Path | None) -> tuple[int, bool]:
    """Start the consumer unless it runs; (pid, started now). The URL goes in the
    environment, never on the command line (which every local user can read)."""
    pid = running_pid(state)
    if pid is not None:
        return pid, False
    args = [sys.executable, "-m", "pgwarden"]
    if config_path is not None:
        args += ["--config", str(config_path)]
    args += ["history", "follow", "--wait"]  # back by itself after a crash and recovery
    with log_file(state).open("ab") as log:
        process = subprocess.Popen(
            args,
            env={**os.environ, "PGWARDEN_DSN": url},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # not stopped by the terminal's Ctrl-C
        )
    pid_file(state).write_text(f"{process.pid}\n")
    _started[process.pid] = process
    return process.pid, True


def stop(state: StateDir, timeout: float = 15.0) -> bool:
    """Stop the consumer (it finishes its batch on SIGTERM); whether one was running."""
    pid = running_pid(state)
    if pid is None:
        pid_file(state).unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and running_pid(state) is not None:
        _reap(pid)
        time.sleep(0.05)
    if running_pid(state) is not None:
        os.kill(pid, signal.SIGKILL)  # a batch not committed is written again by the next one
        _reap(pid)
    pid_file(state).unlink(missing_ok=True)
    return True


def _reap(pid: int) -> None:
    """Collect the exit status when the consumer is our own child (started in this process)."""
    process = _started.get(pid)
    if process is not None:
        if process.poll() is not None:
            del _started[pid]
        return
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


@dataclass(frozen=True)
class CaptureState:
    """WAL capture beside the local server, as `status` shows it."""

    consumer_pid: int | None
    lag: SlotLag | None  # None: the server is not running or history is not applied yet
    disk_free: int | None  # bytes free where the server's WAL lives

    def warnings(self) -> list[str]:
        lines = []
        if self.lag is not None and self.lag.alarming:
            lines.append(self.lag.warning())
        if self.lag is not None and self.disk_free is not None and self.disk_free < self.lag.alarm:
            # The alarm would come after the disk is full: say so now.
            lines.append(
                f"the WAL's disk has {format_size(self.disk_free)} free, less than "
                f"history.wal_lag_alarm ({format_size(self.lag.alarm)}): free space or lower the "
                "alarm, or the disk fills before it warns"
            )
        return lines

    def to_json(self) -> dict[str, Any]:
        return {
            "consumer_pid": self.consumer_pid,
            "slot": self.lag.to_json() if self.lag is not None else None,
            "disk_free_bytes": self.disk_free,
            "warnings": self.warnings(),
        }


def capture_state(server: LocalServer) -> CaptureState:
    """The consumer, the slot's lag and the WAL disk's free space, for `status`."""
    lag = None
    disk_free = None
    if server.is_running():
        schema = HistorySchema(server.config.history.schema_name)
        # status says what it can: a database not there (yet) leaves the slot unknown.
        target = Target(server.url(), "the local server")
        with contextlib.suppress(ConnectionFailed), connect(target, autocommit=True) as conn:
            if catalog.is_installed(conn, schema):
                lag = walstate.lag(conn, schema)
        with contextlib.suppress(OSError):
            disk_free = shutil.disk_usage(server.state.data_dir / "pg_wal").free
    return CaptureState(running_pid(server.state), lag, disk_free)
