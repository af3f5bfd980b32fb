"""SQL fragments composed from the key's model (lists of columns), so that every statement is written once for
keys of one column and of many. Aliases are the statements' own (``c`` a child row, ``p`` a referenced row,
``a`` an audit row, ``t`` the app's row being changed); names are always ``sql.Identifier``.

Composite keys follow MATCH SIMPLE, as PostgreSQL checks them: a row with any NULL in the key is not checked,
so it is never an orphan; an orphan is a row whose whole tuple has no match among the referenced rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg import sql

Names = Sequence[str]


def column(alias: str | None, name: str) -> sql.Identifier:
    return sql.Identifier(alias, name) if alias else sql.Identifier(name)


def names(columns: Names, alias: str | None = None) -> sql.Composed:
    """``"a", "b"`` (or ``c."a", c."b"``): a select list, a DDL column list, an ORDER BY."""
    return sql.SQL(", ").join(column(alias, name) for name in columns)


def texts(alias: str, columns: Names) -> sql.Composed:
    """``c."a"::text, c."b"::text``: values to bind back as the columns' own types, whatever they are."""
    return sql.SQL(", ").join(sql.SQL("{}::text").format(column(alias, name)) for name in columns)


def equal_values(columns: Names, prefix: str) -> sql.Composed:
    """``"a" = %(v_1)s AND "b" = %(v_2)s``."""
    return _each_is_bound(columns, prefix, " AND ")


def set_values(columns: Names, prefix: str) -> sql.Composed:
    """``"a" = %(v_1)s, "b" = %(v_2)s``."""
    return _each_is_bound(columns, prefix, ", ")


def _each_is_bound(columns: Names, prefix: str, joiner: str) -> sql.Composed:
    return sql.SQL(joiner).join(
        sql.SQL("{} = {}").format(sql.Identifier(name), sql.Placeholder(param))
        for name, param in zip(columns, numbered(prefix, len(columns)), strict=True)
    )


def numbered(base: str, count: int) -> tuple[str, ...]:
    """Names for a statement's own columns (fk_ref_1, fk_ref_2 ..., never the app's) and for the parameters of
    a bound tuple (value_1, value_2 ...)."""
    return tuple(f"{base}_{i}" for i in range(1, count + 1))


def bind(prefix: str, values: Sequence[Any]) -> dict[str, Any]:
    """The parameters of one bound tuple, as ``placeholders``, ``equal_values`` and ``set_values`` name them."""
    return dict(zip(numbered(prefix, len(values)), values, strict=True))


def all_not_null(alias: str, columns: Names) -> sql.Composed:
    """The row's key is complete, so the foreign key checks it (MATCH SIMPLE)."""
    return sql.SQL(" AND ").join(sql.SQL("{} IS NOT NULL").format(column(alias, name)) for name in columns)


def checked_by_key(alias: str, columns: Names, match: str) -> sql.Composed:
    """The foreign key checks the row: MATCH SIMPLE checks a complete key only (one NULL lets the row pass), MATCH
    FULL every key but an all-NULL one (a key with some columns NULL is a violation: no parent can equal it, so
    the anti-join's NOT EXISTS counts it an orphan)."""
    if match == "FULL":
        return sql.SQL("NOT ({})").format(all_null(alias, columns))
    return all_not_null(alias, columns)


def all_null(alias: str, columns: Names) -> sql.Composed:
    return sql.SQL(" AND ").join(sql.SQL("{} IS NULL").format(column(alias, name)) for name in columns)


def equal(left: str, left_columns: Names, right: str, right_columns: Names) -> sql.Composed:
    """Column by column equality of two tuples (the pairs of a key, or a row key and its audited copy)."""
    return sql.SQL(" AND ").join(
        sql.SQL("{} = {}").format(column(left, a), column(right, b))
        for a, b in zip(left_columns, right_columns, strict=True)
    )


def row(alias: str | None, columns: Names) -> sql.Composed:
    """``ROW(c."a", c."b")``: a tuple to compare as a whole (IS DISTINCT FROM, >)."""
    return sql.SQL("ROW({})").format(names(columns, alias))


def as_text(alias: str | None, columns: Names) -> sql.Composed:
    """A tuple as text for logs, the restore log and the hierarchy's paths: ``5`` for one column, ``(1,5)`` for
    more (a record's own text form, which quotes a value holding a comma or parenthesis, so it reads back
    unambiguously). Parenthesized, so it is one operand wherever it is used."""
    if len(columns) == 1:
        return sql.SQL("({}::text)").format(column(alias, columns[0]))
    return sql.SQL("({}::text)").format(row(alias, columns))


def set_null(columns: Names) -> sql.Composed:
    return sql.SQL(", ").join(sql.SQL("{} = NULL").format(sql.Identifier(name)) for name in columns)


def set_from(alias: str, targets: Names, sources: Names) -> sql.Composed:
    """``"a" = r."x", "b" = r."y"``: put each audited value back into its column."""
    return sql.SQL(", ").join(
        sql.SQL("{} = {}").format(sql.Identifier(target), column(alias, source))
        for target, source in zip(targets, sources, strict=True)
    )


def aliased(alias: str, columns: Names, as_names: Names) -> sql.Composed:
    """``c."a" AS "x", c."b" AS "y"``."""
    return sql.SQL(", ").join(
        sql.SQL("{} AS {}").format(column(alias, name), sql.Identifier(new))
        for name, new in zip(columns, as_names, strict=True)
    )


def value_table(prefix: str, types: Sequence[str], as_names: Names) -> sql.Composed:
    """A table of bound tuples: ``unnest(%(k_1)s::bigint[], %(k_2)s::text[]) AS k("a", "b")``, one array per
    column, each cast to the column's type (a catalog type name, never user input)."""
    arrays = sql.SQL(", ").join(
        sql.SQL("{}::{}[]").format(sql.Placeholder(param), sql.SQL(type_name))  # type: ignore[arg-type]
        for param, type_name in zip(numbered(prefix, len(types)), types, strict=True)
    )
    return sql.SQL("unnest({}) AS {}({})").format(arrays, sql.Identifier(prefix), names(as_names))


def value_params(prefix: str, tuples: Sequence[Sequence[Any]], width: int) -> dict[str, list[Any]]:
    """The arrays ``value_table`` binds: the i-th column of every tuple."""
    return {param: [values[i] for values in tuples] for i, param in enumerate(numbered(prefix, width))}


def placeholders(prefix: str, width: int) -> sql.Composed:
    """``ROW(%(after_1)s, %(after_2)s)``: one bound tuple."""
    return sql.SQL("ROW({})").format(sql.SQL(", ").join(map(sql.Placeholder, numbered(prefix, width))))


def json_object(alias: str, columns: Names) -> sql.Composed:
    """``jsonb_build_object('a', c."a", 'b', c."b")``: a row key as the archive keeps it, readable by hand and
    compared as a whole (jsonb's text form is canonical, so one row's key always reads the same)."""
    return sql.SQL("jsonb_build_object({})").format(
        sql.SQL(", ").join(sql.SQL("{}, {}").format(sql.Literal(name), column(alias, name)) for name in columns)
    )
