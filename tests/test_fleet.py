"""Fleet runs: one declared key over many databases. The turn rule on its own, then whole runs through
``dag.test()`` over a fleet of real databases, some of them broken in different ways."""

from __future__ import annotations

from pathlib import Path

import pytest

from devkit.db_state import orphan_count, snapshot
from fk_maintenance.airflow.fleet import build_fleet_report, plan_fleet, target_summary, turn
from fk_maintenance.keys.settings import SETTING_DEFS, RunSettings

REPO = Path(__file__).resolve().parents[1]
DAG_ID = "vision_kpis_parent_fk"
DEFAULTS = {d.name: d.default for d in SETTING_DEFS}


def _finished(position: int, failed: bool = False) -> dict:
    return {"conn_id": f"db{position}", "position": position, "failed": failed, "succeeded": not failed}


def test_the_plan_is_the_forms_list_else_the_declared_one_with_the_first_as_canary() -> None:
    assert plan_fleet(RunSettings(), ("a", "b", "c")) == {
        "conn_ids": ["a", "b", "c"],
        "canary": ["a"],
        "fleet": ["b", "c"],
    }
    assert plan_fleet(RunSettings(conn_ids=("z",)), ("a", "b")) == {"conn_ids": ["z"], "canary": ["z"], "fleet": []}


def test_a_target_starts_only_while_fewer_than_max_parallel_earlier_targets_are_unfinished() -> None:
    settings = RunSettings(max_parallel=3)
    assert turn(0, [], settings).decision == "start"  # the canary
    assert [turn(p, [], settings).decision for p in range(1, 6)] == ["start", "start", "start", "wait", "wait"]
    assert turn(4, [_finished(2)], settings).decision == "start"
    assert turn(5, [_finished(2)], settings).decision == "wait"
    # A later target finishing first frees no turn for an earlier one's successors beyond the window.
    assert turn(4, [_finished(6)], settings).decision == "wait"


def test_no_target_starts_once_max_failures_targets_failed_and_zero_means_no_limit() -> None:
    reports = [_finished(1, failed=True), _finished(2, failed=True), _finished(3)]
    stopped = turn(4, reports, RunSettings(max_failures=2))
    assert stopped.decision == "stop" and "db1, db2" in stopped.reason
    assert turn(4, reports, RunSettings(max_failures=3)).decision == "start"
    assert turn(4, reports, RunSettings(max_failures=0)).decision == "start"


def test_the_fleet_report_lists_every_target_and_names_those_that_never_started() -> None:
    canary = {"final_state": "incomplete: preflight did not finish", "succeeded": False}
    canary |= {"orphans_found": None, "nulled": 0, "audited": 0}
    line = target_summary("a", 0, canary, "preflight: boom", None, "preflight")
    assert line["final_state"] == "failed at preflight" and line["failed"]
    report = build_fleet_report("r1", ["a", "b"], [line])
    assert report["failed"] == ["a"] and report["not_started"] == ["b"] and not report["succeeded"]
    assert report["targets"][1]["final_state"] == "not started: the canary failed"
    assert report["targets"][0]["error"] == "preflight: boom"


# Whole runs -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dag(airflow_home):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags")).dags[DAG_ID]


def _run(dag, conf: dict):
    return dag.test(run_conf={**DEFAULTS, **conf})


def _fleet_report(airflow_home) -> dict:
    from devkit.airflow_env import latest_xcom

    return latest_xcom(airflow_home, "fleet_report", key="report")


def _states(report: dict) -> dict[str, str]:
    return {t["conn_id"]: t["final_state"] for t in report["targets"]}


def test_a_fleet_with_broken_targets_converges_the_healthy_ones_and_fails_each_broken_one_alone_and_unchanged(
    dag, fleet, spec, airflow_home
) -> None:
    kinds = ["healthy", "conflict", "healthy", "unreachable", "healthy", "cycle", "healthy", "healthy"]
    conn_ids = [fleet.add(kind, seed=n + 1) for n, kind in enumerate(kinds)]
    healthy = [c for c in conn_ids if c.endswith("_healthy")]
    broken = {c: fleet.databases[c] for c in conn_ids if c.endswith(("_conflict", "_cycle"))}
    orphans = {c: orphan_count(fleet.databases[c], spec) for c in healthy}
    untouched = {c: snapshot(db, spec) for c, db in broken.items()}
    assert all(orphans.values())

    run = _run(dag, {"conn_ids": conn_ids, "validate_now": True, "max_parallel": 3})
    assert str(run.state) == "failed"  # some targets failed, so the run did
    report = _fleet_report(airflow_home)
    states = _states(report)
    assert [t["conn_id"] for t in report["targets"]] == conn_ids
    assert {c: states[c] for c in healthy} == dict.fromkeys(healthy, "converged")
    assert sorted(report["failed"]) == sorted([*broken, *fleet.unreachable]) and report["not_started"] == []
    errors = {t["conn_id"]: t["error"] for t in report["targets"]}
    assert {states[c] for c in [*broken, *fleet.unreachable]} == {"failed at preflight"}
    assert "already exists with another definition" in errors[conn_ids[1]]
    assert f"Airflow connection '{conn_ids[3]}'" in errors[conn_ids[3]] and "cannot connect" in errors[conn_ids[3]]
    assert "no cycles in the hierarchy" in errors[conn_ids[5]]
    for c in healthy:
        db = fleet.databases[c]
        assert orphan_count(db, spec) == 0
        assert db.scalar("SELECT convalidated FROM pg_constraint WHERE conname = %s", [spec.constraint]) is True
        assert db.scalar("SELECT count(*) FROM fk_maintenance.vision_kpis_orphan_audit") == orphans[c]
        line = next(t for t in report["targets"] if t["conn_id"] == c)
        assert line["orphans_found"] == line["nulled"] == line["audited"] == orphans[c]
    assert {c: snapshot(db, spec) for c, db in broken.items()} == untouched

    converged = {c: snapshot(fleet.databases[c], spec) for c in healthy}
    again = _run(dag, {"conn_ids": healthy, "validate_now": True, "max_parallel": 3})
    assert str(again.state) == "success"
    second = _fleet_report(airflow_home)
    assert second["succeeded"] and second["nulled"] == 0 and set(_states(second).values()) == {"converged"}
    assert {c: snapshot(fleet.databases[c], spec) for c in healthy} == converged


def test_a_failed_canary_leaves_every_other_target_untouched(dag, fleet, spec, airflow_home) -> None:
    conn_ids = [fleet.add("conflict"), fleet.add("healthy"), fleet.add("healthy", seed=2)]
    before = {c: snapshot(db, spec) for c, db in fleet.databases.items()}
    run = _run(dag, {"conn_ids": conn_ids, "validate_now": True})
    assert str(run.state) == "failed"
    assert {ti.task_id for ti in run.get_task_instances() if str(ti.state) == "upstream_failed"} >= {
        "fleet.wait_turn",
        "fleet.preflight",
    }
    report = _fleet_report(airflow_home)
    assert report["failed"] == [conn_ids[0]] and report["not_started"] == conn_ids[1:]
    assert _states(report)[conn_ids[1]] == "not started: the canary failed"
    assert {c: snapshot(db, spec) for c, db in fleet.databases.items()} == before


def test_after_max_failures_no_new_target_starts(dag, fleet, spec, airflow_home) -> None:
    conn_ids = [fleet.add("healthy"), fleet.add("cycle"), fleet.add("healthy", seed=2)]
    last = fleet.databases[conn_ids[2]]
    before = snapshot(last, spec)
    run = _run(dag, {"conn_ids": conn_ids, "validate_now": True, "max_parallel": 1, "max_failures": 1})
    assert str(run.state) == "failed"
    report = _fleet_report(airflow_home)
    assert report["failed"] == [conn_ids[1]] and report["not_started"] == [conn_ids[2]]
    assert _states(report)[conn_ids[2]].startswith("not started: 1 target(s) failed")
    assert snapshot(last, spec) == before


def test_a_connection_id_airflow_does_not_know_stops_the_run_before_any_target_is_touched(
    dag, fleet, spec, airflow_home
) -> None:
    known = fleet.add("healthy")
    before = snapshot(fleet.databases[known], spec)
    run = _run(dag, {"conn_ids": [known, "kpi_db_typo"], "validate_now": True})
    assert str(run.state) == "failed"
    states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
    assert states["plan_fleet"] == "failed" and states["canary.preflight"] == "upstream_failed"
    assert snapshot(fleet.databases[known], spec) == before


# A target's clocks start with the target -----------------------------------------------------------------------


def test_validate_fk_reached_eight_days_into_a_run_counts_its_windows_from_its_own_first_attempt() -> None:
    from datetime import UTC, datetime, timedelta

    from fk_maintenance.airflow.tasks import FINISHED_AT, clocks_from
    from fk_maintenance.errors import WindowsExhausted
    from fk_maintenance.steps.constraint import decide_window

    now = datetime.now(UTC)
    opens = (now + timedelta(hours=2)).strftime("%H:%M")  # a window that is closed now
    closes = (now + timedelta(hours=3)).strftime("%H:%M")
    settings = RunSettings.from_params({**DEFAULTS, "window_start": opens, "window_end": closes, "max_windows": 7})
    run_started, turn_came, index_and_constraint_done = now - timedelta(days=8), now - timedelta(hours=5), now
    clocks = clocks_from(run_started, turn_came.isoformat(), {FINISHED_AT: index_and_constraint_done.isoformat()})
    assert clocks.target_started_at == turn_came and clocks.validation_started_at == index_and_constraint_done
    waits = decide_window(settings, now=now, run_started_at=clocks.validation_started_at)
    assert not waits.run_now and waits.windows_used == 0 and waits.retry_at > now
    with pytest.raises(WindowsExhausted):  # what counting from the run's start did: failed without one try
        decide_window(settings, now=now, run_started_at=run_started)
    # A run from before targets stamped their clocks: the run's start stands in.
    assert clocks_from(run_started, None, None).validation_started_at == run_started


def test_a_turn_stamped_by_the_trigger_starts_the_targets_clock_like_one_stamped_by_the_task() -> None:
    """Airflow 3.3 stores an XCom a trigger leaves with a task-ending event serialized twice: the task pulls its
    JSON text. The stamp still starts the target's clock; a stamp the task pushed itself reads as before."""
    import json
    from datetime import UTC, datetime, timedelta

    from fk_maintenance.airflow.tasks import clocks_from, from_trigger

    run_started, turn_came = datetime.now(UTC) - timedelta(days=2), datetime.now(UTC) - timedelta(hours=1)
    for pulled in (json.dumps(turn_came.isoformat()), turn_came.isoformat()):
        assert clocks_from(run_started, from_trigger(pulled), None).target_started_at == turn_came
    assert from_trigger(None) is None and from_trigger({"a": 1}) == {"a": 1}


def test_a_target_starting_days_into_its_run_waits_for_another_session_at_its_work_without_spending_a_retry(
    dag, fleet, spec, airflow_home
) -> None:
    """dag.test() starts the run at its logical date: 8 days ago, as for a target whose turn came 8 days into a long
    fleet run. Counting from the run's start, finding the run lock held failed null_orphans at once (a retry spent,
    minutes of retry delay); counted from the target's start it is rescheduled until the other session is done."""
    import threading
    from datetime import UTC, datetime, timedelta

    import psycopg

    canary, target = fleet.add("healthy"), fleet.add("healthy", seed=2)
    other = psycopg.connect(fleet.databases[target].dsn, autocommit=True)
    other.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", [spec.advisory_lock_name])
    releases = threading.Timer(20, other.close)  # another run's session, done 20 s from now
    releases.start()
    try:
        run = dag.test(
            run_conf={**DEFAULTS, "conn_ids": [canary, target], "validate_now": True},
            logical_date=datetime.now(UTC) - timedelta(days=8),
        )
    finally:
        releases.join()
    assert str(run.state) == "success"
    tries = {ti.task_id: ti.try_number for ti in run.get_task_instances() if ti.task_id.startswith("fleet.")}
    assert tries["fleet.null_orphans"] == tries["fleet.create_index_concurrently"] == 1
    assert orphan_count(fleet.databases[target], spec) == 0
