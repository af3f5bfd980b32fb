"""post_checks: every assertion about the end state, all evaluated, every failure reported together."""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from typing import Any

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql

from fk_maintenance.db.catalog import inspect_target
from fk_maintenance.db.keysql import bind
from fk_maintenance.db.session import set_local_timeouts, step_session
from fk_maintenance.db.sqlfiles import statement
from fk_maintenance.db.target_state import TargetState
from fk_maintenance.errors import PostChecksFailed
from fk_maintenance.keys.settings import RunSettings
from fk_maintenance.keys.spec import ForeignKeySpec

log = logging.getLogger(__name__)

# The hierarchy walk reads the whole table twice; an hour covers far more than the tables we have measured.
CHECK_STATEMENT_TIMEOUT_MS = 60 * 60 * 1000
# The probes touch one row by key: a second of waiting means the app holds that row, and a probe must never
# make the app wait on us longer than that.
PROBE_LOCK_TIMEOUT_MS = 1000
PROBE_STATEMENT_TIMEOUT_MS = 30_000
# The lowest value of each integer key type: sequences count up from 1, so no insert takes these values
# while the probe points a row at one.
INTEGER_TYPE_MINIMUM = {"smallint": -(2**15), "integer": -(2**31), "bigint": -(2**63)}


# Type names (format_type) of keys whose missing value is a random text, looked up to be absent.
TEXT_TYPES = ("text", "character varying", "citext")


@dataclass(frozen=True)
class Check:
    """One end-state assertion: ``ok`` True (passed), False (failed) or None (could not be tried here, so it
    proves nothing and is never counted as passed)."""

    name: str
    ok: bool | None
    detail: str

    @property
    def outcome(self) -> str:
        return {True: "PASS", False: "FAIL", None: "NOT TRIED"}[self.ok]


def post_checks(conn: psycopg.Connection, spec: ForeignKeySpec, settings: RunSettings) -> dict[str, Any]:
    """Evaluate every end-state assertion; raise PostChecksFailed naming all failures (not in a dry run)."""
    with step_session(
        conn, "post_checks", settings, statement_timeout_ms=CHECK_STATEMENT_TIMEOUT_MS, read_only=settings.dry_run
    ):
        return _post_checks(conn, spec, settings)


def _post_checks(conn: psycopg.Connection, spec: ForeignKeySpec, settings: RunSettings) -> dict[str, Any]:
    started = time.monotonic()
    checks: list[Check] = []
    state = inspect_target(conn, spec)
    checks.append(Check("target matches the spec", not state.problems, "; ".join(state.problems) or spec.describe()))
    if state.table is None or not state.complete:
        return _finish(checks, settings, started)

    con = state.constraint
    checks.append(Check("constraint exists", con.exists, con.definition or f"{spec.constraint} is missing"))
    checks.append(
        Check(
            "constraint is a foreign key on the declared columns, " + spec.definition_sql,
            con.exists and con.matches,
            "; ".join(con.mismatches) or con.definition or "missing",
        )
    )
    checks.append(
        Check(
            "constraint is validated",
            con.exists and con.validated,
            "convalidated = true" if con.validated else "NOT VALID (or missing)",
        )
    )

    idx = state.index
    # A key that declares no index of its own (keys.drizzle) is not checked for one.
    if spec.build_index:
        checks.append(Check("index exists", idx.exists and idx.is_index, idx.definition or f"{spec.index} is missing"))
        checks.append(
            Check(
                "index is valid", idx.exists and idx.valid, "indisvalid = true" if idx.valid else "INVALID or missing"
            )
        )
        checks.append(
            Check(
                f"index is btree on ({', '.join(spec.columns)})",
                idx.exists and idx.matches,
                "; ".join(idx.mismatches) or idx.definition or "missing",
            )
        )
    if state.partitioned:
        checks.extend(partition_checks(spec, state))
    if spec.build_index and idx.exists and idx.valid:
        checks.append(_planner_uses_index(conn, spec, state))

    if settings.dry_run:
        checks.append(Check("database rejects a missing parent", None, "not tried in a dry run (it needs a write)"))
    else:
        checks.append(_rejects_missing_parent(conn, spec, state))

    orphans = conn.execute(statement("orphans", "count", spec)).fetchone()[0]
    checks.append(Check("zero orphans", orphans == 0, f"{orphans} row(s) point at a missing parent"))
    if spec.hierarchy_checks:
        checks.extend(hierarchy_checks(conn, spec, settings))
    return _finish(checks, settings, started)


def partition_checks(spec: ForeignKeySpec, state: TargetState) -> list[Check]:
    """The key and the index on every partition: what the app's writes to a partition and a parent's delete
    through the key's action actually use."""
    no_key = [p.described for p in state.partitions if not (p.key_exists and p.key_validated and p.key_inherited)]
    no_index = [p.described for p in state.partitions if not (p.attached_index and p.index_valid)]
    count = len(state.partitions)
    checks = [
        Check(
            f"every partition holds {spec.constraint}, validated, as the parent's",
            not no_key,
            f"missing, NOT VALID or not the parent's on: {', '.join(no_key)}" if no_key else f"{count} partition(s)",
        ),
    ]
    if spec.build_index:  # a key without an index of its own (keys.drizzle) is not checked for one
        checks.append(
            Check(
                f"every partition has a valid index attached to {spec.index}",
                not no_index,
                f"missing or INVALID on: {', '.join(no_index)}" if no_index else f"{count} partition(s)",
            )
        )
    return checks


def _planner_uses_index(conn: psycopg.Connection, spec: ForeignKeySpec, state: TargetState) -> Check:
    """Can the planner answer ``WHERE columns = $n`` from the index (what the key's ON DELETE action does)? On a
    partitioned child the plan names the partitions' indexes attached to ours."""
    lookup = " AND ".join(f"{name} = ${i}" for i, name in enumerate(spec.columns, 1))
    name = f"planner can use {state.index.name or spec.index} for WHERE {lookup}"
    with conn.transaction(force_rollback=True):
        set_local_timeouts(conn, lock_timeout_ms=PROBE_LOCK_TIMEOUT_MS, statement_timeout_ms=PROBE_STATEMENT_TIMEOUT_MS)
        conn.execute(statement("checks", "prefer_index"))
        # A value the key holds is a valid literal of its types, whatever they are (date, enum, domain...).
        row = conn.execute(statement("checks", "some_pointer", spec)).fetchone()
        if row is None:
            return Check(name, None, "not tried: no row has a pointer to look up")
        plan = conn.execute(statement("checks", "plan_for_children_lookup", spec), bind("value", row)).fetchone()[0]
    used = _index_names(plan if isinstance(plan, list | dict) else json.loads(plan))
    ours = {state.index.name or spec.index} | {part.attached_index for part in state.partitions if part.attached_index}
    return Check(name, bool(used & ours), f"plan uses {', '.join(sorted(used)) or 'no index'}")


def _index_names(node: Any) -> set[str]:
    names: set[str] = set()
    if isinstance(node, dict):
        if "Index Name" in node:
            names.add(node["Index Name"])
        for value in node.values():
            names |= _index_names(value)
    elif isinstance(node, list):
        for item in node:
            names |= _index_names(item)
    return names


def _missing_parent_value(
    conn: psycopg.Connection, spec: ForeignKeySpec, ref_column: str, type_name: str
) -> str | None:
    """A value of ``type_name`` that no referenced row holds in ``ref_column``, or None if we cannot make one."""
    extra = {"ref_column": sql.Identifier(ref_column)}
    if type_name == "uuid":
        return conn.execute(statement("checks", "missing_parent_uuid")).fetchone()[0]
    varchar = re.fullmatch(r"character varying\((\d+)\)", type_name)
    if type_name in TEXT_TYPES or varchar:
        max_length = min(int(varchar.group(1)), 64) if varchar else 64
        row = conn.execute(
            statement("checks", "missing_parent_text", spec, **extra), {"max_length": max_length}
        ).fetchone()
        return row[0] if row else None
    if type_name in INTEGER_TYPE_MINIMUM:
        row = conn.execute(
            statement("checks", "missing_parent_integer", spec, **extra),
            {"type_minimum": INTEGER_TYPE_MINIMUM[type_name]},
        ).fetchone()
        return row[0] if row else None
    return None


def _probe_key(
    conn: psycopg.Connection, spec: ForeignKeySpec, state: TargetState, own: list[str | None]
) -> tuple[list[Any] | None, str]:
    """A whole key no referenced row has, for a row whose key holds ``own``: one column made up to be missing (a
    column the run nulls first, for (tenant_id, parent_id) the parent), the others the row's own values, or,
    where the row has NULLs, a referenced row's. (None, why) when none can be made."""
    assert state.columns is not None
    if None in own and len(spec.columns) > 1:
        borrowed = conn.execute(statement("checks", "some_parent", spec)).fetchone()
        if borrowed is None:
            return None, "the referenced table has no row to borrow the key's other columns from"
        own = [mine if mine is not None else theirs for mine, theirs in zip(own, borrowed, strict=True)]
    positions = range(len(spec.columns))
    preferred = sorted(positions, key=lambda i: (spec.columns[i] in state.nulled, i), reverse=True)
    for position in preferred:
        missing = _missing_parent_value(conn, spec, spec.ref_columns[position], state.columns[position].type_name)
        if missing is not None:
            # Every NULL is filled by now: borrowed above, or (a key of one column) the one replaced here.
            probe = list(own)
            probe[position] = missing
            return probe, ""
    types = ", ".join(dict.fromkeys(info.type_name for info in state.columns))
    return None, f"no way to make a missing {types} value"


def _rejects_missing_parent(conn: psycopg.Connection, spec: ForeignKeySpec, state: TargetState) -> Check:
    name = "database rejects a missing parent (SQLSTATE 23503)"
    width = len(spec.row_key)
    with conn.transaction(force_rollback=True):
        set_local_timeouts(conn, lock_timeout_ms=PROBE_LOCK_TIMEOUT_MS, statement_timeout_ms=PROBE_STATEMENT_TIMEOUT_MS)
        row = (
            conn.execute(statement("checks", "some_complete_row", spec)).fetchone()
            or conn.execute(statement("checks", "some_row", spec)).fetchone()
        )
        if row is None:
            return Check(name, None, "not tried: the table has no unlocked row to try it on")
        probe, why_not = _probe_key(conn, spec, state, list(row[width:]))
        if probe is None:
            return Check(name, None, f"not tried: {why_not}")
        missing = probe[0] if len(probe) == 1 else f"({', '.join(probe)})"
        params = bind("probe", probe) | bind("row_key", row[:width])
        try:
            with conn.transaction():  # a savepoint, so the outer rollback stays clean
                if spec.initially_deferred:
                    conn.execute(statement("checks", "check_keys_now"))
                conn.execute(statement("checks", "reject_missing_parent", spec), params)
        except pgerrors.ForeignKeyViolation as violation:
            if violation.diag.constraint_name == spec.constraint:
                return Check(name, True, f"pointing a row at {missing} raised 23503 ({spec.constraint}); rolled back")
            # Another key refused the change (a key on the row's own columns, referenced from elsewhere): that
            # proves nothing about ours.
            return Check(
                name,
                None,
                f"not tried: pointing a row at {missing} was refused by another key first "
                f"({violation.diag.constraint_name})",
            )
        except (pgerrors.IntegrityError, pgerrors.DataError, pgerrors.RaiseException) as other:
            # A CHECK constraint or an app trigger refused the probe's value before the key could: that says
            # nothing about the key.
            return Check(
                name,
                None,
                f"not tried: the probe's value {missing} was refused first ({other.sqlstate}: "
                f"{(other.diag.message_primary or '').strip()})",
            )
    return Check(name, False, f"pointing a row at the missing parent {missing} was accepted (rolled back)")


def hierarchy_checks(conn: psycopg.Connection, spec: ForeignKeySpec, settings: RunSettings) -> list[Check]:
    """No cycle and no chain deeper than ``max_depth``, counting a row whose parent is missing as a root (as
    null_orphans leaves it), so preflight can judge the data before anything changes and post_checks after."""
    with conn.transaction():
        set_local_timeouts(
            conn, lock_timeout_ms=settings.lock_timeout_ms, statement_timeout_ms=CHECK_STATEMENT_TIMEOUT_MS
        )
        conn.execute(statement("checks", "hierarchy_work_mem"))
        unreached, deepest, too_deep = conn.execute(
            statement("checks", "depth_summary", spec), {"max_depth": settings.max_depth}
        ).fetchone()
    checks = []
    if unreached:
        start = conn.execute(statement("checks", "unreached_example", spec)).fetchone()[0]
        path, is_cycle = conn.execute(statement("checks", "chain_up", spec), {"start": start}).fetchone()
        example = f"cycle {' -> '.join(path)}" if is_cycle else f"chain {' -> '.join(path)} hangs below a cycle"
        detail = f"{unreached} row(s) are not reachable from a root; e.g. {example}"
        checks.append(Check("no cycles in the hierarchy", False, detail))
    else:
        checks.append(Check("no cycles in the hierarchy", True, "every row is reachable from a root"))
    if too_deep is not None:
        path, _ = conn.execute(statement("checks", "chain_up", spec), {"start": too_deep}).fetchone()
        checks.append(
            Check(
                f"hierarchy depth at most {settings.max_depth}",
                False,
                f"the deepest chain has {deepest} levels; e.g. {len(path)} levels: {' -> '.join(path)} "
                "(a row, then its ancestors up to the root)",
            )
        )
    else:
        checks.append(
            Check(f"hierarchy depth at most {settings.max_depth}", True, f"deepest chain has {deepest} level(s)")
        )
    return checks


def _finish(checks: list[Check], settings: RunSettings, started: float) -> dict[str, Any]:
    for check in checks:
        level = logging.ERROR if check.ok is False else logging.WARNING if check.ok is None else logging.INFO
        log.log(level, "post_checks: [%s] %s: %s", check.outcome, check.name, check.detail)
    failures = [f"{c.name}: {c.detail}" for c in checks if c.ok is False]
    summary = {
        "passed": sum(c.ok is True for c in checks),
        "failed": len(failures),
        "not_tried": sum(c.ok is None for c in checks),
        "checks": [asdict(c) for c in checks],
        "seconds": round(time.monotonic() - started, 3),
    }
    if failures and not settings.dry_run:
        raise PostChecksFailed(failures, summary)
    return summary
