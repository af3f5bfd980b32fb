"""Environment for a throw-away Airflow (SQLite metadata) that loads this project's dags and plugins."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DAG_ID = "vision_kpis_parent_fk"


def airflow_env(home: Path, kpi_db_json: str | None = None) -> dict[str, str]:
    env = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        # Waiting fleet targets look for their turn every 2 s instead of 30: runs of a few seconds per target.
        "FK_MAINTENANCE_TURN_POKE_SECONDS": "2",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "plugins"), os.environ.get("PYTHONPATH")])),
    }
    if kpi_db_json is not None:
        env["AIRFLOW_CONN_KPI_DB"] = kpi_db_json
    return env


def airflow_cli(
    home: Path,
    *args: str,
    kpi_db_json: str | None = None,
    log_path: Path | None = None,
    check: bool = True,
    nice: int = 0,
    connections: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``airflow <args>`` in a throw-away home; ``connections`` adds Airflow connections by id (JSON values)."""
    env = {**os.environ, **airflow_env(home, kpi_db_json)}
    env.update({f"AIRFLOW_CONN_{conn_id.upper()}": value for conn_id, value in (connections or {}).items()})
    airflow = Path(sys.executable).with_name("airflow")
    prefix = ["nice", "-n", str(nice)] if nice else []
    result = subprocess.run([*prefix, str(airflow), *args], env=env, capture_output=True, text=True)
    if log_path is not None:
        log_path.write_text(result.stdout + result.stderr)
    if check and result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-60:])
        raise RuntimeError(f"airflow {' '.join(args)} failed with exit code {result.returncode}:\n{tail}")
    return result


def migrate(home: Path) -> None:
    home.mkdir(parents=True, exist_ok=True)
    airflow_cli(home, "db", "migrate")


def latest_xcom(home: Path, task_id: str, key: str = "return_value", dag_id: str = DAG_ID) -> Any:
    """The newest XCom of a task of our DAG (or ``dag_id``), read from the SQLite metadata database."""
    with sqlite3.connect(home / "airflow.db") as db:
        row = db.execute(
            "SELECT value FROM xcom WHERE dag_id = ? AND task_id = ? AND key = ? ORDER BY timestamp DESC LIMIT 1",
            (dag_id, task_id, key),
        ).fetchone()
    if row is None:
        return None
    value = json.loads(row[0])
    return json.loads(value) if isinstance(value, str) else value
