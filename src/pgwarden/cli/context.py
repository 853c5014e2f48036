"""What every command shares: the global options, the loaded config, the local server."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import click

from pgwarden.backup.repo import Repository
from pgwarden.backup.store import DirStore, S3Store
from pgwarden.config import LoadedConfig, load_config
from pgwarden.connect import Target, resolve_target
from pgwarden.server.cluster import LocalServer
from pgwarden.server.local import backup_root, local_server


@dataclass
class AppContext:
    config_path: Path | None
    state_dir: Path | None
    dsn: str | None
    _loaded: LoadedConfig | None = field(default=None, repr=False)

    @classmethod
    def create(cls, config_path: str | None, state_dir: str | None, dsn: str | None) -> AppContext:
        return cls(
            config_path=Path(config_path) if config_path else None,
            state_dir=Path(state_dir) if state_dir else None,
            dsn=dsn,
        )

    @property
    def loaded(self) -> LoadedConfig:
        if self._loaded is None:
            self._loaded = load_config(self.config_path)
        return self._loaded

    def server(self, *, pg_bin: Path | None = None, port: int | None = None) -> LocalServer:
        return local_server(
            self.loaded.config, self.loaded.path, self.state_dir, pg_bin=pg_bin, port=port
        )

    def explicit_target(self) -> Target | None:
        """A server named on purpose (--dsn, $PGWARDEN_DSN), not found in the environment
        (DATABASE_URL, PG*): for commands that otherwise work on the local server."""
        if self.dsn:
            return Target(self.dsn, "--dsn")
        value = os.environ.get("PGWARDEN_DSN")
        return Target(value, "$PGWARDEN_DSN") if value else None

    def backup_repository(self) -> Repository | None:
        """backup.location's repository, whether or not there is a local server."""
        root = backup_root(self.loaded.config, self.loaded.path)
        if root is None:
            return None
        if isinstance(root, Path):
            return Repository(DirStore(root))
        return Repository(S3Store(root))

    def target(self) -> Target:
        def local_url() -> str | None:
            server = self.server()
            return server.url() if server.is_running() else None

        return resolve_target(self.dsn, local_url)


pass_app = click.make_pass_decorator(AppContext)
