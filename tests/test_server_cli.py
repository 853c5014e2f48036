"""The local server through the CLI, on real PostgreSQL: every command and error path."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgwarden.config import Config
from pgwarden.server.cluster import LocalServer
from pgwarden.server.osuser import service_user
from pgwarden.server.state import StateDir
from tests.conftest import Result, Run, free_port


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def cleanup(tmp_path: Path, pg_bin: Path) -> Iterator[None]:
    """Stop whatever a test started through the CLI in tmp_path/.pgwarden."""
    yield
    server = LocalServer(Config(), tmp_path / ".pgwarden", pg_bin=pg_bin)
    # Purged, not only stopped: as root the cluster lives outside tmp_path (/var/lib/pgwarden).
    server.purge()


def up(run, port: int, pg_bin: Path, *extra: str) -> Result:
    return run("up", "--port", str(port), "--pg-bin", str(pg_bin), *extra)


@pytest.mark.usefixtures("cleanup")
def test_init_up_status_url_down(
    run: Run, tmp_path: Path, port: int, pg_bin: Path, pg_major: int
) -> None:
    assert run("init").code == 0
    assert (tmp_path / "pgwarden.yaml").is_file()
    result = up(run, port, pg_bin)
    assert result.code == 0, result.err
    url = result.out.strip()
    assert url.startswith("postgresql://postgres:")
    assert f":{port}/app" in url
    assert "created a new cluster" in result.err
    assert "created database 'app'" in result.err

    # The URL works as-is with psycopg …
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT current_database(), current_setting('data_checksums')"
        ).fetchone()
        assert row == ("app", "on")
        encryption = conn.execute("SHOW password_encryption").fetchone()
        assert encryption == ("scram-sha-256",)
    # … and with psql.
    psql = pg_bin / "psql"
    out = subprocess.run(
        [str(psql), url, "-Atc", "SELECT 40 + 2"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "42"

    status = run("status", "--json")
    assert status.code == 0
    data = json.loads(status.out)
    assert data["state"] == "running"
    assert data["port"] == port
    assert data["version"].startswith(f"{pg_major}.")
    assert str(pg_bin) in data["binaries"]
    assert "***" in data["url"]  # the password is masked in status
    assert data["last_start"]["outcome"] == "initialized"
    assert "running" in run("status").out

    assert run("url").out.strip() == url

    # Idempotent: a second up changes nothing and keeps the same URL.
    again = up(run, port, pg_bin)
    assert again.code == 0
    assert again.out.strip() == url
    assert "already running" in again.err

    assert run("logs", "-n", "5").code == 0

    down = run("down")
    assert down.code == 0
    assert "stopped" in down.out
    assert json.loads(run("status", "--json").out)["state"] == "stopped"
    second = run("down")
    assert second.code == 0
    assert "not running" in second.out

    # Data stays: start again, the database is still there.
    restarted = up(run, port, pg_bin)
    assert restarted.code == 0
    assert "created database" not in restarted.err


@pytest.mark.usefixtures("cleanup")
def test_up_without_config_uses_defaults(run: Run, port: int, pg_bin: Path) -> None:
    result = up(run, port, pg_bin)
    assert result.code == 0, result.err
    assert "no pgwarden.yaml found" in result.err


@pytest.mark.usefixtures("cleanup")
def test_secrets_are_private(run: Run, tmp_path: Path, port: int, pg_bin: Path) -> None:
    up(run, port, pg_bin)
    password_file = tmp_path / ".pgwarden" / "admin-password"
    assert password_file.stat().st_mode & 0o777 == 0o600
    password = password_file.read_text().strip()
    assert password not in run("status").out
    assert password not in run("status", "--json").out
    hba = (tmp_path / ".pgwarden" / "cluster" / "data" / "pg_hba.conf").read_text()
    assert "trust" not in hba


@pytest.mark.slow
@pytest.mark.usefixtures("cleanup")
def test_kill_9_then_up_recovers(run: Run, tmp_path: Path, port: int, pg_bin: Path) -> None:
    url = up(run, port, pg_bin).out.strip()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (id int PRIMARY KEY)")
        conn.execute("INSERT INTO kept SELECT generate_series(1, 1000)")
    pid = int((tmp_path / ".pgwarden/cluster/data/postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if json.loads(run("status", "--json").out)["state"] != "running":
            break
        time.sleep(0.1)
    status = json.loads(run("status", "--json").out)
    assert status["state"] == "crashed"
    assert "crash recovery" in status["detail"]

    result = run("up")  # same port: remembered from the earlier `up --port`
    assert result.code == 0, result.err
    assert "crash recovery ran" in result.err
    status = json.loads(run("status", "--json").out)
    assert status["state"] == "running"
    assert status["last_start"]["outcome"] == "recovered"
    assert "recovered from a crash" in run("status").out
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM kept").fetchone() == (1000,)


def test_port_in_use_names_port_and_suggests_flag(
    run: Run, port: int, pg_bin: Path, tmp_path: Path
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        result = up(run, port, pg_bin)
    assert result.code == 2
    assert str(port) in result.err
    assert "--port" in result.err
    assert "Traceback" not in result.err


def test_foreign_data_dir_is_refused_and_untouched(
    run: Run, tmp_path: Path, port: int, pg_bin: Path
) -> None:
    data = tmp_path / ".pgwarden" / "cluster" / "data"
    data.mkdir(parents=True)
    (data / "precious.txt").write_text("do not touch")
    result = up(run, port, pg_bin)
    assert result.code == 2
    assert "did not create" in result.err
    assert (data / "precious.txt").read_text() == "do not touch"
    assert sorted(p.name for p in data.iterdir()) == ["precious.txt"]


def test_damaged_data_dir_is_refused(run: Run, tmp_path: Path, port: int, pg_bin: Path) -> None:
    assert up(run, port, pg_bin).code == 0
    assert run("down").code == 0
    control = tmp_path / ".pgwarden" / "cluster" / "data" / "global" / "pg_control"
    control.rename(control.with_suffix(".moved"))
    result = up(run, port, pg_bin)
    assert result.code == 2
    assert "damaged" in result.err
    assert control.with_suffix(".moved").exists()  # nothing was deleted or rewritten


def test_other_major_version_is_refused(
    run: Run, tmp_path: Path, port: int, pg_bin: Path, pg_major: int
) -> None:
    assert up(run, port, pg_bin).code == 0
    assert run("down").code == 0
    version = tmp_path / ".pgwarden" / "cluster" / "data" / "PG_VERSION"
    version.write_text(f"{pg_major - 1}\n")  # what an older cluster would say
    result = up(run, port, pg_bin)
    assert result.code == 2
    assert f"PostgreSQL {pg_major - 1}" in result.err
    assert "pg_upgrade" in result.err


def test_purge_needs_confirmation(run: Run, tmp_path: Path, port: int, pg_bin: Path) -> None:
    assert up(run, port, pg_bin).code == 0
    data = tmp_path / ".pgwarden" / "cluster" / "data"
    refused = run("down", "--purge")  # no terminal under pytest: must not delete
    assert refused.code == 2
    assert "--yes" in refused.err
    assert (data / "PG_VERSION").exists()
    done = run("down", "--purge", "--yes")
    assert done.code == 0
    assert not data.exists()
    assert json.loads(run("status", "--json").out)["state"] == "not-initialized"


def test_bad_pg_bin_is_a_clear_error(run: Run, tmp_path: Path) -> None:
    result = run("up", "--pg-bin", str(tmp_path))
    assert result.code == 2
    assert "not a PostgreSQL bin directory" in result.err
    assert "initdb" in result.err


def test_pg_bin_env_is_used(run: Run, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PGWARDEN_PG_BIN", str(tmp_path / "nowhere"))
    result = run("status")
    assert "PGWARDEN_PG_BIN" in result.out


def test_invalid_config_exits_2_naming_the_key(run: Run, tmp_path: Path) -> None:
    (tmp_path / "pgwarden.yaml").write_text("server:\n  port: 99999\n")
    result = run("status")
    assert result.code == 2
    assert "pgwarden.yaml:2" in result.err
    assert "server.port" in result.err
    assert "Traceback" not in result.err


def test_init_refuses_to_overwrite(run: Run, tmp_path: Path) -> None:
    (tmp_path / "pgwarden.yaml").write_text("database: mine\n")
    result = run("init")
    assert result.code == 2
    assert "already exists" in result.err
    assert (tmp_path / "pgwarden.yaml").read_text() == "database: mine\n"
    assert run("init", "--force").code == 0
    assert "history" in (tmp_path / "pgwarden.yaml").read_text()


def test_commands_needing_a_server_say_so(run: Run) -> None:
    for args in (("url",), ("logs",), ("plan",)):
        result = run(*args)
        assert result.code == 2, args
        assert "pgwarden up" in result.err


def test_config_schema_and_show(run: Run) -> None:
    schema = json.loads(run("config", "schema").out)
    assert "history" in schema["properties"]
    shown = json.loads(run("config", "show").out)
    assert shown["database"] == "app"


def test_unexpected_error_exits_1_and_names_the_log(
    run: Run, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A bug inside pgwarden (simulated by breaking one of its own functions) must not show a
    # traceback on the terminal, but must leave one in the log it names.
    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr("pgwarden.cli.config_cmds.config_json_schema", broken)
    result = run("config", "schema")
    assert result.code == 1
    log = tmp_path / "pgwarden-cli.log"
    assert str(log) in result.err
    assert "Traceback" not in result.err
    assert "RuntimeError: boom" in log.read_text()


def test_help_has_examples_for_every_command(run: Run) -> None:
    from pgwarden.cli import cli

    for name, command in cli.commands.items():  # type: ignore[attr-defined]
        result = run(name, "--help")
        assert result.code == 0, name
        assert "Example" in result.out, name
        del command


@pytest.mark.usefixtures("cleanup")
def test_psql_and_python_m(run: Run, tmp_path: Path, port: int, pg_bin: Path) -> None:
    assert up(run, port, pg_bin).code == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG") or k == "PGWARDEN_PG_BIN"}
    env.pop("PGWARDEN_DSN", None)
    env.pop("DATABASE_URL", None)
    result = subprocess.run(
        [sys.executable, "-m", "pgwarden", "psql", "-Atc", "SELECT current_database()"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "app"


@pytest.mark.skipif(os.geteuid() != 0, reason="the system cluster dir is used only as root")
def test_a_state_dir_made_anew_gets_a_cluster_of_its_own(tmp_path: Path) -> None:
    """As root the cluster lives under /var/lib/pgwarden, named after the state dir's path.
    Remove the state dir and make one at the same path: its cluster is a new directory, the
    earlier one (someone's data, with a password that is gone) is neither reused nor deleted."""
    runas = service_user("pgwarden")
    first = StateDir(tmp_path / ".pgwarden")
    first.prepare(runas)
    earlier = first.cluster
    (earlier / "data").mkdir()
    (earlier / "data" / "PG_VERSION").write_text("15\n")
    shutil.rmtree(first.root)  # the state dir only: the symlink goes, not what it points to

    again = StateDir(tmp_path / ".pgwarden")
    again.prepare(runas)
    assert again.cluster != earlier
    assert not (again.cluster / "data").exists()
    assert (earlier / "data" / "PG_VERSION").read_text() == "15\n"
    shutil.rmtree(earlier)
    shutil.rmtree(again.cluster)
