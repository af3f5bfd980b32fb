"""The supporting index, built with CREATE INDEX CONCURRENTLY before the foreign key exists.

With ON DELETE SET NULL every delete of a parent looks up its children; without this index that lookup
is a scan of the whole table per deleted row. The build takes SHARE UPDATE EXCLUSIVE, which app reads and
writes do not conflict with, so a long lock_timeout here never makes the app queue.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from .catalog import inspect_target, require_target
from .errors import MaintenanceError
from .session import run_lock, step_session
from .settings import RunSettings
from .spec import ForeignKeySpec
from .sqlfiles import statement
from .topology import worst_replica_lag

log = logging.getLogger(__name__)


class BuildMonitor:
    """Polls pg_stat_progress_create_index from a second session and logs what the build waits on."""

    def __init__(self, connect: Callable[[], psycopg.Connection], builder_pid: int, poll_seconds: float) -> None:
        self._connect = connect
        self._pid = builder_pid
        self._poll = poll_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="index-build-monitor", daemon=True)
        self.waited_on: dict[int, str] = {}
        self.last_phase: str | None = None

    def __enter__(self) -> BuildMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            with self._connect() as conn:
                conn.autocommit = True
                while not self._stop.wait(self._poll):
                    self._sample(conn)
        except Exception as exc:  # the monitor only informs; it must never fail the build
            log.warning("index build monitor stopped: %s", exc)

    def _sample(self, conn: psycopg.Connection) -> None:
        row = conn.execute(statement("index", "build_progress"), {"pid": self._pid}).fetchone()
        if row is None:
            return
        (
            phase,
            lockers_total,
            lockers_done,
            locker_pid,
            blocks_total,
            blocks_done,
            tuples_total,
            tuples_done,
            locker_state,
            locker_age,
            locker_query,
        ) = row
        if phase != self.last_phase:
            log.info("create_index_concurrently: phase %r", phase)
            self.last_phase = phase
        if locker_pid:
            description = f"{locker_state or '?'}, transaction open {locker_age}: {locker_query}"
            if locker_pid not in self.waited_on:
                log.warning(
                    "create_index_concurrently: waiting (%s of %s lockers done) for pid %s (%s)",
                    lockers_done,
                    lockers_total,
                    locker_pid,
                    description,
                )
            self.waited_on[locker_pid] = description
        elif blocks_total or tuples_total:
            log.info(
                "create_index_concurrently: %s blocks %s/%s, tuples %s/%s",
                phase,
                blocks_done,
                blocks_total,
                tuples_done,
                tuples_total,
            )
        for pid, state, age, query in conn.execute(statement("index", "waiting_on"), {"pid": self._pid}).fetchall():
            if pid not in self.waited_on:
                log.warning("create_index_concurrently: blocked by pid %s (%s, open %s): %s", pid, state, age, query)
            self.waited_on[pid] = f"{state}, transaction open {age}: {query}"


def create_index_concurrently(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    settings: RunSettings,
    *,
    monitor_connect: Callable[[], psycopg.Connection] | None = None,
    poll_seconds: float = 5.0,
) -> dict[str, Any]:
    # Long on purpose: the build's SHARE UPDATE EXCLUSIVE never makes app writes queue, and a short
    # lock_timeout would kill the build whenever any long transaction is open anywhere.
    timeout_ms = settings.index_timeout_ms
    with step_session(
        conn,
        "create_index_concurrently",
        settings,
        statement_timeout_ms=timeout_ms,
        lock_timeout_ms=timeout_ms,
        read_only=settings.dry_run,
    ):
        return _create_index(conn, spec, settings, monitor_connect, poll_seconds)


def _create_index(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    settings: RunSettings,
    monitor_connect: Callable[[], psycopg.Connection] | None,
    poll_seconds: float,
) -> dict[str, Any]:
    started = time.monotonic()
    index = require_target(conn, spec).index
    if index.exists and index.valid:
        log.info("create_index_concurrently: %s already exists and is valid; nothing to do", spec.index)
        return {"action": "none (already valid)", "seconds": round(time.monotonic() - started, 3)}
    planned = "drop the INVALID leftover and rebuild" if index.exists else "build"
    if settings.dry_run:
        log.info("create_index_concurrently: dry run, would %s %s", planned, spec.index)
        return {"action": f"dry run: would {planned}", "seconds": round(time.monotonic() - started, 3)}
    with run_lock(conn, spec):
        # Re-read under the run lock: another run may have finished the index while we waited to start.
        state = inspect_target(conn, spec)
        if state.index.exists and state.index.valid:
            return {"action": "none (built by another run)", "seconds": round(time.monotonic() - started, 3)}
        dropped_invalid = False
        if state.index.exists:
            log.warning(
                "create_index_concurrently: dropping INVALID leftover index %s (%s)", spec.index, state.index.definition
            )
            conn.execute(statement("index", "drop_concurrently", spec))
            dropped_invalid = True
        waited_on: dict[int, str] = {}
        if monitor_connect is not None:
            with BuildMonitor(monitor_connect, conn.info.backend_pid, poll_seconds) as monitor:
                conn.execute(statement("index", "create_concurrently", spec))
            waited_on = monitor.waited_on
        else:
            conn.execute(statement("index", "create_concurrently", spec))
        after = inspect_target(conn, spec).index
        if not (after.exists and after.valid and after.matches):
            raise MaintenanceError(
                f"create_index_concurrently: {spec.index} is not a valid matching index after the build "
                f"({after.definition or 'missing'}); the next attempt drops and rebuilds it"
            )
    seconds = time.monotonic() - started
    # The build cannot be throttled for replicas; what it cost them is reported instead.
    lag = worst_replica_lag(conn)
    log.info(
        "create_index_concurrently: %s built in %.1f s%s",
        spec.index,
        seconds,
        "" if lag is None else f"; worst replica replay lag right after: {lag:.1f} s",
    )
    return {
        "action": "rebuilt (dropped INVALID leftover)" if dropped_invalid else "built",
        "waited_on_sessions": [f"pid {pid}: {what}" for pid, what in waited_on.items()],
        "replica_lag_after_s": lag,
        "seconds": round(seconds, 3),
    }
