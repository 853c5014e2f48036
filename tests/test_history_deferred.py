"""Deferred capture (pgwarden.defer_rows): statements spooled natively, events written on read."""

from __future__ import annotations

from typing import Any

import psycopg

from pgwarden.config import Config
from pgwarden.converge import build_plan
from pgwarden.history import EventFilter, TableName, as_of, revert, verify
from pgwarden.history import events as read_events
from tests.conftest import Database
from tests.history_helpers import setup_history

WORKLOAD = (
    "INSERT INTO {t} SELECT g, 'n' || g, g * 1.5,"
    " '2026-01-01 12:00+00'::timestamptz + g * interval '1 s', 's' || g, ARRAY[g, g + 1]"
    " FROM generate_series(1, 40) g",
    "UPDATE {t} SET amount = amount + 1 WHERE id % 3 = 0",
    "UPDATE {t} SET id = id + 1000 WHERE id > 30",  # moves keys
    "UPDATE {t} SET name = name WHERE id < 5",  # changes nothing: no events
    "DELETE FROM {t} WHERE id % 4 = 0",
)


def _table(conn: psycopg.Connection[Any], name: str) -> None:
    conn.execute(
        f"CREATE TABLE {name} (id int PRIMARY KEY, name text, amount numeric, at timestamptz,"
        " secret text, tags int[])"
    )


def _recorded(conn: psycopg.Connection[Any], table: str) -> list[tuple[Any, ...]]:
    """The events of `table` in order, without what differs between two tables and runs."""
    with conn.transaction():
        evs = list(read_events(conn, EventFilter(table=TableName("public", table))))
    return [(e.op, e.key, e.old, e.new, e.db_user, e.role, e.app_user) for e in evs]


def test_deferred_statements_record_what_inline_capture_records(database: Database) -> None:
    config = Config.model_validate(
        {
            "history": {
                "tables": ["public.*"],
                "exclude_columns": {"public.inline_t": ["secret"], "public.spooled_t": ["secret"]},
            }
        }
    )
    with database.connect(autocommit=True) as conn:
        _table(conn, "inline_t")
        _table(conn, "spooled_t")
    setup_history(database.url, config)
    with database.connect(autocommit=True) as conn:
        for statement in WORKLOAD:
            conn.execute(statement.format(t="inline_t"))
        conn.execute("SET pgwarden.defer_rows = 2")
        conn.execute("SELECT set_config('pgwarden.actor', 'bob', false)")
        for statement in WORKLOAD:
            conn.execute(statement.format(t="spooled_t"))
        conn.execute("RESET pgwarden.defer_rows")
        # A small statement after the deferred ones: ordered after them when read.
        conn.execute("INSERT INTO spooled_t VALUES (9999, 'last', 0, now(), 'x', NULL)")
        conn.execute("SELECT set_config('pgwarden.actor', '', false)")
        pending = conn.execute("SELECT count(*) FROM pgwarden.deferred").fetchone()
        spools = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'pgwarden' AND tablename ~ '^spool_'"
        ).fetchone()
        written = conn.execute(
            "SELECT count(*) FROM pgwarden.event WHERE table_name = 'spooled_t'"
        ).fetchone()
        assert pending == (5,)  # every statement of the workload changed 2 rows or more
        assert spools == (5,)
        assert written == (1,)  # only the small statement so far
        # The spool holds native values and never the excluded column.
        columns = conn.execute(
            "SELECT array_agg(attname::text ORDER BY attnum) FROM pg_attribute a"
            " JOIN pgwarden.deferred d ON a.attrelid = ('pgwarden.' || d.spool)::regclass"
            " WHERE a.attnum > 0 AND d.op = 'INSERT'"
        ).fetchone()
        assert columns == (["pgwarden$side", "pgwarden$ord", "id", "name", "amount", "at", "tags"],)

        inline = _recorded(conn, "inline_t")
        spooled = _recorded(conn, "spooled_t")
        left = conn.execute("SELECT count(*) FROM pgwarden.deferred").fetchone()
        spools_left = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'pgwarden' AND tablename ~ '^spool_'"
        ).fetchone()
    assert left == (0,)
    assert spools_left == (0,)
    # Same events (bulk statements' rows come in key-hash order: compare as sets per statement).
    assert len(spooled) == len(inline) + 1
    assert spooled[-1][0] == "INSERT"
    assert spooled[-1][1] == {"id": 9999}
    assert sorted(map(repr, (e[:4] for e in spooled[:-1]))) == sorted(
        map(repr, (e[:4] for e in inline))
    )
    assert {e[6] for e in spooled[:-1]} == {"bob"}
    assert all("secret" not in (e[2] or {}) and "secret" not in (e[3] or {}) for e in spooled)


def test_deferred_statements_survive_rollback_and_fail_closed(database: Database) -> None:
    setup_history(database.url)
    with database.connect() as conn:
        _table(conn, "t")
        conn.execute("SET pgwarden.defer_rows = 1")
        conn.commit()
        conn.execute("INSERT INTO t (id) SELECT g FROM generate_series(1, 5) g")
        conn.rollback()  # the spool and its metadata go with the transaction
        conn.execute("INSERT INTO t (id) SELECT g FROM generate_series(1, 5) g")
        conn.commit()
        pending = conn.execute("SELECT count(*) FROM pgwarden.deferred").fetchone()
        conn.commit()
        assert pending == (1,)
        report = verify(conn)
        assert not report.problems
        inserted = conn.execute(
            "SELECT count(*) FROM pgwarden.event WHERE table_name = 't' AND op = 'INSERT'"
        ).fetchone()
    assert inserted == (5,)


def test_bad_defer_rows_setting_warns_and_captures_inline(database: Database) -> None:
    setup_history(database.url)
    with database.connect(autocommit=True) as conn:
        _table(conn, "t")
        conn.execute("SET pgwarden.defer_rows = 'lots'")
        notices: list[str] = []
        conn.add_notice_handler(lambda d: notices.append(str(d.message_primary)))
        conn.execute("INSERT INTO t (id) VALUES (1), (2)")
        pending = conn.execute("SELECT count(*) FROM pgwarden.deferred").fetchone()
        written = conn.execute("SELECT count(*) FROM pgwarden.event WHERE op = 'INSERT'").fetchone()
    assert pending == (0,)
    assert written == (2,)
    assert any("defer_rows = lots is not a number" in n for n in notices)


def test_as_of_and_revert_read_deferred_statements(database: Database) -> None:
    """Readers write deferred events first: as-of and revert see a composite-key table's
    spooled statements, including a key move, as if they had been captured inline."""
    setup_history(database.url)
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE pair (a int, b text, v int, PRIMARY KEY (a, b))")
        conn.execute("INSERT INTO pair SELECT g, 'x', g FROM generate_series(1, 6) g")
        before = conn.execute("SELECT clock_timestamp()").fetchone()
        conn.execute("SET pgwarden.defer_rows = 2")
        conn.execute("UPDATE pair SET b = 'y', v = v * 10 WHERE a <= 3")
        tx = conn.execute("SELECT max(tx) FROM pgwarden.deferred").fetchone()
        conn.execute("RESET pgwarden.defer_rows")
    assert before is not None
    assert tx is not None
    with database.connect() as conn:
        rows = as_of(conn, TableName("public", "pair"), before[0])
        conn.commit()
        assert sorted((r["a"], r["b"], r["v"]) for r in rows) == [(g, "x", g) for g in range(1, 7)]
        revert(conn, int(str(tx[0])))
        live = conn.execute("SELECT a, b, v FROM pair ORDER BY a").fetchall()
        conn.commit()
    assert live == [(g, "x", g) for g in range(1, 7)]


def test_domain_columns_spool_as_their_base_type_and_unusable_types_stay_inline(
    database: Database,
) -> None:
    setup_history(database.url)
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE SCHEMA hidden")  # pgwarden's owner role has no USAGE on it
        conn.execute("CREATE TYPE hidden.mood AS ENUM ('ok', 'sad')")
        conn.execute("CREATE DOMAIN small_int AS int")
        conn.execute("CREATE TABLE d (id int PRIMARY KEY, n small_int)")
        conn.execute("CREATE TABLE e (id int PRIMARY KEY, m hidden.mood)")
        conn.execute("INSERT INTO d SELECT g, g FROM generate_series(1, 3) g")
        conn.execute("INSERT INTO e SELECT g, 'ok' FROM generate_series(1, 3) g")
        # Old rows now break the domain: spooling them as small_int would refuse the DELETE.
        conn.execute("ALTER DOMAIN small_int ADD CONSTRAINT tiny CHECK (VALUE < 2) NOT VALID")
        conn.execute("SET pgwarden.defer_rows = 2")
        conn.execute("DELETE FROM d")
        conn.execute("DELETE FROM e")
        pending = conn.execute("SELECT table_name FROM pgwarden.deferred").fetchall()
        with conn.transaction():
            gone = [(e.table, e.old) for e in read_events(conn, EventFilter(op="DELETE"))]
    assert pending == [("d",)]
    assert sorted(gone, key=repr) == sorted(
        [("public.d", {"id": g, "n": g}) for g in (1, 2, 3)]
        + [("public.e", {"id": g, "m": "ok"}) for g in (1, 2, 3)],
        key=repr,
    )


def test_defer_rows_in_the_config_is_planned_applied_and_reset(database: Database) -> None:
    def config(defer: int | None) -> Config:
        return Config.model_validate({"history": {"tables": ["public.*"], "defer_rows": defer}})

    setup_history(database.url, config(500))
    with database.connect() as conn:
        assert not build_plan(conn, config(500))
        assert not build_plan(conn, config(None))  # unset: left alone
        assert ["over 20 rows" in op.description for op in build_plan(conn, config(20))] == [True]
    with database.connect() as conn:  # a new session gets the database's default
        assert conn.execute("SHOW pgwarden.defer_rows").fetchone() == ("500",)
    setup_history(database.url, config(0))
    with database.connect() as conn:
        assert not build_plan(conn, config(0))
        setting = conn.execute("SELECT current_setting('pgwarden.defer_rows', true)").fetchone()
    assert setting in ((None,), ("",))
