"""The SQL that ships with pgwarden, read from package data and composed with psycopg.sql."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

from psycopg import sql


def sql_text(name: str) -> str:
    """A file under pgwarden/sql/, e.g. "history/capture.sql"."""
    return resources.files("pgwarden").joinpath(f"sql/{name}").read_text(encoding="utf-8")


def sql_version(*names: str) -> str:
    """A content hash of one or more files: reinstall when the shipped SQL changed."""
    digest = hashlib.sha256()
    for name in names:
        digest.update(sql_text(name).encode())
    return digest.hexdigest()[:16]


def compose(name: str, **names: sql.Composable) -> sql.Composed:
    # The file is our own package data, not user input: it is as trusted as a literal in code.
    return sql.SQL(sql_text(name)).format(**names)


@dataclass(frozen=True, order=True)
class Migration:
    number: int
    name: str  # e.g. "0002_native_rows"

    @property
    def path(self) -> str:
        return f"history/migrations/{self.name}.sql"


def migrations(folder: str = "history/migrations") -> list[Migration]:
    """The numbered migrations of a folder under pgwarden/sql/, in order."""
    found = []
    for entry in resources.files("pgwarden").joinpath(f"sql/{folder}").iterdir():
        match = re.fullmatch(r"((\d{4})_[a-z0-9_]+)\.sql", entry.name)
        if match:
            found.append(Migration(int(match.group(2)), match.group(1)))
    return sorted(found)
