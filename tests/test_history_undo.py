"""Reading and undoing history: filters, as-of, revert, retention, verify; API and CLI."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from pgwarden.errors import UserError
from pgwarden.history import EventFilter, TableName, as_of, as_of_into, events, revert, verify
from pgwarden.history.retention import apply_retention
from tests.conftest import Database, Run
from tests.history_helpers import setup_history

T = TableName("public", "test_table")


def _seed(database: Database) -> None:
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE test_table (id int PRIMARY KEY, name text)")
        conn.execute("INSERT INTO test_table VALUES (1, 'Test Data')")
    setup_history(database.url)


def _tx(conn: psycopg.Connection[tuple[object, ...]], *statements: str) -> int:
    with conn.transaction():
        for statement in statements:
            conn.execute(statement)
        row = conn.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()
    assert row is not None
    return int(row[0])  # type: ignore[call-overload]


def test_event_filters(database: Database) -> None:
    _seed(database)
    with database.connect() as conn:
        tx = _tx(conn, "SELECT set_config('pgwarden.actor', 'alice', true)",
                 "INSERT INTO test_table VALUES (2, 'b'), (3, 'c')")  # fmt: skip
        _tx(conn, "UPDATE test_table SET name = 'B' WHERE id = 2")
        with conn.transaction():
            assert [e.op for e in events(conn, EventFilter(table=T, key={"id": "2"}))] == [
                "INSERT",
                "UPDATE",
            ]
            assert {e.key["id"] for e in events(conn, EventFilter(actor="alice"))} == {2, 3}
            assert {e.tx for e in events(conn, EventFilter(tx=tx))} == {tx}
            assert [e.op for e in events(conn, EventFilter(op="UPDATE"))] == ["UPDATE"]
            future = datetime.now(UTC) + timedelta(hours=1)
            assert list(events(conn, EventFilter(since=future))) == []
            # A non-key column works too (containment, no index).
            assert len(list(events(conn, EventFilter(table=T, key={"name": "B"})))) == 1
            with pytest.raises(UserError, match="no column"):
                list(events(conn, EventFilter(table=T, key={"nope": "1"})))


def test_as_of_rebuilds_rows_and_tables(database: Database) -> None:
    _seed(database)
    with database.connect() as conn:
        before = conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
        conn.commit()
        _tx(conn, "UPDATE test_table SET name = 'Changed' WHERE id = 1",
            "INSERT INTO test_table VALUES (2, 'two')")  # fmt: skip
        assert as_of(conn, T, before) == [{"id": 1, "name": "Test Data"}]
        assert as_of(conn, T, before, key={"id": "1"}) == [{"id": 1, "name": "Test Data"}]
        assert as_of(conn, T, before, key={"id": "2"}) == []
        built = as_of_into(conn, T, before, TableName("public", "test_table_then"))
        assert built.rows == 1
        assert conn.execute("SELECT * FROM test_table_then").fetchall() == [(1, "Test Data")]
        with pytest.raises(UserError, match="already exists"):
            as_of_into(conn, T, before, TableName("public", "test_table_then"))


def test_as_of_into_rewinds_when_history_since_is_complete(database: Database) -> None:
    _seed(database)
    with database.connect(autocommit=True) as conn:
        conn.execute("INSERT INTO test_table SELECT g, 'row ' || g FROM generate_series(2, 50) g")
        conn.execute("ANALYZE test_table")
        then = conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
        expected = conn.execute("SELECT * FROM test_table ORDER BY id").fetchall()
        conn.execute("UPDATE test_table SET name = 'changed' WHERE id <= 5")
        conn.execute("UPDATE test_table SET id = id + 100 WHERE id BETWEEN 6 AND 8")
        conn.execute("DELETE FROM test_table WHERE id IN (9, 10)")
        conn.execute("INSERT INTO test_table VALUES (500, 'new')")

        def rebuilt(method: str, name: str) -> tuple[str, str | None, list[tuple[object, ...]]]:
            built = as_of_into(conn, T, then, TableName("public", name), method=method)  # type: ignore[arg-type]
            rows = conn.execute(f"SELECT * FROM {name} ORDER BY id").fetchall()
            return built.method, built.note, rows

        assert rebuilt("auto", "t_auto") == ("rewind", None, expected)
        assert rebuilt("replay", "t_replay") == ("replay", None, expected)

        # A schema change since `then`: the live rows no longer match what history describes,
        # so auto replays (and says why) and a forced rewind refuses.
        conn.execute("ALTER TABLE test_table ADD COLUMN extra int")
        method, note, rows = rebuilt("auto", "t_after_ddl")
        assert (method, rows) == ("replay", [(*r, None) for r in expected])
        assert note is not None
        assert "columns or key changed" in note
        with pytest.raises(UserError, match="cannot rewind"):
            rebuilt("rewind", "t_forced")
        # Inside a caller's READ COMMITTED transaction there is no single snapshot to rewind.
        later = conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
        with conn.transaction():
            built = as_of_into(conn, T, later, TableName("public", "t_in_tx"))
        assert built.method == "replay"
        assert built.note
        assert "REPEATABLE READ" in built.note


def test_revert_undoes_a_transaction_and_is_recorded(database: Database) -> None:
    _seed(database)
    with database.connect() as conn:
        tx = _tx(conn, "INSERT INTO test_table VALUES (2, 'two')",
                 "UPDATE test_table SET name = 'oops' WHERE id = 1",
                 "DELETE FROM test_table WHERE id = 1")  # fmt: skip
        assert conn.execute("SELECT * FROM test_table").fetchall() == [(2, "two")]
        dry = revert(conn, tx, dry_run=True)
        assert len(dry.statements) == 3
        assert conn.execute("SELECT count(*) FROM test_table").fetchone() == (1,)
        revert(conn, tx)
        assert conn.execute("SELECT * FROM test_table ORDER BY id").fetchall() == [(1, "Test Data")]
        contexts = conn.execute(
            "SELECT DISTINCT context FROM pgwarden.event WHERE context LIKE 'revert%'"
        ).fetchall()
        assert contexts == [(f"revert of tx {tx}",)]


def test_revert_reports_progress_per_set_based_step(database: Database) -> None:
    _seed(database)
    with database.connect() as conn:
        tx = _tx(conn, "INSERT INTO test_table SELECT g, 'bulk' FROM generate_series(2, 5001) g",
                 "UPDATE test_table SET name = 'oops' WHERE id <= 3000",
                 "DELETE FROM test_table WHERE id > 4000")  # fmt: skip
        calls: list[tuple[int, int, str]] = []
        plan = revert(conn, tx, progress=lambda *call: calls.append(call))
        # One call before each step and one at the end; the rows done only grow, and end at
        # the plan's total: 5000 inserted + 3000 updated + 1001 deleted, undone in 3 statements.
        assert plan.rows == 5000 + 3000 + 1001
        assert len(plan.steps) == 3
        assert [c[0] for c in calls] == sorted(c[0] for c in calls)
        assert calls[0][0] == 0
        assert calls[-1] == (plan.rows, plan.rows, "committing")
        assert [c[2] for c in calls[:-1]] == [s.summary for s in plan.steps]
        assert conn.execute("SELECT * FROM test_table ORDER BY id").fetchall() == [(1, "Test Data")]


def test_revert_refuses_when_rows_changed_later(database: Database) -> None:
    _seed(database)
    with database.connect() as conn:
        tx = _tx(conn, "UPDATE test_table SET name = 'first' WHERE id = 1")
        later = _tx(conn, "UPDATE test_table SET name = 'second' WHERE id = 1")
        with pytest.raises(UserError) as info:
            revert(conn, tx)
        assert str(later) in str(info.value)
        assert conn.execute("SELECT name FROM test_table").fetchone() == ("second",)
        revert(conn, later)  # newest first works
        revert(conn, tx)
        assert conn.execute("SELECT name FROM test_table").fetchone() == ("Test Data",)
        with pytest.raises(UserError, match="no history"):
            revert(conn, 999999999)


def _age(conn: psycopg.Connection[tuple[object, ...]], tx: int, at: str) -> None:
    """Make a transaction look as if it ran at `at` (tests only: history is append-only)."""
    conn.execute("ALTER TABLE pgwarden.tx DISABLE TRIGGER append_only")
    conn.execute("UPDATE pgwarden.tx SET at = %s WHERE tx = %s", (at, tx))
    conn.execute("ALTER TABLE pgwarden.tx ENABLE TRIGGER append_only")


def test_retention_keeps_the_state_at_the_cutoff(database: Database) -> None:
    _seed(database)  # row 1: SNAPSHOT
    with database.connect() as conn:
        first = _tx(conn, "INSERT INTO test_table VALUES (2, 'two'), (3, 'three')")
        second = _tx(conn, "UPDATE test_table SET name = 'TWO' WHERE id = 2",
                     "DELETE FROM test_table WHERE id = 3")  # fmt: skip
        _tx(conn, "UPDATE test_table SET name = 'now' WHERE id = 1")
        snapshot = conn.execute("SELECT min(tx) FROM pgwarden.tx").fetchone()
        assert snapshot is not None
        with conn.transaction():
            for tx in (int(str(snapshot[0])), first, second):
                _age(conn, tx, "2020-01-15")
        now = datetime.now(UTC)
        rows_now = as_of(conn, T, now)
        dry = apply_retention(conn, timedelta(days=400), dry_run=True)
        # Gone: row 2's INSERT (its UPDATE, still before the cutoff, says what it was then),
        # row 3 entirely (deleted before the cutoff).
        assert dry.removed == 3
        done = apply_retention(conn, timedelta(days=400))
        assert done.removed == 3
        assert done.contexts_removed == 1  # the first transaction's who-and-when
        assert as_of(conn, T, now) == rows_now
        with conn.transaction():
            left = [(e.op, e.key["id"]) for e in events(conn, EventFilter(table=T))]
        assert left == [("SNAPSHOT", 1), ("UPDATE", 2), ("UPDATE", 1)]
        assert verify(conn).ok
        assert apply_retention(conn, timedelta(days=400)).removed == 0


def test_verify_reports_disabled_triggers_and_gaps(database: Database) -> None:
    _seed(database)
    with database.connect(autocommit=True) as conn:
        assert verify(conn).ok
        conn.execute("ALTER TABLE test_table DISABLE TRIGGER pgwarden_capture_update")
        conn.execute("UPDATE test_table SET name = 'sneaky'")
        report = verify(conn)
    kinds = {p.kind for p in report.problems}
    assert {"disabled-trigger", "gap"} <= kinds
    assert any("pgwarden_capture_update is disabled" in p.detail for p in report.problems)


# -- the CLI over the same API --------------------------------------------------------------
@pytest.fixture
def cli_db(database: Database, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Database:
    _seed(database)
    monkeypatch.setenv("PGWARDEN_DSN", database.url)
    return database


def test_cli_history_formats(cli_db: Database, run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGWARDEN_DSN", cli_db.url)  # `run` clears it; set it again
    with cli_db.connect(autocommit=True) as conn:
        conn.execute("UPDATE test_table SET name = 'Changed' WHERE id = 1")
    table = run("history", "public.test_table", "--key", "id=1")
    assert table.code == 0, table.err
    assert (
        "Test Data → Changed" in table.out.replace("\n", " ").replace("│", " ") or "→" in table.out
    )
    data = json.loads(run("history", "public.test_table", "--format", "json").out)
    assert [e["op"] for e in data] == ["SNAPSHOT", "UPDATE"]
    assert set(data[1]) == {"tx", "at", "table", "op", "key", "old", "new", "db_user",
                            "app_user", "application", "client_addr", "context"}  # fmt: skip
    assert data[1]["old"] == {"id": 1, "name": "Test Data"}
    assert data[1]["table"] == "public.test_table"
    rows = list(csv.DictReader(io.StringIO(run("history", "--format", "csv").out)))
    assert [r["op"] for r in rows] == ["SNAPSHOT", "UPDATE"]
    assert run("history", "--op", "nope").code == 2
    assert run("history", "--since", "yesterday-ish").code == 2


def test_cli_as_of_revert_verify_track(
    cli_db: Database, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGWARDEN_DSN", cli_db.url)
    with cli_db.connect() as conn:
        tx = _tx(conn, "UPDATE test_table SET name = 'Changed' WHERE id = 1")
        conn.execute("CREATE TABLE other (id int PRIMARY KEY)")
        conn.commit()
    rows = json.loads(run("as-of", "public.test_table", "1d", "--format", "json").out)
    assert rows == []  # a day ago the table had no history yet
    rows = json.loads(run("as-of", "test_table", "now", "--format", "json").out)
    assert rows == [{"id": 1, "name": "Changed"}]
    assert "1 row(s)" in run("as-of", "test_table", "now").err
    built = run("as-of", "test_table", "now", "--into", "then_table")
    assert built.code == 0
    assert "1 row(s)" in built.out
    assert "(rewind)" in built.out
    # A day ago tracking had not started: rewinding is refused, replaying says why it replayed.
    forced = run("as-of", "test_table", "1d", "--into", "t2", "--method", "rewind")
    assert forced.code == 2
    assert "cannot rewind" in forced.err
    auto = run("as-of", "test_table", "1d", "--into", "t3")
    assert auto.code == 0
    assert "(replay)" in auto.out
    assert "tracking (re)started after that time" in auto.err
    with cli_db.connect(autocommit=True) as conn:
        # Keyless copies that the public.* pattern would ask `verify` about.
        conn.execute("DROP TABLE then_table, t3")
    dry = run("revert", str(tx), "--dry-run", "--sql")
    assert dry.code == 0
    assert "UPDATE" in dry.out
    assert run("revert", str(tx)).code == 0
    with cli_db.connect() as conn:
        assert conn.execute("SELECT name FROM test_table").fetchone() == ("Test Data",)
    assert run("verify").code == 0
    assert run("untrack", "public.other").code == 0
    assert run("untrack", "public.other").code == 2  # not tracked any more
    assert run("track", "public.other", "--mode", "fail-open").code == 0
    assert run("track", "public.missing").code == 2
    with cli_db.connect(autocommit=True) as conn:
        conn.execute("ALTER TABLE test_table DISABLE TRIGGER pgwarden_capture_insert")
    result = run("verify")
    assert result.code == 1
    assert "pgwarden_capture_insert is disabled" in result.out
    assert run("check").code == 1
    assert run("apply").code == 0
    assert run("check").code == 0
    assert run("verify", "--json").code == 0


def test_cli_retention_needs_a_setting(
    cli_db: Database, run: Run, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PGWARDEN_DSN", cli_db.url)
    result = run("retention")
    assert result.code == 2
    assert "history.retention" in result.err
    (tmp_path / "pgwarden.yaml").write_text("history:\n  tables: ['public.*']\n  retention: 400d\n")
    result = run("retention", "--dry-run")
    assert result.code == 0, result.err
    assert "would remove 0 event(s)" in result.out
