"""The DAG's steps in the DAG's order, without Airflow: for tests and benchmarks of the library itself."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg

from fk_maintenance.checks import post_checks
from fk_maintenance.constraint import add_fk_not_valid, validate_fk
from fk_maintenance.index import create_index_concurrently
from fk_maintenance.orphans import detect_orphans, null_orphans
from fk_maintenance.preflight import preflight
from fk_maintenance.report import build_report
from fk_maintenance.settings import RunSettings
from fk_maintenance.spec import ForeignKeySpec


def run_pipeline(
    connect: Callable[[], psycopg.Connection],
    spec: ForeignKeySpec,
    settings: RunSettings,
    run_id: str,
    *,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> dict[str, Any]:
    """Run every step on its own connection, as the DAG's tasks do; returns each step's summary and the report."""
    results: dict[str, Any] = {}

    def step(name: str, function: Callable[..., dict[str, Any]], **kwargs: Any) -> None:
        with connect() as conn:
            results[name] = function(conn, spec, settings, **kwargs)

    step("preflight", preflight)
    step("detect_orphans", detect_orphans)
    step("null_orphans", null_orphans, run_id=run_id)
    step("create_index_concurrently", create_index_concurrently, monitor_connect=connect)
    step("add_fk_not_valid", add_fk_not_valid)
    step("validate_fk", validate_fk, run_id=run_id, run_started_at=now(), now=now)
    step("post_checks", post_checks)
    results["report"] = build_report(spec, settings, run_id, results)
    return results
