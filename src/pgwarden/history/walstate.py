"""How far WAL capture is behind: what `status` and `verify` warn about.

A logical slot keeps every WAL segment from its restart point on. In fail-closed that is the
promise (writes stop, when the disk is full, before history loses a change), and also the
danger: a consumer that is down lets the WAL grow until the server stops. So the slot's
retained WAL is watched against `history.wal_lag_alarm`, which `apply` stores in the history
schema's meta so that `verify` run from anywhere warns at the same size. In fail-open the
server's own limit (`max_slot_wal_keep_size`) shows as `safe_wal_size`: the WAL left before the
slot is invalidated and history gets a gap.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import sql

from pgwarden.history import wal
from pgwarden.history.catalog import Conn, HistorySchema
from pgwarden.sizes import format_size

DEFAULT_ALARM = 1 << 30  # history.wal_lag_alarm's default, for a schema applied before it


@dataclass(frozen=True)
class SlotLag:
    slot: str
    wal_status: str | None  # pg_replication_slots.wal_status; None: the slot is gone
    retained: int  # bytes of WAL the server keeps for the slot
    unconsumed: int  # bytes of WAL from what history has confirmed to the WAL's end
    safe: int | None  # fail-open: bytes of WAL left before the server invalidates the slot
    last_consumed: datetime | None  # when the consumer last stored its progress
    alarm: int  # bytes: history.wal_lag_alarm

    @property
    def alarming(self) -> bool:
        return self.wal_status not in (None, "lost") and self.retained >= self.alarm

    def to_json(self) -> dict[str, Any]:
        return {
            "slot": self.slot,
            "wal_status": self.wal_status,
            "retained_bytes": self.retained,
            "unconsumed_bytes": self.unconsumed,
            "safe_bytes": self.safe,
            "last_consumed": self.last_consumed.isoformat() if self.last_consumed else None,
            "alarm_bytes": self.alarm,
            "alarming": self.alarming,
        }

    def summary(self) -> str:
        if self.wal_status is None:
            return f"slot {self.slot} is gone: `pgwarden apply` makes it again"
        if self.wal_status == "lost":
            return f"slot {self.slot} was invalidated: history has a gap (`pgwarden verify`)"
        text = (
            f"slot {self.slot} holds {format_size(self.retained)} of WAL "
            f"(warns at {format_size(self.alarm)})"
        )
        if self.safe is not None:
            text += f", {format_size(max(self.safe, 0))} before fail-open drops it"
        when = self.last_consumed.isoformat(timespec="seconds") if self.last_consumed else "never"
        return f"{text}; last consumed: {when}"

    def warning(self) -> str:
        """What `verify` and `status` say when the slot holds too much."""
        return (
            f"the replication slot {self.slot} holds {format_size(self.retained)} of WAL, over "
            f"history.wal_lag_alarm ({format_size(self.alarm)}): the consumer is down or behind "
            "(`pgwarden up` starts it, `pgwarden history follow` runs it); until it catches "
            "up the WAL grows"
            + (
                f" and the slot is dropped in {format_size(max(self.safe, 0))} (fail-open: a gap)"
                if self.safe is not None
                else " (fail-closed: writes stop when the disk is full)"
            )
        )


def lag(conn: Conn, schema: HistorySchema) -> SlotLag | None:
    """The slot's state; None when no table is captured from the WAL here."""
    setup = wal.setup(conn, schema)
    if setup is None:
        return None
    row = conn.execute(
        sql.SQL(
            "SELECT s.wal_status, "
            "pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), s.restart_lsn)::bigint, "
            "pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), "
            "s.confirmed_flush_lsn)::bigint, s.safe_wal_size, "
            "(SELECT p.at FROM {progress} p WHERE p.slot = s.slot_name), "
            "(SELECT m.value FROM {meta} m WHERE m.key = 'wal_lag_alarm') "
            "FROM (SELECT 1) AS one LEFT JOIN pg_catalog.pg_replication_slots s "
            "ON s.slot_name = %s"
        ).format(progress=schema.table("wal_progress"), meta=schema.table("meta")),
        (setup.slot,),
    ).fetchone()
    assert row is not None
    status, retained, unconsumed, safe, at, alarm = row
    return SlotLag(
        slot=setup.slot,
        wal_status=str(status) if status is not None else None,
        retained=_int(retained) or 0,
        unconsumed=_int(unconsumed) or 0,
        safe=_int(safe),
        last_consumed=at if isinstance(at, datetime) else None,
        alarm=_int(alarm) or DEFAULT_ALARM,
    )


def _int(value: object) -> int | None:
    return None if value is None else int(str(value))
