from __future__ import annotations

import pytest

from pgwarden.connect import Target, connect, mask_conninfo, resolve_target
from pgwarden.errors import ConnectionFailed
from tests.conftest import Database

LOCAL = "postgresql://postgres:pw@127.0.0.1:5432/app"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("PGWARDEN_DSN", "DATABASE_URL", "PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE",
                "PGUSER", "PGSERVICE"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)


def test_order_dsn_env_database_url_libpq_local(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_target(None, lambda: LOCAL).source == "the local server (pgwarden up)"
    monkeypatch.setenv("PGHOST", "db.example")
    assert resolve_target(None, lambda: LOCAL).conninfo == ""  # libpq reads PG* itself
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@h2/d")
    assert resolve_target(None, lambda: LOCAL).source == "$DATABASE_URL"
    monkeypatch.setenv("PGWARDEN_DSN", "postgresql://u@h1/d")
    assert resolve_target(None, lambda: LOCAL).source == "$PGWARDEN_DSN"
    assert resolve_target("postgresql://u@h0/d", lambda: LOCAL).source == "--dsn"


def test_nothing_to_connect_to_is_a_clear_error() -> None:
    with pytest.raises(ConnectionFailed, match="pgwarden up"):
        resolve_target(None, lambda: None)


def test_passwords_are_masked() -> None:
    assert "pw" not in mask_conninfo(LOCAL)
    assert "***" in mask_conninfo(LOCAL)


def test_the_consumers_connection_notices_a_vanished_server(database: Database) -> None:
    """The WAL capture consumer's connection lives for days: TCP keepalives and a user timeout
    end it within about a minute when the server vanishes without closing it (a lost node, a
    failover), so that `history follow --wait` reconnects instead of hanging for hours."""
    with connect(Target(database.url, "test"), long_lived=True) as conn:
        params = conn.info.get_parameters()
        assert params["keepalives_idle"] == "30"
        assert params["tcp_user_timeout"] == "60000"
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with connect(Target(database.url, "test")) as conn:
        assert "keepalives_idle" not in conn.info.get_parameters()
