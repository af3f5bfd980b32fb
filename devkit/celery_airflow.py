"""Airflow with the CeleryExecutor, laid out as on separate machines: a control plane (api-server, scheduler,
dag-processor, triggerer) in one AIRFLOW_HOME, and ``workers`` ``airflow celery worker`` processes, each in a home
of its own. They share nothing but the DAG folder, the metadata database (PostgreSQL, embedded) and the broker
(Debian's ``redis-server`` on a loopback port); connections come to every process from the environment, as a
secrets backend would give them.

    python -m devkit.celery_airflow [--workers 2] [--fleet 3]

Used by the Celery fleet test and ``bench/fleet.py --executor celery``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugins"))

from devkit.airflow_env import airflow_env  # noqa: E402
from devkit.cluster import free_port  # noqa: E402
from devkit.local_airflow import (  # noqa: E402
    POOL_SLOTS,
    USER,
    LocalAirflow,
    create_pool,
    metadata_url,
    target_databases,
    wait_until_up,
)
from devkit.pg import PgServer  # noqa: E402

CONTROL_PLANE = ("api-server", "scheduler", "dag-processor", "triggerer")


@dataclass
class CeleryAirflow(LocalAirflow):
    worker_homes: list[Path] = field(default_factory=list)

    def tasks_run_by_worker(self) -> dict[str, int]:
        """How many task attempts each worker ran: the task logs in its own home."""
        return {home.name: sum(1 for _ in (home / "logs").rglob("attempt=*.log")) for home in self.worker_homes}


def _redis(home: Path) -> tuple[subprocess.Popen, str]:
    """A redis-server of its own on a loopback port, no persistence."""
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise RuntimeError("redis-server is missing: install Debian's redis-server (scripts/system-deps.sh does)")
    port = free_port()
    process = subprocess.Popen(
        [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=(home / "redis.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return process, f"redis://127.0.0.1:{port}/0"


def _start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    home = env["AIRFLOW_HOME"]
    return subprocess.Popen(
        command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, cwd=home
    )


def _stop(*processes: subprocess.Popen) -> None:
    """SIGTERM to every process group at once, then wait for each (SIGKILL after 30 s)."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    for process in running:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _wait_for_workers(homes: list[Path], processes: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(zip(homes, processes, strict=True))
    while pending and time.monotonic() < deadline:
        for home, process in list(pending):
            if process.poll() is not None:
                raise RuntimeError(f"celery worker in {home} exited with code {process.returncode}")
            if " ready." in (home / "worker.log").read_text(errors="replace"):
                pending.remove((home, process))
        time.sleep(1)
    if pending:
        raise TimeoutError(f"celery worker(s) not ready within {timeout:.0f} s: {[str(h) for h, _ in pending]}")


@contextmanager
def celery_airflow(
    root: Path,
    *,
    workers: int = 2,
    concurrency: int = 4,
    rows: int = 1000,
    fleet: int = 0,
    fleet_rows: int = 2000,
    turn_poke_seconds: int = 5,
    pool_slots: int = POOL_SLOTS,
    timeout: float = 240,
) -> Iterator[CeleryAirflow]:
    root.mkdir(parents=True, exist_ok=True)
    control = root / "control-plane"
    worker_homes = [root / f"worker-{n}" for n in range(1, workers + 1)]
    for home in (control, *worker_homes):
        home.mkdir(exist_ok=True)
    airflow = str(Path(sys.executable).with_name("airflow"))
    with ExitStack() as stack:
        server = PgServer.embedded()
        stack.callback(server.stop)
        metadata_db = server.create_database("airflow_meta")
        kpi_db, fleet_dbs = target_databases(server, rows, fleet, fleet_rows)
        broker, broker_url = _redis(root)
        stack.callback(_stop, broker)
        port = free_port()
        password = secrets.token_urlsafe(12)
        (control / "passwords.json").write_text(json.dumps({USER: password}))
        meta = metadata_url(server, metadata_db)
        shared = {
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": meta,
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CELERY__BROKER_URL": broker_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + meta,
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(concurrency),
            # Every process signs or checks the execution API's tokens with the same secret, as a deployment's
            # secret store would hand it to each machine.
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://localhost:{port}/execution/",
            "AIRFLOW__API__BASE_URL": f"http://localhost:{port}",
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_SEC": "2",
            "FK_MAINTENANCE_TURN_POKE_SECONDS": str(turn_poke_seconds),
            "AIRFLOW_CONN_KPI_DB": server.airflow_connection_json(kpi_db),
            **{f"AIRFLOW_CONN_{c.upper()}": server.airflow_connection_json(db) for c, db in fleet_dbs.items()},
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        }

        def env_for(home: Path, **more: str) -> dict[str, str]:
            return {**os.environ, **airflow_env(home), **shared, **more}

        control_env = env_for(
            control,
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=f"{USER}:admin",
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(control / "passwords.json"),
        )
        subprocess.run([airflow, "db", "migrate"], env=control_env, check=True, capture_output=True)
        create_pool(control_env, pool_slots)
        processes: dict[str, subprocess.Popen] = {}
        worker_processes: list[subprocess.Popen] = []
        stack.callback(lambda: _stop(*processes.values(), *worker_processes))
        for component in CONTROL_PLANE:
            processes[component] = _start([airflow, component], control_env, control / f"{component}.log")
        for n, home in enumerate(worker_homes, start=1):
            # Each worker serves its own task logs, on a port of its own (they share one host here).
            worker_env = env_for(home, AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(free_port()))
            command = [airflow, "celery", "worker", "--celery-hostname", f"worker{n}@%h", "--without-mingle"]
            worker_processes.append(_start(command, worker_env, home / "worker.log"))
        url = f"http://localhost:{port}"
        try:
            wait_until_up(url, processes["api-server"], timeout)
            _wait_for_workers(worker_homes, worker_processes, timeout)
        except (TimeoutError, RuntimeError) as exc:
            raise RuntimeError(f"{exc}; logs are in {root}") from None
        yield CeleryAirflow(
            url,
            USER,
            password,
            control,
            server.dsn(kpi_db),
            processes["api-server"],
            {conn_id: server.dsn(db) for conn_id, db in fleet_dbs.items()},
            worker_homes,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--fleet", type=int, default=3)
    parser.add_argument("--root", type=Path, default=None)
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="kpi-celery-"))

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt  # unwinds the start-up too, stopping whatever was started

    signal.signal(signal.SIGTERM, interrupt)
    try:
        with celery_airflow(root, workers=args.workers, fleet=args.fleet) as airflow:
            print(f"Airflow (CeleryExecutor, {args.workers} workers) is up: {airflow.url}")
            print(f"Log in as {airflow.user} / {airflow.password}; homes and logs in {root}; Ctrl-C stops it.")
            sys.stdout.flush()
            while True:
                time.sleep(0.5)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
