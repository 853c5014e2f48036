"""Desired state → plan → apply, across every domain that has something to converge."""

from __future__ import annotations

from collections.abc import Callable

import psycopg

from pgwarden.access.planner import plan_access
from pgwarden.config import Config
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
    plan = build_plan(conn, config)
    if plan:
        apply_plan(conn, plan.operations)
    return plan
