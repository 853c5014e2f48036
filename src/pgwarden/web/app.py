"""`pgwarden ui`: a small ASGI app over the same Python API the CLI uses.

Every page parses its query, calls pgwarden.history (browse, read, revert) or pgwarden.access,
and renders a Jinja2 template with autoescaping on: a value stored in a tracked row, a column
name or a table name is text on the page, never markup. Database errors reach the page as the
CLI's messages; anything unexpected as a short page naming the log that has the traceback.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlencode

import psycopg
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from pgwarden.access import access_report
from pgwarden.boundary import user_db_error, write_crash_log
from pgwarden.config import Config
from pgwarden.connect import Target, connect
from pgwarden.errors import PgwardenError, UserError
from pgwarden.history import browse
from pgwarden.history.catalog import HistorySchema
from pgwarden.history.names import TableName, parse_key, parse_table
from pgwarden.history.read import as_of, columns_of
from pgwarden.history.revert import plan_revert, revert
from pgwarden.history.verify import verify
from pgwarden.web.chart import activity_svg
from pgwarden.web.security import Doors, DoorsMiddleware

PAGE = 25  # transactions per timeline page
ROWS_PER_PAGE = 100  # rows per page of a table as of a time
COLLAPSE_OVER = 120  # characters: longer values are folded


@dataclass(frozen=True)
class UiSettings:
    target: Target
    config: Config
    doors: Doors
    allow_revert: bool = False

    @property
    def schema(self) -> HistorySchema:
        return HistorySchema(self.config.history.schema_name)


def _env() -> Environment:
    env = Environment(
        loader=PackageLoader("pgwarden.web", "templates"),
        autoescape=select_autoescape(["html"], default=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["value"] = browse.describe_value
    env.filters["utc"] = lambda d: d.astimezone(UTC).isoformat(timespec="seconds")
    env.globals["COLLAPSE_OVER"] = COLLAPSE_OVER
    env.globals["key_query"] = key_query
    return env


def key_query(table: str, key: Any) -> str:
    """The row page's query string for a row key (a JSON object of the key columns)."""
    pairs = [("table", table)]
    if isinstance(key, dict):
        pairs += [("key", f"{k}={browse.describe_value(v)}") for k, v in key.items()]
    return urlencode(pairs)


def create_app(settings: UiSettings) -> Starlette:
    env = _env()

    def page(request: Request, template: str, status: int = 200, **values: Any) -> HTMLResponse:
        html = env.get_template(template).render(
            request=request,
            csrf=settings.doors.csrf,
            allow_revert=settings.allow_revert,
            database=settings.target.masked() or "(PG* defaults)",
            **values,
        )
        return HTMLResponse(html, status_code=status)

    @contextmanager
    def db(*, autocommit: bool = False) -> Iterator[psycopg.Connection[Any]]:
        with connect(settings.target, autocommit=autocommit) as conn:
            yield conn

    def guarded(handler: Callable[[Request], Response]) -> Callable[[Request], Response]:
        def run(request: Request) -> Response:
            try:
                return handler(request)
            except PgwardenError as exc:
                status = (
                    404 if "no history" in exc.message or "not in history" in exc.message else 400
                )
                return page(request, "error.html", status, message=exc.message, hint=exc.hint)
            except psycopg.Error as exc:
                hint = user_db_error(exc)
                if hint is None:
                    where = write_crash_log(exc)
                    return page(request, "error.html", 500, message="unexpected database error",
                                hint=f"the traceback is in {where}")  # fmt: skip
                message = (exc.diag.message_primary or str(exc)).strip()
                return page(request, "error.html", 400, message=message, hint=hint)
            except Exception as exc:
                where = write_crash_log(exc)
                return page(request, "error.html", 500, message="unexpected error",
                            hint=f"the traceback is in {where}")  # fmt: skip

        run.__name__ = handler.__name__
        return run

    @guarded
    def overview(request: Request) -> Response:
        q = request.query_params
        days = _int(q.get("days"), 7, 1, 3650) or 7
        until = datetime.now(UTC)
        since = until - timedelta(days=days)
        unit = "hour" if days <= 2 else "day" if days <= 90 else "week"
        table = _table(q.get("table"))
        with db() as conn:
            stats = browse.table_stats(conn, schema=settings.schema)
            chart_rows = browse.activity(conn, since, until, unit=unit, table=table,
                                         schema=settings.schema)  # fmt: skip
            failures = browse.capture_failures(conn, schema=settings.schema)
            report = verify(conn, schema=settings.schema, deep=False)
            ddl = browse.schema_changes(conn, limit=10, schema=settings.schema)
        chart = activity_svg(chart_rows, since, until, unit)
        return page(
            request, "overview.html", stats=stats, chart=chart, days=days,
            table=str(table) if table else "", failures=failures, report=report, ddl=ddl,
        )  # fmt: skip

    def _tx_filter(q: Any) -> browse.TxFilter:
        table = _table(q.get("table"))
        key = _key(q.getlist("key"))
        if key and table is None:
            raise UserError("a row key needs a table", hint="choose a table first")
        op = (q.get("op") or "").upper() or None
        return browse.TxFilter(
            table=table, op=op, key=key or None, db_user=q.get("db_user") or None,
            app_user=q.get("app_user") or None, since=_time(q.get("since"), "since", q.get("tz")),
            until=_time(q.get("until"), "until", q.get("tz")),
        )  # fmt: skip

    @guarded
    def timeline(request: Request) -> Response:
        q = request.query_params
        flt = _tx_filter(q)
        before = _int(q.get("before"), None, 1, None)
        with db() as conn:
            result = browse.transactions(conn, flt, before=before, limit=PAGE,
                                         schema=settings.schema)  # fmt: skip
            tables = browse.table_names(conn, schema=settings.schema)
        kept = [(k, v) for k, v in q.multi_items() if k != "before" and v]
        more = (
            urlencode([*kept, ("before", str(result.next_before))])
            if result.next_before is not None
            else None
        )
        values: dict[str, Any] = {"page": result, "more": more, "q": q, "tables": tables}
        if request.headers.get("hx-request") == "true" and before is not None:
            return page(request, "_tx_list.html", **values)
        return page(request, "timeline.html", **values)

    @guarded
    def transaction(request: Request) -> Response:
        tx = _int(request.path_params["tx"], None, 1, None)
        assert tx is not None
        plan = None
        statements: list[tuple[str, str]] = []
        with db() as conn:
            groups = browse.transaction(conn, tx, schema=settings.schema)
            if not groups:
                raise UserError(f"transaction {tx} is not in history")
            if settings.allow_revert:
                plan = plan_revert(conn, tx, schema=settings.schema)
                statements = [(s.summary, s.statement.as_string(conn)) for s in plan.steps]
        return page(request, "tx.html", tx=tx, groups=groups, plan=plan, statements=statements,
                    reverted=request.query_params.get("reverted"))  # fmt: skip

    async def revert_tx(request: Request) -> Response:
        if not settings.allow_revert:
            return page(request, "error.html", 403, message="reverting is off",
                        hint="start the UI with `pgwarden ui --allow-revert`")  # fmt: skip
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        if not settings.doors.csrf_ok(form.get("csrf", [""])[0], request):
            return page(request, "error.html", 403, message="this form did not come from this page",
                        hint="open the transaction again and use its revert button")  # fmt: skip
        return await run_in_threadpool(_do_revert, request)

    @guarded
    def _do_revert(request: Request) -> Response:
        tx = _int(request.path_params["tx"], None, 1, None)
        assert tx is not None
        with db(autocommit=True) as conn:
            revert(conn, tx, schema=settings.schema)
        return RedirectResponse(f"/tx/{tx}?reverted=1", status_code=303)

    @guarded
    def row(request: Request) -> Response:
        q = request.query_params
        table = _table(q.get("table"))
        key = _key(q.getlist("key"))
        if table is None or not key:
            raise UserError("a row is a table and its key", hint="e.g. ?table=public.t&key=id=7")
        at = _time(q.get("at"), "at", q.get("tz"))
        with db() as conn:
            life = browse.row_history(conn, table, key, schema=settings.schema)
            then = as_of(conn, table, at, key=key, schema=settings.schema) if at else None
        return page(request, "row.html", table=str(table), key=key, life=life, at=at, then=then,
                    show_all=q.get("all") == "1")  # fmt: skip

    @guarded
    def table_as_of(request: Request) -> Response:
        q = request.query_params
        table = _table(q.get("name"))
        if table is None:
            raise UserError("which table?", hint="e.g. ?name=public.t&at=2026-12-02T10:00")
        at = _time(q.get("at"), "at", q.get("tz")) or datetime.now(UTC)
        number = _int(q.get("page"), 1, 1, None) or 1
        with db() as conn:
            rows = as_of(conn, table, at, schema=settings.schema)
        shown = rows[(number - 1) * ROWS_PER_PAGE : number * ROWS_PER_PAGE]
        return page(request, "table.html", table=str(table), at=at, rows=shown,
                    columns=columns_of(shown), total=len(rows), number=number,
                    pages=max(1, -(-len(rows) // ROWS_PER_PAGE)))  # fmt: skip

    @guarded
    def schema_changes(request: Request) -> Response:
        before = _int(request.query_params.get("before"), None, 1, None)
        with db() as conn:
            changes = browse.schema_changes(conn, before=before, schema=settings.schema)
        more = changes[-1].id if len(changes) == 50 else None
        return page(request, "schema.html", changes=changes, more=more)

    @guarded
    def access(request: Request) -> Response:
        with db() as conn:
            report = access_report(conn, settings.config)
        tables = sorted({p["table"] for p in report.table_privileges})
        grantees = sorted({p["grantee"] for p in report.table_privileges})
        cells = {(p["grantee"], p["table"]): p["privileges"] for p in report.table_privileges}
        return page(request, "access.html", report=report, tables=tables, grantees=grantees,
                    cells=cells)  # fmt: skip

    static = resources.files("pgwarden.web").joinpath("static")
    routes = [
        Route("/", overview),
        Route("/timeline", timeline),
        Route("/tx/{tx}", transaction),
        Route("/tx/{tx}/revert", revert_tx, methods=["POST"]),
        Route("/row", row),
        Route("/table", table_as_of),
        Route("/schema", schema_changes),
        Route("/access", access),
        Mount("/static", StaticFiles(directory=str(static)), name="static"),
    ]
    return Starlette(routes=routes, middleware=[Middleware(DoorsMiddleware, doors=settings.doors)])


def _int(text: str | None, default: int | None, low: int, high: int | None) -> int | None:
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{text!r} is not a number") from None
    if value < low or (high is not None and value > high):
        raise UserError(f"{value} is out of range")
    return value


def _table(text: str | None) -> TableName | None:
    return parse_table(text) if text else None


def _key(pairs: list[str]) -> dict[str, str]:
    return parse_key((p for p in pairs if p), option="key")


def _time(text: str | None, what: str, tz: str | None = None) -> datetime | None:
    """A time from a form. A browser's date-time input has no zone: app.js sends the browser's
    offset (`tz`, minutes east of UTC) beside it; without one, UTC."""
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise UserError(f"{what}: {text!r} is not a time (ISO 8601)") from None
    if parsed.tzinfo:
        return parsed
    minutes = _int(tz, 0, -14 * 60, 14 * 60) or 0
    return parsed.replace(tzinfo=timezone(timedelta(minutes=minutes)))
