"""What every command shares: the global options, the loaded config, the local server."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import click

from pgwarden.backup.repo import Repository
from pgwarden.config import LoadedConfig, load_config
from pgwarden.connect import Target, named_target, resolve_target
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
        """A server named on purpose, for commands that otherwise work on the local server."""
        return named_target(self.dsn)

    def backup_repository(self) -> Repository | None:
        """backup.location's repository, whether or not there is a local server."""
        root = backup_root(self.loaded.config, self.loaded.path)
        return Repository.at(root) if root is not None else None

    def target(self) -> Target:
        def local_url() -> str | None:
            server = self.server()
            return server.url() if server.is_running() else None

        return resolve_target(self.dsn, local_url)


pass_app = click.make_pass_decorator(AppContext)
