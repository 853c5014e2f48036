"""The WAL capture consumer beside the local server (history.capture: wal).

`pgwarden up` starts `pgwarden history follow` as a process of its own when any table is
captured from the WAL, and `pgwarden down` stops it before the server. Its pid and log live in
the state directory. It is a convenience, not what makes history correct: readers catch up by
themselves, and the slot keeps every change until one consumer or another has written it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pgwarden.server.state import StateDir

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
