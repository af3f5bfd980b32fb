"""``fk-maintenance``: the declared foreign keys outside Airflow, for a CI job or an operator's laptop.

    fk-maintenance check   [--targets FILE]                                 the targets file, no database
    fk-maintenance declare --from-dsn DSN [--schema NAME ...] [--conn-ids ID ...]   a reference database's keys
    fk-maintenance plan    (--dsn DSN | --conn-id ID) [--targets FILE] [--key NAME] [--json]   read-only
    fk-maintenance run     (--dsn DSN | --conn-id ID) [--targets FILE] --key NAME [--set NAME=VALUE ...]
    fk-maintenance restore (--dsn DSN | --conn-id ID) [--targets FILE] --key NAME --run-id ID [--dry-run]
                           [--set NAME=VALUE ...]
    fk-maintenance guard   MIGRATION.sql [--in-place] [--targets FILE] [--max-rows N]   a drizzle-kit migration

The steps are the DAG's (``steps.registry.STEPS``, in that order), the settings the trigger form's (validated
by the same schema), and each writing step takes the same run lock as under Airflow: a run from here and a DAG run
never change a database at once. A step that finds the other one at work waits for it, as a DAG task is
rescheduled. Airflow is imported only for ``--conn-id``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from fk_maintenance.cli.declare import declare
from fk_maintenance.cli.guard import DEFAULT_MAX_ROWS, GuardRefused, guard_file
from fk_maintenance.cli.progress import ProgressHandler
from fk_maintenance.db.session import CONCURRENT_RUN_GRACE, CONCURRENT_RUN_RECHECK, LIBPQ_DEFAULTS
from fk_maintenance.errors import (
    ConcurrentRun,
    InvalidSettings,
    MaintenanceError,
    PostChecksFailed,
    PreflightFailed,
    TargetUnreachable,
)
from fk_maintenance.keys.settings import SECTION_FLEET, SETTING_DEFS, RunSettings
from fk_maintenance.keys.spec import ForeignKeySpec, describe_columns
from fk_maintenance.keys.targets import Target, TargetsFileInvalid, load_targets
from fk_maintenance.records.approval import APPROVAL_TASK, approval_needed
from fk_maintenance.steps.registry import APPROVED_ORPHANS, MONITOR_CONNECT, RUN_ID, RUN_STARTED_AT, STEPS, Step

PROG = "fk-maintenance"
# Exit codes, the same for every subcommand.
EXIT_OK = 0  # check: the file is valid; plan: every key would converge; run: converged; restore: done
EXIT_REFUSED = 1  # check: the file has problems; plan: a key would be refused; run/restore: did not finish
EXIT_USAGE = 2  # bad arguments or settings, a targets file that cannot be used, an unreachable database
EXIT_WAITING = 3  # run: everything up to validation is done; VALIDATE waits for the low-traffic window
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report it

TARGETS_ENV = "FK_MAINTENANCE_TARGETS"  # the variable the DAG file reads too
DEFAULT_TARGETS = Path("dags") / "targets.yaml"
# Settings of a fleet run (which connections, how many at once) mean nothing on the one database of a command.
FLEET_SETTINGS = frozenset(d.name for d in SETTING_DEFS if d.section == SECTION_FLEET)
# A run's id says where it came from, like Airflow's manual__/scheduled__ ids; restores get their own.
RUN_ID_PREFIX = "cli__"
RESTORE_ID_PREFIX = "cli_restore__"


# Orphans named in a plan's text (all of detect_orphans' sample is in --json).
PLAN_SAMPLE = 3


class UsageError(Exception):
    """Arguments, settings or a targets file the command cannot work with (exit 2)."""


# --- where the database is ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Database:
    """A target database: how to connect, and how to name it in output (never with its password)."""

    label: str
    connect: Callable[[], psycopg.Connection]


def dsn_database(dsn: str) -> Database:
    """Connections from a libpq string (``key=value`` or URI), with the DAG's connection defaults (a dead host
    fails in seconds, TCP keepalives) unless the string sets them."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        # libpq's message may quote part of the string, which may be the password.
        raise UsageError("--dsn is not a libpq connection string (key=value pairs or a postgresql:// URI)") from None
    password = params.get("password")
    # What libpq will use where the string is silent: its environment variables, then its defaults.
    user = params.get("user") or os.environ.get("PGUSER") or "?"
    host = params.get("host") or os.environ.get("PGHOST") or "local socket"
    port = params.get("port") or os.environ.get("PGPORT") or 5432
    dbname = params.get("dbname") or os.environ.get("PGDATABASE") or user
    label = f"{user}@{host}:{port}/{dbname}"
    conninfo = make_conninfo("", **{**{k: str(v) for k, v in LIBPQ_DEFAULTS.items()}, **params})

    def connect() -> psycopg.Connection:
        try:
            return psycopg.connect(conninfo, autocommit=True)
        except psycopg.Error as exc:
            text = str(exc).strip()
            # libpq's message is the failure, then hints; all of it, on one line.
            reason = "; ".join(line.strip() for line in text.splitlines() if line.strip()) or type(exc).__name__
            if password:
                reason = reason.replace(str(password), "***")
            raise TargetUnreachable(f"cannot connect to the target database ({label}): {reason}") from None

    return Database(label, connect)


def airflow_database(conn_id: str) -> Database:
    """Connections through the Airflow connection ``conn_id``, by the very connector the DAG's tasks use
    (PostgresHook: environment or metadata database, IAM tokens, every libpq keyword of its extra)."""
    try:
        import airflow.providers.postgres.hooks.postgres  # noqa: F401  (only to say clearly what is missing)
    except ImportError:
        raise UsageError(
            "--conn-id needs Apache Airflow and apache-airflow-providers-postgres installed; use --dsn instead"
        ) from None
    from fk_maintenance.airflow.tasks import connector

    return Database(f"Airflow connection '{conn_id}'", connector(conn_id))


def database_from(args: argparse.Namespace) -> Database:
    return dsn_database(args.dsn) if args.dsn is not None else airflow_database(args.conn_id)


# --- the targets file ----------------------------------------------------------------------------------------


def targets_path(args: argparse.Namespace) -> Path:
    return Path(args.targets or os.environ.get(TARGETS_ENV) or DEFAULT_TARGETS)


def load(path: Path) -> tuple[Target, ...]:
    if not path.is_file():
        raise UsageError(f"targets file {path} not found (give --targets FILE or set {TARGETS_ENV})")
    try:
        return load_targets(path)
    except TargetsFileInvalid as exc:
        raise UsageError(f"{exc}\n(`{PROG} check --targets {path}` lists every problem)") from None


def select(targets: tuple[Target, ...], key: str | None, path: Path) -> tuple[Target, ...]:
    if key is None:
        return targets
    chosen = tuple(t for t in targets if t.name == key)
    if not chosen:
        raise UsageError(f"{path} declares no key {key!r}; declared: {', '.join(t.name for t in targets)}")
    return chosen


def settings_from(
    assignments: Sequence[str], *, dry_run: bool | None = None, defaults: dict[str, Any] | None = None
) -> RunSettings:
    """The run's settings from ``NAME=VALUE`` pairs, checked by the trigger form's own schema. A value is read
    as JSON when it is JSON (``500``, ``true``), else as text (``01:00``, ``Europe/Berlin``). ``defaults``: the
    key's own (its targets entry's), which an assignment overrides."""
    params: dict[str, Any] = dict(defaults or {})
    for assignment in assignments:
        name, sep, text = assignment.partition("=")
        if not sep or not name:
            raise UsageError(f"--set {assignment!r}: expected NAME=VALUE, for example --set batch_size=1000")
        if name in FLEET_SETTINGS:
            raise UsageError(f"--set {name}: a fleet setting; this command works on the one database it is given")
        try:
            params[name] = json.loads(text)
        except json.JSONDecodeError:
            params[name] = text
    if dry_run is not None:
        params["dry_run"] = dry_run
    try:
        return RunSettings.from_params(params)
    except InvalidSettings as exc:
        raise UsageError(str(exc)) from None


# --- running steps -----------------------------------------------------------------------------------------


@dataclass
class StepsOutcome:
    """What a sequence of steps did: each step's summary (None: did not run or did not finish), and why it
    stopped early, if it did."""

    results: dict[str, dict[str, Any] | None]
    failed_step: str | None = None
    error: str | None = None
    unreachable: bool = False
    waiting_for_window: str | None = None
    problems: list[str] = field(default_factory=list)


def run_steps(
    database: Database,
    spec: ForeignKeySpec,
    settings: RunSettings,
    run_id: str,
    *,
    echo: Callable[[str], None],
    settings_of: Callable[[Step], RunSettings] | None = None,
) -> StepsOutcome:
    """Every step of ``STEPS`` in order, each on its own connection as the DAG's tasks are, stopping at the first
    that fails or that has to wait for the validation window. ``settings_of`` may give a step other settings
    (plan judges preflight as for a real run and dry-runs the rest)."""
    started_at = datetime.now(UTC)
    # The command line's approval is checked after detect_orphans (below), right before the delete.
    available = {
        RUN_ID: run_id,
        RUN_STARTED_AT: started_at,
        MONITOR_CONNECT: database.connect,
        APPROVED_ORPHANS: None,
    }
    outcome = StepsOutcome(results=dict.fromkeys((s.name for s in STEPS), None))
    for step in STEPS:
        step_settings = settings_of(step) if settings_of else settings
        began = time.monotonic()
        result = _result_or_failure(
            outcome,
            step.name,
            partial(_step_waiting_for_other_runs, step, database, spec, step_settings, available, started_at, echo),
        )
        if result is None:
            echo(f"{step.name}: failed after {time.monotonic() - began:.1f} s")
            return outcome
        outcome.results[step.name] = result
        echo(f"{step.name}: {_summary(result)} ({time.monotonic() - began:.1f} s)")
        if step.name == "detect_orphans" and not step_settings.dry_run:
            refusal = _approval_refusal(result, step_settings.approve_deletes_above)
            if refusal:
                outcome.failed_step, outcome.error = APPROVAL_TASK, refusal
                echo(f"{APPROVAL_TASK}: not approved: {outcome.error}")
                return outcome
        if result.get("outcome") == "reschedule":
            outcome.waiting_for_window = result.get("reason") or f"try again at {result.get('retry_at')}"
            return outcome
    return outcome


def _result_or_failure(
    outcome: StepsOutcome, step_name: str, call: Callable[[], dict[str, Any]]
) -> dict[str, Any] | None:
    """``call()``'s result, the step's; or None, with why it failed written into ``outcome`` (each kind of
    failure keeps what the report and the plan show of it)."""
    try:
        return call()
    except TargetUnreachable as exc:
        outcome.failed_step, outcome.error, outcome.unreachable = step_name, str(exc), True
    except PreflightFailed as exc:
        outcome.failed_step, outcome.error, outcome.problems = step_name, str(exc), list(exc.problems)
    except PostChecksFailed as exc:
        # Every check with its outcome, for the report, as the DAG's report task reads it.
        outcome.results[step_name] = exc.summary
        outcome.failed_step, outcome.error = step_name, f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # any error of a step ends the run here, as a failed task ends its target
        outcome.failed_step, outcome.error = step_name, f"{type(exc).__name__}: {exc}"
    return None


def _approval_refusal(found: dict[str, Any], threshold: int) -> str | None:
    """Why the delete detect_orphans sized may not go ahead, or None. The command line's approval is the
    operator's own: the setting raised to what they reviewed, since there is no approval task to wait on."""
    if not approval_needed(found, threshold):
        return None
    return (
        f"the delete takes {found['blast_radius_rows']} row(s) in all, above approve_deletes_above "
        f"({threshold}); nothing was deleted. Review it ({PROG} plan --key ...), then approve it by "
        f"running again with --set approve_deletes_above={found['blast_radius_rows']}"
    )


def _step_waiting_for_other_runs(
    step: Step,
    database: Database,
    spec: ForeignKeySpec,
    settings: RunSettings,
    available: dict[str, Any],
    started_at: datetime,
    echo: Callable[[str], None],
) -> dict[str, Any]:
    def call() -> dict[str, Any]:
        with closing(database.connect()) as conn:
            return step.load()(conn, spec, settings, **{name: available[name] for name in step.needs})

    return waiting_for_other_runs(step.name, call, settings, started_at, echo)


def waiting_for_other_runs(
    what: str,
    call: Callable[[], dict[str, Any]],
    settings: RunSettings,
    started_at: datetime,
    echo: Callable[[str], None],
) -> dict[str, Any]:
    """``call()``; while another session holds the run lock or builds our index (ConcurrentRun), look again every
    CONCURRENT_RUN_RECHECK, for as long as a DAG task would wait (index_timeout_min plus CONCURRENT_RUN_GRACE
    from the run's start), then fail naming the holder."""
    while True:
        try:
            return call()
        except ConcurrentRun as exc:
            if datetime.now(UTC) - started_at >= timedelta(minutes=settings.index_timeout_min) + CONCURRENT_RUN_GRACE:
                raise
            echo(f"{what}: waiting: {exc}; looking again in {CONCURRENT_RUN_RECHECK.total_seconds():.0f} s")
            time.sleep(CONCURRENT_RUN_RECHECK.total_seconds())


def _summary(result: dict[str, Any]) -> str:
    """One line for a step's result: what it did, in its own words."""
    if result.get("outcome") == "reschedule":
        return f"not now: {result['reason']}"
    for key in ("action", "outcome", "skipped"):
        if result.get(key):
            return str(result[key])
    if "orphans" in result:
        return f"{result['orphans']} orphan(s) pointing at {result['dangling_parents']} missing parent(s)"
    if "nulled" in result:
        return f"{result['nulled']} pointer(s) nulled and audited in {result.get('batches', 0)} batch(es)"
    if "passed" in result:
        return f"{result['passed']} check(s) passed, {result['failed']} failed"
    if "table_size" in result:
        return f"{result['table']} {result['table_size']}, constraint {result['constraint']}, index {result['index']}"
    return "done"


def echo_step(line: str) -> None:
    """A step's line as it finishes: on stderr, so that stdout holds only the plan, the report or the JSON."""
    print(f"  {line}", file=sys.stderr, flush=True)


def _now_id(prefix: str) -> str:
    return f"{prefix}{datetime.now(UTC).isoformat()}"


# --- check ---------------------------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace, out: Callable[[str], None]) -> int:
    path = targets_path(args)
    if not path.is_file():
        raise UsageError(f"targets file {path} not found (give --targets FILE or set {TARGETS_ENV})")
    try:
        targets = load_targets(path)
    except TargetsFileInvalid as exc:
        text = str(exc)
        where, _, problems = text.partition(": ")
        out(f"{where}: invalid")
        for problem in problems.split("; "):
            out(f"  - {problem}")
        return EXIT_REFUSED
    out(f"{path}: valid, {len(targets)} foreign key(s)")
    for target in targets:
        out(f"  {target.name}: {target.spec.describe()}; connections {', '.join(target.conn_ids)}")
    return EXIT_OK


# --- plan ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanSection:
    """A part of one key's plan: a title and its lines. Each key's plan is a list of these, so what a later
    step needs to show (say, what an orphan policy would take with it) is one more section."""

    title: str
    lines: list[str]


def plan_key(database: Database, target: Target, echo: Callable[[str], None]) -> dict[str, Any]:
    """What a run of ``target`` would find and do on ``database``, changing nothing: preflight judged as for a
    real run (it only reads either way), then every other step as a dry run."""
    real = RunSettings()
    dry = replace(real, dry_run=True)
    outcome = run_steps(
        database,
        target.spec,
        dry,
        _now_id("cli_plan__"),
        echo=echo,
        settings_of=lambda step: real if step.name == STEPS[0].name else dry,
    )
    results = outcome.results
    refused = outcome.problems or ([outcome.error] if outcome.error else [])
    steps = [f"{name}: {_would(name, result, results)}" for name, result in results.items() if result is not None]
    if outcome.failed_step:
        stopped = "could not connect" if outcome.unreachable else "refused (below)"
        steps.append(f"{outcome.failed_step}: {stopped}; no later step would run")
    sections = [PlanSection("steps", steps)]
    # What the database is comes first, then what is wrong in it, then what the steps would do about it.
    if results.get("detect_orphans"):
        sections.insert(0, _orphans_section(target, results["detect_orphans"]))
    if results.get("preflight"):
        sections.insert(0, _preflight_section(target, results["preflight"]))
    return {
        "key": target.name,
        "target": target.spec.describe(),
        "database": database.label,
        "would_converge": not outcome.failed_step,
        "unreachable": outcome.unreachable,
        "refused": refused,
        "failed_step": outcome.failed_step,
        "steps": results,
        "sections": [{"title": s.title, "lines": s.lines} for s in sections],
    }


def _preflight_section(target: Target, found: dict[str, Any]) -> PlanSection:
    return PlanSection(
        "preflight",
        [
            f"PostgreSQL {found['server_version']}, {found['table']} {found['table_size']} "
            f"(~{found['estimated_rows']} rows)",
            f"constraint {target.spec.constraint}: {found['constraint']}",
            f"index {target.spec.index}: {found['index']}" if target.spec.build_index else f"index: {found['index']}",
            *(f"partition {line}" for line in found.get("partitions", [])),
            *(f"warning: {warning}" for warning in found.get("warnings", [])),
        ],
    )


def _orphans_section(target: Target, found: dict[str, Any]) -> PlanSection:
    sample = ", ".join(found["sample"][:PLAN_SAMPLE]) or "none"
    return PlanSection("orphans", [*_orphan_lines(target, found), f"sample: {sample}"])


def _orphan_lines(target: Target, found: dict[str, Any]) -> list[str]:
    """What a run would do to the orphans, as the key's policy says; for a delete, its blast radius per table."""
    policy = found.get("policy", "nullify")
    head = f"{found['orphans']} row(s) point at {found['dangling_parents']} missing parent(s); orphans: {policy}; "
    if policy == "delete":
        return [
            head + f"a run deletes them and what the database's keys take along, {found['blast_radius_rows']} "
            f"row(s) in all (archived in {target.spec.archive_qualified}):",
            *(
                f"  {table}: " + ", ".join(f"{count} {action}" for action, count in counts.items() if count)
                for table, counts in found["blast_radius"].items()
            ),
            *(f"  e.g. {line}" for line in found["blast_radius_sample"][:PLAN_SAMPLE]),
            *(f"  protected (refused): {line}" for line in found.get("protected_sample", [])[:PLAN_SAMPLE]),
        ]
    if policy == "refuse":
        return [head + "a run refuses them (declare orphans: delete to delete them, archived)"]
    return [
        head
        + (
            f"a run nulls their {describe_columns(tuple(found['nulls']))} (audited in {target.spec.audit_qualified})"
            if found["nulls"]
            else "a run nulls nothing: no column of the key can be nulled"
        )
    ]


def _would(step: str, result: dict[str, Any], results: dict[str, dict[str, Any] | None]) -> str:
    """What a real run's ``step`` would do, from its dry run's ``result`` (and the steps before it)."""
    if step == "validate_fk" and "would_run_now" in result:
        return f"would validate {'now' if result['would_run_now'] else 'later'} ({result['reason']})"
    if step == "null_orphans":
        found = results.get("detect_orphans") or {}
        orphans = found.get("orphans")
        if found.get("policy") == "delete" and orphans:
            return f"would delete {orphans} orphan(s), {found['blast_radius_rows']} row(s) in all, in archived batches"
        return "nothing to null" if orphans == 0 else f"would null {orphans} pointer(s) in audited batches"
    if step == "post_checks":
        checks = result.get("checks", [])
        passing = sum(1 for check in checks if check["ok"] is True)
        failing = sum(1 for check in checks if check["ok"] is False)
        # A dry run leaves out the checks that need a write (ok None).
        untried = (
            f"; {len(checks) - passing - failing} need a write and are left to the run"
            if passing + failing < len(checks)
            else ""
        )
        if not failing:
            return f"the end state already holds: {passing} check(s) pass{untried}"
        return f"would verify the end state: {passing} check(s) pass before the run, {failing} not yet{untried}"
    return _summary(result)


def format_plan(plan: dict[str, Any]) -> str:
    verdict = "would converge" if plan["would_converge"] else "REFUSED, nothing would be changed"
    if plan["unreachable"]:
        verdict = "database unreachable"
    lines = [f"{plan['key']} on {plan['database']}: {verdict}", f"  {plan['target']}"]
    for section in plan["sections"]:
        lines.append(f"  {section['title']}:")
        lines += [f"    {line}" for line in section["lines"]]
    if plan["refused"]:
        lines.append(f"  {'stopped' if plan['unreachable'] else 'refused'} at {plan['failed_step']}:")
        for reason in plan["refused"]:
            first, *rest = reason.splitlines()
            lines += [f"    - {first}", *(f"      {line}" for line in rest)]
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace, out: Callable[[str], None]) -> int:
    path = targets_path(args)
    targets = select(load(path), args.key, path)
    database = database_from(args)
    echo = (lambda _line: None) if args.json else echo_step
    plans = []
    for target in targets:
        if not args.json:
            out(f"planning {target.name} on {database.label} (read-only)")
        plans.append(plan_key(database, target, echo))
    if args.json:
        out(json.dumps({"targets_file": str(path), "keys": plans}, indent=2, default=str))
    else:
        out("")
        out("\n\n".join(format_plan(plan) for plan in plans))
    if any(plan["unreachable"] for plan in plans):
        return EXIT_USAGE
    return EXIT_OK if all(plan["would_converge"] for plan in plans) else EXIT_REFUSED


# --- run -----------------------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace, out: Callable[[str], None]) -> int:
    path = targets_path(args)
    targets = select(load(path), args.key, path)
    # Every key's settings are checked before any key runs: a bad value changes nothing anywhere.
    settings = [settings_from(args.set or [], defaults=target.settings) for target in targets]
    database = database_from(args)
    if len(targets) == 1:
        return run_key(targets[0], settings[0], database, out)
    # One key at a time: two keys' writing steps never work on one table at once, and each keeps its own run id.
    codes = {}
    for target, its_settings in zip(targets, settings, strict=True):
        out(f"=== {target.name}")
        codes[target.name] = run_key(target, its_settings, database, out)
        out("")
    out(f"All {len(targets)} declared key(s) on {database.label}:")
    for name, code in codes.items():
        out(f"  {name}: {RUN_OUTCOMES[code]}")
    worst = max(codes.values(), key=lambda code: RUN_SEVERITY.index(code))
    return worst


# What a key's run ended as, and which of two outcomes the whole run reports (the later the worse).
RUN_OUTCOMES = {
    EXIT_OK: "converged",
    EXIT_WAITING: "waiting for the low-traffic window",
    EXIT_REFUSED: "failed or refused (see above)",
    EXIT_USAGE: "bad settings or unreachable database",
}
RUN_SEVERITY = (EXIT_OK, EXIT_WAITING, EXIT_REFUSED, EXIT_USAGE)


def run_key(target: Target, settings: RunSettings, database: Database, out: Callable[[str], None]) -> int:
    """One key's steps on one database, its report printed; the run's exit code."""
    from fk_maintenance.steps.report import build_report, format_report, read_archived, read_audited

    run_id = _now_id(RUN_ID_PREFIX)
    out(f"Run id: {run_id}")
    out(f"{target.name} on {database.label}{' (dry run)' if settings.dry_run else ''}")

    outcome = run_steps(database, target.spec, settings, run_id, echo=echo_step)
    # build_report logs its lines too; the command prints the report itself, once.
    logging.getLogger("fk_maintenance.steps.report").disabled = True
    # Counted from the audit, as under Airflow: a step that failed after committing batches reported none of them.
    audited = None if settings.dry_run else read_audited(database.connect, target.spec, settings, run_id)
    archived = None if settings.dry_run else read_archived(database.connect, target.spec, settings, run_id)
    report = build_report(target.spec, settings, run_id, outcome.results, audited=audited, archived=archived)
    out("")
    out(format_report(report))
    if outcome.error:
        out("")
        out(f"{outcome.failed_step} failed: {outcome.error}")
    if report["audited"] or report.get("archived"):
        out(f"Undo: {PROG} restore --key {target.name} --run-id '{run_id}' (with the same --dsn or --conn-id)")
    if outcome.unreachable:
        return EXIT_USAGE
    if outcome.waiting_for_window:
        out("")
        out(
            f"Not converged yet: validate_fk waits for the low-traffic window ({outcome.waiting_for_window}). "
            "Run again inside the window, or now with --set validate_now=true; nothing done so far is repeated."
        )
        return EXIT_WAITING
    return EXIT_OK if report["succeeded"] else EXIT_REFUSED


# --- restore -------------------------------------------------------------------------------------------------


def cmd_restore(args: argparse.Namespace, out: Callable[[str], None]) -> int:
    from fk_maintenance.records.restore import format_restore_report, restore_run

    path = targets_path(args)
    (target,) = select(load(path), args.key, path)
    settings = settings_from(args.set or [], dry_run=True if args.dry_run else None)
    database = database_from(args)
    restore_id = _now_id(RESTORE_ID_PREFIX)
    out(f"Restore id: {restore_id}")
    out(
        f"{'Dry run: counting' if settings.dry_run else 'Putting back'} the pointers run {args.run_id!r} nulled, "
        f"{target.name} on {database.label}"
    )

    def call() -> dict[str, Any]:
        with closing(database.connect()) as conn:
            return restore_run(conn, target.spec, settings, args.run_id, restore_id)

    result = waiting_for_other_runs("restore", call, settings, datetime.now(UTC), echo_step)
    report = {
        "targets": [result | {"conn_id": database.label}],
        "restored": result["restored"],
        "still_missing": result["still_missing"],
        "failed": [],
    }
    out("")
    table = format_restore_report(report).splitlines()
    # Its first line says what was put back; a dry run put back nothing, and says what it would below.
    out("\n".join(table[1:] if settings.dry_run else table))
    if settings.dry_run:
        out(f"Dry run: {result['restored']} pointer(s) would be put back; nothing was changed")
    elif result["restore_log"]:
        out(f"Each pointer put back is in {result['restore_log']} WHERE restore_id = '{restore_id}'")
    return EXIT_OK


# --- the command line ------------------------------------------------------------------------------------------


def _add_database(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--dsn",
        help="libpq connection string (key=value or postgresql:// URI); it is never printed with its password. "
        "Keep the password out of it (PGPASSWORD or ~/.pgpass) so it does not show in the process list",
    )
    where.add_argument(
        "--conn-id",
        help="an Airflow connection id (environment AIRFLOW_CONN_<ID> or the metadata database), connected through "
        "the DAG's own PostgresHook; needs Airflow and its postgres provider installed",
    )


def _add_targets(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--targets",
        metavar="FILE",
        help=f"the targets file (default: ${TARGETS_ENV}, else {DEFAULT_TARGETS} in the current directory)",
    )


def _add_database_and_targets(parser: argparse.ArgumentParser) -> None:
    """What plan, run and restore all work on: one database, and the keys the targets file declares."""
    _add_database(parser)
    _add_targets(parser)


def _settings_help() -> str:
    names = ", ".join(d.name for d in SETTING_DEFS if d.name not in FLEET_SETTINGS)
    return f"a run setting of the DAG's trigger form, checked by the same schema; repeatable. Settings: {names}"


class _SubcommandsWithVerbose:
    """``add_parser`` of argparse's subparsers, each subcommand also taking ``-v``."""

    def __init__(self, subparsers: Any, verbose: argparse.ArgumentParser) -> None:
        self._subparsers, self._verbose = subparsers, verbose

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return self._subparsers.add_parser(name, parents=[self._verbose], **kwargs)


def _add_check(commands: _SubcommandsWithVerbose) -> None:
    check = commands.add_parser(
        "check",
        help="validate the targets file (no database)",
        description="Validate the targets file against its JSON schema and the spec rules, with no database. "
        f"Exit {EXIT_OK} when valid, {EXIT_REFUSED} with every problem named.",
    )
    _add_targets(check)


def _add_declare(commands: _SubcommandsWithVerbose) -> None:
    declare_command = commands.add_parser(
        "declare",
        help="print a targets file declaring every foreign key a reference database has",
        description="Read every foreign key of a reference database (staging, or a scratch database the app's own "
        "migrations made) and print a targets file that declares each exactly as it is: its whole definition under "
        "its own name, the index that already serves it. Keys that cannot be declared are printed commented out, "
        "with the reason. Read-only.",
    )
    declare_command.add_argument("--from-dsn", required=True, help="libpq connection string of the reference database")
    declare_command.add_argument(
        "--schema", action="append", metavar="NAME", help="only the keys of tables in this schema (repeatable)"
    )
    declare_command.add_argument(
        "--conn-ids",
        nargs="+",
        default=["kpi_db"],
        metavar="ID",
        help="the Airflow connections the keys are to land on, the first the canary (default: kpi_db)",
    )


def _add_plan(commands: _SubcommandsWithVerbose) -> None:
    plan = commands.add_parser(
        "plan",
        help="read-only: would each declared key converge on this database?",
        description="Read-only, for each declared key (or --key): what preflight finds (judged as for a real run), "
        "the orphans, and what each step would do. Nothing is written: its sessions are read-only. "
        f"Exit {EXIT_OK} when every key would converge, {EXIT_REFUSED} when any would be refused (each reason "
        f"printed), {EXIT_USAGE} for a usage error or an unreachable database.",
    )
    _add_database_and_targets(plan)
    which = plan.add_mutually_exclusive_group()
    which.add_argument("--key", metavar="NAME", help="only this declared key (its name, the DAG id)")
    which.add_argument("--all", action="store_true", help="every declared key (the default)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON on stdout")


def _add_run(commands: _SubcommandsWithVerbose) -> None:
    run = commands.add_parser(
        "run",
        help="run one key's steps (or every key's) on one database, in the DAG's order",
        description="Run the steps of one declared key (or, with --all, of every one in turn) on one database, in "
        "the DAG's order, with the trigger "
        "form's settings. Prints a run id first and the run's report last; every pointer nulled is audited under "
        f"that run id (undo with `{PROG} restore`). A step that finds a DAG run (or another command) at work on "
        "the same key waits for it. "
        f"Exit {EXIT_OK} when converged (or a dry run finished), {EXIT_REFUSED} when a step failed, "
        f"{EXIT_USAGE} for a usage error, bad settings or an unreachable database, {EXIT_WAITING} when "
        "validate_fk waits for the low-traffic window (run again then, or --set validate_now=true).",
    )
    _add_database_and_targets(run)
    which = run.add_mutually_exclusive_group(required=True)
    which.add_argument("--key", metavar="NAME", help="the declared key to run (its name, the DAG id)")
    which.add_argument(
        "--all",
        action="store_true",
        help="every declared key, one after the other in the file's order (never two at once); a key that fails "
        "or is refused is reported and the others go on; one summary at the end",
    )
    run.add_argument("--set", metavar="NAME=VALUE", action="append", help=_settings_help())


def _add_restore(commands: _SubcommandsWithVerbose) -> None:
    restore = commands.add_parser(
        "restore",
        help="put back the pointers one run nulled",
        description="Put back, in batches under the same lock timeouts, the pointers run RUN_ID nulled, where the "
        "row still has no parent and the parent exists again; rows the app wrote since are left alone. Each "
        "pointer put back is recorded in the audit schema's restore log. "
        f"Exit {EXIT_OK} when done, {EXIT_REFUSED} when it failed, {EXIT_USAGE} for a usage error or an "
        "unreachable database.",
    )
    _add_database_and_targets(restore)
    restore.add_argument("--key", metavar="NAME", required=True, help="the declared key (its name, the DAG id)")
    restore.add_argument(
        "--run-id", required=True, help="the run whose nulled pointers to put back (its report names it)"
    )
    restore.add_argument("--dry-run", action="store_true", help="only count what would be put back")
    restore.add_argument(
        "--set",
        metavar="NAME=VALUE",
        action="append",
        help="a run setting, as for run (the restore uses batch_size, batch_pause_ms, lock_timeout_ms and "
        "lock_attempts); repeatable",
    )


def _add_guard(commands: _SubcommandsWithVerbose) -> None:
    guard = commands.add_parser(
        "guard",
        help="rewrite a drizzle-kit migration's new foreign keys and indexes into guarded ones",
        description="Rewrite the ADD CONSTRAINT ... FOREIGN KEY and CREATE INDEX statements `drizzle-kit generate` "
        "wrote into the guarded form of the shipped migration: nothing happens where the key and its index exist "
        "(the pipeline made them), a table of --max-rows rows or more that lacks them is refused (the plain "
        "statements would stall its writes for the whole scan), a small table or a fresh database gets them. "
        "Every other statement is left as it is; a guarded file guarded again is unchanged. Prints the migration "
        "on stdout, or rewrites it with --in-place; what was guarded goes to stderr. No database. "
        f"Exit {EXIT_OK} when guarded (or nothing to guard), {EXIT_REFUSED} when --targets does not declare a key "
        f"the migration adds, as it adds it, {EXIT_USAGE} for a usage error.",
    )
    guard.add_argument("migration", type=Path, help="the .sql file drizzle-kit generate wrote")
    guard.add_argument("--in-place", action="store_true", help="rewrite the file instead of printing it")
    guard.add_argument(
        "--targets",
        metavar="FILE",
        help="check that the targets file declares every key the migration adds, with the same index, and name "
        "its DAG in the refusal (default: the DAG id drizzle: entries give a key, its constraint's name)",
    )
    guard.add_argument(
        "--max-rows",
        type=int,
        default=DEFAULT_MAX_ROWS,
        metavar="N",
        help=f"refuse a table of this many rows or more that lacks the key or index (default {DEFAULT_MAX_ROWS})",
    )


def cmd_guard(args: argparse.Namespace, out: Callable[[str], None]) -> int:
    """Print (or rewrite) the migration guarded; say on stderr what was guarded."""
    path: Path = args.migration
    if not path.is_file():
        raise UsageError(f"migration {path} not found")
    if args.max_rows < 1:
        raise UsageError(f"--max-rows {args.max_rows}: give a number of rows, 1 or more")
    targets = load(Path(args.targets)) if args.targets else None
    try:
        text, done = guard_file(path, in_place=args.in_place, max_rows=args.max_rows, targets=targets)
    except GuardRefused as exc:
        print(f"{PROG} guard: {path}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    if not args.in_place:
        out(text.rstrip("\n"))
    for line in done:
        print(f"{PROG} guard: {path}: guarded {line}", file=sys.stderr)
    if not done:
        print(f"{PROG} guard: {path}: no new foreign key or index, nothing to guard", file=sys.stderr)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Bring a PostgreSQL database to the foreign keys declared in a targets file, without Airflow: "
        "the same steps, settings, run lock, timeouts, audit and report as the DAGs.",
        epilog=f"Exit codes: {EXIT_OK} success; {EXIT_REFUSED} problems found (check), a key would be refused (plan), "
        f"the run did not converge or failed (run, restore); {EXIT_USAGE} a usage error, bad settings or an "
        f"unreachable database; {EXIT_WAITING} (run) done up to validate_fk, which waits for the window; "
        f"{EXIT_INTERRUPTED} interrupted (Ctrl-C): run it again to carry on.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show the steps' own log lines (INFO)")
    verbose = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand without -v must not reset a -v given before it.
    verbose.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="show the steps' own log lines (INFO)"
    )
    # -v also after the subcommand, where a user types it.
    commands = _SubcommandsWithVerbose(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"), verbose)
    # In this order in the help's list of commands.
    for add in (_add_check, _add_declare, _add_plan, _add_run, _add_restore, _add_guard):
        add(commands)
    return parser


def cmd_declare(args: argparse.Namespace, out: Callable[[str], None]) -> int:
    """Print a targets file declaring every foreign key of a reference database; exit 1 when none can be."""
    database = dsn_database(args.from_dsn)
    text, declared = declare(database.connect, args.schema, args.conn_ids, database.label)
    out(text.rstrip("\n"))
    if not declared:
        print(
            f"{PROG} declare: no foreign key of {database.label} could be declared (see the comments)", file=sys.stderr
        )
        return EXIT_REFUSED
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace, Callable[[str], None]], int]] = {
    "check": cmd_check,
    "declare": cmd_declare,
    "plan": cmd_plan,
    "run": cmd_run,
    "restore": cmd_restore,
    "guard": cmd_guard,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def out(line: str) -> None:
        print(line, flush=True)

    package_log = logging.getLogger("fk_maintenance")
    # A plan's own text carries what the steps found; their warnings (a dry run's failing end-state checks
    # among them) would only repeat it.
    # So would a dry run's: its end state is the database as it was, so its checks fail by design.
    dry_run = args.command == "run" and any(a.replace(" ", "").lower() == "dry_run=true" for a in args.set or [])
    quiet = logging.CRITICAL if args.command == "plan" or dry_run else logging.WARNING
    handler = ProgressHandler(sys.stderr, level=logging.INFO if args.verbose else quiet)
    package_log.addHandler(handler)
    package_log.setLevel(logging.INFO)
    package_log.propagate = False
    try:
        return COMMANDS[args.command](args, out)
    except UsageError as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TargetUnreachable as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except MaintenanceError as exc:
        print(f"{PROG} {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except psycopg.Error as exc:  # a server error no step turned into one of ours (restore's, for example)
        print(f"{PROG} {args.command}: {type(exc).__name__}: {exc}".rstrip(), file=sys.stderr)
        return EXIT_REFUSED
    except BrokenPipeError:
        # The reader went away (``| head``): no traceback, and nothing more is written to it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_REFUSED
    except KeyboardInterrupt:
        # A batch in flight rolls back with its connection; every step is idempotent, so the next run converges.
        print(f"{PROG} {args.command}: interrupted; run it again to carry on", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        handler.close()
        package_log.removeHandler(handler)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
