from __future__ import annotations

from pgwarden.config import ServerConfig
from pgwarden.server.pgconf import Placement, quote_setting, render_all


def _render(**server: object) -> dict[str, str]:
    placement = Placement(
        listen_addresses=["127.0.0.1"],
        port=5999,
        socket_dirs=["/tmp/sock"],
        allowed_cidrs=["127.0.0.1/32", "10.0.0.0/8"],
        ident_users=("alice",),
    )
    return dict(render_all(ServerConfig.model_validate(server), placement))


def test_scram_everywhere_and_never_trust() -> None:
    files = _render()
    conf, hba = files["postgresql.conf"], files["pg_hba.conf"]
    assert "password_encryption = 'scram-sha-256'" in conf
    assert "listen_addresses = '127.0.0.1'" in conf
    assert "port = 5999" in conf
    assert "trust" not in hba
    host_lines = [line for line in hba.splitlines() if line.startswith("host")]
    assert host_lines
    assert all(line.split()[-1] == "scram-sha-256" for line in host_lines)
    local_lines = [line for line in hba.splitlines() if line.startswith("local")]
    assert local_lines == ["local   all          all            peer map=pgwarden"]


def test_without_socket_there_is_no_local_rule() -> None:
    placement = Placement(listen_addresses=["*"], port=5432, allowed_cidrs=["10.0.0.0/8"])
    files = render_all(ServerConfig(), placement)
    assert "local" not in files["pg_hba.conf"].replace("# TYPE", "")
    assert "unix_socket_directories = ''" in files["postgresql.conf"]


def test_user_settings_win_and_are_quoted() -> None:
    conf = _render(settings={"shared_buffers": "256MB", "log_statement": "all", "jit": False})[
        "postgresql.conf"
    ]
    assert "shared_buffers = '256MB'" in conf
    assert "jit = off" in conf
    assert conf.count("log_statement") == 1
    assert "log_statement = 'all'" in conf


def test_quoting() -> None:
    assert quote_setting("it's") == "'it''s'"
    assert quote_setting(True) == "on"
    assert quote_setting(12) == "12"
