"""Fleet throughput under a real scheduler: the same fleet with several max_parallel values, on fresh databases each
time, on the LocalExecutor (``airflow standalone``) or the CeleryExecutor (devkit.celery_airflow: a control plane
and N workers in homes of their own, Redis as the broker).

    python -m bench.fleet [--executor local|celery] [--workers 2] [--targets 50] [--rows 2000] [--parallel 1,5,10]

Per run: wall time (trigger to end), the most targets in flight at once (from the task instances' times; in
brackets, the most seen inside PostgreSQL at once, pg_stat_activity every 50 ms), and per
target (means over the run's targets): its database time (the seconds its steps spent in their own work, from its
report), its elapsed time (its first step's start to its report's end) and Airflow's overhead (elapsed minus
database time: task start-up, scheduling, waiting for a pool or worker slot). Where that overhead goes, per step of
a fleet target (means): the scheduler noticing that its upstream ended (upstream's end to scheduled), queueing and
starting it, and its task process (start to end); and the scheduler's loop durations during the run (its debug
line, the one logger the bench turns to debug). wait_turn's tries and the scheduler's "state mismatch" events are
counted too: a target lost at wait_turn would show there. The machine's load average is recorded at each run's
start and end. Writes bench/results/fleet-<executor>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugins"))

from devkit.celery_airflow import celery_airflow  # noqa: E402
from devkit.cluster import free_port  # noqa: E402
from devkit.fleet_runs import FleetRun, run_fleet_over, xcom  # noqa: E402
from devkit.local_airflow import LocalAirflow, local_airflow  # noqa: E402

RESULTS = REPO / "bench" / "results"
STEP_TASKS = ("preflight", "detect_orphans", "null_orphans", "create_index_concurrently", "add_fk_not_valid")
# Each task of a fleet target and the tasks it waits for (the graph of docs/index.md).
UPSTREAMS = {
    "preflight": ("wait_turn",),
    "detect_orphans": ("preflight",),
    "null_orphans": ("detect_orphans",),
    "create_index_concurrently": ("preflight",),
    "add_fk_not_valid": ("null_orphans", "create_index_concurrently"),
    "validate_fk": ("add_fk_not_valid",),
    "post_checks": ("validate_fk",),
    "report": ("post_checks",),
}
LOOP_LINE = re.compile(r"(?P<when>\d{4}-\d\d-\d\dT[\d:.]+Z) \[debug\s*\] Ran scheduling loop in (?P<ms>[\d.]+) ms")
TURN_POKE_SECONDS = 5
POOL_SLOTS = 64  # larger than any max_parallel here: max_parallel is the bound being measured


def _when(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def per_target(airflow: LocalAirflow, run: FleetRun, conn_ids: list[str]) -> list[dict[str, Any]]:
    """Each fleet target's database time, elapsed time and overhead (the canary, run alone first, is left out)."""
    targets = []
    for map_index, conn_id in enumerate(conn_ids[1:]):
        tis = [t for t in run.task_instances if t["task_id"].startswith("fleet.") and t["map_index"] == map_index]
        steps = [t for t in tis if t["task_id"] != "fleet.wait_turn" and t["start_date"] and t["end_date"]]
        if not steps:
            continue
        report = xcom(airflow, run.run_id, "fleet.report", "report", map_index)
        database_s = sum((s.get("seconds") or 0) for s in report["steps"].values())
        first, last = min(_when(t["start_date"]) for t in steps), max(_when(t["end_date"]) for t in steps)
        elapsed_s = (last - first).total_seconds()
        # Inside its task processes (interpreter, DAG parse, execution API, the step) vs between them (the
        # scheduler noticing an upstream finished, queueing, the executor starting the next process).
        running_s = sum((_when(t["end_date"]) - _when(t["start_date"])).total_seconds() for t in steps)
        targets.append(
            {
                "conn_id": conn_id,
                "database_s": database_s,
                "elapsed_s": elapsed_s,
                "in_tasks_s": running_s - database_s,
                "between_tasks_s": elapsed_s - running_s,
                "tasks": len(steps),
            }
        )
    return targets


def hand_offs(run: FleetRun) -> dict[str, float | None]:
    """Where a fleet step's time goes, means over the run's fleet steps: the scheduler noticing that its upstream
    ended (upstream end to scheduled), the scheduler queueing it (to queued), the executor starting it (to start)
    and its task process (start to end: start-up, DAG parse, execution API calls, the step's own work)."""
    tis = {(t["task_id"], t["map_index"]): t for t in run.task_instances}
    parts: dict[str, list[float]] = {"notice": [], "queue": [], "start": [], "process": []}
    for t in run.task_instances:
        group, _, name = t["task_id"].partition(".")
        upstreams = UPSTREAMS.get(name)
        if group != "fleet" or upstreams is None or not (t["start_date"] and t["end_date"] and t["queued_when"]):
            continue
        ends = [tis.get((f"fleet.{u}", t["map_index"]), {}).get("end_date") for u in upstreams]
        if not all(ends) or not t["scheduled_when"]:
            continue
        scheduled, queued, started = _when(t["scheduled_when"]), _when(t["queued_when"]), _when(t["start_date"])
        parts["notice"].append((scheduled - max(_when(e) for e in ends)).total_seconds())
        parts["queue"].append((queued - scheduled).total_seconds())
        parts["start"].append((started - queued).total_seconds())
        parts["process"].append((_when(t["end_date"]) - started).total_seconds())
    return {key: round(statistics.fmean(values), 2) if values else None for key, values in parts.items()}


def scheduler_loops(airflow: LocalAirflow, run: FleetRun) -> dict[str, float | None]:
    """The scheduler's loop durations (seconds) while the run ran, from its debug line "Ran scheduling loop in N
    ms" (the bench turns that logger to debug): each pass re-checks the dependencies of every waiting task instance
    of the run, so a downstream task starts a pass or two after its upstream ended."""
    log = airflow.home / "standalone.log"
    log = log if log.exists() else airflow.home / "scheduler.log"
    starts = [_when(t["start_date"]) for t in run.task_instances if t["start_date"]]
    ends = [_when(t["end_date"]) for t in run.task_instances if t["end_date"]]
    if not starts or not ends or not log.exists():
        return {"median_s": None, "p90_s": None, "loops": 0}
    first, last = min(starts), max(ends)
    durations = []
    for line in log.read_text(errors="replace").splitlines():
        found = LOOP_LINE.search(line)
        if found and first <= _when(found["when"]) <= last:
            durations.append(float(found["ms"]) / 1000)
    if not durations:
        return {"median_s": None, "p90_s": None, "loops": 0}
    durations.sort()
    return {
        "median_s": round(statistics.median(durations), 2),
        "p90_s": round(durations[int(0.9 * (len(durations) - 1))], 2),
        "loops": len(durations),
    }


def measure(airflow: LocalAirflow, conn_ids: list[str], max_parallel: int) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    run = run_fleet_over(airflow, conn_ids, {"max_parallel": max_parallel, "validate_now": True}, timeout_s=7200)
    targets = per_target(airflow, run, conn_ids)
    mean = lambda key: round(statistics.fmean(t[key] for t in targets), 2) if targets else None  # noqa: E731
    return {
        # The machine's 1-minute load average when the run began and when it ended (shared machines are noisy).
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "targets": len(conn_ids),
        "max_parallel": max_parallel,
        "state": run.state,
        "wall_s": run.wall_s,
        "most_at_once": run.most_at_once,
        "most_in_flight": run.most_targets_in_flight,
        "database_s_per_target": mean("database_s"),
        "elapsed_s_per_target": mean("elapsed_s"),
        "overhead_s_per_target": round(mean("elapsed_s") - mean("database_s"), 2) if targets else None,
        "overhead_in_tasks_s_per_target": mean("in_tasks_s"),
        "overhead_between_tasks_s_per_target": mean("between_tasks_s"),
        "task_runs_per_target": mean("tasks"),
        "wait_turn_retries": sum(t - 1 for t in run.tries("fleet.wait_turn")),
        "state_mismatches": run.state_mismatches,
        "lost_at_wait_turn": sum(1 for s in run.states("fleet.wait_turn").values() if s != "success"),
        "step_hand_off_s": hand_offs(run),
        "scheduler_loop": scheduler_loops(airflow, run),
    }


@contextmanager
def airflow_for(executor: str, home: Path, fleet: int, rows: int, workers: int) -> Iterator[LocalAirflow]:
    common = {
        "rows": rows,
        "fleet": fleet,
        "fleet_rows": rows,
        "turn_poke_seconds": TURN_POKE_SECONDS,
        "pool_slots": POOL_SLOTS,
    }
    if executor == "celery":
        with celery_airflow(home, workers=workers, concurrency=8, **common) as airflow:
            yield airflow
    else:
        with local_airflow(home, port=free_port(), **common) as airflow:
            yield airflow


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--executor", choices=("local", "celery"), default="local")
    parser.add_argument("--workers", type=int, default=2, help="Celery workers (default 2)")
    parser.add_argument("--targets", type=int, default=50, help="databases per run, the canary included (default 50)")
    parser.add_argument("--rows", type=int, default=2000, help="KPIs per database (default 2000)")
    parser.add_argument("--parallel", default="1,5,10", help="max_parallel values to compare (default 1,5,10)")
    args = parser.parse_args()
    parallels = [int(value) for value in args.parallel.split(",")]
    home = Path(tempfile.mkdtemp(prefix=f"kpi-bench-fleet-{args.executor}-"))
    # The scheduler logs each loop's duration at debug level only: the one logger the loop figures come from.
    os.environ.setdefault("AIRFLOW__LOGGING__NAMESPACE_LEVELS", "airflow.jobs.scheduler_job_runner=debug")
    # Each run's canary is one more fresh database (kpi_fleet_*); kpi_db itself is not used.
    fleet = args.targets * len(parallels)
    print(f"Starting Airflow ({args.executor}) with {fleet} databases in {home} ...", file=sys.stderr, flush=True)
    results = []
    with airflow_for(args.executor, home, fleet, args.rows, args.workers) as airflow:
        ids = list(airflow.fleet_dsns)
        for number, max_parallel in enumerate(parallels):
            conn_ids = ids[number * args.targets : (number + 1) * args.targets]  # fresh databases each run
            print(f"... {len(conn_ids)} targets, max_parallel {max_parallel}", file=sys.stderr, flush=True)
            results.append(measure(airflow, conn_ids, max_parallel))
            print(f"    {results[-1]}", file=sys.stderr, flush=True)
    label = f"celery, {args.workers} workers" if args.executor == "celery" else "local"
    out = RESULTS / f"fleet-{args.executor}.json"
    out.write_text(json.dumps({"executor": label, "rows_per_database": args.rows, "runs": results}, indent=2) + "\n")
    print(f"Fleet runs ({args.rows} KPIs per database, real scheduler, {label}, {TURN_POKE_SECONDS} s turn looks):\n")
    print(
        "| executor | targets | max_parallel | state | wall (s) | most in flight (in PostgreSQL) | DB s / target "
        "| overhead s / target | per step: scheduler notices + task process (s) | scheduler loop median / p90 (s) "
        "| wait_turn retries, lost | load average |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        hand_off, loop = r["step_hand_off_s"], r["scheduler_loop"]
        print(
            f"| {label} | {r['targets']} | {r['max_parallel']} | {r['state']} | {r['wall_s']} "
            f"| {r['most_in_flight']} ({r['most_at_once']}) | {r['database_s_per_target']} "
            f"| {r['overhead_s_per_target']} | {hand_off['notice']} + {hand_off['process']} "
            f"| {loop['median_s']} / {loop['p90_s']} | {r['wait_turn_retries']}, {r['lost_at_wait_turn']} "
            f"| {r['load_average'][0]} to {r['load_average'][1]} |"
        )
    return 0 if all(r["state"] == "success" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
