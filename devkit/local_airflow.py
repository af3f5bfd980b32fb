"""A local Airflow for trying the DAG in the UI: ``airflow standalone`` (api-server, scheduler, dag-processor,
triggerer) with this project's dags and plugins, its metadata in an embedded PostgreSQL, and the ``kpi_db``
connection pointing at a database of that server filled with demo KPIs.

    python -m devkit.local_airflow [--port 8080] [--rows 100000]

Prints the URL and the login, runs until Ctrl-C (or SIGTERM), then stops Airflow and PostgreSQL.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugins"))

from devkit.airflow_env import airflow_env  # noqa: E402
from devkit.app_db import build_app_database  # noqa: E402
from devkit.pg import PgServer  # noqa: E402
from fk_maintenance.airflow.fleet import POOL  # noqa: E402

USER = "admin"
POOL_SLOTS = 8


@dataclass
class LocalAirflow:
    url: str
    user: str
    password: str
    home: Path
    kpi_dsn: str
    process: subprocess.Popen
    # Extra target databases, by Airflow connection id (kpi_fleet_1, ...), for trying a fleet run.
    fleet_dsns: dict[str, str]
    # The databases extra_databases made, by their connection id.
    extra_dsns: dict[str, str]
    # Every user's password, the admin's and the extra users' (local_airflow's ``users``).
    passwords: dict[str, str] = field(default_factory=dict)

    def api(self, path: str, body: dict | None = None, method: str | None = None, *, user: str | None = None) -> dict:
        """A call of Airflow's REST API as the admin user, or ``user`` (a POST when ``body`` is given, unless
        ``method``). A refusal raises urllib.error.HTTPError (its ``code``: 403 for a user Airflow refuses)."""
        user = user or self.user
        login = urllib.request.Request(
            f"{self.url}/auth/token",
            data=json.dumps({"username": user, "password": self.passwords.get(user, self.password)}).encode(),
            headers={"Content-Type": "application/json"},
        )
        token = _read_json(login, retries=3)["access_token"]  # a login changes nothing: tried again if slow
        request = urllib.request.Request(
            f"{self.url}{path}",
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            method=method,
        )
        # A read is tried again when the api-server, sharing two cores with a whole test suite, answers slowly; a
        # write (a trigger, an answer) never is: it may have been done.
        return _read_json(request, retries=3 if body is None and method in (None, "GET") else 1)


def _read_json(request: urllib.request.Request, *, retries: int, timeout: float = 30) -> dict:
    for attempt in range(1, retries + 1):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.load(response)
        except (TimeoutError, urllib.error.URLError) as exc:
            if isinstance(exc, urllib.error.HTTPError) or attempt == retries:
                raise
    raise AssertionError("unreachable")


def target_databases(server: PgServer, rows: int, fleet: int, fleet_rows: int) -> tuple[str, dict[str, str]]:
    """The kpi_db database with ``rows`` demo KPIs, and ``fleet`` more (``fleet_rows`` each) by connection id
    kpi_fleet_1..N."""
    kpi_db = server.create_database("kpi_demo")
    with psycopg.connect(server.dsn(kpi_db), autocommit=True) as conn:
        build_app_database(conn, rows)
    fleet_dbs = {f"kpi_fleet_{n}": server.create_database(f"kpi_fleet_{n}") for n in range(1, fleet + 1)}
    for n, database in enumerate(fleet_dbs.values(), start=1):
        with psycopg.connect(server.dsn(database), autocommit=True) as conn:
            build_app_database(conn, fleet_rows, seed=n)
    return kpi_db, fleet_dbs


def metadata_url(server: PgServer, database: str) -> str:
    params = conninfo_to_dict(server.dsn(database))
    return f"postgresql+psycopg2://{params.get('user', 'postgres')}@/{database}?host={params['host']}"


def wait_until_up(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{' '.join(map(str, process.args))} exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/api/v2/monitor/health", timeout=2) as response:
                health = json.load(response)
            if all(
                (health.get(part) or {}).get("status") == "healthy"
                for part in ("metadatabase", "scheduler", "dag_processor", "triggerer")
            ):
                return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"Airflow at {url} was not healthy within {timeout:.0f} s")


def create_pool(env: dict[str, str], slots: int = POOL_SLOTS) -> None:
    """The pool every target task runs in; without it the scheduler never queues them."""
    airflow = str(Path(sys.executable).with_name("airflow"))
    subprocess.run(
        [airflow, "pools", "set", POOL, str(slots), "kpi-fk-maintenance: tasks that work on a target database"],
        env=env,
        check=True,
        capture_output=True,
    )


@contextmanager
def local_airflow(
    home: Path,
    *,
    port: int = 8080,
    rows: int = 100_000,
    fleet: int = 0,
    fleet_rows: int = 2000,
    timeout: float = 180,
    turn_poke_seconds: int = 5,
    pool_slots: int = POOL_SLOTS,
    targets_file: Path | None = None,
    extra_databases: Callable[[PgServer], dict[str, str]] | None = None,
    users: dict[str, str] | None = None,
) -> Iterator[LocalAirflow]:
    """``targets_file``: declared keys other than the shipped file's; ``extra_databases``: makes more target
    databases on the server and returns them by the connection id to give each (the keys of that file name);
    ``users``: more users beside the admin, by name, each with its simple auth manager role (viewer, user, op,
    admin)."""
    home.mkdir(parents=True, exist_ok=True)
    server = PgServer.embedded()
    process: subprocess.Popen | None = None
    try:
        metadata_db = server.create_database("airflow_meta")
        kpi_db, fleet_dbs = target_databases(server, rows, fleet, fleet_rows)
        extra_dbs = extra_databases(server) if extra_databases else {}
        roles = {USER: "admin", **(users or {})}
        passwords = {name: secrets.token_urlsafe(12) for name in roles}
        password = passwords[USER]
        passwords_file = home / "simple_auth_manager_passwords.json"
        passwords_file.write_text(json.dumps(passwords))
        env = {
            **os.environ,
            **airflow_env(home, server.airflow_connection_json(kpi_db)),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_url(server, metadata_db),
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{name}:{role}" for name, role in roles.items()),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords_file),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API__BASE_URL": f"http://localhost:{port}",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://localhost:{port}/execution/",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_SEC": "2",
            # Waiting fleet targets look for their turn this often (the triggerer's looks, each one query).
            "FK_MAINTENANCE_TURN_POKE_SECONDS": str(turn_poke_seconds),
            **{
                f"AIRFLOW_CONN_{conn_id.upper()}": server.airflow_connection_json(database)
                for conn_id, database in {**fleet_dbs, **extra_dbs}.items()
            },
            **({"FK_MAINTENANCE_TARGETS": str(targets_file)} if targets_file else {}),
            # standalone starts its components as `airflow ...` from PATH: make it this interpreter's.
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        }
        airflow = str(Path(sys.executable).with_name("airflow"))
        log = (home / "standalone.log").open("w")
        process = subprocess.Popen(
            [airflow, "standalone"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        url = f"http://localhost:{port}"
        try:
            wait_until_up(url, process, timeout)
        except (TimeoutError, RuntimeError) as exc:
            tail = "\n".join((home / "standalone.log").read_text(errors="replace").splitlines()[-40:])
            raise RuntimeError(f"{exc}; last lines of {home / 'standalone.log'}:\n{tail}") from None
        create_pool(env, pool_slots)
        fleet_dsns = {conn_id: server.dsn(database) for conn_id, database in fleet_dbs.items()}
        extra_dsns = {conn_id: server.dsn(database) for conn_id, database in extra_dbs.items()}
        yield LocalAirflow(url, USER, password, home, server.dsn(kpi_db), process, fleet_dsns, extra_dsns, passwords)
    finally:
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--fleet", type=int, default=3, help="extra target databases kpi_fleet_1..N (connections)")
    parser.add_argument("--home", type=Path, default=REPO / ".local-airflow")
    args = parser.parse_args()
    stop = {"requested": False}

    def request_stop(*_: object) -> None:
        stop["requested"] = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    print(f"Starting Airflow with {args.rows} demo KPIs (about a minute) ...", flush=True)
    with local_airflow(args.home, port=args.port, rows=args.rows, fleet=args.fleet) as airflow:
        print(
            f"\nAirflow is up: {airflow.url}\nLog in as {airflow.user} / {airflow.password}\n"
            f"DAG: {airflow.url}/dags/vision_kpis_parent_fk  (Trigger opens the form)\n"
            f"Target database (kpi_db): {airflow.kpi_dsn}\n"
            + "".join(f"Fleet target ({conn_id}): {dsn}\n" for conn_id, dsn in airflow.fleet_dsns.items())
            + "A fleet run: put kpi_db and the kpi_fleet_* ids in the form's Target connections.\n"
            f"Logs: {airflow.home}/standalone.log\n"
            "Ctrl-C stops Airflow and PostgreSQL.",
            flush=True,
        )
        while not stop["requested"] and airflow.process.poll() is None:
            time.sleep(0.5)
    print("Stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
