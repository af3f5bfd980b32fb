"""The approval gate of a key declared ``orphans: delete``, on Airflow's own human-in-the-loop ApprovalOperator
(standard provider): above ``approve_deletes_above`` rows the target waits for a person's answer in the UI
(Browse > Required Actions, or the task's Required Action tab) or through the REST API, holding no worker or
pool slot (Airflow 3.3 parks the task in ``awaiting_input``); at or below it the gate passes at once and asks
nobody (fk_maintenance.records.approval decides and words the request).

Approve: the delete step runs. Reject: the gate fails (no retry: a retry would ask again) naming who rejected,
and the delete step never runs. No answer within ``approval_timeout_minutes``: the same, saying so.

Who may answer: the key's ``approvers`` (the request's ``assigned_users``, which Airflow's API checks before it
accepts an answer, from the UI or REST), else anyone who may act on the DAG. Four eyes: the user who triggered the
run (``DagRun.triggering_user_name``) is left out of ``assigned_users``, and an approval by them anyway (no
approvers declared, so Airflow lets anyone answer) fails the gate: nothing is deleted.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from airflow.providers.standard.exceptions import HITLTimeoutError
from airflow.providers.standard.operators.hitl import ApprovalOperator, HITLOperator
from airflow.sdk.exceptions import AirflowFailException

from fk_maintenance.keys.spec import ForeignKeySpec
from fk_maintenance.keys.targets import Approver
from fk_maintenance.records.approval import (
    answerable_by,
    approval_body,
    approval_needed,
    approval_subject,
    own_approval,
)


class DeleteApproval(ApprovalOperator):
    """``found``: detect_orphans' result (an XComArg, resolved per mapped target); ``threshold`` and
    ``timeout_minutes``: the run's settings (templated from the form's params)."""

    template_fields = (
        *ApprovalOperator.template_fields,
        "found",
        "threshold",
        "timeout_minutes",
        "conn_id",
        "dry_run",
    )

    def __init__(
        self,
        *,
        spec: ForeignKeySpec,
        restore_dag: str,
        found: Any,
        conn_id: Any,
        approvers: Sequence[Approver] = (),
        threshold: Any = "{{ params.approve_deletes_above }}",
        timeout_minutes: Any = "{{ params.approval_timeout_minutes }}",
        dry_run: Any = "{{ params.dry_run }}",
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("retries", 0)  # a retry would ask again; the DAG's default_args retry 3 times
        # Every declared approver here (what the DAG shows); execute leaves out the run's trigger user.
        super().__init__(
            subject=f"Approve the delete of {spec.constraint}'s orphans",
            assigned_users=[approver.as_hitl_user() for approver in approvers] or None,
            **kwargs,
        )
        self.approvers = tuple(approvers)
        self.spec = spec
        self.restore_dag = restore_dag
        self.found = found
        self.conn_id = conn_id
        self.threshold = threshold
        self.timeout_minutes = timeout_minutes
        self.dry_run = dry_run

    def _fail(self, why: str) -> None:
        """Fail without retries (a retry would ask again), the reason left where the target's report reads a
        failed task's error."""

        from fk_maintenance.airflow.tasks import ERROR_KEY  # here, not at parse time: it imports psycopg

        message = f"{self.task_id}: {why}"
        context = getattr(self, "_context", None)
        if context is not None:
            context["ti"].xcom_push(key=ERROR_KEY, value=message)
        raise AirflowFailException(message)

    @staticmethod
    def _triggered_by(context: Any) -> str | None:
        """The user who triggered the run, as Airflow recorded it (None: a scheduled or asset-triggered run)."""
        return getattr(context["dag_run"], "triggering_user_name", None) or None

    def execute(self, context: Any) -> Any:
        self._context = context
        threshold = int(self.threshold)
        rows = int(self.found.get("blast_radius_rows") or 0)
        if str(self.dry_run).lower() == "true":  # a dry run deletes nothing: nothing to approve
            self.log.info("approve_deletes: dry run, nothing to approve")
            return {"approved": False, "asked": False, "dry_run": True, "orphans": 0, "blast_radius_rows": rows}
        if not approval_needed(self.found, threshold):
            self.log.info("approve_deletes: a delete of %d row(s) is within %d: no approval needed", rows, threshold)
            return {
                "approved": True,
                "asked": False,
                "orphans": int(self.found.get("orphans") or 0),
                "blast_radius_rows": rows,
                "approved_by": None,
            }
        triggered_by = self._triggered_by(context)
        answerable = answerable_by(self.approvers, triggered_by)
        if self.approvers and not answerable:
            # Assigned to nobody, Airflow would let anyone answer: refuse before asking instead.
            self._fail(
                f"the only approver(s) of this key ({', '.join(a.described() for a in self.approvers)}) triggered "
                "this run, and four eyes keep the one who triggered a delete from approving it: declare another "
                "approver in the targets file, or have someone else trigger the run; nothing was deleted"
            )
        self.assigned_users = [approver.as_hitl_user() for approver in answerable] or None
        self.subject = approval_subject(self.spec, self.conn_id, self.found)
        self.body = approval_body(
            self.spec,
            self.conn_id,
            self.found,
            threshold,
            restore_dag=self.restore_dag,
            approvers=answerable,
            triggered_by=triggered_by,
        )
        self.response_timeout = timedelta(minutes=int(self.timeout_minutes))
        self.log.info("approve_deletes: %s; waiting for a person's answer", self.subject)
        return super().execute(context)  # writes the request and parks the task until someone answers

    def process_trigger_event_error(self, event: dict[str, Any]) -> None:
        if event.get("error_type") == "timeout":
            self._fail(f"no answer within {self.timeout_minutes} min: nothing was deleted")
        super().process_trigger_event_error(event)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        self._context = context
        try:
            answer = HITLOperator.execute_complete(self, context=context, event=event)
        except HITLTimeoutError:
            self._fail(f"no answer within {self.timeout_minutes} min: nothing was deleted")
        user = answer.get("responded_by_user") or {}
        who = f"{user.get('name')} (id {user.get('id')})" if user else "nobody"
        if answer["chosen_options"] != [self.APPROVE]:
            self._fail(f"the delete was rejected by {who} at {answer['responded_at']}: nothing was deleted")
        triggered_by = self._triggered_by(context)
        if own_approval(user, triggered_by):
            # Airflow let them answer (no approvers declared: anyone may); the approval still needs a second person.
            self._fail(
                f"the delete was approved by {who}, who triggered this run: four eyes need another person's approval "
                "(trigger the run again, and have someone else approve it); nothing was deleted"
            )
        answerable = answerable_by(self.approvers, triggered_by)
        if self.approvers and str(user.get("id")) not in {approver.id for approver in answerable}:
            # Airflow refuses them unless its auth manager lets everyone answer (the simple auth manager's
            # all-admins mode, or a custom is_authorized_hitl_task): the declared list still decides.
            self._fail(
                f"the delete was approved by {who}, who is not among this run's approvers "
                f"({', '.join(a.described() for a in answerable)}): nothing was deleted"
            )
        self.log.info("approve_deletes: approved by %s", who)
        return {
            "approved": True,
            "asked": True,
            # null_orphans deletes no more than this (plus what would need no approval): run_task passes it on.
            "orphans": int(self.found.get("orphans") or 0),
            "blast_radius_rows": int(self.found.get("blast_radius_rows") or 0),
            "approved_by": user,
            "approved_at": str(answer["responded_at"]),
            "triggered_by": triggered_by,
            "assigned_to": [approver.as_hitl_user() for approver in answerable],
        }
