"""Finding and nulling dangling parent pointers, every nulled pointer audited (its whole old key) in the same
transaction."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from itertools import groupby
from operator import itemgetter
from typing import Any

import psycopg
from psycopg import sql

from .audit import ensure_audit_table, find_audit_tables
from .catalog import TargetState, require_target
from .errors import OrphansCannotBeNulled
from .session import run_lock, set_local_timeouts, step_session
from .settings import RunSettings
from .spec import ForeignKeySpec, describe_columns
from .sqlfiles import batch_params, statement
from .topology import ReplicaGate

log = logging.getLogger(__name__)

# One batch touches batch_size rows by primary key; a minute is far beyond what that needs and still bounds
# a batch that the server cannot finish (for example, a runaway trigger on the app's table).
BATCH_STATEMENT_TIMEOUT_MS = 60_000
ORPHAN_KEYS_CURSOR = "fk_maintenance_orphan_keys"
# The anti-join scans the whole table once; bounded so a pathological plan cannot run for hours.
SCAN_STATEMENT_TIMEOUT_MS = 2 * 60 * 60 * 1000


def detect_orphans(conn: psycopg.Connection, spec: ForeignKeySpec, settings: RunSettings) -> dict[str, Any]:
    """Count orphans and distinct dangling parents, with a sample, in one anti-join scan (read-only)."""
    started = time.monotonic()
    with step_session(conn, "detect_orphans", settings, statement_timeout_ms=SCAN_STATEMENT_TIMEOUT_MS, read_only=True):
        # It runs beside this run's own index build (the graph's other branch), which a count does not mind.
        state = require_target(conn, spec, reads_only=True)
        orphans, dangling, sample = conn.execute(
            statement("orphans", "summary", spec), {"sample_size": settings.sample_size}
        ).fetchone()
    log.info(
        "detect_orphans: %d orphan row(s) pointing at %d missing parent(s) in %s.%s; sample: %s",
        orphans,
        dangling,
        spec.schema,
        spec.table,
        ", ".join(sample) or "none",
    )
    return {
        "orphans": orphans,
        "dangling_parents": dangling,
        "sample": list(sample),
        # What nulling them sets to NULL (catalog.nulled_columns): the plan and the report name it.
        "nulls": list(state.nulled),
        "seconds": round(time.monotonic() - started, 3),
    }


def null_orphans(conn: psycopg.Connection, spec: ForeignKeySpec, settings: RunSettings, run_id: str) -> dict[str, Any]:
    """Null every dangling pointer in batches, auditing each one in the batch's own transaction."""
    if settings.dry_run:
        log.info("null_orphans: dry run, nothing nulled")
        return {"skipped": "dry run", "nulled": 0, "audited": 0, "seconds": 0.0}
    with step_session(conn, "null_orphans", settings, statement_timeout_ms=BATCH_STATEMENT_TIMEOUT_MS):
        state = require_target(conn, spec)
        with run_lock(conn, spec):
            return sweep_orphans(conn, spec, settings, run_id, state, step="null_orphans")


def audited_for_run(conn: psycopg.Connection, spec: ForeignKeySpec, run_id: str) -> int:
    """How many pointers run ``run_id`` nulled, read from the audit (0 when there is no audit table yet)."""
    if find_audit_tables(conn, spec).current is None:
        return 0
    return conn.execute(statement("orphans", "audited_for_run", spec), {"run_id": run_id}).fetchone()[0]


@dataclass
class SweepProgress:
    """What the batches of one sweep did so far, logged every few seconds and returned at the end."""

    step: str
    total: int
    started: float = field(default_factory=time.monotonic)
    done: int = 0
    nulled: int = 0
    audited: int = 0
    batches: int = 0
    last_log: float = field(default_factory=time.monotonic)

    def add(self, keys: int, audited: int, nulled: int) -> None:
        self.batches += 1
        self.done += keys
        self.audited += audited
        self.nulled += nulled
        now = time.monotonic()
        if now - self.last_log >= 5 or self.done >= self.total:
            elapsed = now - self.started
            log.info(
                "%s: %d/%d keys processed (%.0f%%), %d nulled, %.0f rows/s",
                self.step,
                self.done,
                self.total,
                100 * self.done / max(self.total, 1),
                self.nulled,
                self.done / elapsed if elapsed else 0.0,
            )
            self.last_log = now

    def summary(self, replicas: ReplicaGate) -> dict[str, Any]:
        seconds = time.monotonic() - self.started
        return {
            "candidates": self.total,
            "nulled": self.nulled,
            "audited": self.audited,
            # Parent created meanwhile, row deleted, or row locked by the app (left for the re-sweep).
            "left_alone": self.total - self.nulled,
            "batches": self.batches,
            "replica_waits": replicas.waits,
            "replica_wait_seconds": round(replicas.waited_seconds, 3),
            "rows_per_second": round(self.nulled / seconds, 1) if seconds else None,
            "seconds": round(seconds, 3),
        }


def sweep_orphans(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    settings: RunSettings,
    run_id: str,
    state: TargetState,
    *,
    step: str,
) -> dict[str, Any]:
    """The batches themselves, for a caller that holds the run lock.

    One anti-join scan collects the orphan keys (held by the server, streamed to us a batch at a time); each
    batch then touches only its rows by key, so the total work is one scan plus work proportional to the
    orphans, and the worker's memory does not grow with them. A batch is all or nothing: killed midway, it
    rolls back, and the next run finds the same orphans again. Every transaction sets its own timeouts, so
    this runs the same under any caller's session settings.
    """
    keys, total = _hold_orphan_keys(conn, spec, settings)
    try:
        if total and state.not_null_key:
            raise OrphansCannotBeNulled(
                f"{step}: {total} row(s) of {spec.schema}.{spec.table} point at a missing parent, and "
                f"{describe_columns(spec.columns)} {'is' if len(spec.columns) == 1 else 'are'} NOT NULL, so they "
                "cannot be nulled (written since preflight?); this step changed nothing. Delete them or point them "
                "at an existing parent in the app, then run again"
            )
        ensure_audit_table(conn, spec, state)
        log.info("%s: %d orphan pointer(s) to null in batches of %d", step, total, settings.batch_size)
        progress = SweepProgress(step, total)
        replicas = ReplicaGate(conn, settings.max_replica_lag_s, step=step)
        tables = TableNames(conn)
        while fetched := keys.fetchmany(settings.batch_size):
            # Keys come ordered by the partition they are in: a fetch that spans two is two batches.
            for table_oid, rows in groupby(fetched, key=itemgetter(0)):
                batch = [row[1:] for row in rows]
                replicas.wait()
                audited, nulled = _null_batch(
                    conn, spec, state, settings, run_id, batch, table=tables[table_oid], step=step, offset=progress.done
                )
                progress.add(len(batch), audited, nulled)
                if settings.batch_pause_ms:
                    time.sleep(settings.batch_pause_ms / 1000)
    finally:
        if not conn.closed and not conn.broken:
            keys.close()
    return progress.summary(replicas)


class TableNames(dict[int, tuple[str, str]]):
    """(schema, name) of a table by its oid, looked up once each: the partitions the orphan keys are in."""

    def __init__(self, conn: psycopg.Connection) -> None:
        super().__init__()
        self._conn = conn

    def __missing__(self, oid: int) -> tuple[str, str]:
        self[oid] = self._conn.execute(statement("catalog", "relation_name"), {"oid": oid}).fetchone()
        return self[oid]


def _hold_orphan_keys(
    conn: psycopg.Connection, spec: ForeignKeySpec, settings: RunSettings
) -> tuple[psycopg.Cursor[Any], int]:
    """A held server-side cursor over every orphan's table oid and row key, in that order, and how many it
    holds."""
    with conn.transaction():
        # The scan reads only; its statement_timeout is the scan's, the batches keep the short one. A held
        # cursor is filled when this transaction commits: one scan, sorted by key, kept by the server, so the
        # worker holds one batch of keys at a time however many orphans there are.
        set_local_timeouts(
            conn, lock_timeout_ms=settings.lock_timeout_ms, statement_timeout_ms=SCAN_STATEMENT_TIMEOUT_MS
        )
        # A cursor is planned for its first rows (cursor_tuple_fraction 0.1): an index-ordered walk with a
        # probe per row, ten times slower than the hashed anti-join at 10M rows. This one is read to the end.
        conn.execute(statement("orphans", "plan_for_all_rows"))
        keys = conn.cursor(ORPHAN_KEYS_CURSOR, withhold=True, scrollable=True)
        keys.execute(statement("orphans", "keys", spec))
    total = conn.execute(statement("orphans", "count_held_keys", cursor=sql.Identifier(ORPHAN_KEYS_CURSOR))).rowcount
    keys.scroll(0, mode="absolute")
    return keys, total


def _null_batch(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    state: TargetState,
    settings: RunSettings,
    run_id: str,
    batch: list[tuple[Any, ...]],
    *,
    table: tuple[str, str],
    step: str,
    offset: int,
) -> tuple[int, int]:
    """One batch in one short transaction: audit then null the rows still orphaned; (audited, nulled). ``table``:
    the child, or the partition the batch's rows are in."""
    with conn.transaction():
        set_local_timeouts(
            conn, lock_timeout_ms=settings.lock_timeout_ms, statement_timeout_ms=BATCH_STATEMENT_TIMEOUT_MS
        )
        audited, nulled = conn.execute(
            statement("orphans", "null_batch", spec, state, table=sql.Identifier(*table)),
            {**batch_params(spec, batch), "run_id": run_id, "audit_name": spec.audit_qualified},
        ).fetchone()
        if audited != nulled:
            # Rolling back keeps audit and data in step; this would mean a concurrent change we did not foresee,
            # so stop rather than guess.
            raise RuntimeError(f"{step}: batch at offset {offset} audited {audited} but nulled {nulled}; rolled back")
    return audited, nulled
