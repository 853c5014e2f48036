"""WAL segment names and positions: pure arithmetic, no I/O.

A segment file is named TTTTTTTTXXXXXXXXYYYYYYYY: timeline, then the segment number split in
two (the high part counts 4 GiB "logs", the low part segments within one). With the default
16 MiB segments a log holds 256 of them, so the low part only runs 00000000..000000FF.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SEGMENT_RE = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")
HISTORY_RE = re.compile(r"^([0-9A-F]{8})\.history$")
LOG_SIZE = 0x1_0000_0000


@dataclass(frozen=True, order=True)
class Segment:
    """One WAL segment: its position (segment number) first, so that sorting follows WAL."""

    number: int
    timeline: int

    def name(self, segment_size: int) -> str:
        per_log = LOG_SIZE // segment_size
        return f"{self.timeline:08X}{self.number // per_log:08X}{self.number % per_log:08X}"


def parse_segment(name: str, segment_size: int) -> Segment | None:
    """The segment a file name stands for, or None (history files, partials, anything else)."""
    found = SEGMENT_RE.match(name)
    if found is None:
        return None
    per_log = LOG_SIZE // segment_size
    timeline, log, seg = (int(part, 16) for part in found.groups())
    if seg >= per_log:
        return None
    return Segment(number=log * per_log + seg, timeline=timeline)


def segment_of(lsn: int, timeline: int, segment_size: int) -> Segment:
    """The segment holding the byte at `lsn`."""
    return Segment(number=lsn // segment_size, timeline=timeline)


def first_gap(segments: set[Segment], start: Segment, timelines: dict[int, int]) -> Segment | None:
    """The first segment missing on the way from `start` to the newest archived segment,
    following timeline switches. `timelines` maps a timeline to the segment number at which
    it began (from the .history files; timeline 1 begins at 0). None when nothing is missing.

    At each position the segment of the newest timeline that had begun there is the one a
    restore reads; an older timeline's copy of a switch segment also counts."""
    if not segments:
        return start
    newest = max(s.number for s in segments)
    number = start.number
    while number <= newest:
        candidates = [
            t for t, begin in timelines.items() if begin <= number and t >= start.timeline
        ]
        if not any(Segment(number, t) in segments for t in candidates):
            best = max(candidates) if candidates else start.timeline
            return Segment(number, best)
        number += 1
    return None
