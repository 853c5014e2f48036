"""The history browser's pages and doors, against a real PostgreSQL with real history: the
token, CSRF, read-only by default, escaping of stored values and names, revert, pagination."""

from __future__ import annotations

import re
from decimal import Decimal

import psycopg
import pytest
from psycopg import sql
from starlette.testclient import TestClient

from pgwarden.connect import Target
from pgwarden.web.app import UiSettings, create_app
from pgwarden.web.security import Doors
from tests.conftest import Database, Run
from tests.history_helpers import history_config, setup_history

HOST = "127.0.0.1:8765"
XSS = "<script>alert('x')</script><img src=x onerror=alert(1)>"


def _client(db: Database, *, allow_revert: bool = False, url: str | None = None) -> TestClient:
    settings = UiSettings(
        target=Target(url or db.url, "test"),
        config=history_config(),
        doors=Doors(token="t0ken-for-tests", hosts=frozenset({HOST})),
        allow_revert=allow_revert,
    )
    client = TestClient(create_app(settings), base_url=f"http://{HOST}")
    return client


def _login(client: TestClient) -> TestClient:
    got = client.get("/?token=t0ken-for-tests", follow_redirects=False)
    assert got.status_code == 303
    assert got.headers["location"] == "/"
    return client


@pytest.fixture
def tracked(database: Database) -> Database:
    with psycopg.connect(database.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE acct (id int PRIMARY KEY, owner text, bal numeric)")
        conn.execute(
            sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, {} text)").format(
                sql.Identifier(XSS), sql.Identifier("col" + XSS)
            )
        )
    setup_history(database.url)
    with psycopg.connect(database.url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO acct VALUES (1, 'ann', 10.5), (2, 'bob', 12345678901234567.0123456789)"
        )
        conn.execute("UPDATE acct SET bal = bal + 1 WHERE id = 1")
        conn.execute("INSERT INTO acct VALUES (3, %s, 0)", (XSS,))
        conn.execute(
            sql.SQL("INSERT INTO {} VALUES (1, {})").format(sql.Identifier(XSS), sql.Literal(XSS))
        )
    return database


def test_every_request_needs_the_token(tracked: Database) -> None:
    client = _client(tracked)
    for path in ("/", "/timeline", "/static/htmx.min.js", "/tx/1", "/access"):
        assert client.get(path).status_code == 401, path
    assert client.get("/?token=wrong", follow_redirects=False).status_code == 401
    assert client.get("/", headers={"Authorization": "Bearer t0ken-for-tests"}).status_code == 200
    # Another Host (DNS rebinding) is refused even with the token.
    other = TestClient(client.app, base_url="http://evil.example:8765")
    assert other.get("/?token=t0ken-for-tests", follow_redirects=False).status_code == 421
    _login(client)
    page = client.get("/")
    assert page.status_code == 200
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert page.headers["referrer-policy"] == "same-origin"


def test_pages_show_exact_values_and_escape_everything(tracked: Database) -> None:
    client = _login(_client(tracked))
    overview = client.get("/")
    assert "public.acct" in overview.text
    assert "<svg" in overview.text
    timeline = client.get("/timeline")
    assert timeline.status_code == 200
    # Stored markup, a table name and a column name with markup: text, never tags.
    for html in (
        timeline.text,
        client.get("/row", params={"table": "public.acct", "key": "id=3"}).text,
    ):
        assert "<script>alert" not in html
        assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html
    assert "<img src=x" not in timeline.text
    row = client.get("/row", params={"table": "public.acct", "key": "id=2"})
    assert row.status_code == 200
    assert "12345678901234567.0123456789" in row.text  # exact, not a float
    one = client.get("/row", params={"table": "public.acct", "key": "id=1"})
    assert "11.5" in one.text  # after the UPDATE
    assert "10.5" in one.text  # before it
    assert 'class="changed"' in one.text
    as_of = client.get("/table", params={"name": "public.acct"})
    assert as_of.status_code == 200
    assert "12345678901234567.0123456789" in as_of.text
    assert client.get("/schema").status_code == 200
    access = client.get("/access")
    assert access.status_code == 200
    assert "auditor" in access.text


def test_errors_are_messages_not_tracebacks(tracked: Database) -> None:
    client = _login(_client(tracked))
    missing = client.get("/tx/999999999")
    assert missing.status_code == 404
    assert "not in history" in missing.text
    untracked = client.get("/timeline", params={"table": "public.nosuch"})
    assert untracked.status_code == 404
    assert "has no history" in untracked.text
    assert "Traceback" not in untracked.text
    bad_time = client.get("/timeline", params={"since": "yesterday-ish"})
    assert bad_time.status_code == 400
    assert "is not a time" in bad_time.text


def _tx_of(client: TestClient, key: str) -> int:
    page = client.get("/row", params={"table": "public.acct", "key": key}).text
    found = re.findall(r'href="/tx/(\d+)"', page)
    return int(found[-1])


def test_revert_is_off_by_default_and_needs_the_csrf_token(tracked: Database) -> None:
    readonly = _login(_client(tracked))
    tx = _tx_of(readonly, "id=3")
    assert "Revert transaction" not in readonly.get(f"/tx/{tx}").text
    refused = readonly.post(f"/tx/{tx}/revert", data={"csrf": "x"})
    assert refused.status_code == 403
    with psycopg.connect(tracked.url) as conn:
        assert conn.execute("SELECT count(*) FROM acct WHERE id = 3").fetchone() == (1,)

    client = _login(_client(tracked, allow_revert=True))
    page = client.get(f"/tx/{tx}")
    assert "Revert transaction" in page.text
    assert "DELETE FROM" in page.text  # the compensating SQL, shown first
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
    assert csrf is not None
    # A cross-site form: no token (or another site's Origin) is refused, nothing changes.
    assert client.post(f"/tx/{tx}/revert", data={}).status_code == 403
    cross = client.post(f"/tx/{tx}/revert", data={"csrf": csrf.group(1)},
                        headers={"Origin": "http://evil.example"})  # fmt: skip
    assert cross.status_code == 403
    with psycopg.connect(tracked.url) as conn:
        assert conn.execute("SELECT count(*) FROM acct WHERE id = 3").fetchone() == (1,)
    done = client.post(f"/tx/{tx}/revert", data={"csrf": csrf.group(1)}, follow_redirects=False)
    assert done.status_code == 303, done.text
    with psycopg.connect(tracked.url) as conn:
        assert conn.execute("SELECT count(*) FROM acct WHERE id = 3").fetchone() == (0,)
        assert conn.execute("SELECT bal FROM acct WHERE id = 2").fetchone() == (
            Decimal("12345678901234567.0123456789"),
        )
    again = client.get(f"/tx/{tx}")
    assert "Already reverted" in again.text
    # The revert is in history like any other change.
    assert "revert of tx" in client.get("/timeline").text


def test_timeline_pages_by_key_not_offset(tracked: Database) -> None:
    with psycopg.connect(tracked.url, autocommit=True) as conn:
        for i in range(60):
            conn.execute("UPDATE acct SET bal = bal + 1 WHERE id = 1")
            if i % 7 == 0:
                conn.execute("UPDATE acct SET bal = bal + 0.5 WHERE id = 2")
    client = _login(_client(tracked))
    seen: list[str] = []
    url = "/timeline?table=public.acct&op=UPDATE"
    pages = 0
    while url:
        html = client.get(url, headers={"HX-Request": "true"} if pages else {}).text
        seen += re.findall(r'<a href="/tx/(\d+)">tx', html)
        more = re.search(r'hx-get="([^"]+)"', html)
        url = more.group(1).replace("&amp;", "&") if more else ""
        pages += 1
        assert pages < 10
    assert pages >= 3
    assert len(seen) == len(set(seen)) == 60 + 9 + 1  # every UPDATE transaction, once
    assert [int(t) for t in seen] == sorted((int(t) for t in seen), reverse=True)
    filtered = client.get(
        "/timeline", params={"table": "public.acct", "key": "id=2", "op": "update"}
    )
    assert len(re.findall(r'<a href="/tx/(\d+)">tx', filtered.text)) == 9


def test_the_ui_reads_with_the_auditor_role_only(tracked: Database) -> None:
    with psycopg.connect(tracked.admin_url, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS ui_reader")
        conn.execute("CREATE ROLE ui_reader LOGIN PASSWORD 'reader-pw' IN ROLE auditor")
        conn.execute(
            sql.SQL("GRANT CONNECT ON DATABASE {} TO ui_reader").format(
                sql.Identifier(tracked.name)
            )
        )
    url = psycopg.conninfo.make_conninfo(tracked.url, user="ui_reader", password="reader-pw")
    try:
        client = _login(_client(tracked, url=url))
        for path in ("/", "/timeline", "/schema"):
            page = client.get(path)
            assert page.status_code == 200, (path, re.findall(r"<h1>.*?</p>", page.text, re.S))
        assert client.get("/row", params={"table": "public.acct", "key": "id=1"}).status_code == 200
    finally:
        with psycopg.connect(tracked.admin_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("REVOKE ALL ON DATABASE {} FROM ui_reader").format(
                    sql.Identifier(tracked.name)
                )
            )
            conn.execute("DROP OWNED BY ui_reader")
            conn.execute("DROP ROLE ui_reader")


def test_a_bulk_transaction_costs_a_count_not_a_page_of_everything(tracked: Database) -> None:
    with psycopg.connect(tracked.url, autocommit=True) as conn:
        conn.execute("INSERT INTO acct SELECT g, 'bulk', g FROM generate_series(100, 2099) g")
    client = _login(_client(tracked))
    timeline = client.get("/timeline", params={"table": "public.acct", "op": "INSERT"})
    assert "… 1980 more" in timeline.text  # 2000 rows: 20 shown, the count exact
    tx = re.findall(r'<a href="/tx/(\d+)">tx', timeline.text)[0]
    page = client.get(f"/tx/{tx}")
    assert "a bulk transaction: 2000 events; the first 500" in page.text
    assert page.text.count('class="event"') == 500


def test_ui_says_at_once_when_the_database_cannot_be_reached(run: Run) -> None:
    result = run("--dsn", "postgresql://nobody@127.0.0.1:1/none", "ui", "--port", "0")
    assert result.code == 2
    assert "cannot connect" in result.err
    assert "Traceback" not in result.err
