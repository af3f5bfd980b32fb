"""A key on a partitioned child table (issue 18): the app's writes during the whole run against the app alone in
the same run, and the run's database time against the floor.

    python -m bench.partitioned [--rows 10000000] [--partitions 10] [--major 18] [--json bench/results/partitioned.json]

The child is range-partitioned by day into ``--partitions`` partitions (the last one the DEFAULT), 1% of its
rows point at a missing device. The app is one session writing every 10 ms through the parent into a random
partition (an insert, or a reading moved to another device). The run is the pipeline's steps in the DAG's order,
run by the library itself (devkit.pipeline's order, each step on its own connection). The floor is the bare
statements on a fresh copy with no app: one anti-join count, one UPDATE, one CREATE INDEX on the parent (which
builds every partition's), one ADD CONSTRAINT (validated, a scan of every partition).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "plugins"), str(REPO)]

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from bench.run import machine  # noqa: E402
from devkit.pg import PgServer  # noqa: E402
from fk_maintenance.keys.settings import RunSettings  # noqa: E402
from fk_maintenance.keys.spec import ForeignKeySpec  # noqa: E402
from fk_maintenance.steps.registry import APPROVED_ORPHANS, MONITOR_CONNECT, RUN_ID, RUN_STARTED_AT, STEPS  # noqa: E402

SPEC = ForeignKeySpec(
    schema="public",
    table="readings",
    columns=("device_id",),
    ref_table="devices",
    ref_columns=("id",),
    row_key=("id", "taken_on"),
    constraint="readings_device_id_fkey",
    index="readings_device_id_idx",
    audit_table="readings_orphan_audit",
)
DEVICES = 10_000
DAYS = 3650
FIRST_DAY = datetime(2017, 1, 1)
APP_WRITE_EVERY_S = 0.010
ALONE_S = 20.0
FLOOR = {
    "detect_orphans": "SELECT count(*) FROM readings c WHERE device_id IS NOT NULL "
    "AND NOT EXISTS (SELECT 1 FROM devices p WHERE p.id = c.device_id)",
    "null_orphans": "UPDATE readings c SET device_id = NULL WHERE device_id IS NOT NULL "
    "AND NOT EXISTS (SELECT 1 FROM devices p WHERE p.id = c.device_id)",
    "create_index_concurrently": "CREATE INDEX readings_device_id_idx ON readings (device_id)",
    "add_fk_not_valid": "SELECT 1",  # the floor's key is added validated, below
    "validate_fk": "ALTER TABLE readings ADD CONSTRAINT readings_device_id_fkey FOREIGN KEY (device_id) "
    "REFERENCES devices (id) ON DELETE SET NULL",
}


def build(conn: psycopg.Connection, rows: int, partitions: int) -> None:
    conn.execute("CREATE TABLE devices (id int PRIMARY KEY, label text)")
    conn.execute(f"INSERT INTO devices SELECT g, 'device ' || g FROM generate_series(1, {DEVICES}) g")
    conn.execute(
        "CREATE TABLE readings (id bigserial, taken_on date NOT NULL, device_id int, value float8, "
        "PRIMARY KEY (id, taken_on)) PARTITION BY RANGE (taken_on)"
    )
    span = DAYS // partitions
    for number in range(partitions - 1):
        start, end = FIRST_DAY + timedelta(days=span * number), FIRST_DAY + timedelta(days=span * (number + 1))
        conn.execute(
            sql.SQL("CREATE TABLE {} PARTITION OF readings FOR VALUES FROM ({}) TO ({})").format(
                sql.Identifier(f"readings_p{number}"), sql.Literal(start.date()), sql.Literal(end.date())
            )
        )
    conn.execute("CREATE TABLE readings_default PARTITION OF readings DEFAULT")
    conn.execute(
        f"""INSERT INTO readings (taken_on, device_id, value)
            SELECT date '{FIRST_DAY.date()}' + g % {DAYS},
                   CASE WHEN g % 100 = 0 THEN {DEVICES} + 1 + g % 97 ELSE 1 + g % {DEVICES} END, g
            FROM generate_series(1, {rows}) g"""
    )
    conn.execute("VACUUM ANALYZE")


class App(threading.Thread):
    """One session writing every 10 ms through the parent into a random partition; each write timed."""

    def __init__(self, dsn: str, rows: int) -> None:
        super().__init__(daemon=True)
        self.dsn, self.rows = dsn, rows
        self.stop = threading.Event()
        self.writes: list[tuple[float, float, str | None]] = []  # (started, seconds, error)

    def run(self) -> None:
        import random

        rng = random.Random(5)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.stop.is_set():
                started = time.time()
                error = None
                try:
                    if rng.random() < 0.5:
                        conn.execute(
                            "INSERT INTO readings (taken_on, device_id, value) VALUES (%s, %s, 1)",
                            [(FIRST_DAY + timedelta(days=rng.randrange(DAYS + 200))).date(), rng.randint(1, DEVICES)],
                        )
                    else:
                        conn.execute(
                            "UPDATE readings SET device_id = %s WHERE id = %s AND device_id <= %s",
                            [rng.randint(1, DEVICES), rng.randint(1, self.rows), DEVICES],
                        )
                except psycopg.Error as exc:
                    error = type(exc).__name__
                self.writes.append((started, time.time() - started, error))
                time.sleep(APP_WRITE_EVERY_S)


def latency(writes: list[tuple[float, float, str | None]]) -> dict[str, Any]:
    seconds = sorted(w[1] for w in writes)
    if not seconds:
        return {"count": 0}
    return {
        "count": len(seconds),
        "p50_ms": round(statistics.median(seconds) * 1000, 1),
        "p99_ms": round(seconds[min(len(seconds) - 1, int(len(seconds) * 0.99))] * 1000, 1),
        "max_ms": round(seconds[-1] * 1000, 1),
        "errors": sum(1 for w in writes if w[2]),
    }


def copy_of(server: PgServer, template: str) -> str:
    name = server.create_database("kpi_bench_part_copy")
    server.drop_database(name)
    with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        )
        conn.execute("CHECKPOINT")
    return name


def measure(server: PgServer, template: str, rows: int) -> dict[str, Any]:
    name = copy_of(server, template)
    dsn = server.dsn(name)

    def connect() -> psycopg.Connection:
        return psycopg.connect(dsn, autocommit=True)

    settings = RunSettings(validate_now=True)
    available = {RUN_ID: "bench", RUN_STARTED_AT: datetime.now(UTC), MONITOR_CONNECT: connect, APPROVED_ORPHANS: None}
    steps: dict[str, float] = {}
    app = App(dsn, rows)
    app.start()
    time.sleep(1.0)
    alone_from = time.time()
    time.sleep(ALONE_S)
    run_from = time.time()
    for step in STEPS:
        started = time.monotonic()
        with connect() as conn:
            result = step.load()(conn, SPEC, settings, **{n: available[n] for n in step.needs})
        steps[step.name] = round(time.monotonic() - started, 2)
        if step.name == "validate_fk":
            validated = f"{result.get('partitions_validated')} of {result.get('partitions')}"
    run_to = time.time()
    app.stop.set()
    app.join()
    server.drop_database(name)
    return {
        "alone": latency([w for w in app.writes if alone_from <= w[0] < run_from]),
        "run": latency([w for w in app.writes if run_from <= w[0] < run_to]),
        "run_s": round(run_to - run_from, 1),
        "steps_s": steps,
        "db_s": round(sum(steps[step] for step in FLOOR), 2),
        "partitions_validated": validated,
    }


def floor(server: PgServer, template: str) -> dict[str, float]:
    name = copy_of(server, template)
    timings: dict[str, float] = {}
    with psycopg.connect(server.dsn(name), autocommit=True) as conn:
        for label, statement in FLOOR.items():
            started = time.monotonic()
            conn.execute(statement)
            timings[label] = round(time.monotonic() - started, 2)
    server.drop_database(name)
    return timings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--partitions", type=int, default=10)
    parser.add_argument("--major", type=int, default=18, choices=(15, 16, 18))
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "partitioned.json")
    args = parser.parse_args()
    server = PgServer.embedded() if args.major == 18 else PgServer.of_major(args.major)
    try:
        template = server.create_database("kpi_bench_part")
        started = time.monotonic()
        with psycopg.connect(server.dsn(template), autocommit=True) as conn:
            build(conn, args.rows, args.partitions)
            version = conn.execute("SHOW server_version").fetchone()[0]
        print(
            f"built {args.rows} rows in {args.partitions} partitions in {time.monotonic() - started:.0f} s",
            file=sys.stderr,
        )
        run = measure(server, template, args.rows)
        bare = floor(server, template)
        results = {
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine() | {"postgresql": version},
            "rows": args.rows,
            "partitions": args.partitions,
            **run,
            "floor_steps_s": bare,
            "floor_s": round(sum(bare.values()), 2),
        }
        results["db_vs_floor"] = round(results["db_s"] / results["floor_s"], 2)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results, indent=2))
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
