"""W2: OLTP. pgbench tpcb-like, 4 clients, default durability; the four tables tracked or not."""

from __future__ import annotations

import re
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from bench import prototypes
from pgwarden.config import Config
from pgwarden.history import install

TABLES = ("pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history")
# proto-images (bench/prototypes.sql, not the product): triggers that write only to_jsonb() of
# each changed row into a plain unindexed table, the floor of any capture that writes history in
# the application's transaction.
VARIANTS = ("untracked", "tracked", "proto-images")
EVENTS = ("INSERT", "UPDATE")  # what tpcb-like runs on the tracked tables


@dataclass
class W2Result:
    scale: int
    seconds: int
    clients: int
    tps: dict[str, list[float]] = field(
        default_factory=lambda: {variant: [] for variant in VARIANTS}
    )
    completeness: list[dict[str, int]] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return statistics.median(self.tps["tracked"]) / statistics.median(self.tps["untracked"])

    @property
    def floor_ratio(self) -> float:
        return statistics.median(self.tps["proto-images"]) / statistics.median(
            self.tps["untracked"]
        )

    @property
    def complete(self) -> bool:
        return all(c["missing"] == 0 and c["extra"] == 0 for c in self.completeness)

    def to_json(self) -> dict[str, object]:
        return {
            "scale": self.scale,
            "seconds": self.seconds,
            "clients": self.clients,
            "tps": self.tps,
            "tracked_over_untracked": self.ratio,
            "proto_images_over_untracked": self.floor_ratio,
            "completeness": self.completeness,
        }


def _env(url: str) -> dict[str, str]:
    params = conninfo_to_dict(url)
    return {
        "PGHOST": str(params["host"]),
        "PGPORT": str(params["port"]),
        "PGUSER": str(params["user"]),
        "PGPASSWORD": str(params["password"]),
        "PGDATABASE": str(params["dbname"]),
        "PATH": "/usr/bin:/bin",
    }


def _pgbench(bindir: Path, url: str, *args: str) -> str:
    result = subprocess.run(
        [str(bindir / "pgbench"), *args], env=_env(url), capture_output=True, text=True, check=True
    )
    return result.stdout + result.stderr


def _prepare(conn: psycopg.Connection[tuple[object, ...]], variant: str, table: str) -> None:
    """Make `table` tracked as `variant` says, and nothing else."""
    conn.execute(
        "SELECT pgwarden.untrack(%s::regclass) FROM pgwarden.tracked WHERE table_oid = %s::regclass",
        (table, table),
    )
    ident = sql.Identifier(table)
    for event in EVENTS:
        conn.execute(
            sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(prototypes.trigger_name(event), ident)
        )
    if variant == "tracked":
        conn.execute("SELECT pgwarden.track(%s::regclass)", (table,))
    elif variant == "proto-images":
        prototypes.add_triggers(conn, ident, "capture_images", EVENTS)


def run_w2(
    url: str, bindir: Path, scale: int, seconds: int, reps: int, log: object = print
) -> W2Result:
    result = W2Result(scale=scale, seconds=seconds, clients=4)
    _pgbench(bindir, url, "-i", "-q", "-s", str(scale))
    with psycopg.connect(url, autocommit=True) as conn:
        # pgbench_history has no key; pgwarden tracks only tables whose rows have one. Both
        # variants get the column, so they run the same workload.
        conn.execute("ALTER TABLE pgbench_history ADD COLUMN id bigserial PRIMARY KEY")
        install(conn, Config())
        conn.execute(prototypes.SQL)
        conn.execute("VACUUM ANALYZE")
    for rep in range(reps):
        order = VARIANTS[rep % len(VARIANTS) :] + VARIANTS[: rep % len(VARIANTS)]
        for variant in order:
            with psycopg.connect(url, autocommit=True) as conn:
                for table in TABLES:
                    _prepare(conn, variant, table)
                # The previous run's dead tuples and new history are vacuumed now, not by
                # autovacuum in the middle of the next run.
                conn.execute("VACUUM")
                conn.execute("CHECKPOINT")
                start = conn.execute("SELECT coalesce(max(id), 0) FROM pgwarden.event").fetchone()
                hist = conn.execute("SELECT coalesce(max(id), 0) FROM pgbench_history").fetchone()
            out = _pgbench(bindir, url, "-n", "-c", "4", "-j", "2", "-T", str(seconds))
            tps = float(re.search(r"tps = ([0-9.]+)", out).group(1))  # type: ignore[union-attr]
            txns = int(re.search(r"actually processed: (\d+)", out).group(1))  # type: ignore[union-attr]
            result.tps[variant].append(tps)
            if variant == "tracked":
                with psycopg.connect(url) as conn:
                    assert start is not None and hist is not None
                    counts = conn.execute(
                        "SELECT count(*) FILTER (WHERE op = 'UPDATE'), "
                        "count(*) FILTER (WHERE op = 'INSERT') FROM pgwarden.event WHERE id > %s "
                        "AND op IN ('UPDATE', 'INSERT')",
                        (start[0],),
                    ).fetchone()
                    zero = conn.execute(
                        "SELECT count(*) FROM pgbench_history WHERE id > %s AND delta = 0",
                        (hist[0],),
                    ).fetchone()
                assert counts is not None and zero is not None
                # An UPDATE that changes nothing (delta 0) is rightly not recorded.
                expected = 3 * (txns - int(str(zero[0]))) + txns
                got = int(str(counts[0])) + int(str(counts[1]))
                result.completeness.append(
                    {"transactions": txns, "events": got, "expected": expected,
                     "missing": max(expected - got, 0), "extra": max(got - expected, 0)}
                )  # fmt: skip
            log(f"  W2 rep {rep + 1}/{reps} {variant:12s} tps {tps:.0f} ({txns} txns)")  # type: ignore[operator]
    return result
