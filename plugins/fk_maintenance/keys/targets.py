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
from fk_maintenance.keys.settings import AIRFLOW_KEY, CONN_ID_SCHEMA
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
            "items": {
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
            },
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
    entries = document["foreign_keys"]
    default_approvers = _approvers(f"{path}: approvers", document.get("approvers"))
    duplicated = [name for name, count in Counter(e["name"] for e in entries).items() if count > 1]
    if duplicated:
        raise TargetsFileInvalid(f"{path}: the name(s) {', '.join(map(repr, duplicated))} are declared more than once")
    targets = []
    for number, entry in enumerate(entries):
        where = f"{path}: foreign_keys[{number}] ({entry['name']!r})"
        fields = _spec_fields(entry, where)
        conn_ids = entry.get("conn_ids") or document.get("conn_ids")
        if not conn_ids:
            raise TargetsFileInvalid(
                f"{where}: no conn_ids: name the key's connections, or the file's (conn_ids: [...])"
            )
        try:
            spec = ForeignKeySpec(**fields)
        except ValueError as exc:
            raise TargetsFileInvalid(f"{where}: {exc}") from None
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
        targets.append(Target(entry["name"], spec, tuple(conn_ids), notifiers, settings, approvers))
    _refuse_shared_objects(path, targets)
    return tuple(targets)


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
            ("index", spec.schema, spec.index),
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


def _describe(error: jsonschema.ValidationError, document: Any) -> str:
    where = "the file"
    path = list(error.path)
    if len(path) >= 2 and path[0] == "foreign_keys" and isinstance(path[1], int):
        entry = document["foreign_keys"][path[1]]
        name = entry.get("name") if isinstance(entry, dict) else None
        where = f"foreign_keys[{path[1]}]" + (f" ({name!r})" if name else "")
        path = path[2:]
    field = ".".join(map(str, path))
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
