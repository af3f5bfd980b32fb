"""The declared end state: which foreign key, index and audit table a run converges to.

A key is one model whatever its shape: a list of column pairs (``columns[i] -> ref_columns[i]``; a single
column is a list of one), the schemas of both tables, the row key that tells child rows apart (one or more
columns), and what nulling an orphan sets to NULL. Every statement is composed from this model
(``fk_maintenance.db.keysql``); nothing in the steps knows how many columns a key has.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, fields

ON_DELETE_ACTIONS = {
    # pg_constraint.confdeltype code -> SQL spelling
    "n": "SET NULL",
    "c": "CASCADE",
    "r": "RESTRICT",
    "a": "NO ACTION",
    "d": "SET DEFAULT",
}
# ON UPDATE takes the same actions (pg_constraint.confupdtype, same codes), never a column list.
ON_UPDATE_ACTIONS = ON_DELETE_ACTIONS
# pg_constraint.confmatchtype code -> SQL spelling. MATCH PARTIAL is in the SQL standard, not in PostgreSQL.
MATCH_TYPES = {"s": "SIMPLE", "f": "FULL"}
# ON DELETE SET NULL (col, ...) / SET DEFAULT (col, ...): PostgreSQL 15+ acts on only the listed key columns.
ACTIONS_WITH_COLUMNS = ("SET NULL", "SET DEFAULT")
_ACTION_WITH_COLUMNS = re.compile(r"^\s*(SET\s+NULL|SET\s+DEFAULT)\s*\((.*)\)\s*$", re.IGNORECASE | re.DOTALL)
# The audit's columns for the row key and the old pointer: the first of each keeps the name every earlier
# version gave it (the shipped key's audit table is unchanged); a composite key adds _2, _3, ...
AUDIT_ROW_KEY_COLUMN = "kpi_id"
AUDIT_POINTER_COLUMN = "old_parent_kpi_id"
NAME_FIELDS = (
    "schema",
    "table",
    "ref_table",
    "constraint",
    "index",
    "audit_table",
    "audit_schema",
    "ref_schema",
    "archive_table",
)
# What a run does to an orphan (a row whose key names a missing parent): null the key's nullable column(s)
# (audited), delete the row and everything the database's own keys take with it (archived), or refuse the run.
# Undeclared: nullify for a nullable key, refuse for a NOT NULL one (catalog.orphan_policy).
ORPHAN_POLICIES = ("nullify", "delete", "refuse")
# The archive of a key whose policy is delete: its audit table's name with this suffix, unless declared.
ARCHIVE_SUFFIX = "_archive"
COLUMN_LIST_FIELDS = ("columns", "ref_columns", "row_key", "on_delete_columns", "nullify_columns")


def parse_on_delete(text: str) -> tuple[str, tuple[str, ...]]:
    """``SET NULL (a, b)`` -> ("SET NULL", ("a", "b")); ``CASCADE`` -> ("CASCADE", ()). A listed name is taken
    as written (case and spaces kept), or, double-quoted as SQL writes it (a quote doubled inside, the spelling
    pg_get_constraintdef prints), unquoted."""
    match = _ACTION_WITH_COLUMNS.match(text)
    if not match:
        words = " ".join(text.split())
        return (words.upper() if words.upper() in ON_DELETE_ACTIONS.values() else text), ()
    names = [_unquoted(name.strip()) for name in _LIST_ITEM.findall(match.group(2) + ",")]
    return " ".join(match.group(1).split()).upper(), tuple(names)


def _words(text: object) -> object:
    """A keyword spelling as PostgreSQL prints it (``set  null`` -> ``SET NULL``); anything else as it is."""
    return " ".join(text.split()).upper() if isinstance(text, str) else text


# One item of a column list: a double-quoted name (with "" for a quote) or anything up to the next comma.
_LIST_ITEM = re.compile(r'\s*("(?:[^"]|"")*"|[^,]*?)\s*,')


def _unquoted(name: str) -> str:
    if len(name) >= 2 and name.startswith('"') and name.endswith('"'):
        return name[1:-1].replace('""', '"')
    return name


def _column_list(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple):
        return tuple(value)
    raise ValueError(f"a column list must be a name or a list of names, not {value!r}")


# PostgreSQL cuts longer names silently (NAMEDATALEN - 1).
MAX_IDENTIFIER_BYTES = 63


def fitting_identifier(name: str) -> str:
    """A name we make up, within PostgreSQL's 63 bytes: a name cut short ends in a hash of the whole, so two long
    names that share their start never collide."""
    if len(name.encode()) <= MAX_IDENTIFIER_BYTES:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    cut = name.encode()[: MAX_IDENTIFIER_BYTES - 9].decode(errors="ignore")
    return f"{cut}_{digest}"


def postgres_object_name(name1: str, name2: str, label: str) -> str:
    """``name1_name2_label`` as PostgreSQL makes a name it chooses (makeObjectName): within 63 bytes, the longer
    of the two names cut first, the label kept whole."""
    available = MAX_IDENTIFIER_BYTES - len(label.encode()) - 2
    first, second = len(name1.encode()), len(name2.encode())
    while first + second > available:
        if first > second:
            first -= 1
        else:
            second -= 1
    cut = [name.encode()[:size].decode(errors="ignore") for name, size in ((name1, first), (name2, second))]
    return f"{cut[0]}_{cut[1]}_{label}"


def default_names(table: str, columns: list[str] | tuple[str, ...]) -> dict[str, str]:
    """What a key's names are when its declaration leaves them out: the constraint PostgreSQL itself names
    ``<table>_<columns>_fkey`` (so an ``ADD FOREIGN KEY`` without a name and this key are the same), the index
    ``<table>_<columns>_idx`` as CREATE INDEX names one, the audit table ``<table>_<columns>_audit``."""
    # ChooseForeignKeyConstraintNameAddition: the column names joined by _, no longer than a name may be.
    joined = "_".join(columns).encode()[:MAX_IDENTIFIER_BYTES].decode(errors="ignore")
    return {
        "constraint": postgres_object_name(table, joined, "fkey"),
        "index": postgres_object_name(table, joined, "idx"),
        "audit_table": postgres_object_name(table, joined, "audit"),
    }


def audit_column_names(base: str, count: int) -> tuple[str, ...]:
    return tuple(base if i == 1 else f"{base}_{i}" for i in range(1, count + 1))


@dataclass(frozen=True)
class ForeignKeySpec:
    """A foreign key ``schema.table(columns) -> ref_schema.ref_table(ref_columns)`` and its supporting index.

    ``columns`` and ``ref_columns`` pair up in order; a name or a list of names is accepted and kept as a tuple.
    ``row_key`` identifies a child row (its primary key, one or more columns); the audit table records it beside
    the old values of the key's columns. The audit table lives in ``audit_schema``, the pipeline's own, never in
    the app's ``schema``: the app's schema tool would see it there as drift and drop it. ``on_delete`` may name
    the columns it acts on (``SET NULL (parent_id)``, PostgreSQL 15+); they are kept in ``on_delete_columns``.
    """

    schema: str
    table: str
    columns: tuple[str, ...]
    ref_table: str
    ref_columns: tuple[str, ...]
    row_key: tuple[str, ...]
    constraint: str
    index: str
    audit_table: str
    on_delete: str = "SET NULL"
    audit_schema: str = "fk_maintenance"
    # The data's own rules for a self-referencing hierarchy, which a foreign key does not need: no cycle (a row
    # is not its own ancestor) and no chain deeper than the run's max_depth. Checked by preflight before any
    # change and again by post_checks; off unless declared.
    hierarchy_checks: bool = False
    ref_schema: str = ""  # empty: the child's own schema
    on_delete_columns: tuple[str, ...] = ()
    # Which of the key's columns nulling an orphan sets to NULL, where the ON DELETE action does not say
    # (catalog.nulled_columns): one NULL is enough for the key to stop checking a row.
    nullify_columns: tuple[str, ...] = ()
    # The declared orphan policy (ORPHAN_POLICIES); empty: decided by the key's nullability.
    orphans: str = ""
    # Where orphans: delete archives every row and pointer a delete takes along (in audit_schema).
    archive_table: str = ""
    # The rest of the key's definition, as the schema declares it: created exactly, compared on every part.
    on_update: str = "NO ACTION"
    # FULL: a key with some but not all columns NULL is a violation (an orphan), not a row the key ignores.
    match: str = "SIMPLE"
    deferrable: bool = False
    initially_deferred: bool = False
    # False: the declaration named no index, so one that already serves the key is used rather than a second built.
    index_declared: bool = True
    # False: the pipeline builds no index for the key (``index`` is then only the name one would have). A key
    # declared from the app's Drizzle snapshot gets one only where the snapshot declares it: drizzle-kit push
    # would drop an index the schema does not declare, as drift. Not a targets-file field of its own.
    build_index: bool = True

    def __post_init__(self) -> None:
        normalized = {name: _column_list(getattr(self, name)) for name in COLUMN_LIST_FIELDS}
        action, listed = parse_on_delete(self.on_delete) if isinstance(self.on_delete, str) else (self.on_delete, ())
        if listed:
            if normalized["on_delete_columns"] and normalized["on_delete_columns"] != listed:
                raise ValueError("foreign-key spec: on_delete lists columns, and on_delete_columns lists others")
            normalized["on_delete_columns"] = listed
        archive = self.archive_table or (
            f"{self.audit_table}{ARCHIVE_SUFFIX}" if isinstance(self.audit_table, str) else self.archive_table
        )
        derived = {
            "on_delete": action,
            "ref_schema": self.ref_schema or self.schema,
            "archive_table": archive,
            "on_update": _words(self.on_update),
            "match": _words(self.match),
        }
        for name, value in {**normalized, **derived}.items():
            object.__setattr__(self, name, value)
        problems = [problem for field in fields(self) for problem in self._field_problems(field.name)]
        problems += self._shape_problems()
        if problems:
            raise ValueError("foreign-key spec: " + "; ".join(problems))

    def _field_problems(self, name: str) -> list[str]:
        value = getattr(self, name)
        if name in ("hierarchy_checks", "build_index"):
            return [] if isinstance(value, bool) else [f"{name} must be true or false"]
        if name in ("on_delete", "on_update", "match"):
            return [] if isinstance(value, str) else [f"{name} must be a string"]
        if name in ("deferrable", "initially_deferred", "index_declared"):
            return [] if isinstance(value, bool) else [f"{name} must be true or false"]
        if name == "orphans":
            return (
                []
                if value in ("", *ORPHAN_POLICIES)
                else [
                    f"orphans {value!r} is not one of {list(ORPHAN_POLICIES)} (undeclared: nullify for a nullable "
                    "key, refuse for a NOT NULL one)"
                ]
            )
        names = value if name in COLUMN_LIST_FIELDS else (value,)
        if name in COLUMN_LIST_FIELDS[:3] and not names:
            return [f"{name} must name at least one column"]
        problems = []
        for item in names:
            if not isinstance(item, str) or not item:
                problems.append(f"{name} must be a non-empty string" + (" in each place" if len(names) > 1 else ""))
            elif len(item.encode()) > MAX_IDENTIFIER_BYTES:
                # PostgreSQL silently truncates longer names, which would make our catalog lookups miss.
                hint = (
                    f" (audit_table + {ARCHIVE_SUFFIX!r}): declare a shorter archive_table"
                    if name == "archive_table"
                    else ""
                )
                problems.append(f"{name} {item!r} is longer than 63 bytes{hint}")
            elif "\x00" in item:
                problems.append(f"{name} contains a NUL character")
        if name in COLUMN_LIST_FIELDS and len(set(names)) != len(names):
            problems.append(f"{name} {list(names)} names a column twice")
        return problems

    def _shape_problems(self) -> list[str]:
        problems = []
        if len(self.columns) != len(self.ref_columns):
            problems.append(
                f"columns {list(self.columns)} and ref_columns {list(self.ref_columns)} differ in length: the key "
                "pairs them up in order"
            )
        if self.audit_schema in (self.schema, self.ref_schema):
            which = "schema" if self.audit_schema == self.schema else "ref_schema"
            problems.append(
                f"audit_schema {self.audit_schema!r} is also the key's {which}, an app schema; the app's schema "
                "tool would drop the audit table there. Name an audit_schema of the pipeline's own that no key's "
                "tables live in"
            )
        if self.hierarchy_checks and not self.self_referential:
            problems.append(
                f"hierarchy_checks needs a self-referencing key, and {self.schema}.{self.table} references "
                f"{self.ref_schema}.{self.ref_table}"
            )
        if self.on_delete not in ON_DELETE_ACTIONS.values():
            problems.append(
                f"on_delete {self.on_delete!r} is not one of {sorted(ON_DELETE_ACTIONS.values())}, optionally with "
                "a column list for SET NULL / SET DEFAULT, e.g. 'SET NULL (parent_id)'"
            )
        problems += self._definition_problems()
        strangers = [name for name in self.nullify_columns if name not in self.columns]
        if strangers:
            problems.append(
                f"nullify_columns lists {strangers}, which are not among the key's columns {list(self.columns)}"
            )
        if self.nullify_columns and self.on_delete == "SET NULL":
            problems.append(
                "nullify_columns is for keys whose ON DELETE action nulls nothing; with SET NULL, declare the "
                f"columns in the action: on_delete: SET NULL ({', '.join(self.nullify_columns)})"
            )
        if self.on_delete_columns:
            if self.on_delete not in ACTIONS_WITH_COLUMNS:
                problems.append(f"ON DELETE {self.on_delete} takes no column list")
            strangers = [name for name in self.on_delete_columns if name not in self.columns]
            if strangers:
                problems.append(
                    f"on_delete lists {strangers}, which are not among the key's columns {list(self.columns)}"
                )
        return problems

    def _definition_problems(self) -> list[str]:
        """ON UPDATE, MATCH and deferrability: what PostgreSQL can create, and what this pipeline can keep."""
        problems = []
        if self.on_update not in ON_UPDATE_ACTIONS.values():
            problems.append(
                f"on_update {self.on_update!r} is not one of {sorted(ON_UPDATE_ACTIONS.values())} (ON UPDATE takes "
                "no column list)"
            )
        if self.match not in MATCH_TYPES.values():
            fix = " (PostgreSQL does not implement MATCH PARTIAL)" if self.match == "PARTIAL" else ""
            problems.append(f"match {self.match!r} is not one of {sorted(MATCH_TYPES.values())}{fix}")
        if self.initially_deferred and not self.deferrable:
            problems.append("initially_deferred needs deferrable: a key checked at commit must be deferrable")
        if self.match == "FULL" and len(self.columns) > 1 and (self.on_delete_columns or self.nullify_columns):
            # Under MATCH FULL a row passes only with every column NULL or none: nulling some of them makes it
            # a violation, so an action or a nulling that lists columns could never leave a valid row.
            problems.append(
                "MATCH FULL passes a row only when every column of the key is NULL or none is: declare no column "
                "list (on_delete: SET NULL, nullify_columns) for it"
            )
        return problems

    @property
    def self_referential(self) -> bool:
        """A hierarchy (a row points at a row of its own table): then cycles and depth are checked too."""
        return (self.schema, self.table) == (self.ref_schema, self.ref_table)

    @property
    def on_delete_code(self) -> str:
        return next(code for code, words in ON_DELETE_ACTIONS.items() if words == self.on_delete)

    @property
    def on_update_code(self) -> str:
        return next(code for code, words in ON_UPDATE_ACTIONS.items() if words == self.on_update)

    @property
    def match_code(self) -> str:
        return next(code for code, words in MATCH_TYPES.items() if words == self.match)

    @property
    def deferrability_sql(self) -> str:
        if not self.deferrable:
            return "NOT DEFERRABLE"
        return "DEFERRABLE INITIALLY " + ("DEFERRED" if self.initially_deferred else "IMMEDIATE")

    @property
    def definition_sql(self) -> str:
        """Everything after REFERENCES, as pg_get_constraintdef prints it (defaults left out), for messages."""
        parts = [f"MATCH {self.match}"] if self.match != "SIMPLE" else []
        if self.on_update != "NO ACTION":
            parts.append(f"ON UPDATE {self.on_update}")
        parts.append(f"ON DELETE {self.on_delete_sql}")
        if self.deferrable:
            parts.append(self.deferrability_sql)
        return " ".join(parts)

    @property
    def on_delete_sql(self) -> str:
        """The action as declared, with its column list if any (for messages; the DDL composes its own)."""
        listed = f" ({', '.join(self.on_delete_columns)})" if self.on_delete_columns else ""
        return self.on_delete + listed

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        return tuple(zip(self.columns, self.ref_columns, strict=True))

    @property
    def audit_row_key_columns(self) -> tuple[str, ...]:
        return audit_column_names(AUDIT_ROW_KEY_COLUMN, len(self.row_key))

    @property
    def audit_pointer_columns(self) -> tuple[str, ...]:
        return audit_column_names(AUDIT_POINTER_COLUMN, len(self.columns))

    @property
    def advisory_lock_name(self) -> str:
        """Two runs serialise on this name, whichever Airflow deployment they come from."""
        return f"fk_maintenance:{self.schema}.{self.table}.{self.constraint}"

    @property
    def audit_qualified(self) -> str:
        return f"{self.audit_schema}.{self.audit_table}"

    @property
    def tables(self) -> tuple[tuple[str, str], ...]:
        """The (schema, table) pairs ADD FOREIGN KEY locks: the referencing and the referenced table."""
        return tuple(dict.fromkeys(((self.schema, self.table), (self.ref_schema, self.ref_table))))

    @property
    def tables_described(self) -> str:
        return " and ".join(f"{schema}.{table}" for schema, table in self.tables)

    @property
    def nulling_transactions_table(self) -> str:
        """The transactions that nulled each run's pointers, for all keys whose audit lives in ``audit_schema``:
        a restore puts a pointer back only where the row is still the version one of them wrote."""
        return "nulling_transactions"

    @property
    def restore_log_table(self) -> str:
        """Every pointer a restore run put back, for all keys whose audit lives in ``audit_schema``."""
        return "restore_log"

    @property
    def archive_qualified(self) -> str:
        return f"{self.audit_schema}.{self.archive_table}"

    @property
    def restore_log_qualified(self) -> str:
        return f"{self.audit_schema}.{self.restore_log_table}"

    @property
    def legacy_audit_qualified(self) -> str:
        """Where versions before the pipeline's own schema kept the audit table: beside the app's table."""
        return f"{self.schema}.{self.audit_table}"

    def describe(self) -> str:
        return (
            f"{self.schema}.{self.table}({', '.join(self.columns)}) -> "
            f"{self.ref_schema}.{self.ref_table}({', '.join(self.ref_columns)}) {self.definition_sql} as "
            f"{self.constraint}, " + (f"index {self.index}" if self.build_index else "no index of its own")
        )


def describe_columns(names: tuple[str, ...], table: str = "") -> str:
    """``parent_id`` (``goals.parent_id``) for one column, ``(tenant_id, parent_id)`` (``goals (tenant_id,
    parent_id)``) for more."""
    if len(names) == 1:
        return f"{table}.{names[0]}" if table else names[0]
    listed = f"({', '.join(names)})"
    return f"{table} {listed}" if table else listed


VISION_KPIS_PARENT_FK = ForeignKeySpec(
    schema="public",
    table="vision_kpis",
    columns=("parent_kpi_id",),
    ref_table="vision_kpis",
    ref_columns=("id",),
    row_key=("id",),
    constraint="vision_kpis_parent_kpi_id_fkey",
    index="vision_kpis_parent_kpi_idx",
    audit_table="vision_kpis_orphan_audit",
    hierarchy_checks=True,
)
