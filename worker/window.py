"""The embedding window (``EMBED_WINDOW=22:00-06:00``): the hours of the day in which bulk
work may run.

A window is a start and an end time of day in one time zone; the start is inside, the end
is not, and a start later than the end wraps midnight (``22:00-06:00`` is ten hours of
night). Plain functions of a given clock, so the dispatcher's decision is testable with a
fixed ``now``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, time, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_WINDOW = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")
_DAY = timedelta(days=1)


@dataclass(frozen=True)
class TimeWindow:
    start: time
    end: time
    zone: tzinfo

    @classmethod
    def parse(cls, spec: str, zone: str = "UTC") -> TimeWindow:
        """``"22:00-06:00"`` → a window; ValueError naming what is wrong otherwise."""
        match = _WINDOW.match(spec)
        if match is None:
            raise ValueError(f"{spec!r}: expected HH:MM-HH:MM, for example 22:00-06:00")
        h1, m1, h2, m2 = (int(g) for g in match.groups())
        for hour, minute in ((h1, m1), (h2, m2)):
            if hour > 23 or minute > 59:
                raise ValueError(f"{spec!r}: {hour:02d}:{minute:02d} is not a time of day")
        if (h1, m1) == (h2, m2):
            raise ValueError(
                f"{spec!r}: start and end are the same; leave it empty to run at any hour"
            )
        return cls(time(h1, m1), time(h2, m2), parse_zone(zone))

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M} {self.zone}"

    def _local(self, now: datetime) -> datetime:
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        return now.astimezone(self.zone)

    def contains(self, now: datetime) -> bool:
        t = self._local(now).time().replace(tzinfo=None)
        if self.start < self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end  # wraps midnight

    def next_open(self, now: datetime) -> datetime:
        """When the window next opens (``now`` itself when it is open)."""
        if self.contains(now):
            return now
        local = self._local(now)
        opening = datetime.combine(local.date(), self.start, tzinfo=self.zone)
        if opening <= local:
            opening += _DAY
        return opening


def parse_zone(name: str) -> tzinfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{name!r}: not an IANA time zone (e.g. UTC, Europe/Berlin)") from None
