"""The UI's doors: a random token on every request, a CSRF token on every POST, only the host
names it was started for (no DNS rebinding), and headers that keep pages from loading anything
not served by pgwarden itself."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from urllib.parse import urlencode

from starlette.datastructures import URL
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response

COOKIE = "pgwarden_ui"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def new_token() -> str:
    return secrets.token_urlsafe(24)


@dataclass(frozen=True)
class Doors:
    token: str
    hosts: frozenset[str]  # Host header values accepted ("127.0.0.1:8765", …)

    @property
    def csrf(self) -> str:
        """Derived from the token: a page can carry it, a cross-site form cannot know it."""
        return hmac.new(self.token.encode(), b"pgwarden csrf", hashlib.sha256).hexdigest()

    def token_ok(self, request: Request) -> bool:
        given = request.cookies.get(COOKIE) or ""
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return hmac.compare_digest(given.encode(), self.token.encode())

    def csrf_ok(self, given: str, request: Request) -> bool:
        origin = request.headers.get("origin")
        # "null" comes from privacy settings and sandboxed frames alike: it proves nothing
        # either way, and the token below is what a cross-site form cannot have.
        if origin not in (None, "null") and URL(origin).netloc not in self.hosts:
            return False
        return bool(given) and hmac.compare_digest(given.encode(), self.csrf.encode())


class DoorsMiddleware(BaseHTTPMiddleware):
    def __init__(self, app: object, doors: Doors) -> None:
        super().__init__(app)  # type: ignore[arg-type]
        self.doors = doors

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        if request.headers.get("host", "") not in self.doors.hosts:
            return _secured(PlainTextResponse("unknown host", status_code=421))
        given = request.query_params.get("token")
        if given is not None:
            # The URL printed at start: trade the token for a cookie, and drop it from the
            # address bar (and from any Referer) at once.
            if not hmac.compare_digest(given.encode(), self.doors.token.encode()):
                return _secured(PlainTextResponse("wrong token", status_code=401))
            rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            target = request.url.path + ("?" + urlencode(rest) if rest else "")
            response: Response = RedirectResponse(target, status_code=303)
            response.set_cookie(
                COOKIE, self.doors.token, httponly=True, samesite="strict", path="/"
            )
            return _secured(response)
        if not self.doors.token_ok(request):
            return _secured(
                PlainTextResponse(
                    "pgwarden ui: open the URL with the token that `pgwarden ui` printed",
                    status_code=401,
                )
            )
        return _secured(await call_next(request))


def _secured(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    # Same-origin: our own forms carry an Origin to check; other sites learn nothing (and the
    # token never stays in a URL: it is traded for a cookie at once).
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Cache-Control"] = "no-store"
    return response
