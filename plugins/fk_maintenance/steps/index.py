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
from psycopg import sql

from fk_maintenance.db.catalog import index_on, inspect_target, partition_index_name, require_target, still_partition
from fk_maintenance.db.session import (
    CONFLICTS_WITH_ACCESS_EXCLUSIVE,
    CONFLICTS_WITH_SHARE,
    LockAttempts,
    budgeted_statement,
    run_lock,
    step_session,
    with_lock_retries,
)
from fk_maintenance.db.sqlfiles import statement
from fk_maintenance.db.target_state import IndexState, PartitionInfo, TargetState
from fk_maintenance.db.topology import worst_replica_lag
from fk_maintenance.errors import MaintenanceError
from fk_maintenance.keys.settings import RunSettings
from fk_maintenance.keys.spec import ForeignKeySpec

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
    if not spec.build_index:
        # The key declares no index of its own (keys.drizzle): the app's schema tool would drop one as drift.
        return {"action": "none (the key declares no index; see preflight's warning)", "seconds": 0.0}
    state = require_target(conn, spec)
    if state.index.exists and state.index.valid:
        if state.index.name:
            log.info(
                "create_index_concurrently: %s already serves the key; it is used, none is built", state.index.name
            )
            return {"action": f"none (uses {state.index.name})", "seconds": round(time.monotonic() - started, 3)}
        log.info("create_index_concurrently: %s already exists and is valid; nothing to do", spec.index)
        return {"action": "none (already valid)", "seconds": round(time.monotonic() - started, 3)}
    if settings.dry_run:
        planned = _planned(state)
        log.info("create_index_concurrently: dry run, would %s %s", planned, spec.index)
        return {"action": f"dry run: would {planned}", "seconds": round(time.monotonic() - started, 3)}
    with run_lock(conn, spec):
        # Re-read under the run lock: another run may have finished the index while we waited to start.
        state = inspect_target(conn, spec)
        if state.index.exists and state.index.valid:
            return {"action": "none (built by another run)", "seconds": round(time.monotonic() - started, 3)}
        build = _build_on_partitions if state.partitioned else _build_on_table
        result = build(conn, spec, settings, state, monitor_connect, poll_seconds)
        after = inspect_target(conn, spec).index
        if not (after.exists and after.valid and after.matches):
            raise MaintenanceError(
                f"create_index_concurrently: {spec.index} is not a valid matching index after the build "
                f"({after.definition or 'missing'}); the next attempt goes on from where this one stopped"
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
    return {**result, "replica_lag_after_s": lag, "seconds": round(seconds, 3)}


def _planned(state: TargetState) -> str:
    if not state.partitioned:
        return "drop the INVALID leftover and rebuild" if state.index.exists else "build"
    todo = [part.described for part in state.partitions if part.attached_index is None]
    return f"build and attach the index of {len(todo)} of {len(state.partitions)} partition(s) ({', '.join(todo)})"


def _build_on_table(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    settings: RunSettings,
    state: TargetState,
    monitor_connect: Callable[[], psycopg.Connection] | None,
    poll_seconds: float,
) -> dict[str, Any]:
    waited_on = build_concurrently(
        conn, spec, (spec.schema, spec.table), spec.index, state.index, monitor_connect, poll_seconds
    )
    return {
        "action": "rebuilt (dropped INVALID leftover)" if state.index.exists else "built",
        "waited_on_sessions": waited_on,
    }


def build_concurrently(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    table: tuple[str, str],
    index: str,
    existing: IndexState,
    monitor_connect: Callable[[], psycopg.Connection] | None,
    poll_seconds: float,
) -> list[str]:
    """CREATE INDEX CONCURRENTLY ``index`` on ``table`` (the child, or one partition), first dropping an INVALID
    leftover of a killed build (``existing``); returns the sessions the build waited on."""
    names = {"table": sql.Identifier(*table), "index": sql.Identifier(index)}
    qualified = {"qualified_index": sql.Identifier(table[0], index)}
    if existing.exists:
        log.warning("create_index_concurrently: dropping INVALID leftover index %s (%s)", index, existing.definition)
        conn.execute(statement("index", "drop_concurrently", spec, **qualified))
    if monitor_connect is None:
        conn.execute(statement("index", "create_concurrently", spec, **names))
        return []
    with BuildMonitor(monitor_connect, conn.info.backend_pid, poll_seconds) as monitor:
        conn.execute(statement("index", "create_concurrently", spec, **names))
    return [f"pid {pid}: {what}" for pid, what in monitor.waited_on.items()]


def _build_on_partitions(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    settings: RunSettings,
    state: TargetState,
    monitor_connect: Callable[[], psycopg.Connection] | None,
    poll_seconds: float,
) -> dict[str, Any]:
    """The parent's index ON ONLY the parent, then each partition's built concurrently and attached; the parent's
    turns valid with the last attach. Each partition is done or not by the catalog, so a run killed anywhere
    goes on from the first partition without an attached index (a partition created since already has one)."""
    record = LockAttempts()
    if not state.index.exists:
        with_lock_retries(
            conn,
            spec,
            "create_index_concurrently (ON ONLY the parent)",
            budgeted_statement(conn, settings, statement("index", "create_on_only", spec)),
            settings=settings,
            record=record,
            avoid_queueing_behind=CONFLICTS_WITH_SHARE,
            tables=((spec.schema, spec.table),),
            whole_trees=False,  # SHARE on the parent alone: writes straight into a partition never meet it
        )
    built, adopted, attached, waited_on = [], [], [], []
    # Listed again once the list is done: the app may create or attach partitions meanwhile (those get the
    # index from PostgreSQL itself, so the second look usually finds none). One look per pass, not per partition:
    # each look reads every partition's state.
    while todo := [part for part in require_target(conn, spec).partitions if part.attached_index is None]:
        for part in todo:
            if not still_partition(conn, state, part):
                continue
            name, how, waited = _partition_index(conn, spec, state, part, monitor_connect, poll_seconds)
            if how == "built":
                built.append(part.described)
            elif how == "adopted":
                adopted.append(f"{part.described}: {name}")
            waited_on += waited
            _attach(conn, spec, settings, part, name, record)
            attached.append(part.described)
            log.info("create_index_concurrently: %s %s and attached on %s", name, how, part.described)
    return {
        "action": f"built on {len(built)} and attached {len(attached)} partition(s)",
        "partitions_built": built,
        **({"partitions_index_adopted": adopted} if adopted else {}),
        "partitions_attached": attached,
        "partitions": len(inspect_target(conn, spec).partitions),
        "lock_timeouts": record.lock_timeouts,
        "waited_on_sessions": waited_on,
    }


def _partition_index(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    state: TargetState,
    part: PartitionInfo,
    monitor_connect: Callable[[], psycopg.Connection] | None,
    poll_seconds: float,
) -> tuple[str, str, list[str]]:
    """The index to attach on one partition, and how it came to be: ours, already there ("found"); the
    partition's own on exactly the key's columns ("adopted": no second index is built beside it); or ours,
    built concurrently now ("built"). Also the sessions a build waited on."""
    name = partition_index_name(spec, part.name)
    existing = index_on(conn, spec, (part.schema, name), part.qualified, part.oid, state)
    if existing.exists and existing.valid:
        return name, "found", []
    serving = None if existing.exists else _unattached_index_on_columns(conn, spec, part)
    if serving is not None:
        return serving, "adopted", []
    waited = build_concurrently(conn, spec, part.qualified, name, existing, monitor_connect, poll_seconds)
    return name, "built", waited


def _unattached_index_on_columns(conn: psycopg.Connection, spec: ForeignKeySpec, part: PartitionInfo) -> str | None:
    row = conn.execute(
        statement("catalog", "unattached_index_on_columns"), {"relid": part.oid, "columns": list(spec.columns)}
    ).fetchone()
    return row[0] if row else None


def _attach(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    settings: RunSettings,
    part: PartitionInfo,
    name: str,
    record: LockAttempts,
) -> None:
    attach = statement("index", "attach", spec, partition_index=sql.Identifier(part.schema, name))
    with_lock_retries(
        conn,
        spec,
        f"create_index_concurrently (attach on {part.described})",
        budgeted_statement(conn, settings, attach),
        settings=settings,
        record=record,
        avoid_queueing_behind=CONFLICTS_WITH_ACCESS_EXCLUSIVE,
        tables=(part.qualified,),
    )
