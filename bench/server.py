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


def prepare_wal_capture(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """WAL capture's publication, slot and their names in pgwarden.meta, as `apply` makes them
    for history.capture: wal (the publication first: pgoutput looks it up as of each change it
    decodes, and PostgreSQL 15 fails on changes from before it existed)."""
    row = conn.execute(
        "SELECT 'pgwarden_' || oid FROM pg_database WHERE datname = current_database()"
    ).fetchone()
    assert row is not None
    conn.execute("CREATE PUBLICATION pgwarden_capture WITH (publish_via_partition_root = true)")
    conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (row[0],))
    conn.execute(
        "INSERT INTO pgwarden.meta VALUES ('wal_slot', %s), ('wal_publication', "
        "'pgwarden_capture') ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
        (row[0],),
    )
