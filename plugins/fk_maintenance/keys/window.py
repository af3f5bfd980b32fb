"""The daily low-traffic window, in local time of an IANA timezone, possibly crossing midnight.

All arithmetic is on aware datetimes; local wall-clock times are turned into instants per day, so a
daylight-saving change shortens or lengthens that day's window exactly as the wall clock does. A wall time
that does not exist that day (skipped by a spring-forward) is taken at the offset before the change.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo


@dataclass(frozen=True)
class Window:
    start: time
    end: time
    zone: ZoneInfo

    @property
    def nominal_length(self) -> timedelta:
        """Length on a day without a daylight-saving change (what a schedule's catch-up allowance should be)."""
        day = timedelta(days=1)
        return (datetime.combine(date.min, self.end) - datetime.combine(date.min, self.start)) % day

    def _instance(self, local_day: date) -> tuple[datetime, datetime]:
        start = datetime.combine(local_day, self.start, tzinfo=self.zone)
        end_day = local_day + timedelta(days=1) if self.end <= self.start else local_day
        end = datetime.combine(end_day, self.end, tzinfo=self.zone)
        return start.astimezone(UTC), end.astimezone(UTC)

    def current_or_next(self, now: datetime) -> tuple[datetime, datetime]:
        """(start, end) in UTC of the window containing ``now``, or else of the next one."""
        local_day = now.astimezone(self.zone).date() - timedelta(days=1)
        for offset in range(4):
            start, end = self._instance(local_day + timedelta(days=offset))
            if end > now:
                return start, end
        raise AssertionError("a daily window always ends within two days")  # pragma: no cover

    def is_open(self, now: datetime) -> bool:
        start, end = self.current_or_next(now)
        return start <= now < end

    def ends_between(self, since: datetime, now: datetime) -> int:
        """How many windows ended in (since, now]: the windows a waiting task has already had."""
        count = 0
        local_day = since.astimezone(self.zone).date() - timedelta(days=1)
        while True:
            _start, end = self._instance(local_day)
            if end > now:
                return count
            if end > since:
                count += 1
            local_day += timedelta(days=1)


@dataclass(frozen=True)
class WindowDecision:
    """What validate_fk should do now."""

    run_now: bool
    reason: str
    window_end: datetime | None = None  # when running inside the window: the statement_timeout's horizon
    retry_at: datetime | None = None  # when not running: when to look again
    windows_used: int = 0
