"""Fleet runs under the real scheduler (LocalExecutor, ``airflow standalone``): what dag.test() cannot show, because
it runs one task at a time and has no executor whose events can race the scheduler (apache/airflow#71172)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from devkit.cluster import free_port
from devkit.fleet_runs import run_fleet_over, xcom
from devkit.local_airflow import local_airflow
from fk_maintenance.airflow.fleet import TARGET_STARTED_KEY
from fk_maintenance.airflow.tasks import from_trigger

FLEET = 7  # targets after the canary
MAX_PARALLEL = 2


def test_many_targets_waiting_long_at_one_second_looks_all_converge_and_no_wait_is_failed_or_retried(
    tmp_path: Path,
) -> None:
    """Seven targets behind a canary, two at a time, looking for their turn every second: the last ones wait for
    minutes. As rescheduled sensors, 4 of 12 targets were lost at wait_turn at 5 s looks (issue 20); deferred,
    every wait ends in one try (the trigger ends it when the turn comes) and the scheduler records no state
    mismatch."""
    with local_airflow(
        tmp_path / "home", port=free_port(), rows=500, fleet=FLEET, fleet_rows=500, turn_poke_seconds=1
    ) as airflow:
        conn_ids = ["kpi_db", *airflow.fleet_dsns]
        run = run_fleet_over(airflow, conn_ids, {"max_parallel": MAX_PARALLEL, "validate_now": True}, timeout_s=900)
        report = xcom(airflow, run.run_id, "fleet_report", "report")
        # The moment each target's turn came: the first ones' wait_turn stamps it, the others' trigger does.
        turns = [
            from_trigger(xcom(airflow, run.run_id, "fleet.wait_turn", TARGET_STARTED_KEY, n)) for n in range(FLEET)
        ]
    assert run.state == "success", report
    assert [t["final_state"] for t in report["targets"]] == ["converged"] * (FLEET + 1)
    assert run.states("fleet.wait_turn") == dict.fromkeys(range(FLEET), "success")
    assert run.tries("fleet.wait_turn") == [1] * FLEET  # no wait needed a retry
    assert run.state_mismatches == 0
    assert run.most_at_once <= MAX_PARALLEL and run.most_targets_in_flight == MAX_PARALLEL
    # Each target's clock starts at its turn, between its wait's start and its first step's (steps read it to bound
    # how long they wait for another session at their work).
    tis = {(ti["task_id"], ti["map_index"]): ti for ti in run.task_instances}
    for n, came in enumerate(turns):
        waited_from, first_step = tis[("fleet.wait_turn", n)]["start_date"], tis[("fleet.preflight", n)]["start_date"]
        assert _when(waited_from) <= datetime.fromisoformat(came) <= _when(first_step)


def _when(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
