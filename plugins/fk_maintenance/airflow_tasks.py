"""The Airflow side of each task: settings from the run's params, a connection from ``kpi_db``, the step,
and the step's outcome turned into Airflow's vocabulary (success, reschedule, retryable or final failure).

Airflow is imported inside the functions: the DAG file imports this module at parse time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import closing
from datetime import datetime
from typing import Any

import psycopg

from .errors import (
    InvalidSettings,
    PoolerNotSupported,
    PostChecksFailed,
    PreflightFailed,
    StepOutOfOrder,
    TargetUnreachable,
    WindowsExhausted,
)
from .settings import RunSettings
from .spec import ForeignKeySpec
from .steps import MONITOR_CONNECT, RUN_ID, RUN_STARTED_AT, STEP_BY_NAME, STEPS

log = logging.getLogger(__name__)

# What every target connection gets unless its extra says otherwise: a dead host fails in seconds, and a
# connection that goes quiet behind a firewall is noticed.
LIBPQ_DEFAULTS = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 30}
# Steps whose failure no retry can fix: the operator has to act.
FINAL_ERRORS = (
    InvalidSettings,
    PoolerNotSupported,
    PreflightFailed,
    PostChecksFailed,
    StepOutOfOrder,
    WindowsExhausted,
)


def connector(conn_id: str) -> Callable[[], psycopg.Connection]:
    """Connections to the target through the postgres provider's PostgresHook: IAM tokens (RDS/Aurora,
    Azure), every libpq keyword of the connection's extra (sslmode, sslrootcert, require_auth, options, ...).
    A connection that cannot be made is one line naming the Airflow connection, never its password."""
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    class TargetHook(PostgresHook):
        def _create_connection(self, conn_args: dict[str, Any]) -> Any:
            given = {key: value for key, value in conn_args.items() if value is not None}
            return super()._create_connection({**LIBPQ_DEFAULTS, **given, "autocommit": True})

    hook = TargetHook(postgres_conn_id=conn_id)

    def connect() -> psycopg.Connection:
        try:
            connection = hook.connection
            where = (
                f"{connection.login or '?'}@{connection.host or 'local socket'}:{connection.port or 5432}/"
                f"{connection.schema or '?'}"
            )
        except Exception as exc:  # a missing or malformed Airflow connection
            raise TargetUnreachable(f"Airflow connection '{conn_id}' cannot be read: {exc}") from None
        try:
            return hook.get_conn()  # type: ignore[return-value]
        except psycopg.Error as exc:
            text = str(exc).strip()
            reason = text.splitlines()[-1] if text else type(exc).__name__
            if connection.password:
                reason = reason.replace(connection.password, "***")
            raise TargetUnreachable(
                f"cannot connect to the target database (Airflow connection '{conn_id}', {where}): {reason}"
            ) from None

    return connect


def settings_from(context: dict[str, Any]) -> RunSettings:
    return RunSettings.from_params(dict(context["params"]))


def run_task(step_name: str, spec: ForeignKeySpec, conn_id: str, context: dict[str, Any]) -> dict[str, Any]:
    """Validate the settings, connect, run one step, and map its outcome to Airflow's semantics: a final
    error fails without retry, a "reschedule" outcome gives the worker slot back until ``retry_at``."""
    from airflow.sdk.exceptions import AirflowFailException, AirflowRescheduleException

    step = STEP_BY_NAME[step_name]
    try:
        settings = settings_from(context)  # bad form values stop here, before any connection
        connect = connector(conn_id)
        dag_run = context.get("dag_run")
        available = {
            RUN_ID: context.get("run_id"),
            RUN_STARTED_AT: dag_run and (dag_run.start_date or dag_run.run_after),
            MONITOR_CONNECT: connect,
        }
        with closing(connect()) as conn:
            result = step.load()(conn, spec, settings, **{name: available[name] for name in step.needs})
    except FINAL_ERRORS as exc:
        raise AirflowFailException(str(exc)) from exc
    if result.get("outcome") == "reschedule":
        raise AirflowRescheduleException(reschedule_date=datetime.fromisoformat(result["retry_at"]))
    return result


def run_report(spec: ForeignKeySpec, context: dict[str, Any]) -> dict[str, Any]:
    from airflow.sdk.exceptions import AirflowFailException

    from .report import build_report

    settings = settings_from(context)
    ti = context["ti"]
    results = {step.name: ti.xcom_pull(task_ids=step.name) for step in STEPS}
    report = build_report(spec, settings, context["run_id"], results)
    ti.xcom_push(key="report", value=report)
    if not report["succeeded"]:
        # The run's state follows its last task: a run whose steps failed must not end green.
        raise AirflowFailException(f"{report['final_state']}; see the report above and the failed task's log")
    return report
