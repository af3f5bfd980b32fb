"""``fk-maintenance declare --from-dsn``: a targets file declaring every foreign key a reference database has,
exactly as it has them (staging, or a scratch database made by the app's own migrations, holds the keys that
production lacks). Every entry is the key's whole definition under its own name; what cannot be declared (no
primary key to tell rows apart, a key on a single partition) is written commented out, with the reason.

The file printed is checked by the same schema and spec as any targets file before it is printed.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import psycopg

from fk_maintenance.db.sqlfiles import statement
from fk_maintenance.keys.settings import airflow_key_from
from fk_maintenance.keys.spec import (
    MATCH_TYPES,
    ON_DELETE_ACTIONS,
    ON_UPDATE_ACTIONS,
    default_names,
    fitting_identifier,
)
from fk_maintenance.keys.targets import load_targets


@dataclass(frozen=True)
class DeclaredKey:
    """A foreign key as the reference database's catalog holds it (sql/catalog.sql, declared_foreign_keys)."""

    constraint: str
    schema: str
    table: str
    ref_schema: str
    ref_table: str
    columns: tuple[str, ...]
    ref_columns: tuple[str, ...]
    on_delete_columns: tuple[str, ...]
    on_delete: str
    on_update: str
    match: str
    deferrable: bool
    deferred: bool
    on_partition: bool
    primary_key: tuple[str, ...]
    nullable: bool
    serving_index: str | None
    parent_oid: int | None = None  # a partition's: its partitioned table
    # Declared on a partitioned table because each of its partitions holds it already (their own keys' names).
    held_by_partitions: tuple[str, ...] = ()
    partitions: int = 0


def read_keys(conn: psycopg.Connection, schemas: list[str] | None) -> list[DeclaredKey]:
    rows = conn.execute(statement("catalog", "declared_foreign_keys"), {"schemas": schemas or None}).fetchall()
    keys = []
    for name, schema, table, ref_schema, ref_table, cols, ref_cols, set_cols, dele, upd, match, *rest in rows:
        deferrable, deferred, on_partition, primary_key, nullable, serving_index, parent_oid = rest
        keys.append(
            DeclaredKey(
                *(name, schema, table, ref_schema, ref_table, tuple(cols), tuple(ref_cols), tuple(set_cols or ())),
                ON_DELETE_ACTIONS[dele],
                ON_UPDATE_ACTIONS[upd],
                MATCH_TYPES.get(match, match),
                *(deferrable, deferred, on_partition, tuple(primary_key or ()), bool(nullable), serving_index),
                parent_oid,
            )
        )
    return _held_by_every_partition(conn, keys)


def _held_by_every_partition(conn: psycopg.Connection, keys: list[DeclaredKey]) -> list[DeclaredKey]:
    """A key every partition of a partitioned table holds, each under its own name (pagila's payment, say), is
    the partitioned table's key: declared there, under the name PostgreSQL would give it (add_fk_not_valid then
    renames the partitions' keys to it, and the parent's adopts them: no second key). One only some partitions
    hold (the oldest, say, from before the key was wanted) is declared there too, saying so: the others would get
    it, which is the file's reader's to accept or remove."""
    groups: dict[tuple[object, ...], list[DeclaredKey]] = {}
    for key in keys:
        if key.on_partition and key.parent_oid is not None:
            shape = (key.parent_oid, key.columns, key.ref_schema, key.ref_table, key.ref_columns, *_definition(key))
            groups.setdefault(shape, []).append(key)
    result = [key for key in keys if not key.on_partition]
    for (parent_oid, *_shape), held in groups.items():
        schema, table, primary_key, nullable, index, partitions = conn.execute(
            statement("catalog", "partitioned_parent"), {"oid": parent_oid, "columns": list(held[0].columns)}
        ).fetchone()
        result.append(
            replace(
                held[0],
                constraint=default_names(table, held[0].columns)["constraint"],
                schema=schema,
                table=table,
                on_partition=False,
                primary_key=tuple(primary_key or ()),
                nullable=bool(nullable),
                serving_index=index,
                parent_oid=None,
                held_by_partitions=tuple(f"{key.table}.{key.constraint}" for key in held),
                partitions=partitions,
            )
        )
    return sorted(result, key=lambda key: (key.schema, key.table, key.constraint))


def entry_lines(key: DeclaredKey, dag_id: str, conn_ids: list[str]) -> list[str]:
    """One targets-file entry, every name as a JSON string (valid YAML, whatever its characters), defaults left
    out; commented out, with the reason, where the key cannot be declared."""
    problem = _undeclarable(key)
    names = f"({', '.join(key.columns)}) -> {key.ref_schema}.{key.ref_table}({', '.join(key.ref_columns)})"
    lines = [f"# {key.schema}.{key.table} {names}" + (f": {problem}" if problem else "")]
    fields: list[tuple[str, object]] = [("name", dag_id), ("schema", key.schema), ("table", key.table)]
    fields.append(("columns", list(key.columns)))
    if key.ref_schema != key.schema:
        fields.append(("ref_schema", key.ref_schema))
    fields += [("ref_table", key.ref_table), ("ref_columns", list(key.ref_columns))]
    fields.append(("row_key", list(key.primary_key)))
    fields += _definition(key)
    index = key.serving_index or fitting_identifier(f"{key.table}_{'_'.join(key.columns)}_idx")
    audit = fitting_identifier(f"{key.constraint}_audit")
    fields += [("constraint", key.constraint), ("index", index), ("audit_table", audit), ("conn_ids", conn_ids)]
    body = [
        f"{'- ' if number == 0 else '  '}{name}: {json.dumps(value)}" for number, (name, value) in enumerate(fields)
    ]
    if key.serving_index:
        body.insert(-2, f"  # {key.serving_index} already serves the key: it is used, not built")
    if key.held_by_partitions:
        held = len(key.held_by_partitions)
        which = (
            f"each of its {held} partitions holds"
            if held == key.partitions
            else f"{held} of {key.partitions} partitions hold"
        )
        body[1:1] = [
            f"  # {which} it already ({', '.join(key.held_by_partitions)}): the run renames those to this name and",
            "  # this key adopts them" + ("" if held == key.partitions else "; the other partitions get it too"),
        ]
    if not key.nullable:
        body.append("  # NOT NULL: orphans are refused unless you declare orphans: delete (archived, restorable)")
    return lines + [("# " if problem else "") + "  " + line for line in body]


def _definition(key: DeclaredKey) -> list[tuple[str, object]]:
    on_delete = key.on_delete
    if key.on_delete_columns and sorted(key.on_delete_columns) != sorted(key.columns):
        # Quoted as SQL quotes a name, which the targets file reads back exactly (case, spaces, commas).
        on_delete += " (" + ", ".join('"' + name.replace('"', '""') + '"' for name in key.on_delete_columns) + ")"
    fields: list[tuple[str, object]] = [("on_delete", on_delete)]
    if key.on_update != "NO ACTION":
        fields.append(("on_update", key.on_update))
    if key.match != "SIMPLE":
        fields.append(("match", key.match))
    if key.deferrable:
        fields.append(("deferrable", "initially deferred" if key.deferred else True))
    return fields


def _undeclarable(key: DeclaredKey) -> str:
    if key.on_partition:
        return "a key of one partition, not of its partitioned table: declare it on the parent"
    if not key.primary_key:
        return f"{key.table} has no primary key to tell its rows apart: add row_key (a unique, NOT NULL column list)"
    return ""


def targets_file(keys: list[DeclaredKey], conn_ids: list[str], source: str) -> tuple[str, int]:
    """The whole file, checked by the same schema and spec as any targets file before it is returned, and how
    many keys it declares."""
    taken: set[str] = set()
    entries = []
    for key in keys:
        dag_id = airflow_key_from(key.constraint)
        while dag_id in taken:
            dag_id += "_"
        taken.add(dag_id)
        entries.append("\n".join(entry_lines(key, dag_id, conn_ids)))
    declared = sum(1 for key in keys if not _undeclarable(key))
    head = [
        f"# Every foreign key of {source}, as it declares them ({declared} declared, "
        f"{len(keys) - declared} commented out with the reason).",
        "# Written by fk-maintenance declare; check what it would do with: fk-maintenance plan --targets <this file>",
        "foreign_keys:" if declared else "foreign_keys: []  # nothing to declare",
    ]
    text = "\n".join(head + entries) + "\n"
    if declared:
        _check(text)
    return text, declared


def _check(text: str) -> None:
    with tempfile.TemporaryDirectory(prefix="fk-declare-") as folder:
        path = Path(folder) / "targets.yaml"
        path.write_text(text)
        load_targets(path)


def declare(
    connect: Callable[[], psycopg.Connection], schemas: list[str] | None, conn_ids: list[str], source: str
) -> tuple[str, int]:
    with connect() as conn:
        return targets_file(read_keys(conn, schemas), conn_ids, source)
