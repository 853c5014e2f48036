"""What a user sees: exact numbers in every format, errors that are the user's doing as messages
with exit 2, closed pipes, exit codes, a busy port on the first `up`."""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from pgwarden.config import Config
from pgwarden.server.cluster import LocalServer
from tests.conftest import Database, Run
from tests.history_helpers import setup_history


@pytest.fixture
def money(database: Database, monkeypatch: pytest.MonkeyPatch) -> Database:
    with database.connect(autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE money (id int PRIMARY KEY, amount numeric, f float8, tiny float8)"
        )
    setup_history(database.url)
    with database.connect(autocommit=True) as conn:
        conn.execute(
            "INSERT INTO money VALUES (1, 12345678901234567.0123456789, 1.5e300, 0.000001)"
        )
    monkeypatch.setenv("PGWARDEN_DSN", database.url)
    return database


def test_numbers_print_exactly_as_postgresql_holds_them(
    money: Database, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGWARDEN_DSN", money.url)  # `run` clears it
    exact = ("12345678901234567.0123456789", "1.5e+300", "1e-06")
    as_json = run("as-of", "money", "now", "--format", "json")
    assert as_json.code == 0, as_json.err
    for text in exact:
        assert text in as_json.out
    assert "1.2345678901234568e+16" not in as_json.out
    assert json.loads(as_json.out)[0]["id"] == 1  # still JSON numbers
    history = run("history", "money", "--format", "json")
    for text in exact:
        assert text in history.out
    rows = list(csv.DictReader(io.StringIO(run("history", "money", "-o", "csv").out)))
    assert all(text in rows[0]["new"] for text in exact)
    as_csv = list(csv.DictReader(io.StringIO(run("as-of", "money", "now", "-o", "csv").out)))
    assert as_csv[0]["amount"] == "12345678901234567.0123456789"
    table = run("as-of", "money", "now")
    assert "12345678901234567.0123456789" in table.out.replace("\n", "")
    # Columns in the table's order, not sorted as jsonb would.
    assert list(json.loads(as_json.out)[0]) == ["id", "amount", "f", "tiny"]


def test_unknown_tables_and_user_errors_are_messages(
    money: Database, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGWARDEN_DSN", money.url)
    for args in (("history", "no_such_table"), ("as-of", "no_such_table", "now")):
        result = run(*args)
        assert result.code == 2, args
        assert "no_such_table" in result.err
        assert "Traceback" not in result.err
    with money.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE untracked_one (id int)")
        conn.execute("SELECT pgwarden.untrack('untracked_one')")
    # An untracked table keeps what was recorded, and says its history stops short of now.
    for args in (("history", "untracked_one"), ("as-of", "untracked_one", "now")):
        stale = run(*args)
        assert stale.code == 0, stale.err
        assert "is not tracked now" in stale.err
    into = run("as-of", "money", "now", "--into", "nosuchschema.x")
    assert into.code == 2
    assert "nosuchschema" in into.err
    # History read by a role without the auditor's rights: a message, not a crash report.
    role = f"nobody_{uuid.uuid4().hex[:6]}"
    with money.connect(autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'pw'").format(sql.Identifier(role)))
        conn.execute(
            sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
                sql.Identifier(money.name), sql.Identifier(role)
            )
        )
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA pgwarden TO {}").format(sql.Identifier(role)))
    host = money.url.split("@", 1)[1]
    monkeypatch.setenv("PGWARDEN_DSN", f"postgresql://{role}:pw@{host}")
    denied = run("history")
    assert denied.code == 2, denied.err
    assert "unexpected error" not in denied.err
    assert "permission denied" in denied.err


def test_history_into_a_closed_pipe_ends_quietly(money: Database) -> None:
    with money.connect(autocommit=True) as conn:
        conn.execute("INSERT INTO money SELECT g, g, g, g FROM generate_series(2, 5000) g")
    env = dict(os.environ, PGWARDEN_DSN=money.url)
    for fmt in ("csv", "json", "table"):
        done = subprocess.run(
            ["bash", "-c", f"{sys.executable} -m pgwarden history --all -o {fmt} | head -1; "
             "echo \"exit=${PIPESTATUS[0]}\""],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert "exit=0" in done.stdout, (fmt, done.stderr)
        assert "Traceback" not in done.stderr
        assert "Broken pipe" not in done.stderr


def test_history_table_format_shows_a_page(
    money: Database, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGWARDEN_DSN", money.url)
    with money.connect(autocommit=True) as conn:
        conn.execute("INSERT INTO money SELECT g, g, g, g FROM generate_series(2, 200) g")
    page = run("history", "money")
    assert page.code == 0
    assert "newest 50 event(s) shown" in page.err
    assert "--limit" in page.err
    every = run("history", "money", "--format", "json")
    assert len(json.loads(every.out)) == 200  # json streams them all: row 1, then 2..200


def test_check_and_verify_speak_json(
    money: Database, run: Run, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PGWARDEN_DSN", money.url)
    (tmp_path / "pgwarden.yaml").write_text("history:\n  tables: ['public.*']\n")
    checked = run("check", "-o", "json")
    assert json.loads(checked.out) is not None
    verified = run("verify", "--format", "json")
    assert json.loads(verified.out)["ok"] is True
    assert json.loads(run("verify", "--json").out)["ok"] is True  # the older spelling


@pytest.fixture
def own_state(tmp_path: Path, pg_bin: Path) -> Iterator[Path]:
    yield tmp_path
    server = LocalServer(Config(), tmp_path / ".pgwarden", pg_bin=pg_bin)
    # Purged, not only stopped: as root the cluster lives outside tmp_path (/var/lib/pgwarden).
    server.purge()


def test_first_up_with_the_default_port_taken_picks_another(
    own_state: Path, run: Run, pg_bin: Path
) -> None:
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            busy.bind(("127.0.0.1", 5432))
        except OSError:
            pass  # already taken by someone else: the case itself
        else:
            busy.listen()
        started = run("up", "--pg-bin", str(pg_bin))
        assert started.code == 0, started.err
        assert "5432 was taken" in started.err
        url = started.out.strip()
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        status = run("status", "-o", "json")
        assert status.code == 0
        assert json.loads(status.out)["port"] != 5432
        assert run("url").out.strip() == url  # kept for the next commands
        assert run("down").code == 0
        stopped = run("status")
        assert stopped.code == 3  # as pg_ctl status: not running
        again = run("up", "--pg-bin", str(pg_bin))  # the kept port, not a new one
        assert again.code == 0
        assert again.out.strip() == url


def test_busy_port_creates_nothing(own_state: Path, run: Run, pg_bin: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run("up", "--port", str(port), "--pg-bin", str(pg_bin))
    assert result.code == 2
    assert not (own_state / ".pgwarden" / "cluster" / "data" / "PG_VERSION").exists()
    assert run("status").code == 3


def test_up_with_a_missing_manager_says_the_server_runs(
    own_state: Path, run: Run, pg_bin: Path
) -> None:
    (own_state / "pgwarden.yaml").write_text("access:\n  managers: [nobody_like_this]\n")
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    number = port.getsockname()[1]
    port.close()
    result = run("up", "--port", str(number), "--pg-bin", str(pg_bin))
    assert result.code == 2
    assert "server is up" in result.err
    assert "not applied" in result.err
    assert run("status").code == 0


def test_history_table_tells_sql_null_from_the_text_null(
    database: Database, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    setup_history(database.url)
    with database.connect(autocommit=True) as conn:
        conn.execute("INSERT INTO notes VALUES (1, NULL), (2, 'null')")
    monkeypatch.setenv("PGWARDEN_DSN", database.url)
    shown = run("history", "notes").out.replace("\n", " ")
    assert "body=null" in shown  # SQL NULL
    assert 'body="null"' in shown  # the four letters
