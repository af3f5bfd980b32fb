"""Declared targets: the foreign keys a deployment maintains, in a YAML file beside the DAGs, validated against a
JSON schema when the DAG file is parsed (no database access). A bad file is one error naming the file and the
entry, so no DAG of that file runs half-configured.

Standard library, PyYAML and jsonschema only (all of them imported by Airflow itself).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from fk_maintenance.errors import MaintenanceError
from fk_maintenance.keys.drizzle import DrizzleSnapshotInvalid, snapshot_keys
from fk_maintenance.keys.settings import AIRFLOW_KEY, CONN_ID_SCHEMA, airflow_key_from
from fk_maintenance.keys.spec import (
    MATCH_TYPES,
    ON_DELETE_ACTIONS,
    ON_UPDATE_ACTIONS,
    ORPHAN_POLICIES,
    ForeignKeySpec,
    default_names,
)

_NAME = {"type": "string", "minLength": 1, "maxLength": 63}
ON_DELETE_PATTERN = (
    "(?i)^(" + "|".join(sorted(ON_DELETE_ACTIONS.values())) + r")(\s*\(\s*[^(),]+(\s*,\s*[^(),]+)*\s*\))?\s*$"
)
ON_UPDATE_PATTERN = "(?i)^(" + "|".join(sorted(ON_UPDATE_ACTIONS.values())).replace(" ", r"\s+") + r")\s*$"
# deferrable: false | true (initially immediate) | "initially deferred" (checked at COMMIT).
DEFERRED_SPELLINGS = ("initially deferred", "INITIALLY DEFERRED")
# A list's repeated name is the spec's to name (a schema's anyOf or uniqueItems message would not say which).
_NAMES = {"type": "array", "minItems": 1, "items": _NAME}
# Each of the key's column lists is spelled one way or the other in an entry: a name, or a list of names.
COLUMN_SPELLINGS = (("column", "columns"), ("ref_column", "ref_columns"))
# When a key's notifiers are called (fk_maintenance.airflow.alerts): a target failed, or an approval waits for a person.
NOTIFIER_EVENTS = ("on_failure", "on_approval_waiting")
_NOTIFIERS = {
    "type": "array",
    "items": {
        "type": "object",
        "additionalProperties": False,
        "required": ["class"],
        "properties": {
            # A dotted path to an Airflow notifier class, e.g. airflow.providers.smtp.notifications.smtp.SmtpNotifier
            "class": {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$"},
            "args": {"type": "object"},
        },
    },
}

# Who may answer a key's delete approval: Airflow user ids, as the auth manager's ``get_id()`` gives them (the
# simple auth manager's username, FAB's numeric id, Keycloak's subject), which is what Airflow compares with the
# human-in-the-loop request's ``assigned_users`` before it accepts an answer. A bare string is the id and the
# name shown; ``{id, name}`` shows another name beside an id that does not read as one (FAB, Keycloak).
_USER_ID = {"type": "string", "minLength": 1, "maxLength": 256, "pattern": r"^\S(.*\S)?$"}
_APPROVERS = {
    "type": "array",
    "minItems": 1,
    "items": {
        "oneOf": [
            _USER_ID,
            {
                "type": "object",
                "additionalProperties": False,
                "required": ["id", "name"],
                "properties": {"id": _USER_ID, "name": _USER_ID},
            },
        ]
    },
}

_KEY_ENTRY: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    # The key's columns: column / ref_column (one each), or columns / ref_columns (lists, in pairs).
    # constraint, index and audit_table default to names PostgreSQL would give (keys.spec.default_names),
    # conn_ids to the file's own.
    "required": ["name", "table", "ref_table"],
    "properties": {
        "name": {"type": "string", "pattern": AIRFLOW_KEY, "maxLength": 200},
        "schema": _NAME,
        "table": _NAME,
        "column": _NAME,
        "columns": _NAMES,
        "ref_schema": _NAME,
        "ref_table": _NAME,
        "ref_column": _NAME,
        "ref_columns": _NAMES,
        # A name or a list of names (a composite primary key).
        "row_key": {**_NAME, **_NAMES, "type": ["string", "array"]},
        # For an action that nulls nothing: which key columns nulling an orphan sets to NULL.
        "nullify_columns": _NAMES,
        # An action, optionally with the columns it acts on: "SET NULL (parent_id)" (PostgreSQL 15+).
        "on_delete": {"type": "string", "pattern": ON_DELETE_PATTERN},
        # The rest of the key's definition, as the app's schema declares it (defaults: NO ACTION,
        # SIMPLE, not deferrable): the key is created exactly so.
        "on_update": {"type": "string", "pattern": ON_UPDATE_PATTERN},
        "match": {"type": "string", "pattern": "(?i)^(SIMPLE|FULL)$"},
        "deferrable": {"enum": [False, True, *DEFERRED_SPELLINGS]},
        "constraint": _NAME,
        "index": _NAME,
        "audit_schema": _NAME,
        "audit_table": _NAME,
        "hierarchy_checks": {"type": "boolean"},
        # What a run does to orphans: nullify (a nullable key's default), delete (archived with
        # everything the database's keys take along), refuse (a NOT NULL key's default).
        "orphans": {"enum": list(ORPHAN_POLICIES)},
        "archive_table": _NAME,
        # This key's default for the form's approve_deletes_above (rows in a delete's blast radius).
        "approve_deletes_above": {"type": "integer", "minimum": 0},
        # Who may approve this key's deletes (orphans: delete only); without it, the file's approvers.
        "approvers": _APPROVERS,
        "conn_ids": {
            "type": "array",
            "minItems": 1,
            "uniqueItems": True,
            "items": CONN_ID_SCHEMA,
        },
        "notifiers": {
            "type": "object",
            "additionalProperties": False,
            "properties": dict.fromkeys(NOTIFIER_EVENTS, _NOTIFIERS),
        },
    },
}

# What a Drizzle entry may set for one of its keys: how the pipeline treats it (DAG id, connections, orphans, who
# approves, who hears of failures, where its record lives), never the key itself: that is schema.ts's to say.
OVERRIDE_FIELDS = (
    "name",
    "conn_ids",
    "orphans",
    "approve_deletes_above",
    "approvers",
    "notifiers",
    "row_key",
    "nullify_columns",
    "hierarchy_checks",
    "audit_schema",
    "audit_table",
    "archive_table",
)
# Every foreign key of the app's Drizzle snapshot (keys.drizzle), under drizzle-kit's names.
_DRIZZLE_ENTRY: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["drizzle"],
    "properties": {
        # drizzle-kit's `out` folder (the one holding meta/), relative to the targets file unless absolute.
        "drizzle": {"type": "string", "minLength": 1},
        "conn_ids": _KEY_ENTRY["properties"]["conn_ids"],
        # Per key, by its constraint name as the snapshot has it.
        "overrides": {
            "type": "object",
            "propertyNames": _NAME,
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "properties": {name: _KEY_ENTRY["properties"][name] for name in OVERRIDE_FIELDS},
            },
        },
    },
}

TARGETS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["foreign_keys"],
    "properties": {
        # The connections of every key that names none of its own.
        "conn_ids": {"type": "array", "minItems": 1, "uniqueItems": True, "items": CONN_ID_SCHEMA},
        # The deployment's approvers: every key declared orphans: delete without approvers of its own takes these.
        "approvers": _APPROVERS,
        "foreign_keys": {
            "type": "array",
            "minItems": 1,
            # An entry is one key, or (with drizzle:) every key of the app's Drizzle snapshot.
            "items": {"if": {"type": "object", "required": ["drizzle"]}, "then": _DRIZZLE_ENTRY, "else": _KEY_ENTRY},
        },
    },
}
_VALIDATOR = jsonschema.validators.validator_for(TARGETS_SCHEMA)(TARGETS_SCHEMA)


class TargetsFileInvalid(MaintenanceError):
    """The targets file does not parse, breaks the schema, or declares something the pipeline cannot do."""


@dataclass(frozen=True)
class NotifierSpec:
    """One Airflow notifier as the targets file names it: a dotted class path and its keyword arguments (built by
    fk_maintenance.airflow.alerts when the DAG file is parsed)."""

    class_path: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Approver:
    """One Airflow user who may answer a key's delete approval: ``id`` is what Airflow's auth manager checks,
    ``name`` what the request shows (the id again when the file gives only the id)."""

    id: str
    name: str

    def is_user(self, user: str | None) -> bool:
        """Whether ``user`` (a name or an id, as Airflow records the user who triggered a run) is this approver."""
        return user is not None and user in (self.id, self.name)

    def described(self) -> str:
        return self.id if self.name == self.id else f"{self.name} (id {self.id})"

    def as_hitl_user(self) -> dict[str, str]:
        """As Airflow's human-in-the-loop operators take it in ``assigned_users`` (HITLUser)."""
        return {"id": self.id, "name": self.name}


# An entry's fields that are not the key's (ForeignKeySpec's), and the run settings an entry may set a default of.
NOT_SPEC_FIELDS = ("name", "conn_ids", "notifiers", "approvers")
KEY_SETTINGS = ("approve_deletes_above",)


@dataclass(frozen=True)
class Target:
    """One declared foreign key: its DAG id, its spec, the Airflow connections it applies to, and the notifiers
    to call per event (``NOTIFIER_EVENTS``)."""

    name: str
    spec: ForeignKeySpec
    conn_ids: tuple[str, ...]
    notifiers: dict[str, tuple[NotifierSpec, ...]] = field(default_factory=dict)
    # Run settings this key declares its own defaults for (the form starts from them): approve_deletes_above.
    settings: dict[str, Any] = field(default_factory=dict)
    # Who may answer its delete approval (the entry's approvers, else the file's); empty: anyone who may act on the
    # DAG in Airflow, as Airflow's own rule for a request assigned to nobody.
    approvers: tuple[Approver, ...] = ()


def load_targets(path: Path) -> tuple[Target, ...]:
    """Every target of the file, or TargetsFileInvalid naming the file, the entry and what is wrong with it."""
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise TargetsFileInvalid(f"{path}: cannot be read as YAML: {exc}") from None
    errors = sorted(_VALIDATOR.iter_errors(document), key=lambda e: [str(p) for p in e.path])
    if errors:
        raise TargetsFileInvalid(f"{path}: " + "; ".join(_describe(error, document) for error in errors))
    declarations = _declarations(path, document["foreign_keys"])
    default_approvers = _approvers(f"{path}: approvers", document.get("approvers"))
    duplicated = [name for name, count in Counter(d.entry["name"] for d in declarations).items() if count > 1]
    if duplicated:
        derived = any(d.snapshot is not None and d.entry["name"] in duplicated for d in declarations)
        raise TargetsFileInvalid(
            f"{path}: the name(s) {', '.join(map(repr, duplicated))} are declared more than once"
            + (
                " (a Drizzle snapshot's key is named after its constraint: give it another in the drizzle entry's "
                "overrides: {<constraint>: {name: <dag id>}})"
                if derived
                else ""
            )
        )
    targets = [_target(declared, document, default_approvers) for declared in declarations]
    _refuse_two_declarations(declarations, targets)
    _refuse_shared_objects(path, targets)
    return tuple(targets)


@dataclass(frozen=True)
class _Declaration:
    """One key as an entry of the file's own fields, where it is declared (for messages) and, for a key of the
    app's Drizzle schema, the snapshot it comes from."""

    path: Path
    label: str  # foreign_keys[<n>] and the entry's name, or its drizzle folder and the key's constraint and table
    entry: dict[str, Any]
    snapshot: Path | None = None

    @property
    def where(self) -> str:
        return f"{self.path}: {self.label}"


def _declarations(path: Path, entries: list[dict[str, Any]]) -> list[_Declaration]:
    """Every key the file declares: its own entries, and each drizzle entry's keys, in the file's order."""
    declarations = []
    for number, entry in enumerate(entries):
        if "drizzle" in entry:
            declarations += _drizzle_declarations(path, f"foreign_keys[{number}]", entry)
        else:
            declarations.append(_Declaration(path, f"foreign_keys[{number}] ({entry['name']!r})", entry))
    return declarations


def _drizzle_declarations(path: Path, label: str, entry: dict[str, Any]) -> list[_Declaration]:
    """A drizzle entry's keys: every foreign key of the folder's latest snapshot, named after its constraint (a
    valid DAG id), with the entry's conn_ids and the key's overrides."""
    label += f" (drizzle: {entry['drizzle']})"
    where = f"{path}: {label}"
    try:
        snapshot, keys = snapshot_keys(path.parent / entry["drizzle"])
    except DrizzleSnapshotInvalid as exc:
        raise TargetsFileInvalid(f"{where}: {exc}") from None
    if not keys:
        raise TargetsFileInvalid(
            f"{where}: {snapshot} declares no foreign key: declare the app's keys in schema.ts (.references() or "
            "foreignKey()) and run `drizzle-kit generate`, or remove this entry"
        )
    overrides: dict[str, dict[str, Any]] = entry.get("overrides") or {}
    tables: dict[str, list[str]] = {}
    for key in keys:
        tables.setdefault(key.constraint, []).append(f"{key.schema}.{key.table}")
    unknown = [name for name in overrides if name not in tables]
    if unknown:
        raise TargetsFileInvalid(
            f"{where}: overrides name {', '.join(map(repr, unknown))}, and {snapshot} declares no key of that name "
            f"(its keys: {', '.join(sorted(tables))}): correct the name, or remove the override"
        )
    ambiguous = [f"{name} (of {', '.join(tables[name])})" for name in overrides if len(tables[name]) > 1]
    if ambiguous:
        raise TargetsFileInvalid(
            f"{where}: overrides name {'; '.join(ambiguous)}, a name keys of several tables have: give each its own "
            "in schema.ts (foreignKey({ name, ... }))"
        )
    declarations = []
    for key in keys:
        fields = {"name": airflow_key_from(key.constraint), **key.entry()}
        fields |= {"conn_ids": entry["conn_ids"]} if "conn_ids" in entry else {}
        fields |= overrides.get(key.constraint, {})
        if "row_key" not in fields:
            # The run tells the table's rows apart by its primary key (the audit's and the archive's row key).
            raise TargetsFileInvalid(
                f"{where}: {key.described}: {snapshot} declares no primary key of {key.table}, which the audit "
                f"needs to tell its rows apart: declare one in schema.ts, or a unique NOT NULL column list here: "
                f"overrides: {{{key.constraint}: {{row_key: [...]}}}}"
            )
        declarations.append(_Declaration(path, f"{label}: {key.described}", fields, snapshot))
    return declarations


def _target(declared: _Declaration, document: dict[str, Any], default_approvers: tuple[Approver, ...]) -> Target:
    where, entry = declared.where, declared.entry
    fields = _spec_fields(entry, where)
    conn_ids = entry.get("conn_ids") or document.get("conn_ids")
    if not conn_ids:
        raise TargetsFileInvalid(f"{where}: no conn_ids: name the key's connections, or the file's (conn_ids: [...])")
    try:
        spec = ForeignKeySpec(**fields)
    except ValueError as exc:
        # drizzle-kit's default names can pass 63 bytes; PostgreSQL would cut them, and push see drift for ever.
        fix = (
            " (a name from the Drizzle snapshot: name the key or index in schema.ts within 63 bytes, "
            "foreignKey({ name }) or index(name))"
            if declared.snapshot is not None and "longer than 63 bytes" in str(exc)
            else ""
        )
        raise TargetsFileInvalid(f"{where}: {exc}{fix}") from None
    notifiers = {
        event: tuple(NotifierSpec(n["class"], dict(n.get("args") or {})) for n in listed)
        for event, listed in (entry.get("notifiers") or {}).items()
    }
    settings = {name: entry[name] for name in KEY_SETTINGS if name in entry}
    if "approvers" in entry and spec.orphans != "delete":
        # Only a delete asks a person; approvers elsewhere would read as a safeguard the key does not have.
        raise TargetsFileInvalid(
            f"{where}: approvers name who may approve a delete, and only a key declared orphans: delete deletes "
            "(and asks): remove approvers, or declare orphans: delete"
        )
    approvers = _approvers(f"{where}: approvers", entry.get("approvers")) or default_approvers
    if spec.orphans != "delete":
        approvers = ()  # the file's approvers are for its delete keys; this key never asks
    return Target(entry["name"], spec, tuple(conn_ids), notifiers, settings, approvers)


def _refuse_two_declarations(declarations: list[_Declaration], targets: list[Target]) -> None:
    """A key of the app's Drizzle schema is declared there only: the same constraint of one table, or a key on the
    same columns to the same referenced columns under another name, declared again (in the file, by a second
    drizzle entry, or twice in schema.ts) would have two runs fight over one key, or land two equal keys."""
    seen: dict[tuple[Any, ...], _Declaration] = {}
    problems = []
    for declared, target in zip(declarations, targets, strict=True):
        s = target.spec
        identities = (
            (s.schema, s.table, s.constraint),
            (s.schema, s.table, s.columns, s.ref_schema, s.ref_table, s.ref_columns),
        )
        first = next((d for d in (seen.setdefault(i, declared) for i in identities) if d is not declared), None)
        if first is None or (first.snapshot is None and declared.snapshot is None):
            continue
        plain = first if first.snapshot is None else declared if declared.snapshot is None else None
        fix = (
            f"remove {plain.label} from the file: the Drizzle schema declares the key (its settings go in the "
            "drizzle entry's overrides)"
            if plain
            else "declare it once: one drizzle entry per folder, and one key on those columns in schema.ts"
        )
        problems.append(f"one key, {s.describe()}, is declared twice: {first.label}, and {declared.label}: {fix}")
    if problems:
        raise TargetsFileInvalid(f"{declarations[0].path}: " + "; ".join(problems))


def _spec_fields(entry: dict[str, Any], where: str) -> dict[str, Any]:
    """The key's own fields of an entry: one spelling of each column list, and the names left out filled with
    those PostgreSQL would give (``<table>_<columns>_fkey``, ``..._idx``; the audit table ``..._audit``)."""
    fields = {key: value for key, value in entry.items() if key not in (*NOT_SPEC_FIELDS, *KEY_SETTINGS)}
    spelling = []
    for one, many in COLUMN_SPELLINGS:
        given = [key for key in (one, many) if key in fields]
        if len(given) != 1:
            spelling.append(f"declare exactly one of {one!r} (a name) or {many!r} (a list), not {given or 'neither'}")
        elif one in fields:
            fields[many] = [fields.pop(one)]
    if spelling:
        raise TargetsFileInvalid(f"{where}: " + "; ".join(spelling))
    if fields.get("deferrable") in DEFERRED_SPELLINGS:
        fields["deferrable"], fields["initially_deferred"] = True, True
    fields.setdefault("schema", "public")
    same_table = (fields.get("ref_schema", fields["schema"]), fields["ref_table"]) == (
        fields["schema"],
        fields["table"],
    )
    fields.setdefault("row_key", fields["ref_columns"] if same_table else "id")
    fields["index_declared"] = "index" in fields
    for name, default in default_names(fields["table"], fields["columns"]).items():
        fields.setdefault(name, default)
    return fields


def _approvers(where: str, listed: list[Any] | None) -> tuple[Approver, ...]:
    """The approvers as the schema let them through (strings or {id, name}), or TargetsFileInvalid when one id
    is listed twice (Airflow would accept either entry; two names for one id is a typo to fix)."""
    approvers = tuple(
        Approver(item, item) if isinstance(item, str) else Approver(item["id"], item["name"]) for item in listed or ()
    )
    repeated = sorted(user_id for user_id, count in Counter(a.id for a in approvers).items() if count > 1)
    if repeated:
        raise TargetsFileInvalid(f"{where}: the user id(s) {', '.join(map(repr, repeated))} are listed more than once")
    return approvers


def _refuse_shared_objects(path: Path, targets: list[Target]) -> None:
    """Two keys must not share an audit table (the second's rows would overwrite the first's under the same
    run id, and restore and reports would mix them), nor an index or a constraint name on one table."""
    owners: dict[tuple[str, ...], list[str]] = {}
    for target in targets:
        spec = target.spec
        # The archive is used only by orphans: delete.
        archive = [("archive table", spec.audit_schema, spec.archive_table)] if spec.orphans == "delete" else []
        for what in (
            ("audit table", spec.audit_schema, spec.audit_table),
            *archive,
            # A key without an index of the pipeline's (keys.drizzle) does not take the name it shows.
            *([("index", spec.schema, spec.index)] if spec.build_index else []),
            ("constraint", spec.schema, spec.table, spec.constraint),
        ):
            owners.setdefault(what, []).append(target.name)
    shared = [
        f"{what[0]} {'.'.join(what[1:])} is declared by {', '.join(map(repr, names))}"
        for what, names in owners.items()
        if len(names) > 1
    ]
    if shared:
        raise TargetsFileInvalid(f"{path}: each key needs its own: " + "; ".join(shared))


def _located(error: jsonschema.ValidationError, document: Any) -> tuple[str, list[Any], bool]:
    """Where in the file an error is (the entry by its name or drizzle folder, a drizzle entry's override by its
    key), what is left of its path, and whether it is within an override."""
    path = list(error.path)
    if not (len(path) >= 2 and path[0] == "foreign_keys" and isinstance(path[1], int)):
        return "the file", path, False
    entry = document["foreign_keys"][path[1]]
    where, path = f"foreign_keys[{path[1]}]", path[2:]
    if isinstance(entry, dict) and "drizzle" in entry:
        where += f" (drizzle: {entry['drizzle']})"
        if len(path) >= 2 and path[0] == "overrides":
            return f"{where}: overrides: {path[1]}", path[2:], True
        return where, path, False
    name = entry.get("name") if isinstance(entry, dict) else None
    return where + (f" ({name!r})" if name else ""), path, False


def _describe(error: jsonschema.ValidationError, document: Any) -> str:
    where, path, in_override = _located(error, document)
    field = ".".join(map(str, path))
    if in_override and error.validator == "additionalProperties":
        # The key's own definition is schema.ts's: the snapshot is the one place it is declared.
        unknown = sorted(set(error.instance) - set(OVERRIDE_FIELDS))
        theirs = [name for name in unknown if name in _KEY_ENTRY["properties"]]
        return (
            f"{where}: {', '.join(map(repr, unknown))} cannot be overridden"
            + (
                f" ({', '.join(theirs)}: the key's own, as schema.ts declares it: change it there and run "
                "`drizzle-kit generate`)"
                if theirs
                else ""
            )
            + f"; an override may set {', '.join(OVERRIDE_FIELDS)}"
        )
    if error.validator == "pattern" and field == "on_delete":
        # The pattern would be the message; the choices are what the user needs.
        return (
            f"{where}: on_delete: {error.instance!r} is not one of {sorted(ON_DELETE_ACTIONS.values())}, optionally "
            "with a column list for SET NULL / SET DEFAULT, e.g. 'SET NULL (parent_id)'"
        )
    if error.validator == "pattern" and field == "on_update":
        return f"{where}: on_update: {error.instance!r} is not one of {sorted(ON_UPDATE_ACTIONS.values())}"
    if error.validator == "pattern" and field == "match":
        fix = " (PostgreSQL does not implement MATCH PARTIAL)" if str(error.instance).upper() == "PARTIAL" else ""
        return f"{where}: match: {error.instance!r} is not one of {sorted(MATCH_TYPES.values())}{fix}"
    if error.validator == "enum" and field == "deferrable":
        return f"{where}: deferrable: {error.instance!r} is not one of false, true or 'initially deferred'"
    if field == "approvers":
        return (
            f"{where}: approvers must be a non-empty list of Airflow user ids, e.g. approvers: [alice, bob], got "
            f"{error.instance!r} (to let anyone who may act on the DAG answer, leave approvers out)"
        )
    if len(path) == 2 and path[0] == "approvers":
        # oneOf's own message ("... is not valid under any of the given schemas") does not say what is wanted.
        return (
            f"{where}: approvers[{path[1]}]: {error.instance!r} is not an Airflow user id: write the id as the auth "
            "manager knows it (a string without surrounding spaces, e.g. alice), or {id: '7', name: alice} (both "
            "strings)"
        )
    if error.validator == "additionalProperties":
        known = set(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - known)
        return f"{where}: unknown key(s) {', '.join(map(repr, unknown))} (known: {', '.join(sorted(known))})"
    return f"{where}{': ' + field if field else ''}: {error.message}"
