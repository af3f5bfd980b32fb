"""Every key of a targets file from one trigger: the all-keys DAG runs each key's own DAG (its fleet, its steps,
its report) and sums them up. Keys whose tables meet run one after the other, so two keys' writing steps never
work on one table at once; keys on tables apart run side by side. A key that fails or is refused is reported
and the keys after it still run.

Standard library only at import: the DAG file imports this at parse time.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fk_maintenance.keys.targets import Target

log = logging.getLogger(__name__)

ALL_KEYS_DAG = "all_declared_keys"
ALL_KEYS_REPORT_TASK = "all_keys_report"
# The TriggerDagRunOperator's XCom key of the run it started (airflow.providers.standard).
TRIGGERED_RUN_KEY = "trigger_run_id"
# The run settings an all-keys run hands each key's run: a key's fleet is its own (its conn_ids), and its
# approve_deletes_above is capped at the key's own value, which a run of every key must not try to lift.
NOT_HANDED_ON = ("conn_ids", "max_parallel", "max_failures", "approve_deletes_above")


def land_task_id(target: Target) -> str:
    return f"land_{target.name}"


def key_lanes(targets: tuple[Target, ...]) -> list[list[Target]]:
    """The keys in lanes: two keys whose tables meet (either's child or referenced table is the other's) are in
    one lane, in the file's order; lanes share no table."""
    lane_of: dict[tuple[str, str], int] = {}
    lanes: list[list[Target]] = []
    for target in targets:
        touched = {lane_of[table] for table in target.spec.tables if table in lane_of}
        if not touched:
            lanes.append([target])
            number = len(lanes) - 1
        else:
            number, *merged = sorted(touched)
            for other in merged:  # this key joins lanes that were apart until now
                lanes[number] += lanes[other]
                lanes[other] = []
                lane_of.update(dict.fromkeys((t for key in lanes[number] for t in key.spec.tables), number))
            lanes[number].append(target)
        lane_of.update(dict.fromkeys(target.spec.tables, number))
    order = {target.name: position for position, target in enumerate(targets)}
    return [sorted(lane, key=lambda target: order[target.name]) for lane in lanes if lane]


def all_keys_report(targets: tuple[Target, ...], context: dict[str, Any]) -> dict[str, Any]:
    """Every key's outcome in one report: its run and its own fleet report (every target's final state and
    counts), in the log and as this task's XCom (key ``report``, also when it fails). Fails when any key did not
    converge."""
    from airflow.sdk.exceptions import AirflowFailException

    ti = context["ti"]
    keys = [_key_outcome(ti, target) for target in targets]
    failed = [key["key"] for key in keys if not key["converged"]]
    summary = {"keys": keys, "converged": len(keys) - len(failed), "failed": failed}
    for key in keys:
        log.info("%s: %s (run %s)", key["key"], key["outcome"], key["run_id"])
    ti.xcom_push(key="report", value=summary)
    if failed:
        raise AirflowFailException(f"{len(failed)} of {len(keys)} key(s) did not converge: {', '.join(failed)}")
    return summary


def _key_outcome(ti: Any, target: Target) -> dict[str, Any]:
    """One key's run, read from what its trigger task and its own fleet_report left."""
    run_id = ti.xcom_pull(task_ids=land_task_id(target), key=TRIGGERED_RUN_KEY)
    report = ti.xcom_pull(dag_id=target.name, task_ids="fleet_report", run_id=run_id, key="report") if run_id else None
    if not run_id:
        outcome = "not started (see its land task's log)"
    elif not report:
        outcome = f"did not finish: no fleet report (see run {run_id} of {target.name})"
    else:
        outcome = (
            "converged"
            if report["succeeded"]
            else "failed: "
            + "; ".join(f"{t['conn_id']} {t['final_state']}" for t in report["targets"] if not t["succeeded"])
        )
    return {
        "key": target.name,
        "run_id": run_id,
        "converged": bool(report) and bool(report["succeeded"]),
        "outcome": outcome,
        "fleet_report": report,
    }
