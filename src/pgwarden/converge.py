"""Desired state → plan → apply, across every domain that has something to converge."""

from __future__ import annotations

from collections.abc import Callable

import psycopg

from pgwarden.access.planner import plan_access
from pgwarden.config import Config
from pgwarden.history import catalog as history_catalog
from pgwarden.history import wal
from pgwarden.history.catalog import HistorySchema
from pgwarden.history.planner import plan_history
from pgwarden.plan import Plan, apply_plan

Conn = psycopg.Connection[tuple[object, ...]]
Planner = Callable[[Conn, Config, Plan], None]


def _history(conn: Conn, config: Config, plan: Plan) -> None:
    history = plan_history(conn, config)
    plan.extend(history.operations)
    plan.warnings.extend(history.warnings)


def _access(conn: Conn, config: Config, plan: Plan) -> None:
    plan.extend(plan_access(conn, config))


# Order matters: history objects before the grants on them, roles before the grants that name
# them (access orders its own operations).
PLANNERS: list[tuple[str, Planner]] = [("history", _history), ("access", _access)]


def build_plan(conn: Conn, config: Config) -> Plan:
    plan = Plan()
    with conn.transaction():  # a consistent view of the catalog, and no lingering transaction
        for _name, planner in PLANNERS:
            planner(conn, config, plan)
    return plan


def apply_config(conn: Conn, config: Config) -> Plan:
    """Converge the database to the config; returns what was done (empty when nothing was)."""
    done = Plan()
    schema = HistorySchema(config.history.schema_name)
    # A second pass only for what the first made possible: the WAL capture slot is dropped
    # once the tables that used it are switched back, and what it still held is in history.
    for _ in range(2):
        # WAL capture first takes in every change committed so far: a table switched back to
        # the triggers must not have changes still on their way (they would come after its
        # newer ones), and a slot is dropped only once nothing is left in it.
        with conn.transaction():
            installed = history_catalog.is_installed(conn, schema)
        if installed:
            wal.catch_up(conn, schema)
        plan = build_plan(conn, config)
        if not plan:
            break
        apply_plan(conn, plan.operations)
        done.extend(plan.operations)
        done.warnings.extend(w for w in plan.warnings if w not in done.warnings)
    return done
