"""report: one summary of the run from the steps' own summaries."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import closing
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from fk_maintenance.keys.settings import RunSettings
from fk_maintenance.keys.spec import ForeignKeySpec
from fk_maintenance.steps.registry import STEPS

log = logging.getLogger(__name__)
T = TypeVar("T")

CONVERGED = "converged"
DRY_RUN_STATE = "dry run: nothing changed"
# A step with no result: refused, failed, or never reached.
DID_NOT_FINISH = "did not finish"


def read_audited(
    connect: Callable[[], psycopg.Connection], spec: ForeignKeySpec, settings: RunSettings, run_id: str
) -> int | None:
    """How many pointers the run nulled, from the audit table (every try of every step, also one killed before
    it could report); None, and a warning, when the database cannot be read now."""
    from fk_maintenance.steps.orphans import audited_for_run

    return _read_for_report(
        connect,
        settings,
        lambda conn: audited_for_run(conn, spec, run_id),
        f"the audit of run {run_id}",
        "; counts come from the steps' own results",
    )


def read_archived(
    connect: Callable[[], psycopg.Connection], spec: ForeignKeySpec, settings: RunSettings, run_id: str
) -> dict[str, dict[str, int]] | None:
    """What the run's deletes removed and changed per table, from the archive ({} for a run that deleted nothing,
    None when the database cannot be read now)."""
    from fk_maintenance.records.cascade import archived_for_run

    return _read_for_report(
        connect, settings, lambda conn: archived_for_run(conn, spec, run_id), f"the archive of run {run_id}"
    )


def _read_for_report(
    connect: Callable[[], psycopg.Connection],
    settings: RunSettings,
    read: Callable[[psycopg.Connection], T],
    what: str,
    fallback: str = "",
) -> T | None:
    """``read`` in a read-only session of its own; None, and a warning naming ``what`` could not be read and
    what the report uses instead (``fallback``), when it fails."""
    from fk_maintenance.db.session import CATALOG_STATEMENT_TIMEOUT_MS, step_session

    try:
        with (
            closing(connect()) as conn,
            step_session(conn, "report", settings, statement_timeout_ms=CATALOG_STATEMENT_TIMEOUT_MS, read_only=True),
        ):
            return read(conn)
    except Exception as exc:  # the report must be written whatever the database's state
        log.warning("report: could not read %s (%s)%s", what, exc, fallback)
        return None


def build_report(
    spec: ForeignKeySpec,
    settings: RunSettings,
    run_id: str,
    results: dict[str, dict[str, Any] | None],
    *,
    conn_id: str | None = None,
    audited: int | None = None,
    archived: dict[str, dict[str, int]] | None = None,
) -> dict[str, Any]:
    """The run's summary from each step's result (None: did not finish) and ``audited``, the pointers the audit
    holds for the run (None: not read, then the steps' own counts stand in, which miss a killed try's), and
    ``archived``, what its deletes removed and changed per table (orphans: delete; None: not read)."""
    steps = _step_lines(results)
    resweep = (results.get("validate_fk") or {}).get("resweep") or {}
    checks = results.get("post_checks") or {}
    from_steps = (_get(results, "null_orphans", "audited") or 0) + (resweep.get("audited") or 0)
    final_state = _final_state([step for step in steps if not results.get(step)], settings, checks)
    nulled = from_steps if audited is None else audited
    archived = archived or {}
    report = {
        "run_id": run_id,
        "target": spec.describe(),
        "conn_id": conn_id,
        "dry_run": settings.dry_run,
        "server_version": _get(results, "preflight", "server_version"),
        "table_size": _get(results, "preflight", "table_size"),
        "partitions": len(_get(results, "preflight", "partitions") or []),
        "partitions_validated": _get(results, "validate_fk", "partitions_validated"),
        "warnings": _get(results, "preflight", "warnings") or [],
        **_orphan_fields(spec, results, archived),
        # Each pointer is audited and nulled in one transaction, so the audit's count is the nulled count.
        "nulled": nulled,
        "audited": nulled,
        "counted_from": "the steps' results (the audit was not read)" if audited is None else "the audit table",
        "resweep_nulled": resweep.get("nulled", 0) or 0,
        "lock_retries": sum(s["lock_retries"] for s in steps.values()),
        "connection": _get(results, "preflight", "connection"),
        "replica_lag_caused_s": max(
            (s["replica_lag_after_s"] for s in steps.values() if s["replica_lag_after_s"] is not None), default=None
        ),
        "steps": steps,
        **_check_fields(checks),
        "final_state": final_state,
        "succeeded": final_state in (CONVERGED, DRY_RUN_STATE),
        "restore_hint": _restore_hint(spec, run_id, nulled, archived),
    }
    for line in format_report(report).splitlines():
        log.info("report: %s", line)
    return report


def _orphan_fields(
    spec: ForeignKeySpec, results: dict[str, dict[str, Any] | None], archived: dict[str, dict[str, int]]
) -> dict[str, Any]:
    """The orphans found, and what the run would change (a dry run: detect_orphans' walk) or changed (the
    archive, which also counts a try killed before it reported), in rows."""
    found = results.get("detect_orphans") or {}
    deleted_rows = sum(counts["deleted"] for counts in archived.values())
    changed_pointers = sum(counts["nulled"] + counts["reset"] for counts in archived.values())
    return {
        "orphans_found": found.get("orphans"),
        "dangling_parents": found.get("dangling_parents"),
        "orphan_sample": found.get("sample") or [],
        "orphan_policy": found.get("policy") or spec.orphans or "by nullability (not read)",
        "blast_radius_rows": (deleted_rows + changed_pointers) if archived else found.get("blast_radius_rows"),
        "blast_radius": archived or found.get("blast_radius") or {},
        "blast_radius_sample": found.get("blast_radius_sample") or [],
        "archived": archived,
        "deleted_rows": deleted_rows,
        "pointers_changed_by_cascade": changed_pointers,
    }


def _check_fields(checks: dict[str, Any]) -> dict[str, Any]:
    return {
        "checks_passed": checks.get("passed"),
        "checks_failed": checks.get("failed"),
        "checks_not_tried": checks.get("not_tried"),
        "failed_checks": [c["name"] for c in checks.get("checks", []) if c["ok"] is False],
        "not_tried_checks": [c["name"] for c in checks.get("checks", []) if c["ok"] is None],
    }


def _restore_hint(spec: ForeignKeySpec, run_id: str, nulled: int, archived: dict[str, dict[str, int]]) -> str:
    """Where the run's changes are kept, as a query an operator can paste: the audit for nulled pointers, else the
    archive for deleted rows (parents first, as a restore puts them back)."""
    run = sql.Literal(run_id).as_string(None)
    if nulled:
        audit = sql.Identifier(spec.audit_schema, spec.audit_table).as_string(None)
        return f"pointers nulled by this run: SELECT * FROM {audit} WHERE run_id = {run}"
    if archived:
        archive = sql.Identifier(spec.audit_schema, spec.archive_table).as_string(None)
        return f"rows deleted by this run, whole: SELECT * FROM {archive} WHERE run_id = {run} ORDER BY depth, seq"
    return "no pointer was nulled"


def _get(results: dict[str, dict[str, Any] | None], step: str, key: str) -> Any:
    return (results.get(step) or {}).get(key)


def _step_lines(results: dict[str, dict[str, Any] | None]) -> dict[str, dict[str, Any]]:
    def get(step: str, key: str) -> Any:
        return _get(results, step, key)

    return {
        step: {
            "seconds": get(step, "seconds"),
            "lock_retries": (get(step, "lock_timeouts") or 0) + (get(step, "deferred_for_long_transactions") or 0),
            "outcome": _outcome(results.get(step)),
            "replica_lag_after_s": get(step, "replica_lag_after_s"),
            "replica_wait_seconds": get(step, "replica_wait_seconds"),
        }
        for step in (s.name for s in STEPS)
    }


def _outcome(result: dict[str, Any] | None) -> str:
    if not result:
        return DID_NOT_FINISH
    outcome = result.get("action") or result.get("outcome") or "ran"
    if result.get("partitions") and "partitions_validated" in result:  # a partitioned child's VALIDATE
        outcome += f" ({result['partitions_validated']} of {result['partitions']} partitions validated)"
    return outcome


def _final_state(unfinished: list[str], settings: RunSettings, checks: dict[str, Any]) -> str:
    if settings.dry_run and not unfinished:
        return DRY_RUN_STATE  # its checks describe the database as it is, which the run was not to change
    if checks.get("failed"):  # post_checks ran and failed (it has no return value then): its checks say why
        return "not converged: post-checks failed"
    if unfinished:
        return f"incomplete: {', '.join(unfinished)} did not finish"
    return CONVERGED


def format_report(report: dict[str, Any]) -> str:
    lag, conn_id = report["replica_lag_caused_s"], report.get("conn_id")
    # What a step that did not finish never measured is unknown, not Python's None.
    report = {key: "unknown" if value is None else value for key, value in report.items()}
    lines = [
        f"Run {report['run_id']}: {report['final_state']}",
        f"Target: {report['target']}" + (f" on connection {conn_id}" if conn_id else ""),
        f"Server: PostgreSQL {report['server_version']}, table {report['table_size']}"
        + (
            f" in {report['partitions']} partitions, {report['partitions_validated']} with the key validated"
            if report.get("partitions")
            else ""
        ),
        f"Orphans found: {report['orphans_found']} (pointing at {report['dangling_parents']} missing parent(s))",
        f"Pointers nulled and audited: {report['nulled']} (re-sweep {report['resweep_nulled']}; counted from "
        f"{report.get('counted_from', 'the audit table')})",
        f"Orphan policy: {report.get('orphan_policy', 'nullify')}",
        *(
            [
                f"Deleted and archived: {report['deleted_rows']} row(s), {report['pointers_changed_by_cascade']} "
                "pointer(s) changed by the cascade (counted from the archive): "
                + "; ".join(
                    f"{table} {', '.join(f'{n} {action}' for action, n in counts.items() if n)}"
                    for table, counts in report["archived"].items()
                )
            ]
            if report.get("archived")
            else []
        ),
        f"Lock retries (timed out, or deferred for a long transaction): {report['lock_retries']}",
        f"Connection: {report['connection']}",
        "Replica lag after the index build and VALIDATE (not throttled): "
        + ("no replica seen" if lag is None else f"{lag:.1f} s"),
        f"Checks: {report['checks_passed']} passed, {report['checks_failed']} failed"
        + (f" ({', '.join(report['failed_checks'])})" if report["failed_checks"] else "")
        + f", {report.get('checks_not_tried') or 0} not tried"
        + (f" ({', '.join(report['not_tried_checks'])})" if report.get("not_tried_checks") else ""),
        *(f"Warning: {warning}" for warning in report.get("warnings") or []),
        "",
        f"{'step':<28}{'seconds':>10}{'lock retries':>14}  outcome",
    ]
    for step, info in report["steps"].items():
        seconds = "-" if info["seconds"] is None else f"{info['seconds']:.2f}"
        lines.append(f"{step:<28}{seconds:>10}{info['lock_retries']:>14}  {info['outcome']}")
    lines += ["", f"Restore: {report['restore_hint']}"]
    return "\n".join(lines)
