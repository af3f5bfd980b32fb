"""Run settings: one definition feeds the Airflow trigger form (JSON schema) and the library's own checks.

Imports only the standard library: the DAG file imports this at parse time.
"""

from __future__ import annotations

import re
import zoneinfo
from dataclasses import dataclass, fields
from datetime import time
from typing import Any

from .errors import InvalidSettings
from .window import Window

_HHMM = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")
HHMM_PATTERN = _HHMM.pattern

SECTION_RUN = "What this run does"
SECTION_LOCKS = "Locks and batches"
SECTION_WINDOW = "Validation window"
SECTION_CHECKS = "End-state checks"


@dataclass(frozen=True)
class SettingDef:
    name: str
    default: Any
    schema: dict[str, Any]
    title: str
    description: str
    section: str


SETTING_DEFS: tuple[SettingDef, ...] = (
    SettingDef(
        "dry_run",
        False,
        {"type": "boolean"},
        "Dry run",
        "Read-only: detect orphans, check the catalog and the window, report what a real run would do. "
        "No writes, no DDL, no lock stronger than ACCESS SHARE.",
        SECTION_RUN,
    ),
    SettingDef(
        "validate_now",
        False,
        {"type": "boolean"},
        "Validate now (ignore the window)",
        "Operator override: run VALIDATE CONSTRAINT now even outside the low-traffic window. "
        "VALIDATE does not block the app's reads or writes, but it scans the whole table.",
        SECTION_RUN,
    ),
    SettingDef(
        "batch_size",
        5000,
        {"type": "integer", "minimum": 1, "maximum": 100_000},
        "Batch size",
        "Orphan pointers nulled per short transaction (each batch audits and updates its rows together).",
        SECTION_LOCKS,
    ),
    SettingDef(
        "batch_pause_ms",
        0,
        {"type": "integer", "minimum": 0, "maximum": 60_000},
        "Pause between batches (ms)",
        "Sleep between batches, to leave room for replication and vacuum on a busy primary.",
        SECTION_LOCKS,
    ),
    SettingDef(
        "lock_timeout_ms",
        2000,
        {"type": "integer", "minimum": 50, "maximum": 60_000},
        "Lock timeout (ms)",
        "The longest any app statement may wait behind one of our table locks. Every statement that "
        "locks the table runs under this lock_timeout; attempts that time out are retried.",
        SECTION_LOCKS,
    ),
    SettingDef(
        "lock_attempts",
        8,
        {"type": "integer", "minimum": 1, "maximum": 50},
        "Lock attempts",
        "How many times adding the constraint (and validating it) tries to take its lock before the task "
        "fails and leaves the retry to Airflow. Waits between attempts grow, with jitter.",
        SECTION_LOCKS,
    ),
    SettingDef(
        "parallel_workers",
        -1,
        {"type": "integer", "minimum": -1, "maximum": 16},
        "Parallel workers per query",
        "Parallel workers our scans and the index build may use. -1 keeps the server's own settings "
        "(max_parallel_workers_per_gather, max_parallel_maintenance_workers); 0 keeps each step on one core "
        "and leaves the others to the app, the choice for a small or CPU-bound primary.",
        SECTION_LOCKS,
    ),
    SettingDef(
        "index_timeout_min",
        240,
        {"type": "integer", "minimum": 1, "maximum": 1440},
        "Index build timeout (min)",
        "statement_timeout and lock_timeout of CREATE INDEX CONCURRENTLY. Its lock (SHARE UPDATE "
        "EXCLUSIVE) never makes app writes queue, so it may wait long for old transactions to end.",
        SECTION_LOCKS,
    ),
    SettingDef(
        "window_start",
        "01:00",
        {"type": "string", "pattern": HHMM_PATTERN},
        "Window start (HH:MM)",
        "Start of the daily low-traffic window, local time in the window timezone.",
        SECTION_WINDOW,
    ),
    SettingDef(
        "window_end",
        "05:00",
        {"type": "string", "pattern": HHMM_PATTERN},
        "Window end (HH:MM)",
        "End of the window; earlier than the start means the window crosses midnight. VALIDATE runs under a "
        "statement_timeout that ends here.",
        SECTION_WINDOW,
    ),
    SettingDef(
        "window_timezone",
        "UTC",
        {"type": "string", "minLength": 1, "maxLength": 64},
        "Window timezone",
        "IANA timezone of the window, for example Europe/Berlin; daylight-saving changes are followed.",
        SECTION_WINDOW,
    ),
    SettingDef(
        "max_active_sessions",
        0,
        {"type": "integer", "minimum": 0, "maximum": 10_000},
        "Load threshold (active sessions)",
        "Validate only while pg_stat_activity shows at most this many other active client sessions. "
        "0 turns the check off.",
        SECTION_WINDOW,
    ),
    SettingDef(
        "max_windows",
        7,
        {"type": "integer", "minimum": 1, "maximum": 60},
        "Windows before giving up",
        "How many windows validation may wait for (or be cut short in) before the task fails.",
        SECTION_WINDOW,
    ),
    SettingDef(
        "recheck_minutes",
        10,
        {"type": "integer", "minimum": 1, "maximum": 240},
        "Recheck interval inside the window (min)",
        "When the window is open but the load is too high or an anti-wraparound vacuum runs on the table, "
        "look again after this many minutes.",
        SECTION_WINDOW,
    ),
    SettingDef(
        "max_depth",
        5,
        {"type": "integer", "minimum": 1, "maximum": 100},
        "Maximum hierarchy depth",
        "post_checks fails when any chain of parents is deeper than this (yearly to daily is 5).",
        SECTION_CHECKS,
    ),
    SettingDef(
        "sample_size",
        10,
        {"type": "integer", "minimum": 0, "maximum": 1000},
        "Sample size",
        "How many orphan ids detect_orphans shows in its log and summary.",
        SECTION_CHECKS,
    ),
)

_DEFS_BY_NAME = {d.name: d for d in SETTING_DEFS}


@dataclass(frozen=True)
class RunSettings:
    dry_run: bool = False
    validate_now: bool = False
    batch_size: int = 5000
    batch_pause_ms: int = 0
    lock_timeout_ms: int = 2000
    lock_attempts: int = 8
    parallel_workers: int = -1
    index_timeout_min: int = 240
    window_start: str = "01:00"
    window_end: str = "05:00"
    window_timezone: str = "UTC"
    max_active_sessions: int = 0
    max_windows: int = 7
    recheck_minutes: int = 10
    max_depth: int = 5
    sample_size: int = 10

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise InvalidSettings("invalid run settings: " + "; ".join(problems))

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> RunSettings:
        """Build from the DAG run's params, refusing unknown names and wrong types with one message."""
        unknown = sorted(set(params) - set(_DEFS_BY_NAME))
        known = {k: v for k, v in params.items() if k in _DEFS_BY_NAME}
        type_problems = [p for name, value in known.items() if (p := _type_problem(name, value))]
        if unknown:
            type_problems.insert(0, f"unknown setting(s) {', '.join(map(repr, unknown))}")
        if type_problems:
            raise InvalidSettings("invalid run settings: " + "; ".join(type_problems))
        return cls(**known)

    @property
    def window_start_time(self) -> time:
        return time.fromisoformat(self.window_start)

    @property
    def window_end_time(self) -> time:
        return time.fromisoformat(self.window_end)

    @property
    def zone(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.window_timezone)

    @property
    def window(self) -> Window:
        return Window(self.window_start_time, self.window_end_time, self.zone)


def _type_problem(name: str, value: Any) -> str | None:
    expected = _DEFS_BY_NAME[name].schema["type"]
    python_types = {"boolean": (bool,), "integer": (int,), "string": (str,)}[expected]
    # bool is an int in Python; a JSON true must not pass for an integer.
    if not isinstance(value, python_types) or (expected == "integer" and isinstance(value, bool)):
        return f"{name} must be a{'n' if expected[0] in 'ai' else ''} {expected}, got {value!r}"
    return None


def _problems(settings: RunSettings) -> list[str]:
    problems: list[str] = []
    for f in fields(settings):
        value = getattr(settings, f.name)
        if (type_problem := _type_problem(f.name, value)) is not None:
            problems.append(type_problem)
            continue
        schema = _DEFS_BY_NAME[f.name].schema
        if "minimum" in schema and value < schema["minimum"]:
            problems.append(f"{f.name} must be at least {schema['minimum']}, got {value}")
        if "maximum" in schema and value > schema["maximum"]:
            problems.append(f"{f.name} must be at most {schema['maximum']}, got {value}")
    for name in ("window_start", "window_end"):
        value = getattr(settings, name)
        if isinstance(value, str) and not _HHMM.match(value):
            problems.append(f"{name} must be a time HH:MM between 00:00 and 23:59, got {value!r}")
    if not problems and settings.window_start == settings.window_end:
        problems.append(f"window_start and window_end are both {settings.window_start}: the window would be empty")
    tz = settings.window_timezone
    if isinstance(tz, str):
        try:
            zoneinfo.ZoneInfo(tz)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
            problems.append(f"window_timezone {tz!r} is not a known IANA timezone (for example 'Europe/Berlin')")
    return problems
