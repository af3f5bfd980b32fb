"""The DAG: integrity (what users keep in their CI) and whole runs through ``dag.test()``."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from devkit.db_state import snapshot
from fk_maintenance.keys.settings import SETTING_DEFS

REPO = Path(__file__).resolve().parents[1]
DAG_ID = "vision_kpis_parent_fk"

# The graph of docs/index.md, written out apart from fk_maintenance.steps.registry so that a change to the step list
# that breaks the contract fails here. Each target (the canary, then every other) runs it after its turn.
TARGET_EDGES = {
    ("wait_turn", "preflight"),
    ("preflight", "detect_orphans"),
    ("preflight", "create_index_concurrently"),
    ("detect_orphans", "null_orphans"),
    ("null_orphans", "add_fk_not_valid"),
    ("create_index_concurrently", "add_fk_not_valid"),
    ("add_fk_not_valid", "validate_fk"),
    ("validate_fk", "post_checks"),
    ("post_checks", "report"),
}
EDGES = {
    *((f"{group}.{a}", f"{group}.{b}") for group in ("canary", "fleet") for a, b in TARGET_EDGES),
    ("canary.report", "fleet.wait_turn"),  # a failed canary leaves every other target untouched
    ("canary.report", "fleet_report"),
    ("fleet.report", "fleet_report"),
}


@pytest.fixture(scope="module")
def bag(airflow_home):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


@pytest.fixture(scope="module")
def dag(bag):
    return bag.dags[DAG_ID]


def test_dag_folder_imports_without_errors_and_holds_the_contract_dag_id(bag) -> None:
    assert bag.import_errors == {}
    # The key's own DAG, and its restore DAG.
    assert set(bag.dag_ids) == {"vision_kpis_parent_fk", "vision_kpis_parent_fk_restore"}


def test_the_report_and_the_library_know_every_task_of_the_graph(dag) -> None:
    from fk_maintenance.airflow.fleet import FLEET_REPORT_TASK, PLAN_TASK, WAIT_TURN_TASK
    from fk_maintenance.steps.registry import REPORT_TASK, STEPS

    per_target = {step.name for step in STEPS} | {REPORT_TASK, WAIT_TURN_TASK}
    groups = {f"{group}.{name}" for group in ("canary", "fleet") for name in per_target}
    assert groups | {PLAN_TASK, FLEET_REPORT_TASK} == set(dag.task_ids)


def test_graph_and_order_are_as_designed(dag) -> None:
    edges = {(upstream, task.task_id) for task in dag.tasks for upstream in task.upstream_task_ids}
    # plan_fleet feeds every target task its connection id (the mapping), so it is upstream of all of them.
    mapped = {task.task_id for task in dag.tasks if task.task_id.startswith(("canary.", "fleet."))}
    assert {edge for edge in edges if edge[0] == "plan_fleet"} == {("plan_fleet", task_id) for task_id in mapped}
    assert {edge for edge in edges if edge[0] != "plan_fleet"} == EDGES
    assert {task.task_id for task in dag.tasks} == {name for edge in EDGES for name in edge} | {"plan_fleet"}


def test_fleet_targets_are_mapped_over_connections_in_the_project_pool_and_labelled_by_connection(dag) -> None:
    from fk_maintenance.airflow.fleet import POOL
    from fk_maintenance.steps.registry import STEPS

    for group in ("canary", "fleet"):
        for step in STEPS:
            task = dag.get_task(f"{group}.{step.name}")
            assert task.pool == POOL
            if group == "fleet":
                assert task.map_index_template == "{{ task.op_kwargs['conn_id'] }}"
        turn = dag.get_task(f"{group}.wait_turn")
        assert turn.mode == "reschedule" and turn.pool != POOL  # waiting costs no pool slot


def test_schedule_is_daily_at_the_window_start_without_catchup_and_one_run_at_a_time(dag) -> None:
    from airflow.timetables.trigger import CronTriggerTimetable

    assert isinstance(dag.timetable, CronTriggerTimetable)
    assert dag.timetable._expression == "0 1 * * *"
    # A new deployment runs at once only inside the default window (01:00-05:00), else waits for it.
    assert dag.timetable._run_immediately == timedelta(hours=4)
    assert dag.start_date is None
    assert dag.catchup is False
    assert dag.max_active_runs == 1


def test_every_task_documents_its_locks_and_retries_are_set_where_safe(dag) -> None:
    for task in dag.tasks:
        assert task.doc_md and "Lock" in task.doc_md, task.task_id
    assert dag.get_task("canary.add_fk_not_valid").retries >= 1
    # one XCom per step, not one per key
    assert not any(task.multiple_outputs for task in dag.tasks)
    assert dag.get_task("fleet.post_checks").retries == 0
    assert dag.doc_md and "Undo the data change" in dag.doc_md


def test_form_has_every_setting_typed_bounded_and_described(dag) -> None:
    required = {
        "dry_run",
        "batch_size",
        "lock_timeout_ms",
        "window_start",
        "window_end",
        "window_timezone",
        "max_active_sessions",
        "validate_now",
        "max_depth",
    }
    params = dag.params
    assert required <= set(params.keys())
    for name in params:
        param = params.get_param(name)
        assert param.schema.get("type") and param.description and param.schema.get("section"), name
        if param.schema["type"] == "integer":
            assert "minimum" in param.schema and "maximum" in param.schema, name


@pytest.mark.parametrize(
    "conf",
    [
        {"batch_size": 0},
        {"batch_size": 100_001},
        {"batch_size": "1000"},
        {"lock_timeout_ms": 10},
        {"window_start": "24:00"},
        {"window_end": "5"},
        {"window_timezone": ""},
        {"max_depth": -1},
        {"dry_run": "true"},
    ],
)
def test_the_form_refuses_bad_values(dag, conf: dict) -> None:
    from airflow.sdk.exceptions import ParamValidationError

    from fk_maintenance.errors import InvalidSettings
    from fk_maintenance.keys.settings import RunSettings

    ((name, value),) = conf.items()
    with pytest.raises(ParamValidationError):
        dag.params.get_param(name).resolve(value=value)
    with pytest.raises(InvalidSettings, match=name):  # the library refuses what the form refuses
        RunSettings.from_params(conf)


@pytest.mark.parametrize("definition", [d for d in SETTING_DEFS if "minimum" in d.schema], ids=lambda d: d.name)
def test_the_form_accepts_each_bound_and_refuses_one_past_it(dag, definition) -> None:
    from airflow.sdk.exceptions import ParamValidationError

    param = dag.params.get_param(definition.name)
    # The form's own bounds: the DAG caps approve_deletes_above at the key's own value (a run may not ask less).
    low, high = definition.schema["minimum"], param.schema["maximum"]
    assert high == (definition.default if definition.name == "approve_deletes_above" else definition.schema["maximum"])
    assert param.resolve(value=low) == low and param.resolve(value=high) == high
    for value in (low - 1, high + 1):
        with pytest.raises(ParamValidationError):
            param.resolve(value=value)


def test_triggering_with_a_bad_value_is_refused_before_any_run_or_statement(dag, db, spec, monkeypatch) -> None:
    from airflow.sdk.exceptions import ParamValidationError

    db.build(200)
    before = snapshot(db, spec)
    with pytest.raises(ParamValidationError, match="batch_size"):
        _run(dag, monkeypatch, db, {"batch_size": 0})
    assert snapshot(db, spec) == before


def test_parsing_the_dag_file_loads_no_step_module_and_opens_no_connection() -> None:
    probe = (
        "import sys, socket, runpy\n"
        "def refuse(*a, **k): raise AssertionError('network access at parse time')\n"
        "socket.socket.connect = refuse\n"
        f"sys.path.insert(0, {str(REPO / 'plugins')!r})\n"
        f"runpy.run_path({str(REPO / 'dags' / 'foreign_key_dags.py')!r})\n"
        "loaded = [m for m in sys.modules if m.startswith('fk_maintenance.')]\n"
        # Only the stdlib-only modules (settings and what they use); no step module, which would import psycopg.
        "parse_time = {'errors', 'keys', 'keys.settings', 'keys.spec', 'keys.window', 'keys.targets', 'keys.drizzle',"
        " 'steps', 'steps.registry', 'airflow', 'airflow.fleet', 'airflow.alerts', 'airflow.assets',"
        " 'airflow.approval_gate', 'airflow.all_keys', 'records', 'records.approval'}\n"
        "assert set(loaded) <= {f'fk_maintenance.{name}' for name in parse_time}, loaded\n"
        "assert 'psycopg' not in sys.modules, 'psycopg imported at parse time'\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True)


def test_parsing_the_dag_file_emits_no_warning_of_its_own() -> None:
    """Teams run their DAG tests with warnings as errors: what our file imports must not warn (Airflow's own
    import is done first, its warnings are Airflow's)."""
    probe = (
        "import sys, runpy, warnings\n"
        f"sys.path.insert(0, {str(REPO / 'plugins')!r})\n"
        "import airflow.sdk, airflow.timetables.trigger\n"
        "warnings.simplefilter('error')\n"
        f"runpy.run_path({str(REPO / 'dags' / 'foreign_key_dags.py')!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def _run(dag, monkeypatch, db, conf: dict):
    monkeypatch.setenv("AIRFLOW_CONN_KPI_DB", db.server.airflow_connection_json(db.name))
    # Every setting given: dag.test() keeps the params of an earlier run of the same DAG object otherwise.
    return dag.test(run_conf={**{d.name: d.default for d in SETTING_DEFS}, **conf})


def _task_states(dag_run) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}


def test_whole_dag_converges_from_orphans_then_a_second_run_changes_nothing(
    dag, db, spec, monkeypatch, airflow_home
) -> None:
    from devkit.airflow_env import latest_xcom

    generated = db.build(5000)
    first = _run(dag, monkeypatch, db, {"validate_now": True, "batch_size": 100})
    assert str(first.state) == "success", _task_states(first)
    report = latest_xcom(airflow_home, "canary.report")
    assert report["final_state"] == "converged"
    assert report["orphans_found"] == report["nulled"] == report["audited"] == generated.orphans
    assert db.scalar("SELECT count(*) FROM fk_maintenance.vision_kpis_orphan_audit") == generated.orphans

    before = snapshot(db, spec)
    second = _run(dag, monkeypatch, db, {"validate_now": True})
    assert str(second.state) == "success", _task_states(second)
    assert snapshot(db, spec) == before
    report = latest_xcom(airflow_home, "canary.report")
    assert report["nulled"] == 0 and report["final_state"] == "converged"


def test_dry_run_through_the_dag_changes_nothing(dag, db, spec, monkeypatch, airflow_home) -> None:
    from devkit.airflow_env import latest_xcom

    db.build(2000)
    before = snapshot(db, spec)
    run = _run(dag, monkeypatch, db, {"dry_run": True})
    assert str(run.state) == "success", _task_states(run)
    assert snapshot(db, spec) == before
    assert latest_xcom(airflow_home, "canary.report")["final_state"] == "dry run: nothing changed"


def test_bad_settings_stop_a_task_before_it_connects(monkeypatch, airflow_home) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from fk_maintenance.airflow.tasks import run_task
    from fk_maintenance.keys.spec import VISION_KPIS_PARENT_FK

    monkeypatch.setenv("AIRFLOW_CONN_KPI_DB", json.dumps({"conn_type": "postgres", "host": "127.0.0.1", "port": 1}))
    with pytest.raises(AirflowFailException, match="window_timezone 'Nowhere/Land' is not a known IANA timezone"):
        run_task("preflight", VISION_KPIS_PARENT_FK, "kpi_db", {"params": {"window_timezone": "Nowhere/Land"}})


def test_a_step_that_finds_another_session_at_our_work_waits_rescheduled_and_gives_up_only_after_a_build_could_end(
    db, spec, monkeypatch, airflow_home
) -> None:
    from datetime import UTC, datetime
    from types import SimpleNamespace

    from airflow.sdk.exceptions import AirflowRescheduleException

    from fk_maintenance.airflow.tasks import run_task
    from fk_maintenance.db.session import CONCURRENT_RUN_GRACE, CONCURRENT_RUN_RECHECK, run_lock
    from fk_maintenance.errors import ConcurrentRun
    from fk_maintenance.keys.settings import RunSettings

    db.build(300)
    monkeypatch.setenv("AIRFLOW_CONN_KPI_DB", db.server.airflow_connection_json(db.name))
    params = {d.name: d.default for d in SETTING_DEFS}
    now = datetime.now(UTC)
    with db.connect() as other, run_lock(other, spec):  # the index build of this run's other branch, say
        context = {"params": params, "run_id": "r1", "dag_run": SimpleNamespace(start_date=now, run_after=now)}
        with pytest.raises(AirflowRescheduleException) as waiting:
            run_task("null_orphans", spec, "kpi_db", context)
        looks_again = waiting.value.reschedule_date
        assert now + CONCURRENT_RUN_RECHECK <= looks_again <= datetime.now(UTC) + CONCURRENT_RUN_RECHECK
        long_ago = now - timedelta(minutes=RunSettings().index_timeout_min) - CONCURRENT_RUN_GRACE
        context["dag_run"] = SimpleNamespace(start_date=long_ago, run_after=long_ago)
        with pytest.raises(ConcurrentRun):  # longer than any build of ours: Airflow's retries take over
            run_task("null_orphans", spec, "kpi_db", context)
    assert db.scalar("SELECT to_regclass('fk_maintenance.vision_kpis_orphan_audit')") is None


def test_a_run_whose_preflight_fails_ends_failed_with_an_incomplete_report(
    dag, db, spec, monkeypatch, airflow_home
) -> None:
    from devkit.airflow_env import latest_xcom

    db.build(500)
    db.execute(
        "ALTER TABLE vision_kpis ADD CONSTRAINT vision_kpis_parent_kpi_id_fkey FOREIGN KEY (parent_kpi_id) "
        "REFERENCES vision_kpis(id) ON DELETE CASCADE NOT VALID"
    )
    before = snapshot(db, spec)
    run = _run(dag, monkeypatch, db, {"validate_now": True})
    states = _task_states(run)
    assert str(run.state) == "failed"
    assert states["canary.preflight"] == "failed" and states["canary.null_orphans"] == "upstream_failed"
    assert states["canary.report"] == "failed"  # it ran (all_done) and said why the run is not green
    report = latest_xcom(airflow_home, "canary.report", key="report")
    assert report["final_state"].startswith("incomplete: preflight, detect_orphans")
    assert snapshot(db, spec) == before


def test_a_run_whose_post_checks_fail_reports_each_failed_check(dag, db, spec, monkeypatch, airflow_home) -> None:
    from devkit.airflow_env import latest_xcom

    db.build(500, orphan_ratio=0)
    # An app trigger that silently skips every update: the probe's UPDATE to a missing parent does nothing, so
    # the database never says 23503, and that check must fail, visibly.
    db.execute(
        "CREATE FUNCTION skip_updates() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;"
        "CREATE TRIGGER skip_updates BEFORE UPDATE ON vision_kpis FOR EACH ROW EXECUTE FUNCTION skip_updates()"
    )
    run = _run(dag, monkeypatch, db, {"validate_now": True})
    states = _task_states(run)
    assert str(run.state) == "failed" and states["canary.post_checks"] == "failed", states
    report = latest_xcom(airflow_home, "canary.report", key="report")
    assert report["final_state"] == "not converged: post-checks failed"
    assert report["failed_checks"] == ["database rejects a missing parent (SQLSTATE 23503)"]
    assert report["checks_passed"] >= 8


def test_the_documentation_tables_are_the_ones_the_library_generates() -> None:
    from devkit.doc_tables import ROOT, stale_pages

    stale = [str(path.relative_to(ROOT)) for path in stale_pages()]
    assert not stale, f"out of date: {stale}: run python -m devkit.doc_tables"


def test_outside_the_window_validate_fk_is_rescheduled_and_succeeds_once_the_window_opens(
    dag, db, spec, monkeypatch, airflow_home
) -> None:
    from datetime import UTC, datetime

    from airflow.models.taskreschedule import TaskReschedule
    from airflow.utils.session import create_session
    from sqlalchemy import select

    from fk_maintenance.keys.settings import RunSettings
    from fk_maintenance.steps.constraint import add_fk_not_valid
    from fk_maintenance.steps.index import create_index_concurrently
    from fk_maintenance.steps.orphans import null_orphans

    db.build(500)
    # Everything but VALIDATE done beforehand, so the DAG's earlier steps are quick no-ops.
    with db.connect() as conn:
        null_orphans(conn, spec, RunSettings(), "setup")
        create_index_concurrently(conn, spec, RunSettings())
        add_fk_not_valid(conn, spec, RunSettings())
    # The window opens at the first minute boundary at least 15 s away: validate_fk meets it closed.
    opens = (datetime.now(UTC) + timedelta(seconds=75)).replace(second=0, microsecond=0)
    conf = {"window_start": opens.strftime("%H:%M"), "window_end": (opens + timedelta(hours=1)).strftime("%H:%M")}
    run = _run(dag, monkeypatch, db, conf)
    assert str(run.state) == "success", _task_states(run)
    with create_session() as session:
        reschedules = session.scalars(
            select(TaskReschedule).where(TaskReschedule.ti_id == run.get_task_instance("canary.validate_fk").id)
        ).all()
    assert [r.reschedule_date for r in reschedules] == [opens]  # given back once, until the window opened
    assert db.scalar("SELECT convalidated FROM pg_constraint WHERE conname = %s", [spec.constraint]) is True
