"""Recording: what lands in history for each kind of change, on real PostgreSQL."""

from __future__ import annotations

import psycopg
import pytest

from pgwarden.config import Config
from pgwarden.converge import build_plan
from pgwarden.history import EventFilter, TableName, set_actor
from pgwarden.history import events as read_events
from tests.conftest import Database
from tests.history_helpers import events, history_config, setup_history

BIG = TableName("public", "big")


def test_seed_scenario_insert_update_delete(database: Database) -> None:
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE test_table (id int PRIMARY KEY, name text)")
        conn.execute("INSERT INTO test_table VALUES (1, 'Test Data')")
    setup_history(database.url)
    with database.connect(autocommit=True) as conn:
        conn.execute("INSERT INTO test_table VALUES (2, 'New Data')")
        conn.execute("UPDATE test_table SET name = 'Changed' WHERE id = 1")
        conn.execute("DELETE FROM test_table WHERE id = 2")
        got = [(e["op"], e["row_key"], e["old_row"], e["new_row"]) for e in events(conn)]
    assert got == [
        ("SNAPSHOT", {"id": 1}, None, {"id": 1, "name": "Test Data"}),
        ("INSERT", {"id": 2}, None, {"id": 2, "name": "New Data"}),
        ("UPDATE", {"id": 1}, {"id": 1, "name": "Test Data"}, {"id": 1, "name": "Changed"}),
        ("DELETE", {"id": 2}, {"id": 2, "name": "New Data"}, None),
    ]


def test_who_and_transaction_are_recorded(database: Database) -> None:
    setup_history(database.url)
    with database.connect() as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        conn.commit()
        with conn.transaction():
            set_actor(conn, "alice@example.com", context={"request": "r-1"})
            conn.execute("SET LOCAL application_name = 'billing'")
            conn.execute("INSERT INTO t VALUES (1, 'a'), (2, 'b')")
            tx = conn.execute("SELECT pg_current_xact_id()::text").fetchone()
        conn.execute("INSERT INTO t VALUES (3, 'c')")  # new transaction, no actor
        conn.commit()
        rows = conn.execute(
            "SELECT app_user, context, application, db_user, role_name, host(client_addr), "
            "tx::text, tx_at <= now() FROM pgwarden.event WHERE op = 'INSERT' "
            "ORDER BY stmt_id, pos"
        ).fetchall()
        # Who and when once per transaction: one tx row for the first two events.
        contexts = conn.execute(
            "SELECT count(DISTINCT ctx) FROM pgwarden.event WHERE op = 'INSERT'"
        ).fetchone()
    assert tx is not None
    assert rows[0] == ("alice@example.com", '{"request": "r-1"}', "billing", "postgres",
                       "postgres", "127.0.0.1", tx[0], True)  # fmt: skip
    assert rows[1][:2] == ("alice@example.com", '{"request": "r-1"}')
    assert rows[2][0] is None  # transaction-local: gone after commit
    assert rows[2][1] is None
    assert contexts == (2,)


def test_actor_change_inside_a_transaction_opens_a_new_context(database: Database) -> None:
    setup_history(database.url)
    with database.connect() as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        conn.commit()
        with conn.transaction():
            set_actor(conn, "alice")
            conn.execute("INSERT INTO t VALUES (1)")
            conn.execute("INSERT INTO t VALUES (2)")
            set_actor(conn, "bob")
            conn.execute("INSERT INTO t VALUES (3)")
            # A savepoint that opened a context and rolled back takes the context with it.
            with pytest.raises(psycopg.errors.UniqueViolation):
                conn.execute("SAVEPOINT s; SELECT set_config('pgwarden.actor', 'carol', true); "
                             "INSERT INTO t VALUES (4); INSERT INTO t VALUES (4)")  # fmt: skip
            conn.execute("ROLLBACK TO SAVEPOINT s")
            conn.execute("INSERT INTO t VALUES (5)")
        rows = conn.execute(
            "SELECT row_key->>'id', app_user FROM pgwarden.event ORDER BY stmt_id"
        ).fetchall()
        dangling = conn.execute(  # the snapshot of the empty table has its own, in `reset`
            "SELECT count(*) FROM pgwarden.tx x WHERE NOT EXISTS "
            "(SELECT 1 FROM pgwarden.event e WHERE e.ctx = x.id) "
            "AND NOT EXISTS (SELECT 1 FROM pgwarden.reset r WHERE r.ctx = x.id)"
        ).fetchone()
    assert rows == [("1", "alice"), ("2", "alice"), ("3", "bob"), ("5", "bob")]
    assert dangling == (0,)


def test_set_role_is_recorded_as_the_acting_role(database: Database) -> None:
    setup_history(database.url)
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        conn.execute("DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'hist_clerk') "
                     "THEN CREATE ROLE hist_clerk; END IF; END$$")  # fmt: skip
        conn.execute("GRANT INSERT ON t TO hist_clerk")
        conn.execute("SET ROLE hist_clerk")
        conn.execute("INSERT INTO t VALUES (1)")
        conn.execute("RESET ROLE")
        row = conn.execute("SELECT db_user, role_name FROM pgwarden.event").fetchone()
    assert row == ("postgres", "hist_clerk")


def test_multi_row_update_changing_keys_pairs_rows(database: Database) -> None:
    setup_history(database.url)
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, tag text UNIQUE)")
        conn.execute("INSERT INTO t SELECT g, 'row-' || g FROM generate_series(1, 500) g")
        # Shift every key (descending order avoids transient duplicates): each old row must be
        # paired with its own new row.
        conn.execute("ALTER TABLE t DROP CONSTRAINT t_pkey")
        conn.execute("ALTER TABLE t ADD PRIMARY KEY (id) DEFERRABLE INITIALLY DEFERRED")
        conn.execute("UPDATE t SET id = id + 1000")
        rows = conn.execute(
            "SELECT old_row, new_row, row_key FROM pgwarden.event WHERE op = 'UPDATE'"
        ).fetchall()
    assert len(rows) == 500
    for old, new, key in rows:
        assert old["tag"] == new["tag"]
        assert new["id"] == old["id"] + 1000
        assert key == {"id": new["id"]}


def test_composite_keys(database: Database) -> None:
    setup_history(database.url)
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE t (a int, b text, v int, PRIMARY KEY (b, a))")
        conn.execute("INSERT INTO t VALUES (1, 'x', 0)")
        conn.execute("UPDATE t SET v = 1")
        keys = [e["row_key"] for e in events(conn)]
    assert keys == [{"a": 1, "b": "x"}, {"a": 1, "b": "x"}]


def test_excluded_columns_and_noop_updates(database: Database) -> None:
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE users (id int PRIMARY KEY, name text, password_hash text)")
    setup_history(
        database.url,
        history_config("public.*", exclude_columns={"public.users": ["password_hash"]}),
    )
    with database.connect(autocommit=True) as conn:
        conn.execute("INSERT INTO users VALUES (1, 'ann', 'secret-hash-1')")
        conn.execute("UPDATE users SET password_hash = 'secret-hash-2'")  # only excluded
        conn.execute("UPDATE users SET name = name")  # nothing changed
        conn.execute("UPDATE users SET name = 'anne'")
        rows = events(conn)
        dump = conn.execute("SELECT string_agg(e::text, '') FROM pgwarden.event e").fetchone()
    assert [e["op"] for e in rows] == ["INSERT", "UPDATE"]
    assert rows[1]["old_row"] == {"id": 1, "name": "ann"}
    assert dump is not None
    assert "secret-hash" not in dump[0]


def test_truncate_records_rows_or_a_marker(database: Database) -> None:
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
        conn.execute("CREATE TABLE b (id int PRIMARY KEY)")
    config = history_config("public.*", overrides={"public.b": {"truncate": "marker"}})
    setup_history(database.url, config)
    with database.connect(autocommit=True) as conn:
        conn.execute("INSERT INTO a VALUES (1), (2)")
        conn.execute("INSERT INTO b VALUES (1), (2)")
        conn.execute("TRUNCATE a, b")
        a = [(e["op"], e["old_row"]) for e in events(conn, "a") if e["op"] == "TRUNCATE"]
        b = [(e["op"], e["old_row"]) for e in events(conn, "b") if e["op"] == "TRUNCATE"]
    assert sorted(a, key=str) == [("TRUNCATE", {"id": 1}), ("TRUNCATE", {"id": 2})]
    assert b == [("TRUNCATE", None)]


def test_rolled_back_changes_leave_no_events(database: Database) -> None:
    setup_history(database.url)
    with database.connect() as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        conn.commit()
        conn.execute("INSERT INTO t VALUES (1)")
        conn.rollback()
        assert events(conn) == []


def test_one_subtransaction_at_most_per_statement(database: Database) -> None:
    """Transaction ids used by a 10k-row UPDATE in each mode: at most 2 per statement."""
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE c (id int PRIMARY KEY, v int)")
        conn.execute("CREATE TABLE o (id int PRIMARY KEY, v int)")
    setup_history(
        database.url, history_config("public.*", overrides={"public.o": {"mode": "fail-open"}})
    )
    with database.connect(autocommit=True) as conn:
        for table in ("c", "o"):
            conn.execute(f"INSERT INTO {table} SELECT g, 0 FROM generate_series(1, 10000) g")
            before = conn.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()
            conn.execute(f"UPDATE {table} SET v = v + 1")
            after = conn.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()
            assert before is not None
            assert after is not None
            # `before` and `after` each used one id themselves; the UPDATE sits between them.
            assert after[0] - before[0] - 1 <= 2, table


def test_tables_without_primary_key(database: Database) -> None:
    """Tracked like any other: the whole row is its identity (REPLICA IDENTITY FULL)."""
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE nokey (v int, note text)")
        conn.execute("CREATE TABLE ri (v int NOT NULL)")
        conn.execute("CREATE UNIQUE INDEX ri_v ON ri (v)")
        conn.execute("ALTER TABLE ri REPLICA IDENTITY USING INDEX ri_v")
    setup_history(database.url, history_config("public.nokey", "public.ri"))
    with database.connect(autocommit=True) as conn:
        conn.execute("INSERT INTO nokey VALUES (1, 'a'), (1, 'a')")
        conn.execute("UPDATE nokey SET note = 'b'")
        conn.execute("INSERT INTO ri VALUES (7)")
        got = [(e["table_name"], e["op"], e["row_key"], e["old_row"], e["new_row"])
               for e in events(conn)]  # fmt: skip
    assert got == [
        ("nokey", "INSERT", None, None, {"v": 1, "note": "a"}),
        ("nokey", "INSERT", None, None, {"v": 1, "note": "a"}),
        ("nokey", "UPDATE", None, {"v": 1, "note": "a"}, {"v": 1, "note": "b"}),
        ("nokey", "UPDATE", None, {"v": 1, "note": "a"}, {"v": 1, "note": "b"}),
        ("ri", "INSERT", {"v": 7}, None, {"v": 7}),
    ]


def test_tables_created_later_are_tracked_and_ddl_is_logged(database: Database) -> None:
    setup_history(database.url, history_config("app_*.*"))
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE SCHEMA app_sales")
        conn.execute("CREATE TABLE app_sales.orders (id int PRIMARY KEY, total numeric)")
        conn.execute("CREATE TABLE public.elsewhere (id int PRIMARY KEY)")
        conn.execute("INSERT INTO app_sales.orders VALUES (1, 9.5)")
        conn.execute("INSERT INTO public.elsewhere VALUES (1)")
        conn.execute("ALTER TABLE app_sales.orders ADD COLUMN note text")
        tracked = conn.execute(
            "SELECT schema_name, table_name, source FROM pgwarden.tracked"
        ).fetchall()
        ddl = conn.execute(
            "SELECT command_tag, object_identity, db_user FROM pgwarden.ddl_log "
            "WHERE object_identity LIKE 'app_sales.orders%' ORDER BY id"
        ).fetchall()
        names = {e["table_name"] for e in events(conn)}
    assert tracked == [("app_sales", "orders", "rule")]
    assert names == {"orders"}
    assert ("CREATE TABLE", "app_sales.orders", "postgres") in ddl
    assert ("ALTER TABLE", "app_sales.orders", "postgres") in ddl


def test_apply_is_idempotent_and_check_detects_drift(database: Database) -> None:
    config = history_config("public.*")
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    setup_history(database.url, config)
    with database.connect() as conn:
        assert not build_plan(conn, config)
        conn.execute("ALTER TABLE t DISABLE TRIGGER pgwarden_capture_update")
        conn.commit()
        plan = build_plan(conn, config)
        assert [op.description for op in plan] == ["repair its triggers on public.t"]
    setup_history(database.url, config)
    with database.connect() as conn:
        assert not build_plan(conn, config)


def test_changing_the_config_untracks_and_keeps_history(database: Database) -> None:
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        conn.execute("INSERT INTO t VALUES (1)")
    setup_history(database.url, history_config("public.t"))
    setup_history(database.url, Config.model_validate({"history": {"tables": []}}))
    with database.connect(autocommit=True) as conn:
        conn.execute("INSERT INTO t VALUES (2)")
        assert conn.execute("SELECT count(*) FROM pgwarden.tracked").fetchone() == (0,)
        assert [e["op"] for e in events(conn)] == ["SNAPSHOT"]


def test_history_is_append_only_even_for_its_owner(database: Database) -> None:
    setup_history(database.url)
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        conn.execute("INSERT INTO t VALUES (1)")
        shadow = conn.execute(
            "SELECT shadow FROM pgwarden.logged_table WHERE table_oid = 't'::regclass"
        ).fetchone()
        assert shadow is not None
        for statement in (
            f"UPDATE pgwarden.{shadow[0]} SET op = 'X'",
            f"DELETE FROM pgwarden.{shadow[0]}",
            f"TRUNCATE pgwarden.{shadow[0]}",
            "UPDATE pgwarden.tx SET app_user = 'someone else'",
            "DELETE FROM pgwarden.tx",
            "TRUNCATE pgwarden.tx",
            "DELETE FROM pgwarden.ddl_log",
        ):
            for role in ("postgres", "pgwarden_owner"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
                    conn.execute(f"BEGIN; SET LOCAL ROLE {role}; {statement}")
                conn.execute("ROLLBACK")
        # The retention flag is no way around it for anyone but the owner.
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            conn.execute(
                f"BEGIN; SET LOCAL pgwarden.retention = on; DELETE FROM pgwarden.{shadow[0]}"
            )
        conn.execute("ROLLBACK")
        assert len(events(conn)) == 1


def test_key_change_refreshes_triggers(database: Database) -> None:
    setup_history(database.url)
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, code text NOT NULL UNIQUE)")
        conn.execute("INSERT INTO t VALUES (1, 'a')")
        conn.execute("ALTER TABLE t DROP CONSTRAINT t_pkey, ADD PRIMARY KEY (code)")
        conn.execute("UPDATE t SET id = 2")
        conn.execute("ALTER TABLE t RENAME COLUMN code TO label")
        conn.execute("UPDATE t SET id = 3")
        keys = [e["row_key"] for e in events(conn)]
        images = [e["new_row"] for e in events(conn)]
        state = conn.execute("SELECT pgwarden.trigger_state('t'::regclass)").fetchone()
    # Every event is keyed by the table's key as it is now, under the column's current name.
    assert keys == [{"label": "a"}, {"label": "a"}, {"label": "a"}]
    assert images == [{"id": 1, "label": "a"}, {"id": 2, "label": "a"}, {"id": 3, "label": "a"}]
    assert state == ("ok",)


def test_record_statement_applies_in_one_go(database: Database) -> None:
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    config = history_config("public.*", record_statement=True)
    setup_history(database.url, history_config("public.*"))
    setup_history(database.url, config)
    with database.connect(autocommit=True) as conn:
        assert not build_plan(conn, config)
        conn.execute("INSERT INTO t VALUES (42) /* marker */")
        row = conn.execute("SELECT statement FROM pgwarden.event WHERE op = 'INSERT'").fetchone()
    assert row is not None
    assert "marker" in row[0]


def test_rows_are_found_by_key(database: Database) -> None:
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE big (id int PRIMARY KEY, v int)")
        conn.execute("INSERT INTO big SELECT g, 0 FROM generate_series(1, 1500) g")  # SNAPSHOT
    setup_history(database.url)
    with database.connect(autocommit=True) as conn:
        conn.execute("UPDATE big SET v = v + 1")  # bulk
        conn.execute("UPDATE big SET v = v + 1 WHERE id <= 10")  # small
        conn.execute("INSERT INTO big SELECT g, 0 FROM generate_series(1501, 3000) g")  # bulk
        conn.execute("UPDATE big SET id = id + 10000 WHERE id > 2990")  # small, keys move
        with conn.transaction():
            one = [
                (e.op, e.old, e.new)
                for e in read_events(conn, EventFilter(table=BIG, key={"id": "5"}))
            ]
            moved = [
                (e.op, e.old["id"], e.new["id"])
                for e in read_events(conn, EventFilter(table=BIG, key={"id": "12995"}))
            ]
            fresh = [e.op for e in read_events(conn, EventFilter(table=BIG, key={"id": "2000"}))]
            plan = conn.execute(
                "EXPLAIN SELECT * FROM pgwarden.rows_1 h WHERE COALESCE(h.n1_1, h.o1_1) = 5"
            ).fetchall()
        assert one == [
            ("SNAPSHOT", None, {"id": 5, "v": 0}),
            ("UPDATE", {"id": 5, "v": 0}, {"id": 5, "v": 1}),
            ("UPDATE", {"id": 5, "v": 1}, {"id": 5, "v": 2}),
        ]
        # Recorded under the key it moved to, with the key it came from.
        assert moved == [("UPDATE", 2995, 12995)]
        assert fresh == ["INSERT"]
        assert "rows_1_key" in " ".join(str(r[0]) for r in plan)
