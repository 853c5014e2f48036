"""W5: the history browser at size. History grown to N events in N/5 transactions of five
events each (over ten tables, written into their history tables as capture writes them); then
the server time of the pages a user opens first: the timeline's first page (all tables, and one
table), a row's history, and the same through the web app (rendering included), p95."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import psycopg
from psycopg import sql
from starlette.testclient import TestClient

from bench.w3 import tracked_tables
from pgwarden.config import Config
from pgwarden.connect import Target
from pgwarden.history import TableName, install
from pgwarden.history.browse import TxFilter, row_history, transactions
from pgwarden.web.app import UiSettings, create_app
from pgwarden.web.security import Doors

TABLES = 10
PER_TX = 5
HOST = "127.0.0.1:8765"


@dataclass
class W5Result:
    events: int = 0
    p95_ms: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {"events": self.events, "p95_ms": self.p95_ms}


def _fill(conn: psycopg.Connection[tuple[object, ...]], events: int, keys: int) -> None:
    txs = events // PER_TX
    base_row = conn.execute(
        "SELECT setval('pgwarden.statement_seq', nextval('pgwarden.statement_seq') + %s)",
        (events + txs,),
    ).fetchone()
    assert base_row is not None
    base = int(str(base_row[0])) - (events + txs)
    step = 200_000
    for start in range(0, txs, step):
        end = min(start + step, txs)
        # Transaction g: context id base + g * 6 (the statement that opened it), its five
        # statements the ids after it; one minute apart per 1,000 transactions, ending now.
        conn.execute(
            "INSERT INTO pgwarden.tx (id, tx, at, db_user, role_name, app_user) "
            "SELECT %s + g * 6, 1000 + g, now() - (%s - g) * interval '60 ms', 'bench', 'bench', "
            "'user' || (g %% 50) FROM generate_series(%s::bigint, %s::bigint) g",
            (base, txs, start, end - 1),
        )
        for n, shadow in conn.execute("SELECT n, shadow FROM w5_tables ORDER BY n").fetchall():
            # Event j of transaction g goes to table (g + j) % TABLES.
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (ctx, stmt, op, o1_1, o2_1, n1_1, n2_1) "
                    "SELECT %s + g * 6, %s + g * 6 + 1 + j, 'U', k, g - 1, k, g "
                    "FROM generate_series(%s::bigint, %s::bigint) g, "
                    "generate_series(0, %s) j, LATERAL (SELECT ((g * 7 + j) %% %s)::int AS k) kk "
                    "WHERE (g + j) %% %s = %s"
                ).format(sql.Identifier("pgwarden", str(shadow))),
                (base, base, start, end - 1, PER_TX - 1, keys, TABLES, n),
            )
    conn.execute("VACUUM ANALYZE")


def _p95(samples: list[float]) -> float:
    samples.sort()
    return 1000 * samples[int(0.95 * (len(samples) - 1))]


def run_w5(url: str, events: int, samples: int, log: object = print) -> W5Result:
    result = W5Result(events=events)
    keys = max(events // TABLES // 10, 10)  # about ten events per row
    with psycopg.connect(url, autocommit=True) as conn:
        install(conn, Config())
        tracked_tables(conn, TABLES, "t{:02d}", "w5_tables")
        started = time.perf_counter()
        _fill(conn, events, keys)
        log(f"  W5 history filled to {events:,} events ({time.perf_counter() - started:.0f}s)")  # type: ignore[operator]
    rng = random.Random(5)
    timings: dict[str, list[float]] = {k: [] for k in ("timeline", "timeline_table", "row",
                                                       "page_timeline", "page_row")}  # fmt: skip
    with psycopg.connect(url) as conn:
        for i in range(samples + 5):
            table = TableName("public", f"t{rng.randrange(TABLES):02d}")
            key = {"id": str(rng.randrange(keys))}
            cases = [
                ("timeline", lambda: transactions(conn, TxFilter(), limit=25)),
                ("timeline_table", lambda t=table: transactions(conn, TxFilter(table=t), limit=25)),
                ("row", lambda t=table, k=key: row_history(conn, t, k)),
            ]
            for name, action in cases:
                begun = time.perf_counter()
                action()
                conn.rollback()
                if i >= 5:  # warm-up
                    timings[name].append(time.perf_counter() - begun)
    settings = UiSettings(
        target=Target(url, "bench"), config=Config(),
        doors=Doors(token="bench", hosts=frozenset({HOST})),  # noqa: S106 - a local bench
    )  # fmt: skip
    client = TestClient(create_app(settings), base_url=f"http://{HOST}")
    client.cookies.set("pgwarden_ui", "bench")
    for i in range(samples + 5):
        table = f"public.t{rng.randrange(TABLES):02d}"
        key = f"id={rng.randrange(keys)}"
        for name, path, params in (
            ("page_timeline", "/timeline", {}),
            ("page_row", "/row", {"table": table, "key": key}),
        ):
            begun = time.perf_counter()
            got = client.get(path, params=params)
            assert got.status_code == 200, got.text[:300]
            if i >= 5:
                timings[name].append(time.perf_counter() - begun)
    result.p95_ms = {name: _p95(values) for name, values in timings.items()}
    for name, value in result.p95_ms.items():
        log(f"  W5 {name} p95 at {events:,} events: {value:.1f} ms")  # type: ignore[operator]
    return result
