"""The history browser in a real headless browser (Debian's chromium, driven by Playwright):
overview, a filtered timeline with "load more", a row's diff, a revert confirmed in the page and
seen in the database; a screenshot of each page is kept (build/screenshots/)."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgwarden.cli.ui_cmds import allowed_hosts
from pgwarden.connect import Target
from pgwarden.server.cluster import free_port
from pgwarden.web.app import UiSettings, create_app
from pgwarden.web.security import Doors
from tests.conftest import Database
from tests.history_helpers import history_config, setup_history

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parents[1] / "build" / "screenshots"
XSS = "<img src=x onerror=\"document.title='pwned'\">"

playwright = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists() and not os.environ.get("PGWARDEN_CI"),
    reason="no chromium (apt install chromium); CI installs it",
)


@pytest.fixture
def ui(database: Database) -> Iterator[str]:
    """`pgwarden ui --allow-revert`'s app on a free port of 127.0.0.1; yields its URL."""
    import uvicorn

    with psycopg.connect(database.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY, customer text, total numeric)")
    setup_history(database.url)
    with psycopg.connect(database.url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO orders SELECT g, 'customer ' || g, g * 10.25 FROM generate_series(1, 40) g"
        )
        for i in range(1, 31):
            conn.execute("UPDATE orders SET total = total + 1 WHERE id = %s", (i,))
        conn.execute("UPDATE orders SET customer = %s WHERE id = 7", (XSS,))
        conn.execute("SELECT set_config('pgwarden.actor', 'mallory', false)")
        conn.execute("DELETE FROM orders WHERE id = 12")  # the mistake, to undo in the page
    port = free_port()
    token = "browser-test-token"
    settings = UiSettings(
        target=Target(database.url, "test"),
        config=history_config(),
        doors=Doors(token=token, hosts=allowed_hosts("127.0.0.1", port)),
        allow_revert=True,
    )
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/?token={token}"
    server.should_exit = True
    thread.join(timeout=10)


def test_browse_filter_diff_and_revert_in_a_real_browser(ui: str, database: Database) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)

        page.goto(ui)
        assert page.url.endswith("/")  # the token went into a cookie and out of the address
        assert "public.orders" in page.inner_text("main")
        assert page.locator("svg.chart rect").count() > 0
        page.screenshot(path=str(SHOTS / "overview.png"), full_page=True)

        page.click("text=Timeline")
        page.select_option("select[name=table]", "public.orders")
        page.select_option("select[name=op]", "UPDATE")
        page.click("button:has-text('filter')")
        page.wait_for_selector("article.tx")
        first = page.locator("article.tx").count()
        assert first == 25
        page.click("text=load more")  # htmx: the next page appended in place
        page.wait_for_selector("#transactions article.tx:nth-of-type(26)")
        assert page.locator("article.tx").count() == 31
        assert "load more" not in page.inner_text("main")
        page.screenshot(path=str(SHOTS / "timeline.png"), full_page=True)

        page.click("a:has-text('id=7')")
        page.wait_for_selector("table.diff")
        changed = page.locator("table.diff tr.changed th").all_inner_texts()
        assert "customer" in changed
        # Stored markup is shown as text and never runs.
        assert XSS in page.inner_text("main")
        assert page.title() != "pwned"
        assert page.locator("main img").count() == 0
        page.screenshot(path=str(SHOTS / "row.png"), full_page=True)

        page.goto(ui.split("?", maxsplit=1)[0] + "timeline?op=DELETE")
        page.click("article.tx h3 a")
        page.wait_for_selector("#revert-form")
        assert "INSERT INTO" in page.inner_text("section.revert")  # the SQL, shown first
        page.screenshot(path=str(SHOTS / "transaction.png"), full_page=True)
        page.check("#revert-form input[name=confirm]")
        page.click("#revert-form button")
        page.wait_for_load_state()
        assert "reverted:" in page.inner_text("main"), page.inner_text("main")[:2000]
        page.screenshot(path=str(SHOTS / "reverted.png"), full_page=True)
        browser.close()
    assert not errors, errors
    with psycopg.connect(database.url) as conn:
        assert conn.execute("SELECT customer FROM orders WHERE id = 12").fetchone() == (
            "customer 12",
        )
