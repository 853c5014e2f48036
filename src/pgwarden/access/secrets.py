"""Role passwords: read from the environment or a file, hashed on the client, never shown."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import unicodedata
from pathlib import Path

import psycopg

from pgwarden.config import RoleConfig
from pgwarden.errors import ConfigError


def read_password(role: str, config: RoleConfig) -> str | None:
    """The role's password from $password_env or password_file; None when none is configured."""
    if config.password_env:
        value = os.environ.get(config.password_env)
        if not value:
            raise ConfigError(
                f"access.roles.{role}.password_env: ${config.password_env} is not set",
                hint=f"export {config.password_env}=… before running pgwarden; nothing was applied",
            )
        return value
    if config.password_file:
        path = Path(config.password_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(
                f"access.roles.{role}.password_file: cannot read {path}: {exc.strerror}",
                hint="nothing was applied",
            ) from None
        if not lines or not lines[0]:
            raise ConfigError(f"access.roles.{role}.password_file: {path} is empty")
        return lines[0]
    return None


def scram_verifier(conn: psycopg.Connection[tuple[object, ...]], role: str, password: str) -> str:
    """A SCRAM-SHA-256 verifier computed by libpq on this side: the password never travels."""
    raw = conn.pgconn.encrypt_password(password.encode(), role.encode(), b"scram-sha-256")
    return raw.decode()


def verifier_matches(verifier: str | None, password: str) -> bool:
    """Whether a stored SCRAM-SHA-256 verifier was made from `password` (for idempotent apply)."""
    if not verifier or not verifier.startswith("SCRAM-SHA-256$"):
        return False
    try:
        _, rest = verifier.split("$", 1)
        params, keys = rest.split("$", 1)
        iterations_text, salt_b64 = params.split(":", 1)
        stored_b64, _server_b64 = keys.split(":", 1)
        salt = base64.b64decode(salt_b64)
        iterations = int(iterations_text)
    except ValueError:
        return False
    # PostgreSQL applies SASLprep (NFKC-based) to the password when it is valid UTF-8.
    prepared = unicodedata.normalize("NFKC", password).encode()
    salted = hashlib.pbkdf2_hmac("sha256", prepared, salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored = hashlib.sha256(client_key).digest()
    return hmac.compare_digest(stored, base64.b64decode(stored_b64))
