"""Restore of an orphans: delete run: the rows it deleted go back from the archive (parents before children,
every column as it was, identity columns included), then the pointers its cascade nulled or reset, each where
its parent exists again; every row and pointer put back is recorded in the restore log.

Each row is tried in a savepoint of its chunk's short transaction, so a row whose parent is still missing (the
foreign key refuses it) or that the app holds stays out and is counted without undoing the others. Rows go in
passes: a row whose parent comes back later in the same pass (another table's, another depth's) goes back in
the next pass; passes end when one puts nothing back.
"""

from __future__ import annotations

import json
import logging
from functools import cache
from typing import Any

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql

from fk_maintenance.db import keysql
from fk_maintenance.db.catalog import table_info
from fk_maintenance.db.session import set_local_timeouts
from fk_maintenance.db.sqlfiles import statement
from fk_maintenance.db.target_state import TargetState
from fk_maintenance.keys.settings import RunSettings
from fk_maintenance.keys.spec import ForeignKeySpec
from fk_maintenance.records.cascade import BUSY_ERRORS, _archive

log = logging.getLogger(__name__)

STATEMENT_TIMEOUT_MS = 60_000
ROW_OUTCOMES = ("rows_restored", "rows_already_restored", "rows_written_since", "rows_parent_still_missing")
POINTER_OUTCOMES = (
    "pointers_restored",
    "pointers_already_restored",
    "pointers_written_since",
    "pointers_parent_still_missing",
)
# Where a row's foreign keys are not satisfied yet (its parent is still missing), or it has been written since.
MISSING_PARENT = (pgerrors.ForeignKeyViolation,)
TAKEN = (pgerrors.UniqueViolation, pgerrors.ExclusionViolation)


def archived_run_rows(conn: psycopg.Connection, spec: ForeignKeySpec, run_id: str) -> int:
    """How many rows the archive holds for ``run_id`` (0 when there is no archive)."""
    if table_info(conn, spec.audit_schema, spec.archive_table) is None:
        return 0
    return conn.execute(statement("cascade", "archived_count", archive=_archive(spec)), {"run_id": run_id}).fetchone()[
        0
    ]


def restore_archived(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    state: TargetState,
    settings: RunSettings,
    run_id: str,
    restore_id: str,
) -> dict[str, int]:
    """Put back what run ``run_id`` deleted and changed; a dry run only counts. The caller holds the run lock and
    has made the restore log."""
    totals = dict.fromkeys((*ROW_OUTCOMES, *POINTER_OUTCOMES, "busy"), 0)
    xids = [
        row[0]
        for row in conn.execute(
            statement("cascade", "run_batches", spec), {"audit_name": spec.archive_qualified, "run_id": run_id}
        )
    ]
    context = {"run_id": run_id, "restore_id": restore_id, "xids": xids}
    missing_before = None
    while True:
        counts = _pass(conn, spec, state, settings, context, ("deleted",))
        missing = counts["rows_parent_still_missing"] + counts["busy"]
        # A row put back in this pass may be the parent another row was missing: that one goes in the next pass.
        totals["rows_restored"] += counts["rows_restored"]
        if settings.dry_run or not counts["rows_restored"] or not missing or missing == missing_before:
            for name in ("rows_written_since", "rows_parent_still_missing", "busy"):
                totals[name] += counts[name]
            # What this pass found already back includes what the earlier passes of this restore put back.
            earlier = totals["rows_restored"] - counts["rows_restored"]
            totals["rows_already_restored"] = counts["rows_already_restored"] - earlier
            break
        missing_before = missing
    counts = _pass(conn, spec, state, settings, context, ("nulled", "reset"))
    for name in POINTER_OUTCOMES:
        totals[name] += counts[name]
    totals["busy"] += counts["busy"]
    log.info("restore: run %s from %s: %s", run_id, spec.archive_qualified, totals)
    return totals


def _pass(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    state: TargetState,
    settings: RunSettings,
    context: dict[str, Any],
    actions: tuple[str, ...],
) -> dict[str, int]:
    counts = dict.fromkeys((*ROW_OUTCOMES, *POINTER_OUTCOMES, "busy"), 0)
    after = (-1, -1)
    while True:
        chunk = conn.execute(
            statement("cascade", "archived_rows", archive=_archive(spec)),
            {
                "run_id": context["run_id"],
                "actions": list(actions),
                "after_depth": after[0],
                "after_seq": after[1],
                "limit": settings.batch_size,
            },
        ).fetchall()
        if not chunk:
            return counts
        after = (chunk[-1][0], chunk[-1][1])
        with conn.transaction():
            set_local_timeouts(
                conn, lock_timeout_ms=settings.lock_timeout_ms, statement_timeout_ms=STATEMENT_TIMEOUT_MS
            )
            for row in chunk:
                counts[_restore_one(conn, spec, state, settings, context, row)] += 1


def _restore_one(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    state: TargetState,
    settings: RunSettings,
    context: dict[str, Any],
    row: tuple[Any, ...],
) -> str:
    depth, _seq, schema, table, row_key, action, via, columns, row_data = row
    prefix = "rows" if action == "deleted" else "pointers"
    rel = (schema, table)
    key_columns = tuple(_key_names(row_key))
    current = conn.execute(
        _current_statement(rel, key_columns), {"row": row_data, "key": row_key, "xids": context["xids"]}
    ).fetchone()
    if current is not None and current[0]:
        return f"{prefix}_already_restored"
    if action == "deleted" and current is not None:
        return "rows_written_since"  # a row of that key was written since (by the app, or a restore of another run)
    if action != "deleted" and (current is None or not current[1]):
        # The row is gone, or is no longer the version this run's batch wrote: newer than the archive.
        return "pointers_written_since"
    # The orphan's own parent, by the declared key: the key may not hold yet, and an orphan must not return as
    # an orphan.
    is_orphan = action == "deleted" and depth == 0 and rel == (spec.schema, spec.table)
    if is_orphan and not conn.execute(statement("cascade", "parent_exists", spec), {"row": row_data}).fetchone()[0]:
        return "rows_parent_still_missing"
    if settings.dry_run:
        return f"{prefix}_restored"
    try:
        with conn.transaction():
            if action == "deleted":
                conn.execute(_insert_statement(conn, rel), {"row": row_data})
            else:
                conn.execute(_put_back_statement(rel, key_columns, tuple(columns)), {"row": row_data})
            conn.execute(
                statement("cascade", "log_restored", spec),
                {
                    "restore_id": context["restore_id"],
                    "audit_name": spec.archive_qualified,
                    "run_id": context["run_id"],
                    "row_key": f"{schema}.{table} {row_key}" + (f" {via}" if action != "deleted" else ""),
                    "what": "the whole row" if action == "deleted" else f"{action} columns {', '.join(columns)}",
                },
            )
    except MISSING_PARENT:
        return f"{prefix}_parent_still_missing"
    except TAKEN:
        return "rows_written_since"
    except BUSY_ERRORS:
        return "busy"
    return f"{prefix}_restored"


def _key_names(row_key: str) -> list[str]:
    """The row key's column names, in the archive's order (its jsonb object's keys)."""
    return list(json.loads(row_key))


@cache
def _current_statement(rel: tuple[str, str], key: tuple[str, ...]) -> sql.Composed:
    return statement("cascade", "current_row", rel=sql.Identifier(*rel), t_is_k=keysql.equal("t", key, "k", key))


def _insert_statement(conn: psycopg.Connection, rel: tuple[str, str]) -> sql.Composed:
    columns = conn.execute(statement("cascade", "insertable_columns"), {"schema": rel[0], "table": rel[1]}).fetchone()[
        0
    ]
    return statement(
        "cascade",
        "insert_row",
        rel=sql.Identifier(*rel),
        columns=keysql.names(columns),
        r_columns=keysql.names(columns, "r"),
    )


@cache
def _put_back_statement(rel: tuple[str, str], key: tuple[str, ...], columns: tuple[str, ...]) -> sql.Composed:
    return statement(
        "cascade",
        "put_back_columns",
        rel=sql.Identifier(*rel),
        set_from_r=keysql.set_from("r", columns, columns),
        t_is_r=keysql.equal("t", key, "r", key),
    )
