from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from pgwarden.cli.config_cmds import starter_config
from pgwarden.config import (
    Config,
    HistoryMode,
    load_config,
    parse_config_text,
    parse_duration,
)
from pgwarden.errors import ConfigError


def test_empty_file_gives_defaults() -> None:
    config = parse_config_text("", source="x.yaml")
    assert config == Config()
    assert config.database == "app"
    assert config.server.listen_addresses == ["127.0.0.1"]


def test_empty_sections_are_fine() -> None:
    config = parse_config_text("server:\nhistory:\naccess:\nkubernetes:\nbackup:\n", source="x")
    assert config == Config()


def test_starter_file_parses_and_tracks_public() -> None:
    config = parse_config_text(starter_config(), source="pgwarden.yaml")
    assert config.history.tables == ["public.*"]
    assert config.history.mode is HistoryMode.FAIL_CLOSED
    assert config.access.manager_role == "manager"
    assert "test_table" in starter_config()  # the seed's example, in comments


def test_unknown_key_names_file_line_and_path() -> None:
    text = "database: app\nserver:\n  port: 5432\n  prot: 1\n"
    with pytest.raises(ConfigError) as info:
        parse_config_text(text, source="conf.yaml")
    message = str(info.value)
    assert "conf.yaml:4" in message
    assert "server.prot" in message
    assert "unknown key" in message


def test_unknown_section_is_an_error() -> None:
    with pytest.raises(ConfigError, match="unknown key 'monitoring'"):
        parse_config_text("monitoring: {}\n", source="c.yaml")


def test_wrong_type_says_what_was_expected() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config_text("server:\n  port: lots\n", source="c.yaml")
    message = str(info.value)
    assert "c.yaml:2" in message
    assert "server.port" in message
    assert "integer" in message
    assert "'lots'" in message


def test_several_problems_are_all_reported() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config_text("server:\n  port: 0\n  allowed_cidrs: [nowhere]\n", source="c")
    message = str(info.value)
    assert "server.port" in message
    assert "nowhere" in message


def test_bad_yaml_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"c.yaml:\d+: not valid YAML"):
        parse_config_text("server:\n  port: [1\n", source="c.yaml")


def test_top_level_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match="mapping"):
        parse_config_text("- a\n- b\n", source="c")


@pytest.mark.parametrize("name", ["", "x" * 64, "bad\x00name"])
def test_bad_database_names(name: str) -> None:
    with pytest.raises(ConfigError, match="database"):
        parse_config_text(json.dumps({"database": name}), source="c")


def test_durations() -> None:
    assert parse_duration("400d") == timedelta(days=400)
    assert parse_duration("2w") == timedelta(weeks=2)
    assert parse_duration("12h") == timedelta(hours=12)
    with pytest.raises(ValueError, match="duration"):
        parse_duration("400 days")
    config = parse_config_text("history:\n  retention: 400d\n", source="c")
    assert config.model_dump(mode="json", by_alias=True)["history"]["retention"] == "400d"
    with pytest.raises(ConfigError, match=r"history\.retention"):
        parse_config_text("history:\n  retention: forever\n", source="c")


def test_config_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PGWARDEN_CONFIG", raising=False)
    assert load_config().path is None  # nothing found: defaults
    (tmp_path / "pgwarden.yaml").write_text("database: cwd\n")
    assert load_config().config.database == "cwd"
    env_file = tmp_path / "env.yaml"
    env_file.write_text("database: env\n")
    monkeypatch.setenv("PGWARDEN_CONFIG", str(env_file))
    assert load_config().config.database == "env"
    explicit = tmp_path / "explicit.yaml"
    explicit.write_text("database: explicit\n")
    assert load_config(explicit).config.database == "explicit"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    monkeypatch.setenv("PGWARDEN_CONFIG", str(tmp_path / "gone.yaml"))
    with pytest.raises(ConfigError, match="PGWARDEN_CONFIG"):
        load_config()


def test_schema_covers_every_section() -> None:
    from pgwarden.config import config_json_schema

    schema = config_json_schema()
    assert set(schema["properties"]) == {
        "database",
        "server",
        "history",
        "access",
        "kubernetes",
        "backup",
    }
    assert schema["additionalProperties"] is False
