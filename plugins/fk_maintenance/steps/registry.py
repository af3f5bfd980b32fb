"""The pipeline's steps: the one list of their names, order, functions, what each changes and which locks it
takes. The DAG wires its tasks from it, the report reads it, devkit runs it without Airflow, and the runbook's
lock table (in the DAG's docs and docs/safety.md) is printed from it.

Standard library only: the DAG file imports this at parse time. Step functions are named, not imported, so
psycopg is loaded only when a task runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Keyword arguments a step may need beyond (conn, spec, settings), supplied by whoever runs it.
RUN_ID = "run_id"
RUN_STARTED_AT = "run_started_at"
MONITOR_CONNECT = "monitor_connect"
# The orphans a person approved deleting (the approve_deletes gate's answer; None when nobody was asked).
APPROVED_ORPHANS = "approved_orphans"


@dataclass(frozen=True)
class Step:
    name: str
    function: str  # "module:function", the module one of fk_maintenance.steps
    upstream: tuple[str, ...]
    changes: str
    locks: str
    needs: tuple[str, ...] = ()
    # A step whose failure a retry cannot fix (post_checks: the end state is what it is) or that changes nothing
    # (preflight) is not retried.
    retried: bool = True

    def load(self) -> Callable[..., dict[str, Any]]:
        module, function = self.function.split(":")
        return getattr(importlib.import_module(f"{__package__}.{module}"), function)

    @property
    def doc_md(self) -> str:
        return f"{self.changes}\n\nLocks: {self.locks}"


STEPS: tuple[Step, ...] = (
    Step(
        "preflight",
        "preflight:preflight",
        (),
        "nothing: checks tables, columns, types, the key's shape, every privilege the run needs, same-named "
        "constraint/index/audit table, and that the data can take the key (no orphans where the orphans policy is "
        "refuse, none a RESTRICT or NO ACTION key protects where it is delete, no cycle or too-deep chain)",
        "ACCESS SHARE: catalog reads, one walk of a self-referencing hierarchy and one orphan count of a NOT NULL key",
        # It changes nothing: a target it refuses (unreachable, wrong shape, bad data) fails at once, without
        # holding a fleet slot through retries, and the next run looks again.
        retried=False,
    ),
    Step(
        "detect_orphans",
        "orphans:detect_orphans",
        ("preflight",),
        "nothing: one `NOT EXISTS` anti-join; counts orphans and missing parents, logs a sample",
        "ACCESS SHARE for one scan; blocks no app statement",
    ),
    Step(
        "null_orphans",
        "orphans:null_orphans",
        ("detect_orphans",),
        "acts on orphans as the key's `orphans` policy says, in batches of `batch_size`: nullify audits then "
        "nulls their pointers; delete locks and archives each orphan and everything its deletion takes along, "
        "then deletes it, in one transaction per batch",
        "ROW EXCLUSIVE and the batch's row locks for the batch's milliseconds, under `lock_timeout_ms`; orphans "
        "the app holds are skipped (SKIP LOCKED), never waited for; a delete's cascade waits at most "
        "`lock_timeout_ms` for a row below an orphan, then leaves that orphan for a later pass",
        needs=(RUN_ID, APPROVED_ORPHANS),
    ),
    Step(
        "create_index_concurrently",
        "index:create_index_concurrently",
        ("preflight",),
        "`CREATE INDEX CONCURRENTLY` in autocommit (an INVALID leftover of our name is dropped concurrently first). "
        "Partitioned table: `CREATE INDEX ... ON ONLY` the parent, then each partition's built concurrently and "
        "attached (`ALTER INDEX ... ATTACH PARTITION`), resumable at any partition",
        "SHARE UPDATE EXCLUSIVE, which app reads and writes never wait on; it may itself wait for old "
        "transactions (logged) up to `index_timeout_min`. Partitioned table: also SHARE on the parent alone for the "
        "ON ONLY (writes through the parent wait) and ACCESS EXCLUSIVE on one partition's new index per attach "
        "(statements planning on that partition wait), each instant, under `lock_timeout_ms` in a free moment",
        needs=(MONITOR_CONNECT,),
    ),
    Step(
        "add_fk_not_valid",
        "constraint:add_fk_not_valid",
        ("null_orphans", "create_index_concurrently"),
        "`ADD CONSTRAINT ... NOT VALID`; from then on every new write is checked. Partitioned table before "
        "PostgreSQL 18: on each partition instead (a partitioned parent cannot take a NOT VALID key there)",
        "SHARE ROW EXCLUSIVE on this table and the referenced one, for milliseconds; each attempt waits at most "
        "`lock_timeout_ms`, so app writes queue behind it at most that long, and no attempt is made while a "
        "transaction older than the first attempt's timeout holds a conflicting lock on either. After "
        "`lock_attempts` the task fails and Airflow retries it",
    ),
    Step(
        "validate_fk",
        "constraint:validate_fk",
        ("add_fk_not_valid",),
        "`VALIDATE CONSTRAINT` inside the window; if it meets an orphan written before the constraint landed, "
        "re-sweeps (audited) and validates again. Outside the window the task is rescheduled and holds no "
        "worker slot. Partitioned table: partition by partition (a window that ends keeps those done), then the "
        "parent: its VALIDATE on 18; before 18 its `ADD CONSTRAINT`, which adopts the partitions' valid keys "
        "without a scan",
        "SHARE UPDATE EXCLUSIVE (app reads and writes never wait on it) for one scan, under a "
        "`statement_timeout` ending at the window's end. Before PostgreSQL 18, a partitioned table's adoption "
        "takes ACCESS EXCLUSIVE on the referenced table (and, if it is partitioned, on both tables' partitions) "
        "for milliseconds: under `lock_timeout_ms`, in a moment when no session holds any lock on them",
        needs=(RUN_ID, RUN_STARTED_AT),
    ),
    Step(
        "post_checks",
        "checks:post_checks",
        ("validate_fk",),
        "nothing: every end-state assertion, all reported (its write test is always rolled back)",
        "ACCESS SHARE; one row lock for an UPDATE that must fail with 23503 and is rolled back",
        retried=False,
    ),
)
STEP_BY_NAME = {step.name: step for step in STEPS}

REPORT_TASK = "report"
REPORT_DOC_MD = (
    "This target's summary in the log and as this task's XCom (also under key `report`; its line of the fleet "
    "report under `target_summary`). Runs even when a step failed, and then fails itself so the target shows "
    "as failed. The nulled count is read from the audit table, so a try that died before reporting is counted."
    "\n\nLocks: ACCESS SHARE on the audit table in the pipeline's own schema, for one count; none on the app's "
    "tables."
)


def lock_table_markdown(
    table: str, before: tuple[tuple[str, str], ...] = (), after: tuple[tuple[str, str], ...] = ()
) -> str:
    """The runbook's table: what each task changes and which lock on ``table`` it takes, for how long.
    ``before`` and ``after``: (task, what it does) of tasks around the steps that touch no database."""
    lines = [
        f"| task | what it changes | lock on `{table}`, at most how long |",
        "| --- | --- | --- |",
        *(f"| {name} | nothing: {does} | none |" for name, does in before),
        *(f"| {step.name} | {step.changes} | {step.locks} |" for step in STEPS),
        f"| {REPORT_TASK} | nothing: counts the run's audited pointers | ACCESS SHARE on the audit table in the "
        "pipeline's own schema only |",
        *(f"| {name} | nothing: {does} | none |" for name, does in after),
    ]
    return "\n".join(lines)
