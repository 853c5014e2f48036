"""The state directory: where a local server keeps its data, logs and admin password.

Layout (default `./.pgwarden/` beside the config):

    state.json        what pgwarden knows: binaries, port, the last start and how it went
    admin-password    the generated superuser password (mode 0600)
    cluster/          owned by the user PostgreSQL runs as
        data/         PGDATA (initdb --data-checksums)
        log/postgresql.log
        run/          the Unix socket

As root, PostgreSQL runs as an unprivileged user that must be able to reach `cluster/`. When the
state directory sits below a folder that user cannot enter (say /root), pgwarden does not loosen
that folder: it keeps the cluster under /var/lib/pgwarden/clusters/<hash> and leaves a symlink.
A state directory made anew where an earlier one was removed gets a cluster directory of its own
(<hash>-2, …): the earlier cluster's data stays where it was, neither reused nor deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgwarden.server.osuser import SYSTEM_ROOT, RunAs

STATE_FILE = "state.json"
PASSWORD_FILE = "admin-password"  # noqa: S105 - a file name
CLUSTER_LINK = "cluster"
MARKER = "pgwarden-cluster.json"  # inside PGDATA: proves the data dir is ours


@dataclass(frozen=True)
class StateDir:
    root: Path

    @property
    def state_file(self) -> Path:
        return self.root / STATE_FILE

    @property
    def password_file(self) -> Path:
        return self.root / PASSWORD_FILE

    @property
    def cluster(self) -> Path:
        # Resolved, so PostgreSQL (running as another user) gets a path it can walk.
        return (self.root / CLUSTER_LINK).resolve()

    @property
    def data_dir(self) -> Path:
        return self.cluster / "data"

    @property
    def log_file(self) -> Path:
        return self.cluster / "log" / "postgresql.log"

    @property
    def socket_dir(self) -> Path:
        return self.cluster / "run"

    def exists(self) -> bool:
        return self.state_file.is_file()

    def read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write(self, data: dict[str, Any]) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, self.state_file)

    def update(self, **changes: Any) -> dict[str, Any]:
        data = self.read()
        data.update(changes)
        self.write(data)
        return data

    def password(self) -> str | None:
        try:
            return self.password_file.read_text().strip() or None
        except OSError:
            return None

    def ensure_password(self) -> str:
        existing = self.password()
        if existing:
            return existing
        value = secrets.token_urlsafe(24)
        fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(value + "\n")
        return value

    def prepare(self, runas: RunAs) -> None:
        """Create the state dir and a cluster dir that `runas` owns and can reach."""
        self.root.mkdir(parents=True, exist_ok=True)
        # As root the service user must traverse (not list) the state dir to reach cluster/.
        with contextlib.suppress(PermissionError):
            os.chmod(self.root, 0o711 if runas.switch else 0o700)
        link = self.root / CLUSTER_LINK
        if not link.exists() and not link.is_symlink():
            if runas.switch and not runas.can_access(self.root):
                digest = hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:16]
                clusters = SYSTEM_ROOT / "clusters"
                clusters.mkdir(parents=True, exist_ok=True)
                os.chmod(SYSTEM_ROOT, 0o755)  # noqa: S103 - our own dirs, readable by design
                os.chmod(clusters, 0o711)  # noqa: S103 - our own dirs, readable by design
                target = _fresh_dir(clusters, digest)
                link.symlink_to(target, target_is_directory=True)
            else:
                link.mkdir(mode=0o700)
        cluster = self.cluster
        for sub in (cluster, cluster / "log", cluster / "run"):
            sub.mkdir(mode=0o700, exist_ok=True)
            runas.chown(sub)


def _fresh_dir(parent: Path, name: str) -> Path:
    """A new directory `parent/name`, or `name-2`, `name-3`, … where that exists already (the
    cluster of a state directory that was removed: its data is someone's, so it stays)."""
    for n in range(1, 1000):
        target = parent / (name if n == 1 else f"{name}-{n}")
        try:
            target.mkdir(mode=0o700)
        except FileExistsError:
            continue
        return target
    raise FileExistsError(f"{parent / name}: a thousand clusters of the same state directory")
