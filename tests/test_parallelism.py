"""The parallel workers of each step: by default decided right before the step from the server's cores, its
limits and its busy sessions, and logged with the reason; an explicit setting wins. Against a real server."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import psycopg
from psycopg import sql

from fk_maintenance.db.parallelism import (
    ServerParallelism,
    choose_parallel_workers,
    read_server_parallelism,
)
from fk_maintenance.db.session import step_session
from fk_maintenance.keys.settings import AUTO_PARALLEL_WORKERS, SERVER_PARALLEL_WORKERS, RunSettings

AUTO = RunSettings(validate_now=True)
PARALLEL_SETTINGS = ("max_parallel_workers_per_gather", "max_parallel_maintenance_workers")


def _parallel_settings(conn: psycopg.Connection) -> dict[str, int]:
    rows = conn.execute("SELECT name, setting::int FROM pg_settings WHERE name = ANY(%s)", [list(PARALLEL_SETTINGS)])
    return dict(rows.fetchall())


@contextmanager
def _busy_sessions(dsn: str, count: int, *, statement: str, every_s: float) -> Iterator[None]:
    """``count`` app sessions running ``statement`` every ``every_s`` seconds until the block ends."""
    stop = threading.Event()

    def work() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.is_set():
                conn.execute(statement)
                stop.wait(every_s)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # every session connected and at work
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)


def test_the_default_is_auto_and_minus_one_still_means_the_servers_own_settings(db) -> None:
    assert RunSettings().parallel_workers == AUTO_PARALLEL_WORKERS
    db.execute(sql.SQL("ALTER DATABASE {} SET max_parallel_workers_per_gather = 3").format(sql.Identifier(db.name)))
    server_own = replace(AUTO, parallel_workers=SERVER_PARALLEL_WORKERS)
    with db.connect() as conn, step_session(conn, "detect_orphans", server_own, statement_timeout_ms=60_000):
        assert _parallel_settings(conn)["max_parallel_workers_per_gather"] == 3


def test_auto_leaves_every_core_to_sessions_busy_on_the_server_and_says_so(db, caplog) -> None:
    with db.connect() as conn:
        cores = read_server_parallelism(conn).cpus
    # As many sessions as the server has cores, each running a statement all the time.
    busy = _busy_sessions(db.dsn, cores, statement="SELECT pg_sleep(0.2)", every_s=0.0)
    logs = caplog.at_level(logging.INFO, logger="fk_maintenance.db.parallelism")
    with (
        busy,
        logs,
        db.connect() as conn,
        step_session(conn, "create_index_concurrently", AUTO, statement_timeout_ms=60_000),
    ):
        inside = _parallel_settings(conn)
    assert inside == dict.fromkeys(PARALLEL_SETTINGS, 0)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("create_index_concurrently:"))
    assert "0 parallel workers per query, 0 for an index build (auto:" in line
    assert f"{cores} cores" in line and "other sessions busy" in line


def test_auto_counts_a_session_idle_right_now_as_busy_for_a_second_after_its_statement(db) -> None:
    # An app session writing every 10 ms is idle at almost every instant: a snapshot of state = 'active' alone
    # would not see it. One statement, then idle: busy for a second, then no longer.
    with db.connect() as conn, db.connect() as app:
        app.execute("SELECT 1")
        state = conn.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", [app.info.backend_pid]).fetchone()
        just_after = read_server_parallelism(conn).busy_sessions
        time.sleep(1.5)
        later = read_server_parallelism(conn).busy_sessions
    assert state == ("idle",)
    assert just_after - later >= 1


def test_an_explicit_parallel_workers_wins_over_the_load_and_the_servers_settings(db) -> None:
    db.execute(sql.SQL("ALTER DATABASE {} SET max_parallel_maintenance_workers = 0").format(sql.Identifier(db.name)))
    with _busy_sessions(db.dsn, 2, statement="SELECT pg_sleep(0.2)", every_s=0.0), db.connect() as conn:
        with step_session(
            conn, "create_index_concurrently", replace(AUTO, parallel_workers=3), statement_timeout_ms=60_000
        ):
            inside = _parallel_settings(conn)
        after = _parallel_settings(conn)
    assert inside == dict.fromkeys(PARALLEL_SETTINGS, 3)
    assert after["max_parallel_maintenance_workers"] == 0  # the step's choice ends with the step


def test_auto_never_allows_more_than_the_servers_own_settings(db) -> None:
    db.execute(sql.SQL("ALTER DATABASE {} SET max_parallel_maintenance_workers = 0").format(sql.Identifier(db.name)))
    with db.connect() as conn:
        server = read_server_parallelism(conn)
        with step_session(conn, "create_index_concurrently", AUTO, statement_timeout_ms=60_000):
            inside = _parallel_settings(conn)
    assert server.maintenance == 0 and inside["max_parallel_maintenance_workers"] == 0
    assert inside["max_parallel_workers_per_gather"] <= server.per_gather


def test_the_servers_cores_are_its_backends_cpu_affinity_when_the_backend_runs_on_this_host(db) -> None:
    with db.connect() as conn:
        server = read_server_parallelism(conn)
        pid = conn.info.backend_pid
    if not os.path.exists(f"/proc/{pid}"):  # a server elsewhere (KPI_TEST_DSN): its cores are not visible
        assert "not visible from this host" in server.cpus_source
        return
    assert server.cpus == len(os.sched_getaffinity(pid))
    assert server.cpus_source.startswith("this host")


def _server(**overrides: int) -> ServerParallelism:
    values = {
        "per_gather": 2,
        "maintenance": 2,
        "max_parallel_workers": 8,
        "max_worker_processes": 8,
        "parallel_workers_running": 0,
        "busy_sessions": 0,
        "unseen_sessions": 0,
        "cpus": 2,
    }
    return ServerParallelism(**(values | overrides), cpus_source="given")  # type: ignore[arg-type]


def test_auto_gives_a_statement_the_cores_left_after_busy_sessions_and_its_own() -> None:
    choose = choose_parallel_workers
    workers = {
        "2 cores, idle": choose(-2, _server()).maintenance,
        "2 cores, one app session": choose(-2, _server(busy_sessions=1)).maintenance,
        "4 cores, one app session": choose(-2, _server(cpus=4, busy_sessions=1)).maintenance,
        "64 cores, 10 app sessions: the server's own limit": choose(-2, _server(cpus=64, busy_sessions=10)).maintenance,
        "64 cores, 6 parallel workers of others running, 8 slots": choose(
            -2, _server(cpus=64, maintenance=8, parallel_workers_running=6)
        ).maintenance,
        "16 cores, 20 sessions busy": choose(-2, _server(cpus=16, busy_sessions=20)).maintenance,
    }
    assert workers == {
        "2 cores, idle": 1,
        "2 cores, one app session": 0,
        "4 cores, one app session": 2,
        "64 cores, 10 app sessions: the server's own limit": 2,
        "64 cores, 6 parallel workers of others running, 8 slots": 2,
        "16 cores, 20 sessions busy": 0,
    }
    # The scans' and the build's limits are each capped by the server's own.
    big = choose(-2, _server(cpus=32, per_gather=1, maintenance=4))
    assert (big.per_gather, big.maintenance) == (1, 4)
    assert "GRANT pg_read_all_stats" in choose(-2, _server(busy_sessions=3, unseen_sessions=2)).reason
