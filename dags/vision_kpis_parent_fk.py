"""The DAG of the shipped foreign key: wiring, schedule, form and runbook. The steps, their order and their
lock table live in ``fk_maintenance.steps``; the settings and their form in ``fk_maintenance.settings``."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import DAG, Param, task
from airflow.timetables.trigger import CronTriggerTimetable

from fk_maintenance.settings import SETTING_DEFS, RunSettings, SettingDef
from fk_maintenance.spec import VISION_KPIS_PARENT_FK as SPEC
from fk_maintenance.steps import REPORT_DOC_MD, REPORT_TASK, STEPS, lock_table_markdown

CONN_ID = "kpi_db"
DEFAULTS = RunSettings()

RUNBOOK = """
# vision_kpis_parent_fk

Gives `public.vision_kpis` a **validated** self-referencing foreign key
`vision_kpis_parent_kpi_id_fkey (parent_kpi_id) -> vision_kpis(id) ON DELETE SET NULL` and the btree index
`vision_kpis_parent_kpi_idx (parent_kpi_id)`, while the app keeps writing. Target: Airflow connection `kpi_db`.

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

Every nulled pointer is in `fk_maintenance.vision_kpis_orphan_audit`, the pipeline's own schema (`run_id`,
`kpi_id`, `old_parent_kpi_id`, `nulled_at`). To put back one run's pointers whose parent exists again:

```sql
UPDATE public.vision_kpis k SET parent_kpi_id = a.old_parent_kpi_id
FROM fk_maintenance.vision_kpis_orphan_audit a
WHERE a.run_id = '<run_id>' AND k.id = a.kpi_id AND k.parent_kpi_id IS NULL
  AND EXISTS (SELECT 1 FROM public.vision_kpis p WHERE p.id = a.old_parent_kpi_id);
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


def _run_step(step_name: str, **context: Any) -> dict:
    from fk_maintenance.airflow_tasks import run_task

    return run_task(step_name, SPEC, CONN_ID, context)


def _report(**context: Any) -> dict:
    from fk_maintenance.airflow_tasks import run_report

    return run_report(SPEC, context)


with DAG(
    dag_id="vision_kpis_parent_fk",
    description="Validated self-referencing FK and index on vision_kpis, without stalling the app",
    doc_md=RUNBOOK.format(lock_table=lock_table_markdown(SPEC.table)),
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
    tags=["postgres", "schema-migration", "vision_kpis"],
) as dag:
    tasks = {}
    for step in STEPS:
        overrides = {} if step.retried else {"retries": 0}
        tasks[step.name] = task(task_id=step.name, doc_md=step.doc_md, multiple_outputs=False, **overrides)(_run_step)(
            step.name
        )
        for upstream in step.upstream:
            tasks[upstream] >> tasks[step.name]
    # all_done: a run that failed still gets its summary; the report then fails too, so the run is failed.
    report = task(
        task_id=REPORT_TASK, doc_md=REPORT_DOC_MD, retries=0, trigger_rule="all_done", multiple_outputs=False
    )(_report)()
    tasks[STEPS[-1].name] >> report
