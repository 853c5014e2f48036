"""Changes over time as an SVG drawn on the server: no chart library, no script, nothing that
could run a value as code (labels are escaped, everything else is numbers)."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta

from markupsafe import Markup, escape

from pgwarden.history.browse import Activity

COLORS = {"INSERT": "#2e7d32", "UPDATE": "#1565c0", "DELETE": "#c62828", "TRUNCATE": "#6a1b9a"}
STEP = {"hour": timedelta(hours=1), "day": timedelta(days=1), "week": timedelta(weeks=1)}


def buckets(since: datetime, until: datetime, unit: str) -> list[datetime]:
    start = since.replace(minute=0, second=0, microsecond=0)
    if unit in ("day", "week"):
        start = start.replace(hour=0)
    if unit == "week":
        start -= timedelta(days=start.weekday())
    found = []
    while start < until:
        found.append(start)
        start += STEP[unit]
    return found


def activity_svg(rows: list[Activity], since: datetime, until: datetime, unit: str) -> Markup:
    slots = buckets(since, until, unit)
    per: dict[datetime, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row in rows:
        per[row.bucket.astimezone(since.tzinfo)][row.op] += row.events
    width, height, pad = 720, 180, 24
    top = max((sum(per[b].values()) for b in slots), default=0) or 1
    bar = (width - 2 * pad) / max(len(slots), 1)
    parts = [
        f'<svg class="chart" role="img" viewBox="0 0 {width} {height + 30}" '
        f'xmlns="http://www.w3.org/2000/svg"><title>changes per {escape(unit)}</title>'
    ]
    for i, slot in enumerate(slots):
        y = float(height)
        for op, color in COLORS.items():
            count = per[slot].get(op, 0)
            if not count:
                continue
            h = (height - pad) * count / top
            y -= h
            parts.append(
                f'<rect x="{pad + i * bar:.1f}" y="{y:.1f}" width="{max(bar - 1, 1):.1f}" '
                f'height="{h:.1f}" fill="{color}"><title>{escape(slot.isoformat())} '
                f"{escape(op)}: {count}</title></rect>"
            )
    parts.append(f'<text x="{pad}" y="{height + 16}" class="axis">{escape(slots[0].date())}</text>'
                 if slots else "")  # fmt: skip
    if slots:
        parts.append(
            f'<text x="{width - pad}" y="{height + 16}" text-anchor="end" class="axis">'
            f"{escape(slots[-1].date())}</text>"
        )
    parts.append(f'<text x="{pad}" y="14" class="axis">max {top} per {escape(unit)}</text>')
    legend_x = width - pad - 4 * 90
    for n, (op, color) in enumerate(COLORS.items()):
        x = legend_x + n * 90
        parts.append(
            f'<rect x="{x}" y="4" width="10" height="10" fill="{color}"/>'
            f'<text x="{x + 14}" y="13" class="axis">{escape(op)}</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 - numbers and escaped text only
