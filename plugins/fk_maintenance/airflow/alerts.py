"""Alerts: the Airflow notifiers a key's entry in the targets file names (SMTP, Slack, ... any ``BaseNotifier``,
configured by its own connection), called when a target of the key fails, and handed to an approval task when one
waits for a person.

    notifiers:
      on_failure:
        - class: airflow.providers.smtp.notifications.smtp.SmtpNotifier
          args: {to: [oncall@example.com], from_email: airflow@example.com, smtp_conn_id: smtp_alerts}
      on_approval_waiting: []   # same form; for the approval task (Airflow's HITL operators take ``notifiers``)

Each notifier is imported and built when the DAG file is parsed, so a misspelt class or a bad argument is an
import error naming the entry, not an alert that silently never comes. A failure alert knows the DAG, the target
(connection id), its final state and its error: templates see them as ``fk_alert`` (``fk_alert.subject``,
``fk_alert.text``, ...), and a notifier's message arguments the entry leaves out (SMTP's ``subject`` and
``html_content``, Slack's ``text``) default to them.
"""

from __future__ import annotations

import copy
import html
import importlib
import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any

from fk_maintenance.airflow.fleet import TARGET_REPORT_KEY
from fk_maintenance.errors import MaintenanceError
from fk_maintenance.keys.targets import NotifierSpec, Target

log = logging.getLogger(__name__)

ALERT_CONTEXT_KEY = "fk_alert"
# Message arguments of well-known notifiers, filled from the alert unless the targets file sets them.
DEFAULT_MESSAGE_ARGS = {
    "subject": "{{ fk_alert.subject }}",  # SMTP
    "html_content": "{{ fk_alert.html }}",  # SMTP
    "text": "{{ fk_alert.text }}",  # Slack (webhook and API)
}


class NotifierInvalid(MaintenanceError):
    """A notifier named in the targets file cannot be imported or built."""


def build_notifier(spec: NotifierSpec, *, with_defaults: bool) -> Any:
    """The notifier the targets file names, built; ``with_defaults`` fills the message arguments it leaves out
    with the failure alert's (DEFAULT_MESSAGE_ARGS)."""
    from airflow.sdk import BaseNotifier

    module, _, name = spec.class_path.rpartition(".")
    try:
        notifier_class = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise NotifierInvalid(f"notifier {spec.class_path!r} cannot be imported: {exc}") from None
    if not (isinstance(notifier_class, type) and issubclass(notifier_class, BaseNotifier)):
        raise NotifierInvalid(f"{spec.class_path!r} is not an Airflow notifier (a BaseNotifier subclass)")
    accepted = inspect.signature(notifier_class.__init__).parameters
    defaults = {k: v for k, v in DEFAULT_MESSAGE_ARGS.items() if k in accepted} if with_defaults else {}
    try:
        return notifier_class(**{**defaults, **spec.args})
    except Exception as exc:
        raise NotifierInvalid(f"notifier {spec.class_path!r} refuses its args: {exc}") from None


def failure_callback(target: Target) -> FailureAlert | None:
    """The on_failure_callback of the key's target reports and plan (None when the file names no notifier)."""
    specs = target.notifiers.get("on_failure") or ()
    return FailureAlert([_built(target, spec, with_defaults=True) for spec in specs]) if specs else None


def approval_waiting_notifiers(target: Target) -> list[Any]:
    """The notifiers for an approval task of the key (Airflow's HITL operators' ``notifiers`` argument), called
    when the approval starts waiting for a person."""
    return [_built(target, spec, with_defaults=False) for spec in target.notifiers.get("on_approval_waiting") or ()]


def _built(target: Target, spec: NotifierSpec, *, with_defaults: bool) -> Any:
    try:
        return build_notifier(spec, with_defaults=with_defaults)
    except NotifierInvalid as exc:
        raise NotifierInvalid(f"foreign key {target.name!r}: {exc}") from None


class FailureAlert:
    """A task's on_failure_callback: the alert for the failed target, then every notifier of the key with it."""

    def __init__(self, notifiers: list[Callable[[Any], None]]) -> None:
        self.notifiers = notifiers

    def __call__(self, context: Mapping[str, Any]) -> None:
        alert = failure_alert(context)
        log.info("alerting %d notifier(s): %s", len(self.notifiers), alert["subject"])
        for notifier in self.notifiers:
            try:
                # A notifier renders its templates into itself: each alert gets a fresh copy, or a second failed
                # target in the same process (airflow dags test) would be sent the first one's message.
                copy.deepcopy(notifier)({**context, ALERT_CONTEXT_KEY: alert})
            except Exception:  # one broken channel must not silence the others
                log.exception("notifier %s failed", type(notifier).__name__)


def failure_alert(context: Mapping[str, Any]) -> dict[str, str]:
    """What a failure alert says: the DAG, the run, the target and its error (from the target's line of the fleet
    report when its report task failed, else from the exception)."""
    ti = context["ti"]
    line = None
    try:
        map_indexes = ti.map_index if ti.map_index >= 0 else None
        line = ti.xcom_pull(task_ids=ti.task_id, key=TARGET_REPORT_KEY, map_indexes=map_indexes)
    except Exception:  # the alert goes out with what the exception says
        log.warning("could not read %s of %s", TARGET_REPORT_KEY, ti.task_id, exc_info=True)
    exception = context.get("exception")
    if isinstance(line, dict):
        target, state, error = line["conn_id"], line["final_state"], line.get("error") or str(exception or "")
    else:
        target, state, error = "(the whole run)", f"{ti.task_id} failed", str(exception or "see the task log")
    subject = f"[{ti.dag_id}] {target}: {state}"
    text = f"DAG {ti.dag_id}, run {context.get('run_id')}\nTarget {target}: {state}\nError: {error}"
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{html.escape(str(value))}</td></tr>"
        for name, value in (
            ("DAG", ti.dag_id),
            ("Run", context.get("run_id")),
            ("Target", target),
            ("State", state),
            ("Error", error),
            ("Task", ti.task_id),
        )
    )
    return {
        "dag_id": ti.dag_id,
        "run_id": str(context.get("run_id")),
        "target": target,
        "state": state,
        "error": error,
        "subject": subject,
        "text": text,
        "html": f"<table>{rows}</table>",
    }
