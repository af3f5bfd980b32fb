"""Progress of long steps for a person at a terminal, read from the log records the steps already write.

The steps report their batches through ``logging`` (``null_orphans: 5000/20000 keys processed (25%), ...``,
``restore: 5000 audited row(s) of run ... seen, ...``); a handler turns those records into a progress bar on a
terminal and into plain lines otherwise (a CI log, a file), so the steps stay the one place that counts.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from dataclasses import dataclass
from typing import TextIO

# The batch loops' own progress messages (steps.orphans.sweep_orphans and records.restore).
SWEEP_PROGRESS = re.compile(
    r"^(?P<step>[\w .-]+): (?P<done>\d+)/(?P<total>\d+) keys processed \(\d+%\), (?P<changed>\d+) nulled, "
    r"(?P<rate>[\d.]+) rows/s$"
)
RESTORE_PROGRESS = re.compile(
    r"^(?P<step>restore): (?P<done>\d+) audited row\(s\) of run .* seen, (?P<changed>\d+) put back so far$"
)
BAR_WIDTH = 30


@dataclass(frozen=True)
class Progress:
    step: str
    done: int
    total: int | None  # None: the step does not know its total (restore counts as it goes)
    changed: int
    rate: float

    def line(self) -> str:
        counted = (
            f"{self.done}/{self.total} ({100 * self.done / max(self.total, 1):.0f}%)" if self.total else f"{self.done}"
        )
        return f"{self.step}: {counted} rows, {self.changed} changed, {self.rate:.0f} rows/s"

    def bar(self) -> str:
        if not self.total:
            return self.line()
        filled = BAR_WIDTH * min(self.done, self.total) // self.total
        return f"{self.step} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] " + self.line().split(": ", 1)[1]


def parse_progress(message: str, started: float, now: float) -> Progress | None:
    """The progress a log message reports, or None for any other message. ``started``: when the step's
    first progress was seen, for steps that do not log a rate."""
    if match := SWEEP_PROGRESS.match(message):
        return Progress(
            match["step"], int(match["done"]), int(match["total"]), int(match["changed"]), float(match["rate"])
        )
    if match := RESTORE_PROGRESS.match(message):
        done = int(match["done"])
        return Progress(
            match["step"], done, None, int(match["changed"]), done / (now - started) if now > started else 0.0
        )
    return None


class ProgressHandler(logging.Handler):
    """Shows batch progress on ``stream``: one redrawn bar on a terminal, one line per update elsewhere. Other
    records are shown from ``level`` up (warnings by default), each on its own line."""

    def __init__(self, stream: TextIO | None = None, *, level: int = logging.WARNING) -> None:
        super().__init__(logging.DEBUG)
        self.stream = stream or sys.stderr
        self.terminal = self.stream.isatty()
        self.shown_level = level
        self._bar_open = False
        self._first_seen: dict[str, float] = {}
        # A step that logs no rate gets one from its first progress record, or for that first record, from here.
        self._created = time.monotonic()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            now = time.monotonic()
            progress = parse_progress(message, self._first_seen.get(record.name, self._created), now)
            if progress is not None:
                self._first_seen.setdefault(record.name, now)
                self._show_progress(progress)
            elif record.levelno >= self.shown_level:
                self._close_bar()
                prefix = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
                self.stream.write(f"{prefix}{message}\n")
                self.stream.flush()
        except Exception:  # a display problem must never fail the step that logged
            self.handleError(record)

    def _show_progress(self, progress: Progress) -> None:
        if self.terminal:
            self.stream.write(f"\r\x1b[K{progress.bar()}")
            self._bar_open = True
            if progress.total is not None and progress.done >= progress.total:
                self._close_bar()
        else:
            self.stream.write(progress.line() + "\n")
        self.stream.flush()

    def _close_bar(self) -> None:
        if self._bar_open:
            self.stream.write("\n")
            self._bar_open = False

    def close(self) -> None:
        self._close_bar()
        super().close()
