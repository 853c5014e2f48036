"""Desired state → plan → apply, across every domain that has something to converge."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import psycopg

from pgwarden.config import Config
from pgwarden.plan import Operation, Plan, apply_plan

Conn = psycopg.Connection[tuple[object, ...]]
Planner = Callable[[Conn, Config], Sequence[Operation]]

# Each domain registers how it diffs the config against the catalog. Order matters: roles before
# the grants that name them, history objects before the triggers that use them.
PLANNERS: list[tuple[str, Planner]] = []


def build_plan(conn: Conn, config: Config) -> Plan:
    plan = Plan()
    for _name, planner in PLANNERS:
        plan.extend(planner(conn, config))
    return plan


def apply_config(conn: Conn, config: Config) -> Plan:
    """Converge the database to the config; returns what was done (empty when nothing was)."""
    plan = build_plan(conn, config)
    if plan:
        apply_plan(conn, plan.operations)
    return plan
