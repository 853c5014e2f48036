"""Fixtures that build real PostgreSQL servers: no mocks of what pgwarden integrates with.

The leg (PostgreSQL 18 from the embedded wheel, or Debian's 15) is chosen by $PGWARDEN_PG_BIN,
the product's own variable: unset means the embedded default.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from pgwarden.cli import cli
from pgwarden.cli.app import run_guarded
from pgwarden.config import Config
from pgwarden.server.binaries import find_binaries
from pgwarden.server.cluster import LocalServer, free_port
from pgwarden.server.local import bring_up
from pgwarden.server.osuser import SYSTEM_ROOT


@pytest.fixture(autouse=True)
def _no_cluster_left_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """As root a state dir's cluster lives under /var/lib/pgwarden, outside tmp_path, and
    pytest's clean-up of tmp_path leaves it there: after each test, the stopped clusters of the
    state dirs it made in tmp_path go too (a running one is its fixture's to stop)."""
    yield
    tmp = request.node.funcargs.get("tmp_path")
    if not isinstance(tmp, Path):
        return
    for link in [*tmp.glob(".pgwarden/cluster"), *tmp.glob("*/.pgwarden/cluster")]:
        target = link.resolve()
        ours = link.is_symlink() and target.is_relative_to(SYSTEM_ROOT)
        if ours and not (target / "data" / "postmaster.pid").exists():
            shutil.rmtree(target, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_bin() -> Path:
    """The bin directory of the leg under test."""
    return find_binaries().bindir


@pytest.fixture(scope="session")
def pg_major(pg_bin: Path) -> int:
    return find_binaries(pg_bin).major


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory: pytest.TempPathFactory, pg_bin: Path) -> Iterator[LocalServer]:
    """One real server for the whole session; tests get their own databases on it."""
    state = tmp_path_factory.mktemp("shared") / ".pgwarden"
    # wal_level = logical, as `up` sets it for history.capture: wal, so that the WAL capture
    # tests share this server; the trigger engine's tests do not notice.
    config = Config.model_validate({"server": {"settings": {"wal_level": "logical"}}})
    server = LocalServer(config, state, pg_bin=pg_bin, port=free_port())
    bring_up(server)
    yield server
    server.purge()


@dataclass
class Database:
    name: str
    url: str
    admin_url: str  # the same server's `postgres` database

    def connect(self, **kwargs: object) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.url, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def database(shared_server: LocalServer) -> Iterator[Database]:
    """A fresh, empty database on the shared server, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin_url = shared_server.url("postgres")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield Database(name=name, url=shared_server.url(name), admin_url=admin_url)
    with psycopg.connect(admin_url, autocommit=True) as conn:
        # A database with a logical slot (WAL capture) cannot be dropped.
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE database = %s",
            (name,),
        )
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@dataclass
class Result:
    code: int
    out: str
    err: str


Run = Callable[..., Result]


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Run:
    """Run the pgwarden CLI in-process in tmp_path: run("status", "--json") → Result."""
    monkeypatch.chdir(tmp_path)
    for var in ("PGWARDEN_DSN", "DATABASE_URL", "PGWARDEN_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PGWARDEN_LOG", str(tmp_path / "pgwarden-cli.log"))

    def _run(*args: str) -> Result:
        capsys.readouterr()
        code = run_guarded(cli, list(args))
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return _run


@pytest.fixture
def local_server(tmp_path: Path, pg_bin: Path) -> Iterator[LocalServer]:
    """A dedicated server in tmp_path/.pgwarden (not started), purged afterwards."""
    server = LocalServer(Config(), tmp_path / ".pgwarden", pg_bin=pg_bin, port=free_port())
    yield server
    with contextlib.suppress(Exception):
        server.purge()


def pytest_report_header() -> str:
    return f"pgwarden leg: PGWARDEN_PG_BIN={os.environ.get('PGWARDEN_PG_BIN', '(embedded)')}"
