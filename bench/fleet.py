"""Fleet throughput under the real scheduler: the same fleet run with max_parallel 1 and with a larger
max_parallel, on fresh databases each time, in a local Airflow (LocalExecutor, the project's pool).

    python -m bench.fleet [--targets 6] [--rows 20000] [--parallel 1,3]

Prints, per max_parallel: the run's wall time (trigger to finish), the most targets worked on at once (sampled
from pg_stat_activity every 50 ms), and writes bench/results/fleet.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from psycopg.conninfo import conninfo_to_dict

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugins"))

from devkit.cluster import free_port  # noqa: E402
from devkit.db_state import SessionWatch  # noqa: E402
from devkit.local_airflow import LocalAirflow, local_airflow  # noqa: E402

DAG_ID = "vision_kpis_parent_fk"
RESULTS = REPO / "bench" / "results" / "fleet.json"


def fleet_run(airflow: LocalAirflow, conn_ids: list[str], max_parallel: int) -> dict[str, Any]:
    """Trigger one run over ``conn_ids`` and wait for it; its wall time and the most targets at once."""
    databases = [conninfo_to_dict(airflow.fleet_dsns[c])["dbname"] for c in conn_ids]
    started = time.monotonic()
    conf = {"conn_ids": conn_ids, "max_parallel": max_parallel, "validate_now": True}
    with SessionWatch(airflow.kpi_dsn, databases) as watch:
        run = airflow.api(f"/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": conf})
        quoted = urllib.request.quote(run["dag_run_id"], safe="")
        while (state := airflow.api(f"/api/v2/dags/{DAG_ID}/dagRuns/{quoted}")["state"]) not in ("success", "failed"):
            time.sleep(1)
    return {
        "targets": len(conn_ids),
        "max_parallel": max_parallel,
        "state": state,
        "wall_s": round(time.monotonic() - started, 1),
        "most_at_once": max((len(sample) for sample in watch.samples), default=0),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=int, default=6, help="databases per run (default 6)")
    parser.add_argument("--rows", type=int, default=20_000, help="KPIs per database (default 20000)")
    parser.add_argument("--parallel", default="1,3", help="max_parallel values to compare (default 1,3)")
    args = parser.parse_args()
    parallels = [int(value) for value in args.parallel.split(",")]
    home = Path(tempfile.mkdtemp(prefix="kpi-bench-fleet-"))
    print(f"Starting a local Airflow with {args.targets * len(parallels)} databases ...", file=sys.stderr, flush=True)
    results = []
    with local_airflow(
        home, port=free_port(), rows=1000, fleet=args.targets * len(parallels), fleet_rows=args.rows
    ) as airflow:
        fleet = list(airflow.fleet_dsns)
        for number, max_parallel in enumerate(parallels):
            conn_ids = fleet[number * args.targets : (number + 1) * args.targets]  # fresh databases each run
            print(f"... {len(conn_ids)} targets, max_parallel {max_parallel}", file=sys.stderr, flush=True)
            results.append(fleet_run(airflow, conn_ids, max_parallel))
    RESULTS.write_text(json.dumps({"rows_per_database": args.rows, "runs": results}, indent=2) + "\n")
    print(f"Fleet runs ({args.rows} KPIs per database, real scheduler, LocalExecutor, 2 cores):\n")
    print("| targets | max_parallel | state | wall time (s) | most targets at once |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['targets']} | {r['max_parallel']} | {r['state']} | {r['wall_s']} | {r['most_at_once']} |")
    return 0 if all(r["state"] == "success" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
