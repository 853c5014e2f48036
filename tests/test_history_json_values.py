"""json and jsonb columns: a JSON `null` and an SQL NULL are different values, and history keeps
them apart in every place it shows or writes one (JSON, CSV, table, as-of, the SQL view, revert,
the browser's model). A json value keeps its own spelling (spaces, key order, duplicate keys)."""

from __future__ import annotations

import csv
import io
import json

import psycopg
import pytest

from pgwarden.history.browse import row_history
from pgwarden.history.names import TableName
from pgwarden.history.read import as_of, as_of_into
from pgwarden.history.revert import revert
from tests.conftest import Database, Run
from tests.history_helpers import events, setup_history

DOC = '{"b":  2, "b": 3}'  # json keeps it as written; jsonb would keep one "b"


@pytest.fixture
def docs(database: Database) -> Database:
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE docs (id int PRIMARY KEY, j jsonb, js json, ja jsonb[], t text)")
    setup_history(database.url)
    with database.connect(autocommit=True) as conn:
        conn.execute(
            "INSERT INTO docs VALUES (1, NULL, NULL, NULL, NULL), "
            "(2, 'null', 'null', ARRAY['null'::jsonb, NULL], ''), "
            "(3, %s, %s, ARRAY['{\"a\": 1.50}'::jsonb], 'null')",
            ('{"a": 1.50}', DOC),
        )
    return database


def _by_id(rows: list[dict[str, object]]) -> dict[object, dict[str, object]]:
    return {r["id"]: r for r in rows}


EXPECTED = {
    1: {"j": None, "js": None, "ja": None, "t": None},
    2: {"j": "null", "js": "null", "ja": ["null", None], "t": ""},
    3: {"j": '{"a": 1.50}', "js": DOC, "ja": ['{"a": 1.50}'], "t": "null"},
}


def test_json_null_and_sql_null_stay_apart_in_the_api_and_the_sql_view(docs: Database) -> None:
    with docs.connect() as conn:
        now = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
        rows = _by_id(as_of(conn, TableName("public", "docs"), now))
        for i, want in EXPECTED.items():
            assert {c: rows[i][c] for c in want} == want, i
        life = row_history(conn, TableName("public", "docs"), {"id": "2"})
        assert life[0].new["j"] == "null"
        assert life[0].new["ja"] == ["null", None]
        view = {e["row_key"]["id"]: e for e in events(conn, "docs")}
        assert view[1]["new_row"]["j"] is None
        assert view[2]["new_row"]["j"] == "null"
        assert view[3]["new_row"]["js"] == DOC


def test_json_null_and_sql_null_stay_apart_in_every_cli_format(
    docs: Database, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGWARDEN_DSN", docs.url)  # `run` clears it
    as_json = run("as-of", "docs", "now", "--format", "json")
    assert as_json.code == 0, as_json.err
    rows = _by_id(json.loads(as_json.out))
    for i, want in EXPECTED.items():
        assert {c: rows[i][c] for c in want} == want, i
    history = run("history", "docs", "--format", "json")
    new = {e["key"]["id"]: e["new"] for e in json.loads(history.out)}
    for i, want in EXPECTED.items():
        assert {c: new[i][c] for c in want} == want, i
    # history csv: the images are JSON, so they read back to the same values
    hist_csv = list(csv.DictReader(io.StringIO(run("history", "docs", "-o", "csv").out)))
    new = {json.loads(r["key"])["id"]: json.loads(r["new"]) for r in hist_csv}
    assert new[1]["j"] is None
    assert new[2]["j"] == "null"
    # as-of csv: NULL is an empty field, text (and the JSON text `null`) is quoted when it
    # could be mistaken for it, as PostgreSQL's COPY … CSV writes them
    lines = run("as-of", "docs", "now", "-o", "csv").out.splitlines()
    assert lines[0] == "id,j,js,ja,t"
    assert lines[1] == "1,,,,"
    assert lines[2].startswith("2,null,null,")
    assert lines[2].endswith(',""')
    parsed = list(csv.DictReader(io.StringIO("\n".join(lines))))
    assert parsed[2]["js"] == DOC
    # the table formats: SQL NULL is null (history) or an empty cell (as-of); text is quoted
    shown = run("history", "docs").out.replace("\n", " ")
    assert "j=null" in shown
    assert 'j="null"' in shown
    table = run("as-of", "docs", "now").out
    row2 = next(line for line in table.splitlines() if "│ 2 " in line)
    assert "null" in row2


def test_as_of_into_and_revert_write_back_the_null_that_was_there(docs: Database) -> None:
    with docs.connect(autocommit=True) as conn:
        before = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
        # JSON null becomes SQL NULL and the other way round, in one transaction
        with conn.transaction():
            conn.execute("UPDATE docs SET j = NULL, js = NULL WHERE id = 2")
            conn.execute("UPDATE docs SET j = 'null', js = 'null' WHERE id = 1")
            tx = conn.execute("SELECT txid_current()").fetchone()[0]  # type: ignore[index]
        with conn.transaction():
            shown = row_history(conn, TableName("public", "docs"), {"id": "2"})[-1]
        assert shown.changed_columns()["j"] == ("null", None)
        into = as_of_into(
            conn, TableName("public", "docs"), before, TableName("public", "docs_then")
        )
        assert into.rows == 3
        assert _null_kinds(conn, "docs_then") == {1: ("sql", "sql"), 2: ("json", "json"),
                                                  3: ("object", "text")}  # fmt: skip
        assert conn.execute("SELECT js::text FROM docs_then WHERE id = 3").fetchone() == (DOC,)
        revert(conn, int(tx))
        assert _null_kinds(conn, "docs") == {1: ("sql", "sql"), 2: ("json", "json"),
                                             3: ("object", "text")}  # fmt: skip


def _null_kinds(conn: psycopg.Connection[object], table: str) -> dict[int, tuple[str, str]]:
    rows = conn.execute(
        psycopg.sql.SQL(
            "SELECT id, CASE WHEN j IS NULL THEN 'sql' WHEN jsonb_typeof(j) = 'null' THEN 'json' "
            "ELSE jsonb_typeof(j) END, CASE WHEN js IS NULL THEN 'sql' "
            "WHEN js::text = 'null' THEN 'json' ELSE 'text' END FROM {} ORDER BY id"
        ).format(psycopg.sql.Identifier(table))
    ).fetchall()
    return {int(str(r[0])): (str(r[1]), str(r[2])) for r in rows}


def test_the_browser_shows_sql_null_as_null_and_json_null_as_its_text(docs: Database) -> None:
    from tests.test_web import _client, _login

    client = _login(_client(docs))
    for key, shown in (("id=1", '<span class="null">NULL</span>'), ("id=2", "<code>null</code>")):
        page = client.get("/row", params={"table": "public.docs", "key": key})
        assert page.status_code == 200
        assert shown in page.text, key
