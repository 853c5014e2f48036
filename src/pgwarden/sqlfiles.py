"""The SQL that ships with pgwarden, read from package data and composed with psycopg.sql."""

from __future__ import annotations

import hashlib
from importlib import resources

from psycopg import sql


def sql_text(name: str) -> str:
    return resources.files("pgwarden").joinpath(f"sql/{name}").read_text(encoding="utf-8")


def sql_version(name: str) -> str:
    """A content hash: reinstall when the shipped SQL changed."""
    return hashlib.sha256(sql_text(name).encode()).hexdigest()[:16]


def compose(name: str, **names: sql.Composable) -> sql.Composed:
    # The file is our own package data, not user input: it is as trusted as a literal in code.
    return sql.SQL(sql_text(name)).format(**names)
