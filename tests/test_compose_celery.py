"""docker-compose.yml's `celery` profile, validated with Debian's docker-compose (no Docker engine runs here): the
broker and the workers, and the executor every Airflow service gets from AIRFLOW_EXECUTOR."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
AIRFLOW_SERVICES = {"airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"}


def _config(*profiles: str, **env: str) -> dict:
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is missing: scripts/system-deps.sh installs Debian's docker-compose as root")
    args = [arg for profile in profiles for arg in ("--profile", profile)]
    result = subprocess.run(
        ["docker-compose", *args, "config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **env},
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_the_celery_profile_adds_a_broker_and_workers_and_every_airflow_service_runs_the_celery_executor() -> None:
    compose = _config("celery", "demo", AIRFLOW_EXECUTOR="CeleryExecutor")
    services = compose["services"]
    assert {"redis", "airflow-worker"} | AIRFLOW_SERVICES <= set(services)
    assert services["airflow-worker"]["command"] in ("celery worker", ["celery", "worker"])
    for name in ("redis", "airflow-worker"):
        assert "healthcheck" in services[name], f"{name} has no health check"
    for name in AIRFLOW_SERVICES | {"airflow-worker", "airflow-init"}:
        env = services[name]["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert env["AIRFLOW__CELERY__BROKER_URL"] == "redis://:@redis:6379/0"
        assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql://")
    assert {"redis", "airflow-apiserver"} <= set(services["airflow-worker"]["depends_on"])


def test_the_broker_and_workers_run_only_with_the_profile_and_the_executor_stays_local_without_it() -> None:
    services = _config()["services"]
    assert services["redis"]["profiles"] == services["airflow-worker"]["profiles"] == ["celery"]
    assert {services[name]["environment"]["AIRFLOW__CORE__EXECUTOR"] for name in AIRFLOW_SERVICES} == {"LocalExecutor"}
