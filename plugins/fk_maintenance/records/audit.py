"""The audit table: where it lives (the pipeline's own schema), what it must look like, moving the one an earlier
version left in the app's schema, and putting audited pointers back."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql

from fk_maintenance.db.catalog import as_written, table_info
from fk_maintenance.db.session import set_local_timeouts
from fk_maintenance.db.sqlfiles import audit_columns, statement
from fk_maintenance.db.target_state import TableInfo, TargetState
from fk_maintenance.keys.spec import ForeignKeySpec
from fk_maintenance.records.privileges import lock_down_schema, lock_down_table

log = logging.getLogger(__name__)

# The audit DDL locks only the pipeline's own tables, which the app never touches; a few seconds of waiting
# means another run is creating or moving them, and a retry is the right answer.
AUDIT_DDL_LOCK_TIMEOUT_MS = 5000
AUDIT_DDL_STATEMENT_TIMEOUT_MS = 30_000


@dataclass(frozen=True)
class AuditTables:
    """The audit table where it belongs, and one an earlier version left in the app's schema."""

    current: TableInfo | None
    legacy: TableInfo | None
    nulling_transactions: TableInfo | None = None

    def plan(self, spec: ForeignKeySpec) -> str:
        if self.legacy and self.current:
            return f"merge {spec.legacy_audit_qualified} into {spec.audit_qualified}, then drop it"
        if self.legacy:
            return f"move {spec.legacy_audit_qualified} to {spec.audit_qualified} with all its rows"
        return "use it" if self.current else f"create {spec.audit_qualified}"


def find_audit_tables(conn: psycopg.Connection, spec: ForeignKeySpec) -> AuditTables:
    return AuditTables(
        current=table_info(conn, spec.audit_schema, spec.audit_table),
        legacy=table_info(conn, spec.schema, spec.audit_table),
        nulling_transactions=table_info(conn, spec.audit_schema, spec.nulling_transactions_table),
    )


def audit_problems(
    conn: psycopg.Connection, spec: ForeignKeySpec, state: TargetState, tables: AuditTables, *, writes: bool
) -> list[str]:
    """Every reason the audit table cannot be used, created or moved by this role, for preflight."""
    problems = [
        problem
        for where, table in (
            (spec.audit_qualified, tables.current),
            (spec.legacy_audit_qualified, tables.legacy),
        )
        if table is not None
        for problem in _shape_problems(conn, spec, where, table, state)
    ]
    if writes:
        problems += _privilege_problems(conn, spec, tables)
    return problems


def _shape_problems(
    conn: psycopg.Connection, spec: ForeignKeySpec, where: str, table: TableInfo, state: TargetState
) -> list[str]:
    columns = dict(conn.execute(statement("catalog", "audit_columns"), {"relid": table.oid}).fetchall())
    expected = {"run_id": "text", **audit_columns(spec, state), "nulled_at": "timestamp with time zone"}
    wrong = [f"{name} {kind}" for name, kind in expected.items() if columns.get(name) != kind]
    problems = []
    if wrong:
        problems.append(
            f"{where} exists but is not an audit table of this pipeline: it lacks column(s) {', '.join(wrong)} "
            f"(has {', '.join(f'{k} {v}' for k, v in columns.items())}); rename it or name another audit_table"
        )
    key = conn.execute(statement("catalog", "audit_primary_key"), {"relid": table.oid}).fetchone()[0]
    wanted = ["run_id", *spec.audit_row_key_columns]
    if key != wanted:
        problems.append(
            f"{where} has primary key {key}, not ({', '.join(wanted)}); rename it or name another audit_table"
        )
    return problems


def _privilege_problems(conn: psycopg.Connection, spec: ForeignKeySpec, tables: AuditTables) -> list[str]:
    who, schema, database, audit, nulling = as_written(
        conn,
        conn.info.user,
        spec.audit_schema,
        conn.info.dbname,
        (spec.audit_schema, spec.audit_table),
        (spec.audit_schema, spec.nulling_transactions_table),
    )
    schema_exists, can_create_schema, can_create_in, can_use = conn.execute(
        statement("catalog", "schema_privileges"), {"schema": spec.audit_schema}
    ).fetchone()
    problems = []
    if not schema_exists and not can_create_schema:
        problems.append(
            f"role {who} lacks CREATE on database {conn.info.dbname}, needed to create the pipeline's schema "
            f"{schema}: GRANT CREATE ON DATABASE {database} TO {who}, or "
            f"create it beforehand: CREATE SCHEMA {schema} AUTHORIZATION {who}"
        )
    if schema_exists and not can_use:
        problems.append(f"role {who} lacks USAGE on schema {schema}: GRANT USAGE ON SCHEMA {schema} TO {who}")
    ours = {audit: tables.current, nulling: tables.nulling_transactions}
    to_create = [name for name, table in ours.items() if table is None]
    if schema_exists and to_create and not can_create_in:
        problems.append(
            f"role {who} lacks CREATE on schema {schema}, needed to create {' and '.join(to_create)} there: "
            f"GRANT CREATE ON SCHEMA {schema} TO {who}"
        )
    # The audit's rows are updated when a run meets a row twice; the nulling transactions are only added to.
    for (name, table), needs in zip(ours.items(), ("SELECT, INSERT, UPDATE", "SELECT, INSERT"), strict=True):
        if table is None:
            continue
        granted = dict(
            zip(
                ("SELECT", "INSERT", "UPDATE"),
                conn.execute(statement("catalog", "audit_privileges"), {"relid": table.oid}).fetchone(),
                strict=True,
            )
        )
        if not all(granted[privilege] for privilege in needs.split(", ")):
            problems.append(f"role {who} lacks {needs} on {name}: GRANT {needs} ON {name} TO {who}")
    if tables.legacy is not None:
        owns = conn.execute(statement("catalog", "owns_relation"), {"relid": tables.legacy.oid}).fetchone()[0]
        if not owns:
            problems.append(
                f"role {who} does not own {spec.legacy_audit_qualified} (an earlier version's audit table), so it "
                f"cannot move it to {spec.audit_qualified}: run as its owner, or move it by hand"
            )
    return problems


def ensure_audit_table(conn: psycopg.Connection, spec: ForeignKeySpec, state: TargetState) -> None:
    """The audit table in the pipeline's schema, created if missing, and an earlier version's one in the app's
    schema moved there with all its rows, all in one transaction. The caller holds the run lock."""
    try:
        _ensure_audit_table(conn, spec, state)
    except pgerrors.UniqueViolation:
        # Another key's first run created the shared schema or table between our look and our CREATE ... IF NOT
        # EXISTS (which only skips what it sees): it exists now, and a second look finds it.
        _ensure_audit_table(conn, spec, state)


def _ensure_audit_table(conn: psycopg.Connection, spec: ForeignKeySpec, state: TargetState) -> None:
    with conn.transaction():
        set_local_timeouts(
            conn, lock_timeout_ms=AUDIT_DDL_LOCK_TIMEOUT_MS, statement_timeout_ms=AUDIT_DDL_STATEMENT_TIMEOUT_MS
        )
        tables = find_audit_tables(conn, spec)
        # Comments only on what this step creates or moves: a schema or table a DBA made for us may not be ours
        # to comment on (COMMENT needs ownership), and it needs none.
        # Whatever this step creates or moves in, only the pipeline's role may write, in the same transaction
        # (records.privileges): ALTER DEFAULT PRIVILEGES may have given others rights at CREATE, and a table moved
        # from the app's schema keeps the grants it had there.
        if not conn.execute(statement("catalog", "schema_exists"), {"schema": spec.audit_schema}).fetchone()[0]:
            conn.execute(statement("audit", "create_schema", spec))
            conn.execute(statement("audit", "comment_schema", spec))
            lock_down_schema(conn, spec.audit_schema)
        if tables.legacy is not None and tables.current is None:
            conn.execute(statement("audit", "move_legacy_table", spec))
            conn.execute(statement("audit", "comment_table", spec))
            lock_down_table(conn, spec.audit_schema, spec.audit_table)
            rows = conn.execute(statement("audit", "count_rows", spec)).fetchone()[0]
            log.warning(
                "audit: moved %s to %s with its %d row(s)", spec.legacy_audit_qualified, spec.audit_qualified, rows
            )
        elif tables.legacy is not None:
            moved = conn.execute(statement("audit", "merge_legacy_rows", spec)).fetchone()[0]
            conn.execute(statement("audit", "drop_legacy_table", spec))
            log.warning(
                "audit: merged %d row(s) of %s into %s and dropped it",
                moved,
                spec.legacy_audit_qualified,
                spec.audit_qualified,
            )
        elif tables.current is None:
            conn.execute(statement("audit", "create_table", spec, state))
            conn.execute(statement("audit", "comment_table", spec))
            _comment_columns(conn, spec)
            lock_down_table(conn, spec.audit_schema, spec.audit_table)
        if tables.nulling_transactions is None:
            conn.execute(statement("audit", "create_nulling_transactions", spec))
            conn.execute(statement("audit", "comment_nulling_transactions", spec))
            lock_down_table(conn, spec.audit_schema, spec.nulling_transactions_table)


def _comment_columns(conn: psycopg.Connection, spec: ForeignKeySpec) -> None:
    """Each copied column names the app's column it copies, so the table reads by hand whatever the key's shape."""
    copies = [
        *zip(spec.audit_row_key_columns, spec.row_key, ("the row key",) * len(spec.row_key), strict=True),
        *zip(spec.audit_pointer_columns, spec.columns, ("the old value",) * len(spec.columns), strict=True),
    ]
    for audit_column, app_column, what in copies:
        conn.execute(
            statement(
                "audit",
                "comment_column",
                spec,
                audit_column=sql.Identifier(spec.audit_schema, spec.audit_table, audit_column),
                comment=sql.Literal(f"{what}: {spec.schema}.{spec.table}.{app_column}"),
            )
        )


def audit_summary(spec: ForeignKeySpec, tables: AuditTables) -> dict[str, Any]:
    return {"audit_table": spec.audit_qualified, "audit_plan": tables.plan(spec)}
