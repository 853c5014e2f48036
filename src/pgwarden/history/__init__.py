"""Change history: capture (SQL in pgwarden/sql/), plan, and the Python API the CLI uses."""

from pgwarden.history import wal
from pgwarden.history.actor import set_actor
from pgwarden.history.catalog import HistorySchema
from pgwarden.history.names import TableName, parse_table
from pgwarden.history.read import AsOfInto, Event, EventFilter, as_of, as_of_into, events
from pgwarden.history.retention import apply_retention
from pgwarden.history.revert import plan_revert, revert
from pgwarden.history.track import install, track, untrack
from pgwarden.history.verify import verify

__all__ = [
    "AsOfInto",
    "Event",
    "EventFilter",
    "HistorySchema",
    "TableName",
    "apply_retention",
    "as_of",
    "as_of_into",
    "events",
    "install",
    "parse_table",
    "plan_revert",
    "revert",
    "set_actor",
    "track",
    "untrack",
    "verify",
    "wal",
]
