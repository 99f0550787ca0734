"""LiteLLM duration strings: ``30s``, ``10m``, ``24h``/``24hr``, ``7d``, ``1w``, ``1mo``."""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

_PATTERN = re.compile(r"^\s*(\d+)\s*(s|sec|m|min|h|hr|d|w|mo)\s*$")
_SECONDS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "d": 86400, "w": 604800}
_MAX_SECONDS = 100 * 366 * 86400


@dataclass(frozen=True)
class Duration:
    """A parsed duration; months are kept apart because they have no fixed length."""

    text: str
    seconds: int = 0
    months: int = 0

    def after(self, start: datetime) -> datetime:
        """The instant this duration after ``start`` (month steps clamp to the month's end)."""
        if not self.months:
            return start + timedelta(seconds=self.seconds)
        return add_months(start, self.months)

    def day(self, start: datetime) -> int | None:
        """The day of the month a schedule of windows of this duration starting at
        ``start`` ends on (``budget_reset_day``): ``start``'s for months, else ``None``."""
        return start.day if self.months else None

    @property
    def approx_seconds(self) -> int:
        return self.seconds + self.months * 30 * 86400


def add_months(start: datetime, months: int, day: int | None = None) -> datetime:
    """``start`` moved ``months`` calendar months on, to ``day`` of that month (default:
    ``start``'s day), clamped to the month's end (Jan 31 + 1 month: Feb 28)."""
    month_index = start.month - 1 + months
    year, month = start.year + month_index // 12, month_index % 12 + 1
    wanted = day if day is not None and 1 <= day <= 31 else start.day
    return start.replace(year=year, month=month,
                         day=min(wanted, calendar.monthrange(year, month)[1]))


def parse_duration(value: object) -> Duration:
    """Parse a duration string; raise ``ValueError`` with a readable message otherwise."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError("must be a duration string such as '30s', '10m', '24h', '30d' or '1mo'")
    match = _PATTERN.match(value)
    if not match:
        raise ValueError(
            f"invalid duration {value[:32]!r}; use a number followed by s, m, h, d, w or mo"
        )
    digits, unit = match.group(1), match.group(2)
    if len(digits) > 6:  # a million of any unit is more than a century
        raise ValueError("duration is too long")
    amount = int(digits)
    # the text without the spaces the pattern allows inside it (what is stored and answered:
    # the columns hold 16 characters)
    text = match.group(1) + unit
    if amount <= 0:
        raise ValueError("duration must be greater than zero")
    if unit == "mo":
        if amount > 1200:
            raise ValueError("duration is too long")
        return Duration(text, months=amount)
    seconds = amount * _SECONDS[unit]
    if seconds > _MAX_SECONDS:
        raise ValueError("duration is too long")
    return Duration(text, seconds=seconds)


def utcnow() -> datetime:
    """The current time as a naive UTC datetime (how every timestamp is stored)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def aware(value: datetime | None) -> datetime | None:
    """A stored naive-UTC timestamp as a timezone-aware UTC datetime (for data handed to
    the host, such as signals: the API's timestamps say ``+00:00`` too)."""
    if value is None:
        return None
    return value.replace(tzinfo=timezone.utc)


def isoformat(value: datetime | None) -> str | None:
    """Render a stored naive-UTC timestamp the way LiteLLM's API does (ISO 8601, UTC)."""
    if value is None:
        return None
    return value.replace(tzinfo=timezone.utc).isoformat()
