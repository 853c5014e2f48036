"""Following the slot over the replication protocol: the consumer that `history follow` runs.

Reading the slot over SQL (`wal.consume`) decodes the WAL again from the slot's restart point
on every call, and `pg_replication_slot_advance` decodes the batch once more: under steady
writes that was most of the consumer's cost on the server. Over a replication connection
(`replication=database`, `START_REPLICATION … LOGICAL`) the server's walsender decodes each
record once, as it is written, and sends the changes of each transaction when it commits.

Exactly once, as with SQL: each batch of whole transactions is written with the progress it
reaches in one database transaction (`wal.write`, on the ordinary connection, under the same
lock as the other consumers), and only after that commits is the server told it may let that
WAL go (a standby status update). After a crash the walsender starts again from the last
position confirmed, and the transactions history already has are skipped by their LSN.

While this consumer holds the slot it is active, and nobody else can read it: readers wait for
it to pass the WAL position of their own start (`wal.catch_up`). psycopg has no replication
protocol; its `pq` layer does: the replication connection is a psycopg connection whose libpq
connection is driven directly (CopyData in both directions).
"""

from __future__ import annotations

import contextlib
import selectors
import struct
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import psycopg
from psycopg import errors, pq, sql
from psycopg.conninfo import make_conninfo

from pgwarden.history import wal
from pgwarden.history.catalog import Conn, HistorySchema

# How often a standby status update goes to the server while nothing else does (seconds): well
# under wal_sender_timeout (60 s by default), after which the server ends a silent connection.
STATUS_EVERY = 10.0

_XLOGDATA = 0x77  # 'w'
_KEEPALIVE = 0x6B  # 'k'
_HEADER = 1 + 8 + 8 + 8  # 'w', WAL start, WAL end, send time
_BEGIN, _COMMIT, _MESSAGE = 0x42, 0x43, 0x4D
_CHANGES = frozenset(b"IUD")
_U64 = struct.Struct(">Q")
_STATUS = struct.Struct(">cQQQqB")  # 'r', written, flushed, applied, send time, reply
_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


class StreamUnavailable(Exception):
    """The server refused a replication connection (pg_hba.conf, max_wal_senders, a pooler in
    between): the caller polls over SQL instead."""


class SlotBusy(Exception):
    """Another process has the slot for now (a reader catching up inline, another consumer)."""


class StreamEnded(Exception):
    """The server ended the stream (the slot invalidated, a shutdown)."""


def replication_connection(conn: Conn) -> psycopg.Connection[tuple[object, ...]]:
    """A replication connection to the same server and database as `conn`, as the same role,
    with the same settings (its password and keepalives included)."""
    params = {
        opt.keyword.decode(): opt.val.decode()
        for opt in conn.pgconn.info
        if opt.val and opt.keyword.decode() not in ("replication", "dbname")
    }
    params["dbname"] = conn.info.dbname
    try:
        return psycopg.connect(make_conninfo("", **params), replication="database",
                               autocommit=True)  # fmt: skip
    except psycopg.OperationalError as exc:
        raise StreamUnavailable(_first_line(exc)) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def _now_micros() -> int:
    return int((datetime.now(UTC) - _EPOCH).total_seconds() * 1_000_000)


class _Stream:
    """The replication connection's COPY BOTH: messages in, status updates out."""

    def __init__(self, rep: psycopg.Connection[tuple[object, ...]]) -> None:
        self.rep = rep
        self.pgconn = rep.pgconn
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.pgconn.socket, selectors.EVENT_READ)

    def start(self, slot: str, publication: str) -> None:
        # The server starts at the slot's confirmed position whatever is asked below it.
        command = sql.SQL(
            "START_REPLICATION SLOT {} LOGICAL 0/0 (proto_version '1', publication_names {}, "
            "messages 'true')"
        ).format(sql.Identifier(slot), sql.Literal(wal.quote_publication(publication)))
        self.pgconn.send_query(command.as_bytes(self.rep))
        while True:
            self._read(timeout=None)
            if not self.pgconn.is_busy():
                break
        result = self.pgconn.get_result()
        if result is None or result.status != pq.ExecStatus.COPY_BOTH:
            state = result.error_field(pq.DiagnosticField.SQLSTATE) if result else None
            message = (
                result.error_message.decode(errors="replace").strip() if result else "no result"
            )
            if state == str(errors.ObjectInUse.sqlstate).encode():
                raise SlotBusy(message)
            raise StreamEnded(message)

    def _read(self, timeout: float | None) -> None:
        """Wait (up to `timeout` seconds) until the socket has data, and take it in."""
        self.selector.select(timeout)
        self.pgconn.consume_input()  # raises when the connection is gone
        self.pgconn.flush()

    def message(self, timeout: float) -> memoryview | bytes | None:
        """The next CopyData message, or None when none came within `timeout` seconds."""
        n, data = self.pgconn.get_copy_data(1)
        if n == 0:
            self._read(timeout)
            n, data = self.pgconn.get_copy_data(1)
        if n > 0:
            return data
        if n == 0:
            return None
        if n == -1:  # the server ended the COPY: its result says why
            result = self.pgconn.get_result()
            reason = result.error_message.decode(errors="replace").strip() if result else ""
            raise StreamEnded(reason or "the server ended replication")
        raise psycopg.OperationalError(
            self.pgconn.get_error_message().strip() or "the replication connection failed"
        )

    def status(self, flushed: int) -> None:
        """Tell the server history has everything up to `flushed`: the slot may move there."""
        body = _STATUS.pack(b"r", flushed, flushed, flushed, _now_micros(), 0)
        while True:
            sent = self.pgconn.put_copy_data(body)
            if sent == 1:
                break
            if sent < 0:
                raise psycopg.OperationalError(self.pgconn.get_error_message().strip())
            self.pgconn.flush()  # 0: libpq's buffer is full (non-blocking): make room
            time.sleep(0.01)
        self.pgconn.flush()

    @contextlib.contextmanager
    def kept_alive(self, flushed: int) -> Iterator[None]:
        """While the caller writes a batch (a huge transaction's can take minutes), status
        updates keep going out from a thread of their own, so that the server does not end the
        connection as silent (wal_sender_timeout). Nothing else uses this connection then."""
        done = threading.Event()

        def keep() -> None:
            while not done.wait(STATUS_EVERY):
                try:
                    self.status(flushed)
                except psycopg.Error:
                    return  # the connection is gone: the caller finds out on its next read

        keeper = threading.Thread(target=keep, name="pgwarden-status", daemon=True)
        keeper.start()
        try:
            yield
        finally:
            done.set()
            keeper.join()

    def close(self) -> None:
        self.selector.close()
        self.rep.close()


def follow(
    conn: Conn,
    schema: HistorySchema,
    *,
    interval: float = 0.2,
    batch: int = wal.BATCH_CHANGES,
    stop: Callable[[], bool] = lambda: False,
    report: Callable[[wal.BatchResult], None] | None = None,
    note: Callable[[str], None] = lambda _: None,
) -> None:
    """The consumer: over a replication connection, or over SQL where the server refuses one
    (said through `note`), until `stop()` says so. A lost slot (fail-open) is resumed with its
    gap recorded, as any consumer does; a stream the server ends otherwise raises
    psycopg.OperationalError, for the caller to reconnect."""
    setup = wal.setup(conn, schema)
    assert setup is not None
    busy_said = False
    while not stop():
        if wal.slot_lost(conn, setup):
            wal.resume(conn, schema, wal.LOST_REASON)
        try:
            stream(conn, schema, interval=interval, batch=batch, stop=stop, report=report)
            return
        except StreamUnavailable as exc:
            note(f"no replication connection ({exc}); reading the slot over SQL instead")
            wal.poll(conn, schema, interval=interval, batch=batch, stop=stop, report=report)
            return
        except SlotBusy as exc:
            # A reader catching up inline has it for a moment; another consumer, for as long
            # as it runs: this one takes over when it stops.
            if not busy_said:
                note(f"waiting for the slot: {exc}")
                busy_said = True
            time.sleep(0.5)
        except StreamEnded as exc:
            if not wal.slot_lost(conn, setup):
                raise psycopg.OperationalError(f"replication ended: {exc}") from None
        except psycopg.OperationalError as exc:
            if conn.broken:
                raise  # the server is gone: the caller reconnects (`follow --wait`)
            # Only the replication connection (a walsender that timed out, was terminated):
            # start it again; the slot kept everything not confirmed.
            note(f"the replication connection ended ({_first_line(exc)}); starting it again")
            time.sleep(1.0)


def stream(
    conn: Conn,
    schema: HistorySchema,
    *,
    interval: float,
    batch: int,
    stop: Callable[[], bool],
    report: Callable[[wal.BatchResult], None] | None = None,
) -> None:
    """Follow the slot until `stop()` says so. Each batch is written when the server has
    nothing more to send right now and `interval` seconds have passed since the last one (so a
    steady trickle of small transactions makes a few writes a second, not one each), or at once
    when it holds `batch` changes. Raises StreamUnavailable, SlotBusy or StreamEnded for the
    caller to handle."""
    setup = wal.setup(conn, schema)
    assert setup is not None
    rep = replication_connection(conn)
    link = _Stream(rep)
    try:
        link.start(setup.slot, setup.publication)
        _follow(conn, schema, setup, link, interval=interval, batch=batch, stop=stop,
                report=report)  # fmt: skip
    finally:
        link.close()


def _follow(
    conn: Conn,
    schema: HistorySchema,
    setup: wal.WalSetup,
    link: _Stream,
    *,
    interval: float,
    batch: int,
    stop: Callable[[], bool],
    report: Callable[[wal.BatchResult], None] | None,
) -> None:
    relations: dict[int, wal.Relation] = {}  # described once per stream
    pending: list[bytes] = []  # pgoutput messages received and not written yet
    whole = 0  # how many of them are whole transactions and ticks (the rest: one begun)
    whole_changes = changes = 0
    in_tx = False
    confirmed = _confirmed(conn, setup.slot)  # what the server was last told history has
    idle_end = 0  # the end of the WAL sent, at a keepalive with nothing pending
    answer = False  # the server asked for a status update
    now = time.monotonic()
    written_at = status_at = ticked = now
    while not stop():
        now = time.monotonic()
        if not (whole and (whole_changes >= batch or now >= written_at + interval)):
            data = link.message(timeout=max(0.0, written_at + interval - now) if whole else 1.0)
            if data is not None:
                kind = data[0]
                if kind == _XLOGDATA:
                    msg = bytes(data[_HEADER:])
                    pending.append(msg)
                    first = msg[0]
                    if first in _CHANGES:
                        changes += 1
                    elif first == _BEGIN:
                        in_tx = True
                    elif first == _COMMIT or (first == _MESSAGE and not in_tx):
                        # the end of a transaction, or a non-transactional message (a tick)
                        in_tx = False
                        whole, whole_changes = len(pending), changes
                    if now - status_at <= STATUS_EVERY:
                        continue
                    # else on to a status update: a huge transaction can take minutes to come
                elif kind == _KEEPALIVE:
                    if not pending:
                        idle_end = max(idle_end, _U64.unpack_from(data, 1)[0])
                    answer = answer or bool(data[17])
                else:
                    continue  # nothing else is sent in a logical stream
            now = time.monotonic()
        if whole and (whole_changes >= batch or now >= written_at + interval):
            result = wal.BatchResult()
            with link.kept_alive(confirmed):
                safe = _write(conn, schema, setup, pending[:whole], relations, result)
            del pending[:whole]
            changes -= whole_changes
            whole = whole_changes = 0
            written_at = now = time.monotonic()
            if safe > confirmed:
                link.status(safe)
                confirmed, status_at = safe, now
            if report is not None and (result.transactions or result.skipped):
                report(result)
        if not pending and idle_end > confirmed:
            # The server went through that WAL and sent nothing of history's: it may let it go.
            confirmed = idle_end
            answer = True
        if answer or now - status_at > STATUS_EVERY:
            link.status(confirmed)
            answer, status_at = False, now
        if not pending and now - ticked > wal.TICK_EVERY:
            # While the tracked tables are quiet, other writes still fill the WAL, and the
            # server says how far it went only now and then: a tick comes back at once, and
            # the slot moves past it.
            wal.tick(conn)
            ticked = now


def _confirmed(conn: Conn, slot: str) -> int:
    row = conn.execute(
        "SELECT confirmed_flush_lsn::text FROM pg_catalog.pg_replication_slots "
        "WHERE slot_name = %s",
        (slot,),
    ).fetchone()
    return (wal.lsn_int(row[0]) or 0) if row else 0


def _write(
    conn: Conn,
    schema: HistorySchema,
    setup: wal.WalSetup,
    messages: list[bytes],
    relations: dict[int, wal.Relation],
    result: wal.BatchResult,
) -> int:
    """One batch of whole transactions into history, exactly once; where the slot may move."""
    decoded = wal.parse(messages, relations)
    if not any(msg[0] == _BEGIN for msg in messages):
        # Ticks only: nothing to write, the slot may just move past them.
        return max((item.lsn for item in decoded if isinstance(item, wal.Tick)), default=0)
    with conn.transaction():
        done = wal.lock_progress(conn, schema, setup)
        return wal.write(conn, schema, setup, decoded, done, result)


__all__ = ["SlotBusy", "StreamEnded", "StreamUnavailable", "follow", "stream"]
