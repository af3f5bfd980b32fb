"""What the target database holds now, compared with the spec. Read-only catalog queries."""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg

from .errors import ConcurrentRun, PreflightFailed
from .spec import ON_DELETE_ACTIONS, ForeignKeySpec, describe_columns
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
    """What the database holds for the key: its tables, and each of its columns (in the spec's order; a list is
    None until every one of its columns was found)."""

    table: TableInfo | None = None
    ref_table: TableInfo | None = None
    columns: tuple[ColumnInfo, ...] | None = None
    ref_columns: tuple[ColumnInfo, ...] | None = None
    row_key: tuple[ColumnInfo, ...] | None = None
    constraint: ConstraintState = field(default_factory=lambda: ConstraintState(exists=False))
    index: IndexState = field(default_factory=lambda: IndexState(exists=False))
    problems: list[str] = field(default_factory=list)
    # The key's columns nulling an orphan sets to NULL (see nulled_columns).
    nulled: tuple[str, ...] = ()
    # What a run does to orphans (see orphan_policy).
    policy: str = ""

    @property
    def complete(self) -> bool:
        return self.columns is not None and self.ref_columns is not None and self.row_key is not None

    @property
    def not_null_key(self) -> bool:
        """No column of the key may be nulled, so an orphan cannot be made to pass the key by nulling."""
        return self.complete and not self.nulled

    @property
    def row_key_types(self) -> tuple[str, ...]:
        assert self.row_key is not None
        return tuple(info.type_name for info in self.row_key)

    @property
    def pointer_types(self) -> tuple[str, ...]:
        assert self.columns is not None
        return tuple(info.type_name for info in self.columns)


def nulled_columns(spec: ForeignKeySpec, columns: tuple[ColumnInfo, ...]) -> tuple[str, ...]:
    """What nulling an orphan sets to NULL: what the key's own ON DELETE would (the columns ``SET NULL (...)`` or
    ``SET DEFAULT (...)`` lists, every column for plain SET NULL), or the declared ``nullify_columns``, or else
    the key's one nullable column. One NULL is enough for MATCH SIMPLE to stop checking a row, and nulling more
    would change more of the row than the key needs (a nullable tenant_id is not ours to clear); with several
    nullable columns and no declaration, ``nulling_problems`` refuses the key."""
    if spec.on_delete_columns:
        return spec.on_delete_columns
    if spec.on_delete == "SET NULL":
        return spec.columns
    if spec.nullify_columns:
        return spec.nullify_columns
    nullable = tuple(name for name, info in zip(spec.columns, columns, strict=True) if not info.not_null)
    return nullable if len(nullable) == 1 else ()


def orphan_policy(spec: ForeignKeySpec, columns: tuple[ColumnInfo, ...]) -> str:
    """The declared ``orphans`` policy, or else nullify where a column of the key is nullable and refuse where
    none is (a NOT NULL key): deleting rows is never done undeclared."""
    return spec.orphans or ("nullify" if any(not info.not_null for info in columns) else "refuse")


def nulling_problems(spec: ForeignKeySpec, columns: tuple[ColumnInfo, ...], policy: str = "nullify") -> list[str]:
    """A column nulling sets to NULL (``nulled_columns``) that is NOT NULL, or the choice left open (several
    nullable columns, an action that nulls nothing, no declaration). Where the policy is not to null (delete,
    refuse), only the key's own action matters: a plain SET NULL on a NOT NULL column would break the app's
    deletes whatever a run does to orphans."""
    by_name = dict(zip(spec.columns, columns, strict=True))
    nulled = nulled_columns(spec, columns)
    if policy == "nullify" and spec.orphans == "nullify" and not nulled:
        return [
            f"orphans: nullify, but no column of {describe_columns(spec.columns, spec.table)} can be nulled (NOT "
            "NULL, or an action that names none): declare orphans: delete (archived, restorable) or refuse"
        ]
    not_null = [name for name in nulled if by_name[name].not_null]
    if policy != "nullify" and not (not_null and spec.on_delete == "SET NULL"):
        return []
    if not_null and spec.on_delete == "SET NULL":
        # The app's delete of a parent would fail on these: the key itself would break the app's deletes.
        fix = (
            f"; declare on_delete: SET NULL ({', '.join(n for n in spec.columns if not by_name[n].not_null)}) "
            "to null only those (PostgreSQL 15+)"
            if len(not_null) < len(spec.columns) and not spec.on_delete_columns
            else ""
        )
        return [
            f"{spec.table}.{', '.join(not_null)} {'is' if len(not_null) == 1 else 'are'} NOT NULL, so ON DELETE "
            f"{spec.on_delete_sql} could never apply{fix}"
        ]
    if not_null:
        where = f"ON DELETE {spec.on_delete_sql}" if spec.on_delete_columns else "nullify_columns"
        return [f"{where} names {', '.join(not_null)}, NOT NULL, which nulling an orphan cannot set to NULL"]
    nullable = [name for name in spec.columns if not by_name[name].not_null]
    declared = spec.on_delete == "SET NULL" or spec.on_delete_columns or spec.nullify_columns
    if not declared and len(nullable) > 1:
        return [
            f"the key's nullable columns {', '.join(nullable)} could each be nulled to release an orphan (one NULL "
            "is enough), and ON DELETE " + spec.on_delete + " does not say which: declare nullify_columns: "
            f"[{nullable[-1]}] (or the ones to null)"
        ]
    return []


def table_info(conn: psycopg.Connection, schema: str, table: str) -> TableInfo | None:
    row = conn.execute(statement("catalog", "table"), {"schema": schema, "table": table}).fetchone()
    return TableInfo(*row) if row else None


def column_info(conn: psycopg.Connection, relid: int, column: str) -> ColumnInfo | None:
    row = conn.execute(statement("catalog", "column"), {"relid": relid, "column": column}).fetchone()
    return ColumnInfo(*row) if row else None


def _attnums(columns: tuple[ColumnInfo, ...] | None) -> list[int]:
    assert columns is not None
    return [info.attnum for info in columns]


def constraint_state(conn: psycopg.Connection, spec: ForeignKeySpec, state: TargetState) -> ConstraintState:
    assert state.table and state.ref_table and state.complete
    row = conn.execute(
        statement("catalog", "constraint_by_name"), {"relid": state.table.oid, "name": spec.constraint}
    ).fetchone()
    if row is None:
        return ConstraintState(exists=False)
    _oid, contype, _conrelid, confrelid, conkey, confkey, deltype, validated, deferrable, definition, setcols = row
    mismatches: list[str] = []
    if contype != "f":
        mismatches.append(f"it is not a foreign key (contype {contype!r})")
    else:
        if confrelid != state.ref_table.oid:
            mismatches.append(f"it references another table, not {spec.ref_schema}.{spec.ref_table}")
        # The same pairs in another order are the same key.
        pairs = sorted(zip(_attnums(state.columns), _attnums(state.ref_columns), strict=True))
        if sorted(zip(conkey or [], confkey or [], strict=False)) != pairs or len(conkey or []) != len(pairs):
            mismatches.append(f"its columns are not ({', '.join(spec.columns)}) -> ({', '.join(spec.ref_columns)})")
        if deltype != spec.on_delete_code:
            mismatches.append(
                f"it is ON DELETE {ON_DELETE_ACTIONS.get(deltype, deltype)}, not ON DELETE {spec.on_delete_sql}"
            )
        else:
            by_attnum = {info.attnum: name for name, info in zip(spec.columns, state.columns or (), strict=True)}
            # A list of every key column is the action without a list.
            acts_on = sorted(by_attnum.get(attnum, str(attnum)) for attnum in setcols or [])
            acts_on = [] if acts_on == sorted(spec.columns) else acts_on
            declared = [] if sorted(spec.on_delete_columns) == sorted(spec.columns) else sorted(spec.on_delete_columns)
            if acts_on != declared:
                mismatches.append(
                    f"its ON DELETE acts on {', '.join(acts_on) or 'every key column'}, not on "
                    f"{', '.join(spec.on_delete_columns) or 'every key column'}"
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
    assert state.table and state.columns
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
    wanted = _attnums(state.columns)
    if has_exprs or list(indkey or []) != wanted or natts != len(wanted) or nkeyatts != len(wanted):
        in_order = ", in that order" if len(wanted) > 1 else ""
        mismatches.append(f"its columns are not exactly ({', '.join(spec.columns)}){in_order}")
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


ROLE_OF_LIST = {"columns": "column", "ref_columns": "referenced column", "row_key": "row key column"}
# Kinds of relation a key can live on: an ordinary table, or (referenced only, for now) a partitioned one.
TABLE_KINDS = {"r": "table", "p": "partitioned table"}
RELKIND_NAMES = {"v": "view", "m": "materialized view", "f": "foreign table", "S": "sequence", "i": "index"}


def inspect_target(conn: psycopg.Connection, spec: ForeignKeySpec) -> TargetState:
    """Everything the steps need to know about the target, and every way it differs from the spec or is a shape
    this version cannot converge (each named with what would make it work)."""
    state = TargetState()
    state.table = table_info(conn, spec.schema, spec.table)
    state.ref_table = state.table if spec.self_referential else table_info(conn, spec.ref_schema, spec.ref_table)
    state.problems.extend(_table_problems(spec, state))
    if state.problems:
        return state
    assert state.table is not None and state.ref_table is not None
    missing = []
    for attribute, table, where, names in (
        ("columns", state.table, (spec.schema, spec.table), spec.columns),
        ("ref_columns", state.ref_table, (spec.ref_schema, spec.ref_table), spec.ref_columns),
        ("row_key", state.table, (spec.schema, spec.table), spec.row_key),
    ):
        found = [column_info(conn, table.oid, name) for name in names]
        missing += [
            f"{ROLE_OF_LIST[attribute]} {'.'.join(where)}.{name} does not exist"
            for name, info in zip(names, found, strict=True)
            if info is None
        ]
        setattr(state, attribute, None if None in found else tuple(found))
    state.problems.extend(missing)
    if not state.complete:
        return state
    state.nulled = nulled_columns(spec, state.columns)  # type: ignore[arg-type]
    state.policy = orphan_policy(spec, state.columns)  # type: ignore[arg-type]
    state.problems.extend(_column_problems(conn, spec, state))
    state.problems.extend(nulling_problems(spec, state.columns, state.policy))  # type: ignore[arg-type]
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
    for role, where, info, kinds in (
        ("table", f"{spec.schema}.{spec.table}", state.table, ("r",)),
        ("referenced table", f"{spec.ref_schema}.{spec.ref_table}", state.ref_table, ("r", "p")),
    ):
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
    assert state.columns is not None and state.ref_columns is not None and state.row_key is not None
    problems = [
        f"type mismatch: {spec.table}.{name} is {info.type_name} but {spec.ref_table}.{ref_name} is "
        f"{ref_info.type_name}"
        for (name, ref_name), info, ref_info in zip(spec.pairs, state.columns, state.ref_columns, strict=True)
        if info.type_oid != ref_info.type_oid
    ]
    if spec.on_delete_columns and conn.info.server_version < 150000:
        problems.append(
            f"ON DELETE {spec.on_delete_sql} needs PostgreSQL 15 or newer (a column list for the action); this "
            f"server is {conn.info.server_version // 10000}"
        )
    if not _unique(conn, state.ref_table.oid, _attnums(state.ref_columns)):
        problems.append(
            f"{describe_columns(spec.ref_columns, spec.ref_table)} has no primary key or unique index that is not "
            "DEFERRABLE, so it cannot be referenced"
        )
    if not _unique(conn, state.table.oid, _attnums(state.row_key)) or not all(i.not_null for i in state.row_key):
        problems.append(
            f"row_key {describe_columns(spec.row_key, spec.table)} is not unique and NOT NULL (no primary key, or "
            "unique index and NOT NULL, on exactly those columns), so the audit could not tell its rows apart: "
            "declare as row_key the columns that are, such as the table's primary key"
        )
    return problems


def _unique(conn: psycopg.Connection, relid: int, attnums: list[int]) -> bool:
    return bool(
        conn.execute(statement("catalog", "unique_on_columns"), {"relid": relid, "attnums": attnums}).fetchone()[0]
    )


def as_written(conn: psycopg.Connection, *names: str | tuple[str, ...]) -> list[str]:
    """Each name (a tuple: a qualified one) as SQL would need it written, quoted only where needed, for a
    message that shows the statement to run."""
    parts = [part for name in names for part in ((name,) if isinstance(name, str) else name)]
    quoted = iter(conn.execute(statement("catalog", "quote_idents"), {"names": parts}).fetchone()[0] or [])
    return [".".join(next(quoted) for _ in ((name,) if isinstance(name, str) else name)) for name in names]


def same_columns_indexes(conn: psycopg.Connection, spec: ForeignKeySpec, state: TargetState) -> list[tuple[str, str]]:
    """Valid indexes of other names that already serve the key exactly: (name, definition)."""
    assert state.table is not None
    return conn.execute(
        statement("catalog", "same_columns_indexes"),
        {"relid": state.table.oid, "attnums": _attnums(state.columns), "name": spec.index},
    ).fetchall()


def other_foreign_keys(
    conn: psycopg.Connection, spec: ForeignKeySpec, state: TargetState
) -> list[tuple[str, str, bool]]:
    """Foreign keys of other names on the same columns: (name, definition, validated)."""
    assert state.table is not None
    return conn.execute(
        statement("catalog", "other_foreign_keys_on_columns"),
        {"relid": state.table.oid, "attnums": _attnums(state.columns), "name": spec.constraint},
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
