"""Sizes in bytes, read and written as PostgreSQL does (units of 1024: kB, MB, GB, TB)."""

from __future__ import annotations

import re

_SIZE = re.compile(r"^([1-9][0-9]*)(kB|MB|GB|TB)$")
_UNIT_BYTES = {"kB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


def parse_size(value: str) -> int:
    """'10GB' → bytes, as in postgresql.conf."""
    match = _SIZE.match(value)
    if match is None:
        raise ValueError(f"not a size: {value!r} (write it as 512MB, 10GB, …)")
    return int(match.group(1)) * _UNIT_BYTES[match.group(2)]


def format_size(n: int) -> str:
    """Bytes for people: '512 B', '7.4 MB', '1.0 GB' (GB is the largest unit shown)."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
