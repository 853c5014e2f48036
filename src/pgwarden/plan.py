"""Plans: what `plan` prints, `apply` runs and `check` counts.

Each domain compares the desired state (the config) with the observed state (catalog queries) and
returns operations. An operation is a description and its SQL, composed with psycopg.sql only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from pgwarden.errors import ApplyFailed


@dataclass(frozen=True)
class Operation:
    domain: str  # "server", "history", "access", …
    description: str
    statement: sql.Composed | sql.SQL
    # Statements such as CREATE DATABASE cannot run inside a transaction block: they run
    # before the transaction, or after it commits with after_commit.
    transactional: bool = True
    after_commit: bool = False
    # What to print instead of the SQL when it carries a secret.
    display: str | None = None
    # Statements sent separately just before, e.g. `SET LOCAL log_statement = 'none'`: in the
    # same query string they would take effect too late (the server logs a string on receipt).
    prelude: tuple[sql.SQL, ...] = ()

    def render(self, conn: psycopg.Connection[tuple[object, ...]]) -> str:
        if self.display is not None:
            return self.display
        return self.statement.as_string(conn)


@dataclass
class Plan:
    operations: list[Operation] = field(default_factory=list)
    # Things the user should know that are not operations (e.g. a table that cannot be tracked).
    warnings: list[str] = field(default_factory=list)

    def extend(self, ops: Iterable[Operation]) -> None:
        self.operations.extend(ops)

    def __len__(self) -> int:
        return len(self.operations)

    def __bool__(self) -> bool:
        return bool(self.operations)

    def __iter__(self) -> Iterator[Operation]:
        return iter(self.operations)


def apply_plan(
    conn: psycopg.Connection[tuple[object, ...]], operations: Sequence[Operation]
) -> int:
    """Run non-transactional operations one by one, then the rest in a single transaction."""
    outside = [op for op in operations if not op.transactional and not op.after_commit]
    inside = [op for op in operations if op.transactional]
    after = [op for op in operations if not op.transactional and op.after_commit]
    previous = conn.autocommit
    current: Operation | None = None
    try:
        conn.autocommit = True
        for current in outside:
            conn.execute(current.statement)
        conn.autocommit = False
        with conn.transaction():
            for current in inside:
                for setup in current.prelude:
                    conn.execute(setup)
                conn.execute(current.statement)
        conn.autocommit = True
        for current in after:
            conn.execute(current.statement)
    except psycopg.Error as exc:
        step = current.description if current else "?"
        detail = (exc.diag.message_primary or str(exc)).strip()
        hint = exc.diag.message_hint
        raise ApplyFailed(
            f"apply stopped at “{step}”: {detail}; the transaction was rolled back, "
            "so none of the plan was applied",
            hint=hint or "`pgwarden plan` shows every step and its SQL",
        ) from exc
    finally:
        if not conn.closed:
            conn.autocommit = previous
    return len(operations)
