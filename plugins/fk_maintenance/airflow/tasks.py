"""The Airflow side of each task: settings from the run's params, a connection to the task's target, the step,
and the step's outcome turned into Airflow's vocabulary (success, reschedule, retryable or final failure); and
the fleet's tasks (plan, turn, reports), which read the targets' reports from XCom.

Airflow is imported inside the functions: the DAG file imports this module at parse time.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from fk_maintenance.airflow.fleet import (
    CANARY_GROUP,
    FINISHED_STATES,
    FLEET_GROUP,
    PLAN_TASK,
    RESTORE_RUN_ID_PARAM,
    RESTORE_TASK,
    TARGET_REPORT_KEY,
    TARGET_STARTED_KEY,
    TURN_POKE_INTERVAL,
    WAIT_TURN_TASK,
    build_fleet_report,
    plan_fleet,
    target_summary,
    turn,
)
from fk_maintenance.db.session import CONCURRENT_RUN_GRACE, CONCURRENT_RUN_RECHECK, LIBPQ_DEFAULTS
from fk_maintenance.errors import (
    ConcurrentRun,
    DeleteNotApproved,
    InvalidSettings,
    PostChecksFailed,
    TargetUnreachable,
    is_final,
)
from fk_maintenance.keys.settings import RunSettings
from fk_maintenance.keys.spec import ForeignKeySpec
from fk_maintenance.records.approval import APPROVAL_TASK
from fk_maintenance.steps.registry import (
    APPROVED_ORPHANS,
    MONITOR_CONNECT,
    REPORT_TASK,
    RUN_ID,
    RUN_STARTED_AT,
    STEP_BY_NAME,
    STEPS,
)

log = logging.getLogger(__name__)

# The XCom key under which a failed step leaves its error for the target's report.
ERROR_KEY = "error"
# The XCom key under which post_checks leaves every check's outcome when some failed (it raises, so it has no
# return value).
FAILED_CHECKS_KEY = "failed_checks"
# Every step's result carries the moment it finished: validate_fk counts its windows from its first attempt,
# which is when add_fk_not_valid finished (a value that survives validate_fk's own reschedules and retries).
FINISHED_AT = "finished_at"
VALIDATION_CLOCK_STEP = "add_fk_not_valid"


def connector(conn_id: str) -> Callable[[], psycopg.Connection]:
    """Connections to the target through the postgres provider's PostgresHook: IAM tokens (RDS/Aurora,
    Azure), every libpq keyword of the connection's extra (sslmode, sslrootcert, require_auth, options, ...).
    A connection that cannot be made is one line naming the Airflow connection, never its password."""
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    class TargetHook(PostgresHook):
        def _create_connection(self, conn_args: dict[str, Any]) -> Any:
            given = {key: value for key, value in conn_args.items() if value is not None}
            return super()._create_connection({**LIBPQ_DEFAULTS, **given, "autocommit": True})

    hook = TargetHook(postgres_conn_id=conn_id)

    def connect() -> psycopg.Connection:
        try:
            connection = hook.connection
            where = (
                f"{connection.login or '?'}@{connection.host or 'local socket'}:{connection.port or 5432}/"
                f"{connection.schema or '?'}"
            )
        except Exception as exc:  # a missing or malformed Airflow connection
            raise TargetUnreachable(f"Airflow connection '{conn_id}' cannot be read: {exc}") from None
        try:
            return hook.get_conn()  # type: ignore[return-value]
        except psycopg.Error as exc:
            text = str(exc).strip()
            # libpq's message is the failure, then hints; all of it, on one line.
            reason = "; ".join(line.strip() for line in text.splitlines() if line.strip()) or type(exc).__name__
            if connection.password:
                reason = reason.replace(connection.password, "***")
            raise TargetUnreachable(
                f"cannot connect to the target database (Airflow connection '{conn_id}', {where}): {reason}"
            ) from None

    return connect


def settings_from(context: dict[str, Any]) -> RunSettings:
    return RunSettings.from_params(dict(context["params"]))


def run_task(step_name: str, spec: ForeignKeySpec, conn_id: str, context: dict[str, Any]) -> dict[str, Any]:
    """Validate the settings, connect, run one step, and map its outcome to Airflow's semantics: a final
    error fails without retry, a "reschedule" outcome gives the worker slot back until ``retry_at``, and so does
    finding another session at our work (ConcurrentRun). A failure leaves its message as XCom ``error`` for the
    target's report."""
    from airflow.sdk.exceptions import AirflowFailException, AirflowRescheduleException

    step = STEP_BY_NAME[step_name]
    clocks = target_clocks(context)
    try:
        try:
            settings = settings_from(context)  # bad form values stop here, before any connection
            connect = connector(conn_id)
            available = {
                RUN_ID: context.get("run_id"),
                # validate_fk counts its windows from here: its own first attempt, not the run's start.
                RUN_STARTED_AT: clocks.validation_started_at,
                MONITOR_CONNECT: connect,
                APPROVED_ORPHANS: approved_orphans(context) if APPROVED_ORPHANS in step.needs else None,
            }
            with closing(connect()) as conn:
                result = step.load()(conn, spec, settings, **{name: available[name] for name in step.needs})
        except ConcurrentRun as exc:
            waited = datetime.now(UTC) - clocks.target_started_at if clocks.target_started_at else timedelta(0)
            if waited < timedelta(minutes=settings.index_timeout_min) + CONCURRENT_RUN_GRACE:
                # The other session (this run's index build in the parallel branch, or another run) finishes on
                # its own; waiting for it costs no retry and no worker slot.
                log.info("%s: %s; looking again in %s", step_name, exc, CONCURRENT_RUN_RECHECK)
                raise AirflowRescheduleException(reschedule_date=datetime.now(UTC) + CONCURRENT_RUN_RECHECK) from exc
            raise
        except Exception as exc:
            if "ti" in context:
                context["ti"].xcom_push(key=ERROR_KEY, value=f"{step_name}: {type(exc).__name__}: {exc}")
                if isinstance(exc, PostChecksFailed) and exc.summary:
                    context["ti"].xcom_push(key=FAILED_CHECKS_KEY, value=exc.summary)
            raise
    except Exception as exc:
        if is_final(exc):
            raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc
        raise
    if result.get("outcome") == "reschedule":
        raise AirflowRescheduleException(reschedule_date=datetime.fromisoformat(result["retry_at"]))
    return {**result, FINISHED_AT: datetime.now(UTC).isoformat()}


@dataclass(frozen=True)
class TargetClocks:
    """Where a target's limits are counted from. In a fleet, a target may start hours or days into the run."""

    target_started_at: datetime | None  # its turn came (wait_turn); bounds waiting for another session at our work
    validation_started_at: datetime | None  # validate_fk's first attempt; its windows are counted from here


def target_clocks(context: dict[str, Any]) -> TargetClocks:
    """This target's clocks, from its own tasks' XComs (see clocks_from)."""
    dag_run = context.get("dag_run")
    run_started_at = dag_run and (dag_run.start_date or dag_run.run_after)
    ti = context.get("ti")
    if ti is None:
        return clocks_from(run_started_at, None, None)
    group = ti.task_id.rpartition(".")[0]

    def pulled(task: str, key: str = "return_value") -> Any:
        map_indexes = ti.map_index if ti.map_index >= 0 else None
        return ti.xcom_pull(task_ids=f"{group}.{task}", key=key, map_indexes=map_indexes)

    is_validate = ti.task_id.endswith(".validate_fk")
    return clocks_from(
        run_started_at,
        from_trigger(pulled(WAIT_TURN_TASK, TARGET_STARTED_KEY)),
        pulled(VALIDATION_CLOCK_STEP) if is_validate else None,
    )


def clocks_from(
    run_started_at: datetime | None, turn_came_at: str | None, validation_upstream: dict[str, Any] | None
) -> TargetClocks:
    """A target starts when its turn came (wait_turn's stamp); validate_fk's first attempt is when its upstream
    add_fk_not_valid finished. The run's start stands in where a task left no stamp (a run from before targets
    stamped their start, or a step run outside a fleet)."""
    started = _parsed(turn_came_at) or run_started_at
    upstream_finished = _parsed((validation_upstream or {}).get(FINISHED_AT))
    return TargetClocks(started, upstream_finished or started)


def from_trigger(value: Any) -> Any:
    """The XCom that wait_turn's trigger left with the event ending the task (airflow.turn_trigger): Airflow 3.3
    stores such a value serialized twice, so tasks pull its JSON text (a string comes back in quotes); a value
    the task pushed itself, or one stored once, comes back unchanged."""
    if isinstance(value, str) and value.startswith('"'):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _parsed(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None


def position_of(group: str, map_index: int) -> int:
    """A target's place in the run's list: the canary is 0, fleet target ``map_index`` is ``map_index + 1``."""
    return 0 if group == CANARY_GROUP else map_index + 1  # the canary's group is not mapped (index -1)


def run_plan(declared: tuple[str, ...], context: dict[str, Any]) -> list[str]:
    """The targets after the canary (what the fleet group maps over); the canary and the whole list under
    their own keys."""
    plan = _checked_plan(settings_from, declared, context)
    context["ti"].xcom_push(key="canary", value=plan["canary"][0])
    context["ti"].xcom_push(key="conn_ids", value=plan["conn_ids"])
    return plan["fleet"]


def _checked_plan(
    read_settings: Callable[[dict[str, Any]], RunSettings], declared: tuple[str, ...], context: dict[str, Any]
) -> dict[str, list[str]]:
    """The run's plan, or a final failure naming bad settings or unknown connections before any target."""
    from airflow.sdk.exceptions import AirflowFailException

    try:
        plan = plan_fleet(read_settings(context), declared)
        _require_defined_connections(plan["conn_ids"])
    except InvalidSettings as exc:
        raise AirflowFailException(str(exc)) from exc
    return plan


def _require_defined_connections(conn_ids: list[str]) -> None:
    """A connection id Airflow does not know is a typo in the form or the file: refused for the whole run, before
    any target is touched (a known connection whose database is down fails as its own target instead)."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    unknown = []
    for conn_id in conn_ids:
        try:
            BaseHook.get_connection(conn_id)
        except AirflowNotFoundException:
            unknown.append(conn_id)
    if unknown:
        raise InvalidSettings(
            f"conn_ids names connection(s) Airflow does not know: {', '.join(unknown)}; define them (Admin > "
            "Connections, or AIRFLOW_CONN_<ID>) or fix the ids; no target was touched"
        )


def _pushed(ti: Any, task_ids: list[str], key: str = "return_value") -> list[Any]:
    """Every value of ``key`` the tasks pushed so far, over all their map indexes (a list of task ids always
    gets a list back)."""
    return [value for value in ti.xcom_pull(task_ids=task_ids, key=key) or [] if value]


def run_wait_turn(group: str, conn_id: str, context: dict[str, Any]) -> bool:
    """One look at the target's turn: True once the target may start (its clock starts then); skips the target
    (its steps with it) once the run reached max_failures, leaving the reason for its report."""
    from airflow.sdk.exceptions import AirflowSkipException

    ti = context["ti"]
    position = position_of(group, ti.map_index)
    # A target counts as finished once its report task has ended, not when its report is pushed a moment before:
    # then a new target never overlaps the max_parallel targets before it, and this look agrees with the
    # triggerer's, which sees only task states.
    report_task = f"{FLEET_GROUP}.{REPORT_TASK}"
    states = ti.get_task_states(dag_id=ti.dag_id, task_ids=[report_task], run_ids=[context["run_id"]])
    ended = {
        int(key.removeprefix(f"{report_task}_")) + 1
        for key, state in (states.get(context["run_id"]) or {}).items()
        if key.startswith(f"{report_task}_") and str(getattr(state, "value", state)) in FINISHED_STATES
    }
    reports = [r for r in _pushed(ti, [report_task], TARGET_REPORT_KEY) if r["position"] in ended]
    decision = turn(position, reports, settings_from(context))
    log.info("wait_turn: %s (#%d): %s, %s", conn_id, position, decision.decision, decision.reason)
    if decision.decision == "stop":
        ti.xcom_push(key="stopped", value=decision.reason)
        raise AirflowSkipException(f"not starting {conn_id}: {decision.reason}")
    if decision.decision == "start":
        ti.xcom_push(key=TARGET_STARTED_KEY, value=datetime.now(UTC).isoformat())
    return decision.decision == "start"


def triggers_run_inline() -> bool:
    """True under ``dag.test()`` and ``airflow dags test``: they run a deferred task's trigger inline, in the one
    process that runs every task in turn, so a trigger waiting for other targets to finish would wait forever.
    There the wait is a rescheduled sensor instead (no executor, so no executor race either)."""
    from airflow.sdk.execution_time import task_runner
    from airflow.sdk.execution_time.supervisor import InProcessSupervisorComms

    return isinstance(task_runner.SUPERVISOR_COMMS, InProcessSupervisorComms)


def turn_trigger(group: str, context: dict[str, Any]) -> Any:
    """The triggerer's wait for this target's turn (fk_maintenance.airflow.turn_trigger)."""
    from fk_maintenance.airflow.turn_trigger import TurnTrigger

    ti = context["ti"]
    settings = settings_from(context)
    return TurnTrigger(
        dag_id=ti.dag_id,
        run_id=context["run_id"],
        position=position_of(group, ti.map_index),
        max_parallel=settings.max_parallel,
        max_failures=settings.max_failures,
        poke_seconds=TURN_POKE_INTERVAL.total_seconds(),
    )


def approved_orphans(context: dict[str, Any]) -> int | None:
    """How many orphans a person approved deleting, from this target's approve_deletes gate (None: the key has no
    gate, or it asked nobody). A gate that left no result never decided: it was set to success by hand (the UI's
    Mark as success, the REST API), and the delete is refused."""
    ti = context.get("ti")
    if ti is None:
        return None
    group = ti.task_id.rpartition(".")[0]
    gate = f"{group}.{APPROVAL_TASK}" if group else APPROVAL_TASK
    answer = ti.xcom_pull(task_ids=gate, map_indexes=ti.map_index)
    task = context.get("task")
    if not answer and task is not None and gate in task.upstream_task_ids:
        raise DeleteNotApproved(
            f"{gate} succeeded without deciding (set to success by hand?): no one approved this delete, and nothing "
            "was deleted. Trigger a new run, and have one of the key's approvers answer its request"
        )
    return int(answer["orphans"]) if answer and answer.get("asked") else None


def run_report(spec: ForeignKeySpec, group: str, conn_id: str, context: dict[str, Any]) -> dict[str, Any]:
    """One target's report from its steps' XComs; pushed also as the fleet's line for it, then failed if the
    target did not succeed, so that its instance shows red."""
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

    from fk_maintenance.steps.report import CONVERGED, build_report, read_archived, read_audited

    settings = settings_from(context)
    ti = context["ti"]
    # Which of this target's tasks succeeded, failed or were skipped: read only the XComs that exist.
    states = _group_states(ti, group, context["run_id"])

    def pull(task: str, key: str = "return_value") -> Any:
        return ti.xcom_pull(task_ids=f"{group}.{task}", key=key, map_indexes=ti.map_index)

    # A target whose turn never came did not start: the run stopped at max_failures (its turn was skipped), or
    # the canary failed (then the fleet's turns never ran).
    turn_state = states.get(WAIT_TURN_TASK)
    if turn_state == "skipped":
        stopped = pull(WAIT_TURN_TASK, "stopped")
    elif group == FLEET_GROUP and _canary_failed(ti, context["run_id"]):
        stopped = "the canary failed"
    else:
        stopped = None
    results = {step.name: pull(step.name) if states.get(step.name) == "success" else None for step in STEPS}
    if states.get("post_checks") == "failed":
        results["post_checks"] = pull("post_checks", FAILED_CHECKS_KEY)
    # The approval gate of a delete key fails when a person rejects (or nobody answers): its reason is the error.
    failed_step = next(
        (name for name in (WAIT_TURN_TASK, APPROVAL_TASK, *STEP_BY_NAME) if states.get(name) == "failed"), None
    )
    if failed_step == WAIT_TURN_TASK:
        error = f"{WAIT_TURN_TASK} failed before the target started (see its log); the target was not touched"
    else:
        error = pull(failed_step, ERROR_KEY) if failed_step else None
    # A target that never started has nothing in the audit; one that did may have committed batches in a try
    # that died before it could report them, which only the audit knows.
    audited = None if stopped else read_audited(connector(conn_id), spec, settings, context["run_id"])
    archived = None if stopped else read_archived(connector(conn_id), spec, settings, context["run_id"])
    report = build_report(
        spec, settings, context["run_id"], results, conn_id=conn_id, audited=audited, archived=archived
    )
    line = target_summary(
        conn_id, position_of(group, ti.map_index), None if stopped else report, error, stopped, failed_step
    )
    if states.get(APPROVAL_TASK) == "success":
        report["approval"] = pull(APPROVAL_TASK)
    ti.xcom_push(key=TARGET_REPORT_KEY, value=line)
    ti.xcom_push(key="report", value=report)
    if report["final_state"] == CONVERGED and not stopped:
        _emit_converged_asset(spec, conn_id, report, context)
    if stopped:
        raise AirflowSkipException(f"{conn_id}: {line['final_state']}")
    if line["failed"]:
        # The run's state follows its tasks: a target that failed must not end green.
        raise AirflowFailException(f"{conn_id}: {line['final_state']}" + (f"; {error}" if error else ""))
    return report


def _emit_converged_asset(spec: ForeignKeySpec, conn_id: str, report: dict[str, Any], context: dict[str, Any]) -> None:
    """One Asset event for the target's table (postgres://host:port/database/schema/table), added to the key's
    alias, with the run and its counts as extra: the app's DAGs scheduled on the table hear that the key holds."""
    from airflow.providers.postgres.assets.postgres import create_asset
    from airflow.sdk import AssetAlias, BaseHook

    from fk_maintenance.airflow.assets import asset_host, converged_alias, converged_event_extra

    ti = context["ti"]
    connection = BaseHook.get_connection(conn_id)
    asset = create_asset(
        host=asset_host(connection.host),
        port=connection.port or 5432,
        database=connection.schema or connection.login or "postgres",
        schema=spec.schema,
        table=spec.table,
    )
    extra = converged_event_extra(report, dag_id=ti.dag_id, conn_id=conn_id, constraint=spec.constraint)
    context["outlet_events"][AssetAlias(converged_alias(ti.dag_id))].add(asset, extra=extra)
    log.info("asset event for %s: %s", asset.uri, extra)


def _group_states(ti: Any, group: str, run_id: str) -> dict[str, str]:
    """State of each task of this target (by task name without the group), e.g. {"preflight": "failed"}."""
    by_run = ti.get_task_states(dag_id=ti.dag_id, map_index=ti.map_index, task_group_id=group, run_ids=[run_id])
    # Mapped instances come back as "<group>.<task>_<map_index>".
    suffix = f"_{ti.map_index}" if ti.map_index >= 0 else ""
    return {
        task_id.removeprefix(f"{group}.").removesuffix(suffix): str(state)
        for task_id, state in by_run.get(run_id, {}).items()
    }


def _canary_failed(ti: Any, run_id: str) -> bool:
    by_run = ti.get_task_states(dag_id=ti.dag_id, task_ids=[f"{CANARY_GROUP}.{REPORT_TASK}"], run_ids=[run_id])
    return any(str(state) == "failed" for state in by_run.get(run_id, {}).values())


def run_fleet_report(context: dict[str, Any]) -> dict[str, Any]:
    from airflow.sdk.exceptions import AirflowFailException

    ti = context["ti"]
    plan = ti.xcom_pull(task_ids=PLAN_TASK, key="conn_ids")
    if not plan:
        raise AirflowFailException("no target was planned: plan_fleet failed (see its log)")
    reports = _pushed(ti, [f"{CANARY_GROUP}.{REPORT_TASK}", f"{FLEET_GROUP}.{REPORT_TASK}"], TARGET_REPORT_KEY)
    report = build_fleet_report(context["run_id"], plan, reports)
    ti.xcom_push(key="report", value=report)  # also when it fails below, where no return value is kept
    if not report["succeeded"]:
        problems = [f"{t['conn_id']}: {t['final_state']}" for t in report["targets"] if not t["succeeded"]]
        raise AirflowFailException("not every target succeeded: " + "; ".join(problems))
    return report


def restore_settings_from(context: dict[str, Any]) -> tuple[str, RunSettings]:
    params = dict(context["params"])
    run_id = params.pop(RESTORE_RUN_ID_PARAM, None)
    if not isinstance(run_id, str) or not run_id.strip():
        raise InvalidSettings("run_id is required: the id of the run whose nulled pointers to put back")
    return run_id, RunSettings.from_params(params)


def run_restore_plan(declared: tuple[str, ...], context: dict[str, Any]) -> list[str]:
    return _checked_plan(lambda ctx: restore_settings_from(ctx)[1], declared, context)["conn_ids"]


def run_restore(spec: ForeignKeySpec, conn_id: str, context: dict[str, Any]) -> dict[str, Any]:
    """One target of a restore run; its result (with the connection) is the task's XCom."""
    from airflow.sdk.exceptions import AirflowFailException

    from fk_maintenance.records.restore import restore_run

    try:
        run_id, settings = restore_settings_from(context)
        with closing(connector(conn_id)()) as conn:
            result = restore_run(conn, spec, settings, run_id, context["run_id"])
    except Exception as exc:
        if is_final(exc):
            raise AirflowFailException(f"{conn_id}: {type(exc).__name__}: {exc}") from exc
        raise
    return result | {"conn_id": conn_id}


def run_restore_report(conn_ids: list[str] | None, context: dict[str, Any]) -> dict[str, Any]:
    from airflow.sdk.exceptions import AirflowFailException

    from fk_maintenance.records.restore import format_restore_report

    results = _pushed(context["ti"], [RESTORE_TASK])
    by_conn = {r["conn_id"]: r for r in results}
    planned = conn_ids or []
    report = {
        "targets": [by_conn.get(c, {"conn_id": c, "failed": True}) for c in planned],
        "restored": sum(r["restored"] for r in results),
        "still_missing": sum(r["still_missing"] for r in results),
        "failed": [c for c in planned if c not in by_conn],
    }
    for line in format_restore_report(report).splitlines():
        log.info("restore_report: %s", line)
    context["ti"].xcom_push(key="report", value=report)
    if report["failed"] or not planned:
        raise AirflowFailException(
            "restore did not finish on: " + (", ".join(report["failed"]) or "any target (see plan_restore)")
        )
    return report
