"""A throwaway local server for one benchmark run, started with pgwarden itself."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg import sql

from pgwarden.config import Config
from pgwarden.server.cluster import LocalServer, free_port
from pgwarden.server.local import bring_up


@contextlib.contextmanager
def bench_server(pg_bin: Path | None) -> Iterator[LocalServer]:
    base = Path(tempfile.mkdtemp(prefix="pgwarden-bench-"))
    os.chmod(base, 0o755)  # our own temp dir: the unprivileged server user must reach it
    config = Config.model_validate(
        # Default durability (synchronous_commit on, fsync on), as the issue asks; only the
        # checkpoint spacing is widened so that a 100k-row statement does not trigger one.
        # wal_level = logical for every variant alike: W2's WAL capture variants need it.
        {"server": {"settings": {"max_wal_size": "4GB", "wal_level": "logical"}}}
    )
    server = LocalServer(config, base / ".pgwarden", pg_bin=pg_bin, port=free_port())
    bring_up(server)
    try:
        yield server
    finally:
        server.purge()


def fresh_database(server: LocalServer, name: str) -> str:
    with psycopg.connect(server.url("postgres"), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return server.url(name)


def drop_database(server: LocalServer, name: str) -> None:
    """Drop a workload's database once it is measured, so that autovacuum working through its
    millions of history rows does not take CPU from the next workload (on 2 cores it did:
    W2's ratio moved between 0.27 and 0.42 from run to run)."""
    with psycopg.connect(server.url("postgres"), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute("CHECKPOINT")
