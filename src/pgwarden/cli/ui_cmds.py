"""`pgwarden ui`: serve the history browser."""

from __future__ import annotations

import ipaddress
import socket

import click

from pgwarden.cli.app import err_console
from pgwarden.cli.context import AppContext, pass_app
from pgwarden.connect import connect
from pgwarden.errors import UserError
from pgwarden.web.security import Doors, new_token


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def allowed_hosts(host: str, port: int) -> frozenset[str]:
    """Host header values the UI answers to: the address it listens on (and, on loopback, the
    usual names for it). Anything else is refused: a page from another site that resolves its
    own name to 127.0.0.1 (DNS rebinding) does not get in even with the cookie."""
    shown = f"[{host}]" if ":" in host else host
    names = {f"{shown}:{port}"}
    if _is_loopback(host):
        names |= {f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"}
    return frozenset(names)


@click.command("ui")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True,
              help="TCP port (0: any free one).")  # fmt: skip
@click.option(
    "--host",
    default=None,
    help="Address to listen on (default 127.0.0.1). Another address is reachable from the "
    "network: the token is then the only lock.",
)
@click.option("--allow-revert", is_flag=True, help="Enable the revert button (off: read-only).")
@pass_app
def ui_cmd(app: AppContext, port: int, host: str | None, allow_revert: bool) -> None:
    """Serve the history browser on this machine and print its URL (with an access token).

    Overview, timeline, a row's life with diffs, transactions (and their revert with
    --allow-revert), tables as of a time, schema changes, access. Uses the same database as
    every other command (--dsn, DATABASE_URL, the local server).

    \b
    Example:
      pgwarden ui
      pgwarden ui --port 9000 --allow-revert
    """
    import uvicorn  # noqa: PLC0415  (only this command needs the server)

    from pgwarden.web.app import UiSettings, create_app  # noqa: PLC0415

    target = app.target()
    with connect(target):  # a wrong database is said now, not on the first page
        pass
    address = host or "127.0.0.1"
    if not _is_loopback(address):
        err_console.print(
            f"warning: listening on {address}: reachable from the network, over plain HTTP; "
            "anyone with the URL's token can read history"
            + (" and revert transactions" if allow_revert else ""),
            markup=False,
        )
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
    except OSError as exc:
        sock.close()
        raise UserError(
            f"cannot listen on {address}:{port} ({exc.strerror})",
            hint="choose another --port (0 picks a free one)",
        ) from None
    port = sock.getsockname()[1]
    token = new_token()
    settings = UiSettings(
        target=target,
        config=app.loaded.config,
        doors=Doors(token=token, hosts=allowed_hosts(address, port)),
        allow_revert=allow_revert,
    )
    shown = f"[{address}]" if ":" in address else address
    click.echo(f"http://{shown}:{port}/?token={token}", nl=True)
    err_console.print(
        f"pgwarden ui on {target.masked() or 'the PG* default database'} "
        f"({'revert enabled' if allow_revert else 'read-only'}); Ctrl-C stops it",
        markup=False,
    )
    config = uvicorn.Config(create_app(settings), log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
