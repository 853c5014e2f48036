"""Times as users type them on the command line."""

from __future__ import annotations

from datetime import UTC, datetime

import click

from pgwarden.config import parse_duration


class TimeParam(click.ParamType):  # type: ignore[type-arg]
    """ISO 8601 (`2026-11-26T10:00:00+01:00`, `2026-11-26 10:00`, `2026-11-26`; without an offset
    it is local time), `now`, or a duration ago (`15m`, `2h`, `3d`)."""

    name = "TIME"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime:
        if isinstance(value, datetime):
            return value
        text = str(value).strip()
        if text == "now":
            return datetime.now(UTC)
        try:
            return datetime.now(UTC) - parse_duration(text.removesuffix(" ago"))
        except ValueError:
            pass
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            self.fail(
                f"{text!r} is not a time: use ISO 8601 (2026-11-26T10:00:00), 'now', "
                "or a duration ago such as 15m, 2h, 3d",
                param,
                ctx,
            )
        return parsed if parsed.tzinfo else parsed.astimezone()


TIME = TimeParam()
