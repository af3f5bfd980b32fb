"""A person's approval of a large delete (keys declared ``orphans: delete``): whether a target's planned delete
needs one, and what the person is shown. Airflow's human-in-the-loop operator asks (airflow.approval_gate); this
module decides and words it, without Airflow.

Standard library and fk_maintenance.keys only: the DAG file imports this at parse time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fk_maintenance.keys.spec import ForeignKeySpec
from fk_maintenance.keys.targets import Approver

# How many rows of the blast radius's sample the request shows.
SAMPLE_LINES = 10
# The gate's task, between detect_orphans and null_orphans, in the DAG of a key declared orphans: delete.
APPROVAL_TASK = "approve_deletes"
APPROVAL_DOC_MD = (
    "nothing: a key declared `orphans: delete` whose planned delete takes more than `approve_deletes_above` rows "
    "(detect_orphans' blast radius: orphans, the rows their cascade deletes, the pointers it nulls or resets) "
    "waits here for a person's Approve or Reject (Browse > Required Actions, or the REST API's hitlDetails), "
    "holding no worker or pool slot; at or below it, it passes at once. Only the key's `approvers` (targets file) "
    "may answer, else anyone who may act on the DAG; never the user who triggered the run (four eyes: their "
    "approval fails the target). Reject, or no answer within `approval_timeout_minutes`: nothing is deleted and the "
    "target fails, naming who rejected it.\n\nLocks: none."
)


def approval_needed(found: dict[str, Any], threshold: int) -> bool:
    """``found``: detect_orphans' result. A delete whose blast radius (every row it deletes, nulls or resets) is
    above ``threshold`` rows needs a person's approval; a key that does not delete never does."""
    return found.get("policy") == "delete" and int(found.get("blast_radius_rows") or 0) > threshold


def answerable_by(approvers: Sequence[Approver], triggered_by: str | None) -> list[Approver]:
    """Who may answer a run's request: the declared approvers but the one who triggered the run (four eyes; a
    scheduled run has nobody to leave out). Empty with approvers declared: nobody may, and the gate fails
    without asking; empty without: Airflow lets anyone who may act on the DAG answer."""
    return [approver for approver in approvers if not approver.is_user(triggered_by)]


def own_approval(responder: dict[str, Any] | None, triggered_by: str | None) -> bool:
    """Whether the person who answered is the one who triggered the run. Airflow records the trigger by name
    (the auth manager's ``get_name()``) and the responder by id and name, so either of the responder's counts."""
    if not responder or triggered_by is None:
        return False
    return triggered_by in (responder.get("id"), responder.get("name"))


def who_may_answer(approvers: Sequence[Approver], triggered_by: str | None) -> str:
    """The request's paragraph on who may answer (Markdown). ``approvers``: those this run's request is assigned
    to (answerable_by's); ``triggered_by``: the run's trigger user (None: a scheduled run)."""
    if approvers:
        names = ", ".join(f"**{approver.described()}**" for approver in approvers)
        who = f"**Who may answer**: {names} (the key's `approvers`); Airflow refuses anyone else's answer."
    else:
        who = (
            "**Who may answer**: anyone who may act on this DAG in Airflow: this key declares no `approvers` "
            "(targets file), which would name who may."
        )
    if triggered_by is None:
        return who + " No one triggered this run (scheduled, or started by an asset): no one is left out."
    return (
        f"{who} **{triggered_by}**, who triggered this run, may not approve it (four eyes): an approval by them fails "
        "this target and deletes nothing."
    )


def approvers_runbook(approvers: Sequence[Approver]) -> str:
    """The runbook's sentences on who may approve a delete of the key (Markdown), for any run."""
    if not approvers:
        return (
            "**Who may approve**: this key declares no `approvers`, so anyone who may act on this DAG in Airflow, "
            "except the user who triggered the run (four eyes): an approval by them fails the target with nothing "
            "deleted. Declare `approvers` (per key, or for the whole targets file) to name who may."
        )
    names = ", ".join(f"`{approver.described()}`" for approver in approvers)
    return (
        f"**Who may approve**: {names} (the key's `approvers`); Airflow refuses anyone else's answer. Never the user "
        "who triggered the run (four eyes): the request leaves them out (when they are the only approver, the "
        "target fails at once, nothing deleted); a scheduled run has no trigger user, so any approver may answer."
    )


def approval_subject(spec: ForeignKeySpec, conn_id: str, found: dict[str, Any]) -> str:
    return (
        f"Delete {found['orphans']} orphan row(s) of {spec.schema}.{spec.table} on {conn_id}: "
        f"{found['blast_radius_rows']} row(s) in all"
    )


def approval_body(
    spec: ForeignKeySpec,
    conn_id: str,
    found: dict[str, Any],
    threshold: int,
    *,
    restore_dag: str,
    approvers: Sequence[Approver] = (),
    triggered_by: str | None = None,
) -> str:
    """The request's text (Markdown): what the delete takes, per table, a sample, what each answer does, and who
    may give it."""
    per_table = found.get("blast_radius") or {}
    sample = (found.get("blast_radius_sample") or [])[:SAMPLE_LINES]
    lines = [
        f"`{spec.constraint}` ({spec.describe()}) is declared `orphans: delete`. On **{conn_id}**, "
        f"{found['orphans']} row(s) of `{spec.schema}.{spec.table}` point at a missing parent; deleting them takes "
        f"**{found['blast_radius_rows']} row(s)** in all through the database's own foreign keys, above "
        f"`approve_deletes_above` ({threshold}).",
        "",
        "| table | rows deleted | pointers nulled | values reset |",
        "| --- | ---: | ---: | ---: |",
        *(
            f"| `{table}` | {counts.get('deleted', 0)} | {counts.get('nulled', 0)} | {counts.get('reset', 0)} |"
            for table, counts in per_table.items()
        ),
        "",
        f"Sample ({len(sample)} of {found['blast_radius_rows']}):",
        "",
        *(f"- `{line}`" for line in sample),
        "",
        f"**Approve**: the rows are deleted in batches, every one archived first in `{spec.audit_schema}` (the "
        f"restore DAG `{restore_dag}` puts them back). **Reject**, or no answer in time: nothing is deleted "
        "and this target ends failed, naming who rejected it.",
        "",
        who_may_answer(approvers, triggered_by),
    ]
    return "\n".join(lines)
