"""WAL positions (LSNs) as PostgreSQL writes them, '16/B374D848', and as integers: one place for
the backups (segments, recovery targets) and WAL capture (the consumer's progress)."""

from __future__ import annotations


def parse_lsn(text: str) -> int:
    """'0/3000028' → 50331688."""
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"
