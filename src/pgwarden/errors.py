"""One exception hierarchy for pgwarden.

Every error a user can cause or fix derives from :class:`UserError`: the CLI prints its message
(what went wrong, where, and what to do) and exits 2 without a traceback. Anything else is a bug or
an environment failure: the CLI logs the traceback to a file and exits 1, naming that file.
"""

from __future__ import annotations


class PgwardenError(Exception):
    """Base of every error pgwarden raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class UserError(PgwardenError):
    """Something the user can fix: bad input, a busy port, a missing file."""

    exit_code = 2


class ConfigError(UserError):
    """pgwarden.yaml is missing, unreadable or invalid."""


class BinariesNotFound(UserError):
    """No usable PostgreSQL binaries were found."""


class ServerError(UserError):
    """The local server cannot be started, stopped or reached as asked."""


class PortInUse(ServerError):
    """The configured TCP port is taken by another process."""


class DataDirRefused(ServerError):
    """The data directory is not ours, is damaged, or belongs to another PostgreSQL version."""


class ConnectionFailed(UserError):
    """No database could be reached with the connection settings in effect."""


class DriftDetected(PgwardenError):
    """`check` found the database differs from the config (exit 1, no traceback)."""

    exit_code = 1


class ApplyFailed(PgwardenError):
    """The database refused an operation of the plan; the transaction was rolled back."""
