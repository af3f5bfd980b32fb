"""The DAG integrity checks a deployment imports into its own CI (fk_maintenance.airflow.integrity), and the command's
``--conn-id``, which resolves an Airflow connection through the DAG's own PostgresHook (so it runs here, where
Airflow is installed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from devkit.airflow_env import airflow_env
from fk_maintenance.airflow.integrity import assert_dag_integrity, check_dag_integrity

REPO = Path(__file__).resolve().parents[1]
DAG_FILE = REPO / "dags" / "foreign_key_dags.py"
TARGETS = REPO / "dags" / "targets.yaml"


def test_the_shipped_dag_file_passes_the_integrity_checks_in_one_line() -> None:
    report = assert_dag_integrity(DAG_FILE, TARGETS)
    assert report.dag_ids == ["vision_kpis_parent_fk", "vision_kpis_parent_fk_restore"]
    assert report.database_connections_during_parse == 0
    assert report.parse_seconds is not None


def test_a_dag_file_that_connects_at_parse_time_drops_a_dag_or_rewires_a_step_fails_with_every_problem(
    tmp_path,
) -> None:
    second_key = (
        TARGETS.read_text()
        + "\n".join(
            [
                "  - name: goals_parent_fk",
                "    table: goals",
                "    column: parent_id",
                "    ref_table: goals",
                "    ref_column: id",
                "    constraint: goals_parent_id_fkey",
                "    index: goals_parent_id_idx",
                "    audit_table: goals_orphan_audit",
                "    conn_ids: [goals_db]",
            ]
        )
        + "\n"
    )
    targets = tmp_path / "targets.yaml"
    targets.write_text(second_key)  # a second key: its two DAGs are checked too

    source = DAG_FILE.read_text()
    broken = source.replace("for build in (build_dag, build_restore_dag)]", "for build in (build_dag,)]")
    broken = broken.replace("tasks[upstream] >> tasks[step.name]", "tasks[STEPS[0].name] >> tasks[step.name]")
    assert broken.count("build_dag,)]") == 1 and "tasks[STEPS[0].name] >> tasks[step.name]" in broken
    broken += (
        "\nimport psycopg\n"
        "try:\n"
        "    psycopg.connect('dbname=goals connect_timeout=3')  # libpq's defaults: PGHOST, PGPORT\n"
        "except psycopg.Error:\n"
        "    pass\n"
    )
    dag_file = tmp_path / "dags" / "foreign_key_dags.py"
    dag_file.parent.mkdir()
    dag_file.write_text(broken)
    report = check_dag_integrity(dag_file, targets, max_parse_seconds=0.0)
    text = str(report)
    assert not report.ok
    assert report.database_connections_during_parse >= 1 and "database connection(s)" in text
    assert "DAG vision_kpis_parent_fk_restore is missing" in text and "DAG goals_parent_fk_restore is missing" in text
    for key in ("vision_kpis_parent_fk", "goals_parent_fk"):
        assert f"DAG {key} differs from the contract's graph: edges missing [" in text
    assert "('canary.detect_orphans', 'canary.null_orphans')" in text  # an edge of the contract that is missing
    assert "more than the allowed 0.0 s" in text

    dag_file.write_text(source + "\nraise RuntimeError('a typo in the DAG file')\n")
    report = check_dag_integrity(dag_file, TARGETS)
    assert any("import error" in p and "a typo in the DAG file" in p for p in report.problems), report.problems


def test_plan_and_run_on_an_airflow_connection_go_through_the_dags_postgres_hook(db, spec, tmp_path) -> None:
    generated = db.build(500, orphan_ratio=0.05)
    env = {
        **os.environ,
        **airflow_env(tmp_path / "airflow", db.server.airflow_connection_json(db.name)),
        "AIRFLOW_CONN_KPI_DOWN": '{"conn_type": "postgres", "host": "127.0.0.1", "port": 1, "login": "app", '
        '"password": "s3cret-pw"}',
    }

    def command(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fk_maintenance", *args, "--targets", str(TARGETS)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    planned = command("plan", "--conn-id", "kpi_db")
    assert planned.returncode == 0, planned.stdout + planned.stderr
    assert "on Airflow connection 'kpi_db': would converge" in planned.stdout
    down = command("plan", "--conn-id", "kpi_down")
    assert down.returncode == 2
    assert "cannot connect to the target database (Airflow connection 'kpi_down'" in down.stdout + down.stderr
    assert "s3cret-pw" not in down.stdout + down.stderr
    ran = command("run", "--conn-id", "kpi_db", "--key", "vision_kpis_parent_fk", "--set", "validate_now=true")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert f"Pointers nulled and audited: {generated.orphans} " in ran.stdout
