"""A fleet run under a real scheduler, through Airflow's REST API: trigger it, sample which target databases have
a session of the pipeline while it runs, wait for its end, and read back its task instances and the scheduler's
"state mismatch" events (what apache/airflow#71172 leaves behind). Used by the scheduler tests and bench/fleet.py.
"""

from __future__ import annotations

import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from psycopg.conninfo import conninfo_to_dict

from devkit.db_state import SessionWatch

DAG_ID = "vision_kpis_parent_fk"
FINAL = ("success", "failed")


class Api(Protocol):
    def api(self, path: str, body: dict | None = None) -> dict: ...


class FleetAirflow(Api, Protocol):
    """A local Airflow with the canary's database and its fleet's (devkit.local_airflow, devkit.celery_airflow)."""

    kpi_dsn: str
    fleet_dsns: dict[str, str]


@dataclass
class FleetRun:
    run_id: str
    state: str
    wall_s: float
    samples: list[frozenset[str]]
    task_instances: list[dict[str, Any]] = field(default_factory=list)
    state_mismatches: int = 0

    @property
    def most_at_once(self) -> int:
        return max((len(sample) for sample in self.samples), default=0)

    @property
    def most_targets_in_flight(self) -> int:
        """The most fleet targets between their first step's start and their report's end at one moment, from
        the task instances' own start and end times."""
        spans: dict[int, tuple[datetime, datetime]] = {}
        for ti in self.task_instances:
            if not ti["task_id"].startswith("fleet.") or ti["task_id"] == "fleet.wait_turn" or not ti["start_date"]:
                continue
            start, end = _when(ti["start_date"]), _when(ti["end_date"] or ti["start_date"])
            first, last = spans.get(ti["map_index"], (start, end))
            spans[ti["map_index"]] = (min(first, start), max(last, end))
        edges = sorted([(start, 1) for start, _ in spans.values()] + [(end, -1) for _, end in spans.values()])
        most = current = 0
        for _, change in edges:  # an end sorts before a start at the same instant
            current += change
            most = max(most, current)
        return most

    def tries(self, task_id: str) -> list[int]:
        return [ti["try_number"] for ti in self.task_instances if ti["task_id"] == task_id]

    def states(self, task_id: str) -> dict[int, str]:
        return {ti["map_index"]: ti["state"] for ti in self.task_instances if ti["task_id"] == task_id}


def _when(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def run_fleet_over(
    airflow: FleetAirflow, conn_ids: list[str], conf: dict[str, Any], *, timeout_s: float = 1800
) -> FleetRun:
    """A run over ``conn_ids`` (the canary ``kpi_db`` first, then fleet connections of ``airflow``), watching the
    fleet's databases."""
    databases = [conninfo_to_dict(airflow.fleet_dsns[conn_id])["dbname"] for conn_id in conn_ids[1:]]
    return run_fleet(airflow, airflow.kpi_dsn, databases, {"conn_ids": conn_ids, **conf}, timeout_s=timeout_s)


def run_fleet(
    airflow: Api,
    monitor_dsn: str,
    databases: list[str],
    conf: dict[str, Any],
    *,
    timeout_s: float = 1800,
    dag_id: str = DAG_ID,
) -> FleetRun:
    """Trigger one run with ``conf`` and wait for its end, sampling pg_stat_activity of ``databases`` (through
    ``monitor_dsn``) every 50 ms."""
    started = time.monotonic()
    with SessionWatch(monitor_dsn, databases) as watch:
        run = airflow.api(f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf})
        quoted = urllib.parse.quote(run["dag_run_id"], safe="")
        while (state := _read(airflow, f"/api/v2/dags/{dag_id}/dagRuns/{quoted}")["state"]) not in FINAL:
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"run {run['dag_run_id']} still {state} after {timeout_s:.0f} s")
            time.sleep(1)
    wall = time.monotonic() - started
    task_instances = _all_task_instances(airflow, f"/api/v2/dags/{dag_id}/dagRuns/{quoted}/taskInstances")
    mismatch = urllib.parse.quote("state mismatch")
    mismatches = _read(airflow, f"/api/v2/eventLogs?dag_id={dag_id}&run_id={quoted}&event={mismatch}&limit=1")[
        "total_entries"
    ]
    return FleetRun(run["dag_run_id"], state, round(wall, 1), watch.samples, task_instances, mismatches)


def _all_task_instances(airflow: Api, path: str) -> list[dict[str, Any]]:
    """Every task instance of the run, page by page: the API gives at most 100 per call (``[api]
    maximum_page_limit``), and a run over 50 targets has about 450."""
    task_instances: list[dict[str, Any]] = []
    while True:
        page = _read(airflow, f"{path}?limit=100&offset={len(task_instances)}&order_by=id")
        task_instances.extend(page["task_instances"])
        if not page["task_instances"] or len(task_instances) >= page["total_entries"]:
            return task_instances


def _read(airflow: Api, path: str, attempts: int = 5) -> dict:
    """A GET that outlasts a busy api-server: on a loaded 2-core machine one call can time out."""
    for attempt in range(attempts):
        try:
            return airflow.api(path)
        except OSError:  # a timeout or a refused connection
            if attempt == attempts - 1:
                raise
            time.sleep(2 * (attempt + 1))
    raise AssertionError("unreachable")


def xcom(airflow: Api, run_id: str, task_id: str, key: str, map_index: int = -1, dag_id: str = DAG_ID) -> Any:
    quoted = urllib.parse.quote(run_id, safe="")
    path = f"/api/v2/dags/{dag_id}/dagRuns/{quoted}/taskInstances/{task_id}/xcomEntries/{key}?map_index={map_index}"
    return _read(airflow, path + "&deserialize=true")["value"]
