"""preflight: everything that can be known before the first change, checked before it. Read-only."""

from __future__ import annotations

import logging
import time
from typing import Any

import psycopg

from .audit import audit_problems, audit_summary, find_audit_tables
from .catalog import TargetState, inspect_target, refuse_while_index_build_runs
from .checks import hierarchy_checks
from .errors import PreflightFailed
from .session import CATALOG_STATEMENT_TIMEOUT_MS, step_session
from .settings import RunSettings
from .spec import ForeignKeySpec
from .sqlfiles import statement

log = logging.getLogger(__name__)

MIN_SERVER_VERSION_NUM = 130000  # gen_random_uuid() in core, pg_stat_progress_create_index


def preflight(conn: psycopg.Connection, spec: ForeignKeySpec, settings: RunSettings) -> dict[str, Any]:
    with step_session(
        conn, "preflight", settings, statement_timeout_ms=CATALOG_STATEMENT_TIMEOUT_MS, read_only=True
    ) as route:
        return _preflight(conn, spec, settings) | {"connection": f"{route.mode} ({route.detail})"}


def _preflight(conn: psycopg.Connection, spec: ForeignKeySpec, settings: RunSettings) -> dict[str, Any]:
    started = time.monotonic()
    version, version_num, database, user = conn.execute(statement("session", "server_facts")).fetchone()
    log.info("preflight: connected to %s as %s, PostgreSQL %s", database, user, version)
    state = inspect_target(conn, spec)
    audit_tables = find_audit_tables(conn, spec)
    problems = list(state.problems)
    if version_num < MIN_SERVER_VERSION_NUM:
        problems.append(f"PostgreSQL {version} is too old; 13 or newer is needed")
    warnings: list[str] = []
    if state.table is not None and state.column is not None:
        problems.extend(_privilege_problems(conn, spec, settings, state))
        problems.extend(audit_problems(conn, spec, state, audit_tables, writes=not settings.dry_run))
        for name, definition, validated in conn.execute(
            statement("catalog", "other_foreign_keys_on_column"),
            {"relid": state.table.oid, "attnum": state.column.attnum, "name": spec.constraint},
        ).fetchall():
            warnings.append(
                f"another foreign key on {spec.column} exists: {name} {definition}"
                f"{'' if validated else ' NOT VALID'}; the app will have two"
            )
    for warning in warnings:
        log.warning("preflight: %s", warning)
    if not problems and spec.self_referential:
        # Data the end state cannot hold is refused now, while the target is still untouched, rather than by
        # post_checks after the index and the constraint are in.
        problems.extend(
            f"{check.name}: {check.detail}; fix the data in the app, then run again"
            for check in hierarchy_checks(conn, spec, settings)
            if not check.ok
        )
    if problems:
        raise PreflightFailed(problems)
    refuse_while_index_build_runs(state, spec)
    assert state.table is not None
    summary = {
        "server_version": version,
        "database": database,
        "user": user,
        "table": f"{spec.schema}.{spec.table}",
        "table_bytes": state.table.total_bytes,
        "table_size": _human_bytes(state.table.total_bytes),
        "estimated_rows": state.table.estimated_rows,
        "constraint": _describe_constraint(state),
        "index": _describe_index(state),
        **audit_summary(spec, audit_tables),
        "warnings": warnings,
        "dry_run": settings.dry_run,
        "seconds": round(time.monotonic() - started, 3),
    }
    log.info(
        "preflight: %s is %s (~%d rows); constraint: %s; index: %s",
        summary["table"],
        summary["table_size"],
        summary["estimated_rows"],
        summary["constraint"],
        summary["index"],
    )
    return summary


def _privilege_problems(
    conn: psycopg.Connection, spec: ForeignKeySpec, settings: RunSettings, state: TargetState
) -> list[str]:
    assert state.table is not None
    owns, can_select, can_update, can_reference, can_use = conn.execute(
        statement("catalog", "privileges"), {"relid": state.table.oid}
    ).fetchone()
    who = conn.info.user
    problems = []
    if not can_use:
        problems.append(f"role {who} lacks USAGE on schema {spec.schema}")
    if not can_select:
        problems.append(f"role {who} lacks SELECT on {spec.schema}.{spec.table}")
    if settings.dry_run:
        return problems
    if not owns:
        problems.append(
            f"role {who} does not own {spec.schema}.{spec.table} (owner: {state.table.owner}); ALTER TABLE and "
            "CREATE INDEX need the owner's rights: run as the owner or a member of its role"
        )
    if not can_update:
        problems.append(f"role {who} lacks UPDATE on {spec.schema}.{spec.table} (needed to null orphan pointers)")
    if not can_reference:
        problems.append(f"role {who} lacks REFERENCES on {spec.schema}.{spec.ref_table}")
    return problems


def _describe_constraint(state: TargetState) -> str:
    con = state.constraint
    if not con.exists:
        return "absent (will be added NOT VALID, then validated)"
    return "present and validated" if con.validated else "present, NOT VALID (will be validated)"


def _describe_index(state: TargetState) -> str:
    idx = state.index
    if not idx.exists:
        return "absent (will be built concurrently)"
    return "present and valid" if idx.valid else "present but INVALID (will be dropped and rebuilt concurrently)"


def _human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover
