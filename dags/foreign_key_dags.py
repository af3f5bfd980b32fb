"""One DAG per foreign key declared in targets.yaml beside this file (or the file FK_MAINTENANCE_TARGETS names):
wiring, schedule, form and runbook. The steps, their order and their lock table live in ``fk_maintenance.steps.registry``;
the settings and their form in ``fk_maintenance.keys.settings``; the targets file's schema in ``fk_maintenance.keys.targets``.
Reads no database at parse time."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import DAG, AssetAlias, BaseSensorOperator, Param, task, task_group
from airflow.timetables.trigger import CronTriggerTimetable

from fk_maintenance.airflow.alerts import approval_waiting_notifiers, failure_callback
from fk_maintenance.airflow.all_keys import ALL_KEYS_DAG, ALL_KEYS_REPORT_TASK, NOT_HANDED_ON, key_lanes, land_task_id
from fk_maintenance.airflow.approval_gate import DeleteApproval
from fk_maintenance.airflow.assets import converged_alias
from fk_maintenance.airflow.fleet import (
    AFTER_STEPS,
    BEFORE_STEPS,
    CANARY_GROUP,
    FLEET_GROUP,
    FLEET_REPORT_TASK,
    PLAN_TASK,
    POOL,
    RESTORE_RUN_ID_PARAM,
    RESTORE_TASK,
    TURN_POKE_INTERVAL,
    WAIT_TURN_TASK,
    task_doc_md,
)
from fk_maintenance.keys.settings import SETTING_DEFS, RunSettings, SettingDef
from fk_maintenance.keys.targets import Target, load_targets
from fk_maintenance.records.approval import APPROVAL_DOC_MD, APPROVAL_TASK, approvers_runbook
from fk_maintenance.steps.registry import REPORT_DOC_MD, REPORT_TASK, STEPS, lock_table_markdown

TARGETS_FILE = Path(os.environ.get("FK_MAINTENANCE_TARGETS") or Path(__file__).with_name("targets.yaml"))
DEFAULTS = RunSettings()
# A target may wait for earlier ones through several validation windows.
TURN_TIMEOUT = timedelta(days=30)
# Mapped instances are labelled in the UI by the connection they work on.
LABEL = "{{ task.op_kwargs['conn_id'] }}"
# The same for the operators (turn, approval), which hold conn_id as their own field.
OPERATOR_LABEL = "{{ task.conn_id }}"

DOC_MD = {name: task_doc_md(does) for name, does in (*BEFORE_STEPS, *AFTER_STEPS)}
SECTION_RESTORE = "What to restore"
PLAN_RESTORE_DOC_MD = "The connections to restore on: the form's `conn_ids`, else the declared ones.\n\nLocks: none."
RESTORE_DOC_MD = (
    "Puts back, in batches of `batch_size`, the audited pointers of `run_id` whose row is still parentless and "
    "whose parent exists again, and (orphans: delete) the rows it deleted and the pointers their cascade "
    "changed, from the archive, parents first; records each one in the restore log. A dry run only counts."
    "\n\nLocks: ROW "
    "EXCLUSIVE and the batch's row locks for the batch's milliseconds, under `lock_timeout_ms`; rows the app "
    "holds are skipped (SKIP LOCKED) and counted as still missing."
)
RESTORE_REPORT_DOC_MD = (
    "Per connection: audited, put back, still missing, re-pointed by the app, deleted. Fails if any target "
    "failed.\n\nLocks: none; touches no database."
)
RESTORE_RUNBOOK = """
# Restore for {name}

Every pointer a run of `{name}` nulled is in `{audit}` with its run id. Trigger this DAG with that `run_id`
to put those pointers back, on the connections of `conn_ids`, where the row still has no parent and the parent
exists again (a row the app re-pointed or deleted since is newer than the audit and is left alone). It works
in batches of `batch_size`, each under `lock_timeout_ms`, and skips rows the app holds at that moment (run it
again for those). Each pointer put back is recorded in `{log}` (`restore_id` = this run's id). `dry_run`
only counts what would be put back.
"""
CANARY_DOC = "The first target, alone: if it fails, no other target is touched."
FLEET_DOC = "Every other target, at most max_parallel at once, in the pool " + POOL + "."

RUNBOOK = """
# {name}

Gives `{schema}.{table}` a **validated** foreign key
`{constraint} ({columns}) -> {ref_table}({ref_columns}) {definition}` and {index}, while the app keeps
writing. Declared for the Airflow connections {conn_ids}.

**Orphans** (rows whose `{columns}` names a missing parent): {policy}

## The fleet

Each run works on the connections of the form's `conn_ids` (default: the declared list), each with the whole
graph below. The first is the **canary** (group `canary`) and runs alone; if it fails, no other target is
touched. Then the others (group `fleet`, each instance labelled by its connection) start in order, at most
`max_parallel` at once; once `max_failures` targets failed (0 = no limit), no new one starts. A failed target
does not stop the others. Every task that works on a database runs in the pool `{pool}`, whose size caps
the total over all runs. `fleet_report` lists every target with its final state, counts and error, and fails
the run if any target failed or did not start.

## What each task does

{lock_table}

## The window

`validate_fk` runs only between `window_start` and `window_end` (local time in `window_timezone`; an end
earlier than the start crosses midnight), only while at most `max_active_sessions` other sessions are
active (0 = no limit) and never while an anti-wraparound autovacuum works on the table. Otherwise it gives
its worker slot back and is rescheduled. After `max_windows` windows without a finished VALIDATE it fails;
the NOT VALID constraint stays and still checks every new write. `validate_now` ignores the window.

## Dry run

`dry_run` reads only (its sessions are `default_transaction_read_only`): it reports the orphans, what each
step would do, whether the window is open, and every end-state check, and changes nothing.

## Poolers and replicas

Every task first checks how it reaches the server: directly, or through a connection pooler. Through a pool
in transaction mode (PgBouncer `pool_mode = transaction`) it refuses before it sets anything and says so;
point the connection at the server or at a session-mode pool. On a primary with streaming replicas, the batches of
null_orphans wait while a replica lags more than `max_replica_lag_s`; the report gives the lag the index
build and VALIDATE left behind.

## A failed post-check

post_checks evaluates every assertion and fails with the list of all that failed. A cycle or a too-deep chain
names the ids involved; fix the data in the app, then trigger again: every step is idempotent.

## Undo the data change

{undo_delete}
Every nulled pointer is in `{audit}`, the pipeline's own schema (`run_id`, {audit_row_key} (the row's
`{row_key}`), {audit_pointer} (the old `{columns}`), `nulled_at`), on each target database. Nulling sets
{nulled} to NULL. To put back one run's pointers whose
parent exists again, trigger the DAG `{name}_restore` with that `run_id`: it works in batches under the same
lock timeouts, leaves rows the app has written since alone, and records each pointer it puts back.
"""


# The runbook's sentence for each declared orphan policy ("" = undeclared: decided by the key's nullability).
POLICY_TEXT = {
    "": "not declared: `nullify` where a column of the key is nullable (each pointer nulled, audited), `refuse` "
    "where the key is NOT NULL (preflight fails naming the count and `orphans: delete`, nothing changed).",
    "nullify": "`nullify`: each dangling pointer is nulled, audited in the same transaction.",
    "refuse": "`refuse`: preflight fails naming how many there are, and nothing is changed.",
    "delete": "`delete`: each orphan row is deleted with everything the database's own foreign keys take along "
    "(rows deleted by CASCADE keys, pointers nulled or reset by SET NULL / SET DEFAULT keys, recursively), every "
    "such row locked and archived whole in the same transaction, before the DELETE. Rows a RESTRICT or NO ACTION "
    "key protects make preflight refuse before any change. A dry run (and `detect_orphans`' result: "
    "`blast_radius_rows`, `blast_radius` per table, `blast_radius_sample`) shows what a run would take. Above "
    "`approve_deletes_above` rows, `approve_deletes` waits for a person's Approve or Reject (Browse > Required "
    "Actions); rejected or unanswered within `approval_timeout_minutes`, nothing is deleted and the target fails.",
}
UNDO_DELETE = """Every row this key's runs deleted, and every pointer their cascade changed, is in `{archive}` (one
row each: `run_id`, `batch`, `depth`, `table_schema`, `table_name`, `row_key`, `action` deleted / nulled /
reset, `via` the foreign key, `columns`, `row_data` the whole row as jsonb before the change). The restore DAG
`{name}_restore` puts them back, parents first, where the missing parent exists again.

"""


def _param(definition: SettingDef, target: Target) -> Param:
    # The form shows the connections this key is declared for; the library's own default (empty) means the same.
    default = list(target.conn_ids) if definition.name == "conn_ids" else definition.default
    default = target.settings.get(definition.name, default)
    schema, description = definition.schema, definition.description
    if definition.name == "approve_deletes_above":
        # A run may ask a person more often, never less: one who triggers a run must not lift its delete past the
        # approvers. Raising the bar is a change to the targets file.
        schema = {**schema, "maximum": default}
        description += f" At most {default}, this key's own value (the targets file's to raise)."
    return Param(
        default,
        title=definition.title,
        description=description,
        section=definition.section,
        **schema,
    )


class WaitTurn(BaseSensorOperator):
    """A target's turn in its fleet (fk_maintenance.airflow.fleet.turn). Under a scheduler it looks once, then waits
    deferred: the triggerer looks and ends the task itself when the turn comes (fk_maintenance.airflow.turn_trigger), the
    task holds no worker slot and cannot be failed by apache/airflow#71172 as a rescheduled sensor can. Under
    ``airflow dags test`` (triggers run inline there) it pokes, rescheduled."""

    template_fields = ("conn_id",)

    def __init__(self, *, group: str, conn_id: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.group = group
        self.conn_id = conn_id

    def execute(self, context: Any) -> None:
        from fk_maintenance.airflow.tasks import triggers_run_inline

        if triggers_run_inline():
            super().execute(context)
        else:
            self.execute_complete(context)

    def execute_complete(self, context: Any, event: dict[str, Any] | None = None) -> None:
        """Decide from the targets' reports; still waiting: defer. The trigger ends the task itself when the turn
        comes; a trigger deferred by an earlier version of this DAG fires an event instead and resumes here."""
        from fk_maintenance.airflow.tasks import run_wait_turn, turn_trigger

        if not run_wait_turn(self.group, self.conn_id, context):
            self.defer(trigger=turn_trigger(self.group, context), method_name="execute_complete", timeout=self.timeout)

    def poke(self, context: Any) -> bool:
        from fk_maintenance.airflow.tasks import run_wait_turn

        return run_wait_turn(self.group, self.conn_id, context)


def restore_dag_id(target: Target) -> str:
    return f"{target.name}_restore"


def _wait_turn(group_id: str, conn_id: str, *, mapped: bool) -> WaitTurn:
    return WaitTurn(
        task_id=WAIT_TURN_TASK,
        group=group_id,
        conn_id=conn_id,
        doc_md=DOC_MD[WAIT_TURN_TASK],
        mode="reschedule",  # only under `airflow dags test`; elsewhere it defers
        poke_interval=TURN_POKE_INTERVAL,
        timeout=TURN_TIMEOUT,
        **({"map_index_template": OPERATOR_LABEL} if mapped else {}),
        # Waiting is deferred, so the executor race of rescheduled sensors (apache/airflow#71172) cannot fail it;
        # retries are for what can still go wrong (a worker or the triggerer lost mid-look).
        retries=2,
        retry_delay=TURN_POKE_INTERVAL,
        retry_exponential_backoff=False,
    )


def _step_tasks(run_step: Callable[..., dict], conn_id: str, *, mapped: bool) -> dict[str, Any]:
    """Every step of the registry as a task, wired to the steps it follows, by step name."""
    tasks: dict[str, Any] = {}
    for step in STEPS:
        overrides = {} if step.retried else {"retries": 0}
        tasks[step.name] = task(
            task_id=step.name,
            doc_md=step.doc_md,
            multiple_outputs=False,
            pool=POOL,
            **({"map_index_template": LABEL} if mapped else {}),
            **overrides,
        )(run_step)(step_name=step.name, conn_id=conn_id)
        for upstream in step.upstream:
            tasks[upstream] >> tasks[step.name]
    return tasks


def _delete_approval(declared: Target, found: Any, conn_id: str, *, mapped: bool) -> DeleteApproval:
    """The person's Approve or Reject of a delete above approve_deletes_above, before null_orphans acts on it."""
    return DeleteApproval(
        task_id=APPROVAL_TASK,
        doc_md=APPROVAL_DOC_MD,
        spec=declared.spec,
        restore_dag=restore_dag_id(declared),
        approvers=declared.approvers,
        found=found,
        conn_id=conn_id,
        notifiers=approval_waiting_notifiers(declared),
        **({"map_index_template": OPERATOR_LABEL} if mapped else {}),
    )


def _target_group(group_id: str, declared: Target, doc: str, *, mapped: bool, alert: Any):
    """One target's steps, its turn before them and its report after them; the fleet's is mapped over
    connection ids, each instance labelled by its connection in the UI. The report emits the converged table's
    asset event and, when the target failed, calls the key's failure notifiers (``alert``)."""
    spec = declared.spec

    def run_step(step_name: str, conn_id: str, **context: Any) -> dict:
        from fk_maintenance.airflow.tasks import run_task

        return run_task(step_name, spec, conn_id, context)

    def report(conn_id: str, **context: Any) -> dict:
        from fk_maintenance.airflow.tasks import run_report

        return run_report(spec, group_id, conn_id, context)

    @task_group(group_id=group_id, tooltip=doc)
    def target(conn_id: str) -> Any:
        turn = _wait_turn(group_id, conn_id, mapped=mapped)
        tasks = _step_tasks(run_step, conn_id, mapped=mapped)
        if spec.orphans == "delete":
            _delete_approval(declared, tasks["detect_orphans"], conn_id, mapped=mapped) >> tasks["null_orphans"]
        turn >> tasks[STEPS[0].name]
        # all_done: a target that failed still gets its summary; the report then fails too.
        summary = task(
            task_id=REPORT_TASK,
            doc_md=REPORT_DOC_MD,
            retries=0,
            trigger_rule="all_done",
            multiple_outputs=False,
            outlets=[AssetAlias(converged_alias(declared.name))],
            on_failure_callback=alert,
            **({"map_index_template": LABEL} if mapped else {}),
        )(report)(conn_id=conn_id)
        tasks[STEPS[-1].name] >> summary
        return summary

    return target


def _runbook(target: Target) -> str:
    spec = target.spec
    return RUNBOOK.format(
        name=target.name,
        conn_ids=", ".join(f"`{conn_id}`" for conn_id in target.conn_ids),
        audit=spec.audit_qualified,
        lock_table=lock_table_markdown(spec.table, BEFORE_STEPS, AFTER_STEPS),
        pool=POOL,
        schema=spec.schema,
        table=spec.table,
        ref_table=f"{spec.ref_schema}.{spec.ref_table}",
        columns=", ".join(spec.columns),
        ref_columns=", ".join(spec.ref_columns),
        row_key=", ".join(spec.row_key),
        constraint=spec.constraint,
        index=f"the btree index `{spec.index} ({', '.join(spec.columns)})`"
        if spec.build_index
        else "no index of its own (its Drizzle schema declares none; preflight's warning says how to)",
        definition=spec.definition_sql,
        policy=POLICY_TEXT[spec.orphans]
        + (" " + approvers_runbook(target.approvers) if spec.orphans == "delete" else ""),
        undo_delete=UNDO_DELETE.format(name=target.name, archive=spec.archive_qualified)
        if spec.orphans == "delete"
        else "",
        audit_row_key=", ".join(f"`{name}`" for name in spec.audit_row_key_columns),
        audit_pointer=", ".join(f"`{name}`" for name in spec.audit_pointer_columns),
        nulled=", ".join(f"`{name}`" for name in spec.on_delete_columns or spec.nullify_columns)
        or ("every column of the key" if spec.on_delete == "SET NULL" else "the key's one nullable column"),
    )


def _window_schedule() -> CronTriggerTimetable:
    # No start_date: a freshly deployed DAG runs at once only if it lands inside the window, and otherwise
    # waits for the next one instead of starting at deploy time, which may be the middle of the business day.
    return CronTriggerTimetable(
        f"{DEFAULTS.window.start.minute} {DEFAULTS.window.start.hour} * * *",
        timezone=DEFAULTS.window_timezone,
        run_immediately=DEFAULTS.window.nominal_length,
    )


def build_dag(target: Target) -> DAG:
    """Today's graph, form, window and runbook for one declared foreign key, run once per target connection."""
    spec = target.spec
    alert = failure_callback(target)  # None when the targets file names no notifier for this key

    def plan(**context: Any) -> dict:
        from fk_maintenance.airflow.tasks import run_plan

        return run_plan(target.conn_ids, context)

    def fleet_report(**context: Any) -> dict:
        from fk_maintenance.airflow.tasks import run_fleet_report

        return run_fleet_report(context)

    with DAG(
        dag_id=target.name,
        description=f"Validated FK {spec.constraint}"
        + (f" and index {spec.index}" if spec.build_index else "")
        + f" on {spec.table}, without stalling the app",
        doc_md=_runbook(target),
        schedule=_window_schedule(),
        catchup=False,
        max_active_runs=1,
        params={definition.name: _param(definition, target) for definition in SETTING_DEFS},
        default_args={
            # Every step is idempotent, so a retry after a dropped connection or a lock timeout is safe.
            "retries": 3,
            "retry_delay": timedelta(minutes=2),
            "retry_exponential_backoff": True,
            "max_retry_delay": timedelta(minutes=30),
        },
        tags=["postgres", "schema-migration", spec.table],
    ) as dag:
        # Returns the targets after the canary (what the fleet maps over); the canary under key "canary".
        planned = task(
            task_id=PLAN_TASK, doc_md=DOC_MD[PLAN_TASK], retries=0, multiple_outputs=False, on_failure_callback=alert
        )(plan)()
        canary = _target_group(CANARY_GROUP, target, CANARY_DOC, mapped=False, alert=alert)(conn_id=planned["canary"])
        fleet = _target_group(FLEET_GROUP, target, FLEET_DOC, mapped=True, alert=alert).expand(conn_id=planned)
        summary = task(
            task_id=FLEET_REPORT_TASK,
            doc_md=DOC_MD[FLEET_REPORT_TASK],
            retries=0,
            trigger_rule="all_done",
            multiple_outputs=False,
        )(fleet_report)()
        # The canary's report fails when the canary did: then no other target is touched.
        dag.task_group_dict[CANARY_GROUP] >> dag.task_group_dict[FLEET_GROUP]
        [canary, fleet] >> summary
    return dag


# The restore form: which run to undo, where, and how gently.
RESTORE_SETTINGS = ("conn_ids", "dry_run", "batch_size", "batch_pause_ms", "lock_timeout_ms", "lock_attempts")


def _restore_params(target: Target) -> dict[str, Param]:
    """The restore form: the run to undo first, then the few run settings a restore uses."""
    definitions = {definition.name: definition for definition in SETTING_DEFS}
    return {
        RESTORE_RUN_ID_PARAM: Param(
            type="string",
            minLength=1,
            maxLength=250,
            title="Run to undo",
            description=f"The run id of the {target.name} run whose nulled pointers to put back (its report "
            f"and {target.spec.audit_qualified}.run_id name it).",
            section=SECTION_RESTORE,
        ),
        **{name: _param(definitions[name], target) for name in RESTORE_SETTINGS},
    }


def build_restore_dag(target: Target) -> DAG:
    """Put back, per target connection, the pointers one run nulled whose parent exists again."""
    spec = target.spec

    def plan(**context: Any) -> list:
        from fk_maintenance.airflow.tasks import run_restore_plan

        return run_restore_plan(target.conn_ids, context)

    def restore(conn_id: str, **context: Any) -> dict:
        from fk_maintenance.airflow.tasks import run_restore

        return run_restore(spec, conn_id, context)

    def restore_report(conn_ids: list, **context: Any) -> dict:
        from fk_maintenance.airflow.tasks import run_restore_report

        return run_restore_report(conn_ids, context)

    with DAG(
        dag_id=restore_dag_id(target),
        description=f"Put back the pointers a run of {target.name} nulled, where the parent exists again",
        doc_md=RESTORE_RUNBOOK.format(name=target.name, audit=spec.audit_qualified, log=spec.restore_log_qualified),
        schedule=None,
        catchup=False,
        max_active_runs=1,
        params=_restore_params(target),
        default_args={"retries": 2, "retry_delay": timedelta(minutes=1)},
        tags=["postgres", "restore", spec.table],
    ) as dag:
        planned = task(task_id="plan_restore", retries=0, multiple_outputs=False, doc_md=PLAN_RESTORE_DOC_MD)(plan)()
        restored = task(
            task_id=RESTORE_TASK,
            pool=POOL,
            map_index_template=LABEL,
            multiple_outputs=False,
            doc_md=RESTORE_DOC_MD,
        )(restore).expand(conn_id=planned)
        summary = task(
            task_id="restore_report",
            retries=0,
            trigger_rule="all_done",
            multiple_outputs=False,
            doc_md=RESTORE_REPORT_DOC_MD,
        )(restore_report)(conn_ids=planned)
        restored >> summary
    return dag


ALL_KEYS_RUNBOOK = """
# Every declared key, from one trigger

Runs the DAG of each key of the targets file ({keys}), each on its own connections with its own fleet, canary and
report, and sums them up in `all_keys_report`. Keys whose tables meet (one's child or referenced table is
another's) run one after the other, so two keys' writing steps never work on one table at once; the others run
side by side. Lanes: {lanes}. A key that fails or is refused is reported and the keys after it still run; the
run fails when any key did not converge. The form's settings are handed to each key's run, but for each key's
fleet (its `conn_ids`, `max_parallel`, `max_failures`) and its `approve_deletes_above`, which stay the key's own.
"""
# How often a waiting land task's trigger looks at the key's run (in the triggerer, holding no worker slot).
LAND_POKE_SECONDS = 30


def build_all_keys_dag(targets: tuple[Target, ...]) -> DAG:
    """One trigger for every declared key: each key's own DAG run, keys whose tables meet one after the other."""

    def report(**context: Any) -> dict:
        from fk_maintenance.airflow.all_keys import all_keys_report

        return all_keys_report(targets, context)

    handed_on = [definition for definition in SETTING_DEFS if definition.name not in NOT_HANDED_ON]
    lanes = key_lanes(targets)
    with DAG(
        dag_id=ALL_KEYS_DAG,
        description=f"Every key of {TARGETS_FILE.name}, each through its own DAG, none two on one table at once",
        doc_md=ALL_KEYS_RUNBOOK.format(
            keys=", ".join(f"`{target.name}`" for target in targets),
            lanes="; ".join(" then ".join(f"`{target.name}`" for target in lane) for lane in lanes),
        ),
        schedule=None,
        catchup=False,
        max_active_runs=1,
        params={
            definition.name: Param(
                definition.default,
                title=definition.title,
                description=definition.description,
                section=definition.section,
                **definition.schema,
            )
            for definition in handed_on
        },
        # The form's values reach each key's run as what they are (a boolean stays one), not as text.
        render_template_as_native_obj=True,
        tags=["postgres", "all keys"],
    ) as dag:
        summary = task(task_id=ALL_KEYS_REPORT_TASK, trigger_rule="all_done", retries=0, multiple_outputs=False)(
            report
        )()
        for lane in lanes:
            previous = None
            for target in lane:
                land = TriggerDagRunOperator(
                    task_id=land_task_id(target),
                    trigger_dag_id=target.name,
                    conf={definition.name: "{{ params." + definition.name + " }}" for definition in handed_on},
                    wait_for_completion=True,
                    deferrable=True,
                    poke_interval=LAND_POKE_SECONDS,
                    allowed_states=["success"],
                    failed_states=["failed"],
                    # The key before it in its lane failed or was refused: this one still runs.
                    trigger_rule="all_done",
                    retries=0,
                )
                if previous is not None:
                    previous >> land
                land >> summary
                previous = land
    return dag


# Every DAG is built before any is published: a bad entry anywhere leaves the file with none. A file of several
# keys also gets one DAG that lands them all.
_targets = load_targets(TARGETS_FILE)
_dags = [build(target) for target in _targets for build in (build_dag, build_restore_dag)]
if len(_targets) > 1:
    _dags.append(build_all_keys_dag(_targets))
globals().update({dag.dag_id: dag for dag in _dags})
