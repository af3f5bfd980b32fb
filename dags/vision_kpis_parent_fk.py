"""
# vision_kpis_parent_fk

Gives `public.vision_kpis` a **validated** self-referencing foreign key
`vision_kpis_parent_kpi_id_fkey (parent_kpi_id) -> vision_kpis(id) ON DELETE SET NULL` and the btree index
`vision_kpis_parent_kpi_idx (parent_kpi_id)`, while the app keeps writing. Target: Airflow connection `kpi_db`.

## What each task does

| task | what it changes | lock on `vision_kpis`, at most how long |
| --- | --- | --- |
| preflight | nothing: checks table, columns, types, privileges, same-named constraint/index/audit table | ACCESS SHARE, catalog reads only |
| detect_orphans | nothing: one `NOT EXISTS` anti-join; counts orphans and missing parents, logs a sample | ACCESS SHARE for one scan |
| null_orphans | nulls dangling `parent_kpi_id` in batches; each batch audits then nulls its rows in one transaction | row locks on the batch's rows (rows the app holds are skipped, never waited for); ROW EXCLUSIVE |
| create_index_concurrently | `CREATE INDEX CONCURRENTLY` (an INVALID leftover is dropped concurrently first) | SHARE UPDATE EXCLUSIVE, which app reads and writes never wait on |
| add_fk_not_valid | `ADD CONSTRAINT ... NOT VALID`; from then on new writes are checked | SHARE ROW EXCLUSIVE for milliseconds; the app waits at most `lock_timeout_ms` per attempt, and no attempt is made while a transaction older than that holds a conflicting lock |
| validate_fk | `VALIDATE CONSTRAINT` inside the window; if it meets an orphan written before the constraint landed, re-sweeps (audited) and validates again | SHARE UPDATE EXCLUSIVE (app never waits on it) for one scan, under a `statement_timeout` ending at the window's end |
| post_checks | nothing (its write test is always rolled back) | ACCESS SHARE; one row lock for a rolled-back UPDATE |
| report | nothing | none |

## The window

`validate_fk` runs only between `window_start` and `window_end` (local time in `window_timezone`; an end
earlier than the start crosses midnight), only while at most `max_active_sessions` other sessions are
active (0 = no limit) and never while an anti-wraparound autovacuum works on the table. Otherwise it gives
its worker slot back and is rescheduled. After `max_windows` windows without a finished VALIDATE it fails;
the NOT VALID constraint stays and still checks every new write. `validate_now` ignores the window.

## Dry run

`dry_run` reads only (its sessions are `default_transaction_read_only`): it reports the orphans, what each
step would do, whether the window is open, and every end-state check, and changes nothing.

## A failed post-check

post_checks evaluates every assertion and fails with the list of all that failed. A cycle or a too-deep chain
names the ids involved; fix the data in the app, then trigger again: every step is idempotent.

## Undo the data change

Every nulled pointer is in `public.vision_kpis_orphan_audit` (`run_id`, `kpi_id`, `old_parent_kpi_id`,
`nulled_at`). To put back one run's pointers whose parent exists again:

```sql
UPDATE public.vision_kpis k SET parent_kpi_id = a.old_parent_kpi_id
FROM public.vision_kpis_orphan_audit a
WHERE a.run_id = '<run_id>' AND k.id = a.kpi_id AND k.parent_kpi_id IS NULL
  AND EXISTS (SELECT 1 FROM public.vision_kpis p WHERE p.id = a.old_parent_kpi_id);
```
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import DAG, Param, task
from airflow.timetables.trigger import CronTriggerTimetable

from fk_maintenance.settings import SETTING_DEFS, RunSettings, SettingDef
from fk_maintenance.spec import VISION_KPIS_PARENT_FK as SPEC

CONN_ID = "kpi_db"
DEFAULTS = RunSettings()
_start = DEFAULTS.window_start_time
_WINDOW_LENGTH = timedelta(
    minutes=(DEFAULTS.window_end_time.hour * 60 + DEFAULTS.window_end_time.minute - _start.hour * 60 - _start.minute)
    % (24 * 60)
)

TASK_DOCS = {
    "preflight": "Read-only catalog checks. Locks: ACCESS SHARE on catalog rows only. Fails with every problem "
    "listed (a same-named constraint or index with another definition, missing privileges) before any change.",
    "detect_orphans": "One NOT EXISTS anti-join scan. Locks: ACCESS SHARE on vision_kpis for the scan; "
    "blocks no app statement.",
    "null_orphans": "Batches of `batch_size` rows, each one short transaction: audit rows, then UPDATE ... SET "
    "parent_kpi_id = NULL. Locks: ROW EXCLUSIVE and the batch's row locks for the batch's milliseconds; rows the "
    "app holds are skipped (SKIP LOCKED), never waited for. Every statement under `lock_timeout_ms`.",
    "create_index_concurrently": "CREATE INDEX CONCURRENTLY in autocommit. Locks: SHARE UPDATE EXCLUSIVE, which "
    "app reads and writes never wait on; may itself wait for old transactions (logged) up to `index_timeout_min`.",
    "add_fk_not_valid": "ALTER TABLE ... ADD CONSTRAINT ... NOT VALID. Locks: SHARE ROW EXCLUSIVE for "
    "milliseconds; each attempt waits at most `lock_timeout_ms`, so app writes queue behind it at most that long, "
    "and while a transaction older than that holds a conflicting lock no attempt is made at all. "
    "Retried with jittered back-off `lock_attempts` times, then the task fails and Airflow retries it later.",
    "validate_fk": "Inside the window: VALIDATE CONSTRAINT; if it meets an orphan written before the constraint "
    "landed, re-sweep orphans (audited) and validate again. Locks: SHARE UPDATE EXCLUSIVE "
    "(app reads and writes never wait on it) for one scan, under a statement_timeout ending at the window's end. "
    "Outside the window the task is rescheduled and holds no worker slot.",
    "post_checks": "All end-state assertions, all reported. Locks: ACCESS SHARE; one row lock for an UPDATE "
    "that must fail with 23503 and is always rolled back.",
    "report": "The run's summary in the log and as this task's XCom (also under key `report`). Runs even "
    "when a step failed, and then fails itself so the run shows as failed. Touches no database.",
}


def _param(definition: SettingDef) -> Param:
    return Param(
        definition.default,
        title=definition.title,
        description=definition.description,
        section=definition.section,
        **definition.schema,
    )


with DAG(
    dag_id="vision_kpis_parent_fk",
    description="Validated self-referencing FK and index on vision_kpis, without stalling the app",
    doc_md=__doc__,
    # No start_date: a freshly deployed DAG runs at once only if it lands inside the window, and otherwise
    # waits for the next one instead of starting at deploy time, which may be the middle of the business day.
    schedule=CronTriggerTimetable(
        f"{_start.minute} {_start.hour} * * *",
        timezone=DEFAULTS.window_timezone,
        run_immediately=_WINDOW_LENGTH,
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

    @task(doc_md=TASK_DOCS["preflight"], multiple_outputs=False)
    def preflight(**context) -> dict:
        from fk_maintenance.airflow_tasks import run_step
        from fk_maintenance.preflight import preflight as step

        return run_step(step, SPEC, CONN_ID, context)

    @task(doc_md=TASK_DOCS["detect_orphans"], multiple_outputs=False)
    def detect_orphans(**context) -> dict:
        from fk_maintenance.airflow_tasks import run_step
        from fk_maintenance.orphans import detect_orphans as step

        return run_step(step, SPEC, CONN_ID, context)

    @task(doc_md=TASK_DOCS["null_orphans"], multiple_outputs=False)
    def null_orphans(**context) -> dict:
        from fk_maintenance.airflow_tasks import run_step
        from fk_maintenance.orphans import null_orphans as step

        return run_step(step, SPEC, CONN_ID, context, run_id=context["run_id"])

    @task(doc_md=TASK_DOCS["create_index_concurrently"], multiple_outputs=False)
    def create_index_concurrently(**context) -> dict:
        from fk_maintenance.airflow_tasks import connector, run_step
        from fk_maintenance.index import create_index_concurrently as step

        return run_step(step, SPEC, CONN_ID, context, monitor_connect=connector(CONN_ID))

    @task(doc_md=TASK_DOCS["add_fk_not_valid"], multiple_outputs=False)
    def add_fk_not_valid(**context) -> dict:
        from fk_maintenance.airflow_tasks import run_step
        from fk_maintenance.constraint import add_fk_not_valid as step

        return run_step(step, SPEC, CONN_ID, context)

    @task(doc_md=TASK_DOCS["validate_fk"], multiple_outputs=False)
    def validate_fk(**context) -> dict:
        from fk_maintenance.airflow_tasks import run_validate

        return run_validate(SPEC, CONN_ID, context)

    @task(doc_md=TASK_DOCS["post_checks"], retries=0, multiple_outputs=False)
    def post_checks(**context) -> dict:
        from fk_maintenance.airflow_tasks import run_step
        from fk_maintenance.checks import post_checks as step

        return run_step(step, SPEC, CONN_ID, context)

    # all_done: a run that failed still gets its summary; the report then fails too, so the run is failed.
    @task(doc_md=TASK_DOCS["report"], retries=0, trigger_rule="all_done", multiple_outputs=False)
    def report(**context) -> dict:
        from fk_maintenance.airflow_tasks import run_report
        from fk_maintenance.report import STEPS

        return run_report(SPEC, context, STEPS)

    checked = preflight()
    nulled = null_orphans()
    indexed = create_index_concurrently()
    checked >> detect_orphans() >> nulled
    checked >> indexed
    [nulled, indexed] >> add_fk_not_valid() >> validate_fk() >> post_checks() >> report()
