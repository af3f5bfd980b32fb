"""The fleet on Airflow's CeleryExecutor: a control plane and two `airflow celery worker`s in homes of their own,
sharing only the DAG folder, the metadata database (PostgreSQL) and the broker (Debian's redis-server), as on
separate machines. Every task of a target may run on either worker: what it needs travels in XCom."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import psycopg

from devkit.celery_airflow import celery_airflow
from devkit.db_state import snapshot
from devkit.fleet_runs import run_fleet_over, xcom
from fk_maintenance.keys.spec import VISION_KPIS_PARENT_FK

FLEET = 4  # after the canary
MAX_PARALLEL = 2
BROKEN = "kpi_fleet_2"


class Target:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.dsn, autocommit=True)


def _when(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_a_fleet_on_two_celery_workers_runs_the_canary_first_at_most_max_parallel_at_once_and_isolates_a_failure(
    tmp_path: Path,
) -> None:
    spec = VISION_KPIS_PARENT_FK
    with celery_airflow(tmp_path, workers=2, rows=500, fleet=FLEET, fleet_rows=500, turn_poke_seconds=1) as airflow:
        broken = Target(airflow.fleet_dsns[BROKEN])
        with broken.connect() as conn:  # a constraint of our name with another definition: preflight refuses it
            conn.execute(
                "ALTER TABLE vision_kpis ADD CONSTRAINT vision_kpis_parent_kpi_id_fkey FOREIGN KEY (parent_kpi_id) "
                "REFERENCES vision_kpis(id) ON DELETE CASCADE NOT VALID"
            )
        untouched = snapshot(broken, spec)
        conn_ids = ["kpi_db", *airflow.fleet_dsns]
        run = run_fleet_over(airflow, conn_ids, {"max_parallel": MAX_PARALLEL, "validate_now": True}, timeout_s=900)
        report = xcom(airflow, run.run_id, "fleet_report", "report")
        by_worker = airflow.tasks_run_by_worker()
        assert snapshot(broken, spec) == untouched

    assert run.state == "failed"  # one target failed, so the run did
    states = {t["conn_id"]: t["final_state"] for t in report["targets"]}
    assert [t["conn_id"] for t in report["targets"]] == conn_ids and report["not_started"] == []
    assert states == {c: "failed at preflight" if c == BROKEN else "converged" for c in conn_ids}
    error = next(t["error"] for t in report["targets"] if t["conn_id"] == BROKEN)
    assert "already exists with another definition" in error
    # The canary ran alone first: no fleet task started before its report ended.
    canary_done = max(_when(ti["end_date"]) for ti in run.task_instances if ti["task_id"] == "canary.report")
    fleet_started = [_when(ti["start_date"]) for ti in run.task_instances if ti["task_id"].startswith("fleet.")]
    assert fleet_started and min(fleet_started) >= canary_done
    assert run.most_at_once <= MAX_PARALLEL  # databases with a session of ours, sampled in pg_stat_activity
    assert run.most_targets_in_flight == MAX_PARALLEL  # from the task instances: the bound was reached, not passed
    assert run.tries("fleet.wait_turn") == [1] * FLEET and run.state_mismatches == 0
    assert all(count > 0 for count in by_worker.values()), by_worker  # both workers ran tasks of the run
