"""Capture from the WAL: the consumer that turns logical decoding into history.

A table with `history.capture: wal` has no trigger on its write path. Its changes reach
history through a logical replication slot read with the built-in `pgoutput` plugin, over plain
SQL (`pg_logical_slot_peek_binary_changes`; psycopg has no replication protocol). Each batch is
whole transactions in commit order; the consumer writes their events into the same history
tables the triggers write (one COPY per history table), and the commit LSN it reached into
`wal_progress`, **in the same transaction**. Only then is the slot advanced. A crash between the
two redelivers transactions that history already has: they are skipped by their LSN, so every
change is written exactly once.

Statement ids come from the same sequence as the triggers', taken in commit order. The WAL has no
statement boundaries: a new statement starts with each run of changes of one table and
operation, and again when a row comes back within a run (a change whose old image is a new
image of the run), so that no statement changes a row twice (revert and as-of rely on it).
Who: the WAL has the transaction id and the commit time; the role, application, actor and
context come from the transactional message that `set_actor` sends (prefix `pgwarden`), or
stay NULL.
"""

from __future__ import annotations

import contextlib
import gc
import json
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import psycopg
from psycopg import pq, sql

from pgwarden.errors import UserError
from pgwarden.history.catalog import Conn, HistorySchema
from pgwarden.history.catalog import server_version as catalog_version
from pgwarden.history.layout import table_logs, value_sql
from pgwarden.history.replay import Before, replay_sql
from pgwarden.lsn import format_lsn, parse_lsn

EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
CONTEXT_PREFIX = "pgwarden"
SHAPE_PREFIX = "pgwarden.shape"
# A non-transactional message whose only purpose is its place in the WAL: once the consumer has
# decoded past it, every transaction that committed before it is in history, and the slot may
# move there (see consume). The consumer sends one now and then while idle; a reader that may
# not read the slot sends one and waits for the slot to pass it.
TICK_PREFIX = "pgwarden.tick"
TICK_EVERY = 10.0  # seconds, while `follow` is idle
TICK_BEHIND = 16 << 20  # bytes of WAL the slot holds past its last record before a reader ticks
# While following: at most one running-transactions record this often (seconds), so that the
# slot's restart point follows (see follow). 0: never. Every 0.2 s (about every batch at the
# default interval) rather than every 1 s: the consumer's backend took 2.0-2.3 s of CPU per
# 20 s W2 round instead of 2.6-2.8, and the lag p99 0.5-0.8 s instead of 0.6-0.8 (side by side,
# docs/benchmarks.md); polling every 0.1 s cut the lag further (0.4-0.5 s) for more CPU.
SNAPSHOT_EVERY = 0.2
# How far the slot's restart point may lag its confirmed position before _advance passes over
# that stretch once more to move it (bytes of WAL).
RESTART_BEHIND = 16 << 20
# Changes decoded per batch (whole transactions: a batch can run over by one transaction).
BATCH_CHANGES = 20_000
# Rows of one history table buffered before they are sent (see _Writer).
STREAM_ROWS = 2_000
_LOCK_KEY = 0x7067_7761  # "pgwa": one consumer at a time per database (advisory lock)

_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")
_U64 = struct.Struct(">Q")

# A column's value as a field of COPY's text format, ready to write: its text escaped, NULL as
# \N. Parsing straight into that form spares a pass over every value (the consumer's hot path).
Value = bytes
NULL = b"\\N"
# pgoutput's 'u': a TOASTed value the UPDATE left alone. No escaped text can read \u (a
# backslash in the text is doubled), so it is told apart from every value.
UNCHANGED = b"\\u"


# -- pgoutput, protocol version 1 ------------------------------------------------------------


@dataclass
class Relation:
    oid: int
    schema: str
    name: str
    columns: list[tuple[str, int]]  # name, type oid


@dataclass(slots=True)
class Change:
    relid: int
    op: str  # I, U, D
    old: list[Value] | None
    new: list[Value] | None


@dataclass
class Truncate:
    relids: list[int]


@dataclass
class Message:
    prefix: str
    content: bytes


Item = Change | Truncate | Message


@dataclass
class Tick:
    lsn: int  # the end of the tick's record


@dataclass
class Transaction:
    xid: int
    commit_lsn: int  # the commit record's LSN
    end_lsn: int  # the end of the commit record: progress, and where the slot may advance to
    commit_time: datetime
    items: list[Item] = field(default_factory=list)
    relations: dict[int, Relation] = field(default_factory=dict)


def _cstring(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.index(b"\x00", pos)
    return buf[pos:end].decode(), end + 1


def _tuple(buf: bytes, pos: int) -> tuple[list[Value], int]:
    if pos + 2 > len(buf):
        raise ValueError("pgoutput: a tuple runs past the end of its message")
    (n,) = _I16.unpack_from(buf, pos)
    if n < 0:
        raise ValueError("pgoutput: a tuple with a negative number of columns")
    pos += 2
    values: list[Value] = []
    append = values.append
    length_at = _I32.unpack_from
    try:
        for _ in range(n):
            kind = buf[pos]
            if kind == 0x74:  # 't': text
                length = length_at(buf, pos + 1)[0]
                pos += 5 + length
                if length < 0 or pos > len(buf):
                    raise IndexError
                append(buf[pos - length : pos])
                continue
            pos += 1
            if kind == 0x6E:  # 'n': null
                append(NULL)
            elif kind == 0x75:  # 'u': unchanged TOAST
                append(UNCHANGED)
            else:
                raise ValueError(f"pgoutput: unexpected tuple column kind {chr(kind)!r}")
    except (IndexError, struct.error):
        raise ValueError("pgoutput: a tuple runs past the end of its message") from None
    # Escaped for COPY; one scan of the whole tuple finds the (rare) values that need it.
    whole = b"".join(values)
    if 92 in whole or 9 in whole or 10 in whole or 13 in whole:  # \ \t \n \r
        values = [v if v is NULL or v is UNCHANGED else _escape(v) for v in values]
    return values, pos


def _decode_change_py(buf: bytes) -> tuple[int, str, list[Value] | None, list[Value] | None]:
    """A pgoutput Insert, Update or Delete: (relid, op, old, new), each value a COPY text
    field. The reference for native/pgoutput.c, which does the same in C (and is used when
    built: this is the consumer's hot path)."""
    if len(buf) < 6:
        raise ValueError("pgoutput: a change message shorter than its header")
    kind, part = buf[0], buf[5]
    relid = _U32.unpack_from(buf, 1)[0]
    if kind == 0x49:  # I: insert
        if part != 0x4E:
            raise ValueError("pgoutput: an insert without its new tuple")
        return relid, "I", None, _tuple(buf, 6)[0]
    if kind == 0x44:  # D: delete
        if part not in (0x4B, 0x4F):
            raise ValueError("pgoutput: a delete without its old tuple")
        return relid, "D", _tuple(buf, 6)[0], None
    if kind != 0x55:
        raise ValueError("pgoutput: not a change message")
    # U: update, with the old tuple (K key or O old) when there is one
    old = None
    pos = 6
    if part in (0x4B, 0x4F):
        old, pos = _tuple(buf, 6)
        if pos >= len(buf) or buf[pos] != 0x4E:
            raise ValueError("pgoutput: an update without its new tuple")
        pos += 1
    elif part != 0x4E:
        raise ValueError("pgoutput: an update without its new tuple")
    return relid, "U", old, _tuple(buf, pos)[0]


try:
    from pgwarden.native._pgoutput import decode_change
except ImportError:  # not built (no compiler at install): the same, in Python
    decode_change = _decode_change_py


def _timestamp(micros: int) -> datetime:
    return EPOCH + timedelta(microseconds=micros)


_CHANGE_KINDS = frozenset(b"IUD")


def parse(messages: Iterable[bytes]) -> Iterator[Transaction | Tick]:
    """Whole transactions from pg_logical_slot_peek_binary_changes's messages (its `data`),
    and pgwarden's ticks between them."""
    current: Transaction | None = None
    relations: dict[int, Relation] = {}
    decode = decode_change
    nowhere: list[Item] = []
    append = nowhere.append  # to the current transaction's items
    for buf in messages:
        kind = buf[0]
        if current is not None and kind in _CHANGE_KINDS:
            # Changes first: nearly every message is one.
            append(Change(*decode(buf)))
            continue
        if kind == 0x42:  # B: begin
            (final_lsn,) = _U64.unpack_from(buf, 1)
            (ts,) = _I64.unpack_from(buf, 9)
            (xid,) = _U32.unpack_from(buf, 17)
            current = Transaction(xid, final_lsn, 0, _timestamp(ts))
            append = current.items.append
        elif current is None and kind == 0x4D:  # M outside a transaction: non-transactional
            if _cstring(buf, 10)[0] == TICK_PREFIX:
                yield Tick(_U64.unpack_from(buf, 2)[0])
        elif current is None:
            raise ValueError(f"pgoutput: message {chr(kind)!r} outside a transaction")
        elif kind == 0x43:  # C: commit
            (commit_lsn,) = _U64.unpack_from(buf, 2)
            (end_lsn,) = _U64.unpack_from(buf, 10)
            current.commit_lsn = commit_lsn
            current.end_lsn = end_lsn
            current.relations = dict(relations)
            yield current
            current = None
        elif kind == 0x52:  # R: relation
            (oid,) = _U32.unpack_from(buf, 1)
            nsp, pos = _cstring(buf, 5)
            rel, pos = _cstring(buf, pos)
            pos += 1  # replica identity
            (ncols,) = _I16.unpack_from(buf, pos)
            pos += 2
            cols = []
            for _ in range(ncols):
                pos += 1  # flags
                name, pos = _cstring(buf, pos)
                (typoid,) = _U32.unpack_from(buf, pos)
                pos += 8  # type oid, typmod
                cols.append((name, typoid))
            relations[oid] = Relation(oid, nsp, rel, cols)
        elif kind == 0x54:  # T: truncate
            (n,) = _I32.unpack_from(buf, 1)
            current.items.append(Truncate([_U32.unpack_from(buf, 6 + 4 * i)[0] for i in range(n)]))
        elif kind == 0x4D:  # M: message (transactional: within its transaction)
            prefix, pos = _cstring(buf, 10)
            (length,) = _I32.unpack_from(buf, pos)
            current.items.append(Message(prefix, buf[pos + 4 : pos + 4 + length]))
        # Y (type) and O (origin) carry nothing history needs.


# -- writing history -------------------------------------------------------------------------


def _escape(value: bytes) -> bytes:
    """Text as a field of COPY's text format."""
    return (
        value.replace(b"\\", b"\\\\")
        .replace(b"\t", b"\\t")
        .replace(b"\n", b"\\n")
        .replace(b"\r", b"\\r")
    )


def _copy_text(value: str | None) -> bytes:
    return NULL if value is None else _escape(value.encode())


@dataclass
class _Table:
    """A history table as the consumer writes it at its place in the stream."""

    log: int
    shadow: str
    wal_from: int | None
    positions: list[int]  # positions in the stream's tuple that are captured
    old_cols: list[str]
    new_cols: list[str]
    attnums: list[int]  # of the captured positions
    types: list[str]  # their history columns' types
    width: int  # columns the stream sends
    truncate_rows: bool  # TRUNCATE keeps the rows it removed (else a marker)
    rows: list[bytes] = field(default_factory=list)
    # Every column the stream sends is captured, in its order (no excluded column): the
    # stream's tuples are written as they are.
    whole: bool = field(init=False)
    nulls: tuple[bytes, ...] = field(init=False)  # one side of an image that is not there

    def __post_init__(self) -> None:
        self.whole = self.positions == list(range(self.width))
        self.nulls = (NULL,) * len(self.positions)


def _lsn_int(text: object) -> int | None:
    """An LSN column's value (NULL stays None)."""
    return None if text is None else parse_lsn(str(text))


class _Ids:
    """Statement ids from the history sequence, fetched in blocks (one round trip each)."""

    def __init__(self, conn: Conn, schema: HistorySchema, before: Callable[[], None]) -> None:
        self.conn = conn
        self.before = before  # the connection must be free for a query
        self.query = sql.SQL(
            "SELECT pg_catalog.nextval({}) FROM pg_catalog.generate_series(1, %s)"
        ).format(sql.Literal(f"{schema.name}.statement_seq"))
        self.free: list[int] = []
        self.block = 64

    def take(self) -> int:
        if not self.free:
            self.before()
            rows = self.conn.execute(self.query, (self.block,)).fetchall()
            self.free = sorted((int(str(r[0])) for r in rows), reverse=True)
            self.block = min(self.block * 4, 65_536)
        return self.free.pop()


@dataclass
class BatchResult:
    transactions: int = 0
    events: int = 0
    skipped: int = 0  # transactions history already had (redelivered after a crash)
    lsn: int | None = None  # the end of the last transaction written
    resumed: bool = False  # the slot was lost: a gap recorded, new snapshots taken
    full: bool = False  # the batch stopped at its size: more is waiting


class _Writer:
    """One batch: its transactions' events, written in one database transaction.

    A history table's rows go to the server as soon as there are STREAM_ROWS of them, into a
    COPY left open while more of that table's rows come: the server stores them on its core
    while this one decodes the next (a large transaction's rows, mostly). Any other query
    first ends that COPY. A context manager: an error ends an open COPY as failed."""

    def __init__(self, conn: Conn, schema: HistorySchema) -> None:
        self.conn = conn
        self.schema = schema
        self.ids = _Ids(conn, schema, before=self._end_copy)
        self.tables: dict[int, _Table | None] = {}  # by relation oid
        self.tx_rows: list[bytes] = []
        self.events = 0
        self._copying: _Table | None = None
        self._copy: psycopg.Copy | None = None
        self._copy_stack = contextlib.ExitStack()

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._copying = self._copy = None
        self._copy_stack.__exit__(*exc)

    def _stream(self, table: _Table) -> None:
        """Send the table's buffered rows into its open COPY (opened here if need be)."""
        if self._copying is not table:
            self._end_copy()
            copy_sql = sql.SQL("COPY {} ({}) FROM STDIN").format(
                self.schema.table(table.shadow),
                sql.SQL(", ").join(
                    sql.Identifier(c)
                    for c in ("ctx", "stmt", "op", *table.old_cols, *table.new_cols)
                ),
            )
            cur = self._copy_stack.enter_context(self.conn.cursor())
            self._copy = self._copy_stack.enter_context(cur.copy(copy_sql))
            self._copying = table
        assert self._copy is not None
        self._copy.write(b"".join(table.rows))
        table.rows.clear()

    def _end_copy(self) -> None:
        if self._copying is not None:
            self._copying = self._copy = None
            self._copy_stack.close()

    def _table(self, relid: int, relation: Relation | None) -> _Table | None:
        if relid in self.tables:
            return self.tables[relid]
        self._end_copy()
        row = self.conn.execute(
            sql.SQL(
                "SELECT l.id, l.shadow, l.wal_from::text, pg_catalog.cardinality(l.wal_attnums), "
                "COALESCE((SELECT k.truncate_mode FROM {tracked} k "
                "WHERE k.table_oid = l.table_oid), 'rows') "
                "FROM {tables} l WHERE l.wal_relid = %s ORDER BY l.id DESC LIMIT 1"
            ).format(
                tables=self.schema.table("logged_table"), tracked=self.schema.table("tracked")
            ),
            (relid,),
        ).fetchone()
        if row is None:
            self.tables[relid] = None
            return None
        log = int(str(row[0]))
        slots = self.conn.execute(
            sql.SQL("SELECT pos, old_col, new_col, attnum, type FROM {}(%s)").format(
                self.schema.func("wal_slots")
            ),
            (log,),
        ).fetchall()
        table = _Table(
            log=log,
            shadow=str(row[1]),
            wal_from=_lsn_int(row[2]),
            positions=[int(str(s[0])) - 1 for s in slots if s[1] is not None],
            old_cols=[str(s[1]) for s in slots if s[1] is not None],
            new_cols=[str(s[2]) for s in slots if s[1] is not None],
            attnums=[int(str(s[3])) for s in slots if s[1] is not None],
            types=[str(s[4]) for s in slots if s[1] is not None],
            width=int(str(row[3] or 0)),
            truncate_rows=row[4] == "rows",
        )
        if relation is not None and len(relation.columns) != table.width:
            raise UserError(
                f"pgwarden: the WAL sends {len(relation.columns)} columns for "
                f"{relation.schema}.{relation.name} where history expects {table.width}",
                hint="history would be written wrong, so capture stopped here; "
                "please report it with the table's recent DDL (pgwarden history's ddl log)",
            )
        self.tables[relid] = table
        return table

    def flush(self, only: _Table | None = None) -> None:
        """Every buffered row (or one table's) stored; the connection free for queries."""
        for table in [only] if only else [t for t in self.tables.values() if t]:
            if table is not None and table.rows:
                self._stream(table)
        self._end_copy()
        if only is None and self.tx_rows:
            copy_sql = sql.SQL(
                "COPY {} (id, tx, at, db_user, role_name, application, client_addr, app_user, "
                "context) FROM STDIN"
            ).format(self.schema.table("tx"))
            with self.conn.cursor() as cur, cur.copy(copy_sql) as copy:
                copy.write(b"".join(self.tx_rows))
            self.tx_rows.clear()

    def transaction(self, tx: Transaction) -> None:
        who: dict[str, Any] = {}
        ctx: int | None = None
        run: tuple[int, str] | None = None
        stmt = 0
        made: set[tuple[bytes, ...]] = set()
        prefix = b""  # ctx, stmt, op: the same for every row of a statement
        for item in tx.items:
            if isinstance(item, Message):
                if item.prefix == CONTEXT_PREFIX:
                    who = _context(item.content)
                    ctx = None  # a new context row from the next change on
                elif item.prefix == SHAPE_PREFIX:
                    self._shape(item.content)
                    run = None
                continue
            if isinstance(item, Truncate):
                for relid in item.relids:
                    table = self._table(relid, tx.relations.get(relid))
                    if table is None or _before(tx, table):
                        continue
                    stmt = self.ids.take()
                    if ctx is None:
                        ctx = self._context_row(tx, who, stmt)
                    self.flush(table)
                    self.events += self._truncate(table, ctx, stmt)
                run = None
                continue
            table = self._table(item.relid, tx.relations.get(item.relid))
            if table is None or _before(tx, table):
                continue
            old, new = item.old, item.new
            if new is not None and old is not None and UNCHANGED in new:
                new = [o if n == UNCHANGED else n for o, n in zip(old, new, strict=True)]
            if not table.whole:
                old = [old[p] for p in table.positions] if old is not None else None
                new = [new[p] for p in table.positions] if new is not None else None
            if old is not None and old == new:
                continue  # an UPDATE that changed nothing history keeps
            # The same row again (its old image is what this run made of a row): a statement
            # changes a row once. Keys alone cannot tell: a key shift inside one statement
            # (deferrable key) takes a key before it vacates it, with two different rows.
            if run != (table.log, item.op) or (old is not None and tuple(old) in made):
                stmt = self.ids.take()
                run = (table.log, item.op)
                made = set()
                prefix = b""
            if item.op == "U":
                made.add(tuple(new))  # type: ignore[arg-type]
            if ctx is None:
                ctx = self._context_row(tx, who, stmt)
                prefix = b""
            if not prefix:
                prefix = b"%d\t%d\t%s\t" % (ctx, stmt, item.op.encode())
            nulls = table.nulls
            rows = table.rows
            rows.append(prefix + b"\t".join((*(old or nulls), *(new or nulls))) + b"\n")
            if len(rows) >= STREAM_ROWS:
                self._stream(table)
            self.events += 1

    def _truncate(self, table: _Table, ctx: int, stmt: int) -> int:
        """TRUNCATE leaves no rows in the WAL: the rows it removed are the table's state just
        before it, rebuilt from its history (as `as-of` does), recorded as the triggers do."""
        self._end_copy()
        if not table.truncate_rows:
            self.conn.execute(
                sql.SQL("SELECT {}(%s, 'X', %s, %s)").format(self.schema.func("write_rows")),
                (table.log, ctx, stmt),
            )
            return 1
        self.conn.execute(
            sql.SQL("INSERT INTO {} (log_id, stmt, ctx, kind) VALUES (%s, %s, %s, 'T')").format(
                self.schema.table("reset")
            ),
            (table.log, stmt, ctx),
        )
        log = table_logs(self.conn, self.schema, log_id=table.log)[0]
        outputs = [
            (f"c{i}", lambda side, a=attnum, t=type_: value_sql(log, side, a, "h", t))
            for i, (attnum, type_) in enumerate(zip(table.attnums, table.types, strict=True))
        ]
        rows = replay_sql(self.schema, log, Before(stmt), outputs)
        cur = self.conn.execute(
            sql.SQL("INSERT INTO {} (ctx, stmt, op{}) SELECT {}, {}, 'T'{} FROM ({}) r").format(
                self.schema.table(table.shadow),
                sql.SQL("").join(sql.SQL(", {}").format(sql.Identifier(c)) for c in table.old_cols),
                sql.Literal(ctx),
                sql.Literal(stmt),
                sql.SQL("").join(
                    sql.SQL(", r.{}").format(sql.Identifier(f"c{i}"))
                    for i in range(len(table.old_cols))
                ),
                rows,
            )
        )
        return max(cur.rowcount, 0)

    def _context_row(self, tx: Transaction, who: dict[str, Any], stmt: int) -> int:
        fields = [
            str(stmt).encode(),
            str(tx.xid).encode(),
            tx.commit_time.isoformat().encode(),
            *(
                _copy_text(None if who.get(k) is None else str(who[k]))
                for k in ("db_user", "role", "application", "client_addr", "actor", "context")
            ),
        ]
        self.tx_rows.append(b"\t".join(fields) + b"\n")
        return stmt

    def _shape(self, content: bytes) -> None:
        """A schema change of a table, at its place in the stream: what came before is
        written in the old shape, and the history table switches here (wal.sql, wal_resolve)."""
        shape = json.loads(content)
        log = int(shape["log"])
        for relid, table in list(self.tables.items()):
            if table is not None and table.log == log:
                self.flush(table)
                del self.tables[relid]
        self._end_copy()
        self.conn.execute(
            sql.SQL("SELECT {}(%s, %s::int2[], %s)").format(self.schema.func("wal_resolve")),
            (log, shape.get("attnums"), self.ids.take()),
        )


def _before(tx: Transaction, table: _Table) -> bool:
    """Committed before capture started (the snapshot or the triggers have it)."""
    return table.wal_from is not None and tx.commit_lsn < table.wal_from


def _context(content: bytes) -> dict[str, Any]:
    try:
        value = json.loads(content)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


# -- the slot --------------------------------------------------------------------------------


@dataclass(frozen=True)
class WalSetup:
    slot: str
    publication: str


def setup(conn: Conn, schema: HistorySchema) -> WalSetup | None:
    """The slot and publication of this database's history, when any table uses WAL capture."""
    row = conn.execute(
        sql.SQL(
            "SELECT (SELECT value FROM {meta} WHERE key = 'wal_slot'), "
            "(SELECT value FROM {meta} WHERE key = 'wal_publication')"
        ).format(meta=schema.table("meta"))
    ).fetchone()
    if row is None or row[0] is None or row[1] is None:
        return None
    return WalSetup(str(row[0]), str(row[1]))


def consume(
    conn: Conn,
    schema: HistorySchema,
    *,
    upto_lsn: int | None = None,
    batch: int | None = BATCH_CHANGES,
) -> BatchResult:
    """Write one batch of decoded transactions into history, exactly once. `conn` must not be
    in a transaction. Consumers take turns (an advisory lock), so readers can catch up inline
    beside a running `history follow`."""
    wal = setup(conn, schema)
    if wal is None:
        return BatchResult()
    result = BatchResult()
    if _slot_lost(conn, wal):
        resume(conn, schema, "the replication slot was invalidated (max_slot_wal_keep_size)")
        result.resumed = True
    # Inside a caller's transaction the events commit (or roll back) with it: the slot, which
    # is not transactional, must not move until they are committed. They are delivered again
    # until a consumer outside any transaction advances it (and skipped then by their LSN).
    nested = conn.info.transaction_status != pq.TransactionStatus.IDLE
    safe = 0  # where the slot may move: the end of a transaction or tick decoded
    with conn.transaction():
        conn.execute(
            "SELECT pg_catalog.pg_advisory_xact_lock(%s, hashtext(%s))", (_LOCK_KEY, wal.slot)
        )
        row = conn.execute(
            sql.SQL("SELECT lsn::text FROM {} WHERE slot = %s").format(
                schema.table("wal_progress")
            ),
            (wal.slot,),
        ).fetchone()
        done = _lsn_int(row[0]) if row else None
        # Binary results: bytea as it is, not hex text (half the bytes, no decoding).
        rows = conn.execute(
            "SELECT data FROM pg_catalog.pg_logical_slot_peek_binary_changes("
            "%s, %s::pg_lsn, %s, 'proto_version', '1', 'publication_names', %s, "
            "'messages', 'true')",
            (
                wal.slot,
                format_lsn(upto_lsn) if upto_lsn is not None else None,
                batch,
                _quote_publication(wal.publication),
            ),
            binary=True,
        ).fetchall()
        result.full = batch is not None and len(rows) >= batch
        with _Writer(conn, schema) as writer, _gc_paused():
            for tx in parse(cast(bytes, row[0]) for row in rows):
                if isinstance(tx, Tick):
                    safe = max(safe, tx.lsn)
                    continue
                safe = max(safe, tx.end_lsn)
                if done is not None and tx.end_lsn <= done:
                    result.skipped += 1
                    result.lsn = tx.end_lsn
                    continue
                writer.transaction(tx)
                result.transactions += 1
                result.lsn = tx.end_lsn
            writer.flush()
        result.events = writer.events
        if result.lsn is not None and (done is None or result.lsn > done):
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (slot, lsn) VALUES (%s, %s::pg_lsn) ON CONFLICT (slot) "
                    "DO UPDATE SET lsn = EXCLUDED.lsn, at = pg_catalog.clock_timestamp()"
                ).format(schema.table("wal_progress")),
                (wal.slot, format_lsn(result.lsn)),
            )
    # History has them: the slot may let that WAL go, up to the end of the last record decoded
    # (a transaction's commit, or a tick). Not to `upto_lsn`: a commit record that straddles
    # the flushed end of the WAL was not decoded, and a slot moved past its start would skip it.
    if safe and not nested:
        _advance(conn, wal.slot, safe)
    return result


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a batch is decoded. A batch makes a few lists per
    change that all live until it is written, none in a cycle; the collector, triggered by
    their number, went over them again and again: a third of the consumer's time."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def tick(conn: Conn) -> int:
    """Mark the WAL here (a non-transactional message); its end LSN."""
    row = conn.execute(
        "SELECT pg_catalog.pg_logical_emit_message(false, %s, '')::text", (TICK_PREFIX,)
    ).fetchone()
    assert row is not None
    value = _lsn_int(row[0])
    assert value is not None
    return value


def _slot_lost(conn: Conn, wal: WalSetup) -> bool:
    row = conn.execute(
        "SELECT wal_status FROM pg_catalog.pg_replication_slots WHERE slot_name = %s",
        (wal.slot,),
    ).fetchone()
    return row is None or row[0] == "lost"


def resume(conn: Conn, schema: HistorySchema, reason: str) -> tuple[int, int]:
    """Capture after the slot was lost (fail-open: the server dropped the WAL it held): the
    stretch of WAL history did not get is recorded as a gap, from where history stopped to
    where a fresh slot starts, never silently; then every table captured from the WAL gets a
    new snapshot (as when tracking starts), so history is whole again from there. Returns the
    gap's bounds."""
    wal = setup(conn, schema)
    assert wal is not None
    if conn.info.transaction_status != pq.TransactionStatus.IDLE:
        raise UserError(
            f"history's replication slot {wal.slot} is lost and capture must start again",
            hint="run `pgwarden history follow` (or any reader outside a transaction): it "
            "records the gap and takes new snapshots",
        )
    progress = conn.execute(
        sql.SQL("SELECT lsn::text FROM {} WHERE slot = %s").format(schema.table("wal_progress")),
        (wal.slot,),
    ).fetchone()
    old = conn.execute(
        "SELECT confirmed_flush_lsn::text FROM pg_catalog.pg_replication_slots "
        "WHERE slot_name = %s",
        (wal.slot,),
    ).fetchone()
    start = max(
        (_lsn_int(r[0]) or 0 for r in (progress, old) if r is not None and r[0] is not None),
        default=0,
    )
    with conn.transaction():
        conn.execute(
            "SELECT pg_catalog.pg_drop_replication_slot(slot_name) "
            "FROM pg_catalog.pg_replication_slots WHERE slot_name = %s",
            (wal.slot,),
        )
    row = conn.execute(
        sql.SQL("SELECT lsn::text FROM {}").format(
            create_slot_sql(sql.Literal(wal.slot), catalog_version(conn))
        )
    ).fetchone()
    assert row is not None
    end = _lsn_int(row[0]) or 0
    with conn.transaction():
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (slot, from_lsn, to_lsn, reason) "
                "VALUES (%s, %s::pg_lsn, %s::pg_lsn, %s)"
            ).format(schema.table("wal_gap")),
            (wal.slot, format_lsn(start), format_lsn(end), reason),
        )
        conn.execute(
            sql.SQL("SELECT {}(l.id) FROM {} l WHERE {}(l.id) ORDER BY l.id").format(
                schema.func("wal_resnapshot"), schema.table("logged_table"), schema.func("is_wal")
            )
        )
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (slot, lsn) VALUES (%s, %s::pg_lsn) ON CONFLICT (slot) "
                "DO UPDATE SET lsn = EXCLUDED.lsn, at = pg_catalog.clock_timestamp()"
            ).format(schema.table("wal_progress")),
            (wal.slot, format_lsn(end)),
        )
    return start, end


def create_slot_sql(name: sql.Composable, server_version: int) -> sql.Composed:
    """The slot on pgoutput. On PostgreSQL 17+ it is a failover slot: standbys that
    synchronise slots (CloudNativePG's synchronizeLogicalDecoding) carry it, so that WAL capture
    goes on from the new primary after a failover, with nothing skipped."""
    if server_version >= 170000:
        return sql.SQL(
            "pg_catalog.pg_create_logical_replication_slot({}, 'pgoutput', false, false, true)"
        ).format(name)
    return sql.SQL("pg_catalog.pg_create_logical_replication_slot({}, 'pgoutput')").format(name)


def _quote_publication(name: str) -> str:
    # pgoutput splits publication_names as an identifier list.
    return '"' + name.replace('"', '""') + '"'


def _advance(conn: Conn, slot: str, lsn: int) -> None:
    """Move the slot to `lsn`, and its restart point as close behind as the server allows.

    Decoding restarts from the restart point, which moves only to running-transactions records
    the decoder passed. Of those after the slot's confirmed position, the server keeps just the
    first as a candidate, so one advance over a long stretch (the first catch-up after a quiet
    time, or a bulk load) leaves the restart point near its beginning, and every batch after
    decoded that whole stretch again (W1's first repetition: 5k events/s instead of 100k). A
    second advance to the same place passes those records again, now behind the confirmed
    position, where the server takes the newest: cheap (fast-forward decoding, nothing queued),
    and only done when the restart point is that far behind."""
    with conn.transaction():
        row = conn.execute(
            "SELECT pg_catalog.pg_replication_slot_advance(s.slot_name, %s::pg_lsn) IS NOT NULL "
            "FROM pg_catalog.pg_replication_slots s "
            "WHERE s.slot_name = %s AND s.confirmed_flush_lsn < %s::pg_lsn",
            (format_lsn(lsn), slot, format_lsn(lsn)),
        ).fetchone()
    if row is None:
        return
    with conn.transaction():
        conn.execute(
            "SELECT pg_catalog.pg_replication_slot_advance(s.slot_name, s.confirmed_flush_lsn) "
            "FROM pg_catalog.pg_replication_slots s WHERE s.slot_name = %s "
            "AND pg_catalog.pg_wal_lsn_diff(s.confirmed_flush_lsn, s.restart_lsn) > %s",
            (slot, RESTART_BEHIND),
        )


def current_lsn(conn: Conn) -> int:
    """The end of the WAL that decoding can read (flushed): what has been committed."""
    row = conn.execute("SELECT pg_catalog.pg_current_wal_flush_lsn()::text").fetchone()
    assert row is not None
    value = _lsn_int(row[0])
    assert value is not None
    return value


def catch_up(conn: Conn, schema: HistorySchema, *, wait: float = 5.0) -> BatchResult:
    """Bring history up to everything committed before this call: a reader's own writes are
    there when it reads. Consumes inline (taking turns with a running consumer); a role that
    may not read the slot waits for the consumer instead, and is told when it does not come."""
    nested = conn.info.transaction_status != pq.TransactionStatus.IDLE
    if not nested and not conn.autocommit:
        # A connection outside any transaction but not in autocommit: every query would open
        # one, and the slot could never move. Autocommit for the while, as it was after.
        conn.autocommit = True
        try:
            return catch_up(conn, schema, wait=wait)
        finally:
            conn.autocommit = False
    total = BatchResult()
    setup_of = setup(conn, schema)
    if setup_of is None:
        return total
    if nested and _has_written(conn):
        # Logical decoding in a transaction that has written does not come back (it spins
        # in the server): what was there before this transaction wrote is what it reads.
        return total
    target = current_lsn(conn)
    while True:
        try:
            # Inside a caller's transaction: one pass, unbounded, for the same reason.
            step = consume(conn, schema, upto_lsn=target, batch=None if nested else BATCH_CHANGES)
            if step.resumed:  # capture started again: catch up to now in the new stream
                target = max(target, current_lsn(conn))
        except psycopg.errors.InsufficientPrivilege:
            _wait_for_consumer(conn, schema, target, wait)
            return total
        total.transactions += step.transactions
        total.events += step.events
        total.skipped += step.skipped
        total.lsn = step.lsn or total.lsn
        total.resumed = total.resumed or step.resumed
        if nested or (step.transactions == 0 and step.skipped == 0 and not step.resumed):
            if not nested and _behind(conn, setup_of) > TICK_BEHIND:
                tick(conn)  # the next consumer moves the slot past the WAL others wrote
            return total


def _behind(conn: Conn, wal: WalSetup) -> int:
    row = conn.execute(
        "SELECT pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_flush_lsn(), "
        "confirmed_flush_lsn)::bigint FROM pg_catalog.pg_replication_slots WHERE slot_name = %s",
        (wal.slot,),
    ).fetchone()
    return int(str(row[0])) if row and row[0] is not None else 0


def _has_written(conn: Conn) -> bool:
    row = conn.execute("SELECT pg_catalog.pg_current_xact_id_if_assigned() IS NOT NULL").fetchone()
    return bool(row and row[0])


def _wait_for_consumer(conn: Conn, schema: HistorySchema, target: int, wait: float) -> None:
    wal = setup(conn, schema)
    assert wal is not None
    # The consumer moves the slot to records it decoded: a tick after `target` is one.
    target = max(target, tick(conn))
    deadline = time.monotonic() + wait
    while True:
        row = conn.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_catalog.pg_replication_slots "
            "WHERE slot_name = %s",
            (wal.slot,),
        ).fetchone()
        reached = _lsn_int(row[0]) if row else None
        if reached is not None and reached >= target:
            return
        if time.monotonic() >= deadline:
            behind = target - (reached or 0)
            raise UserError(
                f"history is {behind:,} bytes of WAL behind the database, and role "
                f"{conn.info.user} may not read the replication slot {wal.slot} to catch up",
                hint="start the consumer (`pgwarden up` does, or `pgwarden history follow`), "
                "or read history as a role with REPLICATION",
            )
        time.sleep(0.1)


def _can_log_snapshot(conn: Conn) -> bool:
    """pg_log_standby_snapshot: PostgreSQL 16+, superusers or roles granted it."""
    if conn.info.server_version < 160000 or not SNAPSHOT_EVERY:
        return False
    row = conn.execute(
        "SELECT pg_catalog.has_function_privilege('pg_catalog.pg_log_standby_snapshot()', "
        "'EXECUTE')"
    ).fetchone()
    return bool(row and row[0])


def follow(
    conn: Conn,
    schema: HistorySchema,
    *,
    interval: float = 0.2,
    batch: int = BATCH_CHANGES,
    stop: Callable[[], bool] = lambda: False,
    report: Callable[[BatchResult], None] | None = None,
) -> None:
    """Consume until `stop()` says so: batches back to back while a batch comes back full,
    else a short sleep first. Each batch has fixed costs (decoding starts again from the slot's
    restart point, a few round trips), so under a steady trickle of small transactions a
    consumer that polled without pause would spend the cores the writers need; `interval`
    bounds the lag it adds instead."""
    ticked = time.monotonic()
    snapshots = _can_log_snapshot(conn)
    snapped = 0.0
    while not stop():
        step = consume(conn, schema, upto_lsn=current_lsn(conn), batch=batch)
        if report is not None and (step.transactions or step.skipped):
            report(step)
        if snapshots and step.transactions and time.monotonic() - snapped > SNAPSHOT_EVERY:
            # Decoding restarts, on every batch, from the slot's restart point, which moves
            # only to the running-transactions records in the WAL (every 15 s, by the
            # background writer): under steady writes each batch decoded again up to 15 s of
            # WAL it had already written. One such record now and then keeps that short.
            conn.execute("SELECT pg_catalog.pg_log_standby_snapshot()")
            snapped = time.monotonic()
        if not step.full:
            if time.monotonic() - ticked > TICK_EVERY:
                # While the tracked tables are quiet, other writes still fill the WAL: a tick
                # lets the slot follow, so that it does not hold that WAL.
                tick(conn)
                ticked = time.monotonic()
            time.sleep(interval)
