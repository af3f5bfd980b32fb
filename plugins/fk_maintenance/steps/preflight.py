"""preflight: everything that can be known before the first change, checked before it. Read-only."""

from __future__ import annotations

import logging
import time
from typing import Any, NamedTuple

import psycopg

from fk_maintenance.db.catalog import (
    as_written,
    inspect_target,
    other_foreign_keys,
    refuse_while_index_build_runs,
    same_columns_indexes,
)
from fk_maintenance.db.session import CATALOG_STATEMENT_TIMEOUT_MS, set_local_timeouts, step_session
from fk_maintenance.db.sqlfiles import statement
from fk_maintenance.db.target_state import PartitionInfo, TargetState
from fk_maintenance.errors import PreflightFailed
from fk_maintenance.keys.drizzle import no_index_note
from fk_maintenance.keys.settings import RunSettings
from fk_maintenance.keys.spec import ForeignKeySpec
from fk_maintenance.records.audit import AuditTables, audit_problems, audit_summary, find_audit_tables
from fk_maintenance.records.cascade import delete_key_problems
from fk_maintenance.records.privileges import record_writer_warnings
from fk_maintenance.steps.checks import hierarchy_checks
from fk_maintenance.steps.constraint import parent_takes_not_valid
from fk_maintenance.steps.orphans import SCAN_STATEMENT_TIMEOUT_MS, delete_problems, refused_orphans_message

log = logging.getLogger(__name__)

MIN_SERVER_VERSION_NUM = 130000  # gen_random_uuid() in core, pg_stat_progress_create_index


def preflight(conn: psycopg.Connection, spec: ForeignKeySpec, settings: RunSettings) -> dict[str, Any]:
    with step_session(
        conn, "preflight", settings, statement_timeout_ms=CATALOG_STATEMENT_TIMEOUT_MS, read_only=True
    ) as route:
        return _preflight(conn, spec, settings) | {"connection": f"{route.mode} ({route.detail})"}


def _preflight(conn: psycopg.Connection, spec: ForeignKeySpec, settings: RunSettings) -> dict[str, Any]:
    started = time.monotonic()
    version, version_num, database, user, standby = conn.execute(statement("session", "server_facts")).fetchone()
    log.info("preflight: connected to %s as %s, PostgreSQL %s", database, user, version)
    state = inspect_target(conn, spec)
    audit_tables = find_audit_tables(conn, spec)
    problems = [*state.problems, *_server_problems(version, version_num, database, standby, settings)]
    warnings: list[str] = []
    if state.complete:
        problems.extend(_privilege_problems(conn, spec, settings, state))
        problems.extend(audit_problems(conn, spec, state, audit_tables, writes=not settings.dry_run))
        if state.policy == "delete" and not state.problems:
            problems.extend(delete_key_problems(conn, spec, state, settings))
        warnings.extend(_warnings(conn, spec, state))
        # Who else can change what restore trusts: warned, not refused (the grants are a DBA's to change).
        warnings.extend(record_writer_warnings(conn, spec))
    for warning in warnings:
        log.warning("preflight: %s", warning)
    if not problems:
        # Data the end state cannot hold is refused now, while the target is still untouched, rather than by a
        # step that fails after others changed things.
        problems.extend(_data_problems(conn, spec, settings, state))
    if problems:
        raise PreflightFailed(problems)
    refuse_while_index_build_runs(state, spec)
    summary = _summary(conn, spec, settings, state, audit_tables, warnings, (version, database, user))
    summary["seconds"] = round(time.monotonic() - started, 3)
    log.info(
        "preflight: %s is %s (~%d rows%s); constraint: %s; index: %s",
        summary["table"],
        summary["table_size"],
        summary["estimated_rows"],
        f" in {len(state.partitions)} partitions" if state.partitioned else "",
        summary["constraint"],
        summary["index"],
    )
    for line in summary.get("partitions", []):
        log.info("preflight: partition %s", line)
    return summary


def _server_problems(version: str, version_num: int, database: str, standby: bool, settings: RunSettings) -> list[str]:
    problems = []
    if version_num < MIN_SERVER_VERSION_NUM:
        problems.append(f"PostgreSQL {version} is too old; 13 or newer is needed")
    if standby and not settings.dry_run:
        problems.append(
            f"the connection reaches a standby (pg_is_in_recovery() is true): {database} there is read-only. Point "
            "the connection at the primary (a dry run may read a standby)"
        )
    return problems


def _summary(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    settings: RunSettings,
    state: TargetState,
    audit_tables: AuditTables,
    warnings: list[str],
    server: tuple[str, str, str],
) -> dict[str, Any]:
    """What preflight found, for the report and the log: the server, the table, the key's objects as they are."""
    version, database, user = server
    assert state.table is not None
    return {
        "server_version": version,
        "database": database,
        "user": user,
        "table": f"{spec.schema}.{spec.table}",
        "key": spec.describe(),
        "table_bytes": state.total_bytes,
        "table_size": _human_bytes(state.total_bytes),
        "estimated_rows": state.estimated_rows,
        "constraint": _describe_constraint(state, parent_takes_not_valid(conn)),
        "index": _describe_index(state) if spec.build_index else "none of the key's own (it declares none)",
        **({"partitions": [_describe_partition(part) for part in state.partitions]} if state.partitioned else {}),
        **audit_summary(spec, audit_tables),
        "warnings": warnings,
        "dry_run": settings.dry_run,
    }


def _warnings(conn: psycopg.Connection, spec: ForeignKeySpec, state: TargetState) -> list[str]:
    columns = ", ".join(spec.columns)
    warnings = [
        f"another foreign key on ({columns}) exists: {name} {definition}{'' if validated else ' NOT VALID'}; "
        "the app will have two"
        for name, definition, validated in other_foreign_keys(conn, spec, state)
    ]
    if not spec.build_index:
        # No index of the pipeline's (keys.drizzle): said unless one the app made already serves the key's lookups.
        warnings += [] if same_columns_indexes(conn, spec, state) else [no_index_note(spec)]
    elif not (state.index.exists and state.index.valid):
        warnings += [
            f"index {name} ({definition}) already serves ({columns}), and this run builds {spec.index} beside "
            f"it, a second index the same: to adopt {name} instead, declare index: {name} for this key"
            for name, definition in same_columns_indexes(conn, spec, state)
        ]
    warnings += [
        f"partition {key.described} holds the key as declared under another name, {key.name}: add_fk_not_valid "
        f"renames it {spec.constraint} (ACCESS EXCLUSIVE on that partition for an instant, in a free moment, under "
        "lock_timeout_ms), and the parent's key adopts it: no second key"
        for key in state.equal_keys
        if state.table is not None and key.relid != state.table.oid
    ]
    if state.partitioned and not state.constraint.exists and not parent_takes_not_valid(conn):
        warnings.append(
            f"before PostgreSQL 18 the parent's ADD CONSTRAINT, which adopts the partitions' validated keys, takes "
            f"ACCESS EXCLUSIVE on {spec.ref_schema}.{spec.ref_table} (the app's reads of it wait too"
            + (", and on both tables' partitions" if state.ref_table and state.ref_table.relkind == "p" else "")
            + "): for milliseconds, at most lock_timeout_ms, in a moment when no session holds a lock on it"
        )
    return warnings


def _data_problems(
    conn: psycopg.Connection, spec: ForeignKeySpec, settings: RunSettings, state: TargetState
) -> list[str]:
    problems = []
    if state.policy in ("refuse", "delete"):
        # Nulling is not this key's way with an orphan: refused ones stop the run here, deleted ones are walked
        # through the database's own keys first (what a delete would take along, and what would forbid it).
        with conn.transaction():
            set_local_timeouts(
                conn, lock_timeout_ms=settings.lock_timeout_ms, statement_timeout_ms=SCAN_STATEMENT_TIMEOUT_MS
            )
            orphans = conn.execute(statement("orphans", "count", spec)).fetchone()[0]
        if orphans and state.policy == "refuse":
            problems.append(refused_orphans_message(spec, state, orphans))
        elif orphans:
            problems.extend(delete_problems(conn, spec, settings, state))
    if spec.hierarchy_checks:
        problems.extend(
            f"{check.name}: {check.detail}; fix the data in the app, then run again"
            for check in hierarchy_checks(conn, spec, settings)
            if check.ok is False
        )
    return problems


class _Privileges(NamedTuple):
    """What the role may do, in the order the catalog's ``privileges`` statement reads it."""

    owns: bool
    can_select: bool
    can_update: bool
    can_use: bool
    can_create_in: bool
    can_select_ref: bool
    can_use_ref_schema: bool
    can_reference: bool
    owner_is_superuser: bool
    member_of_owner: bool


class _Names(NamedTuple):
    """The names a GRANT is written with, quoted as PostgreSQL would need them."""

    who: str
    table: str
    ref_table: str
    schema: str
    ref_schema: str
    owner: str


# (held, what is needed, the statement that grants it)
_Need = tuple[bool, str, str]


def _privilege_problems(
    conn: psycopg.Connection, spec: ForeignKeySpec, settings: RunSettings, state: TargetState
) -> list[str]:
    """Every privilege the run will need that the role it connects as lacks, each with the statement that grants
    it; a dry run needs only to read."""
    assert state.table is not None and state.ref_table is not None
    held = _Privileges(
        *conn.execute(
            statement("catalog", "privileges"), {"relid": state.table.oid, "ref_relid": state.ref_table.oid}
        ).fetchone()
    )
    names = _Names(
        *as_written(
            conn,
            conn.info.user,
            (spec.schema, spec.table),
            (spec.ref_schema, spec.ref_table),
            spec.schema,
            spec.ref_schema,
            state.table.owner,
        )
    )
    needed = _read_needs(spec, held, names)
    if not settings.dry_run:
        needed += _write_needs(conn, held, names)
    return [f"role {names.who} lacks {what}: {grant}" for ok, what, grant in needed if not ok]


def _read_needs(spec: ForeignKeySpec, held: _Privileges, names: _Names) -> list[_Need]:
    who, table, ref_table, schema, ref_schema, _owner = names
    needed = [(held.can_use, f"USAGE on schema {schema}", f"GRANT USAGE ON SCHEMA {schema} TO {who}")]
    if spec.ref_schema != spec.schema:
        needed.append(
            (held.can_use_ref_schema, f"USAGE on schema {ref_schema}", f"GRANT USAGE ON SCHEMA {ref_schema} TO {who}")
        )
    return [
        *needed,
        (held.can_select, f"SELECT on {table}", f"GRANT SELECT ON {table} TO {who}"),
        (held.can_select_ref, f"SELECT on {ref_table}", f"GRANT SELECT ON {ref_table} TO {who}"),
    ]


def _write_needs(conn: psycopg.Connection, held: _Privileges, names: _Names) -> list[_Need]:
    who, table, ref_table, schema, _ref_schema, owner = names
    ownership_fix = _ownership_fix(
        conn, table, who, owner, owner_is_superuser=held.owner_is_superuser, member_of_owner=held.member_of_owner
    )
    return [
        (
            held.owns,
            f"ownership of {table} (owner: {owner}; ALTER TABLE and CREATE INDEX need the owner's rights)",
            ownership_fix,
        ),
        (
            held.can_create_in,
            f"CREATE on schema {schema} (CREATE INDEX needs it, even for the table's owner)",
            f"GRANT CREATE ON SCHEMA {schema} TO {who}",
        ),
        (held.can_update, f"UPDATE on {table} (to null orphan pointers)", f"GRANT UPDATE ON {table} TO {who}"),
        (
            held.can_reference,
            f"REFERENCES on {ref_table} (ADD FOREIGN KEY needs it on the referenced table)",
            f"GRANT REFERENCES ON {ref_table} TO {who}",
        ),
    ]


def _ownership_fix(
    conn: psycopg.Connection, table: str, who: str, owner: str, *, owner_is_superuser: bool, member_of_owner: bool
) -> str:
    if owner_is_superuser:
        # Membership in a superuser role would make the pipeline's role a superuser.
        return (
            f"ALTER TABLE {table} OWNER TO a role that is not a superuser and that {who} is a member of "
            f"(never GRANT {owner} TO {who})"
        )
    if member_of_owner:  # a member that does not inherit the owner's rights (NOINHERIT)
        if conn.info.server_version >= 160000:
            return f"GRANT {owner} TO {who} WITH INHERIT TRUE"
        return f"ALTER ROLE {who} INHERIT"
    return f"GRANT {owner} TO {who}, or run as {owner}"


def _describe_constraint(state: TargetState, parent_takes_not_valid: bool) -> str:
    con = state.constraint
    if state.partitioned and not (con.exists and con.validated):
        valid = sum(part.key_validated for part in state.partitions)
        on = sum(part.key_exists for part in state.partitions)
        where = "on the parent NOT VALID" if con.exists else "absent on the parent"
        plan = (
            "added NOT VALID on the parent (each partition gets it), validated partition by partition"
            if parent_takes_not_valid
            else "added NOT VALID on each partition, validated partition by partition, then adopted by the parent"
        )
        return f"{where}; on {on} of {len(state.partitions)} partition(s), {valid} validated (to be {plan})"
    if not con.exists:
        return "absent (will be added NOT VALID, then validated)"
    return "present and validated" if con.validated else "present, NOT VALID (will be validated)"


def _describe_index(state: TargetState) -> str:
    idx = state.index
    if state.partitioned and not (idx.exists and idx.valid):
        attached = sum(part.attached_index is not None for part in state.partitions)
        where = "present ON ONLY the parent" if idx.exists else "absent on the parent"
        return (
            f"{where}; attached on {attached} of {len(state.partitions)} partition(s) (the rest will be built "
            "concurrently and attached one by one)"
        )
    if not idx.exists:
        return "absent (will be built concurrently)"
    if idx.name:
        return f"{idx.name} already serves the key and is used (no index is built)"
    return "present and valid" if idx.valid else "present but INVALID (will be dropped and rebuilt concurrently)"


def _describe_partition(part: PartitionInfo) -> str:
    index = f"index {part.attached_index} attached" if part.attached_index else "no index attached yet"
    key = "key validated" if part.key_validated else "key NOT VALID" if part.key_exists else "no key yet"
    return f"{part.described}: {_human_bytes(part.total_bytes)} (~{part.estimated_rows} rows), {index}, {key}"


def _human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover
