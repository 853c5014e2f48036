"""History under stress and attack: concurrent writers, failures, a crash, hostile roles."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import psycopg
import pytest
from psycopg import sql

from pgwarden.config import Config
from pgwarden.history import TableName, as_of
from pgwarden.server.cluster import LocalServer
from pgwarden.server.local import bring_up
from tests.conftest import Database, free_port
from tests.history_helpers import events, history_config, setup_history


def test_concurrent_writers_every_commit_has_one_event(database: Database) -> None:
    setup_history(database.url)
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE acct (id int PRIMARY KEY, balance int NOT NULL)")
        conn.execute("INSERT INTO acct SELECT g, 100 FROM generate_series(1, 20) g")
    committed: list[str] = []
    lock = threading.Lock()

    def writer(seed: int) -> None:
        with psycopg.connect(database.url) as conn:
            for i in range(40):
                tag = f"w{seed}-{i}"
                try:
                    with conn.transaction():
                        conn.execute("SELECT set_config('pgwarden.context', %s, true)", (tag,))
                        conn.execute(
                            "UPDATE acct SET balance = balance + 1 WHERE id = %s",
                            ((i * 7 + seed) % 20 + 1,),
                        )
                        conn.execute("INSERT INTO acct VALUES (%s, 0)", (1000 + seed * 100 + i,))
                        if i % 5 == 4:
                            raise RuntimeError("roll back on purpose")
                    with lock:
                        committed.append(tag)
                except RuntimeError:
                    pass

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with database.connect() as conn:
        rows = conn.execute(
            "SELECT context, count(*) FILTER (WHERE op = 'UPDATE'), "
            "count(*) FILTER (WHERE op = 'INSERT') FROM pgwarden.event "
            "WHERE context IS NOT NULL GROUP BY context"
        ).fetchall()
        balance = conn.execute("SELECT sum(balance) FROM acct WHERE id <= 20").fetchone()
        rebuilt = as_of(
            conn, TableName("public", "acct"), conn.execute("SELECT now()").fetchone()[0]
        )  # type: ignore[index]
        live = conn.execute("SELECT to_jsonb(a) FROM acct a").fetchall()
    assert {r[0] for r in rows} == set(committed)  # rolled-back work left no events
    assert all(r[1] == 1 and r[2] == 1 for r in rows)
    assert balance == (20 * 100 + len(committed),)
    assert sorted(map(str, rebuilt)) == sorted(str(r[0]) for r in live)


def _break_history(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """Make history unwritable, as a full disk or a corrupt index would: an index whose
    expression fails on every new row (both capture engines maintain every index)."""
    conn.execute(
        "CREATE FUNCTION public.refuse(bigint) RETURNS bigint LANGUAGE plpgsql IMMUTABLE AS "
        "$$BEGIN IF current_setting('test.building', true) = 'on' THEN RETURN $1; END IF; "
        "RAISE EXCEPTION 'history storage is broken'; END$$"
    )
    conn.execute("SET test.building = 'on'")  # the existing rows still index
    tables = [r[0] for r in conn.execute("SELECT shadow FROM pgwarden.logged_table").fetchall()]
    for table in [*tables, "tx"]:
        conn.execute(
            sql.SQL("CREATE INDEX ON {} ((public.refuse({})))").format(
                sql.Identifier("pgwarden", str(table)),
                sql.Identifier("id" if table == "tx" else "stmt"),
            )
        )
    conn.execute("RESET test.building")


def test_fail_open_writes_succeed_and_failures_are_counted(database: Database) -> None:
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
    setup_history(database.url, history_config("public.*", mode="fail-open"))
    with database.connect(autocommit=True) as conn:
        _break_history(conn)
        notices: list[str] = []
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        conn.execute("INSERT INTO t SELECT g, 0 FROM generate_series(1, 100) g")
        conn.execute("UPDATE t SET v = 1")
        conn.execute("DELETE FROM t WHERE id <= 10")
        conn.execute("TRUNCATE t")
        conn.execute("INSERT INTO t SELECT g, 0 FROM generate_series(1, 1500) g")
        conn.execute("UPDATE t SET v = 2 WHERE id <= 20")
        assert conn.execute("SELECT count(*) FROM t WHERE v = 2").fetchone() == (20,)
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (1500,)
        assert conn.execute("SELECT count(*) FROM pgwarden.capture_failure").fetchone() == (6,)
        assert any("was not recorded" in n for n in notices)
        assert events(conn) == []
    from pgwarden.history import verify

    with database.connect() as conn:
        report = verify(conn)
    assert any(p.kind == "capture-failures" and "6 statement" in p.detail for p in report.problems)


def test_fail_closed_refuses_the_write_and_writes_nothing(database: Database) -> None:
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
        conn.execute("INSERT INTO t VALUES (1, 0)")
    setup_history(database.url, history_config("public.*"))
    with database.connect(autocommit=True) as conn:
        _break_history(conn)
        with pytest.raises(psycopg.errors.RaiseException, match="history storage is broken"):
            conn.execute("UPDATE t SET v = 99")
        with pytest.raises(psycopg.errors.RaiseException):
            conn.execute("INSERT INTO t VALUES (2, 0)")
        with pytest.raises(psycopg.errors.RaiseException):  # a bulk statement, too
            conn.execute("INSERT INTO t SELECT g, 0 FROM generate_series(2, 1600) g")
        with pytest.raises(psycopg.errors.RaiseException):
            conn.execute("TRUNCATE t")
        assert conn.execute("SELECT id, v FROM t").fetchall() == [(1, 0)]
        assert conn.execute("SELECT count(*) FROM pgwarden.capture_failure").fetchone() == (0,)


def _role(conn: psycopg.Connection[tuple[object, ...]], name: str) -> None:
    conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name))) if False else None
    exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
    if not exists:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'app-pw'").format(sql.Identifier(name)))
    # pgwarden's hardening revoked CONNECT from PUBLIC: grant it as a real deployment would.
    conn.execute(
        sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
            sql.Identifier(conn.info.dbname), sql.Identifier(name)
        )
    )


def test_application_role_cannot_tamper_or_disable_tracking(database: Database) -> None:
    setup_history(database.url)
    app = f"app_{uuid.uuid4().hex[:6]}"
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
        _role(conn, app)
        conn.execute(
            sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON t TO {}").format(sql.Identifier(app))
        )
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA pgwarden TO {}").format(sql.Identifier(app)))
    url = database.url.replace("postgresql://postgres:", f"postgresql://{app}:", 1)
    url = url.split("@", 1)[1]
    url = f"postgresql://{app}:app-pw@{url}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO t VALUES (1, 1)")  # its own writes are recorded …
        for attempt in (
            "SELECT * FROM pgwarden.event",
            "SELECT * FROM pgwarden.rows_1",
            "UPDATE pgwarden.rows_1 SET op = 'X'",
            "DELETE FROM pgwarden.rows_1",
            "TRUNCATE pgwarden.rows_1",
            "INSERT INTO pgwarden.rows_1 (ctx, stmt, op) VALUES (1, 1, 'I')",
            "INSERT INTO pgwarden.tx VALUES (1, 1, now(), 'x', 'x')",
            "UPDATE pgwarden.tx SET app_user = 'someone else'",
            "SELECT pgwarden.context_id(1)",
            "SELECT pgwarden.write_rows(1, 'S', 1, 1)",
            "ALTER TABLE t DISABLE TRIGGER pgwarden_capture_insert",
            "DROP TRIGGER pgwarden_capture_insert ON t",
            "SELECT pgwarden.untrack('t')",
            "DELETE FROM pgwarden.tracked",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(attempt)
        conn.execute("UPDATE t SET v = 2")
    with database.connect() as conn:
        assert [e["op"] for e in events(conn)] == ["INSERT", "UPDATE"]
        assert {e["db_user"] for e in events(conn)} == {app}


def test_session_replication_role_does_not_skip_capture(database: Database) -> None:
    setup_history(database.url)
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        conn.execute("SET session_replication_role = replica")  # superuser only
        conn.execute("INSERT INTO t VALUES (1)")
        assert [e["op"] for e in events(conn)] == ["INSERT"]


def test_search_path_hijack_runs_no_attacker_code(database: Database) -> None:
    setup_history(database.url)
    app = f"evil_{uuid.uuid4().hex[:6]}"
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        _role(conn, app)
        conn.execute(sql.SQL("GRANT ALL ON t TO {}").format(sql.Identifier(app)))
        conn.execute(  # a well-equipped attacker: may create temporary objects too
            sql.SQL("GRANT TEMP ON DATABASE {} TO {}").format(
                sql.Identifier(conn.info.dbname), sql.Identifier(app)
            )
        )
        conn.execute(sql.SQL("CREATE SCHEMA evil AUTHORIZATION {}").format(sql.Identifier(app)))
        conn.execute("CREATE TABLE public.hijacked (who text)")
        conn.execute(sql.SQL("GRANT INSERT ON public.hijacked TO {}").format(sql.Identifier(app)))
    host = database.url.split("@", 1)[1]
    with psycopg.connect(f"postgresql://{app}:app-pw@{host}", autocommit=True) as conn:
        # Shadow functions and operators the capture code uses, hoping it runs them as owner.
        for fn in ("to_jsonb(anyelement)", 'jsonb_build_object(VARIADIC "any")'):
            name = fn.split("(")[0]
            conn.execute(
                f"CREATE FUNCTION evil.{name}(x anyelement) RETURNS jsonb LANGUAGE plpgsql AS "
                "$$BEGIN INSERT INTO public.hijacked VALUES (current_user); RETURN '{}'; END$$"
            )
        conn.execute("CREATE TEMP TABLE event (x int)")
        conn.execute("SET search_path = evil, pg_temp, public, pg_catalog")
        conn.execute("INSERT INTO t VALUES (1, 'a')")
        conn.execute("UPDATE t SET v = 'b'")
    with database.connect() as conn:
        assert conn.execute("SELECT count(*) FROM public.hijacked").fetchone() == (0,)
        assert [e["op"] for e in events(conn)] == ["INSERT", "UPDATE"]
        insecure = conn.execute(
            "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = 'pgwarden' AND p.prosecdef AND NOT EXISTS ("
            "  SELECT 1 FROM unnest(p.proconfig) c WHERE c = 'search_path=pg_catalog, pg_temp')"
        ).fetchall()
        assert insecure == []


@pytest.mark.parametrize(
    "name",
    ['Odd "Table"', "with space", "MiXeD", "x'; DROP TABLE t; --", "select", "日本"],
)
def test_hostile_table_and_column_names(database: Database, name: str) -> None:
    setup_history(database.url)
    table = sql.Identifier("public", name)
    column = sql.Identifier(f"col {name}")
    with database.connect(autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE TABLE {} ({} int PRIMARY KEY, {} text)").format(
                table, column, sql.Identifier(name)
            )
        )
        conn.execute(sql.SQL("INSERT INTO {} VALUES (1, 'x')").format(table))
        conn.execute(sql.SQL("UPDATE {} SET {} = 2").format(table, column))
        conn.execute(sql.SQL("TRUNCATE {}").format(table))
        got = [(e["op"], e["table_name"], e["row_key"]) for e in events(conn)]
        rebuilt = as_of(conn, TableName("public", name), conn.execute("SELECT now()").fetchone()[0])  # type: ignore[index]
    key = f"col {name}"
    assert got == [
        ("INSERT", name, {key: 1}),
        ("UPDATE", name, {key: 2}),
        ("TRUNCATE", name, {key: 2}),
    ]
    assert rebuilt == []


@pytest.mark.slow
def test_crash_during_write_load_keeps_every_committed_event(tmp_path, pg_bin) -> None:  # type: ignore[no-untyped-def]
    server = LocalServer(Config(), tmp_path / ".pgwarden", pg_bin=pg_bin, port=free_port())
    try:
        bring_up(server)
        url = server.url()
        setup_history(url)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE load (id bigint PRIMARY KEY, v int)")
        committed: list[int] = []
        stop = threading.Event()

        def load() -> None:
            try:
                with psycopg.connect(url, autocommit=True) as conn:
                    n = 0
                    while not stop.is_set():
                        conn.execute(
                            "INSERT INTO load SELECT g, 0 "
                            "FROM generate_series(%s::bigint, %s::bigint) g",
                            (n * 50 + 1, n * 50 + 50),
                        )
                        committed.append(n)
                        conn.execute("UPDATE load SET v = v + 1 WHERE id = %s", (n * 50 + 1,))
                        committed.append(-n - 1)
                        n += 1
            except psycopg.OperationalError:
                pass  # the server went away mid-statement

        worker = threading.Thread(target=load)
        worker.start()
        time.sleep(1.0)
        pid = int((server.state.data_dir / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        worker.join(timeout=30)
        stop.set()
        assert committed, "the load never committed anything"
        bring_up(server)  # crash recovery
        with psycopg.connect(url) as conn:
            inserts = {
                r[0]
                for r in conn.execute(
                    "SELECT (row_key->>'id')::bigint FROM pgwarden.event WHERE op = 'INSERT'"
                ).fetchall()
            }
            live = {r[0] for r in conn.execute("SELECT id FROM load").fetchall()}
            updates = conn.execute(
                "SELECT count(*) FROM pgwarden.event WHERE op = 'UPDATE'"
            ).fetchone()
        done_batches = [n for n in committed if n >= 0]
        for n in done_batches:
            assert set(range(n * 50 + 1, n * 50 + 51)) <= inserts
        assert inserts == live  # nothing recorded that did not commit, nothing missing
        assert updates is not None
        assert updates[0] >= len([n for n in committed if n < 0])
    finally:
        server.purge()
