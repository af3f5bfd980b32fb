"""Run settings: one definition per setting (name, type, default, bounds, form text) feeds the Airflow trigger
form and the library's own checks, which validate against the very JSON schema the form uses.

Imports only the standard library and jsonschema (which Airflow itself imports): the DAG file imports this
at parse time.
"""

from __future__ import annotations

import re
import zoneinfo
from dataclasses import asdict, dataclass, field, fields
from datetime import time
from typing import Any

import jsonschema

from fk_maintenance.errors import InvalidSettings
from fk_maintenance.keys.window import Window

HHMM_PATTERN = r"^([01]\d|2[0-3]):[0-5]\d$"
# Airflow's own rule for DAG and connection ids.
AIRFLOW_KEY = r"^[A-Za-z0-9_.-]+$"
CONN_ID_SCHEMA: dict[str, Any] = {"type": "string", "pattern": AIRFLOW_KEY, "minLength": 1, "maxLength": 250}
_NOT_IN_AIRFLOW_KEY = re.compile(r"[^A-Za-z0-9_.-]")


def airflow_key_from(name: str) -> str:
    """A DAG id for a database object's name (a constraint's): each character Airflow's ids do not take becomes _."""
    return _NOT_IN_AIRFLOW_KEY.sub("_", name)


SECTION_RUN = "What this run does"
SECTION_FLEET = "Targets (fleet)"
SECTION_LOCKS = "Locks and batches"
SECTION_WINDOW = "Validation window"
SECTION_CHECKS = "End-state checks"
SECTION_DELETES = "Deleting orphans (keys declared orphans: delete)"

# parallel_workers values below 0 (0 and up are a number of workers).
SERVER_PARALLEL_WORKERS = -1  # the server's own settings, untouched (the default before auto)
AUTO_PARALLEL_WORKERS = -2  # decided before each step from the server's cores, limits and load (parallelism.py)


@dataclass(frozen=True)
class SettingDef:
    name: str
    default: Any
    schema: dict[str, Any]
    title: str
    description: str
    section: str


def _setting(default: Any, schema: dict[str, Any], title: str, description: str, section: str) -> Any:
    return field(
        default=default, metadata={"schema": schema, "title": title, "description": description, "section": section}
    )


@dataclass(frozen=True)
class RunSettings:
    """Every setting of a run. The field list below is the one home of each name, default, bound and text."""

    dry_run: bool = _setting(
        False,
        {"type": "boolean"},
        "Dry run",
        "Read-only: detect orphans, check the catalog and the window, report what a real run would do. "
        "No writes, no DDL, no lock stronger than ACCESS SHARE.",
        SECTION_RUN,
    )
    validate_now: bool = _setting(
        False,
        {"type": "boolean"},
        "Validate now (ignore the window)",
        "Operator override: run VALIDATE CONSTRAINT now even outside the low-traffic window. "
        "VALIDATE does not block the app's reads or writes, but it scans the whole table.",
        SECTION_RUN,
    )
    conn_ids: tuple[str, ...] = _setting(
        (),
        {"type": "array", "items": CONN_ID_SCHEMA, "uniqueItems": True, "maxItems": 1000},
        "Target connections",
        "Airflow connection ids to run on, one per line, in order: the first is the canary and runs alone "
        "first; if it fails, no other target is touched. Empty: the connections the targets file declares.",
        SECTION_FLEET,
    )
    max_parallel: int = _setting(
        4,
        {"type": "integer", "minimum": 1, "maximum": 64},
        "Targets at once",
        "After the canary, at most this many targets are worked on at the same time (the pool "
        "fk_maintenance caps the total over all runs).",
        SECTION_FLEET,
    )
    max_failures: int = _setting(
        0,
        {"type": "integer", "minimum": 0, "maximum": 1000},
        "Stop after failures",
        "Once this many targets have failed, no new target starts (those already running finish). "
        "0 = no limit: every target is tried.",
        SECTION_FLEET,
    )
    batch_size: int = _setting(
        5000,
        {"type": "integer", "minimum": 1, "maximum": 100_000},
        "Batch size",
        "Orphan pointers nulled per short transaction (each batch audits and updates its rows together).",
        SECTION_LOCKS,
    )
    batch_pause_ms: int = _setting(
        0,
        {"type": "integer", "minimum": 0, "maximum": 60_000},
        "Pause between batches (ms)",
        "Sleep between batches, to leave room for replication and vacuum on a busy primary.",
        SECTION_LOCKS,
    )
    lock_timeout_ms: int = _setting(
        2000,
        {"type": "integer", "minimum": 50, "maximum": 60_000},
        "Lock timeout (ms)",
        "The longest any app statement may wait behind one of our table locks. Every statement that "
        "locks the table runs under this lock_timeout; attempts that time out are retried.",
        SECTION_LOCKS,
    )
    lock_attempts: int = _setting(
        8,
        {"type": "integer", "minimum": 1, "maximum": 50},
        "Lock attempts",
        "How many times adding the constraint (and validating it) tries to take its lock before the task "
        "fails and leaves the retry to Airflow. Waits between attempts grow, with jitter.",
        SECTION_LOCKS,
    )
    gap_watch_seconds: int = _setting(
        10,
        {"type": "integer", "minimum": 1, "maximum": 300},
        "Watch for a free moment (s)",
        "Before each attempt to add the constraint, watch pg_locks (every 20 ms) for up to this long and strike "
        "the moment no app transaction holds a conflicting lock. If none comes, the attempt is still made when "
        "only young transactions hold one, and skipped when an older one does.",
        SECTION_LOCKS,
    )
    max_replica_lag_s: int = _setting(
        30,
        {"type": "integer", "minimum": 0, "maximum": 3600},
        "Max replica lag (s)",
        "On a primary with streaming replicas, the batches of null_orphans (and its re-sweep) wait while any "
        "replica's replay lag is above this many seconds, and go on when it drops. 0 turns the wait off.",
        SECTION_LOCKS,
    )
    parallel_workers: int = _setting(
        AUTO_PARALLEL_WORKERS,
        {"type": "integer", "minimum": AUTO_PARALLEL_WORKERS, "maximum": 16},
        "Parallel workers per query",
        "Parallel workers our scans and the index build may use. -2 (auto) decides before each step: the "
        "server's cores less one per session busy in the last second and one for the step itself, never above "
        "the server's own limits; the step's log says what it chose and why. -1 keeps the server's own settings "
        "(max_parallel_workers_per_gather, max_parallel_maintenance_workers); 0 keeps each step on one core; "
        "N allows N.",
        SECTION_LOCKS,
    )
    index_timeout_min: int = _setting(
        240,
        {"type": "integer", "minimum": 1, "maximum": 1440},
        "Index build timeout (min)",
        "statement_timeout and lock_timeout of CREATE INDEX CONCURRENTLY. Its lock (SHARE UPDATE "
        "EXCLUSIVE) never makes app writes queue, so it may wait long for old transactions to end.",
        SECTION_LOCKS,
    )
    window_start: str = _setting(
        "01:00",
        {"type": "string", "pattern": HHMM_PATTERN},
        "Window start (HH:MM)",
        "Start of the daily low-traffic window, local time in the window timezone.",
        SECTION_WINDOW,
    )
    window_end: str = _setting(
        "05:00",
        {"type": "string", "pattern": HHMM_PATTERN},
        "Window end (HH:MM)",
        "End of the window; earlier than the start means the window crosses midnight. VALIDATE runs under a "
        "statement_timeout that ends here.",
        SECTION_WINDOW,
    )
    window_timezone: str = _setting(
        "UTC",
        {"type": "string", "minLength": 1, "maxLength": 64},
        "Window timezone",
        "IANA timezone of the window, for example Europe/Berlin; daylight-saving changes are followed.",
        SECTION_WINDOW,
    )
    max_active_sessions: int = _setting(
        0,
        {"type": "integer", "minimum": 0, "maximum": 10_000},
        "Load threshold (active sessions)",
        "Validate only while pg_stat_activity shows at most this many other active client sessions. "
        "0 turns the check off.",
        SECTION_WINDOW,
    )
    max_windows: int = _setting(
        7,
        {"type": "integer", "minimum": 1, "maximum": 60},
        "Windows before giving up",
        "How many windows validation may wait for (or be cut short in) before the task fails.",
        SECTION_WINDOW,
    )
    recheck_minutes: int = _setting(
        10,
        {"type": "integer", "minimum": 1, "maximum": 240},
        "Recheck interval inside the window (min)",
        "When the window is open but the load is too high or an anti-wraparound vacuum runs on the table, "
        "look again after this many minutes.",
        SECTION_WINDOW,
    )
    max_depth: int = _setting(
        5,
        {"type": "integer", "minimum": 1, "maximum": 100},
        "Maximum hierarchy depth",
        "post_checks fails when any chain of parents is deeper than this (yearly to daily is 5).",
        SECTION_CHECKS,
    )
    approve_deletes_above: int = _setting(
        1000,
        {"type": "integer", "minimum": 0, "maximum": 1_000_000_000},
        "Approve deletes above (rows)",
        "For a key declared orphans: delete, a person approves the delete in the Airflow UI (Required actions) "
        "when its blast radius (orphan rows, the rows their cascade deletes, the pointers it nulls or resets) "
        "exceeds this many rows; at or below it the delete goes ahead. 0: every delete waits for approval. "
        "Scheduled runs follow the same rule.",
        SECTION_DELETES,
    )
    approval_timeout_minutes: int = _setting(
        24 * 60,
        {"type": "integer", "minimum": 1, "maximum": 30 * 24 * 60},
        "Approval timeout (min)",
        "No answer within this many minutes: nothing is deleted and the target fails, saying so.",
        SECTION_DELETES,
    )
    sample_size: int = _setting(
        10,
        {"type": "integer", "minimum": 0, "maximum": 1000},
        "Sample size",
        "How many orphan ids detect_orphans shows in its log and summary.",
        SECTION_CHECKS,
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "conn_ids", tuple(self.conn_ids))
        _raise_on_problems({**asdict(self), "conn_ids": list(self.conn_ids)})

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> RunSettings:
        """Build from the DAG run's params, refusing unknown names, wrong types and bounds with one message."""
        _raise_on_problems(dict(params))
        # JSON Schema counts 1000.0 (and 1e3) as an integer; the settings are Python ints from here on.
        integers = {d.name for d in SETTING_DEFS if d.schema.get("type") == "integer"}
        return cls(**{k: int(v) if k in integers and isinstance(v, float) else v for k, v in params.items()})

    @property
    def window(self) -> Window:
        return Window(time.fromisoformat(self.window_start), time.fromisoformat(self.window_end), self.zone)

    @property
    def index_timeout_ms(self) -> int:
        """The long timeout of the steps whose lock the app never waits on (index build, VALIDATE by hand)."""
        return self.index_timeout_min * 60 * 1000

    @property
    def zone(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.window_timezone)


SETTING_DEFS: tuple[SettingDef, ...] = tuple(
    # Defaults as JSON has them (a tuple is a list), the form's and the run conf's vocabulary.
    SettingDef(name=f.name, default=list(f.default) if isinstance(f.default, tuple) else f.default, **f.metadata)
    for f in fields(RunSettings)
)
# The trigger form's Params carry exactly these per-setting schemas; the library validates a run's values
# against the same object, so the two can never disagree about what is allowed.
PARAMS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {d.name: d.schema for d in SETTING_DEFS},
    "additionalProperties": False,
}
_VALIDATOR = jsonschema.validators.validator_for(PARAMS_SCHEMA)(
    PARAMS_SCHEMA, format_checker=jsonschema.FormatChecker()
)


def _raise_on_problems(values: dict[str, Any]) -> None:
    errors = sorted(_VALIDATOR.iter_errors(values), key=lambda e: [str(p) for p in e.path])
    problems = [_describe(error) for error in errors]
    if not any(error.validator == "additionalProperties" for error in errors):
        malformed = {str(error.path[0]) for error in errors if error.path}
        problems += _cross_field_problems(values, malformed)
    if problems:
        raise InvalidSettings("invalid run settings: " + "; ".join(problems))


def _describe(error: jsonschema.ValidationError) -> str:
    """One readable line per schema violation, naming the setting and the value."""
    if error.validator == "additionalProperties":
        unknown = sorted(set(error.instance) - set(PARAMS_SCHEMA["properties"]))
        return f"unknown setting(s) {', '.join(map(repr, unknown))}"
    name = str(error.path[0]) if error.path else "settings"
    value, bound = error.instance, error.validator_value
    if error.validator == "type":
        return f"{name} must be a{'n' if bound[0] in 'ai' else ''} {bound}, got {value!r}"
    if error.validator == "minimum":
        return f"{name} must be at least {bound}, got {value}"
    if error.validator == "maximum":
        return f"{name} must be at most {bound}, got {value}"
    if error.validator == "pattern" and bound == HHMM_PATTERN:
        return f"{name} must be a time HH:MM between 00:00 and 23:59, got {value!r}"
    if error.validator == "pattern" and bound == AIRFLOW_KEY:
        return f"{name} holds {value!r}, which is not an Airflow connection id (letters, digits, _ . - only)"
    if error.validator == "uniqueItems":
        return f"{name} lists a connection more than once: {value!r}"
    return f"{name}: {error.message}"


def _cross_field_problems(values: dict[str, Any], malformed: set[str]) -> list[str]:
    """What a per-field JSON schema cannot say: an empty window, a timezone that does not exist. Settings the
    schema already refused are not judged again."""
    problems = []
    start = values.get("window_start", RunSettings.window_start)
    end = values.get("window_end", RunSettings.window_end)
    if not malformed & {"window_start", "window_end"} and start == end:
        problems.append(f"window_start and window_end are both {start}: the window would be empty")
    zone = values.get("window_timezone", RunSettings.window_timezone)
    if "window_timezone" not in malformed:
        try:
            zoneinfo.ZoneInfo(zone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
            problems.append(f"window_timezone {zone!r} is not a known IANA timezone (for example 'Europe/Berlin')")
    return problems


def form_table_markdown() -> str:
    """The trigger form as a Markdown table (docs/running.md's), from the same definitions as the form."""
    lines = ["| field | default | allowed | meaning |", "| --- | --- | --- | --- |"]
    for d in SETTING_DEFS:
        default = (
            str(d.default).lower()
            if isinstance(d.default, bool)
            else "the file's list"
            if d.name == "conn_ids"
            else d.default
        )
        allowed = (
            f"{d.schema['minimum']} to {d.schema['maximum']}"
            if "minimum" in d.schema
            else "HH:MM"
            if d.schema.get("pattern") == HHMM_PATTERN
            else "connection ids"
            if d.schema["type"] == "array"
            else d.schema["type"]
        )
        lines.append(f"| `{d.name}` | {default} | {allowed} | {d.description} |")
    return "\n".join(lines)
