"""The app's write latency during a whole run, per ``parallel_workers`` setting, against the app alone in the
same run; and the run's database time against the floor (issue 21).

    python -m bench.app_latency [--sizes 1000000,10000000] [--repeats 2] [--json bench/results/app-latency.json]

The app is one session writing (insert, parent move, leaf delete) every 10 ms, as a new user's app would. For
each size, setting and repeat a fresh copy of the same generated table gets: the app alone for as long as a run
of that size takes, then (the app still writing) the pipeline's steps in the DAG's order, run by the library
itself (``devkit.pipeline``: Airflow's own process start and bookkeeping, 30-100 s of Python on these same cores,
is not the pipeline's load on the database). The settings are interleaved and their order rotates per repeat,
so drifting load from other work on the machine falls on all of them; every measurement records the machine's
load average and CPU use, to tell contaminated figures apart. The floor (the bare statements, no app, the server's
own parallel settings) is measured once per repeat.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "plugins"), str(REPO)]

import psycopg  # noqa: E402

from bench.run import FLOOR_OF, Bench, machine  # noqa: E402
from devkit.pg import PgServer  # noqa: E402
from devkit.workload import WRITE_KINDS, AppWorkload, Op  # noqa: E402
from fk_maintenance.keys.settings import AUTO_PARALLEL_WORKERS, SERVER_PARALLEL_WORKERS, RunSettings  # noqa: E402
from fk_maintenance.keys.spec import VISION_KPIS_PARENT_FK as SPEC  # noqa: E402
from fk_maintenance.steps.registry import APPROVED_ORPHANS, MONITOR_CONNECT, RUN_ID, RUN_STARTED_AT, STEPS  # noqa: E402
from fk_maintenance.steps.report import build_report  # noqa: E402

SETTINGS = {
    "-1 (server's own, the old default)": SERVER_PARALLEL_WORKERS,
    "-2 (auto, the new default)": AUTO_PARALLEL_WORKERS,
    "0 (one core)": 0,
}
APP_WRITE_EVERY_S = 0.010
WARM_UP_S = 1.0
MIN_ALONE_S = 10.0
# Goal of issue 21: the app's p99 during the run within 2x of the app alone, or under 5 ms; database time at
# most 1.3x the floor.
P99_RATIO_GOAL = 2.0
P99_ABSOLUTE_GOAL_MS = 5.0
FLOOR_RATIO_GOAL = 1.3


class MachineLoad:
    """The machine's 1-minute load average at the start and end of a stretch, and its CPU use over it (all
    processes, ours and other people's: on a shared machine that is what tells a contaminated figure)."""

    def __init__(self) -> None:
        self.load_start = _loadavg()
        self._cpu_start = _cpu_ticks()

    def end(self) -> dict[str, float]:
        busy_start, total_start = self._cpu_start
        busy, total = _cpu_ticks()
        return {
            "loadavg_start": self.load_start,
            "loadavg_end": _loadavg(),
            "cpu_busy": round((busy - busy_start) / max(1, total - total_start), 3),
        }


def _loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def _cpu_ticks() -> tuple[int, int]:
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def latency(ops: list[Op]) -> dict[str, Any]:
    seconds = sorted(op.seconds for op in ops if op.kind in WRITE_KINDS)
    if not seconds:
        return {"writes": 0, "p50_ms": None, "p99_ms": None, "max_ms": None, "failed": 0}
    return {
        "writes": len(seconds),
        "p50_ms": round(statistics.median(seconds) * 1000, 2),
        "p99_ms": round(seconds[min(len(seconds) - 1, int(len(seconds) * 0.99))] * 1000, 2),
        "max_ms": round(seconds[-1] * 1000, 2),
        "failed": sum(1 for op in ops if op.error and op.error != "ForeignKeyViolation"),
    }


class ParallelChoices(logging.Handler):
    """What each step chose for its parallel workers, as its log says (fk_maintenance.db.parallelism)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> ParallelChoices:
        logger = logging.getLogger("fk_maintenance.db.parallelism")
        logger.setLevel(logging.INFO)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("fk_maintenance.db.parallelism").removeHandler(self)


def measure(bench: Bench, rows: int, parallel_workers: int, alone_s: float, batch_pause_ms: int = 0) -> dict[str, Any]:
    """The app alone for ``alone_s``, then a whole run beside it, on a fresh copy of the table."""
    name = bench.fresh(rows)
    connect = bench.connector(name)
    settings = RunSettings(validate_now=True, parallel_workers=parallel_workers, batch_pause_ms=batch_pause_ms)
    run_id = f"bench-{parallel_workers}-{batch_pause_ms}"
    steps: dict[str, tuple[float, float]] = {}
    results: dict[str, Any] = {}
    with AppWorkload(bench.server.dsn(name), writers=1, readers=0, think_seconds=APP_WRITE_EVERY_S) as app:
        time.sleep(WARM_UP_S)
        alone_from = time.time() - app.started_at
        alone_load = MachineLoad()
        time.sleep(alone_s)
        alone_to = time.time() - app.started_at
        alone_machine = alone_load.end()
        run_load = MachineLoad()
        choices = ParallelChoices().__enter__()
        available = {
            RUN_ID: run_id,
            RUN_STARTED_AT: datetime.now(UTC),
            MONITOR_CONNECT: connect,
            APPROVED_ORPHANS: None,
        }
        for step in STEPS:  # the DAG's order, each step on its own connection as its task would be
            started = time.time() - app.started_at
            with connect() as conn:
                results[step.name] = step.load()(conn, SPEC, settings, **{n: available[n] for n in step.needs})
            steps[step.name] = (started, time.time() - app.started_at)
        run_machine = run_load.end()
        choices.__exit__()
    ops = app.result.ops if app.result else []
    report = build_report(SPEC, settings, run_id, results, audited=None)
    bench.server.drop_database(name)
    run_from, run_to = steps[STEPS[0].name][0], steps[STEPS[-1].name][1]
    step_seconds = {name: float(info["seconds"] or 0) for name, info in report["steps"].items()}
    return {
        "parallel_workers": parallel_workers,
        "batch_pause_ms": batch_pause_ms,
        "alone": latency([op for op in ops if alone_from <= op.started < alone_to])
        | {"seconds": round(alone_to - alone_from, 1), "machine": alone_machine},
        "run": latency([op for op in ops if run_from <= op.started < run_to])
        | {"seconds": round(run_to - run_from, 1), "machine": run_machine},
        # Which step the app felt: a gate between units of work can only help where the app suffers between them.
        "run_by_step": {
            name: latency([op for op in ops if start <= op.started < end]) | {"seconds": round(end - start, 2)}
            for name, (start, end) in steps.items()
        },
        "parallel_choices": choices.lines,
        "db_s": round(sum(step_seconds[step] for step in FLOOR_OF), 2),
        "db_s_all_steps": round(sum(step_seconds.values()), 2),
        "steps_s": step_seconds,
    }


def floor(bench: Bench, rows: int) -> dict[str, Any]:
    load = MachineLoad()
    timings = bench.floor(rows)
    return {"seconds": round(sum(timings.values()), 2), "steps_s": timings, "machine": load.end()}


def run(sizes: list[int], repeats: int, json_path: Path, gate_pause_ms: int = 0) -> dict[str, Any]:
    """``gate_pause_ms``: also measure auto with that pause between null_orphans' batches, the most a gate between
    batches could give the app (a gate holds the next batch back; a pause always does)."""
    settings = dict(SETTINGS)
    if gate_pause_ms:
        settings[f"-2 (auto), batch_pause_ms {gate_pause_ms}"] = AUTO_PARALLEL_WORKERS
    server = PgServer.embedded()
    bench = Bench(server, Path(tempfile.mkdtemp(prefix="kpi-bench-")))
    try:
        with psycopg.connect(server.admin_dsn) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
        results: dict[str, Any] = {
            "machine": machine() | {"postgresql": version},
            "app": f"1 session writing every {APP_WRITE_EVERY_S * 1000:.0f} ms",
            "settings": settings,
            "sizes": {},
        }
        for rows in sizes:
            size: dict[str, Any] = {"measurements": [], "floors": []}
            results["sizes"][str(rows)] = size
            bench.fresh(rows)  # the template, before anything is timed
            alone_s = max(MIN_ALONE_S, rows / 1_000_000 * 6.0)  # until a run of this size has been timed
            labels = list(settings)
            for repeat in range(repeats):
                size["floors"].append(floor(bench, rows))
                order = labels[repeat % len(labels) :] + labels[: repeat % len(labels)]
                for label in order:
                    print(f"... {rows} rows, repeat {repeat + 1}, {label}", file=sys.stderr, flush=True)
                    pause = gate_pause_ms if "batch_pause_ms" in label else 0
                    measured = measure(bench, rows, settings[label], alone_s, pause)
                    measured |= {"setting": label, "repeat": repeat + 1}
                    size["measurements"].append(measured)
                    # The next alone stretch as long as this run (at least MIN_ALONE_S, for a p99 of enough writes).
                    alone_s = max(MIN_ALONE_S, measured["run"]["seconds"])
                    json_path.write_text(json.dumps(results, indent=2))  # kept even if a later one fails
                    print(json.dumps({k: measured[k] for k in ("setting", "alone", "run", "db_s")}), file=sys.stderr)
            bench.drop_templates()  # a 10M-row template is 2.7 GB: one size at a time on disk
        return results
    finally:
        server.stop()


def merged(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs' figures as one: each size's measurements and floors together, repeats numbered on."""
    results = {**runs[0], "settings": {}, "sizes": {}}
    for one in runs:
        results["settings"] |= one["settings"]
        for rows, size in one["sizes"].items():
            into = results["sizes"].setdefault(rows, {"measurements": [], "floors": []})
            offset = max((x["repeat"] for x in into["measurements"]), default=0)
            into["measurements"] += [x | {"repeat": x["repeat"] + offset} for x in size["measurements"]]
            into["floors"] += size["floors"]
    return results


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    order = list(results["settings"])
    lines = [
        f"Machine: {m['cores']} cores, PostgreSQL {m['postgresql']}; app: {results['app']}. One row per "
        "measurement (settings interleaved, order rotated per repeat); machine CPU busy is all processes on the "
        "machine over that stretch (other people's work included).",
        "",
        "| rows | parallel_workers | # | app alone p50 / p99 / worst ms | during the run p50 / p99 / worst ms | "
        "p99 run / alone | goal (p99 <= 2x or < 5 ms) | during the index build p99 / worst ms | database s | "
        "database / floor | load avg, machine CPU busy: alone; run |",
        "| ---: | --- | ---: | --- | --- | ---: | --- | --- | ---: | ---: | --- |",
    ]
    summary: list[str] = []
    for rows, size in results["sizes"].items():
        floor_s = statistics.median(f["seconds"] for f in size["floors"])
        by_setting: dict[str, list[dict[str, Any]]] = {label: [] for label in order}
        for x in sorted(size["measurements"], key=lambda x: (order.index(x["setting"]), x["repeat"])):
            by_setting[x["setting"]].append(x)
            alone, during = x["alone"], x["run"]
            build = _build(x)
            lines.append(
                f"| {int(rows):,} | {x['setting']} | {x['repeat']} | {alone['p50_ms']} / {alone['p99_ms']} / "
                f"{alone['max_ms']} | {during['p50_ms']} / {during['p99_ms']} / {during['max_ms']} | "
                f"{_p99_ratio(x):.2f}x | {'met' if _goal_met(x) else 'not met'} | {build['p99_ms']} / "
                f"{build['max_ms']} | {x['db_s']} | "
                f"{x['db_s'] / floor_s:.2f}x | {alone['machine']['loadavg_start']}, "
                f"{alone['machine']['cpu_busy']:.0%}; {during['machine']['loadavg_start']}, "
                f"{during['machine']['cpu_busy']:.0%} |"
            )
        for label, measured in by_setting.items():
            if measured:
                summary.append(
                    f"| {int(rows):,} | {label} | {len(measured)} | "
                    f"{statistics.median(_p99_ratio(x) for x in measured):.2f}x | "
                    f"{statistics.median(x['run']['p99_ms'] for x in measured):.2f} | "
                    f"{statistics.median(_build(x)['p99_ms'] for x in measured):.2f} | "
                    f"{sum(_goal_met(x) for x in measured)} of {len(measured)} | "
                    f"{statistics.median(x['db_s'] for x in measured) / floor_s:.2f}x ({floor_s:.2f} s) |"
                )
    return "\n".join(
        [
            *lines,
            "",
            "| rows | parallel_workers | measurements | median p99 run / alone | median p99 during the run ms | "
            "median p99 during the index build ms | goal met | median database / floor (floor s) |",
            "| ---: | --- | ---: | ---: | ---: | ---: | --- | ---: |",
            *summary,
        ]
    )


def _build(measured: dict[str, Any]) -> dict[str, Any]:
    """The app's writes during the index build, the statement parallel workers matter most to."""
    return measured["run_by_step"]["create_index_concurrently"]


def _p99_ratio(measured: dict[str, Any]) -> float:
    return measured["run"]["p99_ms"] / measured["alone"]["p99_ms"]


def _goal_met(measured: dict[str, Any]) -> bool:
    return _p99_ratio(measured) <= P99_RATIO_GOAL or measured["run"]["p99_ms"] < P99_ABSOLUTE_GOAL_MS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000000,10000000", help="comma-separated row counts")
    parser.add_argument("--repeats", type=int, default=2, help="measurements per size and setting")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "app-latency.json")
    parser.add_argument("--gate-pause-ms", type=int, default=0, help="also measure auto with this batch_pause_ms")
    parser.add_argument(
        "--markdown-from", type=Path, nargs="+", help="print the tables of earlier runs' JSON (merged), measure nothing"
    )
    args = parser.parse_args()
    if args.markdown_from:
        print(markdown(merged([json.loads(path.read_text()) for path in args.markdown_from])))
        return 0
    args.json.parent.mkdir(parents=True, exist_ok=True)
    results = run([int(s) for s in args.sizes.split(",") if s], args.repeats, args.json, args.gate_pause_ms)
    args.json.write_text(json.dumps(results, indent=2))
    print(markdown(results))
    print(f"\n(figures written to {args.json})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
