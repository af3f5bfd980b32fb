"""The app's own schema tool agrees with what the pipeline leaves behind: the real drizzle-kit (installed from
app/package-lock.json by the test set-up) against real databases, with the app files the project ships."""

from __future__ import annotations

import psycopg
import pytest

from devkit.app_db import populate
from devkit.db_state import snapshot
from devkit.drizzle import app_copy, drizzle_kit
from devkit.pipeline import run_pipeline
from fk_maintenance.db.catalog import inspect_target
from fk_maintenance.keys.settings import RunSettings

NOW = RunSettings(validate_now=True)


def _ok(result) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def _our_objects(db) -> dict[str, object]:
    return {
        "constraint": db.query(
            "SELECT oid, convalidated, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conname = 'vision_kpis_parent_kpi_id_fkey'"
        ),
        "index": db.query(
            "SELECT indexrelid, indisvalid FROM pg_index WHERE indexrelid = 'vision_kpis_parent_kpi_idx'::regclass"
        ),
        "audit": db.query(
            "SELECT run_id, kpi_id, old_parent_kpi_id FROM fk_maintenance.vision_kpis_orphan_audit ORDER BY 2"
        ),
    }


@pytest.fixture
def converged(db, spec, node_modules, tmp_path):
    """The app's table made by `drizzle-kit push` of its schema before the pipeline, orphans, a converged run."""
    before = app_copy(node_modules, tmp_path / "before", before_pipeline=True)
    _ok(drizzle_kit(before, db.dsn, "push", "--force"))
    assert db.scalar("SELECT count(*) FROM pg_constraint WHERE conname = 'vision_kpis_parent_kpi_id_fkey'") == 0
    with db.connect() as conn:
        generated = populate(conn, 3000, orphan_ratio=0.05)
    results = run_pipeline(db.connect, spec, NOW, "run-1")
    assert results["report"]["final_state"] == "converged"
    assert results["null_orphans"]["audited"] == generated.orphans > 0
    return app_copy(node_modules, tmp_path / "app")


def test_after_a_run_drizzle_kit_push_of_the_shipped_schema_sees_no_changes_and_drops_nothing(
    db, spec, converged
) -> None:
    before = snapshot(db, spec), _our_objects(db)
    output = _ok(drizzle_kit(converged, db.dsn, "push", "--verbose"))
    assert "No changes detected" in output
    assert "DROP" not in output.upper() and "data loss" not in output.lower()
    assert (snapshot(db, spec), _our_objects(db)) == before  # the audit trail is intact


def test_drizzle_kit_migrate_on_a_converged_database_changes_nothing_and_waits_on_no_app_write(
    db, spec, converged
) -> None:
    before = snapshot(db, spec), _our_objects(db)
    with db.connect() as app:
        app.autocommit = False
        # An app write in flight: any lock that blocks writes would make the migration wait, then fail on its
        # 2 s lock_timeout.
        app.execute("UPDATE vision_kpis SET title = title WHERE id = (SELECT id FROM vision_kpis LIMIT 1)")
        output = _ok(drizzle_kit(converged, db.dsn, "migrate"))
        app.rollback()
    assert "migrations applied successfully" in output
    assert db.scalar("SELECT count(*) FROM drizzle.__drizzle_migrations") == 2
    assert (snapshot(db, spec), _our_objects(db)) == before  # same oids, still validated, audit intact


def test_drizzle_kit_migrate_on_an_empty_database_creates_the_key_and_index_with_the_pipelines_names(
    db, spec, node_modules, tmp_path
) -> None:
    app = app_copy(node_modules, tmp_path / "app")
    _ok(drizzle_kit(app, db.dsn, "migrate"))
    with db.connect() as conn:
        state = inspect_target(conn, spec)
    assert state.problems == []
    assert state.constraint.exists and state.constraint.matches and state.constraint.validated
    assert state.index.exists and state.index.matches and state.index.valid
    results = run_pipeline(db.connect, spec, NOW, "after-migrate")  # the pipeline finds nothing to do
    assert results["create_index_concurrently"]["action"] == "none (already valid)"
    assert results["add_fk_not_valid"]["action"] == "none (already exists)"
    assert results["validate_fk"]["outcome"] == "already validated"


def test_the_migration_refuses_a_large_table_the_pipeline_has_not_converged_and_changes_nothing(
    db, spec, node_modules, tmp_path
) -> None:
    _ok(drizzle_kit(app_copy(node_modules, tmp_path / "before", before_pipeline=True), db.dsn, "push", "--force"))
    with db.connect() as conn:
        populate(conn, 12_000, orphan_ratio=0.01)
    before = snapshot(db, spec)
    app = app_copy(node_modules, tmp_path / "app")
    assert drizzle_kit(app, db.dsn, "migrate").returncode != 0
    assert snapshot(db, spec) == before
    # drizzle-kit 0.31 does not print the server's error; the same statements in one transaction, as its
    # migrator runs them, show the message the operator finds in the server log.
    (migration,) = (app / "drizzle" / "migrations").glob("*_add_parent_kpi_fk.sql")
    with db.connect() as conn, pytest.raises(psycopg.errors.RaiseException) as refused, conn.transaction():
        for statement in migration.read_text().split("--> statement-breakpoint"):
            conn.execute(statement)
    assert "Run the kpi-fk-maintenance pipeline" in refused.value.diag.message_hint
    assert snapshot(db, spec) == before


def test_drizzle_kit_generate_with_the_shipped_schema_finds_nothing_to_migrate(node_modules, tmp_path) -> None:
    app = app_copy(node_modules, tmp_path / "app")
    migrations = sorted(p.name for p in (app / "drizzle" / "migrations").rglob("*"))
    output = _ok(drizzle_kit(app, "dbname=unused", "generate"))
    assert "No schema changes, nothing to migrate" in output
    assert sorted(p.name for p in (app / "drizzle" / "migrations").rglob("*")) == migrations
