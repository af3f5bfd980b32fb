"""Keys from the app's Drizzle schema: every foreign key of the latest snapshot drizzle-kit wrote
(``<out>/meta/<prefix>_snapshot.json``), under drizzle-kit's own names. Then ``schema.ts`` is the one place a
key is declared: what ``.references()`` or ``foreignKey()`` says there is the key the pipeline lands, and
``drizzle-kit push`` finds nothing to change afterwards.

A key's index is the one the snapshot declares on exactly the key's columns (a plain btree index, as the pipeline
builds it), under its drizzle name. Where the snapshot declares none, the key gets none of the pipeline's: push
would drop an index schema.ts does not declare, as drift.

Read when the DAG file is parsed: the standard library only, no database.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fk_maintenance.errors import MaintenanceError
from fk_maintenance.keys.spec import ForeignKeySpec, default_names

# The snapshots this release reads: drizzle-kit's PostgreSQL snapshot format 7 (what the app's pinned drizzle-kit
# 0.31 writes). An older one is upgraded in place by `drizzle-kit up`; a newer format may move the fields read here.
SNAPSHOT_VERSIONS = ("7",)
DIALECT = "postgresql"
JOURNAL = "_journal.json"
# drizzle-kit names a migration's snapshot after the tag's prefix (the part before the first _).
SNAPSHOT_SUFFIX = "_snapshot.json"
# drizzle-kit writes the actions in lowercase ("set null"); the targets file's spelling is PostgreSQL's.
DEFAULT_ACTION = "no action"
# A schema.ts table of the default schema has "schema": "" in the snapshot.
DEFAULT_SCHEMA = "public"


class DrizzleSnapshotInvalid(MaintenanceError):
    """A Drizzle folder without a snapshot, or with one this release does not read."""


@dataclass(frozen=True)
class SnapshotKey:
    """One foreign key of a snapshot, with what the snapshot says of its table: the primary key (the key's row
    key) and the plain btree index on exactly the key's columns, if it declares one."""

    constraint: str
    schema: str
    table: str
    columns: tuple[str, ...]
    ref_schema: str
    ref_table: str
    ref_columns: tuple[str, ...]
    on_delete: str
    on_update: str
    primary_key: tuple[str, ...]
    index: str | None

    @property
    def described(self) -> str:
        return f"{self.constraint} of {self.schema}.{self.table}"

    def entry(self) -> dict[str, Any]:
        """The key as a targets-file entry (the file's own field names), its index and row key from the
        snapshot; without an index of the snapshot's, the name one would have and ``build_index: False``."""
        fields: dict[str, Any] = {
            "schema": self.schema,
            "table": self.table,
            "columns": list(self.columns),
            "ref_schema": self.ref_schema,
            "ref_table": self.ref_table,
            "ref_columns": list(self.ref_columns),
            "on_delete": self.on_delete.upper(),
            "on_update": self.on_update.upper(),
            "constraint": self.constraint,
            "index": self.index or default_names(self.table, self.columns)["index"],
            "build_index": self.index is not None,
        }
        if self.primary_key:
            fields["row_key"] = list(self.primary_key)
        return fields


def latest_snapshot(folder: Path) -> Path:
    """The snapshot of the folder's last migration: the journal's last entry (the order drizzle-kit applies them
    in), else, without a journal, the highest-numbered ``meta/<n>_snapshot.json``."""
    meta = folder / "meta"
    fix = (
        "point drizzle: at the folder drizzle.config.ts names as `out` (the one holding meta/), and run "
        "`drizzle-kit generate` in the app so it writes its snapshot"
    )
    if not folder.is_dir():
        raise DrizzleSnapshotInvalid(f"the Drizzle folder {folder} does not exist: {fix}")
    journal = meta / JOURNAL
    if journal.is_file():
        entries = _json(journal).get("entries") or []
        if entries:
            tag = str(entries[-1].get("tag", ""))
            path = meta / f"{tag.split('_')[0]}{SNAPSHOT_SUFFIX}"
            if not path.is_file():
                raise DrizzleSnapshotInvalid(
                    f"{journal}: the last migration, {tag}, has no snapshot {path.name} in {meta}: restore it from "
                    "version control, or run `drizzle-kit generate` again"
                )
            return path
    numbered = [(int(p.name[: -len(SNAPSHOT_SUFFIX)]), p) for p in meta.glob(f"*{SNAPSHOT_SUFFIX}") if _numbered(p)]
    if not numbered:
        raise DrizzleSnapshotInvalid(f"{folder} holds no drizzle-kit snapshot (meta/<n>{SNAPSHOT_SUFFIX}): {fix}")
    return max(numbered)[1]


def _numbered(path: Path) -> bool:
    return path.name[: -len(SNAPSHOT_SUFFIX)].isdigit()


def _json(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DrizzleSnapshotInvalid(f"{path} cannot be read as JSON: {exc}") from None
    if not isinstance(document, dict):
        raise DrizzleSnapshotInvalid(f"{path} is not a drizzle-kit snapshot or journal (not a JSON object)")
    return document


def read_snapshot(path: Path) -> dict[str, Any]:
    """The snapshot, refused unless it is a PostgreSQL snapshot of a version this release reads."""
    snapshot = _json(path)
    version, dialect = snapshot.get("version"), snapshot.get("dialect")
    if dialect != DIALECT:
        raise DrizzleSnapshotInvalid(
            f"{path} is a snapshot of dialect {dialect!r}: this pipeline maintains PostgreSQL, and reads drizzle-kit "
            f"snapshots of dialect {DIALECT!r} only"
        )
    if version not in SNAPSHOT_VERSIONS:
        raise DrizzleSnapshotInvalid(
            f"{path} is a drizzle-kit snapshot of version {version!r}; this release reads version(s) "
            f"{', '.join(SNAPSHOT_VERSIONS)} (what drizzle-kit 0.31 writes): "
            + (
                "run `drizzle-kit up` in the app to upgrade its snapshots"
                if str(version).isdigit() and int(str(version)) < int(SNAPSHOT_VERSIONS[0])
                else "use a release of this pipeline that reads it, or the drizzle-kit the app pins"
            )
        )
    return snapshot


def snapshot_keys(folder: Path) -> tuple[Path, tuple[SnapshotKey, ...]]:
    """The latest snapshot of ``folder`` and every foreign key it declares, table by table in its order."""
    path = latest_snapshot(folder)
    tables = read_snapshot(path).get("tables")
    if not isinstance(tables, dict):
        raise DrizzleSnapshotInvalid(f"{path} has no tables object: not a drizzle-kit PostgreSQL snapshot")
    try:
        return path, tuple(key for table in tables.values() for key in _table_keys(table))
    except (KeyError, TypeError, AttributeError) as exc:
        raise DrizzleSnapshotInvalid(
            f"{path}: a table or foreign key lacks a field drizzle-kit writes ({type(exc).__name__}: {exc}); the file "
            "is not a snapshot drizzle-kit wrote: run `drizzle-kit generate` again"
        ) from None


def _table_keys(table: dict[str, Any]) -> list[SnapshotKey]:
    schema = table.get("schema") or DEFAULT_SCHEMA
    primary_key = _primary_key(table)
    keys = []
    for fk in (table.get("foreignKeys") or {}).values():
        columns = tuple(fk["columnsFrom"])
        keys.append(
            SnapshotKey(
                constraint=fk["name"],
                schema=schema,
                table=table["name"],
                columns=columns,
                ref_schema=fk.get("schemaTo") or DEFAULT_SCHEMA,
                ref_table=fk["tableTo"],
                ref_columns=tuple(fk["columnsTo"]),
                on_delete=" ".join((fk.get("onDelete") or DEFAULT_ACTION).split()),
                on_update=" ".join((fk.get("onUpdate") or DEFAULT_ACTION).split()),
                primary_key=primary_key,
                index=_key_index(table, columns),
            )
        )
    return keys


def _primary_key(table: dict[str, Any]) -> tuple[str, ...]:
    """The table's primary key as the snapshot declares it: ``.primaryKey()`` columns, or a composite one."""
    columns = tuple(name for name, column in (table.get("columns") or {}).items() if column.get("primaryKey"))
    if columns:
        return columns
    composite = list((table.get("compositePrimaryKeys") or {}).values())
    return tuple(composite[0]["columns"]) if composite else ()


def _key_index(table: dict[str, Any], columns: tuple[str, ...]) -> str | None:
    """The index the snapshot declares on exactly the key's columns, in order, as the pipeline builds one: btree,
    ascending, not unique, not partial, no storage options. Another shape (unique, partial, a wider index) is the
    app's own to create, never the pipeline's: building ours under its name would be drift for push."""
    for index in (table.get("indexes") or {}).values():
        parts = index.get("columns") or []
        plain = all(
            not part.get("isExpression") and part.get("asc", True) and part.get("nulls", "last") == "last"
            for part in parts
        ) and not any(part.get("opclass") for part in parts)
        if (
            plain
            and tuple(part.get("expression") for part in parts) == columns
            and (index.get("method") or "btree") == "btree"
            and not index.get("isUnique")
            and not index.get("where")
            and not index.get("with")
        ):
            return str(index["name"])
    return None


def ts_field(column: str) -> str:
    """The camelCase field schema.ts usually gives a snake_case column (``parent_kpi_id`` -> ``parentKpiId``)."""
    head, *rest = re.split(r"_+", column) or [column]
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def no_index_note(spec: ForeignKeySpec) -> str:
    """Why a key has no index of the pipeline's, and how the app declares one (plan, preflight, report)."""
    fields = ", ".join(f"table.{ts_field(column)}" for column in spec.columns)
    return (
        f"the app's Drizzle schema declares no index on {spec.schema}.{spec.table} ({', '.join(spec.columns)}), so "
        "the run builds none (drizzle-kit push would drop it as drift); every delete or key update of a referenced "
        f"row then scans {spec.table} for its rows. To have one, declare it in schema.ts, in the third argument "
        f'of pgTable("{spec.table}", ...): index("{spec.index}").on({fields}), run `drizzle-kit generate`, and '
        "run the pipeline again: it builds the index concurrently"
    )
