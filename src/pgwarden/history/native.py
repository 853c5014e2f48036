"""Which capture engine a database uses: the compiled trigger or PL/pgSQL.

Both write the same history (sql/history/capture.sql). The compiled one
(native/pgwarden_capture.c) costs less than half as much per statement; it needs a superuser to
create it (C functions are untrusted) and a library built for the server's major version that
the server itself can read: true for pgwarden's own local server and any server on this machine,
not for a remote one or a container image, which get PL/pgSQL. `history.trigger` chooses: auto
(compiled when possible), compiled (refuse otherwise) or plpgsql.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from psycopg import sql

from pgwarden.errors import ConfigError
from pgwarden.history import catalog
from pgwarden.history.catalog import Conn, HistorySchema
from pgwarden.history.upgrade import DOMAIN, refresh_tracked, set_meta
from pgwarden.plan import Operation

ENGINES = ("auto", "compiled", "plpgsql")
# Must match CAPTURE_VERSION in pgwarden_capture.c: the trigger arguments it understands.
INTERFACE_VERSION = 1
SYMBOL = "pgwarden_capture"


def library(major: int) -> Path | None:
    """The compiled trigger built for PostgreSQL `major`, if this installation has one."""
    suffix = ".dylib" if sys.platform == "darwin" else ".so"
    candidate = resources.files("pgwarden").joinpath(f"native/capture_pg{major}{suffix}")
    path = Path(str(candidate))
    return path if path.is_file() else None


def server_major(conn: Conn) -> int:
    row = conn.execute("SELECT current_setting('server_version_num')::int / 10000").fetchone()
    assert row is not None
    return int(str(row[0]))


def _server_sees(conn: Conn, path: Path) -> bool:
    """Whether the server (not this process) finds the file: same machine, readable path."""
    with conn.transaction():
        row = conn.execute(
            "SELECT (pg_catalog.pg_stat_file(%s, true)).size IS NOT NULL", (str(path),)
        ).fetchone()
    return bool(row and row[0])


def installed_library(conn: Conn, schema: HistorySchema) -> str | None:
    row = conn.execute(
        "SELECT p.probin FROM pg_catalog.pg_proc p WHERE p.oid = "
        "pg_catalog.to_regprocedure(pg_catalog.quote_ident(%s) || '.capture_native()')",
        (schema.name,),
    ).fetchone()
    return str(row[0]) if row and row[0] is not None else None


def usable_library(conn: Conn) -> tuple[Path | None, str]:
    """The library this server can use, or None and why not."""
    if not catalog.is_superuser(conn):
        return None, "creating a C function needs a superuser"
    major = server_major(conn)
    path = library(major)
    if path is None:
        return None, f"this pgwarden installation has no compiled trigger for PostgreSQL {major}"
    if not _server_sees(conn, path):
        return None, f"the server cannot see {path} (it runs on another machine or in a container)"
    return path, ""


def engine_operations(conn: Conn, schema: HistorySchema, engine: str) -> list[Operation]:
    """Switch the database to the engine `engine` asks for, when it is not using it already."""
    if engine not in ENGINES:
        raise ConfigError(
            f"history.trigger: {engine!r} is not a capture engine",
            hint="use auto, compiled or plpgsql",
        )
    current = catalog.meta(conn, schema).get("engine", "plpgsql")
    if engine == "plpgsql":
        if current == "plpgsql" and installed_library(conn, schema) is None:
            return []
        return [
            _use_plpgsql(schema, "capture with the PL/pgSQL triggers (history.trigger: plpgsql)")
        ]
    path, why = usable_library(conn)
    if path is None:
        if engine == "compiled":
            raise ConfigError(
                f"history.trigger: compiled, but {why}",
                hint="use history.trigger: auto to fall back to the PL/pgSQL triggers",
            )
        if current == "c":  # was compiled, cannot be now (e.g. the library is gone)
            return [_use_plpgsql(schema, f"capture with the PL/pgSQL triggers: {why}")]
        return []
    if current == "c" and installed_library(conn, schema) == str(path):
        return []
    return [
        Operation(
            DOMAIN,
            f"capture with the compiled trigger ({path.name})",
            sql.Composed(
                [
                    sql.SQL(
                        "CREATE OR REPLACE FUNCTION {version}() RETURNS int LANGUAGE c "
                        "AS {path}, 'pgwarden_capture_version';\n"
                        "DO $check$ BEGIN IF {version}() <> {want} THEN RAISE EXCEPTION "
                        "'pgwarden: %s is not the compiled trigger of this release', {path} "
                        "USING HINT = 'reinstall pgwarden'; END IF; END $check$;\n"
                        "CREATE OR REPLACE FUNCTION {capture}() RETURNS trigger LANGUAGE c "
                        "AS {path}, {symbol};\n"
                        "REVOKE ALL ON FUNCTION {capture}() FROM PUBLIC;\n"
                        "REVOKE ALL ON FUNCTION {version}() FROM PUBLIC;\n"
                    ).format(
                        version=schema.func("capture_native_version"),
                        capture=schema.func("capture_native"),
                        path=sql.Literal(str(path)),
                        symbol=sql.Literal(SYMBOL),
                        want=sql.Literal(INTERFACE_VERSION),
                    ),
                    set_meta(schema, "engine", "c"),
                    refresh_tracked(schema),
                ]
            ),
        )
    ]


def _use_plpgsql(schema: HistorySchema, description: str) -> Operation:
    return Operation(
        DOMAIN,
        description,
        sql.Composed(
            [
                set_meta(schema, "engine", "plpgsql"),
                refresh_tracked(schema),
                # After the triggers stopped calling it.
                sql.SQL("DROP FUNCTION IF EXISTS {}();\nDROP FUNCTION IF EXISTS {}();\n").format(
                    schema.func("capture_native"), schema.func("capture_native_version")
                ),
            ]
        ),
    )
