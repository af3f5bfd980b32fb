"""What the target database holds now, compared with the spec. Read-only catalog queries."""

from __future__ import annotations

from dataclasses import dataclass, replace

import psycopg

from fk_maintenance.db.sqlfiles import statement
from fk_maintenance.db.target_state import (
    ColumnInfo,
    ConstraintState,
    EqualKey,
    IndexState,
    PartitionInfo,
    TableInfo,
    TargetState,
)
from fk_maintenance.errors import ConcurrentRun, PreflightFailed
from fk_maintenance.keys.spec import (
    MATCH_TYPES,
    ON_DELETE_ACTIONS,
    ON_UPDATE_ACTIONS,
    ForeignKeySpec,
    describe_columns,
    fitting_identifier,
)


def nulled_columns(spec: ForeignKeySpec, columns: tuple[ColumnInfo, ...]) -> tuple[str, ...]:
    """What nulling an orphan sets to NULL: what the key's own ON DELETE would (the columns ``SET NULL (...)`` or
    ``SET DEFAULT (...)`` lists, every column for plain SET NULL), or the declared ``nullify_columns``, or else
    the key's one nullable column. One NULL is enough for MATCH SIMPLE to stop checking a row, and nulling more
    would change more of the row than the key needs (a nullable tenant_id is not ours to clear); with several
    nullable columns and no declaration, ``nulling_problems`` refuses the key. Under MATCH FULL only an all-NULL
    key passes: every column is nulled."""
    if spec.match == "FULL":
        return spec.columns
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
    nullable = [not info.not_null for info in columns]
    # MATCH FULL: nulling releases an orphan only when every column can be nulled.
    can_null = all(nullable) if spec.match == "FULL" else any(nullable)
    return spec.orphans or ("nullify" if can_null else "refuse")


def nulling_problems(spec: ForeignKeySpec, columns: tuple[ColumnInfo, ...], policy: str = "nullify") -> list[str]:
    """A column nulling sets to NULL (``nulled_columns``) that is NOT NULL, or the choice left open (several
    nullable columns, an action that nulls nothing, no declaration). Where the policy is not to null (delete,
    refuse), only the key's own action matters: a plain SET NULL on a NOT NULL column would break the app's
    deletes whatever a run does to orphans."""
    by_name = dict(zip(spec.columns, columns, strict=True))
    if spec.on_update == "SET NULL" and any(info.not_null for info in columns):
        # The app's update of a referenced key would fail on these: the key would break the app's updates.
        not_null = [name for name in spec.columns if by_name[name].not_null]
        return [f"{spec.table}.{', '.join(not_null)} NOT NULL, so ON UPDATE SET NULL could never apply"]
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
    if not_null and spec.match == "FULL":
        return [
            f"MATCH FULL releases an orphan only when every column of the key is NULL, and {', '.join(not_null)} "
            f"{'is' if len(not_null) == 1 else 'are'} NOT NULL: declare orphans: delete (archived, restorable) or "
            "refuse"
        ]
    if not_null:
        where = f"ON DELETE {spec.on_delete_sql}" if spec.on_delete_columns else "nullify_columns"
        return [f"{where} names {', '.join(not_null)}, NOT NULL, which nulling an orphan cannot set to NULL"]
    nullable = [name for name in spec.columns if not by_name[name].not_null]
    declared = spec.match == "FULL" or spec.on_delete == "SET NULL" or spec.on_delete_columns or spec.nullify_columns
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
    oid, validated, definition = row
    mismatches = definition_mismatches(spec, state, key_definitions(conn, [oid])[oid])
    return ConstraintState(
        exists=True,
        matches=not mismatches,
        validated=bool(validated),
        definition=definition,
        mismatches=tuple(mismatches),
    )


def index_state(conn: psycopg.Connection, spec: ForeignKeySpec, state: TargetState) -> IndexState:
    """The key's index: the one of its name, or, where the declaration names none and there is none of the default
    name, an index that already serves the key (a plain table's; a second index would only cost writes)."""
    assert state.table and state.columns
    if not spec.build_index:
        return IndexState(exists=False)  # no index is the key's: one of the name it would have is not looked at
    ours = index_on(conn, spec, (spec.schema, spec.index), (spec.schema, spec.table), state.table.oid, state)
    if ours.exists or spec.index_declared or state.partitioned:
        return ours
    serving = same_columns_indexes(conn, spec, state)
    if not serving:
        return ours
    name = serving[0][0]
    found = index_on(conn, spec, (spec.schema, name), (spec.schema, spec.table), state.table.oid, state)
    return replace(found, name=name)


def index_on(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    index: tuple[str, str],
    table: tuple[str, str],
    relid: int,
    state: TargetState,
) -> IndexState:
    """The index named ``index`` (schema, name), compared with the one the key needs on ``table`` (the child, or
    one of its partitions). Columns are compared by name: a partition's attnums may differ from its parent's."""
    assert state.columns
    rel = conn.execute(statement("catalog", "relation_by_name"), {"schema": index[0], "name": index[1]}).fetchone()
    if rel is None:
        return IndexState(exists=False)
    oid, relkind = rel
    if relkind not in ("i", "I"):
        return IndexState(
            exists=True,
            is_index=False,
            mismatches=(f"a relation of kind {relkind!r} (not an index) already has the name {index[1]}",),
        )
    (indrelid, amname, valid, _ready, unique, natts, nkeyatts, has_exprs, has_pred, definition, names) = conn.execute(
        statement("catalog", "index_by_oid"), {"oid": oid}
    ).fetchone()
    mismatches: list[str] = []
    if indrelid != relid:
        mismatches.append(f"it is an index on another table, not {'.'.join(table)}")
    if amname != "btree":
        mismatches.append(f"it uses {amname}, not btree")
    if unique and state.partitioned:
        # Each partition's index must equal the parent's to be attached, and ours are built plain.
        mismatches.append("it is UNIQUE")
    wanted = list(spec.columns)
    # An index that leads with the key's columns serves the key's lookups as well as one on those columns alone
    # (a second index would only cost writes), a primary key or unique one included. On a partitioned table each
    # partition's index must equal the parent's to be attached, and ours are built on the key's columns alone:
    # there, only those.
    serves = not has_exprs and list(names or [])[: len(wanted)] == wanted and nkeyatts >= len(wanted)
    exact = serves and natts == len(wanted) and nkeyatts == len(wanted)
    if not (exact or (serves and not state.partitioned)):
        in_order = ", in that order" if len(wanted) > 1 else ""
        lead = "" if state.partitioned else " nor does it lead with them"
        mismatches.append(f"its columns are not exactly ({', '.join(spec.columns)}){in_order}{lead}")
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
        on_target_table=indrelid == relid,
        build_in_progress_pid=building[0] if building else None,
    )


ROLE_OF_LIST = {"columns": "column", "ref_columns": "referenced column", "row_key": "row key column"}
# Kinds of relation a key can live on: an ordinary table or a partitioned one.
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
    state.partitions = read_partitions(conn, spec, state)
    if state.partitioned:
        state.problems.extend(_partition_problems(conn, spec, state))
    state.problems.extend(_column_problems(conn, spec, state))
    state.problems.extend(nulling_problems(spec, state.columns, state.policy))  # type: ignore[arg-type]
    state.constraint = constraint_state(conn, spec, state)
    if state.constraint.exists and not state.constraint.matches:
        state.problems.append(
            f"constraint {spec.constraint} already exists with another definition "
            f"({state.constraint.definition}): {'; '.join(state.constraint.mismatches)}"
        )
    state.equal_keys = tuple(equal_keys(conn, spec, state))
    state.problems.extend(_equal_key_problems(spec, state))
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


def equal_keys(conn: psycopg.Connection, spec: ForeignKeySpec, state: TargetState) -> list[EqualKey]:
    """Keys equal to the declared one under other names, on the table or a partition, each its own (not one a
    partition inherits), where the declared one is not yet: the run would add a second key beside each."""
    assert state.table is not None
    relids = [state.table.oid, *(part.oid for part in state.partitions)]
    rows = conn.execute(
        statement("catalog", "own_foreign_keys_of_other_names"), {"relids": relids, "name": spec.constraint}
    ).fetchall()
    definitions = key_definitions(conn, [oid for oid, *_ in rows])
    has_ours = {state.table.oid: state.constraint.exists} | {part.oid: part.key_exists for part in state.partitions}
    return [
        EqualKey(relid, schema, table, name)
        for oid, relid, schema, table, name in rows
        if not has_ours[relid] and not definition_mismatches(spec, state, definitions[oid])
    ]


def _equal_key_problems(spec: ForeignKeySpec, state: TargetState) -> list[str]:
    """The table's own key equal to the declared one under another name: the run would add a second key beside
    it, and every write would be checked twice. Its name is the app's (its schema tool compares it), so the run
    does not rename it: refused before any change, naming the fix. (A partition's is renamed by add_fk_not_valid,
    and then adopted by the parent's key: partitions' key names are no app schema's.)"""
    assert state.table is not None
    return [
        f"{key.described} already has the key as declared, under another name: {key.name}; this run would add "
        f"{spec.constraint} beside it, a second key checking every write again: declare constraint: {key.name} "
        "for this key to have the run use it (validated if NOT VALID), or drop it"
        for key in state.equal_keys
        if key.relid == state.table.oid
    ]


def _table_problems(spec: ForeignKeySpec, state: TargetState) -> list[str]:
    problems = []
    for role, where, info in (
        ("table", f"{spec.schema}.{spec.table}", state.table),
        ("referenced table", f"{spec.ref_schema}.{spec.ref_table}", state.ref_table),
    ):
        if info is None:
            problems.append(f"{role} {where} does not exist")
        elif info.relkind not in TABLE_KINDS:
            kind = RELKIND_NAMES.get(info.relkind, f"relkind {info.relkind!r}")
            problems.append(f"{role} {where} is a {kind}, not a table")
    return problems


def read_partitions(conn: psycopg.Connection, spec: ForeignKeySpec, state: TargetState) -> tuple[PartitionInfo, ...]:
    """The partitions of a partitioned child with our index's and key's state on each (empty for a table)."""
    if not state.partitioned:
        return ()
    assert state.table is not None
    index = conn.execute(
        statement("catalog", "relation_by_name"), {"schema": spec.schema, "name": spec.index}
    ).fetchone()
    rows = conn.execute(
        statement("catalog", "partitions"),
        {"relid": state.table.oid, "index_oid": index[0] if index else 0, "constraint": spec.constraint},
    ).fetchall()
    definitions = key_definitions(conn, [row[13] for row in rows if row[13] is not None])
    return tuple(
        PartitionInfo(
            *row,
            key_mismatches=tuple(definition_mismatches(spec, state, definitions[row[13]])) if row[13] else (),
        )
        for row in rows
    )


@dataclass(frozen=True)
class KeyDefinition:
    """A constraint as the catalog holds it, a foreign key's columns by name."""

    contype: str
    ref_oid: int
    on_delete: str
    on_update: str
    match: str
    deferrable: bool
    deferred: bool
    columns: tuple[str, ...]
    ref_columns: tuple[str, ...]
    set_columns: tuple[str, ...]


def key_definitions(conn: psycopg.Connection, oids: list[int]) -> dict[int, KeyDefinition]:
    if not oids:
        return {}
    rows = conn.execute(statement("catalog", "key_definitions"), {"oids": oids}).fetchall()
    return {
        oid: KeyDefinition(contype, ref_oid, on_delete, on_update, match, deferrable, deferred, *map(_names, lists))
        for oid, contype, ref_oid, on_delete, on_update, match, deferrable, deferred, *lists in rows
    }


def _names(names: list[str] | None) -> tuple[str, ...]:
    return tuple(names or ())


def definition_mismatches(spec: ForeignKeySpec, state: TargetState, found: KeyDefinition) -> list[str]:
    """Every way a constraint of our name differs from the key the spec declares (empty: it is the key). Each
    part counts: PostgreSQL adopts a partition's key into the parent's only when all of them are equal, and
    otherwise adds a second key beside it."""
    assert state.ref_table is not None
    if found.contype != "f":
        return [f"it is not a foreign key (contype {found.contype!r})"]
    mismatches = []
    if found.ref_oid != state.ref_table.oid:
        mismatches.append(f"it references another table, not {spec.ref_schema}.{spec.ref_table}")
    # The same pairs in another order are the same key.
    if sorted(zip(found.columns, found.ref_columns, strict=False)) != sorted(spec.pairs) or len(found.columns) != len(
        spec.columns
    ):
        mismatches.append(f"its columns are not ({', '.join(spec.columns)}) -> ({', '.join(spec.ref_columns)})")
    if found.on_delete != spec.on_delete_code:
        action = ON_DELETE_ACTIONS.get(found.on_delete, found.on_delete)
        mismatches.append(f"it is ON DELETE {action}, not ON DELETE {spec.on_delete_sql}")
    else:
        # A list of every key column is the action without a list.
        acts_on = [] if sorted(found.set_columns) == sorted(spec.columns) else sorted(found.set_columns)
        declared = [] if sorted(spec.on_delete_columns) == sorted(spec.columns) else sorted(spec.on_delete_columns)
        if acts_on != declared:
            mismatches.append(
                f"its ON DELETE acts on {', '.join(acts_on) or 'every key column'}, not on "
                f"{', '.join(declared) or 'every key column'}"
            )
    if found.on_update != spec.on_update_code:
        action = ON_UPDATE_ACTIONS.get(found.on_update, found.on_update)
        mismatches.append(f"it is ON UPDATE {action}, not ON UPDATE {spec.on_update}")
    if found.match != spec.match_code:
        mismatches.append(f"it is MATCH {MATCH_TYPES.get(found.match, found.match)}, not MATCH {spec.match}")
    if (found.deferrable, found.deferred) != (spec.deferrable, spec.initially_deferred):
        deferrability = "NOT DEFERRABLE"
        if found.deferrable:
            deferrability = "DEFERRABLE INITIALLY " + ("DEFERRED" if found.deferred else "IMMEDIATE")
        mismatches.append(f"it is {deferrability}, not {spec.deferrability_sql}")
    return mismatches


def partition_index_name(spec: ForeignKeySpec, partition: str) -> str:
    """Our index on one partition: the partition's name and the key's index name, within PostgreSQL's 63 bytes
    (a name cut short ends in a hash of the whole, so two long partition names never collide)."""
    return fitting_identifier(f"{partition}_{spec.index}")


def still_partition(conn: psycopg.Connection, state: TargetState, part: PartitionInfo) -> bool:
    """Whether ``part``, listed earlier, is still a partition of the table: a loop over a list read once checks
    this before changing a partition, rather than reading every partition's state again."""
    assert state.table is not None
    return bool(
        conn.execute(
            statement("catalog", "is_partition"), {"relid": state.table.oid, "partition": part.oid}
        ).fetchone()[0]
    )


def _partition_problems(conn: psycopg.Connection, spec: ForeignKeySpec, state: TargetState) -> list[str]:
    """Partitions this version cannot give the key, what stands in the way on one (an index of the name ours
    would take, a key of our name that is not ours: a parent's ADD would not adopt it but add a second key beside
    it), and what the run may not do there (own it, create in its schema), before anything changes."""
    assert state.table is not None and state.ref_table is not None
    problems = []
    for part in state.partitions:
        if part.owner != state.table.owner:
            # Building an index or adding a key on a partition needs its ownership, like the parent's.
            partition, owner = as_written(conn, part.qualified, state.table.owner)
            problems.append(
                f"partition {part.described} is owned by {part.owner}, not by {state.table.owner} like "
                f"{spec.schema}.{spec.table}: the run builds the index and the key on each partition as the "
                f"parent's owner; ALTER TABLE {partition} OWNER TO {owner}"
            )
        if not part.can_create_in_schema and part.schema != spec.schema:
            schema, who = as_written(conn, part.schema, conn.info.user)
            problems.append(
                f"role {who} lacks CREATE on schema {schema}, where partition {part.described} is (CREATE INDEX "
                f"on it needs it): GRANT CREATE ON SCHEMA {schema} TO {who}"
            )
        if part.attached_index is None and part.relkind == "r":
            name = partition_index_name(spec, part.name)
            ours = index_on(conn, spec, (part.schema, name), part.qualified, part.oid, state)
            if ours.exists and (ours.valid or not ours.on_target_table) and not ours.matches:
                problems.append(
                    f"index {part.schema}.{name}, the name this run gives partition {part.described}'s index, already "
                    f"exists with another definition ({ours.definition or 'not an index'}: "
                    f"{'; '.join(ours.mismatches)}); rename or drop it"
                )
        if part.relkind == "p":
            problems.append(
                f"{part.described} is itself partitioned: this version builds the key on one level of partitions "
                "only; declare the key on that sub-partitioned table (and its partitions) separately"
            )
        elif part.relkind == "f":
            problems.append(
                f"{part.described} is a foreign table: it cannot have an index or a foreign key, so the parent "
                f"cannot have them either; detach it from {spec.schema}.{spec.table} or leave this key undeclared"
            )
        elif part.key_mismatches:
            problems.append(
                f"constraint {spec.constraint} already exists on partition {part.described} with another definition "
                f"({'; '.join(part.key_mismatches)}): PostgreSQL would not adopt it into the parent's key but add a "
                "second one beside it; drop or rename it"
            )
        elif part.attached_index and not part.index_valid:
            (index,) = as_written(conn, (part.schema, part.attached_index))
            problems.append(
                f"the index {part.attached_index} of partition {part.described}, attached to {spec.index}, is "
                f"INVALID (not a build of this run's, which attaches only valid ones): REINDEX INDEX CONCURRENTLY "
                f"{index}"
            )
    if not state.partitions:
        problems.append(
            f"{spec.schema}.{spec.table} is a partitioned table without partitions: there is nothing to build the "
            "key's index on yet; create its partitions first"
        )
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
    """Valid indexes of other names that already serve the key (lead with its columns): (name, definition)."""
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
