"""Named statements from ``sql/*.sql``, with identifiers composed by ``psycopg.sql``.

A file holds one statement family; each statement starts with a ``-- name: <name>`` line. Identifier
placeholders are written ``{table}``, ``{columns}`` ... and filled only with ``sql.Identifier`` or fragments
composed of them (``fk_maintenance.db.keysql``); values are bound parameters (``%(name)s``).
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from psycopg import sql

from fk_maintenance.db import keysql
from fk_maintenance.db.target_state import TargetState
from fk_maintenance.keys.spec import ForeignKeySpec


def _sql_dir() -> Traversable:
    """The installed package's own ``fk_maintenance/sql`` (wheel, ``pip install .``), or else, for a plain
    Airflow folder deployment of ``plugins/``, the repository's ``sql/`` beside it."""
    packaged = resources.files("fk_maintenance") / "sql"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[3] / "sql"


SQL_DIR = _sql_dir()
_NAME_LINE = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


@cache
def _family(family: str) -> dict[str, str]:
    text = (SQL_DIR / f"{family}.sql").read_text()
    parts = _NAME_LINE.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    statements = {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}
    if not statements:
        raise LookupError(f"{SQL_DIR / family}.sql holds no '-- name:' statements")
    return statements


@cache
def identifiers(spec: ForeignKeySpec) -> dict[str, sql.Composable]:
    """Names and the fragments of the key every statement shares (fk_maintenance.db.keysql): ``c`` is a child row,
    ``p`` a referenced row, ``a`` an audit row, ``t`` the app's row a statement changes. Composed once per spec
    (every batch's statement reads them); the caller copies the dict before adding to it."""
    return {
        **_key_names(spec),
        **_audit_names(spec),
        **_child_row_fragments(spec),
        **_audit_fragments(spec),
        **_probe_fragments(spec),
    }


def _key_names(spec: ForeignKeySpec) -> dict[str, sql.Composable]:
    """The app's objects the key's DDL names (constraint.sql, index.sql) and every statement reads."""
    return {
        "schema": sql.Identifier(spec.schema),
        "table": sql.Identifier(spec.schema, spec.table),
        "ref_table": sql.Identifier(spec.ref_schema, spec.ref_table),
        "columns": keysql.names(spec.columns),
        "ref_columns": keysql.names(spec.ref_columns),
        "row_key": keysql.names(spec.row_key),
        "constraint": sql.Identifier(spec.constraint),
        "index": sql.Identifier(spec.index),
        "qualified_index": sql.Identifier(spec.schema, spec.index),
        "key_definition": _key_definition(spec),
    }


def _key_definition(spec: ForeignKeySpec) -> sql.Composed:
    """What follows REFERENCES in the key's DDL: every part of the declared definition, defaults spelled out, so
    the key created is exactly the declared one. Keywords only, each from a fixed set the spec checked."""
    on_delete = sql.SQL(spec.on_delete)
    if spec.on_delete_columns:
        on_delete = sql.SQL("{} ({})").format(on_delete, keysql.names(spec.on_delete_columns))
    return sql.SQL("MATCH {} ON DELETE {} ON UPDATE {} {}").format(
        sql.SQL(spec.match), on_delete, sql.SQL(spec.on_update), sql.SQL(spec.deferrability_sql)
    )


def _audit_names(spec: ForeignKeySpec) -> dict[str, sql.Composable]:
    """The pipeline's own tables in its audit schema (audit.sql creates them; nulling, cascade and restore write)."""
    return {
        "audit": sql.Identifier(spec.audit_schema, spec.audit_table),
        "audit_row_key": keysql.names(spec.audit_row_key_columns),
        "audit_pointer": keysql.names(spec.audit_pointer_columns),
        "audit_schema": sql.Identifier(spec.audit_schema),
        "restore_log": sql.Identifier(spec.audit_schema, spec.restore_log_table),
        "nulling_transactions": sql.Identifier(spec.audit_schema, spec.nulling_transactions_table),
        # Where an earlier version kept the audit table: in the app's schema.
        "legacy_audit": sql.Identifier(spec.schema, spec.audit_table),
    }


def _child_row_fragments(spec: ForeignKeySpec) -> dict[str, sql.Composable]:
    """A child row ``c`` and its parent ``p``: how the orphan, cascade and check statements find orphans."""
    return {
        "c_row_key": keysql.names(spec.row_key, "c"),
        "c_row_key_text": keysql.as_text("c", spec.row_key),
        "c_pointer_text": keysql.as_text("c", spec.columns),
        "c_key_complete": keysql.all_not_null("c", spec.columns),
        # Where an orphan is looked for: the rows the key checks (MATCH SIMPLE: complete keys; FULL: all but
        # all-NULL ones).
        "c_key_checked": keysql.checked_by_key("c", spec.columns, spec.match),
        "parent_of_c": keysql.equal("p", spec.ref_columns, "c", spec.columns),
        "c_is_batch_key": keysql.equal("c", spec.row_key, BATCH, spec.row_key),
    }


def _audit_fragments(spec: ForeignKeySpec) -> dict[str, sql.Composable]:
    """An audit row ``a`` against the app's row ``t``: nulling writes the audit (orphans.sql), restore reads it
    back (restore.sql)."""
    return {
        "c_as_audit": sql.SQL(", ").join(
            [
                keysql.aliased("c", spec.row_key, spec.audit_row_key_columns),
                keysql.aliased("c", spec.columns, spec.audit_pointer_columns),
            ]
        ),
        "audit_pointer_from_excluded": keysql.set_from(
            "excluded", spec.audit_pointer_columns, spec.audit_pointer_columns
        ),
        "t_is_audited_row": keysql.equal("t", spec.row_key, "a", spec.audit_row_key_columns),
        # NULL-safe: a MATCH FULL orphan's key may be half NULL.
        "t_points_as_audited": sql.SQL("{} IS NOT DISTINCT FROM {}").format(
            keysql.row("t", spec.columns), keysql.row("a", spec.audit_pointer_columns)
        ),
        "a_is_batch_key": keysql.equal("a", spec.audit_row_key_columns, BATCH, spec.row_key),
        "p_is_audited_parent": keysql.equal("p", spec.ref_columns, "a", spec.audit_pointer_columns),
        "t_pointer_row": keysql.row("t", spec.columns),
        "a_pointer_row": keysql.row("a", spec.audit_pointer_columns),
        "a_copied": keysql.names(spec.audit_row_key_columns + spec.audit_pointer_columns, "a"),
        "t_row_key_text": keysql.as_text("t", spec.row_key),
        "t_pointer_text": keysql.as_text("t", spec.columns),
        "after": keysql.placeholders("after", len(spec.row_key)),
    }


def _probe_fragments(spec: ForeignKeySpec) -> dict[str, sql.Composable]:
    """post_checks' probes and the hierarchy walks (checks.sql): ``tree`` is a row the walk down from the roots
    reached, ``up`` one the walk up from a row reached."""
    return {
        "columns_are_values": keysql.equal_values(spec.columns, "value"),
        "c_columns_as_text": keysql.texts("c", spec.columns),
        "p_ref_columns_as_text": keysql.texts("p", spec.ref_columns),
        "columns_to_probe": keysql.set_values(spec.columns, "probe"),
        "row_key_values": keysql.placeholders("row_key", len(spec.row_key)),
        "c_referenced": keysql.aliased("c", spec.ref_columns, keysql.numbered("fk_ref", len(spec.ref_columns))),
        "c_points_at_tree": keysql.equal("c", spec.columns, "tree", keysql.numbered("fk_ref", len(spec.columns))),
        "tree_row_key_text": keysql.as_text("tree", spec.row_key),
        "tree_is_c": keysql.equal("tree", spec.row_key, "c", spec.row_key),
        "c_pointer_as_up": keysql.aliased("c", spec.columns, keysql.numbered("fk_up", len(spec.columns))),
        "c_referenced_is_up": keysql.equal("c", spec.ref_columns, "up", keysql.numbered("fk_up", len(spec.columns))),
    }


# The alias of a batch of row keys bound as arrays, and the prefix of their parameters (see batch_params).
BATCH = "batch"


def state_fragments(spec: ForeignKeySpec, state: TargetState) -> dict[str, sql.Composable]:
    """The fragments that need the catalog: the key columns' types and which of them nulling sets to NULL."""
    return {
        "batch_keys": keysql.value_table(BATCH, state.row_key_types, spec.row_key),
        "set_nulled": keysql.set_null(state.nulled),
        "t_nulled": keysql.all_null("t", state.nulled),
        "set_nulled_from_audit": keysql.set_from(
            "a", state.nulled, [spec.audit_pointer_columns[spec.columns.index(name)] for name in state.nulled]
        ),
        "audit_column_definitions": sql.SQL(",\n    ").join(
            sql.SQL("{} {}{}").format(
                sql.Identifier(name),
                sql.SQL(type_name),  # type: ignore[arg-type]
                sql.SQL("" if _may_be_null(spec, name) else " NOT NULL"),
            )
            for name, type_name in audit_columns(spec, state).items()
        ),
    }


def _may_be_null(spec: ForeignKeySpec, audit_column: str) -> bool:
    """An old pointer of a MATCH FULL key may be half NULL (that made it an orphan); every other audited value is
    a whole key."""
    return spec.match == "FULL" and audit_column in spec.audit_pointer_columns


def audit_columns(spec: ForeignKeySpec, state: TargetState) -> dict[str, str]:
    """The audit's key and old-value columns and their types (the app's columns' own, from format_type)."""
    return dict(
        zip(
            spec.audit_row_key_columns + spec.audit_pointer_columns,
            state.row_key_types + state.pointer_types,
            strict=True,
        )
    )


def batch_params(spec: ForeignKeySpec, keys: list[tuple[Any, ...]]) -> dict[str, list[Any]]:
    """A batch of row keys (tuples) as the arrays ``{batch_keys}`` binds."""
    return keysql.value_params(BATCH, keys, len(spec.row_key))


def statement(
    family: str,
    name: str,
    spec: ForeignKeySpec | None = None,
    state: TargetState | None = None,
    **extra: sql.Composable,
) -> sql.Composed:
    """The statement ``name`` of ``sql/<family>.sql`` with the spec's identifiers (and, given the target's
    catalog state, the fragments that need it) filled in."""
    try:
        text = _family(family)[name]
    except KeyError:
        raise LookupError(f"no statement {name!r} in {SQL_DIR / family}.sql") from None
    names = dict(identifiers(spec)) if spec is not None else {}
    if spec is not None and state is not None:
        names.update(state_fragments(spec, state))
    names.update(extra)
    return sql.SQL(text).format(**names)  # type: ignore[arg-type]  # psycopg types the template as LiteralString
