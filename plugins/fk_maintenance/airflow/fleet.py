"""Fleet runs: one declared foreign key on many databases. Which targets a run covers, when a target may start
(the canary first and alone, then at most ``max_parallel`` at once, none after ``max_failures`` failures), and
the run's summary over every target.

Pure functions of the run's settings and the targets' reports: the Airflow side (airflow.tasks) feeds them from
XComs, and they are tested without Airflow. Standard library only: the DAG file imports the names below.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from fk_maintenance.keys.settings import RunSettings

log = logging.getLogger(__name__)

# Task and group ids: the DAG wires them, the Airflow side reads XComs by them, operators see them in the UI.
PLAN_TASK = "plan_fleet"
CANARY_GROUP = "canary"
FLEET_GROUP = "fleet"
WAIT_TURN_TASK = "wait_turn"
FLEET_REPORT_TASK = "fleet_report"
# The restore DAG: its mapped task, and its own form field (the rest of its form is run settings).
RESTORE_TASK = "restore"
RESTORE_RUN_ID_PARAM = "run_id"
# The XCom key of each target's line in the fleet report, pushed by its report task also when the target
# failed or never started (its whole report is the return value, and under key "report" when it failed).
TARGET_REPORT_KEY = "target_summary"
# The pool every task that works on a target database runs in: platform teams size it to cap the total load
# of all runs of all keys, whatever each run's max_parallel says.
POOL = "fk_maintenance"

NOT_STARTED = "not started"
# What the fleet's own tasks do; none of them touches a database. The DAG's task docs and the lock table read this.
BEFORE_STEPS = (
    (PLAN_TASK, "the run's targets in order (the form's `conn_ids`, else the declared ones); the first is the canary"),
    (
        WAIT_TURN_TASK,
        "waits, deferred to the triggerer and holding no worker slot, until fewer than `max_parallel` earlier "
        "targets are unfinished; never starts its target once `max_failures` targets have failed",
    ),
)
AFTER_STEPS = (
    (
        FLEET_REPORT_TASK,
        "every target of the run (final state, orphans found and nulled, the error) in its log and as XCom; fails "
        "when any target failed or did not start",
    ),
)
NO_DATABASE = "Locks: none; touches no database."


def task_doc_md(does: str) -> str:
    return f"{does[0].upper()}{does[1:]}.\n\n{NO_DATABASE}"


# How often a waiting target looks whether its turn came. Under a scheduler the looks are made by the triggerer
# (one query of task states each, no task run); under `airflow dags test` each look is a short task run. A
# deployment (or a test) wanting quicker turns sets the variable.
TURN_POKE_INTERVAL = timedelta(seconds=int(os.environ.get("FK_MAINTENANCE_TURN_POKE_SECONDS", "30")))
# The XCom key (of wait_turn) holding the moment the target's turn came: the target's own clock starts there.
TARGET_STARTED_KEY = "target_started_at"
# Task states after which a target's report will not change.
FINISHED_STATES = frozenset({"success", "failed", "skipped", "upstream_failed", "removed"})


@dataclass(frozen=True)
class Turn:
    """What a waiting target does now: start, wait and look again, or never start (``reason`` says why)."""

    decision: str  # "start" | "wait" | "stop"
    reason: str


def plan_fleet(settings: RunSettings, declared: tuple[str, ...]) -> dict[str, list[str]]:
    """The run's targets in order (the form's list, else the file's): the canary, then the rest."""
    conn_ids = list(settings.conn_ids or declared)
    log.info("fleet: %d target(s); canary %s, then %s", len(conn_ids), conn_ids[0], conn_ids[1:] or "none")
    return {"conn_ids": conn_ids, "canary": conn_ids[:1], "fleet": conn_ids[1:]}


def turn(position: int, reports: list[dict[str, Any]], settings: RunSettings) -> Turn:
    """May the target at ``position`` (0 is the canary) start, given the reports of the targets finished so far?

    A target starts once fewer than ``max_parallel`` targets before it are unfinished, so however the checks
    interleave, at most ``max_parallel`` targets are ever between start and report. Targets start in order.
    """
    failed = [r["conn_id"] for r in reports if r.get("failed")]
    if settings.max_failures and len(failed) >= settings.max_failures:
        return Turn(
            "stop", f"{len(failed)} target(s) failed ({', '.join(failed)}); max_failures is {settings.max_failures}"
        )
    finished_before = {r["position"] for r in reports if 0 < r["position"] < position}
    unfinished_before = (position - 1) - len(finished_before)  # the canary (0) has finished before any other starts
    if position == 0 or unfinished_before < settings.max_parallel:
        return Turn("start", f"{unfinished_before} earlier target(s) still running or waiting")
    return Turn("wait", f"{unfinished_before} earlier target(s) unfinished; max_parallel is {settings.max_parallel}")


def reports_from_states(report_states: dict[int, str]) -> list[dict[str, Any]]:
    """What ``turn`` needs to know, from the states of the fleet's report tasks by map index: which targets
    finished and which failed (a target's report task fails exactly when the target did). The triggerer sees task
    states, not XComs; the task that resumes reads the reports themselves and decides again."""
    return [
        {"conn_id": f"#{map_index + 1}", "position": map_index + 1, "failed": state == "failed"}
        for map_index, state in sorted(report_states.items())
        if state in FINISHED_STATES
    ]


def target_summary(
    conn_id: str,
    position: int,
    report: dict[str, Any] | None,
    error: str | None,
    stopped: str | None,
    failed_step: str | None = None,
) -> dict[str, Any]:
    """One line of the fleet report, from a target's own report (None if its steps never ran)."""
    if stopped is not None:
        state, failed = f"{NOT_STARTED}: {stopped}", False
    elif report is None:
        state, failed = "failed before its report", True
    elif failed_step is not None:
        state, failed = f"failed at {failed_step}", True
    else:
        state, failed = report["final_state"], not report["succeeded"]
    return {
        "conn_id": conn_id,
        "position": position,
        "final_state": state,
        "succeeded": bool(report and report["succeeded"]) and stopped is None,
        "failed": failed,
        "orphans_found": report and report["orphans_found"],
        "nulled": report and report["nulled"],
        "audited": report and report["audited"],
        "policy": report and report.get("orphan_policy"),
        # orphans: delete: rows deleted (the orphans and their cascade) and pointers the cascade changed.
        "deleted_rows": report and report.get("deleted_rows"),
        "pointers_changed": report and report.get("pointers_changed_by_cascade"),
        "error": error,
    }


def build_fleet_report(run_id: str, conn_ids: list[str], reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Every target of the run, in order; a target with no report never started (the canary failed, or the
    run stopped at max_failures before its turn)."""
    by_position = {r["position"]: r for r in reports}
    canary_failed = 0 in by_position and not by_position[0]["succeeded"]
    targets = []
    for position, conn_id in enumerate(conn_ids):
        if position in by_position:
            targets.append(by_position[position])
        else:
            why = "the canary failed" if canary_failed else "the run ended before its turn"
            targets.append(target_summary(conn_id, position, None, None, why))
    failed = [t["conn_id"] for t in targets if t["failed"]]
    not_started = [t["conn_id"] for t in targets if t["final_state"].startswith(NOT_STARTED)]
    report = {
        "run_id": run_id,
        "targets": targets,
        "succeeded_count": sum(t["succeeded"] for t in targets),
        "failed": failed,
        "not_started": not_started,
        "orphans_found": sum(t["orphans_found"] or 0 for t in targets),
        "nulled": sum(t["nulled"] or 0 for t in targets),
        "deleted_rows": sum(t.get("deleted_rows") or 0 for t in targets),
        "pointers_changed": sum(t.get("pointers_changed") or 0 for t in targets),
        "succeeded": bool(targets) and not failed and not not_started,
    }
    for line in format_fleet_report(report).splitlines():
        log.info("fleet_report: %s", line)
    return report


def format_fleet_report(report: dict[str, Any]) -> str:
    targets = report["targets"]
    lines = [
        f"Run {report['run_id']}: {report['succeeded_count']} of {len(targets)} target(s) succeeded, "
        f"{len(report['failed'])} failed, {len(report['not_started'])} not started",
        f"Orphans found {report['orphans_found']}, pointers nulled {report['nulled']} (all audited)"
        + (
            f"; rows deleted {report['deleted_rows']} and pointers changed by their cascade "
            f"{report['pointers_changed']} (all archived)"
            if report.get("deleted_rows") or report.get("pointers_changed")
            else ""
        ),
        "",
        f"{'#':>3}  {'connection':<28}{'orphans':>9}{'nulled':>9}{'deleted':>9}{'cascade':>9}  final state",
    ]
    for t in targets:
        found = "-" if t["orphans_found"] is None else t["orphans_found"]
        nulled = "-" if t["nulled"] is None else t["nulled"]
        deleted = "-" if t.get("deleted_rows") is None else t["deleted_rows"]
        cascade = "-" if t.get("pointers_changed") is None else t["pointers_changed"]
        lines.append(
            f"{t['position']:>3}  {t['conn_id']:<28}{found:>9}{nulled:>9}{deleted:>9}{cascade:>9}  {t['final_state']}"
        )
        if t["error"]:
            lines.append(f"{'':>5}error: {t['error']}")
    return "\n".join(lines)
