"""W1: bulk writes. One statement each: INSERT, UPDATE, DELETE of N rows, per variant."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

from bench import prototypes
from bench.server import prepare_wal_capture
from pgwarden.config import Config
from pgwarden.history import install, wal
from pgwarden.history.catalog import DEFAULT_SCHEMA

VARIANTS = ("untracked", "seed-fail-open", "seed-fail-closed", "pgwarden-fail-closed",
            "pgwarden-fail-open", "pgwarden-plpgsql-fail-closed", "pgwarden-plpgsql-fail-open",
            "pgwarden-wal", "proto-nothing", "proto-json")  # fmt: skip
# pgwarden-*: the default configuration (the compiled capture trigger); pgwarden-plpgsql-*: the
# PL/pgSQL fallback (history.trigger: plpgsql), which Kubernetes images get. Both write the
# same history; nothing is deferred, so the statement's time is all the work. pgwarden-wal:
# capture from the WAL (history.capture: wal): no trigger, REPLICA IDENTITY FULL; its write path
# is the statement's time, and the consumer's catch-up afterwards is timed on its own.
# Prototype capture designs (bench/prototypes.sql), not the product: measured in the same run so
# that the floor of each design compares with pgwarden. proto-nothing builds the transition
# tables and writes nothing; proto-json is the leanest JSONB design that can still find a row by
# its key (pgwarden 0.1 stored JSON, and cost about as much).
PROTOTYPES = {"proto-nothing": "capture_nothing", "proto-json": "capture_json"}
STATEMENTS = ("INSERT", "UPDATE", "DELETE")
SEED_SQL = (Path(__file__).parent / "seed.sql").read_text()

Conn = psycopg.Connection[tuple[object, ...]]


@dataclass
class W1Result:
    rows: int
    reps: int
    seconds: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    xids: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    catch_up_events_per_s: list[float] = field(default_factory=list)  # pgwarden-wal

    def median(self, variant: str, statement: str) -> float:
        return statistics.median(self.seconds[variant][statement])

    def ratio(self, variant: str, statement: str) -> float:
        """R = (t_variant − t_untracked) / t_insert(untracked)."""
        base = self.median("untracked", statement)
        return (self.median(variant, statement) - base) / self.median("untracked", "INSERT")

    def to_json(self) -> dict[str, object]:
        return {
            "rows": self.rows,
            "reps": self.reps,
            "median_seconds": {v: {s: self.median(v, s) for s in STATEMENTS} for v in self.seconds},
            "R": {v: {s: self.ratio(v, s) for s in STATEMENTS} for v in self.seconds},
            # The fewest seen over the repetitions: the counter is global, so another session
            # (autovacuum, the stats collector) can only add to a reading, never subtract.
            "xids_per_statement": {
                v: {s: min(self.xids[v][s]) for s in STATEMENTS} for v in self.xids
            },
            "wal_catch_up_events_per_s": self.catch_up_events_per_s,
            "raw_xids": self.xids,
            "raw_seconds": self.seconds,
        }


def _setup(conn: Conn, variant: str, table: str) -> None:
    ident = sql.Identifier(table)
    conn.execute(
        sql.SQL(
            "CREATE TABLE {} (id int PRIMARY KEY, name text, email text, balance numeric, "
            "updated_at timestamptz)"
        ).format(ident)
    )
    if variant.startswith("seed"):
        function = "log_user_changes" if variant == "seed-fail-open" else "log_user_changes_closed"
        conn.execute(
            sql.SQL(
                "CREATE TRIGGER user_changes_trigger AFTER INSERT OR UPDATE OR DELETE ON {} "
                "FOR EACH ROW EXECUTE FUNCTION {}()"
            ).format(ident, sql.Identifier(function))
        )
    elif variant == "pgwarden-wal":
        conn.execute(
            "SELECT pgwarden.track(%s::regclass, 'fail-closed', '{}', 'rows', 'config', 'wal')",
            (table,),
        )
    elif variant.startswith("pgwarden"):
        engine = "plpgsql" if variant.startswith("pgwarden-plpgsql") else "compiled"
        install(conn, Config.model_validate({"history": {"trigger": engine}}))
        mode = variant.removeprefix("pgwarden-").removeprefix("plpgsql-")
        conn.execute("SELECT pgwarden.track(%s::regclass, %s)", (table, mode))
    elif variant in PROTOTYPES:
        prototypes.add_triggers(conn, ident, PROTOTYPES[variant], STATEMENTS, "id")


def _next_xid(conn: Conn) -> int:
    row = conn.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint").fetchone()
    assert row is not None
    return int(str(row[0]))


def _timed(conn: Conn, statement: sql.Composed) -> tuple[float, int]:
    conn.execute("CHECKPOINT")  # every statement starts from the same clean state
    before = _next_xid(conn)
    started = time.perf_counter()
    conn.execute(statement)
    elapsed = time.perf_counter() - started
    # _next_xid itself assigns none; the statement's own xid and any subtransactions count.
    return elapsed, _next_xid(conn) - before


def run_w1(url: str, rows: int, reps: int, log: object = print) -> W1Result:
    result = W1Result(rows=rows, reps=reps)
    for v in VARIANTS:
        result.seconds[v] = {s: [] for s in STATEMENTS}
        result.xids[v] = {s: [] for s in STATEMENTS}
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SEED_SQL)
        conn.execute(prototypes.SQL)
        install(conn, Config())
        prepare_wal_capture(conn)
        for rep in range(reps):
            # Interleave variants (A B C … then rotated) so drift on a noisy machine hits all.
            order = VARIANTS[rep % len(VARIANTS) :] + VARIANTS[: rep % len(VARIANTS)]
            for variant in order:
                table = f"bench_items_{variant.replace('-', '_')}"
                ident = sql.Identifier(table)
                _setup(conn, variant, table)
                if variant == "pgwarden-wal":
                    # The other variants' WAL, passed over: a tick, flushed, lets the slot
                    # move past it (as `history follow` does while the tables are quiet).
                    wal.tick(conn)
                    conn.execute("CHECKPOINT")
                    wal.catch_up(conn, DEFAULT_SCHEMA)
                statements = {
                    "INSERT": sql.SQL(
                        "INSERT INTO {} SELECT g, 'name ' || g, 'user' || g || '@example.com', "
                        "g * 1.5, now() FROM generate_series(1, {}) g"
                    ).format(ident, sql.Literal(rows)),
                    "UPDATE": sql.SQL(
                        "UPDATE {} SET balance = balance + 1, updated_at = now()"
                    ).format(ident),
                    "DELETE": sql.SQL("DELETE FROM {}").format(ident),
                }
                for name, statement in statements.items():
                    seconds, xids = _timed(conn, statement)
                    result.seconds[variant][name].append(seconds)
                    result.xids[variant][name].append(xids)
                if variant == "pgwarden-wal":
                    started = time.perf_counter()
                    caught = wal.catch_up(conn, DEFAULT_SCHEMA)
                    spent = time.perf_counter() - started
                    assert caught.events == 3 * rows, caught  # every row, each statement
                    result.catch_up_events_per_s.append(caught.events / spent)
                conn.execute(sql.SQL("DROP TABLE {}").format(ident))
                log(
                    f"  W1 rep {rep + 1}/{reps} {variant:22s} "  # type: ignore[operator]
                    + " ".join(f"{s} {result.seconds[variant][s][-1]:.3f}s" for s in STATEMENTS)
                )
    return result
