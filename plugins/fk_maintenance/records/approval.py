"""A person's approval of a large delete (keys declared ``orphans: delete``): whether a target's planned delete
needs one, and what the person is shown. Airflow's human-in-the-loop operator asks (airflow.approval_gate); this
module decides and words it, without Airflow.

Standard library only: the DAG file imports this at parse time.
"""

from __future__ import annotations

from typing import Any

from fk_maintenance.keys.spec import ForeignKeySpec

# How many rows of the blast radius's sample the request shows.
SAMPLE_LINES = 10
# The gate's task, between detect_orphans and null_orphans, in the DAG of a key declared orphans: delete.
APPROVAL_TASK = "approve_deletes"
APPROVAL_DOC_MD = (
    "nothing: a key declared `orphans: delete` whose planned delete takes more than `approve_deletes_above` rows "
    "(detect_orphans' blast radius: orphans, the rows their cascade deletes, the pointers it nulls or resets) "
    "waits here for a person's Approve or Reject (Browse > Required Actions, or the REST API's hitlDetails), "
    "holding no worker or pool slot; at or below it, it passes at once. Reject, or no answer within "
    "`approval_timeout_minutes`: nothing is deleted and the target fails, naming who rejected it.\n\nLocks: none."
)


def approval_needed(found: dict[str, Any], threshold: int) -> bool:
    """``found``: detect_orphans' result. A delete whose blast radius (every row it deletes, nulls or resets) is
    above ``threshold`` rows needs a person's approval; a key that does not delete never does."""
    return found.get("policy") == "delete" and int(found.get("blast_radius_rows") or 0) > threshold


def approval_subject(spec: ForeignKeySpec, conn_id: str, found: dict[str, Any]) -> str:
    return (
        f"Delete {found['orphans']} orphan row(s) of {spec.schema}.{spec.table} on {conn_id}: "
        f"{found['blast_radius_rows']} row(s) in all"
    )


def approval_body(
    spec: ForeignKeySpec, conn_id: str, found: dict[str, Any], threshold: int, *, restore_dag: str
) -> str:
    """The request's text (Markdown): what the delete takes, per table, a sample, and what each answer does."""
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
    ]
    return "\n".join(lines)
