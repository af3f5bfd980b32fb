"""Finding and nulling dangling parent pointers, every nulled pointer audited in the same transaction."""

from __future__ import annotations

import logging
import time
from typing import Any

import psycopg

from .audit import ensure_audit_table
from .catalog import require_target
from .session import run_lock, set_local_timeouts, step_session
from .settings import RunSettings
from .spec import ForeignKeySpec
from .sqlfiles import statement

log = logging.getLogger(__name__)

# One batch touches batch_size rows by primary key; a minute is far beyond what that needs and still bounds
# a batch that the server cannot finish (for example, a runaway trigger on the app's table).
BATCH_STATEMENT_TIMEOUT_MS = 60_000
# The anti-join scans the whole table once; bounded so a pathological plan cannot run for hours.
SCAN_STATEMENT_TIMEOUT_MS = 2 * 60 * 60 * 1000


def detect_orphans(conn: psycopg.Connection, spec: ForeignKeySpec, settings: RunSettings) -> dict[str, Any]:
    """Count orphans and distinct dangling parents, with a sample, in one anti-join scan (read-only)."""
    started = time.monotonic()
    with step_session(conn, "detect_orphans", settings, statement_timeout_ms=SCAN_STATEMENT_TIMEOUT_MS, read_only=True):
        require_target(conn, spec)
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


def sweep_orphans(
    conn: psycopg.Connection, spec: ForeignKeySpec, settings: RunSettings, run_id: str, *, step: str
) -> dict[str, Any]:
    """The batches themselves, for a caller that holds the run lock and whose audit table exists.

    One anti-join scan collects the orphan keys; each batch then touches only its rows by key, so the total
    work is one scan plus work proportional to the orphans. A batch is all or nothing: killed midway, it
    rolls back, and the next run finds the same orphans again. Every transaction sets its own timeouts, so
    this runs the same under any caller's session settings.
    """
    started = time.monotonic()
    with conn.transaction():
        # The scan reads only; its statement_timeout is the scan's, the batches keep the short one.
        set_local_timeouts(
            conn, lock_timeout_ms=settings.lock_timeout_ms, statement_timeout_ms=SCAN_STATEMENT_TIMEOUT_MS
        )
        keys = [row[0] for row in conn.execute(statement("orphans", "keys", spec)).fetchall()]
    total = len(keys)
    log.info("%s: %d orphan pointer(s) to null in batches of %d", step, total, settings.batch_size)
    nulled = audited = 0
    batches = 0
    last_log = time.monotonic()
    for offset in range(0, total, settings.batch_size):
        batch = keys[offset : offset + settings.batch_size]
        with conn.transaction():
            set_local_timeouts(
                conn, lock_timeout_ms=settings.lock_timeout_ms, statement_timeout_ms=BATCH_STATEMENT_TIMEOUT_MS
            )
            batch_audited, batch_nulled = conn.execute(
                statement("orphans", "null_batch", spec), {"keys": batch, "run_id": run_id}
            ).fetchone()
            if batch_audited != batch_nulled:
                # Rolling back keeps audit and data in step; this would mean a concurrent change we
                # did not foresee, so stop rather than guess.
                raise RuntimeError(
                    f"{step}: batch at offset {offset} audited {batch_audited} but nulled {batch_nulled}; rolled back"
                )
        batches += 1
        nulled += batch_nulled
        audited += batch_audited
        now = time.monotonic()
        if now - last_log >= 5 or offset + len(batch) >= total:
            elapsed = now - started
            log.info(
                "%s: %d/%d keys processed (%.0f%%), %d nulled, %.0f rows/s",
                step,
                offset + len(batch),
                total,
                100 * (offset + len(batch)) / max(total, 1),
                nulled,
                (offset + len(batch)) / elapsed if elapsed else 0.0,
            )
            last_log = now
        if settings.batch_pause_ms:
            time.sleep(settings.batch_pause_ms / 1000)
    seconds = time.monotonic() - started
    return {
        "candidates": total,
        "nulled": nulled,
        "audited": audited,
        # Parent created meanwhile, row deleted, or row locked by the app (left for the re-sweep).
        "left_alone": total - nulled,
        "batches": batches,
        "rows_per_second": round(nulled / seconds, 1) if seconds else None,
        "seconds": round(seconds, 3),
    }
