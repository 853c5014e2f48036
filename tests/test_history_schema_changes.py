"""History across schema changes: columns renamed, added, dropped, retyped, tables renamed; as-of
and revert give the right answer or refuse with the real reason."""

from __future__ import annotations

import uuid
from datetime import datetime

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgwarden.errors import UserError
from pgwarden.history import EventFilter, TableName, as_of, as_of_into, events, revert
from tests.conftest import Database
from tests.history_helpers import setup_history

Conn = psycopg.Connection[tuple[object, ...]]


def _now(conn: Conn) -> datetime:
    row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    return row[0]  # type: ignore[return-value]


def _tx(conn: Conn, statement: str) -> int:
    with conn.transaction():
        conn.execute(statement)
        row = conn.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()
    assert row is not None
    return int(str(row[0]))


def test_as_of_into_across_a_rename_and_a_check_constraint(database: Database) -> None:
    setup_history(database.url)
    with database.connect(autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE pay (id int PRIMARY KEY, amount_old numeric, "
            "rate int CHECK (rate BETWEEN 0 AND 100))"
        )
        conn.execute("INSERT INTO pay VALUES (1, 10.5, 7), (2, 20, 9)")
        conn.execute("UPDATE pay SET amount_old = amount_old * 2")
        before = _now(conn)
        conn.execute("ALTER TABLE pay RENAME COLUMN amount_old TO amount")
        conn.execute("UPDATE pay SET amount = 0")
        for method in ("replay", "rewind"):
            built = as_of_into(
                conn, TableName("public", "pay"), before, TableName("public", f"pay_{method}"),
                method=method,  # type: ignore[arg-type]
            )  # fmt: skip
            rows = conn.execute(f"SELECT * FROM pay_{method} ORDER BY id").fetchall()
            assert (built.method, rows) == (method, [(1, 21, 7), (2, 40, 9)])
            assert built.note is None or "NULL" not in built.note
        json_rows = as_of(conn, TableName("public", "pay"), before)
    assert sorted(json_rows, key=lambda r: r["id"]) == [
        {"id": 1, "amount": 21, "rate": 7},
        {"id": 2, "amount": 40, "rate": 9},
    ]


def test_a_column_added_since_is_null_and_said_so(database: Database) -> None:
    setup_history(database.url)
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO t VALUES (1, 'a')")
        before = _now(conn)
        conn.execute("ALTER TABLE t ADD COLUMN extra int")
        conn.execute("UPDATE t SET extra = 5")
        built = as_of_into(conn, TableName("public", "t"), before, TableName("public", "t_then"))
        rows = conn.execute("SELECT * FROM t_then").fetchall()
        with conn.transaction():
            images = [e.new for e in events(conn, EventFilter(table=TableName("public", "t")))]
    assert rows == [(1, "a", None)]
    assert built.note is not None
    assert "extra" in built.note
    # The snapshot's image has no `extra` at all (absent, not null); the update's has it.
    assert images == [{"id": 1, "v": "a"}, {"id": 1, "v": "a", "extra": 5}]


def test_revert_of_a_transaction_from_before_a_rename(database: Database) -> None:
    setup_history(database.url)
    with database.connect() as conn:
        conn.execute("CREATE TABLE rn (id int PRIMARY KEY, old_name text)")
        conn.execute("INSERT INTO rn VALUES (1, 'a'), (2, 'b')")
        conn.commit()
        a = _tx(conn, "UPDATE rn SET old_name = 'A' WHERE id = 1")
        _tx(conn, "ALTER TABLE rn RENAME COLUMN old_name TO new_name")
        _tx(conn, "UPDATE rn SET new_name = 'B' WHERE id = 2")
        revert(conn, a)
        assert conn.execute("SELECT * FROM rn ORDER BY id").fetchall() == [(1, "a"), (2, "B")]


def test_revert_names_every_conflicting_transaction(database: Database) -> None:
    setup_history(database.url)
    with database.connect() as conn:
        conn.execute("CREATE TABLE c (id int PRIMARY KEY, v int)")
        conn.execute("INSERT INTO c VALUES (1, 0), (2, 0), (3, 0)")
        conn.commit()
        first = _tx(conn, "UPDATE c SET v = 1 WHERE id IN (1, 2)")
        culprit = _tx(conn, "UPDATE c SET v = 2 WHERE id = 1")
        other = _tx(conn, "UPDATE c SET v = 3 WHERE id = 3")
        again = _tx(conn, "UPDATE c SET v = 4 WHERE id = 1")
        with pytest.raises(UserError) as info:
            revert(conn, first)
        message = str(info.value) + (info.value.hint or "")
        assert f"tx {culprit}" in message
        assert f"tx {again}" in message
        assert str(other) not in message  # it touched another row
        assert '{"id": 1}' in message
        assert '{"id": 2}' not in message  # row 2 is as `first` left it
        # Following the hint works: the later ones first, newest first.
        revert(conn, again)
        revert(conn, culprit)
        revert(conn, first)
        assert conn.execute("SELECT v FROM c ORDER BY id").fetchall() == [(0,), (0,), (3,)]


def test_revert_twice_says_it_was_done(database: Database) -> None:
    setup_history(database.url)
    with database.connect() as conn:
        conn.execute("CREATE TABLE d (id int PRIMARY KEY, v int)")
        conn.execute("INSERT INTO d VALUES (1, 0)")
        conn.commit()
        tx = _tx(conn, "UPDATE d SET v = 1")
        revert(conn, tx)
        by = conn.execute(
            "SELECT DISTINCT tx FROM pgwarden.event WHERE context = %s", (f"revert of tx {tx}",)
        ).fetchone()
        assert by is not None
        with pytest.raises(UserError, match=f"already reverted, by transaction {by[0]}"):
            revert(conn, tx)
        assert conn.execute("SELECT v FROM d").fetchone() == (0,)
        # Reverting the revert makes the first revert possible again.
        revert(conn, int(str(by[0])))
        assert conn.execute("SELECT v FROM d").fetchone() == (1,)
        revert(conn, tx)
        assert conn.execute("SELECT v FROM d").fetchone() == (0,)


def test_table_renamed_and_dropped_keeps_its_history(database: Database) -> None:
    setup_history(database.url)
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
        conn.execute("INSERT INTO a VALUES (1)")
        conn.execute("ALTER TABLE a RENAME TO b")
        conn.execute("INSERT INTO b VALUES (2)")
        with conn.transaction():
            ops = [
                (e.table, e.op) for e in events(conn, EventFilter(table=TableName("public", "b")))
            ]
        assert ops == [("public.b", "INSERT"), ("public.b", "INSERT")]
        conn.execute("DROP TABLE b")
        with conn.transaction():
            gone = [e.op for e in events(conn, EventFilter(table=TableName("public", "b")))]
        assert gone == ["INSERT", "INSERT"]
        with pytest.raises(UserError, match="has no history"):
            list(events(conn, EventFilter(table=TableName("public", "never"))))


# --- random DML mixed with random schema changes ----------------------------------------------

dml = st.one_of(
    st.tuples(st.just("insert"), st.integers(1, 8)),
    st.tuples(st.just("update"), st.integers(1, 8)),
    st.tuples(st.just("delete"), st.integers(1, 8)),
)
ddl = st.one_of(
    st.tuples(st.just("add"), st.integers(0, 99)),
    st.tuples(st.just("drop"), st.integers(0, 99)),
    st.tuples(st.just("rename"), st.integers(0, 99)),
    st.tuples(st.just("retype"), st.integers(0, 99)),
)


def _columns(conn: Conn, table: str) -> list[tuple[int, str, str]]:
    rows = conn.execute(
        "SELECT attnum, attname, format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        (table,),
    ).fetchall()
    return [(int(str(a)), str(n), str(t)) for a, n, t in rows]


def _state(conn: Conn, table: str) -> dict[int, dict[int, str | None]]:
    """id → attnum → value as text: columns by identity, as renames leave them."""
    cols = _columns(conn, table)
    names = ", ".join(f'"{n}"::text' for _, n, _ in cols)
    state = {}
    for row in conn.execute(f"SELECT {names} FROM {table}").fetchall():
        values = dict(zip((a for a, _, _ in cols), row, strict=True))
        state[int(str(values[1]))] = values
    return state  # type: ignore[return-value]


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(program=st.lists(st.one_of(dml, dml, ddl), min_size=2, max_size=14))
def test_as_of_is_right_across_random_schema_changes(
    database: Database, program: list[tuple[str, int]]
) -> None:
    """After every step, as-of --into (both ways) rebuilds the table as it was then, under the
    columns it has now: a renamed column under its new name, one added since NULL, values of a
    retyped column cast."""
    table = f"s_{uuid.uuid4().hex[:8]}"
    setup_history(database.url)
    with database.connect(autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, c2 int, c3 text)")
        moments: list[tuple[datetime, dict[int, dict[int, str | None]]]] = []
        for counter, (kind, n) in enumerate(program, start=1):
            cols = [c for c in _columns(conn, table) if c[0] != 1]
            pick = cols[n % len(cols)] if cols else None
            if kind == "insert":
                conn.execute(f"INSERT INTO {table} (id) VALUES ({n}) ON CONFLICT DO NOTHING")
                if pick:
                    conn.execute(
                        f'UPDATE {table} SET "{pick[1]}" = {counter}::int::{pick[2]} WHERE id = {n}'
                    )
            elif kind == "update" and pick:
                conn.execute(
                    f'UPDATE {table} SET "{pick[1]}" = {counter}::int::{pick[2]} WHERE id <= {n}'
                )
            elif kind == "delete":
                conn.execute(f"DELETE FROM {table} WHERE id = {n}")
            elif kind == "add":
                conn.execute(f"ALTER TABLE {table} ADD COLUMN a{counter} int")
            elif kind == "drop" and pick:
                conn.execute(f'ALTER TABLE {table} DROP COLUMN "{pick[1]}"')
            elif kind == "rename" and pick:
                conn.execute(f'ALTER TABLE {table} RENAME COLUMN "{pick[1]}" TO r{counter}')
            elif kind == "retype" and pick and pick[2] in ("integer", "bigint"):
                new = "bigint" if pick[2] == "integer" else "text"
                conn.execute(f'ALTER TABLE {table} ALTER COLUMN "{pick[1]}" TYPE {new}')
            moments.append((_now(conn), _state(conn, table)))

        cols = _columns(conn, table)
        for step, (moment, state) in enumerate(moments):
            for method in ("replay", "auto"):
                into = f"{table}_{method[0]}{step}"
                as_of_into(conn, TableName("public", table), moment, TableName("public", into),
                           method=method)  # type: ignore[arg-type]  # fmt: skip
                got = _state(conn, into)
                conn.execute(f"DROP TABLE {into}")
                # The into table has the columns as they are now (positions match attnums of a
                # fresh table, so compare by the live table's attnums in order).
                expected = {
                    key: {attnum: row.get(attnum) for attnum, _, _ in cols}
                    for key, row in state.items()
                }
                renumbered = {
                    key: dict(zip((a for a, _, _ in cols), row.values(), strict=True))
                    for key, row in got.items()
                }
                assert renumbered == expected, (step, method)
