"""restore: put back the pointers one run nulled, from its audit rows, in short batches under the same lock
discipline as null_orphans; every pointer put back is recorded in the audit schema's restore log."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import sql

from fk_maintenance.db.catalog import require_target, table_info
from fk_maintenance.db.keysql import bind
from fk_maintenance.db.session import LockAttempts, run_lock, set_local_timeouts, step_session, with_lock_retries
from fk_maintenance.db.sqlfiles import batch_params, statement
from fk_maintenance.db.target_state import TargetState
from fk_maintenance.errors import InvalidSettings
from fk_maintenance.keys.settings import RunSettings
from fk_maintenance.keys.spec import ForeignKeySpec
from fk_maintenance.records.audit import AuditTables, ensure_audit_table, find_audit_tables
from fk_maintenance.records.privileges import lock_down_table
from fk_maintenance.records.unarchive import archived_run_rows, restore_archived

log = logging.getLogger(__name__)

# A batch touches batch_size rows by key, like a batch of null_orphans.
BATCH_STATEMENT_TIMEOUT_MS = 60_000
# What each audited row of the run is now; "restored" is what this restore put back.
OUTCOMES = (
    "restored",
    "already_restored",
    "repointed_by_app",
    "changed_since",  # still parentless, but written by someone since the run (for example made a root on purpose)
    "row_deleted",
    "parent_still_missing",
    "busy",
)


def restore_run(
    conn: psycopg.Connection, spec: ForeignKeySpec, settings: RunSettings, run_id: str, restore_id: str
) -> dict[str, Any]:
    """Put back the pointers run ``run_id`` nulled where the row is still parentless and the parent exists
    again; a dry run only counts. Returns how many audited rows ended in each of OUTCOMES."""
    if not run_id.strip():
        raise InvalidSettings("run_id is empty: give the run id whose nulled pointers to put back (see its report)")
    started = time.monotonic()
    totals = dict.fromkeys(("audited", *OUTCOMES), 0)
    with step_session(
        conn, "restore", settings, statement_timeout_ms=BATCH_STATEMENT_TIMEOUT_MS, read_only=settings.dry_run
    ):
        state = require_target(conn, spec)
        tables = find_audit_tables(conn, spec)
        _require_audited_run(conn, spec, run_id, tables)
        with run_lock(conn, spec):
            if settings.dry_run:
                if tables.current is None:  # the run's rows are still in an earlier version's table, not yet moved
                    return _finish(spec, settings, run_id, totals, started)
            else:
                ensure_audit_table(conn, spec, state)
                _ensure_restore_log(conn, spec, settings)
            # An orphans: delete run has nothing in the audit table (its rows are in the archive, below).
            versions = _our_versions(conn, spec, run_id) if _audit_holds(conn, spec, run_id) else {}
            for keys in _audit_batches(conn, spec, run_id, settings.batch_size) if versions else ():
                counts = _restore_batch(conn, spec, state, settings, run_id, restore_id, keys, versions)
                for name, value in counts.items():
                    totals[name] += value
                log.info(
                    "restore: %d audited row(s) of run %s seen, %d put back so far",
                    totals["audited"],
                    run_id,
                    totals["restored"],
                )
                if settings.batch_pause_ms:
                    time.sleep(settings.batch_pause_ms / 1000)
            if archived_run_rows(conn, spec, run_id):
                # An orphans: delete run: the rows it deleted and the pointers its cascade changed.
                for name, value in restore_archived(conn, spec, state, settings, run_id, restore_id).items():
                    totals[name] = totals.get(name, 0) + value if isinstance(value, int) else value
    return _finish(spec, settings, run_id, totals, started)


def _require_audited_run(conn: psycopg.Connection, spec: ForeignKeySpec, run_id: str, tables: AuditTables) -> None:
    """A run id the audit does not know is a typo (or another key's run): refused before anything is written. An
    earlier version's audit table in the app's schema counts too (the first writing step moves it)."""
    where = [
        sql.Identifier(schema, spec.audit_table)
        for schema, table in ((spec.audit_schema, tables.current), (spec.schema, tables.legacy))
        if table is not None
    ]
    audited = sum(
        conn.execute(statement("restore", "audited_rows", audited=table), {"run_id": run_id}).fetchone()[0]
        for table in where
    )
    if not audited and not archived_run_rows(conn, spec, run_id):
        raise InvalidSettings(
            f"the audit table {spec.audit_qualified} holds no pointer of run {run_id!r}, and the archive "
            f"{spec.archive_qualified} no row of it: check the run id (the run's report names it, and only a run that "
            "nulled pointers or deleted rows has something to restore); nothing was changed"
        )


def _audit_holds(conn: psycopg.Connection, spec: ForeignKeySpec, run_id: str) -> bool:
    if find_audit_tables(conn, spec).current is None:
        return False
    return bool(conn.execute(statement("restore", "first_batch", spec), {"run_id": run_id, "limit": 1}).fetchone())


def _ensure_restore_log(conn: psycopg.Connection, spec: ForeignKeySpec, settings: RunSettings) -> None:
    """The restore log, created (and commented) only when missing: a role that restores another key's run needs
    only INSERT on a log it does not own, and no CREATE on a schema a DBA made."""
    if table_info(conn, spec.audit_schema, spec.restore_log_table) is not None:
        return
    with conn.transaction():
        set_local_timeouts(
            conn, lock_timeout_ms=settings.lock_timeout_ms, statement_timeout_ms=BATCH_STATEMENT_TIMEOUT_MS
        )
        conn.execute(statement("restore", "create_log", spec))
        conn.execute(statement("restore", "comment_log", spec))
        lock_down_table(conn, spec.audit_schema, spec.restore_log_table)  # only the pipeline writes its record


def _our_versions(conn: psycopg.Connection, spec: ForeignKeySpec, run_id: str) -> dict[str, Any]:
    """How to tell a row the run wrote from one written since: the xmin values of the run's nulling
    transactions; a run from before they were recorded takes any version of a parentless row as its own."""
    tables = find_audit_tables(conn, spec)
    xids = (
        [
            row[0]
            for row in conn.execute(
                statement("restore", "run_transactions", spec), {"run_id": run_id, "audit_name": spec.audit_qualified}
            )
        ]
        if tables.nulling_transactions is not None
        else []
    )
    if not xids:
        log.warning(
            "restore: run %s has no recorded nulling transactions (it predates them, or nulled nothing): a row "
            "that is still parentless is taken to be as the run left it",
            run_id,
        )
    return {"xids": xids, "any_version": not xids}


def _audit_batches(
    conn: psycopg.Connection, spec: ForeignKeySpec, run_id: str, size: int
) -> Iterator[list[tuple[Any, ...]]]:
    """The run's audited row keys (tuples), ``size`` at a time, in key order (the audit's primary key serves it)."""
    keys = conn.execute(statement("restore", "first_batch", spec), {"run_id": run_id, "limit": size}).fetchall()
    while keys:
        yield keys
        keys = conn.execute(
            statement("restore", "next_batch", spec), {"run_id": run_id, "limit": size, **bind("after", keys[-1])}
        ).fetchall()


def _restore_batch(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    state: TargetState,
    settings: RunSettings,
    run_id: str,
    restore_id: str,
    keys: list[tuple[Any, ...]],
    versions: dict[str, Any],
) -> dict[str, int]:
    batch = batch_params(spec, keys)

    def attempt(lock_timeout_ms: int) -> dict[str, int]:
        with conn.transaction():
            set_local_timeouts(conn, lock_timeout_ms=lock_timeout_ms, statement_timeout_ms=BATCH_STATEMENT_TIMEOUT_MS)
            row = conn.execute(
                statement("restore", "classify_batch", spec, state), {"run_id": run_id, **batch, **versions}
            ).fetchone()
            deleted, already, repointed, changed, missing, restorable = row
            counts = {
                "row_deleted": deleted,
                "already_restored": already,
                "repointed_by_app": repointed,
                "changed_since": changed,
                "parent_still_missing": missing,
            }
            restored = 0
            if restorable and not settings.dry_run:
                # The UPDATE takes ROW EXCLUSIVE and the rows' locks, and the foreign key's check locks each
                # parent FOR KEY SHARE: all under this transaction's lock_timeout, rows the app holds skipped.
                restored, recorded = conn.execute(
                    statement("restore", "restore_batch", spec, state),
                    {
                        "run_id": run_id,
                        **batch,
                        "restore_id": restore_id,
                        "audit_name": spec.audit_qualified,
                        **versions,
                    },
                ).fetchone()
                if restored != recorded:
                    raise RuntimeError(f"restore: a batch put back {restored} but recorded {recorded}; rolled back")
            busy = 0 if settings.dry_run else restorable - restored
            return counts | {
                "restored": restorable if settings.dry_run else restored,
                "busy": busy,
                "audited": len(keys),
            }

    return with_lock_retries(
        conn,
        spec,
        "restore",
        attempt,
        settings=settings,
        record=LockAttempts(),
    )


def _finish(
    spec: ForeignKeySpec, settings: RunSettings, run_id: str, totals: dict[str, int], started: float
) -> dict[str, Any]:
    verb = "would put back" if settings.dry_run else "put back"
    log.info(
        "restore: run %s: %d audited pointer(s) in %s; %s %d; already back %d; re-pointed by the app %d; written "
        "since the run (left alone) %d; row deleted %d; parent still missing %d; busy (held by the app, try again) %d",
        run_id,
        totals["audited"],
        spec.audit_qualified,
        verb,
        totals["restored"],
        totals["already_restored"],
        totals["repointed_by_app"],
        totals["changed_since"],
        totals["row_deleted"],
        totals["parent_still_missing"],
        totals["busy"],
    )
    return totals | {
        "run_id": run_id,
        "dry_run": settings.dry_run,
        "still_missing": totals["parent_still_missing"]
        + totals["busy"]
        + totals.get("rows_parent_still_missing", 0)
        + totals.get("pointers_parent_still_missing", 0),
        "restore_log": None if settings.dry_run else spec.restore_log_qualified,
        "seconds": round(time.monotonic() - started, 3),
    }


def format_restore_report(report: dict[str, Any]) -> str:
    lines = [
        f"{report['restored']} pointer(s) put back, {report['still_missing']} still missing "
        f"(parent still missing, or the row held by the app), {len(report['failed'])} target(s) failed",
        f"{'connection':<28}{'audited':>9}{'restored':>10}{'missing':>9}{'re-pointed':>12}{'written since':>15}"
        f"{'deleted':>9}",
    ]
    for t in report["targets"]:
        if t.get("failed"):
            lines.append(f"{t['conn_id']:<28}  failed: see its restore task's log")
            continue
        lines.append(
            f"{t['conn_id']:<28}{t['audited']:>9}{t['restored']:>10}{t['still_missing']:>9}"
            f"{t['repointed_by_app']:>12}{t['changed_since']:>15}{t['row_deleted']:>9}"
        )
        if "rows_restored" in t:
            # An orphans: delete run: the archive's rows and the pointers its cascade changed.
            lines.append(
                f"{'':<28}archive: {t['rows_restored']} row(s) and {t['pointers_restored']} pointer(s) put back; "
                f"already back {t['rows_already_restored']} row(s), {t['pointers_already_restored']} pointer(s); "
                f"parent still missing {t['rows_parent_still_missing']} row(s), "
                f"{t['pointers_parent_still_missing']} pointer(s); written since (left alone) "
                f"{t['rows_written_since']} row(s), {t['pointers_written_since']} pointer(s); busy {t['busy']}"
            )
            if t.get("rows_failed") or t.get("pointers_failed"):
                reasons = "; ".join(f"{reason}: {count}" for reason, count in t.get("failures", {}).items())
                lines.append(
                    f"{'':<28}refused by the database (left in the archive, tried again by the next restore): "
                    f"{t['rows_failed']} row(s), {t['pointers_failed']} pointer(s): {reasons}"
                )
    return "\n".join(lines)
