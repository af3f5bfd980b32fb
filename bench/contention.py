"""Scenarios against the previous release of the library: landing the constraint under a hot row lock, and
the worker's peak memory while nulling many orphans.

"The previous release" is the library as it was at PREVIOUS_RELEASE (jittered retries between attempts; all
orphan keys held in the worker), taken from git into a temporary folder. Both versions run the same step in a
subprocess of their own, on copies of the same database, so the figures compare like with like.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

from devkit.workload import WRITE_KINDS, AppWorkload, HotRowLock

REPO = Path(__file__).resolve().parents[1]
PREVIOUS_RELEASE = "0d1470d"
CURRENT = "this version"
PREVIOUS = f"previous release ({PREVIOUS_RELEASE})"
HOT_LOCK_PERIOD_S = 4.0
HOT_LOCK_TIMEOUT_MS = 1000
# The previous release gave up a task attempt after lock_attempts and left the retry to Airflow
# (retry_delay 2 min, doubling); the benchmark runs task attempts back to back and says how many it took.
MAX_TASK_ATTEMPTS = 3

STEP_SCRIPT = """
import json, sys, time
import psycopg
from fk_maintenance.keys.settings import RunSettings
from fk_maintenance.keys.spec import VISION_KPIS_PARENT_FK as spec
step, dsn, settings = sys.argv[1], sys.argv[2], RunSettings(**json.loads(sys.argv[3]))
if step == "add_fk_not_valid":
    from fk_maintenance.steps.constraint import add_fk_not_valid as function
    kwargs = {}
else:
    from fk_maintenance.steps.orphans import null_orphans as function
    kwargs = {"run_id": "bench"}
started = time.monotonic()
try:
    with psycopg.connect(dsn, autocommit=True) as conn:
        result, error = function(conn, spec, settings, **kwargs), None
except Exception as exc:
    result, error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec.
peak_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"result": result, "error": error, "seconds": time.monotonic() - started,
                  "peak_rss_mib": peak_kib / 1024}, default=str))
"""


def previous_release_plugins() -> Path:
    """plugins/ and sql/ of PREVIOUS_RELEASE, side by side in a temporary folder, as that release ran them."""
    target = Path(tempfile.mkdtemp(prefix="kpi-previous-release-"))
    archive = subprocess.run(
        ["git", "archive", PREVIOUS_RELEASE, "plugins", "sql"], cwd=REPO, capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target / "plugins"


def run_step(plugins: Path, step: str, dsn: str, settings: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(plugins)}
    out = subprocess.run(
        [sys.executable, "-c", STEP_SCRIPT, step, dsn, json.dumps(settings)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def hot_lock(bench: Any, versions: dict[str, Path], share: float, rows: int) -> dict[str, Any]:
    """Time to add the constraint while an app transaction holds a row lock ``share`` of the time."""
    from fk_maintenance.keys.settings import RunSettings
    from fk_maintenance.keys.spec import VISION_KPIS_PARENT_FK as SPEC
    from fk_maintenance.steps.index import create_index_concurrently
    from fk_maintenance.steps.orphans import null_orphans

    figures: dict[str, Any] = {}
    for label, plugins in versions.items():
        name = bench.fresh(rows)
        dsn = bench.server.dsn(name)
        with bench.connector(name)() as conn:
            null_orphans(conn, SPEC, RunSettings(), "bench")
            create_index_concurrently(conn, SPEC, RunSettings())
        settings = {"lock_timeout_ms": HOT_LOCK_TIMEOUT_MS}
        task_attempts: list[dict[str, Any]] = []
        with (
            AppWorkload(dsn) as app,
            HotRowLock(dsn, hold_s=share * HOT_LOCK_PERIOD_S, period_s=HOT_LOCK_PERIOD_S),
        ):
            time.sleep(HOT_LOCK_PERIOD_S * 0.6)  # the app transaction is well into its hold
            while len(task_attempts) < MAX_TASK_ATTEMPTS:
                task_attempts.append(run_step(plugins, "add_fk_not_valid", dsn, settings))
                if task_attempts[-1]["error"] is None:
                    break
            time.sleep(0.5)
        bench.server.drop_database(name)
        landed = task_attempts[-1]["error"] is None
        writes = app.result.latency(WRITE_KINDS)
        figures[label] = {
            "landed": landed,
            "task_attempts": len(task_attempts),
            "seconds_in_tasks": round(sum(a["seconds"] for a in task_attempts), 2),
            "lock_attempts_in_last_task": (task_attempts[-1]["result"] or {}).get("attempts"),
            "app_worst_write_ms": writes["max_ms"],
            "app_p99_write_ms": writes["p99_ms"],
            "app_failed": len(app.result.errors()),
        }
    return figures


def memory(bench: Any, versions: dict[str, Path], orphans: int) -> dict[str, Any]:
    """Peak RSS of the process running null_orphans over ``orphans`` orphans (nearly every row an orphan)."""
    rows = int(orphans / 0.99) + 500
    figures: dict[str, Any] = {}
    for label, plugins in versions.items():
        name = bench.fresh(rows, orphan_ratio=1.0)
        run = run_step(plugins, "null_orphans", bench.server.dsn(name), {"batch_size": 5000})
        bench.server.drop_database(name)
        if run["error"]:
            raise RuntimeError(f"null_orphans ({label}) failed: {run['error']}")
        figures[label] = {
            "nulled": run["result"]["nulled"],
            "peak_rss_mib": round(run["peak_rss_mib"], 1),
            "seconds": round(run["seconds"], 2),
        }
    return figures


def run(bench: Any, *, hot_lock_rows: int, memory_orphans: list[int]) -> dict[str, Any]:
    versions = {CURRENT: REPO / "plugins", PREVIOUS: previous_release_plugins()}
    results: dict[str, Any] = {"previous_release": PREVIOUS_RELEASE, "hot_lock": {}, "memory": {}}
    for share in (0.5, 0.9, 0.95) if hot_lock_rows else ():
        print(f"... hot row lock held {share:.0%} of the time", file=sys.stderr, flush=True)
        results["hot_lock"][f"{share:.2f}"] = hot_lock(bench, versions, share, hot_lock_rows)
    for orphans in memory_orphans:
        print(f"... peak memory with {orphans} orphans", file=sys.stderr, flush=True)
        results["memory"][str(orphans)] = memory(bench, versions, orphans)
    bench.drop_templates()
    return results


def markdown(results: dict[str, Any]) -> list[str]:
    lines = _hot_lock_lines(results["hot_lock"]) if results["hot_lock"] else []
    if results["memory"]:
        lines += _memory_lines(results["memory"])
    return lines


def _hot_lock_lines(hot_lock: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"**Landing the constraint under a hot row lock** (an app transaction re-takes a row lock for the given "
        f"share of every {HOT_LOCK_PERIOD_S:.0f} s; the app workload writes beside it; lock_timeout "
        f"{HOT_LOCK_TIMEOUT_MS} ms; task attempts run back to back, where Airflow would wait its retry_delay, "
        "2 min and doubling, between them)",
        "",
        "| lock held | version | landed | task attempts | seconds in tasks | app worst write ms | app p99 ms |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for share, versions in hot_lock.items():
        for label, f in versions.items():
            lines.append(
                f"| {float(share):.0%} | {label} | {'yes' if f['landed'] else 'no'} | {f['task_attempts']} | "
                f"{f['seconds_in_tasks']} | {f['app_worst_write_ms']} | {f['app_p99_write_ms']} |"
            )
    return lines


def _memory_lines(memory: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "**Worker memory while nulling orphans** (peak RSS of the process running null_orphans, batches of 5 000)",
        "",
        "| orphans | version | peak RSS MiB | seconds |",
        "| ---: | --- | ---: | ---: |",
    ]
    for orphans, versions in memory.items():
        for label, f in versions.items():
            lines.append(f"| {int(orphans):,} | {label} | {f['peak_rss_mib']} | {f['seconds']} |")
    return lines
