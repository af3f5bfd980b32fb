"""report: one summary of the run from the steps' own summaries."""

from __future__ import annotations

import logging
from typing import Any

from .settings import RunSettings
from .spec import ForeignKeySpec
from .steps import STEPS

log = logging.getLogger(__name__)

CONVERGED = "converged"
DRY_RUN_STATE = "dry run: nothing changed"


def build_report(
    spec: ForeignKeySpec,
    settings: RunSettings,
    run_id: str,
    results: dict[str, dict[str, Any] | None],
    *,
    conn_id: str | None = None,
) -> dict[str, Any]:
    def get(step: str, key: str, default: Any = None) -> Any:
        return (results.get(step) or {}).get(key, default)

    resweep = get("validate_fk", "resweep") or {}
    nulled = (get("null_orphans", "nulled", 0) or 0) + (resweep.get("nulled", 0) or 0)
    audited = (get("null_orphans", "audited", 0) or 0) + (resweep.get("audited", 0) or 0)
    checks = results.get("post_checks") or {}
    steps = {
        step: {
            "seconds": get(step, "seconds"),
            "lock_retries": (get(step, "lock_timeouts", 0) or 0)
            + (get(step, "deferred_for_long_transactions", 0) or 0),
            "outcome": get(step, "action") or get(step, "outcome") or ("ran" if results.get(step) else "did not run"),
            "replica_lag_after_s": get(step, "replica_lag_after_s"),
            "replica_wait_seconds": get(step, "replica_wait_seconds"),
        }
        for step in (s.name for s in STEPS)
    }
    unfinished = [step for step in steps if not results.get(step)]
    if unfinished:
        final_state = f"incomplete: {', '.join(unfinished)} did not finish"
    elif settings.dry_run:
        final_state = DRY_RUN_STATE
    elif checks.get("failed") == 0:
        final_state = CONVERGED
    else:
        final_state = "not converged: post-checks failed"
    report = {
        "run_id": run_id,
        "target": spec.describe(),
        "conn_id": conn_id,
        "dry_run": settings.dry_run,
        "server_version": get("preflight", "server_version"),
        "table_size": get("preflight", "table_size"),
        "orphans_found": get("detect_orphans", "orphans"),
        "dangling_parents": get("detect_orphans", "dangling_parents"),
        "orphan_sample": get("detect_orphans", "sample", []),
        "nulled": nulled,
        "audited": audited,
        "resweep_nulled": resweep.get("nulled", 0) or 0,
        "lock_retries": sum(s["lock_retries"] for s in steps.values()),
        "connection": get("preflight", "connection"),
        "replica_lag_caused_s": max(
            (s["replica_lag_after_s"] for s in steps.values() if s["replica_lag_after_s"] is not None), default=None
        ),
        "steps": steps,
        "checks_passed": checks.get("passed"),
        "checks_failed": checks.get("failed"),
        "failed_checks": [c["name"] for c in checks.get("checks", []) if not c["ok"]],
        "final_state": final_state,
        "succeeded": final_state in (CONVERGED, DRY_RUN_STATE),
        "restore_hint": (
            f"pointers nulled by this run are in {spec.audit_qualified} WHERE run_id = '{run_id}'"
            if audited
            else "no pointer was nulled"
        ),
    }
    for line in format_report(report).splitlines():
        log.info("report: %s", line)
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"Run {report['run_id']}: {report['final_state']}",
        f"Target: {report['target']}" + (f" on connection {report['conn_id']}" if report.get("conn_id") else ""),
        f"Server: PostgreSQL {report['server_version']}, table {report['table_size']}",
        f"Orphans found: {report['orphans_found']} (pointing at {report['dangling_parents']} missing parent(s))",
        f"Pointers nulled: {report['nulled']} (re-sweep {report['resweep_nulled']}), audited: {report['audited']}",
        f"Lock retries (timed out, or deferred for a long transaction): {report['lock_retries']}",
        f"Connection: {report['connection']}",
        "Replica lag after the index build and VALIDATE (not throttled): "
        + ("no replica seen" if report["replica_lag_caused_s"] is None else f"{report['replica_lag_caused_s']:.1f} s"),
        f"Checks: {report['checks_passed']} passed, {report['checks_failed']} failed"
        + (f" ({', '.join(report['failed_checks'])})" if report["failed_checks"] else ""),
        "",
        f"{'step':<28}{'seconds':>10}{'lock retries':>14}  outcome",
    ]
    for step, info in report["steps"].items():
        seconds = "-" if info["seconds"] is None else f"{info['seconds']:.2f}"
        lines.append(f"{step:<28}{seconds:>10}{info['lock_retries']:>14}  {info['outcome']}")
    lines += ["", f"Restore: {report['restore_hint']}"]
    return "\n".join(lines)
