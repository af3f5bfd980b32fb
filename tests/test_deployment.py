"""docker-compose.yml and its image: validated with Debian's docker-compose (no Docker engine runs here) and
checked against the project's own versions, mounts and connection; the demo kpi-db's init SQL is run for real."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from devkit.pipeline import run_pipeline
from fk_maintenance.keys.settings import RunSettings

REPO = Path(__file__).resolve().parents[1]
AIRFLOW_SERVICES = {"airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"}


def _pinned(package: str) -> str:
    match = re.search(rf"^{re.escape(package)}==(\S+)$", (REPO / "requirements.txt").read_text(), re.MULTILINE)
    assert match, f"{package} is not pinned in requirements.txt"
    return match.group(1)


def _bind_mount(volume: str | dict) -> tuple[Path | str, str]:
    """(source, target) of a volume, in either the short ("src:dst:mode") or the long syntax."""
    if isinstance(volume, dict):
        return Path(volume["source"]).resolve() if volume["type"] == "bind" else volume["source"], volume["target"]
    source, target = volume.split(":")[:2]
    return (Path(source).resolve() if source.startswith("/") else source), target


@pytest.fixture(scope="module")
def compose() -> dict:
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is missing: scripts/system-deps.sh installs Debian's docker-compose as root")
    result = subprocess.run(
        ["docker-compose", "--profile", "demo", "config"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_file_is_valid_and_has_every_airflow_component(compose) -> None:
    services = set(compose["services"])
    assert AIRFLOW_SERVICES | {"postgres", "kpi-db", "airflow-init"} <= services
    for name in AIRFLOW_SERVICES | {"postgres", "kpi-db"}:
        assert "healthcheck" in compose["services"][name], f"{name} has no health check"


def test_airflow_init_creates_the_pool_every_target_task_runs_in(compose) -> None:
    from fk_maintenance.airflow.fleet import POOL

    command = " ".join(compose["services"]["airflow-init"]["command"])
    assert re.search(rf"airflow db migrate && airflow pools set {POOL} \S+ ", command), command


def test_airflow_services_use_the_project_image_mounts_and_connection(compose) -> None:
    for name in AIRFLOW_SERVICES | {"airflow-init"}:
        service = compose["services"][name]
        assert service["build"]["dockerfile"] == "Dockerfile"
        env = service["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
        assert env["AIRFLOW_CONN_KPI_DB"].startswith("postgresql://")
        assert "@kpi-db:5432/" in env["AIRFLOW_CONN_KPI_DB"]
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql")
        mounts = {_bind_mount(volume) for volume in service["volumes"]}
        assert (REPO / "dags", "/opt/airflow/dags") in mounts, f"{name} does not mount dags/"
        # The library comes from the image's installed package, never from a mounted copy that could differ.
        assert not {target for _, target in mounts} & {"/opt/airflow/plugins", "/opt/airflow/sql"}


def test_the_image_is_airflow_of_the_pinned_version_with_the_pinned_requirements() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f"FROM apache/airflow:{_pinned('apache-airflow')}" in dockerfile
    assert "pip install --no-cache-dir -r /opt/airflow/requirements.txt" in dockerfile
    assert "pip install --no-cache-dir --no-deps /opt/fk-maintenance" in dockerfile
    for source in ("pyproject.toml", "plugins/fk_maintenance", "sql"):
        assert f"COPY --chown=airflow:root {source} " in dockerfile
    assert "_PIP_ADDITIONAL_REQUIREMENTS" not in (REPO / "docker-compose.yml").read_text()


def test_the_demo_database_init_sql_makes_a_table_the_pipeline_converges(db, spec) -> None:
    db.execute((REPO / "deploy" / "kpi-db-init.sql").read_text())
    rows, orphans = db.query(
        "SELECT count(*), count(*) FILTER (WHERE c.parent_kpi_id IS NOT NULL AND NOT EXISTS "
        "(SELECT 1 FROM vision_kpis p WHERE p.id = c.parent_kpi_id)) FROM vision_kpis c"
    )[0]
    assert rows == 100_254
    assert 0.006 < orphans / rows < 0.012
    results = run_pipeline(db.connect, spec, RunSettings(validate_now=True), "compose-demo")
    assert results["null_orphans"]["nulled"] == orphans
    assert results["report"]["final_state"] == "converged"
