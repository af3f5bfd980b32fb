"""Restore: putting back the pointers a run nulled, in batches, each one recorded; from the library and from the
restore DAG's form over several databases."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import psycopg
import pytest

from devkit.db_state import revive_parent, snapshot
from devkit.pipeline import run_pipeline
from fk_maintenance.keys.settings import SETTING_DEFS, RunSettings
from fk_maintenance.records.restore import restore_run

REPO = Path(__file__).resolve().parents[1]
NOW = RunSettings(validate_now=True)
AUDIT = "fk_maintenance.vision_kpis_orphan_audit"


def _nulled_by(db, run_id: str) -> list[tuple]:
    return db.query(f"SELECT kpi_id, old_parent_kpi_id FROM {AUDIT} WHERE run_id = %s ORDER BY kpi_id", [run_id])


def _converged_with_revived_parents(db, spec, run_id: str = "run-1") -> tuple[list[tuple], set]:
    """A converged database whose run nulled pointers, with some of the missing parents created again."""
    db.build(3000, orphan_ratio=0.03)
    run_pipeline(db.connect, spec, NOW, run_id)
    audit = _nulled_by(db, run_id)
    revived = sorted({parent for _, parent in audit})[::2]
    for parent in revived:
        revive_parent(db, parent)
    return audit, set(revived)


def test_restore_puts_back_in_batches_only_pointers_whose_parent_exists_and_records_each(db, spec) -> None:
    audit, revived = _converged_with_revived_parents(db, spec)
    expected = {kpi: parent for kpi, parent in audit if parent in revived}
    with db.connect() as conn:
        result = restore_run(conn, spec, replace(NOW, batch_size=7), "run-1", "restore-a")
    assert result["audited"] == len(audit) and result["restored"] == len(expected) > 7
    assert result["parent_still_missing"] == len(audit) - len(expected) and result["busy"] == 0
    pointers = dict(db.query("SELECT id, parent_kpi_id FROM vision_kpis"))
    assert {kpi: pointers[kpi] for kpi in expected} == expected
    assert all(pointers[kpi] is None for kpi, parent in audit if parent not in revived)
    log = db.query("SELECT restore_id, audit_table, run_id, row_key, parent FROM fk_maintenance.restore_log")
    assert sorted(log) == sorted(
        ("restore-a", AUDIT, "run-1", str(kpi), str(parent)) for kpi, parent in expected.items()
    )
    # Idempotent: a second restore finds them back already and changes nothing.
    before = snapshot(db, spec)
    with db.connect() as conn:
        again = restore_run(conn, spec, NOW, "run-1", "restore-b")
    assert again["restored"] == 0 and again["already_restored"] == len(expected)
    assert snapshot(db, spec) == before


def test_restore_leaves_the_apps_newer_writes_alone_and_a_dry_run_changes_nothing(db, spec) -> None:
    audit, revived = _converged_with_revived_parents(db, spec)
    restorable = [kpi for kpi, parent in audit if parent in revived]
    repointed, deleted = restorable[0], restorable[1]
    other_parent = db.scalar("SELECT id FROM vision_kpis WHERE parent_kpi_id IS NULL AND level = 'yearly' LIMIT 1")
    db.execute("UPDATE vision_kpis SET parent_kpi_id = %s WHERE id = %s", [other_parent, repointed])
    db.execute("DELETE FROM vision_kpis WHERE id = %s", [deleted])

    before = snapshot(db, spec)
    with db.connect() as conn:
        dry = restore_run(conn, spec, replace(NOW, dry_run=True), "run-1", "restore-dry")
    assert snapshot(db, spec) == before
    assert db.scalar("SELECT to_regclass('fk_maintenance.restore_log')") is None
    assert dry["restored"] == len(restorable) - 2 and dry["repointed_by_app"] == 1 and dry["row_deleted"] == 1

    with db.connect() as conn:
        result = restore_run(conn, spec, NOW, "run-1", "restore-a")
    assert {k: result[k] for k in ("restored", "repointed_by_app", "row_deleted")} == {
        "restored": len(restorable) - 2,
        "repointed_by_app": 1,
        "row_deleted": 1,
    }
    assert db.scalar("SELECT parent_kpi_id FROM vision_kpis WHERE id = %s", [repointed]) == other_parent


def test_restore_leaves_alone_a_row_the_app_made_a_root_or_edited_since_the_run(db, spec) -> None:
    audit, revived = _converged_with_revived_parents(db, spec)
    restorable = [kpi for kpi, parent in audit if parent in revived]
    made_root, edited = restorable[0], restorable[1]
    # The app writes each row after the run: its pointer is NULL as the run left it, but the row is not the
    # version the run wrote, so putting the old parent back would undo the app's own decision.
    db.execute("UPDATE vision_kpis SET parent_kpi_id = NULL WHERE id = %s", [made_root])
    db.execute("UPDATE vision_kpis SET title = 'renamed by its owner' WHERE id = %s", [edited])
    with db.connect() as conn:
        result = restore_run(conn, spec, NOW, "run-1", "restore-a")
    assert result["changed_since"] == 2 and result["restored"] == len(restorable) - 2
    assert db.query("SELECT parent_kpi_id FROM vision_kpis WHERE id = ANY(%s)", [[made_root, edited]]) == [
        (None,),
        (None,),
    ]
    assert (
        db.scalar(
            "SELECT count(*) FROM fk_maintenance.restore_log WHERE row_key = ANY(%s)", [[str(made_root), str(edited)]]
        )
        == 0
    )


def test_a_run_nulled_before_transactions_were_recorded_is_restored_where_still_parentless(db, spec) -> None:
    audit, revived = _converged_with_revived_parents(db, spec)
    db.execute("DELETE FROM fk_maintenance.nulling_transactions")  # as an earlier version left it
    with db.connect() as conn:
        result = restore_run(conn, spec, NOW, "run-1", "restore-a")
    assert result["restored"] == sum(parent in revived for _, parent in audit) and result["changed_since"] == 0


def test_a_role_with_only_row_privileges_on_the_pipelines_tables_restores(db, spec) -> None:
    """The DBA made the pipeline's schema and tables and granted rows, not CREATE or ownership: restore needs no
    more (it creates and comments only what is missing)."""
    db.build(3000, orphan_ratio=0.03)
    run_pipeline(db.connect, spec, NOW, "run-1")
    with db.connect() as conn:  # no parent is back yet: this restore puts nothing back, but makes the log
        assert restore_run(conn, spec, NOW, "run-1", "make-the-log")["restored"] == 0
    audit = _nulled_by(db, "run-1")
    revived = set(sorted({parent for _, parent in audit})[::2])
    for parent in revived:
        revive_parent(db, parent)
    db.execute(
        "DO $$ BEGIN IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'kpi_restorer') THEN "
        "EXECUTE 'DROP OWNED BY kpi_restorer'; DROP ROLE kpi_restorer; END IF; END $$;"
        "CREATE ROLE kpi_restorer LOGIN; GRANT USAGE ON SCHEMA fk_maintenance TO kpi_restorer;"
        "REVOKE CREATE ON SCHEMA fk_maintenance FROM PUBLIC;"
        "GRANT SELECT, UPDATE ON vision_kpis TO kpi_restorer;"
        "GRANT SELECT, INSERT, UPDATE ON fk_maintenance.vision_kpis_orphan_audit TO kpi_restorer;"
        "GRANT SELECT ON fk_maintenance.nulling_transactions TO kpi_restorer;"
        "GRANT SELECT, INSERT ON fk_maintenance.restore_log TO kpi_restorer"
    )
    with psycopg.connect(db.dsn, user="kpi_restorer", autocommit=True) as conn:
        result = restore_run(conn, spec, NOW, "run-1", "restore-a")
    assert result["restored"] == sum(parent in revived for _, parent in audit) > 0


def test_restore_skips_a_row_the_app_holds_without_waiting_and_a_second_restore_puts_it_back(db, spec) -> None:
    audit, revived = _converged_with_revived_parents(db, spec)
    held = next(kpi for kpi, parent in audit if parent in revived)
    app = db.connect()
    app.autocommit = False
    app.execute("UPDATE vision_kpis SET title = title WHERE id = %s", [held])
    try:
        # SKIP LOCKED: the batch neither waits for the app's row nor times out on it (that would raise).
        with db.connect() as conn:
            result = restore_run(conn, spec, NOW, "run-1", "restore-a")
        assert result["busy"] == 1 and result["still_missing"] == result["parent_still_missing"] + 1
    finally:
        app.rollback()
        app.close()
    assert db.scalar("SELECT parent_kpi_id FROM vision_kpis WHERE id = %s", [held]) is None
    with db.connect() as conn:
        assert restore_run(conn, spec, NOW, "run-1", "restore-b")["restored"] == 1


def test_restore_refuses_an_empty_run_id(db, spec) -> None:
    from fk_maintenance.errors import InvalidSettings

    db.build(100)
    with db.connect() as conn, pytest.raises(InvalidSettings, match="run_id is empty"):
        restore_run(conn, spec, NOW, " ", "restore-a")


def test_restore_of_a_run_id_the_audit_does_not_hold_is_refused_and_writes_nothing(db, spec) -> None:
    from fk_maintenance.errors import InvalidSettings

    db.build(1000)
    before = snapshot(db, spec)
    for settings in (NOW, replace(NOW, dry_run=True)):
        with db.connect() as conn, pytest.raises(InvalidSettings, match="holds no pointer of run 'typo'"):
            restore_run(conn, spec, settings, "typo", "restore-a")
    assert snapshot(db, spec) == before
    assert db.scalar("SELECT count(*) FROM pg_namespace WHERE nspname = 'fk_maintenance'") == 0


# The restore DAG ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def restore_dag(airflow_home):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    return bag.dags["vision_kpis_parent_fk_restore"]


def test_the_restore_dag_form_needs_a_run_id_and_offers_the_declared_connections(restore_dag) -> None:
    from airflow.sdk.exceptions import ParamValidationError

    params = restore_dag.params
    assert set(params.keys()) == {"run_id", "conn_ids", "dry_run", "batch_size", "batch_pause_ms"} | {
        "lock_timeout_ms",
        "lock_attempts",
    }
    assert params.get_param("conn_ids").value == ["kpi_db"]
    with pytest.raises(ParamValidationError):
        params.get_param("run_id").resolve(value="")
    assert restore_dag.schedule is None or str(restore_dag.timetable.summary) in ("None", "")


def test_a_restore_run_from_the_dag_puts_back_what_the_audit_holds_on_every_target(
    restore_dag, db, pg_server, spec, airflow_home, monkeypatch
) -> None:
    from conftest import TestDatabase

    from devkit.airflow_env import latest_xcom

    second = TestDatabase(pg_server, pg_server.create_database())
    try:
        expected = {}
        for conn_id, database in (("restore_a", db), ("restore_b", second)):
            audit, revived = _converged_with_revived_parents(database, spec, "nightly-1")
            expected[conn_id] = {kpi: parent for kpi, parent in audit if parent in revived}
            monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", pg_server.airflow_connection_json(database.name))
        defaults = {d.name: d.default for d in SETTING_DEFS if d.name in restore_dag.params}
        conf = defaults | {"run_id": "nightly-1", "conn_ids": ["restore_a", "restore_b"], "batch_size": 10}
        run = restore_dag.test(run_conf=conf)
        assert str(run.state) == "success"
        report = latest_xcom(airflow_home, "restore_report", key="report", dag_id=restore_dag.dag_id)
        assert [t["conn_id"] for t in report["targets"]] == ["restore_a", "restore_b"]
        assert report["restored"] == sum(len(e) for e in expected.values()) and report["failed"] == []
        for conn_id, database in (("restore_a", db), ("restore_b", second)):
            pointers = dict(database.query("SELECT id, parent_kpi_id FROM vision_kpis"))
            assert {kpi: pointers[kpi] for kpi in expected[conn_id]} == expected[conn_id]
            assert database.scalar("SELECT count(DISTINCT restore_id) FROM fk_maintenance.restore_log") == 1
    finally:
        pg_server.drop_database(second.name)
