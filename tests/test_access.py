"""Access control on real PostgreSQL: the seed's manager scenario, convergence, bad input."""

from __future__ import annotations

import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from pgwarden.config import Config
from pgwarden.converge import apply_config, build_plan
from pgwarden.errors import UserError
from pgwarden.history import EventFilter, TableName
from pgwarden.history import events as read_events
from tests.conftest import Database, Run


def _name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:6]}"


def _url_as(database: Database, user: str, password: str) -> str:
    host = database.url.split("@", 1)[1]
    return f"postgresql://{user}:{password}@{host}"


def _config(**access: object) -> Config:
    return Config.model_validate({"access": access})


def test_seed_scenario_manager_can_alter_staff_cannot(
    database: Database, monkeypatch: pytest.MonkeyPatch, pg_major: int
) -> None:
    alice, bob = _name("alice"), _name("bob")
    monkeypatch.setenv("ALICE_PW", "alice-secret-1")
    monkeypatch.setenv("BOB_PW", "bob-secret-1")
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE test_table (id int PRIMARY KEY, name text)")
        conn.execute("INSERT INTO test_table VALUES (1, 'Test Data')")
    config = _config(
        managers=[alice],
        roles={
            alice: {"login": True, "password_env": "ALICE_PW"},
            bob: {
                "login": True,
                "password_env": "BOB_PW",
                "schemas": ["public"],
                "tables": {"public.*": ["select", "insert", "update", "delete"]},
            },
        },
    )
    with database.connect() as conn:
        apply_config(conn, config)
        owner = conn.execute(
            "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = 'test_table'::regclass"
        ).fetchone()
        assert owner == ("manager",)
        assert not build_plan(conn, config)  # idempotent: a second plan is empty

    with psycopg.connect(_url_as(database, bob, "bob-secret-1"), autocommit=True) as conn:
        conn.execute("INSERT INTO test_table VALUES (2, 'staff may write data')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="must be owner"):
            conn.execute("ALTER TABLE test_table ADD COLUMN note text")
    with psycopg.connect(_url_as(database, alice, "alice-secret-1"), autocommit=True) as conn:
        if pg_major >= 16:
            # sudo-like: the membership does not inherit, so alice must SET ROLE on purpose.
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("ALTER TABLE test_table ADD COLUMN note text")
            conn.execute("SET ROLE manager")
        conn.execute("ALTER TABLE test_table ADD COLUMN note text")
    with database.connect() as conn:
        cols = conn.execute(
            "SELECT attname FROM pg_attribute "
            "WHERE attrelid = 'test_table'::regclass AND attnum > 0"
        ).fetchall()
        assert [c[0] for c in cols] == ["id", "name", "note"]
        if pg_major >= 16:
            assert conn.execute(
                "SELECT inherit_option, set_option FROM pg_auth_members m "
                "JOIN pg_roles r ON r.oid = m.member WHERE r.rolname = %s",
                (alice,),
            ).fetchone() == (False, True)


def test_hardening_is_in_the_plan(database: Database) -> None:
    with database.connect() as conn:
        descriptions = [op.description for op in build_plan(conn, Config())]
        rendered = [op.render(conn) for op in build_plan(conn, Config())]
    assert any("revoke every privilege from PUBLIC" in d for d in descriptions)
    assert any("REVOKE ALL ON DATABASE" in r for r in rendered)
    with database.connect() as conn:
        apply_config(conn, Config())
        assert not build_plan(conn, Config())
        public = conn.execute(
            "SELECT has_database_privilege('public', current_database(), 'CONNECT')"
        ).fetchone()
    assert public == (False,)


def test_drift_is_detected_and_repaired(
    database: Database, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    reader = _name("reader")
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    config = _config(roles={reader: {"schemas": ["public"], "tables": {"public.t": ["SELECT"]}}})
    with database.connect() as conn:
        apply_config(conn, config)
        assert not build_plan(conn, config)
        conn.execute(sql.SQL("REVOKE SELECT ON t FROM {}").format(sql.Identifier(reader)))
        conn.commit()
        plan = build_plan(conn, config)
        assert [op.description for op in plan] == [f"role {reader}: SELECT on public.t"]
        apply_config(conn, config)
        assert not build_plan(conn, config)
        # A table created later by the manager gets the grant through default privileges.
        conn.execute("SET ROLE manager")
        conn.execute("CREATE TABLE later (id int PRIMARY KEY)")
        conn.execute("RESET ROLE")
        conn.commit()
    whole = _config(roles={reader: {"schemas": ["public"], "tables": {"public.*": ["SELECT"]}}})
    with database.connect() as conn:
        apply_config(conn, whole)
        conn.execute("SET ROLE manager")
        conn.execute("CREATE TABLE even_later (id int PRIMARY KEY)")
        conn.execute("RESET ROLE")
        granted = conn.execute(
            "SELECT has_table_privilege(%s, 'even_later', 'SELECT')", (reader,)
        ).fetchone()
    assert granted == (True,)


def test_passwords_never_show(
    database: Database, run: Run, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, shared_server
) -> None:  # type: ignore[no-untyped-def]
    role = _name("svc")
    secret = "s3cret-" + uuid.uuid4().hex
    monkeypatch.setenv("SVC_PW", secret)
    (tmp_path / "pgwarden.yaml").write_text(
        f"access:\n  roles:\n    {role}:\n      login: true\n      password_env: SVC_PW\n"
    )
    monkeypatch.setenv("PGWARDEN_DSN", database.url)
    plan = run("plan")
    assert plan.code == 0, plan.err
    assert secret not in plan.out
    assert "***" in plan.out
    assert "SCRAM-SHA-256$" not in plan.out
    assert run("apply").code == 0
    assert run("check").code == 0  # the stored verifier matches: nothing to change
    with psycopg.connect(_url_as(database, role, secret)) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (role,)
        activity = conn.execute("SELECT string_agg(query, ' ') FROM pg_stat_activity").fetchone()
    assert activity is not None
    assert secret not in (activity[0] or "")
    log = shared_server.state.log_file.read_text(errors="replace")
    assert secret not in log
    assert f'ALTER ROLE "{role}" PASSWORD' not in log  # statement logging was off for it
    monkeypatch.setenv("SVC_PW", "another-" + secret)
    assert run("check").code == 1  # a changed password is drift


@pytest.mark.parametrize(
    ("access", "message"),
    [
        ({"roles": {"r1": {"tables": {"public.t": ["SELECT", "FLY"]}}}}, "FLY"),
        ({"roles": {"r2": {"tables": {"public.nope": ["SELECT"]}}}}, "does not exist"),
        ({"roles": {"r3": {"login": True, "password_env": "PGWARDEN_UNSET_VAR"}}}, "is not set"),
        ({"managers": ["ghost_role"]}, "does not exist"),
        ({"managers": ["x", "x"]}, "twice"),
        ({"mode": "sometimes"}, "additive"),
    ],
)
def test_bad_input_is_a_clear_error_and_applies_nothing(
    database: Database, access: dict[str, object], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PGWARDEN_UNSET_VAR", raising=False)
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        before = conn.execute("SELECT count(*) FROM pg_roles").fetchone()

    def attempt() -> None:
        config = Config.model_validate({"access": access})
        with database.connect() as conn:
            apply_config(conn, config)

    with pytest.raises((UserError, ValueError), match=message):
        attempt()
    with database.connect() as conn:
        assert conn.execute("SELECT count(*) FROM pg_roles").fetchone() == before
        owner = conn.execute(
            "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relname = 't'"
        ).fetchone()
        assert owner == ("postgres",)


def test_duplicate_role_in_yaml_is_refused(tmp_path: Path, run: Run) -> None:
    (tmp_path / "pgwarden.yaml").write_text("access:\n  roles:\n    app: {}\n    app: {}\n")
    result = run("config", "show")
    assert result.code == 2
    assert "'app' is listed twice" in result.err


def test_access_report(database: Database, run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        apply_config(conn, Config())
    monkeypatch.setenv("PGWARDEN_DSN", database.url)
    data = json.loads(run("access", "report", "--format", "json").out)
    assert {"kind": "table", "schema": "public", "name": "t", "owner": "manager"} in data["owners"]
    assert any(r["owner"] == "manager" for r in data["schema_changers"])
    table = run("access", "report")
    assert table.code == 0
    assert "Who may change the schema" in table.out


def test_ddl_guard(database: Database, monkeypatch: pytest.MonkeyPatch, pg_major: int) -> None:
    alice, bob = _name("alice"), _name("bob")
    monkeypatch.setenv("GUARD_PW", "guard-pw-1")
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE SCHEMA side")
        conn.execute("CREATE TABLE test_table (id int PRIMARY KEY, name text)")
    config = Config.model_validate(
        {
            "history": {"tables": ["public.*", "side.*"]},
            "access": {
                "ddl_guard": True,
                "managers": [alice],
                "roles": {
                    alice: {"login": True, "password_env": "GUARD_PW"},
                    bob: {"login": True, "password_env": "GUARD_PW", "schemas": ["public"]},
                },
            },
        }
    )
    with database.connect() as conn:
        apply_config(conn, config)
        assert not build_plan(conn, config)
        # A misconfiguration the guard must still catch: bob may create in public and owns a
        # tracked table in another schema.
        conn.execute(
            sql.SQL("GRANT CREATE ON SCHEMA public, side TO {}").format(sql.Identifier(bob))
        )
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA side TO {}").format(sql.Identifier(bob)))
        conn.commit()
    with psycopg.connect(_url_as(database, bob, "guard-pw-1"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="needs the manager role"):
            conn.execute("CREATE TABLE public.sneaky (id int PRIMARY KEY)")
        conn.execute("CREATE TABLE side.mine (id int PRIMARY KEY)")  # not a managed schema
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="switch off"):
            conn.execute("ALTER TABLE side.mine DISABLE TRIGGER pgwarden_capture_insert")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="switch off"):
            conn.execute("DROP TRIGGER pgwarden_capture_update ON side.mine")
        conn.execute("INSERT INTO side.mine VALUES (1)")
        # A column added to bob's table: its history table follows on bob's behalf (the guard
        # lets pgwarden's own DDL through), and bob setting pgwarden's flag himself gains nothing.
        conn.execute("ALTER TABLE side.mine ADD COLUMN note text")
        conn.execute("INSERT INTO side.mine VALUES (2, 'two'), (3, 'three')")
        conn.execute("SET pgwarden.in_track = 'on'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE TABLE pgwarden.rows_999 (id int)")
    with psycopg.connect(_url_as(database, alice, "guard-pw-1"), autocommit=True) as conn:
        if pg_major < 16:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="needs the manager"):
                conn.execute("ALTER TABLE test_table ADD COLUMN note text")
        conn.execute("SET ROLE manager")
        conn.execute("ALTER TABLE test_table ADD COLUMN note text")  # allowed, and logged
    with database.connect() as conn:
        assert conn.execute("SELECT to_regclass('public.sneaky')").fetchone() == (None,)
        assert conn.execute("SELECT pgwarden.trigger_state('side.mine'::regclass)").fetchone() == (
            "ok",
        )
        logged = conn.execute(
            "SELECT role_name FROM pgwarden.ddl_log WHERE object_identity = 'public.test_table' "
            "AND command_tag = 'ALTER TABLE'"
        ).fetchall()
        assert ("manager",) in logged
        spooled = [e.key for e in read_events(conn, EventFilter(table=TableName("side", "mine")))]
        assert sorted(k["id"] for k in spooled) == [1, 2, 3]
        conn.commit()
        # Switching the guard off removes it.
        off = Config.model_validate({**config.model_dump(by_alias=True), "access": {
            **config.access.model_dump(), "ddl_guard": False}})  # fmt: skip
        apply_config(conn, off)
        assert conn.execute(
            "SELECT count(*) FROM pg_event_trigger WHERE evtname LIKE 'pgwarden_guard%'"
        ).fetchone() == (0,)


def test_authoritative_mode_revokes_exactly_what_the_config_drops(database: Database) -> None:
    keep, gone, outsider = _name("keep"), _name("gone"), _name("outsider")
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
        conn.execute("CREATE TABLE b (id int PRIMARY KEY)")
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(outsider)))
    before = {
        keep: {"schemas": ["public"], "tables": {"public.a": ["SELECT"], "public.b": ["SELECT"]}},
        gone: {"schemas": ["public"], "tables": {"public.*": ["SELECT", "INSERT"]}},
    }
    with database.connect() as conn:
        apply_config(conn, _config(roles=before))
        # Hand-made grants: one to a managed role (beyond its config), one to an outsider.
        conn.execute(sql.SQL("GRANT DELETE ON a TO {}").format(sql.Identifier(keep)))
        conn.execute(sql.SQL("GRANT SELECT ON a TO {}").format(sql.Identifier(outsider)))
        conn.commit()
    after = _config(
        mode="authoritative",
        roles={keep: {"schemas": ["public"], "tables": {"public.a": ["SELECT"]}}},
    )
    with database.connect() as conn:
        plan = [op.description for op in build_plan(conn, after)]
        assert any(f"role {gone}: not in the config" in d for d in plan)
        assert f"role {keep}: no DELETE on public.a" in plan
        assert f"role {keep}: no SELECT on public.b" in plan
        assert not any(outsider in d for d in plan)  # outside pgwarden's scope
        apply_config(conn, after)
        assert not build_plan(conn, after)
        privileges = dict(
            conn.execute(
                "SELECT grantee, string_agg(privilege_type, ',' ORDER BY privilege_type) "
                "FROM information_schema.role_table_grants WHERE table_name IN ('a', 'b') "
                "AND grantee IN (%s, %s) GROUP BY grantee",
                (keep, outsider),
            ).fetchall()
        )
        exists = conn.execute(
            "SELECT count(*) FROM pg_roles WHERE rolname = %s", (gone,)
        ).fetchone()
    assert privileges == {keep: "SELECT", outsider: "SELECT"}
    assert exists == (0,)


def test_no_one_but_pgwarden_switches_history_off(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manager role changes structure; stopping capture is not part of that power."""
    alice, bob = _name("alice"), _name("bob")
    monkeypatch.setenv("GUARD_PW", "guard-pw-2")
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE pay (id int PRIMARY KEY, amount numeric)")
    config = Config.model_validate(
        {
            "history": {"tables": ["public.pay"]},
            "access": {
                "ddl_guard": True,
                "managers": [alice],
                "roles": {
                    alice: {"login": True, "password_env": "GUARD_PW"},
                    bob: {"login": True, "password_env": "GUARD_PW",
                          "tables": {"public.pay": ["SELECT", "INSERT", "UPDATE", "DELETE"]}},
                },
            },
        }
    )  # fmt: skip
    with database.connect() as conn:
        apply_config(conn, config)
    attempts = (
        "ALTER TABLE pay DISABLE TRIGGER USER",
        "ALTER TABLE pay DISABLE TRIGGER pgwarden_capture_update",
        "ALTER TRIGGER pgwarden_capture_insert ON pay RENAME TO not_capture",
        "DROP TRIGGER pgwarden_capture_delete ON pay",
    )
    for who, role in ((alice, "manager"), (bob, None)):
        with psycopg.connect(_url_as(database, who, "guard-pw-2"), autocommit=True) as conn:
            if role:
                conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
            for attempt in attempts:
                with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                    conn.execute(attempt)
                if role:  # the manager owns the table: the guard is what refuses
                    assert "switch off" in str(info.value), attempt
                    assert "untrack" in (info.value.diag.message_hint or "")
            conn.execute("INSERT INTO pay VALUES (%s, 1)", (10 if role else 20,))
    with psycopg.connect(_url_as(database, alice, "guard-pw-2"), autocommit=True) as conn:
        # Structure is the manager's: a column, even dropping and making the table again,
        # which is tracked again at once under its name.
        conn.execute("SET ROLE manager")
        conn.execute("ALTER TABLE pay ADD COLUMN note text")
        conn.execute("DROP TABLE pay")
        conn.execute("CREATE TABLE pay (id int PRIMARY KEY, amount numeric)")
        conn.execute("INSERT INTO pay VALUES (30, 3)")
    with database.connect() as conn:
        assert conn.execute("SELECT pgwarden.trigger_state('pay'::regclass)").fetchone() == ("ok",)
        ops = conn.execute(
            "SELECT op, row_key->>'id' FROM pgwarden.event WHERE table_name = 'pay' "
            "ORDER BY stmt_id"
        ).fetchall()
        assert ops == [("INSERT", "10"), ("INSERT", "20"), ("INSERT", "30")]
        # pgwarden's own path works: untrack as the administrator.
        conn.execute("SELECT pgwarden.untrack('pay'::regclass)")
        conn.commit()
