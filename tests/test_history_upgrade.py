"""Upgrading in place: a database whose history was written by pgwarden 0.1 (one JSON event
table; its SQL is kept in tests/fixtures) is upgraded by `apply`, and keeps every event."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import psycopg
from psycopg import sql

import pgwarden
from pgwarden.history import EventFilter, TableName, as_of, events, revert, verify
from tests.conftest import Database
from tests.history_helpers import history_config, setup_history

FIXTURES = Path(__file__).parent / "fixtures"
Conn = psycopg.Connection[tuple[object, ...]]


def _install_release_01(conn: Conn) -> None:
    """What pgwarden 0.1's `apply` ran: its history.sql and ddl.sql, then monthly partitions."""
    names = {
        "schema": sql.Identifier("pgwarden"),
        "owner": sql.Identifier("pgwarden_owner"),
        "schema_name": sql.Literal("pgwarden"),
    }
    conn.execute(
        "DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pgwarden_owner') "
        "THEN CREATE ROLE pgwarden_owner NOLOGIN; END IF; END$$"
    )
    with conn.transaction():
        for name, key in (
            ("release-0.1-history.sql", "version"),
            ("release-0.1-ddl.sql", "ddl_version"),
        ):
            conn.execute(sql.SQL((FIXTURES / name).read_text()).format(**names))  # type: ignore[arg-type]
            conn.execute(
                "INSERT INTO pgwarden.meta VALUES (%s, 'release-0.1') "
                "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                (key,),
            )
        conn.execute("SELECT pgwarden.ensure_partitions(3)")


def _old_events(conn: Conn) -> Counter[str]:
    rows = conn.execute(
        "SELECT schema_name, table_name, op, old_row, new_row FROM pgwarden.event"
    ).fetchall()
    return Counter(json.dumps(list(r), sort_keys=True, default=str) for r in rows)


def _new_events(conn: Conn) -> Counter[str]:
    rows = conn.execute(
        "SELECT schema_name, table_name, op, old_row::jsonb, new_row::jsonb FROM pgwarden.event"
    ).fetchall()
    return Counter(json.dumps(list(r), sort_keys=True, default=str) for r in rows)


def test_history_of_release_01_is_upgraded_in_place(database: Database) -> None:
    with database.connect(autocommit=True) as conn:
        _install_release_01(conn)
        conn.execute("CREATE TABLE acct (id int PRIMARY KEY, owner text, balance numeric)")
        conn.execute(
            "CREATE TABLE kept (id int PRIMARY KEY, amount_old numeric, gone text, code text)"
        )
        conn.execute("CREATE TABLE bye (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO acct VALUES (1, 'ann', 12345678901234567.0123456789)")
        for table in ("acct", "kept", "bye"):
            conn.execute("SELECT pgwarden.track(%s::regclass)", (table,))
        # History as 0.1 wrote it: every kind of change, and schema changes since.
        conn.execute("INSERT INTO acct VALUES (2, 'bob', 10), (3, 'cy', 0.5)")
        conn.execute("UPDATE acct SET balance = balance + 1 WHERE id <= 2")
        conn.execute("UPDATE acct SET id = 30 WHERE id = 3")  # a key move
        conn.execute("DELETE FROM acct WHERE id = 2")
        conn.execute("INSERT INTO kept VALUES (1, 5, 'x', 'abc'), (2, 6, 'y', '12')")
        conn.execute("UPDATE kept SET amount_old = 7 WHERE id = 1")
        conn.execute("INSERT INTO bye VALUES (1, 'a')")
        conn.execute("TRUNCATE bye")
        # A statement 0.1 deferred, its events not yet written when the upgrade comes.
        conn.execute("SET pgwarden.defer_rows = 2")
        conn.execute("INSERT INTO acct VALUES (4, 'dee', 4), (5, 'eve', 5)")
        conn.execute("RESET pgwarden.defer_rows")
        conn.execute("SELECT pgwarden.materialize()")
        conn.execute("SET pgwarden.defer_rows = 2")
        conn.execute("INSERT INTO acct VALUES (6, 'fay', 6), (7, 'gus', 7)")  # still pending
        conn.execute("RESET pgwarden.defer_rows")
        # After those events: a column renamed, one dropped, one retyped (its old values do not
        # all fit the new type), a table dropped.
        conn.execute("ALTER TABLE kept RENAME COLUMN amount_old TO amount")
        conn.execute("ALTER TABLE kept DROP COLUMN gone")
        conn.execute("UPDATE kept SET code = '99' WHERE id = 1")
        conn.execute("DROP TABLE bye")
        # (read without materialize(): the pending statement stays pending)
        before = _old_events(conn)
        old_count = conn.execute("SELECT count(*) FROM pgwarden.event").fetchone()
        acct_now = conn.execute("SELECT * FROM acct ORDER BY id").fetchall()
        moment = conn.execute("SELECT clock_timestamp()").fetchone()
    assert old_count is not None
    assert moment is not None

    setup_history(database.url, history_config("public.*"))  # the upgrade: `pgwarden apply`

    with database.connect(autocommit=True) as conn:
        after = _new_events(conn)
        new_count = conn.execute("SELECT count(*) FROM pgwarden.event").fetchone()
        # Every 0.1 event is there, with the same images (the pending deferred statement's
        # two INSERTs were written by the migration and come on top).
        pending = Counter({
            json.dumps(["public", "acct", "INSERT", None, {"id": i, "owner": o, "balance": i}],
                       sort_keys=True): 1
            for i, o in ((6, "fay"), (7, "gus"))
        })  # fmt: skip
        assert new_count == (int(str(old_count[0])) + 2,)
        # The column renamed since comes under its name now (0.1's DDL log says which it was);
        # the dropped one under the name it had.
        renamed = Counter({k.replace('"amount_old"', '"amount"'): v for k, v in before.items()})
        assert after == renamed + pending
        # The exact number, as numeric, not through a float.
        with conn.transaction():
            first = next(iter(events(conn, EventFilter(table=TableName("public", "acct")))))
        assert str(first.new["balance"]) == "12345678901234567.0123456789"
        # The dropped table's history is still readable, by its name.
        with conn.transaction():
            bye = [e.op for e in events(conn, EventFilter(table=TableName("public", "bye")))]
        assert bye == ["INSERT", "TRUNCATE"]  # tracked while empty: no snapshot rows
        # Capture goes on, in the new layout, and reading works across the upgrade.
        conn.execute("UPDATE acct SET balance = 0 WHERE id = 1")
        row = conn.execute("SELECT schema_version FROM (SELECT value AS schema_version FROM "
                           "pgwarden.meta WHERE key = 'schema_version') m").fetchone()  # fmt: skip
        assert row == ("4",)
        rebuilt = as_of(conn, TableName("public", "acct"), moment[0])
        assert sorted((r["id"], r["owner"]) for r in rebuilt) == [(r[0], r[1]) for r in acct_now]
        assert verify(conn).ok, verify(conn).problems
        # A transaction recorded by 0.1 can be reverted after the upgrade.
        tx = conn.execute(
            "SELECT tx FROM pgwarden.event WHERE table_name = 'acct' AND op = 'DELETE'"
        ).fetchone()
        assert tx is not None
        revert(conn, int(str(tx[0])))
        assert conn.execute("SELECT owner FROM acct WHERE id = 2").fetchone() == ("bob",)
        # Nothing of 0.1's storage is left.
        leftovers = conn.execute(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'pgwarden' AND (c.relname LIKE 'event_p%' OR c.relname LIKE "
            "'spool\\_%' OR c.relname IN ('deferred', 'table_event', 'event_default'))"
        ).fetchone()
        assert leftovers == (0,)


def test_shipped_sql_is_ascii() -> None:
    """The shipped SQL goes to databases in any encoding (LATIN1 included): a character
    outside ASCII, even in a comment, makes the install fail there."""
    root = Path(pgwarden.__file__).parent / "sql"
    offenders = [
        f"{path.relative_to(root)}:{n}"
        for path in sorted(root.rglob("*.sql"))
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if not line.isascii()
    ]
    assert offenders == []
