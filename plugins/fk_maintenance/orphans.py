"""Finding and nulling dangling parent pointers, every nulled pointer audited in the same transaction."""

from __future__ import annotations

import logging
import time
from typing import Any

import psycopg
from psycopg import sql

from .audit import ensure_audit_table
from .catalog import require_target
from .session import run_lock, set_local_timeouts, step_session
from .settings import RunSettings
from .spec import ForeignKeySpec
from .sqlfiles import statement
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
        require_target(conn, spec, reads_only=True)
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
            ensure_audit_table(conn, spec, state)
            return sweep_orphans(conn, spec, settings, run_id, step="null_orphans")


def _null_batch(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    settings: RunSettings,
    run_id: str,
    batch: list[Any],
    *,
    step: str,
    offset: int,
) -> tuple[int, int]:
    """One batch in one short transaction: audit then null the rows still orphaned; (audited, nulled)."""
    with conn.transaction():
        set_local_timeouts(
            conn, lock_timeout_ms=settings.lock_timeout_ms, statement_timeout_ms=BATCH_STATEMENT_TIMEOUT_MS
        )
        audited, nulled = conn.execute(
            statement("orphans", "null_batch", spec), {"keys": batch, "run_id": run_id}
        ).fetchone()
        if audited != nulled:
            # Rolling back keeps audit and data in step; this would mean a concurrent change we did not foresee,
            # so stop rather than guess.
            raise RuntimeError(f"{step}: batch at offset {offset} audited {audited} but nulled {nulled}; rolled back")
    return audited, nulled


def sweep_orphans(
    conn: psycopg.Connection, spec: ForeignKeySpec, settings: RunSettings, run_id: str, *, step: str
) -> dict[str, Any]:
    """The batches themselves, for a caller that holds the run lock and whose audit table exists.

    One anti-join scan collects the orphan keys (held by the server, streamed to us a batch at a time); each
    batch then touches only its rows by key, so the total work is one scan plus work proportional to the
    orphans, and the worker's memory does not grow with them. A batch is all or nothing: killed midway, it
    rolls back, and the next run finds the same orphans again. Every transaction sets its own timeouts, so
    this runs the same under any caller's session settings.
    """
    started = time.monotonic()
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
    try:
        total = conn.execute(
            statement("orphans", "count_held_keys", cursor=sql.Identifier(ORPHAN_KEYS_CURSOR))
        ).rowcount
        keys.scroll(0, mode="absolute")
        log.info("%s: %d orphan pointer(s) to null in batches of %d", step, total, settings.batch_size)
        nulled = audited = done = batches = 0
        last_log = time.monotonic()
        replicas = ReplicaGate(conn, settings.max_replica_lag_s, step=step)
        while batch := [row[0] for row in keys.fetchmany(settings.batch_size)]:
            replicas.wait()
            batch_audited, batch_nulled = _null_batch(conn, spec, settings, run_id, batch, step=step, offset=done)
            batches += 1
            done += len(batch)
            nulled += batch_nulled
            audited += batch_audited
            now = time.monotonic()
            if now - last_log >= 5 or done >= total:
                elapsed = now - started
                log.info(
                    "%s: %d/%d keys processed (%.0f%%), %d nulled, %.0f rows/s",
                    step,
                    done,
                    total,
                    100 * done / max(total, 1),
                    nulled,
                    done / elapsed if elapsed else 0.0,
                )
                last_log = now
            if settings.batch_pause_ms:
                time.sleep(settings.batch_pause_ms / 1000)
    finally:
        if not conn.closed and not conn.broken:
            keys.close()
    seconds = time.monotonic() - started
    return {
        "candidates": total,
        "nulled": nulled,
        "audited": audited,
        # Parent created meanwhile, row deleted, or row locked by the app (left for the re-sweep).
        "left_alone": total - nulled,
        "batches": batches,
        "replica_waits": replicas.waits,
        "replica_wait_seconds": round(replicas.waited_seconds, 3),
        "rows_per_second": round(nulled / seconds, 1) if seconds else None,
        "seconds": round(seconds, 3),
    }
