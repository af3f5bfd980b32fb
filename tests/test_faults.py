"""Zero downtime and nothing lost, under faults and concurrent load.

Every scenario runs the app workload (devkit.workload: inserts, parent moves, leaf deletes, reads by parent)
beside the real steps on a real PostgreSQL, measures each app statement, and ends with the invariant check:
row count as expected, every column but the pointer unchanged for rows the app did not touch, every pointer
the pipeline nulled present in the audit, zero orphans once validated.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devkit.db_state import orphan_count
from devkit.pipeline import run_pipeline
from devkit.workload import WRITE_KINDS, AppWorkload, WorkloadResult
from fk_maintenance.errors import ConcurrentRun, LockNotAcquired
from fk_maintenance.keys.settings import RunSettings
from fk_maintenance.keys.spec import VISION_KPIS_PARENT_FK, ForeignKeySpec
from fk_maintenance.steps.checks import post_checks
from fk_maintenance.steps.constraint import add_fk_not_valid, validate_fk
from fk_maintenance.steps.index import create_index_concurrently
from fk_maintenance.steps.orphans import null_orphans

REPO = Path(__file__).resolve().parents[1]
ROWS = 20_000
# What an app statement may take beyond lock_timeout on this 2-core machine while the pipeline, the
# server and the workload share it: scheduling and commit latency, not lock waits.
MARGIN_MS = 400

Snapshot = dict[uuid.UUID, tuple[uuid.UUID | None, str]]


def capture(db) -> Snapshot:
    return {
        row[0]: (row[1], row[2])
        for row in db.query(
            "SELECT id, parent_kpi_id, md5(ROW(user_id, vision_id, level, title, created_at, updated_at)::text) "
            "FROM vision_kpis"
        )
    }


def assert_invariants(db, before: Snapshot, app: WorkloadResult, *, validated: bool = True) -> dict[str, int]:
    after = capture(db)
    expected_ids = (set(before) - app.deleted) | (app.inserted - app.deleted)
    assert set(after) == expected_ids, "rows lost or invented"
    audit = (
        dict(db.query("SELECT kpi_id, old_parent_kpi_id FROM fk_maintenance.vision_kpis_orphan_audit"))
        if db.scalar("SELECT to_regclass('fk_maintenance.vision_kpis_orphan_audit') IS NOT NULL")
        else {}
    )
    nulled = 0
    for kpi, (parent, row_hash) in before.items():
        if kpi in app.touched or kpi in app.deleted:
            continue
        after_parent, after_hash = after[kpi]
        assert after_hash == row_hash, f"columns other than parent_kpi_id changed on {kpi}"
        if after_parent != parent:
            assert after_parent is None and audit.get(kpi) == parent, f"pointer of {kpi} changed without audit"
            nulled += 1
    if validated:
        assert orphan_count(db, VISION_KPIS_PARENT_FK) == 0
        assert db.scalar("SELECT convalidated FROM pg_constraint WHERE conname = 'vision_kpis_parent_kpi_id_fkey'")
    return {"nulled_and_audited": nulled, "audit_rows": len(audit)}


def worst_write_ms(app: WorkloadResult) -> float:
    return app.latency(WRITE_KINDS)["max_ms"]


def hold_row_lock(db) -> psycopg.Connection:
    """An app transaction that updated a yearly row and has not committed (the workload never touches those)."""
    blocker = db.connect()
    blocker.autocommit = False
    blocker.execute(
        "UPDATE vision_kpis SET title = title WHERE id = (SELECT id FROM vision_kpis WHERE level = 'yearly' LIMIT 1)"
    )
    return blocker


def in_thread(function: Any, *args: Any, **kwargs: Any) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def body() -> None:
        try:
            outcome["result"] = function(*args, **kwargs)
        except BaseException as exc:  # handed to the test to assert on
            outcome["error"] = exc

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, outcome


def wait_for(predicate: Any, timeout: float = 15.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


SETTINGS = RunSettings(validate_now=True, lock_timeout_ms=200, lock_attempts=30, batch_size=50)


def test_long_app_transaction_during_add_fk_app_waits_at_most_lock_timeout_then_step_succeeds(
    db, spec, figures
) -> None:
    db.build(ROWS)
    before = capture(db)
    with db.connect() as conn:
        null_orphans(conn, spec, SETTINGS, "run-1")
        create_index_concurrently(conn, spec, SETTINGS)
    blocker = hold_row_lock(db)
    with AppWorkload(db.dsn) as app:
        time.sleep(0.3)
        # The long transaction ends after 2 s; meanwhile the step watches pg_locks and makes no attempt.
        timer = threading.Timer(2.0, blocker.rollback)
        timer.start()
        with db.connect() as conn:
            result = add_fk_not_valid(conn, spec, SETTINGS)
        timer.join()
        time.sleep(0.3)
    blocker.close()
    measured = app.result
    assert result["action"] == "added NOT VALID" and result["watched_seconds"] >= 1.5
    assert result["deferred_for_long_transactions"] + result["lock_timeouts"] == result["attempts"] - 1
    assert measured.errors() == []
    assert worst_write_ms(measured) <= SETTINGS.lock_timeout_ms + MARGIN_MS
    with db.connect() as conn:
        validate_fk(conn, spec, SETTINGS, "run-1", run_started_at=datetime.now(UTC))
        post_checks(conn, spec, SETTINGS)
    counts = assert_invariants(db, before, measured)
    figures(
        f"lock_timeout {SETTINGS.lock_timeout_ms} ms; watched pg_locks {result['watched_seconds']} s, "
        f"{result['attempts']} attempt(s), {result['struck_in_gap']} in a free moment, "
        f"{result['lock_timeouts']} lock timeouts; "
        f"{measured.summary()}; {counts['nulled_and_audited']} pointers nulled, all audited"
    )


def test_long_app_transaction_that_never_ends_fails_add_fk_clearly_with_nothing_half_done(db, spec, figures) -> None:
    db.build(ROWS, orphan_ratio=0)
    before = capture(db)
    blocker = hold_row_lock(db)
    settings = replace(SETTINGS, lock_attempts=4, gap_watch_seconds=1)
    with AppWorkload(db.dsn) as app:
        with db.connect() as conn, pytest.raises(LockNotAcquired, match="no lock within 4 attempts") as caught:
            add_fk_not_valid(conn, spec, settings)
        time.sleep(0.2)
    blocker.rollback()
    blocker.close()
    assert "RowExclusiveLock" in str(caught.value)
    assert db.scalar("SELECT count(*) FROM pg_constraint WHERE conname = %s", [spec.constraint]) == 0
    measured = app.result
    assert measured.errors() == []
    assert worst_write_ms(measured) <= settings.lock_timeout_ms + MARGIN_MS
    assert_invariants(db, before, measured, validated=False)
    figures(f"gave up after 4 attempts; {measured.summary()}")


def test_index_build_killed_midway_is_repaired_by_the_next_attempt(db, spec, figures) -> None:
    db.build(ROWS)
    before = capture(db)
    blocker = hold_row_lock(db)  # the concurrent build waits for this writer before it starts building
    with AppWorkload(db.dsn) as app:
        with db.connect() as conn:
            thread, outcome = in_thread(
                create_index_concurrently, conn, spec, SETTINGS, monitor_connect=db.connect, poll_seconds=0.1
            )
            builder = wait_for(lambda: db.query("SELECT pid FROM pg_stat_progress_create_index"))[0][0]
            time.sleep(0.3)  # let the monitor see whom the build waits for
            db.execute("SELECT pg_terminate_backend(%s)", [builder])
            thread.join(timeout=30)
        assert isinstance(outcome.get("error"), psycopg.OperationalError)
        blocker.rollback()
        blocker.close()
        assert db.scalar("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = %s::regclass", [spec.index])
        results = run_pipeline(db.connect, spec, SETTINGS, "run-2")
    assert results["create_index_concurrently"]["action"] == "rebuilt (dropped INVALID leftover)"
    assert results["post_checks"]["failed"] == 0
    measured = app.result
    assert measured.errors() == []
    assert_invariants(db, before, measured)
    figures(f"build killed while waiting, rebuilt on the next run; {measured.summary()}")


def test_validate_cut_by_the_window_end_stays_not_valid_and_a_later_window_validates(db, spec, figures) -> None:
    db.build(200_000)
    before = capture(db)
    with db.connect() as conn:
        null_orphans(conn, spec, SETTINGS, "run-1")
        create_index_concurrently(conn, spec, SETTINGS)
        add_fk_not_valid(conn, spec, SETTINGS)
    window = RunSettings(window_start="01:00", window_end="05:00", window_timezone="Europe/Berlin")
    # 04:59:59.990 Berlin time: the window ends 10 ms into the scan.
    almost_over = datetime(2026, 3, 3, 4, 59, 59, 990000, tzinfo=window.zone).astimezone(UTC)
    clock = {"now": almost_over}  # frozen: VALIDATE gets a statement_timeout of 10 ms

    def fake_now() -> datetime:
        return clock["now"]

    with AppWorkload(db.dsn) as app, db.connect() as conn:
        cut = validate_fk(conn, spec, window, "run-1", run_started_at=almost_over, now=fake_now, min_validate_seconds=0)
    assert cut["outcome"] == "reschedule" and cut["reason"] == "VALIDATE cut short by the end of the window"
    assert cut["retry_at"] == "2026-03-04T00:00:00+00:00"  # 01:00 Berlin, the next window
    assert db.scalar("SELECT convalidated FROM pg_constraint WHERE conname = %s", [spec.constraint]) is False
    # The next night, inside the window:
    clock["now"] = datetime(2026, 3, 4, 1, 30, tzinfo=window.zone).astimezone(UTC)
    with db.connect() as conn:
        done = validate_fk(conn, spec, window, "run-1", run_started_at=almost_over, now=fake_now)
    assert done["outcome"] == "validated"
    assert app.result.errors() == []
    assert_invariants(db, before, app.result)
    figures(f"VALIDATE cut at the window end, validated the next window; {app.result.summary()}")


def test_outside_the_window_the_airflow_task_is_rescheduled_to_the_window_start(
    db, spec, monkeypatch, airflow_home
) -> None:
    from airflow.sdk.exceptions import AirflowRescheduleException

    from fk_maintenance.airflow.tasks import run_task

    db.build(2000)
    with db.connect() as conn:
        null_orphans(conn, spec, SETTINGS, "run-1")
        add_fk_not_valid(conn, spec, SETTINGS)
    monkeypatch.setenv("AIRFLOW_CONN_KPI_DB", db.server.airflow_connection_json(db.name))
    now = datetime.now(UTC)
    start = (now + timedelta(hours=2)).replace(second=0, microsecond=0)
    params = {"window_start": start.strftime("%H:%M"), "window_end": (start + timedelta(hours=1)).strftime("%H:%M")}

    class Run:
        start_date = now
        run_after = now

    with pytest.raises(AirflowRescheduleException) as caught:
        run_task("validate_fk", spec, "kpi_db", {"params": params, "dag_run": Run(), "run_id": "run-1"})
    assert caught.value.reschedule_date == start
    assert db.scalar("SELECT convalidated FROM pg_constraint WHERE conname = %s", [spec.constraint]) is False


def test_app_writing_dangling_parents_until_the_constraint_lands_is_swept_before_validate(db, spec, figures) -> None:
    db.build(ROWS)
    before = capture(db)
    with AppWorkload(db.dsn, dangling_share=0.5) as app:
        with db.connect() as conn:
            null_orphans(conn, spec, SETTINGS, "run-1")
            create_index_concurrently(conn, spec, SETTINGS)
        time.sleep(0.5)  # the app keeps writing dangling pointers
        with db.connect() as conn:
            add_fk_not_valid(conn, spec, SETTINGS)
        time.sleep(0.5)  # now the database rejects them
        with db.connect() as conn:
            validated = validate_fk(conn, spec, SETTINGS, "run-1", run_started_at=datetime.now(UTC))
            post_checks(conn, spec, SETTINGS)
    measured = app.result
    assert validated["resweep"]["nulled"] > 0 and validated["resweep"]["audited"] == validated["resweep"]["nulled"]
    assert measured.fk_rejections() > 0  # after the constraint landed, the database refused new dangling ids
    assert measured.errors() == []
    assert_invariants(db, before, measured)
    figures(
        f"re-sweep nulled {validated['resweep']['nulled']} late orphans; FK rejected "
        f"{measured.fk_rejections()} app writes after it landed; {measured.summary()}"
    )


def test_parents_deleted_during_nulling_and_after_the_constraint_leave_children_as_roots(db, spec, figures) -> None:
    db.build(ROWS)
    before = capture(db)
    with AppWorkload(db.dsn, delete_parent_share=0.2) as app:
        results = run_pipeline(db.connect, spec, replace(SETTINGS, batch_size=10, batch_pause_ms=5), "run-1")
        time.sleep(0.5)
    measured = app.result
    assert results["post_checks"]["failed"] == 0
    deleted_parents = sum(op.kind == "delete_parent" and op.error is None for op in measured.ops)
    assert deleted_parents > 0
    assert measured.errors() == []
    assert_invariants(db, before, measured)
    figures(f"{deleted_parents} parents deleted by the app; {measured.summary()}")


def test_two_runs_at_once_change_the_database_one_at_a_time(db, spec, figures) -> None:
    db.build(ROWS)
    before = capture(db)
    # Small batches with pauses stretch each run's nulling over about a second, so two runs that were not kept
    # apart by the run lock would be seen nulling at the same time.
    settings = replace(SETTINGS, batch_size=20, batch_pause_ms=100)
    start = threading.Barrier(2)

    def run(run_id: str) -> dict[str, Any]:
        start.wait()
        return run_pipeline(db.connect, spec, settings, run_id)

    with AppWorkload(db.dsn) as app:
        threads = [in_thread(run, f"run-{i}") for i in (1, 2)]
        for thread, _ in threads:
            thread.join(timeout=120)
        outcomes = [outcome for _, outcome in threads]
        for outcome in outcomes:
            assert "result" in outcome or isinstance(outcome["error"], ConcurrentRun), outcome
        # Whichever stopped, the next run converges.
        final = run_pipeline(db.connect, spec, SETTINGS, "run-3")
    assert final["post_checks"]["failed"] == 0
    stopped = sum("error" in outcome for outcome in outcomes)
    spans = db.query(
        "SELECT run_id, min(nulled_at), max(nulled_at) FROM fk_maintenance.vision_kpis_orphan_audit "
        "WHERE run_id IN ('run-1', 'run-2') GROUP BY run_id ORDER BY 2"
    )
    assert spans, "neither run nulled anything"
    if len(spans) == 2:  # both nulled: one after the other, never at once
        assert spans[0][2] < spans[1][1], f"the two runs nulled at the same time: {spans}"
    assert app.result.errors() == []
    counts = assert_invariants(db, before, app.result)
    # This workload writes no dangling pointer and deletes no parent: every audit row is one the runs nulled.
    assert counts["audit_rows"] == counts["nulled_and_audited"]
    figures(f"{stopped} of 2 concurrent runs stopped on the run lock; nulling spans {spans}; {app.result.summary()}")


def test_sql_in_the_run_id_is_stored_as_data(db, spec) -> None:
    db.build(1000)
    hostile = "x'); DROP TABLE vision_kpis; --"
    with db.connect() as conn:
        result = null_orphans(conn, spec, SETTINGS, hostile)
    assert result["nulled"] > 0
    assert (
        db.scalar(
            "SELECT count(DISTINCT run_id) FROM fk_maintenance.vision_kpis_orphan_audit WHERE run_id = %s", [hostile]
        )
        == 1
    )
    assert db.scalar("SELECT count(*) FROM vision_kpis") == 1000


SLOW_BATCHES = """
CREATE FUNCTION slow_pointer_update() RETURNS trigger LANGUAGE plpgsql AS
    $$ BEGIN PERFORM pg_sleep(0.01); RETURN NEW; END $$;
CREATE TRIGGER slow_pointer_update BEFORE UPDATE OF parent_kpi_id ON vision_kpis
    FOR EACH ROW EXECUTE FUNCTION slow_pointer_update();
"""


def _audit_matches_nulled(db, before: Snapshot) -> int:
    after = capture(db)
    nulled = {k: p for k, (p, _) in before.items() if p is not None and after[k][0] is None}
    audit = dict(db.query("SELECT kpi_id, old_parent_kpi_id FROM fk_maintenance.vision_kpis_orphan_audit"))
    assert audit == nulled, "a batch was half applied"
    return len(nulled)


@pytest.fixture
def restartable(pg_server):
    if not pg_server.can_restart:
        pytest.skip("restarts need the embedded server")
    return pg_server


def test_database_restart_mid_batch_and_between_steps_then_the_run_converges(db, spec, restartable, figures) -> None:
    db.build(ROWS)
    db.execute(SLOW_BATCHES)
    before = capture(db)

    def audited() -> int:
        if not db.scalar("SELECT to_regclass('fk_maintenance.vision_kpis_orphan_audit') IS NOT NULL"):
            return 0
        return db.scalar("SELECT count(*) FROM fk_maintenance.vision_kpis_orphan_audit")

    with AppWorkload(db.dsn) as app:
        with db.connect() as conn:
            thread, outcome = in_thread(null_orphans, conn, spec, SETTINGS, "run-1")
            wait_for(audited)
            restartable.restart()  # mid-batch: a batch of 50 takes about half a second
            thread.join(timeout=30)
        assert isinstance(outcome.get("error"), psycopg.OperationalError)
        partial = _audit_matches_nulled(db, before)
        with db.connect() as conn:
            null_orphans(conn, spec, SETTINGS, "run-1")
        restartable.restart()  # between steps
        db.execute("DROP TRIGGER slow_pointer_update ON vision_kpis")
        results = run_pipeline(db.connect, spec, SETTINGS, "run-1")
    assert results["post_checks"]["failed"] == 0
    total = _audit_matches_nulled(db, before)
    # The restart cuts the app's sessions too; it reconnects. Those are the only errors it may see.
    lost = app.result.errors()
    assert all(op.error in {"AdminShutdown", "OperationalError", "ConnectionTimeout"} for op in lost), lost
    assert_invariants(db, before, app.result)
    figures(
        f"restart after {partial} pointers (whole batches only), {total} nulled and audited after convergence; "
        f"{app.result.summary()} (errors are the app's sessions cut by the restarts)"
    )


def test_an_unreachable_database_is_refused_with_one_clear_message_that_does_not_contain_the_password(
    db, restartable, monkeypatch, airflow_home, caplog
) -> None:
    from fk_maintenance.airflow.tasks import run_task
    from fk_maintenance.errors import TargetUnreachable

    def refusal(connection: dict) -> str:
        monkeypatch.setenv("AIRFLOW_CONN_KPI_DB", json.dumps({"conn_type": "postgres", **connection}))
        with pytest.raises(TargetUnreachable) as caught:
            run_task("preflight", VISION_KPIS_PARENT_FK, "kpi_db", {"params": {"dry_run": True}})
        return str(caught.value)

    closed_port = refusal({"host": "127.0.0.1", "port": 1, "login": "app", "password": "s3cret-pw", "schema": "kpis"})
    assert closed_port.startswith(
        "cannot connect to the target database (Airflow connection 'kpi_db', app@127.0.0.1:1/kpis)"
    )
    assert len(closed_port.splitlines()) == 1

    hba = restartable.data_dir / "pg_hba.conf"
    original = hba.read_text()
    db.execute("DROP ROLE IF EXISTS kpi_pw")
    db.execute("CREATE ROLE kpi_pw LOGIN PASSWORD 'the-right-one'")
    hba.write_text("local all kpi_pw scram-sha-256\n" + original)
    db.execute("SELECT pg_reload_conf()")
    try:
        host = psycopg.conninfo.conninfo_to_dict(db.dsn)["host"]
        wrong_password = refusal({"host": host, "login": "kpi_pw", "password": "wr0ng-s3cret", "schema": db.name})
    finally:
        hba.write_text(original)
        db.execute("SELECT pg_reload_conf()")
    assert 'password authentication failed for user "kpi_pw"' in wrong_password
    for secret in ("s3cret-pw", "wr0ng-s3cret"):
        assert secret not in closed_port + wrong_password and secret not in caplog.text


STEP_IN_SUBPROCESS = """
import sys
sys.path[:0] = [{plugins!r}, {repo!r}]
import psycopg
from fk_maintenance.keys.spec import VISION_KPIS_PARENT_FK as spec
from fk_maintenance.keys.settings import RunSettings
from fk_maintenance.steps.orphans import null_orphans
from fk_maintenance.steps.index import create_index_concurrently
settings = RunSettings(batch_size=50)
with psycopg.connect({dsn!r}, autocommit=True) as conn:
    if sys.argv[1] == "null":
        null_orphans(conn, spec, settings, "run-1")
    else:
        create_index_concurrently(conn, spec, settings)
"""


def _spawn_step(db, which: str) -> subprocess.Popen:
    code = STEP_IN_SUBPROCESS.format(plugins=str(REPO / "plugins"), repo=str(REPO), dsn=db.dsn)
    return subprocess.Popen([sys.executable, "-c", code, which], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _our_backends(db) -> int:
    return db.scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'kpi-fk-maintenance:%%'")


def test_worker_killed_mid_batch_and_mid_index_build_then_the_next_run_converges(db, spec, figures) -> None:
    db.build(ROWS)
    db.execute(SLOW_BATCHES)
    before = capture(db)
    with AppWorkload(db.dsn) as app:
        worker = _spawn_step(db, "null")
        wait_for(
            lambda: (
                db.scalar("SELECT to_regclass('fk_maintenance.vision_kpis_orphan_audit') IS NOT NULL")
                and db.scalar("SELECT count(*) FROM fk_maintenance.vision_kpis_orphan_audit")
            ),
            timeout=60,
        )
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
        # client_connection_check_interval makes the server notice the dead worker and roll back its batch.
        started = time.monotonic()
        wait_for(lambda: _our_backends(db) == 0, timeout=20)
        noticed = time.monotonic() - started
        partial = _audit_matches_nulled(db, before)

        blocker = hold_row_lock(db)
        worker = _spawn_step(db, "index")
        wait_for(lambda: db.query("SELECT pid FROM pg_stat_progress_create_index"), timeout=30)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
        wait_for(lambda: _our_backends(db) == 0, timeout=20)
        blocker.rollback()
        blocker.close()
        db.execute("DROP TRIGGER slow_pointer_update ON vision_kpis")
        results = run_pipeline(db.connect, spec, SETTINGS, "run-1")
    assert results["create_index_concurrently"]["action"] == "rebuilt (dropped INVALID leftover)"
    assert results["post_checks"]["failed"] == 0
    assert app.result.errors() == []
    assert_invariants(db, before, app.result)
    figures(
        f"worker killed after {partial} pointers; server dropped its session {noticed:.1f} s later; "
        f"{app.result.summary()}"
    )


def test_a_statement_timeout_or_cancel_in_the_re_sweep_is_its_own_error_not_the_window_ending(db, spec) -> None:
    db.build(2000)
    with db.connect() as conn:
        null_orphans(conn, spec, SETTINGS, "run-1")
        create_index_concurrently(conn, spec, SETTINGS)
    db.execute(
        "INSERT INTO vision_kpis (user_id, vision_id, level, title, parent_kpi_id) "
        "SELECT gen_random_uuid(), gen_random_uuid(), 'daily', 'late', gen_random_uuid() FROM generate_series(1, 3)"
    )
    with db.connect() as conn:
        add_fk_not_valid(conn, spec, SETTINGS)
    db.execute(SLOW_BATCHES.replace("pg_sleep(0.01)", "pg_sleep(30)"))
    with db.connect() as conn:
        thread, outcome = in_thread(
            validate_fk, conn, spec, SETTINGS, "run-1", run_started_at=datetime.now(UTC), sleep=lambda _: None
        )
        sweeper = wait_for(
            lambda: db.query(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'kpi-fk-maintenance:validate_fk re-sweep' "
                "AND state = 'active' AND query LIKE '%%UPDATE%%'"
            )
        )[0][0]
        db.execute("SELECT pg_cancel_backend(%s)", [sweeper])
        thread.join(timeout=30)
    assert isinstance(outcome.get("error"), psycopg.errors.QueryCanceled), outcome  # not a "reschedule"
    assert db.scalar("SELECT convalidated FROM pg_constraint WHERE conname = %s", [spec.constraint]) is False


def _burn_transaction_ids(db, count: int) -> None:
    db.execute(
        "CREATE OR REPLACE PROCEDURE burn_xids(n int) LANGUAGE plpgsql AS "
        "$$ BEGIN FOR i IN 1..n LOOP PERFORM pg_current_xact_id(); COMMIT; END LOOP; END $$"
    )
    with db.connect() as conn:
        conn.execute("SET synchronous_commit = off")
        conn.execute("CALL burn_xids(%s)", [count])


def _make_next_wraparound_vacuum_slow(db, table: str) -> None:
    # 100 000 is the lowest freeze age a table accepts: an anti-wraparound vacuum starts once that many
    # transactions have passed; the cost settings make it take seconds, so it can be seen running.
    db.execute(
        f"ALTER TABLE {table} SET (autovacuum_freeze_max_age = 100000, autovacuum_vacuum_cost_delay = 100, "
        "autovacuum_vacuum_cost_limit = 1)"
    )


def test_only_an_anti_wraparound_vacuum_of_the_target_table_itself_holds_validation_back(db, pg_server) -> None:
    from psycopg import sql

    from devkit.app_db import create_app_table, populate
    from fk_maintenance.db.catalog import require_target
    from fk_maintenance.steps.constraint import validation_gate

    quoted = ForeignKeySpec(
        schema="App Data",
        table='Vision "KPIs"',
        columns="parent_kpi_id",
        ref_table='Vision "KPIs"',
        ref_columns="id",
        row_key="id",
        constraint="vision_parent_fkey",
        index="vision_parent_idx",
        audit_table='Vision "KPIs" audit',
    )
    with db.connect() as conn:
        create_app_table(conn, schema=quoted.schema, table=quoted.table)
        populate(conn, 5000, schema=quoted.schema, table=quoted.table)
        null_orphans(conn, quoted, SETTINGS, "run-1")
        target = sql.Identifier(quoted.schema, quoted.table).as_string(conn)
        # The app's archive beside it: its name starts with the target's, its vacuum is no reason to wait.
        neighbour = sql.Identifier(quoted.schema, f"{quoted.table} archive").as_string(conn)
    db.execute(f"CREATE TABLE {neighbour} AS SELECT * FROM {target}")
    now = datetime.now(UTC)

    def gate() -> Any:
        with db.connect() as conn:
            relid = require_target(conn, quoted).table.oid
            return validation_gate(conn, quoted, SETTINGS, relids=[relid], now=now, run_started_at=now)

    def vacuuming(relation: str) -> bool:
        return bool(
            db.scalar(
                "SELECT count(*) FROM pg_stat_progress_vacuum v JOIN pg_stat_activity a USING (pid) "
                "WHERE v.relid = %s::regclass AND a.query LIKE '%%to prevent wraparound%%'",
                [relation],
            )
        )

    pg_server_admin = psycopg.connect(pg_server.admin_dsn, autocommit=True)
    pg_server_admin.execute("ALTER SYSTEM SET autovacuum_naptime = 1")
    pg_server_admin.execute("SELECT pg_reload_conf()")
    try:
        _make_next_wraparound_vacuum_slow(db, neighbour)
        _burn_transaction_ids(db, 101_000)
        wait_for(lambda: vacuuming(neighbour), timeout=30)
        beside = gate()
        _make_next_wraparound_vacuum_slow(db, target)
        _burn_transaction_ids(db, 101_000)
        wait_for(lambda: vacuuming(target), timeout=30)
        on_target = gate()
    finally:
        pg_server_admin.execute("ALTER SYSTEM RESET autovacuum_naptime")
        pg_server_admin.execute("SELECT pg_reload_conf()")
        pg_server_admin.close()
    assert beside.run_now, beside.reason
    assert not on_target.run_now
    assert on_target.reason.startswith('an anti-wraparound autovacuum runs on App Data.Vision "KPIs" (pid ')


def test_under_a_lock_held_90_percent_of_the_time_the_constraint_lands_in_the_first_attempt(db, spec, figures) -> None:
    from devkit.workload import HotRowLock

    db.build(ROWS, orphan_ratio=0)
    settings = replace(SETTINGS, lock_timeout_ms=1000, lock_attempts=3)
    with AppWorkload(db.dsn) as app, HotRowLock(db.dsn, hold_s=0.9, period_s=1.0) as hot:
        time.sleep(0.5)
        with db.connect() as conn:
            result = add_fk_not_valid(conn, spec, settings)
        time.sleep(0.3)
    measured = app.result
    assert result["action"] == "added NOT VALID"
    assert result["attempts"] == 1 and result["struck_in_gap"] == 1 and result["lock_timeouts"] == 0
    assert result["seconds"] < 3  # within one lock cycle (and the time to see it), not Airflow's retry delays
    assert hot.cycles >= 1 and measured.errors() == []
    assert worst_write_ms(measured) <= settings.lock_timeout_ms + MARGIN_MS
    figures(
        f"hot row lock 0.9 s of every 1.0 s: added in {result['seconds']} s, attempt 1, after watching "
        f"{result['watched_seconds']} s; {measured.summary()}"
    )
