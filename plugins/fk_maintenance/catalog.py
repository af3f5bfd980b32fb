"""What the target database holds now, compared with the spec. Read-only catalog queries."""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg

from .errors import ConcurrentRun, PreflightFailed
from .spec import ON_DELETE_ACTIONS, ForeignKeySpec
from .sqlfiles import statement


@dataclass(frozen=True)
class TableInfo:
    oid: int
    relkind: str
    total_bytes: int
    estimated_rows: int
    owner: str


@dataclass(frozen=True)
class ColumnInfo:
    attnum: int
    type_name: str
    type_oid: int
    not_null: bool


@dataclass(frozen=True)
class ConstraintState:
    exists: bool
    matches: bool = False
    validated: bool = False
    definition: str = ""
    mismatches: tuple[str, ...] = ()


@dataclass(frozen=True)
class IndexState:
    exists: bool
    is_index: bool = False
    matches: bool = False
    valid: bool = False
    definition: str = ""
    mismatches: tuple[str, ...] = ()
    on_target_table: bool = False
    build_in_progress_pid: int | None = None


@dataclass
class TargetState:
    table: TableInfo | None = None
    ref_table: TableInfo | None = None
    column: ColumnInfo | None = None
    ref_column: ColumnInfo | None = None
    row_key: ColumnInfo | None = None
    constraint: ConstraintState = field(default_factory=lambda: ConstraintState(exists=False))
    index: IndexState = field(default_factory=lambda: IndexState(exists=False))
    problems: list[str] = field(default_factory=list)


def table_info(conn: psycopg.Connection, schema: str, table: str) -> TableInfo | None:
    row = conn.execute(statement("catalog", "table"), {"schema": schema, "table": table}).fetchone()
    return TableInfo(*row) if row else None


def column_info(conn: psycopg.Connection, relid: int, column: str) -> ColumnInfo | None:
    row = conn.execute(statement("catalog", "column"), {"relid": relid, "column": column}).fetchone()
    return ColumnInfo(*row) if row else None


def constraint_state(conn: psycopg.Connection, spec: ForeignKeySpec, state: TargetState) -> ConstraintState:
    assert state.table and state.ref_table and state.column and state.ref_column
    row = conn.execute(
        statement("catalog", "constraint_by_name"), {"relid": state.table.oid, "name": spec.constraint}
    ).fetchone()
    if row is None:
        return ConstraintState(exists=False)
    _oid, contype, _conrelid, confrelid, conkey, confkey, deltype, validated, deferrable, definition = row
    mismatches: list[str] = []
    if contype != "f":
        mismatches.append(f"it is not a foreign key (contype {contype!r})")
    else:
        if confrelid != state.ref_table.oid:
            mismatches.append(f"it references another table, not {spec.schema}.{spec.ref_table}")
        if list(conkey or []) != [state.column.attnum]:
            mismatches.append(f"its columns are not ({spec.column})")
        if list(confkey or []) != [state.ref_column.attnum]:
            mismatches.append(f"its referenced columns are not ({spec.ref_column})")
        if deltype != spec.on_delete_code:
            mismatches.append(
                f"it is ON DELETE {ON_DELETE_ACTIONS.get(deltype, deltype)}, not ON DELETE {spec.on_delete}"
            )
        if deferrable:
            mismatches.append("it is DEFERRABLE")
    return ConstraintState(
        exists=True,
        matches=not mismatches,
        validated=bool(validated),
        definition=definition,
        mismatches=tuple(mismatches),
    )


def index_state(conn: psycopg.Connection, spec: ForeignKeySpec, state: TargetState) -> IndexState:
    assert state.table and state.column
    rel = conn.execute(statement("catalog", "relation_by_name"), {"schema": spec.schema, "name": spec.index}).fetchone()
    if rel is None:
        return IndexState(exists=False)
    oid, relkind = rel
    if relkind not in ("i", "I"):
        return IndexState(
            exists=True,
            is_index=False,
            mismatches=(f"a relation of kind {relkind!r} (not an index) already has the name {spec.index}",),
        )
    (indrelid, amname, valid, _ready, unique, natts, nkeyatts, indkey, has_exprs, has_pred, definition) = conn.execute(
        statement("catalog", "index_by_oid"), {"oid": oid}
    ).fetchone()
    mismatches: list[str] = []
    if indrelid != state.table.oid:
        mismatches.append(f"it is an index on another table, not {spec.schema}.{spec.table}")
    if amname != "btree":
        mismatches.append(f"it uses {amname}, not btree")
    if unique:
        mismatches.append("it is UNIQUE")
    if has_exprs or list(indkey or []) != [state.column.attnum] or natts != 1 or nkeyatts != 1:
        mismatches.append(f"its columns are not exactly ({spec.column})")
    if has_pred:
        mismatches.append("it is partial (has a WHERE clause)")
    building = conn.execute(statement("catalog", "index_build_in_progress"), {"oid": oid}).fetchone()
    return IndexState(
        exists=True,
        is_index=True,
        matches=not mismatches,
        valid=bool(valid),
        definition=definition,
        mismatches=tuple(mismatches),
        on_target_table=indrelid == state.table.oid,
        build_in_progress_pid=building[0] if building else None,
    )


# Kinds of relation a key can live on: an ordinary table, or (referenced only, for now) a partitioned one.
TABLE_KINDS = {"r": "table", "p": "partitioned table"}
RELKIND_NAMES = {"v": "view", "m": "materialized view", "f": "foreign table", "S": "sequence", "i": "index"}


def inspect_target(conn: psycopg.Connection, spec: ForeignKeySpec) -> TargetState:
    """Everything the steps need to know about the target, and every way it differs from the spec or is a shape
    this version cannot converge (each named with what would make it work)."""
    state = TargetState()
    state.table = table_info(conn, spec.schema, spec.table)
    state.ref_table = state.table if spec.ref_table == spec.table else table_info(conn, spec.schema, spec.ref_table)
    state.problems.extend(_table_problems(spec, state))
    if state.problems:
        return state
    assert state.table is not None and state.ref_table is not None
    state.column = column_info(conn, state.table.oid, spec.column)
    state.ref_column = column_info(conn, state.ref_table.oid, spec.ref_column)
    state.row_key = column_info(conn, state.table.oid, spec.row_key)
    state.problems.extend(_column_problems(conn, spec, state))
    if state.column is None or state.ref_column is None or state.row_key is None:
        return state
    state.constraint = constraint_state(conn, spec, state)
    if state.constraint.exists and not state.constraint.matches:
        state.problems.append(
            f"constraint {spec.constraint} already exists with another definition "
            f"({state.constraint.definition}): {'; '.join(state.constraint.mismatches)}"
        )
    state.index = index_state(conn, spec, state)
    if state.index.exists and not state.index.is_index:
        state.problems.extend(state.index.mismatches)
    elif state.index.exists and (state.index.valid or not state.index.on_target_table) and not state.index.matches:
        # An INVALID index on our table is a failed build of ours and gets rebuilt; anything else is not ours.
        state.problems.append(
            f"index {spec.index} already exists with another definition ({state.index.definition}): "
            f"{'; '.join(state.index.mismatches)}"
        )
    return state


def _table_problems(spec: ForeignKeySpec, state: TargetState) -> list[str]:
    problems = []
    for role, name, info, kinds in (
        ("table", spec.table, state.table, ("r",)),
        ("referenced table", spec.ref_table, state.ref_table, ("r", "p")),
    ):
        where = f"{spec.schema}.{name}"
        if info is None:
            problems.append(f"{role} {where} does not exist")
        elif info.relkind == "p" and "p" not in kinds:
            problems.append(
                f"{where} is a partitioned table, which this version cannot give the key: CREATE INDEX CONCURRENTLY "
                "cannot build on a partitioned table, and before PostgreSQL 18 it cannot take a NOT VALID foreign "
                "key. Declare the key on each partition instead (every partition is a table of its own)"
            )
        elif info.relkind not in kinds:
            kind = RELKIND_NAMES.get(info.relkind, f"relkind {info.relkind!r}")
            problems.append(f"{role} {where} is a {kind}, not a table")
    return problems


def _column_problems(conn: psycopg.Connection, spec: ForeignKeySpec, state: TargetState) -> list[str]:
    assert state.table is not None and state.ref_table is not None
    problems = []
    for role, table, column, info in (
        ("column", spec.table, spec.column, state.column),
        ("referenced column", spec.ref_table, spec.ref_column, state.ref_column),
        ("row key column", spec.table, spec.row_key, state.row_key),
    ):
        if info is None:
            problems.append(f"{role} {spec.schema}.{table}.{column} does not exist")
    if state.column is None or state.ref_column is None or state.row_key is None:
        return problems
    if state.column.type_oid != state.ref_column.type_oid:
        problems.append(
            f"type mismatch: {spec.table}.{spec.column} is {state.column.type_name} but "
            f"{spec.ref_table}.{spec.ref_column} is {state.ref_column.type_name}"
        )
    if state.column.not_null and spec.on_delete == "SET NULL":
        problems.append(f"{spec.table}.{spec.column} is NOT NULL, so ON DELETE SET NULL could never apply")
    if not _unique(conn, state.ref_table.oid, state.ref_column.attnum):
        problems.append(
            f"{spec.ref_table}.{spec.ref_column} has no primary key or unique index that is not DEFERRABLE, so it "
            "cannot be referenced"
        )
    if not _unique(conn, state.table.oid, state.row_key.attnum) or not state.row_key.not_null:
        problems.append(
            f"row_key {spec.table}.{spec.row_key} is not unique and NOT NULL (no primary key, or unique index and "
            "NOT NULL, on exactly that column), so the audit could not tell its rows apart: declare as row_key a "
            "column that is, such as the table's single-column primary key"
        )
    return problems


def _unique(conn: psycopg.Connection, relid: int, attnum: int) -> bool:
    return bool(
        conn.execute(statement("catalog", "unique_on_column"), {"relid": relid, "attnum": attnum}).fetchone()[0]
    )


def as_written(conn: psycopg.Connection, *names: str | tuple[str, ...]) -> list[str]:
    """Each name (a tuple: a qualified one) as SQL would need it written, quoted only where needed, for a
    message that shows the statement to run."""
    parts = [part for name in names for part in ((name,) if isinstance(name, str) else name)]
    quoted = iter(conn.execute(statement("catalog", "quote_idents"), {"names": parts}).fetchone()[0] or [])
    return [".".join(next(quoted) for _ in ((name,) if isinstance(name, str) else name)) for name in names]


def same_columns_indexes(conn: psycopg.Connection, spec: ForeignKeySpec, state: TargetState) -> list[tuple[str, str]]:
    """Valid indexes of other names that already serve the key exactly: (name, definition)."""
    assert state.table is not None and state.column is not None
    return conn.execute(
        statement("catalog", "same_columns_indexes"),
        {"relid": state.table.oid, "attnum": state.column.attnum, "name": spec.index},
    ).fetchall()


def require_target(conn: psycopg.Connection, spec: ForeignKeySpec, *, reads_only: bool = False) -> TargetState:
    """The target's state, or PreflightFailed naming every way it differs from the spec (nothing changed), or
    ConcurrentRun while another session builds our index (that one passes; a later look finds it done). A step
    that ``reads_only`` does not mind the build."""
    state = inspect_target(conn, spec)
    if state.problems:
        raise PreflightFailed(state.problems)
    if not reads_only:
        refuse_while_index_build_runs(state, spec)
    return state


def refuse_while_index_build_runs(state: TargetState, spec: ForeignKeySpec) -> None:
    if state.index.build_in_progress_pid is not None:
        raise ConcurrentRun(
            f"index {spec.index} is being built right now by pid {state.index.build_in_progress_pid} (another run, "
            "or someone by hand); this run changes nothing now and Airflow retries it once that build is done"
        )
