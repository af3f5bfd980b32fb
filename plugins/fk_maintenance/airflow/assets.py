"""Airflow Asset events for converged targets: "this key now holds on this table", for the app's own DAGs to be
scheduled on.

Each key's DAG declares one asset alias (``<dag id>.converged``) on its report tasks; a target's report adds to it
one event for the target's table, in the postgres provider's URI form ``postgres://host:port/database/schema/table``
(built with the provider's ``create_asset``), with the run and its counts as the event's extra. A consumer
schedules on the table's asset, or on the alias to hear of every target of the key.

Standard library only at import: the DAG file imports the alias name at parse time.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote


def converged_alias(dag_id: str) -> str:
    """The asset alias a key's DAG declares: every converged target's table is added to it."""
    return f"{dag_id}.converged"


def asset_host(host: str | None) -> str:
    """The URI host of a connection's host. A Unix-socket directory (``/var/run/postgresql``) is percent-encoded so
    that it stays one URI host; no host at all is libpq's default, the local socket, named localhost."""
    return quote(host, safe="") if host else "localhost"


def converged_event_extra(report: dict[str, Any], *, dag_id: str, conn_id: str, constraint: str) -> dict[str, Any]:
    """The event's extra: which run converged which key on which connection, and what it changed."""
    return {
        "dag_id": dag_id,
        "run_id": report["run_id"],
        "conn_id": conn_id,
        "constraint": constraint,
        "final_state": report["final_state"],
        "orphans_found": report.get("orphans_found"),
        "nulled": report.get("nulled"),
        "audited": report.get("audited"),
    }
