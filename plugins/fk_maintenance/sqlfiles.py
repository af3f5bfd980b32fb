"""Named statements from ``sql/*.sql``, with identifiers composed by ``psycopg.sql``.

A file holds one statement family; each statement starts with a ``-- name: <name>`` line. Identifier
placeholders are written ``{table}``, ``{column}`` ... and filled only with ``sql.Identifier``; values are
bound parameters (``%(name)s``).
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from psycopg import sql

from .spec import ForeignKeySpec


def _sql_dir() -> Traversable:
    """The installed package's own ``fk_maintenance/sql`` (wheel, ``pip install .``), or else, for a plain
    Airflow folder deployment of ``plugins/``, the repository's ``sql/`` beside it."""
    packaged = resources.files(__package__) / "sql"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "sql"


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


def identifiers(spec: ForeignKeySpec) -> dict[str, sql.Composable]:
    return {
        "schema": sql.Identifier(spec.schema),
        "table": sql.Identifier(spec.schema, spec.table),
        "column": sql.Identifier(spec.column),
        "ref_table": sql.Identifier(spec.schema, spec.ref_table),
        "ref_column": sql.Identifier(spec.ref_column),
        "row_key": sql.Identifier(spec.row_key),
        "constraint": sql.Identifier(spec.constraint),
        "index": sql.Identifier(spec.index),
        "qualified_index": sql.Identifier(spec.schema, spec.index),
        "audit": sql.Identifier(spec.audit_schema, spec.audit_table),
        "audit_schema": sql.Identifier(spec.audit_schema),
        "restore_log": sql.Identifier(spec.audit_schema, spec.restore_log_table),
        "nulling_transactions": sql.Identifier(spec.audit_schema, spec.nulling_transactions_table),
        # Where an earlier version kept the audit table: in the app's schema.
        "legacy_audit": sql.Identifier(spec.schema, spec.audit_table),
        "on_delete": sql.SQL(spec.on_delete),  # one of a fixed set of keywords, checked by the spec
    }


def statement(family: str, name: str, spec: ForeignKeySpec | None = None, **extra: sql.Composable) -> sql.Composed:
    """The statement ``name`` of ``sql/<family>.sql`` with the spec's identifiers filled in."""
    try:
        text = _family(family)[name]
    except KeyError:
        raise LookupError(f"no statement {name!r} in {SQL_DIR / family}.sql") from None
    names = identifiers(spec) if spec is not None else {}
    names.update(extra)
    return sql.SQL(text).format(**names)  # type: ignore[arg-type]  # psycopg types the template as LiteralString
