"""Benchmarks: what the app feels (against the naive migration), what the work costs (against the floor),
the classic NOT IN orphan query, Airflow's overhead, and how each step scales.

    python -m bench.run [--sizes 100000,1000000] [--not-in-cap 60] [--json bench/results/latest.json]

Prints a Markdown report and writes the same figures as JSON. Each size is generated once per measurement
into its own database from the same seed, so every pair compared ran on the same data.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "plugins"), str(REPO)]

import psycopg  # noqa: E402
from psycopg import errors as pgerrors  # noqa: E402
from psycopg import sql  # noqa: E402

from devkit.airflow_env import DAG_ID, airflow_cli, latest_xcom, migrate  # noqa: E402
from devkit.app_db import build_app_database  # noqa: E402
from devkit.pg import PgServer  # noqa: E402
from devkit.pipeline import run_pipeline  # noqa: E402
from devkit.workload import WRITE_KINDS, AppWorkload, WorkloadResult  # noqa: E402
from fk_maintenance.keys.settings import RunSettings  # noqa: E402
from fk_maintenance.keys.spec import VISION_KPIS_PARENT_FK as SPEC  # noqa: E402

SEED = 42
ORPHAN_RATIO = 0.01
LOCK_TIMEOUT_MS = 2000
BLOCKER_SECONDS = 5.0
BLOCKER_OPEN_BEFORE = 1.0

NAIVE_MIGRATION = [
    # What applying a generated Drizzle migration does: one transaction, validated FK, plain index.
    "UPDATE vision_kpis c SET parent_kpi_id = NULL WHERE c.parent_kpi_id IS NOT NULL "
    "AND NOT EXISTS (SELECT 1 FROM vision_kpis p WHERE p.id = c.parent_kpi_id)",
    "ALTER TABLE vision_kpis ADD CONSTRAINT vision_kpis_parent_kpi_id_fkey FOREIGN KEY (parent_kpi_id) "
    "REFERENCES vision_kpis(id) ON DELETE SET NULL",
    "CREATE INDEX vision_kpis_parent_kpi_idx ON vision_kpis (parent_kpi_id)",
]
ANTI_JOIN_COUNT = (
    "SELECT count(*) FROM vision_kpis c WHERE c.parent_kpi_id IS NOT NULL "
    "AND NOT EXISTS (SELECT 1 FROM vision_kpis p WHERE p.id = c.parent_kpi_id)"
)
NOT_IN_COUNT = "SELECT count(*) FROM vision_kpis c WHERE c.parent_kpi_id NOT IN (SELECT id FROM vision_kpis)"


class Bench:
    def __init__(self, server: PgServer, home: Path) -> None:
        self.server = server
        self.home = home
        self._templates: dict[tuple[int, float], str] = {}

    def fresh(self, rows: int, orphan_ratio: float = ORPHAN_RATIO) -> str:
        """A database with the generated data: built once per size into a template, then copied (a file copy
        is much faster than generating 10M rows again, and every copy holds exactly the same rows)."""
        key = (rows, orphan_ratio)
        if key not in self._templates:
            template = self.server.create_database("kpi_bench_template")
            with psycopg.connect(self.server.dsn(template), autocommit=True) as conn:
                build_app_database(conn, rows, orphan_ratio=orphan_ratio, seed=SEED)
            self._templates[key] = template
        name = f"kpi_bench_{os.urandom(5).hex()}"
        with psycopg.connect(self.server.admin_dsn, autocommit=True) as conn:
            conn.execute(
                # FILE_COPY: a checkpoint and a file copy, not gigabytes of WAL for a 10M-row copy.
                sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
                    sql.Identifier(name), sql.Identifier(self._templates[key])
                )
            )
            conn.execute("CHECKPOINT")
        return name

    def drop_templates(self) -> None:
        for template in self._templates.values():
            self.server.drop_database(template)
        self._templates.clear()

    def connector(self, name: str) -> Callable[[], psycopg.Connection]:
        dsn = self.server.dsn(name)
        return lambda: psycopg.connect(dsn, autocommit=True)

    # 1. App impact -----------------------------------------------------------------------------------
    def impact_pipeline(self, rows: int) -> dict[str, Any]:
        name = self.fresh(rows)
        conf = json.dumps({"validate_now": True, "lock_timeout_ms": LOCK_TIMEOUT_MS})
        with AppWorkload(self.server.dsn(name)) as app:
            time.sleep(1.0)
            started = time.monotonic()
            result = airflow_cli(
                self.home,
                "dags",
                "test",
                DAG_ID,
                "-c",
                conf,
                kpi_db_json=self.server.airflow_connection_json(name),
                check=False,
                # Airflow's own Python runs on other hosts in production; here it shares 2 cores with the
                # database and the app, so it yields to them rather than count as a database stall.
                nice=10,
            )
            wall = time.monotonic() - started
            time.sleep(1.0)
        report = latest_xcom(self.home, "canary.report") or {}
        if result.returncode != 0 or report.get("final_state") != "converged":
            raise RuntimeError(f"the DAG did not converge:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        db_seconds = sum(step["seconds"] or 0 for step in report["steps"].values())
        self.server.drop_database(name)
        return {"app": _app(app.result), "wall_s": round(wall, 2), "db_s": round(db_seconds, 2), "report": report}

    def impact_baseline(self, rows: int, seconds: float = 8.0) -> dict[str, Any]:
        """The same workload with no migration running: the machine's own jitter, the floor of any stall."""
        name = self.fresh(rows)
        with AppWorkload(self.server.dsn(name)) as app:
            time.sleep(seconds)
        self.server.drop_database(name)
        return {"app": _app(app.result)}

    def impact_naive(self, rows: int) -> dict[str, Any]:
        name = self.fresh(rows)
        with AppWorkload(self.server.dsn(name)) as app:
            time.sleep(1.0)
            seconds = self._naive(name)
            time.sleep(1.0)
        self.server.drop_database(name)
        return {"app": _app(app.result), "db_s": round(seconds, 2)}

    def _naive(self, name: str) -> float:
        with psycopg.connect(self.server.dsn(name)) as conn:
            started = time.monotonic()
            for statement in NAIVE_MIGRATION:
                conn.execute(statement)
            conn.commit()
            return time.monotonic() - started

    def impact_with_blocker(self, rows: int, *, naive: bool) -> dict[str, Any]:
        """A long app transaction (open BLOCKER_OPEN_BEFORE s already) holds a row lock when the migration
        reaches its constraint, and ends BLOCKER_SECONDS after it began."""
        name = self.fresh(rows)
        connect = self.connector(name)
        settings = RunSettings(validate_now=True, lock_timeout_ms=LOCK_TIMEOUT_MS, lock_attempts=20)
        if not naive:
            # Everything up to the constraint first, so the blocker meets ADD CONSTRAINT itself.
            from fk_maintenance.steps.index import create_index_concurrently
            from fk_maintenance.steps.orphans import null_orphans

            with connect() as conn:
                null_orphans(conn, SPEC, settings, "bench")
                create_index_concurrently(conn, SPEC, settings)
        with AppWorkload(self.server.dsn(name)) as app:
            time.sleep(0.5)
            blocker = psycopg.connect(self.server.dsn(name))
            blocker.execute(
                "UPDATE vision_kpis SET title = title WHERE id = (SELECT id FROM vision_kpis "
                "WHERE level = 'yearly' LIMIT 1)"
            )
            release = threading.Timer(BLOCKER_SECONDS, blocker.rollback)
            release.start()
            time.sleep(BLOCKER_OPEN_BEFORE)
            started = time.monotonic()
            if naive:
                self._naive(name)
            else:
                run_pipeline(connect, SPEC, settings, "bench")
            seconds = time.monotonic() - started
            release.join()
            blocker.close()
            time.sleep(0.5)
        self.server.drop_database(name)
        return {"app": _app(app.result), "seconds": round(seconds, 2)}

    # 2. Cost against the floor -----------------------------------------------------------------------
    def steps(self, rows: int) -> dict[str, float]:
        name = self.fresh(rows)
        results = run_pipeline(self.connector(name), SPEC, RunSettings(validate_now=True), "bench")
        self.server.drop_database(name)
        return {step: float(info["seconds"] or 0) for step, info in results["report"]["steps"].items()} | {
            "resweep": float(results["validate_fk"]["resweep"].get("seconds", 0.0))
        }

    def floor(self, rows: int) -> dict[str, float]:
        name = self.fresh(rows)
        timings: dict[str, float] = {}
        with psycopg.connect(self.server.dsn(name), autocommit=True) as conn:
            for label, statement in [
                ("detect_orphans", ANTI_JOIN_COUNT),
                ("null_orphans", NAIVE_MIGRATION[0]),
                (
                    "create_index_concurrently",
                    "CREATE INDEX CONCURRENTLY vision_kpis_parent_kpi_idx ON vision_kpis (parent_kpi_id)",
                ),
                ("add_fk_not_valid", NAIVE_MIGRATION[1] + " NOT VALID"),
                ("validate_fk", "ALTER TABLE vision_kpis VALIDATE CONSTRAINT vision_kpis_parent_kpi_id_fkey"),
            ]:
                started = time.monotonic()
                conn.execute(statement)
                timings[label] = time.monotonic() - started
        self.server.drop_database(name)
        return timings

    # 3. NOT IN -----------------------------------------------------------------------------------------
    def not_in(self, rows: int, cap_s: int) -> dict[str, Any]:
        name = self.fresh(rows)
        with psycopg.connect(self.server.dsn(name), autocommit=True) as conn:
            started = time.monotonic()
            anti = conn.execute(ANTI_JOIN_COUNT).fetchone()[0]
            anti_s = time.monotonic() - started
            conn.execute("SELECT set_config('statement_timeout', %s, false)", [f"{cap_s}s"])
            started = time.monotonic()
            try:
                conn.execute(NOT_IN_COUNT).fetchone()
                capped = False
            except pgerrors.QueryCanceled:
                capped = True
            not_in_s = time.monotonic() - started
        self.server.drop_database(name)
        return {
            "anti_join_s": round(anti_s, 3),
            "orphans": anti,
            "not_in_s": round(not_in_s, 3),
            "capped": capped,
            "ratio": round(not_in_s / anti_s, 1) if anti_s else None,
        }


def _app(result: WorkloadResult) -> dict[str, Any]:
    return {
        **result.latency(WRITE_KINDS),
        "reads_max_ms": result.latency(("read",))["max_ms"],
        "statements": len(result.ops),
        "failed": len(result.errors()),
    }


def parse_time() -> dict[str, float]:
    """The DAG file in a fresh interpreter: Airflow's own import, then our file on top of it."""
    probe = (
        "import time, runpy, sys\n"
        f"sys.path.insert(0, {str(REPO / 'plugins')!r})\n"
        "t0 = time.perf_counter(); import airflow.sdk, airflow.timetables.trigger; t1 = time.perf_counter()\n"
        f"runpy.run_path({str(REPO / 'dags' / 'foreign_key_dags.py')!r}); t2 = time.perf_counter()\n"
        "print('TIMES', t1 - t0, t2 - t1)\n"
    )
    samples = []
    for _ in range(5):
        out = subprocess.run(
            [sys.executable, "-c", probe],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        ).stdout
        # Airflow may log to stdout while importing; the figures are on their own marked line.
        times = next(line.split()[1:] for line in out.splitlines() if line.startswith("TIMES "))
        samples.append((float(times[0]), float(times[1])))
    airflow_import = sorted(s[0] for s in samples)[len(samples) // 2]
    dag_file = sorted(s[1] for s in samples)[len(samples) // 2]
    return {"airflow_import_s": round(airflow_import, 3), "dag_file_s": round(dag_file, 3)}


def machine() -> dict[str, Any]:
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(memory_gib, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


SECTIONS = ("impact", "cost", "not_in")


def run(
    sizes: list[int],
    not_in_cap: int,
    *,
    hot_lock_rows: int = 0,
    memory_orphans: list[int] | None = None,
    sections: tuple[str, ...] = SECTIONS,
) -> dict[str, Any]:
    server = PgServer.embedded()
    home = Path(tempfile.mkdtemp(prefix="kpi-bench-airflow-"))
    try:
        migrate(home)
        bench = Bench(server, home)
        with psycopg.connect(server.admin_dsn) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
        results: dict[str, Any] = {
            "machine": machine() | {"postgresql": version},
            "parse": parse_time(),
            "lock_timeout_ms": LOCK_TIMEOUT_MS,
            "sizes": {},
        }
        for rows in sizes:
            print(f"... {rows} rows", file=sys.stderr, flush=True)
            size: dict[str, Any] = {}
            if "impact" in sections:
                size["baseline"] = bench.impact_baseline(rows)
                size["pipeline"] = bench.impact_pipeline(rows)
                size["pipeline"].pop("report")
                size["naive"] = bench.impact_naive(rows)
                size["pipeline_blocked"] = bench.impact_with_blocker(rows, naive=False)
                size["naive_blocked"] = bench.impact_with_blocker(rows, naive=True)
            if "cost" in sections:
                size["steps"] = bench.steps(rows)
                size["floor"] = bench.floor(rows)
            if "not_in" in sections:
                size["not_in"] = bench.not_in(rows, not_in_cap)
            results["sizes"][str(rows)] = size
            print(json.dumps({rows: size}), file=sys.stderr, flush=True)  # kept even if a later section fails
            bench.drop_templates()  # a 10M-row template is 2.7 GB: one size at a time on disk
        if hot_lock_rows or memory_orphans:
            from bench import contention

            results["contention"] = contention.run(
                bench, hot_lock_rows=hot_lock_rows, memory_orphans=memory_orphans or []
            )
        return results
    finally:
        server.stop()


FLOOR_OF = {
    "detect_orphans": "one anti-join count",
    "null_orphans": "one set-based UPDATE",
    "create_index_concurrently": "one CREATE INDEX CONCURRENTLY",
    "add_fk_not_valid": "one ADD CONSTRAINT NOT VALID",
    "validate_fk": "one VALIDATE CONSTRAINT",
}


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"Machine: {m['cores']} cores, {m['memory_gib']} GiB, PostgreSQL {m['postgresql']}, Python {m['python']}; "
        f"lock_timeout {results['lock_timeout_ms']} ms; ~1% orphans.",
    ]
    measured = results["sizes"]
    impact = {rows: size for rows, size in measured.items() if "pipeline" in size}
    cost = {rows: size for rows, size in measured.items() if "steps" in size}
    not_in = {rows: size for rows, size in measured.items() if "not_in" in size}
    if impact:
        lines += _impact_lines(impact)
    if cost:
        lines += _cost_lines(cost)
    if not_in:
        lines += _not_in_lines(not_in)
    p = results["parse"]
    lines += [
        "",
        f"**Airflow overhead**: DAG file parse {p['dag_file_s'] * 1000:.0f} ms on top of Airflow's own "
        f"import ({p['airflow_import_s'] * 1000:.0f} ms), fresh interpreter, median of 5.",
    ]
    if impact:
        lines += [
            "",
            "| rows | whole run wall s (airflow dags test) | database s | overhead s |",
            "| ---: | ---: | ---: | ---: |",
        ]
        for rows, size in impact.items():
            pipe = size["pipeline"]
            lines.append(f"| {int(rows):,} | {pipe['wall_s']} | {pipe['db_s']} | {pipe['wall_s'] - pipe['db_s']:.2f} |")
    if len(cost) >= 2:
        lines += _scaling_lines(cost)
    if "contention" in results:
        from bench import contention

        lines += contention.markdown(results["contention"])
    return "\n".join(lines)


def _impact_lines(sizes: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "**App impact** (4 app client processes: 3 writing (inserts, parent moves, leaf deletes), 1 reading "
        "children by parent)",
        "",
        "| rows | migration | app writes p50 ms | p99 ms | worst ms | failed app statements |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for rows, size in sizes.items():
        for key, label in [
            ("baseline", "none (the app alone)"),
            ("pipeline", "this pipeline (airflow dags test)"),
            ("naive", "naive (one transaction)"),
            ("pipeline_blocked", "this pipeline, long app transaction open"),
            ("naive_blocked", "naive, long app transaction open"),
        ]:
            app = size[key]["app"]
            lines.append(
                f"| {int(rows):,} | {label} | {app['p50_ms']} | {app['p99_ms']} | {app['max_ms']} | {app['failed']} |"
            )
    lines += [
        "",
        "| rows | worst stall, naive / pipeline | with a long transaction open | pipeline / app alone, worst | p99 |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for rows, size in sizes.items():
        plain = size["naive"]["app"]["max_ms"] / max(size["pipeline"]["app"]["max_ms"], 0.001)
        blocked = size["naive_blocked"]["app"]["max_ms"] / max(size["pipeline_blocked"]["app"]["max_ms"], 0.001)
        alone = size["baseline"]["app"]
        worst = size["pipeline"]["app"]["max_ms"] / max(alone["max_ms"], 0.001)
        p99 = size["pipeline"]["app"]["p99_ms"] / max(alone["p99_ms"], 0.001)
        lines.append(f"| {int(rows):,} | {plain:.1f}x | {blocked:.1f}x | {worst:.2f}x | {p99:.2f}x |")
    return lines


def _cost_lines(sizes: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "**Cost against the floor** (database seconds, no app load)",
        "",
        "| rows | step | pipeline s | floor s | floor | ratio |",
        "| ---: | --- | ---: | ---: | --- | ---: |",
    ]
    for rows, size in sizes.items():
        total_ours = total_floor = 0.0
        for step, what in FLOOR_OF.items():
            ours, floor = size["steps"][step], size["floor"][step]
            total_ours += ours
            total_floor += floor
            note = " (incl. orphan re-sweep)" if step == "validate_fk" else ""
            lines.append(
                f"| {int(rows):,} | {step}{note} | {ours:.2f} | {floor:.2f} | {what} | "
                f"{ours / floor if floor else float('nan'):.2f}x |"
            )
        lines.append(
            f"| {int(rows):,} | **total** | {total_ours:.2f} | {total_floor:.2f} | | "
            f"**{total_ours / total_floor:.2f}x** |"
        )
        lines.append(f"| {int(rows):,} | preflight (verification, no floor) | {size['steps']['preflight']:.2f} | | | |")
        lines.append(
            f"| {int(rows):,} | post_checks, with the hierarchy walk (verification, no floor) | "
            f"{size['steps']['post_checks']:.2f} | | | |"
        )
    return lines


def _not_in_lines(sizes: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "**Orphan query**: `NOT IN (SELECT id ...)` against the `NOT EXISTS` anti-join",
        "",
        "| rows | anti-join s | NOT IN s | ratio |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for rows, size in sizes.items():
        n = size["not_in"]
        capped = ">= " if n["capped"] else ""
        lines.append(
            f"| {int(rows):,} | {n['anti_join_s']} | {capped}{n['not_in_s']}"
            f"{' (capped)' if n['capped'] else ''} | {capped}{n['ratio']}x |"
        )
    return lines


def _scaling_lines(sizes: dict[str, Any]) -> list[str]:
    keys = list(sizes)
    lines: list[str] = []
    if len(keys) >= 2:
        small, large = sizes[keys[0]], sizes[keys[1]]
        factor = int(keys[1]) / int(keys[0])
        lines += [
            "",
            f"**Scaling** {int(keys[0]):,} -> {int(keys[1]):,} rows ({factor:.0f}x the data)",
            "",
            "| step | time ratio |",
            "| --- | ---: |",
        ]
        for step in [*FLOOR_OF, "post_checks"]:
            a, b = small["steps"][step], large["steps"][step]
            lines.append(f"| {step} | {b / a if a else float('nan'):.1f}x |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000000,10000000", help="comma-separated row counts")
    parser.add_argument("--not-in-cap", type=int, default=60, help="seconds the NOT IN query may run")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "latest.json")
    parser.add_argument(
        "--hot-lock-rows", type=int, default=100_000, help="table size of the hot-lock scenarios (0: skip)"
    )
    parser.add_argument(
        "--memory-orphans", default="100000,1000000", help="orphan counts of the worker-memory scenario ('' skips)"
    )
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"which per-size sections to measure ({', '.join(SECTIONS)})"
    )
    args = parser.parse_args()
    results = run(
        [int(s) for s in args.sizes.split(",") if s],
        args.not_in_cap,
        hot_lock_rows=args.hot_lock_rows,
        memory_orphans=[int(s) for s in args.memory_orphans.split(",") if s],
        sections=tuple(section for section in args.sections.split(",") if section),
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(markdown(results))
    print(f"\n(figures written to {args.json})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
