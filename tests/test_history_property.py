"""Differential test: random change sequences produce exactly what a simple row-level reference
trigger records, and `as-of` rebuilds every intermediate state of the table."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from datetime import datetime
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pgwarden.history import TableName, as_of, as_of_into, native, revert, set_actor, wal
from pgwarden.history.catalog import DEFAULT_SCHEMA
from tests.conftest import Database
from tests.history_helpers import history_config, setup_history

REFERENCE = """
CREATE TABLE IF NOT EXISTS ref_log (
    seq bigserial, step text, tbl text, op text, old jsonb, new jsonb
);
CREATE OR REPLACE FUNCTION ref_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ref_log (step, tbl, op, old, new) VALUES (
        current_setting('pgwarden.context', true), TG_TABLE_NAME, TG_OP,
        CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END,
        CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END);
    RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION ref_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('INSERT INTO ref_log (step, tbl, op, old) '
                   'SELECT %L, %L, %L, to_jsonb(r) FROM %I r',
                   current_setting('pgwarden.context', true), TG_TABLE_NAME, 'TRUNCATE',
                   TG_TABLE_NAME);
    RETURN NULL;
END $$;
"""

ids = st.integers(min_value=1, max_value=12)
id_sets = st.lists(ids, min_size=1, max_size=5, unique=True)
operations = st.one_of(
    st.tuples(st.just("insert"), id_sets, st.integers(0, 9)),
    st.tuples(st.just("update"), id_sets, st.integers(0, 9)),
    st.tuples(st.just("noop"), id_sets, st.just(0)),
    st.tuples(st.just("rekey"), id_sets, st.sampled_from([-3, 20, 40])),
    st.tuples(st.just("delete"), id_sets, st.just(0)),
    st.tuples(st.just("truncate"), st.just([0]), st.just(0)),
)


def _statement(table: str, op: tuple[str, list[int], int]) -> str:
    kind, keys, value = op
    in_list = ", ".join(str(k) for k in keys)
    if kind == "insert":
        values = ", ".join(f"({k}, {value}, 'n{k}')" for k in keys)
        return f"INSERT INTO {table} VALUES {values}"
    if kind == "update":
        return (
            f"UPDATE {table} SET val = val + {value} + 1, note = note || 'u' "
            f"WHERE id IN ({in_list})"
        )
    if kind == "noop":
        return f"UPDATE {table} SET val = val WHERE id IN ({in_list})"
    if kind == "rekey":
        return f"UPDATE {table} SET id = id + {value} WHERE id IN ({in_list})"
    if kind == "delete":
        return f"DELETE FROM {table} WHERE id IN ({in_list})"
    return f"TRUNCATE {table}"


def _norm(items: list[tuple[Any, ...]]) -> Counter[str]:
    return Counter(json.dumps(item, sort_keys=True) for item in items)


def _setup(database: Database, engine: str, pg_major: int, monkeypatch: pytest.MonkeyPatch) -> None:
    if engine == "compiled" and native.library(pg_major) is None:
        pytest.skip(f"no compiled capture trigger was built for PostgreSQL {pg_major}")
    if engine == "wal":
        # The consumer streams a history table's rows to the server in runs of STREAM_ROWS:
        # two here, so that a program's rows go both ways (streamed, and left for the end).
        monkeypatch.setattr(wal, "STREAM_ROWS", 2)
        setup_history(database.url, history_config("public.*", capture="wal"))
        return
    setup_history(database.url, history_config("public.*", trigger=engine))


# The two triggers, and capture from the WAL: one history, the same answers.
ENGINES = pytest.mark.parametrize("engine", ["compiled", "plpgsql", "wal"])


@ENGINES
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(program=st.lists(operations, min_size=1, max_size=12))
# A three-row key shift: undone row by row, 4→1 then 7→4 matched two rows (found by hypothesis).
@example(program=[("insert", [1, 7, 4], 0), ("rekey", [1, 7, 4], -3)])
def test_matches_row_level_reference_and_as_of_rebuilds_every_state(
    database: Database,
    engine: str,
    pg_major: int,
    monkeypatch: pytest.MonkeyPatch,
    program: list[tuple[str, list[int], int]],
) -> None:
    """Both capture engines record what a row-level reference trigger sees; as-of (replay and
    rewind) rebuilds every state; reverting newest first walks back through them."""
    table = f"p_{uuid.uuid4().hex[:10]}"
    _setup(database, engine, pg_major, monkeypatch)
    with database.connect(autocommit=True) as conn:
        conn.execute(REFERENCE)
        # A deferrable key lets multi-row key changes succeed in any row order.
        conn.execute(
            f"CREATE TABLE {table} (id int, val int, note text, "
            "PRIMARY KEY (id) DEFERRABLE INITIALLY IMMEDIATE)"
        )
        for event, when in (("INSERT", ""), ("DELETE", ""),
                            ("UPDATE", "WHEN (OLD IS DISTINCT FROM NEW)")):  # fmt: skip
            conn.execute(
                f"CREATE TRIGGER ref_{event.lower()} AFTER {event} ON {table} FOR EACH ROW "
                f"{when} EXECUTE FUNCTION ref_row()"
            )
        conn.execute(
            f"CREATE TRIGGER ref_t BEFORE TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION ref_truncate()"
        )
        states: list[tuple[datetime, list[dict[str, Any]]]] = []
        committed: list[tuple[int, int]] = []  # (transaction id, index of the state before it)
        for step, op in enumerate(program):
            try:
                with conn.transaction():
                    # both engines' context (the WAL's reads a message, not the setting)
                    set_actor(conn, None, context=str(step))
                    conn.execute(_statement(table, op))
                    tx = conn.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()
                assert tx is not None
                committed.append((int(tx[0]), len(states) - 1))
            except psycopg.errors.UniqueViolation:
                pass  # rejected statements record nothing, in either log
            live = conn.execute(f"SELECT to_jsonb(t) FROM {table} t ORDER BY id").fetchall()
            moment = conn.execute("SELECT clock_timestamp()").fetchone()
            assert moment is not None
            states.append((moment[0], [r[0] for r in live]))

        wal.catch_up(conn, DEFAULT_SCHEMA)  # WAL capture writes a moment later
        reference = conn.execute(
            "SELECT step, op, old, new FROM ref_log WHERE tbl = %s", (table,)
        ).fetchall()
        recorded = conn.execute(
            "SELECT context, op, old_row, new_row FROM pgwarden.event "
            "WHERE table_name = %s AND op <> 'SNAPSHOT'",
            (table,),
        ).fetchall()
        assert _norm(recorded) == _norm(reference)
        for key_row in conn.execute(
            "SELECT row_key, coalesce(new_row, old_row) FROM pgwarden.event "
            "WHERE table_name = %s AND row_key IS NOT NULL",
            (table,),
        ).fetchall():
            assert key_row[0] == {"id": key_row[1]["id"]}

        for n, (moment, live_rows) in enumerate(states):
            rebuilt = as_of(conn, TableName("public", table), moment)
            assert sorted(rebuilt, key=lambda r: r["id"]) == live_rows
            for method in ("rewind", "replay"):
                into = TableName("public", f"{table}_{method[:3]}{n}")
                built = as_of_into(conn, TableName("public", table), moment, into, method=method)  # type: ignore[arg-type]
                got = conn.execute(f"SELECT to_jsonb(t) FROM {into.table} t ORDER BY id").fetchall()
                assert (built.method, [r[0] for r in got]) == (method, live_rows)
                conn.execute(f"DROP TABLE {into.table}")

        # Reverting every transaction, newest first, walks the table back through each state
        # (a transaction that changed nothing has nothing to revert).
        wal.catch_up(conn, DEFAULT_SCHEMA)
        recorded_txs = {
            int(r[0])
            for r in conn.execute(
                "SELECT DISTINCT tx FROM pgwarden.event WHERE table_name = %s", (table,)
            ).fetchall()
        }
        for tx, before in reversed(committed):
            if tx not in recorded_txs:
                continue
            revert(conn, tx)
            live = conn.execute(f"SELECT to_jsonb(t) FROM {table} t ORDER BY id").fetchall()
            expected = states[before][1] if before >= 0 else []
            assert [r[0] for r in live] == expected


keyless_ops = st.one_of(
    st.tuples(st.just("insert"), st.lists(st.integers(1, 4), min_size=1, max_size=4)),
    st.tuples(st.just("update"), st.lists(st.integers(1, 4), min_size=1, max_size=1)),
    st.tuples(st.just("delete"), st.lists(st.integers(1, 4), min_size=1, max_size=1)),
    st.tuples(st.just("truncate"), st.just([0])),
)


def _keyless_statement(table: str, op: tuple[str, list[int]]) -> str:
    kind, values = op
    if kind == "insert":  # duplicates on purpose: the whole row is the only identity
        return f"INSERT INTO {table} VALUES " + ", ".join(f"({v}, 'x{v}')" for v in values)
    if kind == "update":
        return f"UPDATE {table} SET b = b || '+' WHERE a = {values[0]}"
    if kind == "delete":
        return f"DELETE FROM {table} WHERE a = {values[0]}"
    return f"TRUNCATE {table}"


@ENGINES
@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(program=st.lists(keyless_ops, min_size=1, max_size=10))
def test_tables_without_a_key_rebuild_and_revert(
    database: Database,
    engine: str,
    pg_major: int,
    monkeypatch: pytest.MonkeyPatch,
    program: list[tuple[str, list[int]]],
) -> None:
    """A table without a key (as pgbench creates pgbench_history): as-of rebuilds every state,
    duplicates included, and reverting newest first walks back through them."""
    table = f"k_{uuid.uuid4().hex[:10]}"
    _setup(database, engine, pg_major, monkeypatch)
    with database.connect(autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (a int, b text)")
        states: list[tuple[datetime, Counter[str]]] = []
        committed: list[tuple[int, int]] = []

        def live() -> Counter[str]:
            rows = conn.execute(f"SELECT t::text FROM {table} t").fetchall()
            return Counter(str(r[0]) for r in rows)

        for op in program:
            with conn.transaction():
                conn.execute(_keyless_statement(table, op))
                tx = conn.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()
            assert tx is not None
            committed.append((int(tx[0]), len(states) - 1))
            moment = conn.execute("SELECT clock_timestamp()").fetchone()
            assert moment is not None
            states.append((moment[0], live()))
        for n, (moment, rows) in enumerate(states):
            rebuilt = as_of(conn, TableName("public", table), moment)
            assert Counter(f"({r['a']},{r['b']})" for r in rebuilt) == rows
            into = TableName("public", f"{table}_r{n}")
            as_of_into(conn, TableName("public", table), moment, into)
            got = conn.execute(f"SELECT t::text FROM {into.table} t").fetchall()
            assert Counter(str(r[0]) for r in got) == rows
            conn.execute(f"DROP TABLE {into.table}")
        wal.catch_up(conn, DEFAULT_SCHEMA)
        recorded = {
            int(r[0])
            for r in conn.execute(
                "SELECT DISTINCT tx FROM pgwarden.event WHERE table_name = %s", (table,)
            ).fetchall()
        }
        for tx, before in reversed(committed):
            if tx not in recorded:
                continue
            revert(conn, tx)
            assert live() == (states[before][1] if before >= 0 else Counter())
