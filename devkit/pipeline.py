"""The DAG's steps in the DAG's order, without Airflow: for tests and benchmarks of the library itself."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg

from fk_maintenance.keys.settings import RunSettings
from fk_maintenance.keys.spec import ForeignKeySpec
from fk_maintenance.steps.registry import APPROVED_ORPHANS, MONITOR_CONNECT, RUN_ID, RUN_STARTED_AT, STEPS
from fk_maintenance.steps.report import build_report, read_archived, read_audited


def run_pipeline(
    connect: Callable[[], psycopg.Connection], spec: ForeignKeySpec, settings: RunSettings, run_id: str
) -> dict[str, Any]:
    """Run every step on its own connection, as the DAG's tasks do; returns each step's summary and the report."""
    # No one is asked here: the delete goes ahead as the library's own run of it.
    available = {
        RUN_ID: run_id,
        RUN_STARTED_AT: datetime.now(UTC),
        MONITOR_CONNECT: connect,
        APPROVED_ORPHANS: None,
    }
    results: dict[str, Any] = {}
    for step in STEPS:  # listed in an order that respects every upstream
        with connect() as conn:
            results[step.name] = step.load()(conn, spec, settings, **{name: available[name] for name in step.needs})
    audited = None if settings.dry_run else read_audited(connect, spec, settings, run_id)
    archived = None if settings.dry_run else read_archived(connect, spec, settings, run_id)
    results["report"] = build_report(spec, settings, run_id, results, audited=audited, archived=archived)
    return results
