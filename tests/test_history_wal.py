"""Capture from the WAL (history.capture: wal): the same history as the triggers write, with no
trigger on the write path, exactly once across crashes of the consumer, and complete where
triggers are not (session_replication_role = replica, a superuser's DISABLE TRIGGER)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgwarden.config import Config
from pgwarden.converge import apply_config
from pgwarden.errors import ConfigError
from pgwarden.history import (
    TableName,
    as_of,
    as_of_into,
    revert,
    set_actor,
    verify,
    wal,
    walstate,
)
from pgwarden.history.catalog import DEFAULT_SCHEMA
from pgwarden.kube import consumer as kube_consumer
from pgwarden.server import consumer
from pgwarden.server.cluster import LocalServer, free_port
from pgwarden.server.local import bring_up
from pgwarden.server.state import StateDir
from tests.conftest import Database, Run
from tests.history_helpers import events, history_config, setup_history


def _wal(database: Database, *tables: str, **history: Any) -> None:
    setup_history(database.url, history_config(*tables, capture="wal", **history))


def _catch_up(conn: psycopg.Connection[Any]) -> wal.BatchResult:
    return wal.catch_up(conn, DEFAULT_SCHEMA)


def _triggers(conn: psycopg.Connection[Any], table: str) -> list[str]:
    rows = conn.execute(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = %s::regclass AND NOT tgisinternal",
        (table,),
    ).fetchall()
    return [str(r[0]) for r in rows]


def test_changes_are_recorded_without_a_trigger(database: Database) -> None:
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE acc (id int PRIMARY KEY, owner text, balance numeric)")
        conn.execute("INSERT INTO acc VALUES (1, 'ann', 10.50)")
    _wal(database)
    with database.connect(autocommit=True) as conn:
        assert _triggers(conn, "acc") == []
        assert conn.execute(
            "SELECT relreplident FROM pg_class WHERE oid = 'acc'::regclass"
        ).fetchone() == ("f",)
        with conn.transaction():
            set_actor(conn, "alice", context={"request": "r-1"})
            conn.execute("INSERT INTO acc VALUES (2, 'bob', 12345678901234567.0123456789)")
            conn.execute("UPDATE acc SET balance = balance + 1 WHERE id = 1")
            tx = conn.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()
        conn.execute("UPDATE acc SET owner = owner WHERE id = 2")  # changes nothing
        conn.execute("DELETE FROM acc WHERE id = 1")
        caught = _catch_up(conn)
        assert caught.events == 3  # the no-op UPDATE writes nothing
        got = events(conn, "acc")
        assert [(e["op"], e["row_key"]) for e in got] == [
            ("SNAPSHOT", {"id": 1}),
            ("INSERT", {"id": 2}),
            ("UPDATE", {"id": 1}),
            ("DELETE", {"id": 1}),
        ]
        assert got[1]["new_row"] == {
            "id": 2,
            "owner": "bob",
            "balance": 12345678901234567.0123456789,
        }
        assert str(got[1]["tx"]) == str(tx[0])  # type: ignore[index]
        assert (got[1]["app_user"], got[1]["context"]) == ("alice", '{"request": "r-1"}')
        assert got[1]["db_user"] == got[1]["role_name"] == "postgres"
        assert got[3]["db_user"] is None  # no context message: the WAL does not know the role
        # a second catch-up finds nothing more, and writes nothing twice
        assert _catch_up(conn).events == 0
        assert len(events(conn, "acc")) == 4


def test_readers_catch_up_by_themselves(database: Database) -> None:
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    _wal(database)
    with database.connect(autocommit=True) as conn:
        conn.execute("INSERT INTO t VALUES (1, 'a'), (2, 'b')")
        now = conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
        rows = as_of(conn, TableName("public", "t"), now)
        assert sorted(r["v"] for r in rows) == ["a", "b"]


def test_writes_that_skip_triggers_are_recorded(database: Database) -> None:
    """session_replication_role = replica and a superuser's DISABLE TRIGGER ALL stop every
    trigger, and so the trigger engine; the WAL still has the changes."""
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE r (id int PRIMARY KEY, v text)")
    _wal(database)
    with database.connect(autocommit=True) as conn:
        with conn.transaction():
            conn.execute("SET LOCAL session_replication_role = replica")
            conn.execute("INSERT INTO r VALUES (1, 'replica')")
        conn.execute("ALTER TABLE r DISABLE TRIGGER ALL")
        conn.execute("INSERT INTO r VALUES (2, 'no triggers')")
        _catch_up(conn)
        assert [e["new_row"]["v"] for e in events(conn, "r")] == ["replica", "no triggers"]


def test_unchanged_toast_values_are_carried_forward(database: Database) -> None:
    big = "x" * 100_000 + "end"  # stored out of line: the WAL of an UPDATE leaves it out
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE doc (id int PRIMARY KEY, body text, n int)")
        conn.execute("ALTER TABLE doc ALTER body SET STORAGE EXTERNAL")
    _wal(database)
    with database.connect(autocommit=True) as conn:
        conn.execute("INSERT INTO doc VALUES (1, %s, 0)", (big,))
        conn.execute("UPDATE doc SET n = 1 WHERE id = 1")
        _catch_up(conn)
        update = events(conn, "doc")[-1]
        assert update["op"] == "UPDATE"
        assert update["old_row"]["body"] == big
        assert update["new_row"]["body"] == big
        assert update["new_row"]["n"] == 1


def test_statements_split_where_a_row_comes_back(database: Database) -> None:
    """The WAL has no statement boundaries: the consumer starts a new statement when a row
    changes twice, so revert and as-of never see a row twice in one statement."""
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE s (id int PRIMARY KEY, v int)")
        conn.execute("INSERT INTO s VALUES (1, 0), (2, 0)")
    _wal(database)
    with database.connect(autocommit=True) as conn:
        with conn.transaction():
            conn.execute("UPDATE s SET v = 1")
            conn.execute("UPDATE s SET v = 2 WHERE id = 1")
            tx = conn.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()
        _catch_up(conn)
        rows = conn.execute(
            "SELECT stmt_id, op, row_key FROM pgwarden.event WHERE table_name = 's' "
            "AND op = 'UPDATE' ORDER BY stmt_id, pos"
        ).fetchall()
        assert rows[0][0] == rows[1][0]  # the two rows of the first UPDATE
        assert rows[2][0] > rows[1][0]  # row 1 again: a statement of its own
        revert(conn, int(tx[0]))  # type: ignore[index]
        assert conn.execute("SELECT v FROM s ORDER BY id").fetchall() == [(0,), (0,)]
        _catch_up(conn)
        assert events(conn, "s")[-1]["context"].startswith("revert of tx")


def test_truncate_keeps_the_rows_it_removed(database: Database) -> None:
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE tr (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO tr VALUES (1, 'a')")
    _wal(database)
    with database.connect(autocommit=True) as conn:
        conn.execute("INSERT INTO tr VALUES (2, 'b')")
        conn.execute("UPDATE tr SET v = 'a2' WHERE id = 1")
        with conn.transaction():
            conn.execute("TRUNCATE tr")
            tx = conn.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()
        conn.execute("INSERT INTO tr VALUES (3, 'c')")
        _catch_up(conn)
        got = events(conn, "tr")
        removed = sorted(e["old_row"]["v"] for e in got if e["op"] == "TRUNCATE")
        assert removed == ["a2", "b"]
        now = conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
        assert [r["v"] for r in as_of(conn, TableName("public", "tr"), now)] == ["c"]
        conn.execute("DELETE FROM tr")
        revert(conn, int(tx[0]))  # type: ignore[index]
        assert conn.execute("SELECT v FROM tr ORDER BY id").fetchall() == [("a2",), ("b",)]


def test_schema_changes_follow_the_stream(database: Database) -> None:
    """Changes committed before an ALTER TABLE but consumed after it are written in the shape
    they were made in: the history table switches at the DDL's place in the stream."""
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE sc (id int PRIMARY KEY, amount int, gone text)")
    _wal(database)
    with database.connect(autocommit=True) as conn:
        conn.execute("INSERT INTO sc VALUES (1, 10, 'g1')")
        # nothing consumed yet: these DDLs run while the INSERT is still in the slot only
        conn.execute("ALTER TABLE sc ALTER amount TYPE numeric(12,2)")
        conn.execute("ALTER TABLE sc DROP COLUMN gone")
        conn.execute("ALTER TABLE sc RENAME amount TO total")
        conn.execute("ALTER TABLE sc ADD COLUMN note text")
        conn.execute("INSERT INTO sc VALUES (2, 20.25, 'n2')")
        conn.execute("UPDATE sc SET total = 11.5 WHERE id = 1")
        _catch_up(conn)
        got = events(conn, "sc")
        assert got[0]["new_row"] == {"id": 1, "total": 10, "gone": "g1"}
        assert got[1]["new_row"] == {"id": 2, "total": 20.25, "note": "n2"}
        assert got[2]["old_row"] == {"id": 1, "total": 10.00, "note": None}
        assert got[2]["new_row"]["total"] == 11.5
        placeholders = conn.execute(
            "SELECT count(*) FROM pgwarden.logged_column WHERE since < 0 OR until < 0"
        ).fetchone()
        assert placeholders == (0,)


def test_table_dropped_before_its_changes_are_consumed(database: Database) -> None:
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE dropme (id int PRIMARY KEY, v text)")
    _wal(database)
    with database.connect(autocommit=True) as conn:
        conn.execute("INSERT INTO dropme VALUES (1, 'kept')")
        conn.execute("DROP TABLE dropme")
        _catch_up(conn)
        got = events(conn, "dropme")
        assert [(e["op"], e["new_row"]) for e in got] == [("INSERT", {"id": 1, "v": "kept"})]


def test_ddl_that_would_cut_capture_short_is_refused(database: Database) -> None:
    """Taking a captured table out of the publication, dropping the publication or lowering
    the table's replica identity would make history silently incomplete: refused, superusers
    included. A superuser who disables the DDL event trigger can still do it; verify sees it."""
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE pv (id int PRIMARY KEY)")
        conn.execute("CREATE TABLE other (id int PRIMARY KEY)")
    _wal(database, "public.pv")
    with database.connect(autocommit=True) as conn:
        assert verify(conn).ok
        refused = [
            "ALTER PUBLICATION pgwarden_capture DROP TABLE pv",
            "ALTER PUBLICATION pgwarden_capture SET TABLE other",
            "ALTER PUBLICATION pgwarden_capture SET (publish = 'insert, update')",
            "ALTER TABLE pv REPLICA IDENTITY DEFAULT",
            "DROP PUBLICATION pgwarden_capture",
        ]
        for statement in refused:
            with pytest.raises(psycopg.errors.DatabaseError, match="history capture"):
                conn.execute(statement)
        conn.execute("ALTER TABLE other REPLICA IDENTITY FULL")  # not captured: its owner's
        conn.execute("ALTER TABLE pv ADD COLUMN note text")  # schema changes go on
        assert verify(conn).ok

        conn.execute("ALTER EVENT TRIGGER pgwarden_ddl_end DISABLE")
        conn.execute("ALTER TABLE pv REPLICA IDENTITY DEFAULT")
        conn.execute("ALTER EVENT TRIGGER pgwarden_ddl_end ENABLE ALWAYS")
        report = verify(conn)
        assert [(p.table, p.kind) for p in report.problems] == [
            ("public.pv", "wal-capture-partial")
        ]


def test_leaving_wal_capture_puts_the_replica_identity_back(database: Database) -> None:
    """WAL capture makes a table's replica identity FULL; untracking it, or switching it to
    triggers, puts back what it had (its index, NOTHING or the default), and a table that was
    FULL already stays so."""
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE ri_idx (id int NOT NULL, v text)")
        conn.execute("CREATE UNIQUE INDEX ri_idx_id ON ri_idx (id)")
        conn.execute("ALTER TABLE ri_idx REPLICA IDENTITY USING INDEX ri_idx_id")
        conn.execute("CREATE TABLE ri_def (id int PRIMARY KEY)")
        conn.execute("CREATE TABLE ri_full (id int PRIMARY KEY)")
        conn.execute("ALTER TABLE ri_full REPLICA IDENTITY FULL")

    def identity(conn: psycopg.Connection[Any]) -> dict[str, str]:
        rows = conn.execute(
            "SELECT relname, relreplident FROM pg_class WHERE relname LIKE 'ri\\_%' "
            "AND relkind = 'r' ORDER BY 1"
        ).fetchall()
        return {str(name): str(kind) for name, kind in rows}

    _wal(database, "public.ri_*")
    with database.connect(autocommit=True) as conn:
        assert identity(conn) == {"ri_def": "f", "ri_full": "f", "ri_idx": "f"}
    setup_history(database.url, history_config("public.ri_*", capture="trigger"))
    with database.connect(autocommit=True) as conn:
        assert identity(conn) == {"ri_def": "d", "ri_full": "f", "ri_idx": "i"}
    _wal(database, "public.ri_*")
    setup_history(database.url, history_config("nothing.*"))  # untracks them
    with database.connect(autocommit=True) as conn:
        assert identity(conn) == {"ri_def": "d", "ri_full": "f", "ri_idx": "i"}
        (index,) = conn.execute(
            "SELECT indexrelid::regclass::text FROM pg_index WHERE indisreplident"
        ).fetchone() or (None,)
        assert index == "ri_idx_id"


@pytest.mark.slow
def test_consumer_killed_mid_batch_writes_every_event_once(database: Database) -> None:
    """kill -9 of `history follow` while it writes, several times: after catching up, every
    committed change is there exactly once."""
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE k (id int PRIMARY KEY, v int)")
    _wal(database)
    env = {**os.environ, "PGWARDEN_DSN": database.url}
    committed = written = killed_between = 0
    with database.connect(autocommit=True) as conn:
        for _ in range(4):
            for _ in range(20):
                with conn.transaction():
                    conn.execute(
                        "INSERT INTO k SELECT g, 0 FROM generate_series(%s::int, %s::int) g",
                        (committed + 1, committed + 500),
                    )
                committed += 500
            follower = subprocess.Popen(
                [sys.executable, "-m", "pgwarden", "history", "follow", "--batch", "700"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            # killed as soon as it has written something, so mostly in the middle of its work
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and _written(conn) <= written:
                time.sleep(0.01)
            follower.send_signal(signal.SIGKILL)
            follower.wait()
            assert _written(conn) > written, "the consumer wrote nothing before it was killed"
            written = _written(conn)
            killed_between += written < committed
        _catch_up(conn)
        counts = conn.execute(
            "SELECT count(*), count(DISTINCT (new_row->>'id')) FROM pgwarden.event "
            "WHERE table_name = 'k' AND op = 'INSERT'"
        ).fetchone()
        assert counts == (committed, committed)
        assert killed_between > 0  # at least one kill left work behind for the next one


def _written(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM pgwarden.rows_1").fetchone()
    return int(row[0]) if row else 0


def test_up_runs_the_consumer_and_down_stops_it(run: Run, tmp_path: Path, pg_bin: Path) -> None:
    """`up` with history.capture: wal sets wal_level = logical and starts the consumer beside
    the server: history fills without any reader; `down` stops the consumer first."""
    (tmp_path / "pgwarden.yaml").write_text(
        "history:\n  tables: ['public.*']\n  capture: wal\n  wal_lag_alarm: 1MB\n"
    )
    port = free_port()
    result = run("up", "--port", str(port), "--pg-bin", str(pg_bin))
    try:
        assert result.code == 0, result.err
        assert "WAL capture consumer started" in result.err
        state = StateDir(tmp_path / ".pgwarden")
        pid = consumer.running_pid(state)
        assert pid is not None
        url = result.out.strip()
        with psycopg.connect(url, autocommit=True) as conn:
            assert conn.execute("SHOW wal_level").fetchone() == ("logical",)
            conn.execute("CREATE TABLE live (id int PRIMARY KEY)")  # tracked at its CREATE
            conn.execute("INSERT INTO live VALUES (1), (2)")
            deadline = time.monotonic() + 30
            written = 0
            while time.monotonic() < deadline and written < 2:
                row = conn.execute("SELECT count(*) FROM pgwarden.rows_1").fetchone()
                written = int(row[0]) if row else 0
                time.sleep(0.1)
            assert written == 2  # by the consumer: nothing here read history
        status = run("status")
        assert f"consumer running (pid {pid})" in status.out
        assert "warns at 1.0 MB" in status.out
        assert "over history.wal_lag_alarm" not in status.out

        # fail-closed with the consumer down: the WAL the slot holds grows, and status and
        # verify say so once it passes history.wal_lag_alarm, before any disk fills.
        assert consumer.stop(state)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE bulk (id int PRIMARY KEY, pad text)")
            conn.execute(
                "INSERT INTO bulk SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g"
            )
        status = run("status")
        assert "over history.wal_lag_alarm (1.0 MB)" in status.out
        assert "fail-closed: writes stop when the disk is full" in status.out
        data = json.loads(run("status", "-o", "json").out)
        slot = data["wal_capture"]["slot"]
        assert slot["alarming"]
        assert slot["retained_bytes"] > slot["alarm_bytes"] == 1 << 20
        assert data["wal_capture"]["consumer_pid"] is None
        checked = run("verify", "--quick")
        assert checked.code == 1
        assert "over history.wal_lag_alarm" in checked.out
        again = run("up", "--port", str(port), "--pg-bin", str(pg_bin))
        assert "WAL capture consumer started" in again.err  # up brings a dead consumer back
    finally:
        down = run("down")
    assert "stopped the WAL capture consumer" in down.err
    assert consumer.running_pid(StateDir(tmp_path / ".pgwarden")) is None


def test_fail_open_records_the_gap_of_a_lost_slot_and_resumes(tmp_path: Path, pg_bin: Path) -> None:
    """fail-open: the server may drop WAL the slot holds (max_slot_wal_keep_size). History then
    has a gap, recorded with its bounds and reported by verify, never a silent one; capture
    resumes with a fresh slot and a new snapshot, and what follows is recorded again."""
    config = Config.model_validate(
        {
            "history": {
                "tables": ["public.*"],
                "capture": "wal",
                "mode": "fail-open",
                "wal_keep_size": "1MB",
            }
        }
    )
    server = LocalServer(config, tmp_path / ".pgwarden", pg_bin=pg_bin, port=free_port())
    try:
        bring_up(server)
        with psycopg.connect(server.url(), autocommit=True) as conn:
            assert conn.execute("SHOW max_slot_wal_keep_size").fetchone() == ("1MB",)
            conn.execute("CREATE TABLE g (id int PRIMARY KEY, v text)")
            conn.execute("INSERT INTO g VALUES (1, 'before')")
            wal.catch_up(conn, DEFAULT_SCHEMA)
            held = walstate.lag(conn, DEFAULT_SCHEMA)
            assert held is not None
            assert held.safe is not None
            assert "before fail-open drops it" in held.summary()
            conn.execute("INSERT INTO g VALUES (2, 'lost')")  # never read before the slot goes
            for _ in range(4):  # move past the slot's allowance, segment by segment
                conn.execute("CREATE TABLE IF NOT EXISTS filler (x int)")
                conn.execute("INSERT INTO filler SELECT generate_series(1, 1000)")
                conn.execute("SELECT pg_switch_wal()")
            conn.execute("CHECKPOINT")
            assert conn.execute("SELECT wal_status FROM pg_replication_slots").fetchone() == (
                "lost",
            )
            caught = wal.catch_up(conn, DEFAULT_SCHEMA)
            assert caught.resumed
            conn.execute("INSERT INTO g VALUES (3, 'after')")
            report = verify(conn)
            gaps = [p for p in report.problems if p.kind == "wal-gap"]
            assert len(gaps) == 1
            assert "no history from WAL" in gaps[0].detail
            got = events(conn, "g")
            assert [(e["op"], e["new_row"]["id"]) for e in got] == [
                ("INSERT", 1),
                ("SNAPSHOT", 1),
                ("SNAPSHOT", 2),  # the lost INSERT's row, known again from the snapshot
                ("INSERT", 3),
            ]
            assert conn.execute("SELECT wal_status FROM pg_replication_slots").fetchone() in (
                ("reserved",),
                ("extended",),
            )
    finally:
        server.purge()


def test_values_come_through_exactly(database: Database) -> None:
    """Every value as PostgreSQL holds it: text that COPY would read as something else (tab,
    line breaks, backslashes, a literal \\N, empty), NULL, exact numbers, bytes, JSON null."""
    tricky = ["a\tb", "line1\nline2\r\n", "back\\slash", "\\N", "", "\\u", None]
    with database.connect(autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE v (id int PRIMARY KEY, t text, n numeric, b bytea, j jsonb, f float8)"
        )
    _wal(database)
    with database.connect(autocommit=True) as conn:
        for i, text in enumerate(tricky):
            conn.execute(
                "INSERT INTO v VALUES (%s, %s, 12345678901234567.0123456789, '\\x00ff5c', "
                "CASE WHEN %s THEN 'null'::jsonb END, 1.5e300)",
                (i, text, i % 2 == 0),
            )
        now = conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
        rows = {r["id"]: r for r in as_of(conn, TableName("public", "v"), now)}
        for i, text in enumerate(tricky):
            assert rows[i]["t"] == text, i
            assert str(rows[i]["n"]) == "12345678901234567.0123456789"
            assert rows[i]["b"] == "\\x00ff5c"
            assert rows[i]["j"] == ("null" if i % 2 == 0 else None)
        into = TableName("public", "v_then")
        as_of_into(conn, TableName("public", "v"), now, into)
        same = conn.execute(
            "SELECT count(*) FROM v JOIN v_then w USING (id) "
            "WHERE v.t IS NOT DISTINCT FROM w.t AND v.n = w.n AND v.b = w.b "
            "AND v.j IS NOT DISTINCT FROM w.j AND v.f = w.f"
        ).fetchone()
        assert same == (len(tricky),)


def test_the_slot_moves_on_past_other_writes(database: Database) -> None:
    """While the tracked tables are quiet, other writes still fill the WAL: a tick lets the
    slot follow (it moves only to records it has decoded, never past a commit it has not)."""
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE quiet (id int PRIMARY KEY)")
        conn.execute("CREATE TABLE busy (id int)")  # matches public.* too: excluded below
    _wal(database, "public.quiet")
    with database.connect(autocommit=True) as conn:
        conn.execute("INSERT INTO busy SELECT generate_series(1, 50000)")
        before = _confirmed(conn)
        mark = wal.tick(conn)
        conn.execute("CHECKPOINT")  # flushed, as the walwriter would soon
        _catch_up(conn)
        assert _confirmed(conn) >= mark > before


def _confirmed(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(
        "SELECT pg_wal_lsn_diff(confirmed_flush_lsn, '0/0')::bigint FROM pg_replication_slots "
        "WHERE database = current_database()"
    ).fetchone()
    return int(row[0]) if row else 0


def test_switching_engines_keeps_every_change_in_order(database: Database) -> None:
    """trigger → wal → trigger through the config: each change recorded once, in order, and
    the slot dropped by the apply that switched the last table back (nothing left in it)."""
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE sw (id int PRIMARY KEY, v int)")
    setup_history(database.url, history_config())
    with database.connect(autocommit=True) as conn:
        conn.execute("INSERT INTO sw VALUES (1, 0)")  # by the trigger
    _wal(database)
    with database.connect(autocommit=True) as conn:
        assert _triggers(conn, "sw") == []
        conn.execute("UPDATE sw SET v = 1")  # from the WAL; nobody reads it before the switch
    setup_history(database.url, history_config())
    with database.connect(autocommit=True) as conn:
        conn.execute("UPDATE sw SET v = 2")  # by the trigger again
        assert conn.execute("SELECT count(*) FROM pg_replication_slots").fetchone() == (0,)
        got = [(e["op"], (e["new_row"] or {}).get("v")) for e in events(conn, "sw")]
        assert got == [("INSERT", 0), ("UPDATE", 1), ("UPDATE", 2)]


def test_apply_converges_and_check_sees_drift(database: Database) -> None:
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE cv (id int PRIMARY KEY)")
    config = history_config(capture="wal")
    setup_history(database.url, config)
    with database.connect() as conn:
        assert not apply_config(conn, config)  # nothing left to do
        if conn.info.server_version >= 160000:  # the consumer may log running-xacts records
            row = conn.execute(
                "SELECT has_function_privilege('pgwarden_owner', "
                "'pg_log_standby_snapshot()', 'EXECUTE')"
            ).fetchone()
            assert row == (True,)
        # Drift the DDL guard would refuse: made with history's event trigger off.
        conn.execute("ALTER EVENT TRIGGER pgwarden_ddl_end DISABLE")
        conn.execute("ALTER TABLE cv REPLICA IDENTITY DEFAULT")
        conn.execute("ALTER EVENT TRIGGER pgwarden_ddl_end ENABLE ALWAYS")
        conn.commit()
        again = apply_config(conn, config)
        assert [op.description for op in again] == ["repair its triggers on public.cv"]
        row = conn.execute("SELECT relreplident FROM pg_class WHERE relname = 'cv'").fetchone()
        assert row == ("f",)


def test_the_kubernetes_consumer_waits_for_setup_then_follows(
    database: Database, tmp_path: Path
) -> None:
    """The consumer as Kubernetes runs it (the rendered command, config file and environment):
    started before the server has WAL capture set up, it waits instead of exiting, then follows
    once `apply` (or the bootstrap SQL) has made the slot, and stops cleanly on SIGTERM."""
    config = Config.model_validate(
        {
            "database": database.name,
            "history": {"tables": ["public.*"], "capture": "wal"},
            "kubernetes": {"tools_image": "registry.example/pgwarden:test"},
        }
    )
    container = kube_consumer.sidecar(config, security={})
    (tmp_path / "consumer").mkdir()
    config_file = tmp_path / "consumer" / "pgwarden.yaml"
    config_file.write_text(kube_consumer.config_map(config)["data"]["pgwarden.yaml"])
    command = [
        arg.replace(kube_consumer.CONFIG_MOUNT, str(config_file.parent))
        for arg in container["command"]
    ]
    assert command[0] == "pgwarden"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert "password" not in env["PGWARDEN_DSN"]  # peer authentication over the pod's socket
    env["PGWARDEN_DSN"] = database.url  # here: the test server, over TCP
    env["HOME"] = str(tmp_path)
    process = subprocess.Popen(
        [sys.executable, "-m", "pgwarden", *command[1:]],
        env={**os.environ, **env},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(2)
        assert process.poll() is None  # waiting, not failed
        _wal(database)
        with database.connect(autocommit=True) as conn:
            conn.execute("CREATE TABLE k (id int PRIMARY KEY)")
            conn.execute("INSERT INTO k VALUES (1), (2), (3)")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and _written(conn) < 3:
                time.sleep(0.2)
            assert _written(conn) == 3  # the consumer wrote them: nothing here read history
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "waiting for WAL capture to be set up" in err
    assert "following the WAL into history" in err


def test_switching_engines_waits_for_an_analyze_instead_of_deadlocking(
    database: Database,
) -> None:
    """An ANALYZE (autovacuum's, say) that holds a table while `apply` switches its engine: the
    switch waits for it, rather than update the table's catalog row (GRANT) first and then
    queue behind the ANALYZE, whose own catalog update would wait for the switch."""
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE busy (id int PRIMARY KEY)")
        conn.execute("INSERT INTO busy SELECT generate_series(1, 1000)")
    _wal(database, "public.busy")
    with database.connect() as analyzer, database.connect(autocommit=True) as conn:
        analyzer.execute("LOCK TABLE busy IN SHARE UPDATE EXCLUSIVE MODE")  # as ANALYZE holds it
        failure: list[BaseException] = []

        def switch() -> None:
            try:
                conn.execute(
                    "SELECT pgwarden.track('busy'::regclass, 'fail-closed', '{}', 'rows', "
                    "'config', 'trigger')"
                )
            except BaseException as exc:
                failure.append(exc)

        worker = threading.Thread(target=switch)
        worker.start()
        time.sleep(1)  # the switch is waiting for the table now
        analyzer.execute("ANALYZE busy")  # updates busy's catalog row in place
        analyzer.commit()
        worker.join(timeout=30)
        assert not worker.is_alive()
        assert failure == []
        row = conn.execute("SELECT capture FROM pgwarden.tracked").fetchone()
        assert row == ("trigger",)


def test_a_database_not_in_utf8_is_refused_with_a_clear_message(
    database: Database, run: Run
) -> None:
    """The consumer reads pgoutput's text as UTF-8: WAL capture of a LATIN1 database would
    garble values, so `plan` refuses it and says what to do instead. Triggers work there (the
    shipped SQL is ASCII: a '…' in a comment once made the install fail in LATIN1)."""
    name = f"{database.name}_latin1"
    with psycopg.connect(database.admin_url, autocommit=True) as admin:
        admin.execute(
            f"CREATE DATABASE \"{name}\" ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' "
            "TEMPLATE template0"
        )
    try:
        url = database.url.rsplit("/", 1)[0] + "/" + name
        with pytest.raises(ConfigError, match="needs a UTF8 database, and this one is LATIN1"):
            setup_history(url, history_config(capture="wal"))
        setup_history(url, history_config())  # triggers are fine there
        # As pgwarden connects: in UTF8 (psycopg reads JSON as UTF-8 in any encoding).
        with psycopg.connect(url, autocommit=True, client_encoding="UTF8") as conn:
            conn.execute("CREATE TABLE l1 (id int PRIMARY KEY, name text)")
            conn.execute("INSERT INTO l1 VALUES (1, 'café crème')")
            assert [e["new_row"]["name"] for e in events(conn, "l1")] == ["café crème"]
        shown = run("--dsn", url, "history", "public.l1", "--format", "json")
        assert shown.code == 0, shown.err
        assert "café crème" in json.dumps(json.loads(shown.out), ensure_ascii=False)
    finally:
        with psycopg.connect(database.admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
