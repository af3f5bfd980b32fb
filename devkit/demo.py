"""The demo: an embedded PostgreSQL with the app's table and generated KPIs, the DAG run end to end with
``airflow dags test``, and its report. With ``--fleet N``, N more databases (a tenth of the rows each, behind
the connections kpi_fleet_1..N) run in the same DAG run after kpi_db, the canary, and the fleet report follows.

    python -m devkit.demo [--rows 100000] [--orphan-ratio 0.01] [--fleet 0]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugins"))

from devkit.airflow_env import DAG_ID, airflow_cli, latest_xcom, migrate  # noqa: E402
from devkit.app_db import build_app_database  # noqa: E402
from devkit.pg import PgServer  # noqa: E402
from fk_maintenance.airflow.fleet import format_fleet_report  # noqa: E402
from fk_maintenance.steps.report import format_report  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000, help="KPIs to generate (default 100000)")
    parser.add_argument("--orphan-ratio", type=float, default=0.01, help="share of orphans (default 0.01)")
    parser.add_argument("--fleet", type=int, default=0, help="more target databases after kpi_db (default 0)")
    parser.add_argument("--workdir", type=Path, default=REPO / ".demo", help="Airflow home and logs")
    args = parser.parse_args()

    workdir: Path = args.workdir
    shutil.rmtree(workdir, ignore_errors=True)
    home = workdir / "airflow"
    print(f"Starting an embedded PostgreSQL and preparing Airflow metadata in {home} ...", flush=True)
    server = PgServer.embedded()
    try:
        migrate(home)
        database = server.create_database("kpi_demo")
        with psycopg.connect(server.dsn(database), autocommit=True) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
            generated = build_app_database(conn, args.rows, orphan_ratio=args.orphan_ratio)
        print(
            f"PostgreSQL {version}: generated {generated.rows} KPIs in 5 levels with {generated.orphans} orphans "
            f"pointing at {generated.missing_parents} missing parents ({generated.seconds:.1f} s)",
            flush=True,
        )
        fleet = {}
        for n in range(1, args.fleet + 1):
            name = server.create_database(f"kpi_fleet_{n}")
            with psycopg.connect(server.dsn(name), autocommit=True) as conn:
                made = build_app_database(conn, max(args.rows // 10, 100), orphan_ratio=args.orphan_ratio, seed=n + 1)
            fleet[f"kpi_fleet_{n}"] = server.airflow_connection_json(name)
            print(f"Fleet target kpi_fleet_{n}: {made.rows} KPIs, {made.orphans} orphans", flush=True)
        conf = json.dumps({"validate_now": True, **({"conn_ids": ["kpi_db", *fleet]} if fleet else {})})
        print(f"Running: airflow dags test {DAG_ID} -c '{conf}'  (log: {workdir / 'dags-test.log'})", flush=True)
        started = time.monotonic()
        result = airflow_cli(
            home,
            "dags",
            "test",
            DAG_ID,
            "-c",
            conf,
            kpi_db_json=server.airflow_connection_json(database),
            log_path=workdir / "dags-test.log",
            check=False,
            connections=fleet,
        )
        seconds = time.monotonic() - started
        report = latest_xcom(home, "canary.report")
        if report is None:
            print("\n".join((result.stdout + result.stderr).splitlines()[-80:]))
            print(f"The run produced no report (exit code {result.returncode}); see {workdir / 'dags-test.log'}")
            return 1
        print(f"\nThe DAG ran in {seconds:.1f} s. The report of kpi_db (the canary):\n")
        print(format_report(report))
        fleet_report = latest_xcom(home, "fleet_report", key="report")
        if fleet:
            print("\nThe fleet report:\n")
            print(format_fleet_report(fleet_report) if fleet_report else "(none: see the log)")
        return 0 if result.returncode == 0 and fleet_report and fleet_report["succeeded"] else 1
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
