"""W2: OLTP. pgbench tpcb-like, 4 clients, default durability; the four tables tracked or not.

The WAL capture variants (history.capture: wal) send the application's context as pgwarden's
set_actor does, in the same round trip as BEGIN, so their history has who as well as when:
wal-waiting runs with the consumer stopped (it catches up after the run, timed), wal-live with
`pgwarden history follow` running beside pgbench on the same cores (lag sampled).

That message is one more statement per transaction, and on pgbench's short transactions a
statement, whatever it does, costs about a tenth of the throughput. So the WAL variants are
compared twice: with `untracked` (the issue's target, "who" counted as pgwarden's cost) and with
`untracked-tagged`, untracked tables running the same tagged script (like for like: what the
capture itself costs an application that sends the same statements either way).
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from bench.server import prepare_wal_capture
from pgwarden.config import Config
from pgwarden.history import install, wal
from pgwarden.history.catalog import DEFAULT_SCHEMA
from pgwarden.history.layout import table_logs

TABLES = ("pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history")
# seed: the seed's row trigger (bench/seed.sql, fail-closed form) on the four tables; tracked:
# pgwarden's default (the compiled capture trigger); tracked-plpgsql: its PL/pgSQL fallback.
VARIANTS = ("untracked", "untracked-tagged", "seed", "tracked", "tracked-plpgsql", "wal-waiting",
            "wal-live")  # fmt: skip
# tpcb-like, with set_actor's message sent with BEGIN (pgbench's \\; sends both at once).
TAGGED_SCRIPT = """\\set aid random(1, 100000 * :scale)
\\set bid random(1, 1 * :scale)
\\set tid random(1, 10 * :scale)
\\set delta random(-5000, 5000)
BEGIN \\; SELECT pg_logical_emit_message(true, 'pgwarden', json_build_object('db_user', session_user, 'role', session_user, 'application', current_setting('application_name'), 'actor', 'bench')::text);
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
END;
"""
SEED_SQL = (Path(__file__).parent / "seed.sql").read_text()


@dataclass
class W2Result:
    scale: int
    seconds: int
    clients: int
    tps: dict[str, list[float]] = field(
        default_factory=lambda: {variant: [] for variant in VARIANTS}
    )
    completeness: list[dict[str, int]] = field(default_factory=list)
    catch_up_events_per_s: list[float] = field(default_factory=list)  # wal-waiting
    untracked_events_per_s: list[float] = field(default_factory=list)  # what untracked makes
    lag_p99_s: list[float] = field(default_factory=list)  # wal-live

    def ratio(self, variant: str, base: str = "untracked") -> float:
        return statistics.median(self.tps[variant]) / statistics.median(self.tps[base])

    def per_run_ratios(self, variant: str, base: str = "untracked") -> list[float]:
        """Each repetition's variant over the same repetition's `base` run."""
        return [v / u for v, u in zip(self.tps[variant], self.tps[base], strict=True)]

    @property
    def complete(self) -> bool:
        return all(c["missing"] == 0 and c["extra"] == 0 and c["anonymous"] == 0
                   for c in self.completeness)  # fmt: skip

    def to_json(self) -> dict[str, object]:
        return {
            "scale": self.scale,
            "seconds": self.seconds,
            "clients": self.clients,
            "tps": self.tps,
            "tracked_over_untracked": self.ratio("tracked"),
            "seed_over_untracked": self.ratio("seed"),
            "plpgsql_over_untracked": self.ratio("tracked-plpgsql"),
            "per_run": {v: self.per_run_ratios(v) for v in VARIANTS if v != "untracked"},
            "wal_waiting_over_untracked": self.ratio("wal-waiting"),
            "wal_live_over_untracked": self.ratio("wal-live"),
            "tagged_over_untracked": self.ratio("untracked-tagged"),
            "wal_waiting_over_tagged": self.ratio("wal-waiting", "untracked-tagged"),
            "wal_live_over_tagged": self.ratio("wal-live", "untracked-tagged"),
            "per_run_over_tagged": {
                v: self.per_run_ratios(v, "untracked-tagged") for v in ("wal-waiting", "wal-live")
            },
            "catch_up_events_per_s": self.catch_up_events_per_s,
            "untracked_events_per_s": self.untracked_events_per_s,
            "lag_p99_s": self.lag_p99_s,
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


Conn = psycopg.Connection[tuple[object, ...]]


CAPTURE = ("pgwarden_capture_insert", "pgwarden_capture_update", "pgwarden_capture_delete",
           "pgwarden_capture_truncate")  # fmt: skip


def _capture(conn: Conn, engine: str) -> None:
    """Switch the four tracked tables between the triggers and the WAL, as `apply` would with
    history.capture (no new snapshot: they stay tracked). Leaving the WAL, history takes in
    what it has first; the trigger variants run with the default replica identity."""
    have = conn.execute("SELECT DISTINCT capture FROM pgwarden.tracked").fetchall()
    if have == [(engine,)]:
        return
    if engine == "trigger":
        wal.catch_up(conn, DEFAULT_SCHEMA)
    for table in TABLES:
        conn.execute(
            "SELECT pgwarden.track(%s::regclass, 'fail-closed', '{}', 'rows', 'config', %s)",
            (table, engine),
        )
        if engine == "trigger":
            conn.execute(
                sql.SQL("ALTER TABLE {} REPLICA IDENTITY DEFAULT").format(sql.Identifier(table))
            )


def _prepare(conn: Conn, variant: str) -> None:
    """Make the four tables captured as `variant` says, and nothing else. The tables are
    tracked once (one snapshot); pgwarden's triggers are switched off for the other variants
    rather than untracked, which would take a new 1M-row snapshot every time."""
    _capture(conn, "wal" if variant.startswith("wal") else "trigger")
    if variant.startswith("wal"):
        return
    for table in TABLES:
        conn.execute(
            sql.SQL("DROP TRIGGER IF EXISTS user_changes_trigger ON {}").format(
                sql.Identifier(table)
            )
        )
    if variant.startswith("tracked"):
        engine = "plpgsql" if variant == "tracked-plpgsql" else "compiled"
        install(conn, Config.model_validate({"history": {"trigger": engine}}))
    for table in TABLES:
        conn.execute(
            sql.SQL("ALTER TABLE {} {}").format(
                sql.Identifier(table),
                sql.SQL(", ").join(
                    sql.SQL("ENABLE ALWAYS TRIGGER {}" if variant.startswith("tracked")
                            else "DISABLE TRIGGER {}").format(sql.Identifier(t))
                    for t in CAPTURE
                ),
            )
        )  # fmt: skip
    if variant == "seed":
        for table in TABLES:
            conn.execute(
                sql.SQL(
                    "CREATE TRIGGER user_changes_trigger AFTER INSERT OR UPDATE OR DELETE ON {} "
                    "FOR EACH ROW EXECUTE FUNCTION log_user_changes_closed()"
                ).format(sql.Identifier(table))
            )


def _counts(conn: Conn, after: int) -> dict[str, int]:
    """Events written after statement `after`, per operation, and those without who-and-when."""
    counts = {"UPDATE": 0, "INSERT": 0, "anonymous": 0}
    for log in table_logs(conn, DEFAULT_SCHEMA):
        if log.name.table not in TABLES:
            continue
        row = conn.execute(
            sql.SQL(
                "SELECT count(*) FILTER (WHERE h.op = 'U'), count(*) FILTER (WHERE h.op = 'I'), "
                "count(*) FILTER (WHERE NOT EXISTS (SELECT 1 FROM pgwarden.tx x "
                "WHERE x.id = h.ctx AND x.at IS NOT NULL AND x.db_user IS NOT NULL)) "
                "FROM {} h WHERE h.stmt > %s"
            ).format(log.table(DEFAULT_SCHEMA)),
            (after,),
        ).fetchone()
        assert row is not None
        counts["UPDATE"] += int(str(row[0]))
        counts["INSERT"] += int(str(row[1]))
        counts["anonymous"] += int(str(row[2]))
    return counts


def run_w2(
    url: str, bindir: Path, scale: int, seconds: int, reps: int, log: object = print
) -> W2Result:
    result = W2Result(scale=scale, seconds=seconds, clients=4)
    # pgbench_history as pgbench makes it: no key (pgwarden tracks its rows by their content).
    _pgbench(bindir, url, "-i", "-q", "-s", str(scale))
    with psycopg.connect(url, autocommit=True) as conn:
        install(conn, Config())
        conn.execute(SEED_SQL)
        for table in TABLES:
            conn.execute("SELECT pgwarden.track(%s::regclass)", (table,))
        prepare_wal_capture(conn)
        conn.execute("VACUUM ANALYZE")
    script = Path(tempfile.mkdtemp(prefix="pgwarden-w2-")) / "tagged.sql"
    script.write_text(TAGGED_SCRIPT)
    for rep in range(reps):
        order = VARIANTS[rep % len(VARIANTS) :] + VARIANTS[: rep % len(VARIANTS)]
        for variant in order:
            with psycopg.connect(url, autocommit=True) as conn:
                _prepare(conn, variant)
                # The previous run's dead tuples and new history are vacuumed now, not by
                # autovacuum in the middle of the next run.
                conn.execute("VACUUM")
                conn.execute("CHECKPOINT")
                start = conn.execute("SELECT last_value FROM pgwarden.statement_seq").fetchone()
                began = conn.execute("SELECT clock_timestamp()").fetchone()
            args = ["-n", "-c", "4", "-j", "2", "-T", str(seconds)]
            follower = lag = None
            if variant.startswith("wal") or variant == "untracked-tagged":
                args += ["-f", str(script)]
            if variant == "wal-live":
                follower = _follow(url)
                lag = _LagSampler(url)
            out = _pgbench(bindir, url, *args)
            if lag is not None:
                result.lag_p99_s.append(lag.stop())
            if follower is not None:
                follower.send_signal(signal.SIGTERM)
                follower.wait(timeout=60)
            tps = float(re.search(r"tps = ([0-9.]+)", out).group(1))  # type: ignore[union-attr]
            txns = int(re.search(r"actually processed: (\d+)", out).group(1))  # type: ignore[union-attr]
            result.tps[variant].append(tps)
            if variant == "untracked":
                result.untracked_events_per_s.append(4 * tps)
            if variant.startswith("wal"):
                with psycopg.connect(url, autocommit=True) as conn:
                    t0 = time.perf_counter()
                    caught = wal.catch_up(conn, DEFAULT_SCHEMA)
                    spent = time.perf_counter() - t0
                if variant == "wal-waiting" and caught.events:
                    result.catch_up_events_per_s.append(caught.events / spent)
            if variant.startswith(("tracked", "wal")):
                with psycopg.connect(url) as conn:
                    assert start is not None and began is not None
                    counts = _counts(conn, int(str(start[0])))
                    zero = conn.execute(
                        "SELECT count(*) FROM pgbench_history WHERE mtime >= %s AND delta = 0",
                        (began[0],),
                    ).fetchone()
                assert zero is not None
                # An UPDATE that changes nothing (delta 0) is rightly not recorded.
                expected = 3 * (txns - int(str(zero[0]))) + txns
                got = counts["UPDATE"] + counts["INSERT"]
                result.completeness.append(
                    {"variant": variant, "transactions": txns, "events": got,  # type: ignore[dict-item]
                     "expected": expected, "missing": max(expected - got, 0),
                     "extra": max(got - expected, 0), "anonymous": counts["anonymous"]}
                )  # fmt: skip
            log(f"  W2 rep {rep + 1}/{reps} {variant:16s} tps {tps:.0f} ({txns} txns)")  # type: ignore[operator]
    return result


_EMPTY_CONFIG = Path(tempfile.mkdtemp(prefix="pgwarden-w2-")) / "pgwarden.yaml"
_EMPTY_CONFIG.write_text("history: {}\n")


def _follow(url: str) -> subprocess.Popen[bytes]:
    """The consumer as a user runs it: its own process, beside the server on the same cores."""
    return subprocess.Popen(
        [sys.executable, "-m", "pgwarden", "--dsn", url, "history", "follow"],
        env={**os.environ, "PGWARDEN_CONFIG": str(_EMPTY_CONFIG)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


class _LagSampler:
    """How long a commit takes to reach history: every 0.1 s the WAL's end is noted, and the
    time until the slot's confirmed position passes it is that sample's lag."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.lags: list[float] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        pending: list[tuple[float, str]] = []
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.done.is_set():
                row = conn.execute(
                    "SELECT pg_current_wal_flush_lsn()::text, confirmed_flush_lsn::text "
                    "FROM pg_replication_slots WHERE database = current_database()"
                ).fetchone()
                assert row is not None
                now = time.monotonic()
                pending.append((now, str(row[0])))
                reached = conn.execute(
                    "SELECT array_agg(pg_wal_lsn_diff(%s::pg_lsn, l::pg_lsn) >= 0) "
                    "FROM unnest(%s::text[]) l",
                    (row[1], [p[1] for p in pending]),
                ).fetchone()
                assert reached is not None
                still = []
                for (t, lsn), ok in zip(pending, reached[0], strict=True):
                    if ok:
                        self.lags.append(now - t)
                    else:
                        still.append((t, lsn))
                pending = still
                time.sleep(0.1)

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        if not self.lags:
            return float("nan")
        ordered = sorted(self.lags)
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
