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

# libpq keywords an operator may put in the connection's extra; Airflow-only extras are not passed on.
LIBPQ_EXTRAS = frozenset(
    {
        "sslmode",
        "sslrootcert",
        "sslcert",
        "sslkey",
        "sslcrl",
        "sslpassword",
        "sslnegotiation",
        "connect_timeout",
        "options",
        "target_session_attrs",
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
        "tcp_user_timeout",
        "gssencmode",
        "krbsrvname",
        "channel_binding",
        "passfile",
        "host",
        "hostaddr",
        "requiressl",
        "service",
    }
)
# Steps whose failure no retry can fix: the operator has to act.
FINAL_ERRORS = (InvalidSettings, PreflightFailed, PostChecksFailed, StepOutOfOrder, WindowsExhausted)


def connection_kwargs(conn_id: str) -> tuple[dict[str, Any], str]:
    """libpq keywords for the Airflow connection, and a description of it without the password."""
    from airflow.sdk import BaseHook

    connection = BaseHook.get_connection(conn_id)
    kwargs: dict[str, Any] = {
        "host": connection.host or None,
        "port": connection.port or None,
        "user": connection.login or None,
        "password": connection.password or None,
        "dbname": connection.schema or None,
        "connect_timeout": 10,
        "keepalives": 1,
        "keepalives_idle": 30,
    }
    kwargs.update({k: v for k, v in connection.extra_dejson.items() if k in LIBPQ_EXTRAS})
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    host = kwargs.get("host", "local socket")
    where = f"{kwargs.get('user', '?')}@{host}:{kwargs.get('port', 5432)}/{kwargs.get('dbname', '?')}"
    return kwargs, where


def connector(conn_id: str) -> Callable[[], psycopg.Connection]:
    kwargs, where = connection_kwargs(conn_id)

    def connect() -> psycopg.Connection:
        try:
            return psycopg.connect(**kwargs, autocommit=True)
        except psycopg.OperationalError as exc:
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
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
