"""`pgwarden up`: start the local server, create the managed database, apply the config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from pgwarden.backup.store import S3Location
from pgwarden.config import Config
from pgwarden.connect import Target, connect
from pgwarden.converge import apply_config
from pgwarden.errors import ApplyFailed, ServerError, UserError
from pgwarden.plan import Plan
from pgwarden.server.cluster import LocalServer, StartOutcome


@dataclass(frozen=True)
class UpResult:
    outcome: StartOutcome
    url: str
    database_created: bool
    applied: Plan
    restart_needed: list[str]  # settings changed in the config that wait for a restart


def default_state_dir(config_path: Path | None) -> Path:
    base = config_path.parent if config_path is not None else Path.cwd()
    return (base / ".pgwarden").absolute()


def ensure_database(server: LocalServer) -> bool:
    """Create the configured database when missing; True when it was created."""
    target = Target(server.url("postgres"), "the local server")
    with connect(target, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_catalog.pg_database WHERE datname = %s", (server.config.database,)
        ).fetchone()
        if exists:
            return False
        try:
            conn.execute(
                sql.SQL("CREATE DATABASE {}").format(sql.Identifier(server.config.database))
            )
        except psycopg.errors.DuplicateDatabase:
            return False
        return True


def bring_up(server: LocalServer) -> UpResult:
    outcome = server.up()
    created = ensure_database(server)
    url = server.url()
    with connect(Target(url, "the local server")) as conn:
        pending = [
            str(r[0])
            for r in conn.execute(
                "SELECT name FROM pg_catalog.pg_settings WHERE pending_restart ORDER BY name"
            ).fetchall()
        ]
        conn.commit()
        try:
            applied = apply_config(conn, server.config)
        except (UserError, ApplyFailed) as exc:
            # Said plainly: the server runs, the config is what failed.
            raise UserError(
                f"the server is up on port {server.port}, but pgwarden.yaml was not applied "
                f"(nothing of it was): {exc.message}",
                hint=(exc.hint + "; then " if exc.hint else "")
                + "`pgwarden apply` (or `pgwarden up` again) applies it",
            ) from exc
    if not server.is_running():  # pragma: no cover - defensive
        raise ServerError("the server stopped while pgwarden was applying the config")
    return UpResult(
        outcome=outcome,
        url=url,
        database_created=created,
        applied=applied,
        restart_needed=pending,
    )


def local_server(
    config: Config,
    config_path: Path | None,
    state_dir: Path | None,
    *,
    pg_bin: Path | None = None,
    port: int | None = None,
) -> LocalServer:
    return LocalServer(
        config,
        state_dir.absolute() if state_dir else default_state_dir(config_path),
        pg_bin=pg_bin,
        port=port,
        backup_root=backup_root(config, config_path),
    )


def backup_root(config: Config, config_path: Path | None) -> Path | S3Location | None:
    """backup.location as an absolute path (relative paths are relative to pgwarden.yaml), or
    the S3 location of backup.s3."""
    location = config.backup.location
    if location is None:
        s3 = config.backup.s3
        if s3 is None:
            return None
        return S3Location(s3.bucket, s3.prefix, s3.endpoint_url, s3.region)
    base = config_path.parent if config_path is not None else Path.cwd()
    return (base / Path(location).expanduser()).absolute()
