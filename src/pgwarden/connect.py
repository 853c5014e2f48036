"""Which database a command talks to, and opening the connection.

Order: `--dsn`, $PGWARDEN_DSN, $DATABASE_URL, libpq's own PG* variables, then the local server
that `pgwarden up` started in the state directory.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgwarden.errors import ConnectionFailed

LIBPQ_VARS = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE")


@dataclass(frozen=True)
class Target:
    conninfo: str
    source: str  # where it came from, for messages

    def masked(self) -> str:
        return mask_conninfo(self.conninfo)


def mask_conninfo(conninfo: str) -> str:
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return "<unparsable connection string>"
    if "password" in params:
        params["password"] = "***"  # noqa: S105
    return make_conninfo(**params)  # type: ignore[arg-type]


def named_target(dsn: str | None) -> Target | None:
    """A server named for pgwarden on purpose (--dsn, else $PGWARDEN_DSN), not one the
    environment happens to point at (DATABASE_URL, PG*)."""
    if dsn:
        return Target(dsn, "--dsn")
    value = os.environ.get("PGWARDEN_DSN")
    return Target(value, "$PGWARDEN_DSN") if value else None


def resolve_target(dsn: str | None, local: Callable[[], str | None]) -> Target:
    """The connection to use. `local` returns the running local server's URL, if any."""
    named = named_target(dsn)
    if named is not None:
        return named
    value = os.environ.get("DATABASE_URL")
    if value:
        return Target(value, "$DATABASE_URL")
    if any(os.environ.get(var) for var in LIBPQ_VARS):
        return Target("", "libpq PG* environment variables")
    url = local()
    if url:
        return Target(url, "the local server (pgwarden up)")
    raise ConnectionFailed(
        "no database to connect to: no --dsn, $PGWARDEN_DSN, $DATABASE_URL or PG* variables, "
        "and no local server is running",
        hint="start one with `pgwarden up`, or pass --dsn postgresql://user@host/db",
    )


# For connections that live for days (the WAL capture consumer): a server that vanishes without
# closing the connection (its node lost, a failover) is noticed within about a minute instead
# of the kernel's two hours, and the caller reconnects.
LONG_LIVED = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 60_000,  # ms: sent data unacknowledged this long ends the connection
}


def connect(
    target: Target, *, autocommit: bool = False, long_lived: bool = False
) -> psycopg.Connection[tuple[object, ...]]:
    try:
        # UTF8 whatever the database's encoding: the server converts, and psycopg decodes
        # json and jsonb as UTF-8 whatever the connection's encoding (a LATIN1 database's
        # history failed to read otherwise).
        conninfo = make_conninfo(target.conninfo, **LONG_LIVED) if long_lived else target.conninfo
        return psycopg.connect(
            conninfo, autocommit=autocommit, application_name="pgwarden",
            connect_timeout=10, client_encoding="UTF8",
        )  # fmt: skip
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown reason"
        raise ConnectionFailed(
            f"cannot connect to {target.masked() or 'the PG* default'} "
            f"(from {target.source}): {reason}",
            hint="check the server is running and the connection settings are right",
        ) from None
    except psycopg.ProgrammingError as exc:
        raise ConnectionFailed(
            f"invalid connection string from {target.source}: {exc}",
            hint="use a libpq URI such as postgresql://user:pass@host:5432/db",
        ) from None
