"""One DAG per foreign key declared in targets.yaml beside this file (or the file FK_MAINTENANCE_TARGETS names):
wiring, schedule, form and runbook. The steps, their order and their lock table live in ``fk_maintenance.steps``;
the settings and their form in ``fk_maintenance.settings``; the targets file's schema in ``fk_maintenance.targets``.
Reads no database at parse time."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, Param, task
from airflow.timetables.trigger import CronTriggerTimetable

from fk_maintenance.settings import SETTING_DEFS, RunSettings, SettingDef
from fk_maintenance.steps import REPORT_DOC_MD, REPORT_TASK, STEPS, lock_table_markdown
from fk_maintenance.targets import Target, TargetsFileInvalid, load_targets

TARGETS_FILE = Path(os.environ.get("FK_MAINTENANCE_TARGETS") or Path(__file__).with_name("targets.yaml"))
DEFAULTS = RunSettings()

RUNBOOK = """
# {name}

Gives `{schema}.{table}` a **validated** foreign key
`{constraint} ({column}) -> {ref_table}({ref_column}) ON DELETE {on_delete}` and the btree index
`{index} ({column})`, while the app keeps writing. Target: Airflow connection `{conn_id}`.

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
point `kpi_db` at the server or at a session-mode pool. On a primary with streaming replicas, the batches of
null_orphans wait while a replica lags more than `max_replica_lag_s`; the report gives the lag the index
build and VALIDATE left behind.

## A failed post-check

post_checks evaluates every assertion and fails with the list of all that failed. A cycle or a too-deep chain
names the ids involved; fix the data in the app, then trigger again: every step is idempotent.

## Undo the data change

Every nulled pointer is in `{audit}`, the pipeline's own schema (`run_id`, `kpi_id` (the row's
`{row_key}`), `old_parent_kpi_id`, `nulled_at`). To put back one run's pointers whose parent exists again:

```sql
UPDATE {schema}.{table} k SET {column} = a.old_parent_kpi_id
FROM {audit} a
WHERE a.run_id = '<run_id>' AND k.{row_key} = a.kpi_id AND k.{column} IS NULL
  AND EXISTS (SELECT 1 FROM {schema}.{ref_table} p WHERE p.{ref_column} = a.old_parent_kpi_id);
```
"""


def _param(definition: SettingDef) -> Param:
    return Param(
        definition.default,
        title=definition.title,
        description=definition.description,
        section=definition.section,
        **definition.schema,
    )


def build_dag(target: Target) -> DAG:
    """Today's graph, form, window and runbook for one declared foreign key."""
    spec = target.spec
    if len(target.conn_ids) != 1:
        # Runs over several connections (fleets) are not built yet; refusing keeps a DAG from touching one
        # database of several while the file says all of them.
        raise TargetsFileInvalid(
            f"{TARGETS_FILE}: {target.name!r} lists {len(target.conn_ids)} connections; this version runs one "
            "connection per foreign key: declare a single conn_id"
        )
    (conn_id,) = target.conn_ids

    def run_step(step_name: str, **context: Any) -> dict:
        from fk_maintenance.airflow_tasks import run_task

        return run_task(step_name, spec, conn_id, context)

    def report(**context: Any) -> dict:
        from fk_maintenance.airflow_tasks import run_report

        return run_report(spec, context)

    with DAG(
        dag_id=target.name,
        description=f"Validated FK {spec.constraint} and index {spec.index} on {spec.table}, without stalling the app",
        doc_md=RUNBOOK.format(
            name=target.name,
            conn_id=conn_id,
            audit=spec.audit_qualified,
            lock_table=lock_table_markdown(spec.table),
            **{field: getattr(spec, field) for field in ("schema", "table", "column", "ref_table", "ref_column")},
            **{field: getattr(spec, field) for field in ("row_key", "constraint", "index", "on_delete")},
        ),
        # No start_date: a freshly deployed DAG runs at once only if it lands inside the window, and otherwise
        # waits for the next one instead of starting at deploy time, which may be the middle of the business day.
        schedule=CronTriggerTimetable(
            f"{DEFAULTS.window.start.minute} {DEFAULTS.window.start.hour} * * *",
            timezone=DEFAULTS.window_timezone,
            run_immediately=DEFAULTS.window.nominal_length,
        ),
        catchup=False,
        max_active_runs=1,
        params={definition.name: _param(definition) for definition in SETTING_DEFS},
        default_args={
            # Every step is idempotent, so a retry after a dropped connection or a lock timeout is safe.
            "retries": 3,
            "retry_delay": timedelta(minutes=2),
            "retry_exponential_backoff": True,
            "max_retry_delay": timedelta(minutes=30),
        },
        tags=["postgres", "schema-migration", spec.table],
    ) as dag:
        tasks = {}
        for step in STEPS:
            overrides = {} if step.retried else {"retries": 0}
            tasks[step.name] = task(task_id=step.name, doc_md=step.doc_md, multiple_outputs=False, **overrides)(
                run_step
            )(step.name)
            for upstream in step.upstream:
                tasks[upstream] >> tasks[step.name]
        # all_done: a run that failed still gets its summary; the report then fails too, so the run is failed.
        summary = task(
            task_id=REPORT_TASK, doc_md=REPORT_DOC_MD, retries=0, trigger_rule="all_done", multiple_outputs=False
        )(report)()
        tasks[STEPS[-1].name] >> summary
    return dag


# Every DAG is built before any is published: a bad entry anywhere leaves the file with none.
_dags = [build_dag(target) for target in load_targets(TARGETS_FILE)]
globals().update({dag.dag_id: dag for dag in _dags})
