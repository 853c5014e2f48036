"""W3: reading history. Per-row lookups at small and large history, as-of --into versus CREATE
TABLE AS, and the memory of streaming `history --format json`."""

from __future__ import annotations

import os
import random
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from pgwarden.config import Config
from pgwarden.history import EventFilter, TableName, as_of_into, events, install

TABLES = 100


@dataclass
class W3Result:
    lookup_p99_ms: dict[int, float] = field(default_factory=dict)  # events in history → p99
    as_of_rows: int = 0
    as_of_seconds: float = 0.0
    as_of_method: str = ""
    replay_seconds: float = 0.0
    changed_since: int = 0
    ctas_seconds: float = 0.0
    stream_events: int = 0
    stream_peak_mb: float = 0.0

    def to_json(self) -> dict[str, object]:
        sizes = sorted(self.lookup_p99_ms)
        return {
            "lookup_p99_ms": {str(k): v for k, v in self.lookup_p99_ms.items()},
            "lookup_p99_ratio": self.lookup_p99_ms[sizes[-1]] / self.lookup_p99_ms[sizes[0]],
            "as_of_rows": self.as_of_rows,
            "as_of_into_seconds": self.as_of_seconds,
            "as_of_into_method": self.as_of_method,
            "as_of_into_replay_seconds": self.replay_seconds,
            "as_of_changed_since": self.changed_since,
            "replay_over_ctas": self.replay_seconds / self.ctas_seconds,
            "ctas_seconds": self.ctas_seconds,
            "as_of_over_ctas": self.as_of_seconds / self.ctas_seconds,
            "stream_events": self.stream_events,
            "stream_peak_mb": self.stream_peak_mb,
        }


def tracked_tables(
    conn: psycopg.Connection[tuple[object, ...]], count: int, name_format: str, registry: str
) -> None:
    """`count` tracked tables (id int PRIMARY KEY, v int), their history tables listed in
    `registry` (n, shadow) for the synthetic fills of W3 and W5."""
    conn.execute(
        sql.SQL("CREATE TABLE {} (n int PRIMARY KEY, shadow text)").format(sql.Identifier(registry))
    )
    for n in range(count):
        name = name_format.format(n)
        conn.execute(
            sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, v int)").format(sql.Identifier(name))
        )
        conn.execute("SELECT pgwarden.track(%s::regclass)", (name,))
        conn.execute(
            sql.SQL(
                "INSERT INTO {} SELECT %s, shadow FROM pgwarden.logged_table "
                "WHERE table_oid = %s::regclass"
            ).format(sql.Identifier(registry)),
            (n, name),
        )


def _fill(conn: psycopg.Connection[tuple[object, ...]], upto: int, keys_per_table: int) -> None:
    """Grow history to `upto` synthetic UPDATE events spread over the 100 tables, written into
    their history tables as capture writes them (one who-and-when row for all)."""
    row = conn.execute("SELECT coalesce(max(n), 0) FROM w3_filled").fetchone()
    have = int(str(row[0])) if row else 0
    if have == 0:
        conn.execute(
            "INSERT INTO pgwarden.tx (id, tx, at, db_user, role_name) "
            "SELECT nextval('pgwarden.statement_seq'), 1, now() - interval '1 day', 'bench', 'bench'"
        )
    ctx = conn.execute("SELECT max(id) FROM pgwarden.tx WHERE tx = 1").fetchone()
    assert ctx is not None
    base = conn.execute(
        "SELECT setval('pgwarden.statement_seq', nextval('pgwarden.statement_seq') + %s)",
        (upto - have,),
    ).fetchone()
    assert base is not None
    step = 500_000
    for start in range(have + 1, upto + 1, step):
        end = min(start + step - 1, upto)
        for n, shadow in conn.execute("SELECT n, shadow FROM w3_tables ORDER BY n").fetchall():
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (ctx, stmt, op, o1_1, o2_1, n1_1, n2_1) "
                    "SELECT %s, %s + g, 'U', (g / %s) %% %s, g - 1, (g / %s) %% %s, g "
                    "FROM generate_series(%s::bigint, %s::bigint) g WHERE g %% %s = %s"
                ).format(sql.Identifier("pgwarden", str(shadow))),
                (ctx[0], int(str(base[0])) - upto, TABLES, keys_per_table, TABLES,
                 keys_per_table, start, end, TABLES, n),
            )  # fmt: skip
    conn.execute("INSERT INTO w3_filled VALUES (%s)", (upto,))
    conn.execute("ANALYZE")


def _p99_lookup(url: str, samples: int, keys_per_table: int) -> float:
    rng = random.Random(42)
    times = []
    with psycopg.connect(url) as conn:
        for _ in range(samples):
            table = TableName("public", f"t{rng.randrange(TABLES):03d}")
            key = {"id": str(rng.randrange(keys_per_table))}
            started = time.perf_counter()
            with conn.transaction():
                found = list(events(conn, EventFilter(table=table, key=key)))
            times.append(time.perf_counter() - started)
            assert found is not None
    times.sort()
    return 1000 * times[int(0.99 * (len(times) - 1))]


def run_w3(
    url: str, small: int, large: int, as_of_rows: int, samples: int, log: object = print
) -> W3Result:
    result = W3Result()
    keys = max(large // TABLES // 10, 10)  # about ten events per row at the large size
    with psycopg.connect(url, autocommit=True) as conn:
        install(conn, Config())
        conn.execute("CREATE TABLE w3_filled (n bigint)")
        tracked_tables(conn, TABLES, "t{:03d}", "w3_tables")
        for size in (small, large):
            started = time.perf_counter()
            _fill(conn, size, keys)
            log(f"  W3 history filled to {size:,} events ({time.perf_counter() - started:.0f}s)")  # type: ignore[operator]
            _p99_lookup(url, 20, keys)  # warm up
            result.lookup_p99_ms[size] = statistics.median(
                _p99_lookup(url, samples, keys) for _ in range(3)
            )
            log(f"  W3 per-row lookup p99 at {size:,} events: {result.lookup_p99_ms[size]:.2f} ms")  # type: ignore[operator]

        conn.execute("CREATE TABLE big (id int PRIMARY KEY, name text, v numeric)")
        conn.execute(
            "INSERT INTO big SELECT g, 'row ' || g, g * 1.5 FROM generate_series(1, %s) g",
            (as_of_rows,),
        )
        conn.execute("SELECT pgwarden.track('big'::regclass)")  # one SNAPSHOT event per row
        conn.execute("VACUUM ANALYZE")
        at = conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
        # The usual restore: the table as it was before the latest changes, 1 % of its rows
        # (updates, a few key moves, deletes and inserts) made after `at`.
        n = max(as_of_rows // 100, 10)
        conn.execute("UPDATE big SET v = v + 1 WHERE id % 100 = 0")
        conn.execute("UPDATE big SET id = -id WHERE id % 1000 = 1")
        conn.execute("DELETE FROM big WHERE id % 1000 = 2")
        conn.execute(
            "INSERT INTO big SELECT g, 'new ' || g, 0 FROM generate_series(%s::int, %s::int) g",
            (as_of_rows + 1, as_of_rows + n // 10),
        )
        conn.execute("VACUUM ANALYZE big")
        big = conn.execute(
            "SELECT shadow FROM pgwarden.logged_table WHERE table_oid = 'big'::regclass"
        ).fetchone()
        assert big is not None
        changed = conn.execute(
            sql.SQL(
                "SELECT count(*) FROM {} h JOIN pgwarden.tx x ON x.id = h.ctx WHERE x.at > %s"
            ).format(sql.Identifier("pgwarden", str(big[0]))),
            (at,),
        ).fetchone()
        result.changed_since = int(str(changed[0])) if changed else 0
        ctas, into, replay = [], [], []
        methods = set()
        for rep in range(3):
            conn.execute("CHECKPOINT")
            started = time.perf_counter()
            conn.execute(
                sql.SQL("CREATE TABLE {} AS SELECT * FROM big").format(
                    sql.Identifier(f"ctas_{rep}")
                )
            )
            ctas.append(time.perf_counter() - started)
            conn.execute("CHECKPOINT")
            started = time.perf_counter()
            built = as_of_into(
                conn, TableName("public", "big"), at, TableName("public", f"asof_{rep}")
            )
            into.append(time.perf_counter() - started)
            methods.add(built.method)
            conn.execute("CHECKPOINT")
            started = time.perf_counter()
            as_of_into(
                conn,
                TableName("public", "big"),
                at,
                TableName("public", f"replay_{rep}"),
                method="replay",
            )
            replay.append(time.perf_counter() - started)
        # Both ways must agree, or the faster one is worthless.
        differ = conn.execute(
            "SELECT count(*) FROM ((TABLE asof_0 EXCEPT ALL TABLE replay_0) "
            "UNION ALL (TABLE replay_0 EXCEPT ALL TABLE asof_0)) d"
        ).fetchone()
        assert differ == (0,), f"as-of rewind and replay disagree on {differ} rows"
        result.as_of_rows = as_of_rows
        result.as_of_method = "/".join(sorted(methods))
        result.ctas_seconds = statistics.median(ctas)
        result.as_of_seconds = statistics.median(into)
        result.replay_seconds = statistics.median(replay)
        log(
            f"  W3 as-of --into {as_of_rows:,} rows ({result.changed_since:,} events since): "  # type: ignore[operator]
            f"auto ({result.as_of_method}) {result.as_of_seconds:.2f}s, "
            f"replay {result.replay_seconds:.2f}s, CTAS {result.ctas_seconds:.2f}s"
        )

    # Streaming: a child process, so its peak RSS is its own.
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    env = dict(os.environ, PGWARDEN_DSN=url)
    started = time.perf_counter()
    with open(os.devnull, "w") as sink:
        subprocess.run(
            [sys.executable, "-m", "pgwarden", "history", "public.big", "--format", "json"],
            env=env, stdout=sink, check=True,
        )  # fmt: skip
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result.stream_events = as_of_rows
    result.stream_peak_mb = max(peak, before) / 1024
    log(
        f"  W3 history --format json over {as_of_rows:,} events: peak {result.stream_peak_mb:.0f} MB "  # type: ignore[operator]
        f"({time.perf_counter() - started:.1f}s)"
    )
    return result
