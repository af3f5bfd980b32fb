"""orphans: delete. What deleting an orphan takes along (its blast radius), found from the catalog's existing
foreign keys, and the delete itself: batched, every row and pointer it removes or changes archived whole in the
same transaction, before it, and checked against what the server counted it did.

The walk is one model for every shape: starting from the orphan rows, each foreign key that references a table
whose rows are deleted is followed. ON DELETE CASCADE deletes the referencing rows (and the walk goes on from
them, whatever the table, schema or depth; a row met twice, through a self-reference or a cycle, is taken once),
SET NULL / SET DEFAULT change the referencing rows' columns (the walk stops there), RESTRICT / NO ACTION forbid
the delete of a row that any row outside the deleted set still references. The rows travel between the walk's
statements as jsonb text (``to_jsonb`` of the whole row, read back typed with ``jsonb_populate_record``), so a
key of any type joins as the key itself does and no value is reshaped on its way to the archive.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql

from fk_maintenance.db import keysql
from fk_maintenance.db.catalog import as_written
from fk_maintenance.db.session import set_local_timeouts
from fk_maintenance.db.sqlfiles import batch_params, statement
from fk_maintenance.db.target_state import TargetState
from fk_maintenance.errors import DeleteRefused, PreflightFailed
from fk_maintenance.keys.settings import RunSettings
from fk_maintenance.keys.spec import ON_DELETE_ACTIONS, ForeignKeySpec
from fk_maintenance.records.privileges import lock_down_table
from fk_maintenance.records.restorable import (
    Touched,
    blocker_problems,
    inheritance_problems,
    row_security_problems,
)

log = logging.getLogger(__name__)

DELETES = "c"  # ON DELETE CASCADE
CHANGES = {"n": "nulled", "d": "reset"}  # ON DELETE SET NULL / SET DEFAULT, and the archive's word for each
FORBIDS = ("r", "a")  # RESTRICT, NO ACTION
# Rows named in a refusal or a dry run's sample.
SAMPLE_SIZE = 10
# The archive DDL touches only the pipeline's own schema (see audit.AUDIT_DDL_LOCK_TIMEOUT_MS).
ARCHIVE_DDL_LOCK_TIMEOUT_MS = 5000
ARCHIVE_DDL_STATEMENT_TIMEOUT_MS = 30_000
ARCHIVE_INDEX_TIMEOUT_MS = 2 * 60 * 60 * 1000
# A lock the app holds on a row the cascade reaches, or a deadlock with the app's own delete: the batch rolls
# back and its orphans are tried one by one, so one busy orphan does not hold back the others.
BUSY_ERRORS = (pgerrors.LockNotAvailable, pgerrors.DeadlockDetected)


@dataclass(frozen=True)
class Rel:
    """A table the walk reaches, and the columns that tell its rows apart in the archive (None: it has none),
    with their types (format_type), which read a row key back typed on its own."""

    schema: str
    name: str
    oid: int
    row_key: tuple[str, ...] | None
    key_types: tuple[str, ...] = ()

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)


@dataclass(frozen=True)
class Edge:
    """One existing foreign key ``child(columns) -> parent(ref_columns)`` and what deleting a parent row does."""

    name: str
    action: str  # pg_constraint.confdeltype
    parent: Rel
    child: Rel
    columns: tuple[str, ...]
    ref_columns: tuple[str, ...]
    acts_on: tuple[str, ...]  # the columns SET NULL / SET DEFAULT changes: its column list, else every one
    # The declared key itself, before its constraint exists: PostgreSQL does not act on it yet, so the delete
    # does what it will do (deletes, nulls, resets the rows it reaches) itself, in the same transaction.
    declared: bool = False
    # A key that references one partition of the parent (not the parent or an ancestor): the partitions whose
    # rows it acts on; None for the whole table.
    ref_partitions: frozenset[int] | None = None

    def acts_for(self, parents: list[Found]) -> list[Found]:
        """The deleted rows this key acts on: all of them, or those in the partition it references."""
        if self.ref_partitions is None:
            return parents
        return [found for found in parents if found.relid in self.ref_partitions]

    def describe(self) -> str:
        return (
            f"{self.name} ({self.child.qualified} ({', '.join(self.columns)}) -> {self.parent.qualified}, ON DELETE "
            f"{ON_DELETE_ACTIONS.get(self.action, self.action)}{', declared, not added yet' if self.declared else ''})"
        )


@dataclass
class Graph:
    """Every foreign key a delete of the key's rows can set off, from the catalog; ``problems`` names each table
    the archive could not tell rows apart in."""

    root: Rel
    edges: dict[str, list[Edge]] = field(default_factory=dict)  # by the parent's qualified name
    problems: list[str] = field(default_factory=list)

    def from_rel(self, rel: Rel) -> list[Edge]:
        return self.edges.get(rel.qualified, [])

    @property
    def rels(self) -> list[Rel]:
        """Every table whose rows the delete removes or changes (each needs its rows locked and archived)."""
        reached = {self.root.qualified: self.root}
        for edges in self.edges.values():
            for edge in edges:
                if edge.action not in FORBIDS:
                    reached.setdefault(edge.child.qualified, edge.child)
        return list(reached.values())

    @property
    def guards(self) -> list[Rel]:
        """Tables only read: those whose RESTRICT / NO ACTION keys would forbid a delete, and nothing else."""
        changed = {rel.qualified for rel in self.rels}
        found = {
            edge.child.qualified: edge.child
            for edges in self.edges.values()
            for edge in edges
            if edge.action in FORBIDS and edge.child.qualified not in changed
        }
        return list(found.values())


def build_graph(conn: psycopg.Connection, spec: ForeignKeySpec, state: TargetState) -> Graph:
    """The foreign keys reachable from the key's table through CASCADE keys, read from pg_constraint."""
    assert state.table is not None
    root = Rel(spec.schema, spec.table, state.table.oid, spec.row_key, state.row_key_types)
    graph = Graph(root)
    known = {root.qualified: root}
    # A table is expanded (its own referencing keys read) once a CASCADE key reaches it, whichever key saw it
    # first: one first met through a SET NULL key may be deleted from through another path.
    expanded = {root.qualified}
    todo = [root]
    while todo:
        parent = todo.pop(0)
        edges = []
        for edge in _referencing_edges(conn, spec, state, parent, known):
            edges.append(edge)
            child = edge.child
            if edge.action in FORBIDS:
                continue
            if child.row_key is None and child.qualified not in known:
                graph.problems.append(
                    f"{child.qualified} has no primary key or unique index on NOT NULL columns, and a delete of "
                    f"orphans of {spec.schema}.{spec.table} reaches it through {edge.describe()}: the archive could "
                    "not tell its rows apart. Give it a primary key, or declare another orphans policy"
                )
            if edge.action in CHANGES and child.row_key and set(edge.acts_on) & set(child.row_key):
                graph.problems.append(
                    f"{edge.describe()} changes {', '.join(sorted(set(edge.acts_on) & set(child.row_key)))}, part of "
                    f"{child.qualified}'s row key: a row it changes could not be found again to put its value back "
                    "(and a partition key changed moves the row to another partition). Declare another orphans "
                    "policy for this key, or change that key's action"
                )
            known[child.qualified] = child
            if edge.action == DELETES and child.qualified not in expanded:
                expanded.add(child.qualified)
                todo.append(child)
        graph.edges[parent.qualified] = edges
    return graph


def _referencing_edges(
    conn: psycopg.Connection, spec: ForeignKeySpec, state: TargetState, parent: Rel, known: dict[str, Rel]
) -> list[Edge]:
    """Every key that references ``parent`` (the catalog's, and the declared one before it is added)."""
    keys = [(*row, False) for row in conn.execute(statement("cascade", "referencing_keys"), {"relid": parent.oid})]
    # Added means on the table or, before PostgreSQL 18, on its partitions (PostgreSQL acts through those).
    if (parent.schema, parent.name) == (spec.ref_schema, spec.ref_table) and not state.key_added:
        # The key this run adds, as it will act once added: deleting an orphan of a self-referencing key
        # must null its children (SET NULL), not leave them orphans for a later pass to delete.
        acts_on = spec.on_delete_columns or spec.columns
        table = known[f"{spec.schema}.{spec.table}"]
        declared = (spec.constraint, spec.on_delete_code, spec.schema, spec.table, table.oid, "r")
        keys.append((*declared, spec.columns, spec.ref_columns, acts_on, None, True))
    edges = []
    for name, action, schema, table, oid, _kind, columns, ref_columns, set_columns, partitions, declared in keys:
        child = known.get(f"{schema}.{table}")
        if child is None:
            found = conn.execute(statement("cascade", "row_key_of"), {"relid": oid}).fetchone()
            child = Rel(schema, table, oid, tuple(found[0]) if found else None, tuple(found[1]) if found else ())
        edges.append(
            Edge(
                name,
                action,
                parent,
                child,
                tuple(columns),
                tuple(ref_columns),
                tuple(set_columns or columns),
                declared,
                None if partitions is None else frozenset(partitions),
            )
        )
    return edges


def graph_problems(conn: psycopg.Connection, spec: ForeignKeySpec, graph: Graph, *, writes: bool) -> list[str]:
    """The graph's own problems and every privilege the walk and the delete need that the role lacks."""
    problems = list(graph.problems)
    guards = graph.guards
    for rel in graph.rels + guards:
        can_use, can_select, can_lock, can_delete = conn.execute(
            statement("cascade", "rel_privileges"), {"relid": rel.oid}
        ).fetchone()
        who, table, schema = as_written(conn, conn.info.user, (rel.schema, rel.name), rel.schema)
        needed = [(can_use, f"USAGE on schema {schema}", f"GRANT USAGE ON SCHEMA {schema} TO {who}")]
        why = "to find the rows its keys protect" if rel in guards else "to archive its rows"
        needed.append((can_select, f"SELECT on {table} ({why})", f"GRANT SELECT ON {table} TO {who}"))
        if writes and rel not in guards:
            needed.append(
                (
                    can_lock,
                    f"UPDATE on {table} (SELECT ... FOR UPDATE locks the rows the delete reaches, so the archive is "
                    "exactly what it removes)",
                    f"GRANT UPDATE ON {table} TO {who}",
                )
            )
            if rel is graph.root:
                needed.append((can_delete, f"DELETE on {table} (orphans: delete)", f"GRANT DELETE ON {table} TO {who}"))
        problems += [f"role {who} lacks {what}: {grant}" for ok, what, grant in needed if not ok]
    problems += _deferrable_unique_problems(conn, graph)
    return problems + restore_problems(conn, spec, graph) + (_archive_problems(conn, spec) if writes else [])


def _deferrable_unique_problems(conn: psycopg.Connection, graph: Graph) -> list[str]:
    """A table the delete removes rows from whose unique, primary-key or exclusion constraint is DEFERRABLE:
    restore puts a row back with ON CONFLICT DO NOTHING, which cannot take such a constraint as its arbiter
    (SQLSTATE 55000), so none of its rows could come back."""
    deleted_from = [graph.root] + [
        edge.child for edges in graph.edges.values() for edge in edges if edge.action == DELETES
    ]
    problems = []
    for rel in {rel.qualified: rel for rel in deleted_from}.values():
        names = [name for (name,) in conn.execute(statement("cascade", "deferrable_unique"), {"relid": rel.oid})]
        if names:
            problems.append(
                f"{rel.qualified} has DEFERRABLE unique or exclusion constraint(s) {', '.join(names)}: a restore "
                "could not put its deleted rows back (ON CONFLICT takes no deferrable constraint as arbiter). "
                "Declare another orphans policy for this key, or make them NOT DEFERRABLE"
            )
    return problems


def touched_tables(graph: Graph) -> list[Touched]:
    """Every table the delete removes rows from or changes pointers in, as a restore will write to it."""
    tables = [Touched(graph.root.oid, graph.root.qualified, True)]
    for edges in graph.edges.values():
        for edge in edges:
            if edge.action == DELETES:
                tables.append(Touched(edge.child.oid, edge.child.qualified, True))
            elif edge.action in CHANGES:
                tables.append(Touched(edge.child.oid, edge.child.qualified, False, edge.acts_on))
    return tables


def restore_problems(conn: psycopg.Connection, spec: ForeignKeySpec, graph: Graph) -> list[str]:
    """Shapes a delete could not be undone exactly in (restorable): triggers or rules a restore's writes fire,
    inheritance children whose rows would come back in their parent, row-level security that hides rows from
    the walk."""
    who = as_written(conn, conn.info.user)[0]
    key = f"the key {spec.constraint}"
    read = [(rel.oid, rel.qualified) for rel in graph.rels + graph.guards]
    touched = touched_tables(graph)
    return (
        blocker_problems(conn, touched, key=key)
        + inheritance_problems(conn, touched, key=key)
        + row_security_problems(conn, read, who, key=key)
    )


def _archive_problems(conn: psycopg.Connection, spec: ForeignKeySpec) -> list[str]:
    """The archive is created by the first delete (CREATE on the pipeline's schema) and written by every batch
    (INSERT, and SELECT for the reports and restore); the schema itself is audit.audit_problems' to check."""
    who, schema, archive = as_written(conn, conn.info.user, spec.audit_schema, (spec.audit_schema, spec.archive_table))
    table = conn.execute(
        statement("catalog", "table"), {"schema": spec.audit_schema, "table": spec.archive_table}
    ).fetchone()
    if table is None:
        exists, _create_db, can_create, _use = conn.execute(
            statement("catalog", "schema_privileges"), {"schema": spec.audit_schema}
        ).fetchone()
        if exists and not can_create:
            return [
                f"role {who} lacks CREATE on schema {schema}, needed to create the archive {archive} there: "
                f"GRANT CREATE ON SCHEMA {schema} TO {who}"
            ]
        return []
    can_select, can_insert, _update = conn.execute(
        statement("catalog", "audit_privileges"), {"relid": table[0]}
    ).fetchone()
    problems = []
    if not (can_select and can_insert):
        problems.append(f"role {who} lacks SELECT, INSERT on {archive}: GRANT SELECT, INSERT ON {archive} TO {who}")
    has_columns, has_index, owns = archive_shape(conn, spec)
    if not (has_columns and has_index) and not owns:
        problems.append(
            f"the archive {archive} is an earlier version's, without the columns and index that make a restore "
            f"exact, and role {who} does not own it to add them (the first delete does that as its owner): have "
            f"its owner run a delete once, or ALTER TABLE {archive} OWNER TO {who}"
        )
    return problems


def archive_shape(conn: psycopg.Connection, spec: ForeignKeySpec) -> tuple[bool, bool, bool]:
    """(has the exact-restore columns, has the index on each row's records, the role owns it)."""
    return conn.execute(
        statement("cascade", "archive_shape"), {"schema": spec.audit_schema, "table": spec.archive_table}
    ).fetchone()


@dataclass
class Found:
    """One row the walk reached: where, what the delete does to it, and the row itself (jsonb text, and its own
    text, exact), with the version's xmin and, for a SET NULL pointer, the md5 of the row as the key leaves it."""

    depth: int
    rel: Rel
    relid: int
    row_key: str
    row_data: str
    action: str  # deleted, nulled, reset
    via: str  # the foreign key that reached it ("" for the orphan itself)
    columns: tuple[str, ...] = ()
    # Reached through the declared key before it exists: the delete acts on it itself (Edge.declared).
    by_us: bool = False
    row_text: str | None = None
    xmin: int | None = None
    written: str | None = None


@dataclass
class Reached:
    """What deleting one batch of orphans does: rows deleted (by table, then row key), pointers changed, and
    rows that a RESTRICT / NO ACTION key protects."""

    deleted: dict[str, dict[str, Found]] = field(default_factory=lambda: defaultdict(dict))
    changed: list[Found] = field(default_factory=list)
    protected: list[tuple[Edge, str]] = field(default_factory=list)
    # Per partition, the deleted rows a SET NULL / SET DEFAULT key also reaches: PostgreSQL may update such a row
    # before its own delete comes (the order of the referential actions is its own), never more often.
    may_update: dict[int, int] = field(default_factory=lambda: defaultdict(int))

    @property
    def roots(self) -> list[Found]:
        return [found for rows in self.deleted.values() for found in rows.values() if found.depth == 0]

    def rows(self) -> list[Found]:
        ordered = sorted((f for rows in self.deleted.values() for f in rows.values()), key=lambda f: f.depth)
        return ordered + self.changed


@cache
def _edge_statement(edge: Edge, locked: bool) -> sql.Composed:
    assert edge.child.row_key is not None or edge.action in FORBIDS
    key = edge.child.row_key or edge.columns
    written = sql.SQL("NULL::text")
    if edge.action == "n":
        # The row as SET NULL leaves it: every other value as now, the key's columns NULL.
        nulls = sql.Literal(json.dumps(dict.fromkeys(edge.acts_on)))
        written = sql.SQL("md5(jsonb_populate_record(c, {}::jsonb)::text)").format(nulls)
    return statement(
        "cascade",
        "reached_rows",
        parent=edge.parent.ident,
        child=edge.child.ident,
        c_key_json=keysql.json_object("c", key),
        c_references_p=keysql.equal("c", edge.columns, "p", edge.ref_columns),
        c_row_key=keysql.names(key, "c"),
        written=written,
        lock=sql.SQL("FOR UPDATE OF c" if locked else ""),
    )


def _root_statement(spec: ForeignKeySpec, state: TargetState, locked: bool) -> sql.Composed:
    return statement(
        "cascade",
        "orphan_rows",
        spec,
        state,
        root_key_json=keysql.json_object("c", spec.row_key),
        # The orphans the app holds right now are left for a later batch; the rows below them are waited for,
        # under the batch's lock_timeout, and a busy one sends its orphan to a batch of its own.
        lock=sql.SQL("FOR UPDATE OF c SKIP LOCKED" if locked else ""),
    )


def _jsonb_array(texts: list[str]) -> str:
    return "[" + ",".join(texts) + "]"


def walk(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    state: TargetState,
    graph: Graph,
    keys: list[tuple[Any, ...]],
    *,
    locked: bool,
) -> Reached:
    """The blast radius of deleting the orphans among ``keys``; ``locked``: every row deleted or changed is locked
    (FOR UPDATE, each table's rows in row key order), so nothing changes between the archive and the delete."""
    reached = Reached()
    root = graph.root
    for row_key, row_data, relid, text, xmin in conn.execute(
        _root_statement(spec, state, locked), batch_params(spec, keys)
    ):
        reached.deleted[root.qualified][row_key] = Found(
            0, root, relid, row_key, row_data, "deleted", "", row_text=text, xmin=xmin
        )
    _take_cascades(conn, graph, reached, root, locked)
    _take_side_effects(conn, graph, reached, locked)
    return reached


def _take_cascades(conn: psycopg.Connection, graph: Graph, reached: Reached, root: Rel, locked: bool) -> None:
    """Level by level down the CASCADE keys from the orphans: a row already taken (a self-reference, a cycle) is
    not taken again."""
    frontier = {root.qualified: list(reached.deleted[root.qualified].values())}
    depth = 0
    while any(frontier.values()):
        depth += 1
        following: dict[str, list[Found]] = defaultdict(list)
        for parent_name in sorted(frontier):
            parents = frontier[parent_name]
            if not parents:
                continue
            for edge in graph.from_rel(parents[0].rel):
                if edge.action != DELETES:
                    continue
                for row_key, row_data, relid, _parent, text, xmin, _written in _reach(
                    conn, edge, edge.acts_for(parents), locked
                ):
                    taken = reached.deleted[edge.child.qualified]
                    if row_key not in taken:
                        taken[row_key] = Found(
                            depth,
                            edge.child,
                            relid,
                            row_key,
                            row_data,
                            "deleted",
                            edge.name,
                            by_us=edge.declared,
                            row_text=text,
                            xmin=xmin,
                        )
                        following[edge.child.qualified].append(taken[row_key])
        frontier = following


def _take_side_effects(conn: psycopg.Connection, graph: Graph, reached: Reached, locked: bool) -> None:
    """What the deleted rows' SET NULL / SET DEFAULT keys change, and what RESTRICT / NO ACTION keys forbid, on
    rows that are not themselves deleted."""
    for parent_name in sorted(reached.deleted):
        parents = list(reached.deleted[parent_name].values())
        if not parents:
            continue
        for edge in graph.from_rel(parents[0].rel):
            if edge.action == DELETES:
                continue
            forbids = edge.action in FORBIDS
            acted_on = edge.acts_for(parents)
            for row_key, row_data, relid, parent, text, xmin, written in _reach(
                conn, edge, acted_on, locked and not forbids
            ):
                if row_key in reached.deleted.get(edge.child.qualified, {}):
                    if not forbids:
                        reached.may_update[relid] += 1
                    continue
                if forbids:
                    reached.protected.append((edge, row_key))
                    continue
                reached.changed.append(
                    Found(
                        acted_on[parent - 1].depth + 1,  # one below the deleted row it pointed at
                        edge.child,
                        relid,
                        row_key,
                        row_data,
                        CHANGES[edge.action],
                        edge.name,
                        edge.acts_on,
                        by_us=edge.declared,
                        row_text=text,
                        xmin=xmin,
                        written=written,
                    )
                )


def _reach(conn: psycopg.Connection, edge: Edge, parents: list[Found], locked: bool) -> list[tuple[Any, ...]]:
    """The rows ``edge`` ties to ``parents``: (row key, row, partition, which parent counted from 1, the row's
    text, its xmin, the md5 of the row as a SET NULL key leaves it)."""
    if not parents:
        return []
    return conn.execute(
        _edge_statement(edge, locked), {"parents": _jsonb_array([p.row_data for p in parents])}
    ).fetchall()


@dataclass
class BlastRadius:
    """Totals over every batch of a walk, for detect_orphans, a dry run, the plan and approval."""

    orphans: int = 0
    per_table: dict[str, dict[str, int]] = field(default_factory=dict)
    sample: list[str] = field(default_factory=list)
    protected: int = 0
    protected_sample: list[str] = field(default_factory=list)
    protecting_keys: dict[str, int] = field(default_factory=dict)

    def add(self, reached: Reached) -> None:
        self.orphans += len(reached.roots)
        for found in reached.rows():
            counts = self.per_table.setdefault(found.rel.qualified, {"deleted": 0, "nulled": 0, "reset": 0})
            counts[found.action] += 1
            if len(self.sample) < SAMPLE_SIZE:
                via = f" via {found.via}" if found.via else " (orphan)"
                self.sample.append(f"{found.rel.qualified} {found.row_key}: {found.action}{via}, depth {found.depth}")
        for edge, row_key in reached.protected:
            self.protected += 1
            self.protecting_keys[edge.describe()] = self.protecting_keys.get(edge.describe(), 0) + 1
            if len(self.protected_sample) < SAMPLE_SIZE:
                self.protected_sample.append(f"{edge.child.qualified} {row_key} (through {edge.name})")

    @property
    def rows(self) -> int:
        return sum(sum(counts.values()) for counts in self.per_table.values())

    def summary(self) -> dict[str, Any]:
        return {
            "blast_radius_rows": self.rows,
            "blast_radius": self.per_table,
            "blast_radius_sample": self.sample,
            "protected_rows": self.protected,
            "protected_sample": self.protected_sample,
            "protecting_keys": self.protecting_keys,
        }

    def refusal(self, spec: ForeignKeySpec) -> str:
        keys = "; ".join(f"{key}: {count} row(s)" for key, count in self.protecting_keys.items())
        return (
            f"orphans: delete would delete {spec.schema}.{spec.table} orphans (or rows their CASCADE keys take along) "
            f"that {self.protected} row(s) still reference through RESTRICT / NO ACTION keys, which forbid it: {keys}. "
            f"Rows: {', '.join(self.protected_sample)}. Re-point or delete those rows in the app (or change those "
            "keys' action), then run again; nothing was changed"
        )


def blast_radius(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    state: TargetState,
    graph: Graph,
    keys: psycopg.Cursor[Any],
    batch_size: int,
) -> BlastRadius:
    """Walk every orphan the held cursor ``keys`` gives, a batch at a time, reading only. A row two batches both
    reach is counted in each (rows shared by the trees of two orphans are rare; the delete archives each once)."""
    radius = BlastRadius()
    while batch := keys.fetchmany(batch_size):
        radius.add(walk(conn, spec, state, graph, batch, locked=False))
    return radius


# --- the delete -----------------------------------------------------------------------------------------------


def ensure_archive_table(conn: psycopg.Connection, spec: ForeignKeySpec) -> None:
    """The key's archive in the pipeline's schema, created if missing (ensure_audit_table made the schema); an
    earlier version's archive gains the columns and the index on each row's records that make a restore exact
    (its own rows restore as before)."""
    with conn.transaction():
        set_local_timeouts(
            conn, lock_timeout_ms=ARCHIVE_DDL_LOCK_TIMEOUT_MS, statement_timeout_ms=ARCHIVE_DDL_STATEMENT_TIMEOUT_MS
        )
        exists = conn.execute(
            statement("catalog", "table"), {"schema": spec.audit_schema, "table": spec.archive_table}
        ).fetchone()
        if exists is None:
            conn.execute(statement("cascade", "create_archive", archive=_archive(spec)))
            conn.execute(statement("cascade", "comment_archive", archive=_archive(spec)))
            lock_down_table(conn, spec.audit_schema, spec.archive_table)  # only the pipeline writes its record
        has_columns, has_index, _owns = archive_shape(conn, spec)
        if not has_columns:
            conn.execute(statement("cascade", "upgrade_archive", archive=_archive(spec)))
    if not has_index:
        with conn.transaction():
            # An earlier version's archive may be large: its index is built under a scan's timeout (only the
            # pipeline writes the archive, and waits on it for lock_timeout at most).
            set_local_timeouts(
                conn, lock_timeout_ms=ARCHIVE_DDL_LOCK_TIMEOUT_MS, statement_timeout_ms=ARCHIVE_INDEX_TIMEOUT_MS
            )
            conn.execute(statement("cascade", "index_archive", archive=_archive(spec)))


def _archive(spec: ForeignKeySpec) -> sql.Identifier:
    return sql.Identifier(spec.audit_schema, spec.archive_table)


@dataclass
class DeleteCounts:
    orphans: int = 0
    rows: int = 0  # every row deleted, the orphans included
    changed: int = 0  # pointers nulled or reset
    busy: int = 0  # orphans skipped: the app held them or a row below them
    ref_rows: int = 0  # rows of the key's referenced table deleted (their children may be orphans now)

    def add(self, other: DeleteCounts) -> None:
        self.orphans += other.orphans
        self.rows += other.rows
        self.changed += other.changed
        self.busy += other.busy
        self.ref_rows += other.ref_rows


def delete_batch(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    state: TargetState,
    graph: Graph,
    settings: RunSettings,
    run_id: str,
    keys: list[tuple[Any, ...]],
    *,
    statement_timeout_ms: int,
) -> DeleteCounts:
    """Delete the orphans among ``keys`` in one transaction (archive first, then the DELETE, then the check); a
    batch the app holds part of is retried one orphan per transaction, and an orphan still busy is left for a
    later pass."""
    try:
        return _delete_once(conn, spec, state, graph, settings, run_id, keys, statement_timeout_ms)
    except BUSY_ERRORS as busy:
        if len(keys) == 1:
            log.info("delete: orphan %s is busy (%s); left for a later pass", keys[0], type(busy).__name__)
            return DeleteCounts(busy=1)
    total = DeleteCounts()
    for key in keys:
        total.add(
            delete_batch(conn, spec, state, graph, settings, run_id, [key], statement_timeout_ms=statement_timeout_ms)
        )
    return total


def _delete_once(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    state: TargetState,
    graph: Graph,
    settings: RunSettings,
    run_id: str,
    keys: list[tuple[Any, ...]],
    statement_timeout_ms: int,
) -> DeleteCounts:
    with conn.transaction():
        # Every lock this transaction takes (the reached rows FOR UPDATE, the DELETE's table locks and the
        # cascade's) waits at most lock_timeout_ms.
        set_local_timeouts(conn, lock_timeout_ms=settings.lock_timeout_ms, statement_timeout_ms=statement_timeout_ms)
        conn.execute(statement("cascade", "pin_formats"))
        reached = walk(conn, spec, state, graph, keys, locked=True)
        roots = reached.roots
        if not roots:
            return DeleteCounts()
        if reached.protected:
            radius = BlastRadius()
            radius.add(reached)
            raise DeleteRefused(radius.refusal(spec) + " (found by the delete step, written since preflight?)")
        batch = conn.execute(statement("cascade", "batch_id")).fetchone()[0]
        rows = reached.rows()
        counted_before = _server_counts(conn, spec)
        archived = conn.execute(
            statement("cascade", "archive_rows", spec, archive=_archive(spec)),
            {"run_id": run_id, "batch": batch, "rows": _archive_json(rows), "audit_name": spec.archive_qualified},
        ).fetchone()[0]
        deleted, changed_by_us, wanted = _act(conn, spec, graph, reached)
        if archived != len(rows) or deleted != len(roots) or changed_by_us != wanted:
            raise RuntimeError(
                f"delete: batch {batch} archived {archived} of {len(rows)} row(s), deleted {deleted} of {len(roots)} "
                f"and changed {changed_by_us} of {wanted} through the declared key; rolled back"
            )
        _check_against_server(conn, spec, reached, batch, counted_before)
        conn.execute(
            statement("cascade", "record_batch", spec), {"audit_name": spec.archive_qualified, "run_id": run_id}
        )
    changed = len(reached.changed)
    ref_rows = len(reached.deleted.get(f"{spec.ref_schema}.{spec.ref_table}", {}))
    return DeleteCounts(orphans=len(roots), rows=len(rows) - changed, changed=changed, ref_rows=ref_rows)


def _act(conn: psycopg.Connection, spec: ForeignKeySpec, graph: Graph, reached: Reached) -> tuple[int, int, int]:
    """The delete: the orphans (each checked again to be one), then what the declared key, not added yet, takes
    along or changes; PostgreSQL's own keys do the rest. (orphans deleted, rows the declared key changed, and
    how many it should have)."""
    root = graph.root
    deleted = conn.execute(
        _delete_statement(spec, root, "delete_orphans"), {"keys": _jsonb_array([f.row_key for f in reached.roots])}
    ).fetchone()[0]
    # Deleted by key, not as orphans: the DELETE's snapshot still sees the orphan each one hangs from, so the
    # check again would keep every one of them (a self-referencing CASCADE key then never converged).
    taken = [f.row_key for f in reached.rows() if f.by_us and f.action == "deleted"]
    if taken:
        conn.execute(_delete_statement(spec, root, "delete_taken"), {"keys": _jsonb_array(taken)})
    changed_by_us = 0
    for action in CHANGES.values():
        keys = [found.row_key for found in reached.changed if found.by_us and found.action == action]
        if keys:
            changed_by_us += conn.execute(_act_statement(spec, root, action), {"keys": _jsonb_array(keys)}).fetchone()[
                0
            ]
    return deleted, changed_by_us, sum(1 for found in reached.changed if found.by_us)


def typed_keys(param: str, alias: str, rel: Rel, *, one: bool = False) -> sql.Composed:
    """``jsonb_to_recordset(%(param)s::jsonb) AS alias("id" bigint, ...)``: row keys read back typed on their own,
    never as whole rows (jsonb_populate_record of a key alone fills every other column with NULL, which a NOT
    NULL domain refuses). ``one``: a single key (jsonb_to_record), which the planner knows is one row and so
    looks up by the table's index."""
    assert rel.row_key is not None
    return sql.SQL("{}({}::jsonb) AS {}({})").format(
        sql.SQL("jsonb_to_record" if one else "jsonb_to_recordset"),
        sql.Placeholder(param),
        sql.Identifier(alias),
        sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(type_name))  # type: ignore[arg-type]
            for name, type_name in zip(rel.row_key, rel.key_types, strict=True)
        ),
    )


@cache
def _delete_statement(spec: ForeignKeySpec, root: Rel, name: str) -> sql.Composed:
    assert root.row_key is not None
    return statement(
        "cascade",
        name,
        spec,
        keys=typed_keys("keys", "o", root),
        c_is_o=keysql.equal("c", root.row_key, "o", root.row_key),
    )


@cache
def _act_statement(spec: ForeignKeySpec, root: Rel, action: str) -> sql.Composed:
    """SET NULL / SET DEFAULT on the columns the declared key's action names."""
    assert root.row_key is not None
    value = sql.SQL("NULL" if action == "nulled" else "DEFAULT")
    columns = spec.on_delete_columns or spec.columns
    return statement(
        "cascade",
        "act_for_declared_key",
        spec,
        set_columns=sql.SQL(", ").join(sql.SQL("{} = {}").format(sql.Identifier(name), value) for name in columns),
        keys=typed_keys("keys", "o", root),
        c_is_o=keysql.equal("c", root.row_key, "o", root.row_key),
    )


def _archive_json(rows: list[Found]) -> str:
    """The batch's rows as the jsonb array archive_rows reads; row_key and row_data go in as the server wrote
    them (jsonb text), never re-encoded by Python."""
    return _jsonb_array(
        [
            "{"
            + ",".join(
                [
                    f'"ord":{number}',
                    f'"depth":{found.depth}',
                    f'"table_schema":{json.dumps(found.rel.schema)}',
                    f'"table_name":{json.dumps(found.rel.name)}',
                    f'"relid":{found.relid}',
                    f'"row_key":{found.row_key}',
                    f'"action":{json.dumps(found.action)}',
                    f'"via":{json.dumps(found.via)}',
                    f'"columns":{json.dumps(list(found.columns))}',
                    f'"row_data":{found.row_data}',
                    f'"row_text":{json.dumps(found.row_text)}',
                    f'"row_xmin":{json.dumps(found.xmin)}',
                    f'"written_md5":{json.dumps(found.written)}',
                ]
            )
            + "}"
            for number, found in enumerate(rows)
        ]
    )


def _server_counts(conn: psycopg.Connection, spec: ForeignKeySpec) -> dict[int, tuple[str, int, int]]:
    """Rows deleted and updated per table as this session's statistics count them: the current transaction's,
    plus what earlier transactions of the session counted and the server has not yet gathered (it gathers them
    only while the session is idle outside a transaction, so nothing moves during the batch)."""
    return {
        relid: (name, deleted, updated)
        for relid, name, deleted, updated in conn.execute(
            statement("cascade", "changed_in_transaction"), {"audit_schema": spec.audit_schema}
        )
    }


class ArchiveMismatch(RuntimeError):
    """The server counts a change the batch's archive does not hold: the batch rolled back."""


def _check_against_server(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    reached: Reached,
    batch: int,
    before: dict[int, tuple[str, int, int]],
) -> None:
    """What this transaction deleted and updated, per table, as the server counted it (the counts now less
    those before the DELETE), against the archive: the same deletes in every table, the same updates (plus, at
    most, one per deleted row a SET NULL / SET DEFAULT key also reaches, which PostgreSQL may update before it
    deletes it), and no table changed that the archive does not cover (a key added since the walk, one the walk
    could not see, an app trigger). Otherwise the batch rolls back."""
    expected: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for found in reached.rows():
        expected[found.relid][0 if found.action == "deleted" else 1] += 1
    wrong = []
    seen = set()
    for relid, (name, deleted_now, updated_now) in _server_counts(conn, spec).items():
        _, deleted_before, updated_before = before.get(relid, (name, 0, 0))
        deleted, updated = deleted_now - deleted_before, updated_now - updated_before
        if not deleted and not updated:
            continue
        seen.add(relid)
        if relid not in expected:
            wrong.append(f"{name}: the server counts {deleted} deleted and {updated} updated, the archive nothing")
            continue
        want_deleted, want_changed = expected[relid]
        if deleted != want_deleted or not want_changed <= updated <= want_changed + reached.may_update[relid]:
            wrong.append(
                f"{name}: the server counts {deleted} deleted and {updated} updated, the archive {want_deleted} "
                f"deleted and {want_changed} changed"
            )
    wrong += [f"relation {relid}: archived, but the server counts no change" for relid in expected if relid not in seen]
    if wrong:
        raise ArchiveMismatch(
            f"delete: batch {batch} changed what its archive does not hold ({'; '.join(wrong)}); rolled back, "
            "nothing changed. A foreign key or trigger the walk did not see acted on the delete"
        )


def delete_key_problems(
    conn: psycopg.Connection, spec: ForeignKeySpec, state: TargetState, settings: RunSettings
) -> list[str]:
    """For preflight, with the other structural checks: every table a delete reaches needs a row key, and the
    role every privilege the walk, the lock, the delete and the archive need (whether or not there are orphans
    now: the re-sweep before VALIDATE may meet some)."""
    return graph_problems(conn, spec, build_graph(conn, spec, state), writes=not settings.dry_run)


def protected_rows(
    conn: psycopg.Connection, spec: ForeignKeySpec, state: TargetState, keys: psycopg.Cursor[Any], settings: RunSettings
) -> tuple[list[str], BlastRadius]:
    """For preflight, once the structure passed: the blast radius of every orphan (read-only), and a refusal if
    any RESTRICT / NO ACTION key protects a row it would delete."""
    radius = blast_radius(conn, spec, state, build_graph(conn, spec, state), keys, settings.batch_size)
    return ([radius.refusal(spec)] if radius.protected else []), radius


def require_graph(conn: psycopg.Connection, spec: ForeignKeySpec, state: TargetState) -> Graph:
    graph = build_graph(conn, spec, state)
    if graph.problems:
        raise PreflightFailed(graph.problems)
    return graph


def archived_for_run(conn: psycopg.Connection, spec: ForeignKeySpec, run_id: str) -> dict[str, dict[str, int]]:
    """What run ``run_id``'s deletes removed and changed, per table and action, read from the archive ({} when
    there is no archive)."""
    if (
        conn.execute(
            statement("catalog", "table"), {"schema": spec.audit_schema, "table": spec.archive_table}
        ).fetchone()
        is None
    ):
        return {}
    per_table: dict[str, dict[str, int]] = {}
    for table, action, count in conn.execute(
        statement("cascade", "archived_for_run", archive=_archive(spec)), {"run_id": run_id}
    ):
        per_table.setdefault(table, {"deleted": 0, "nulled": 0, "reset": 0})[action] = count
    return per_table
