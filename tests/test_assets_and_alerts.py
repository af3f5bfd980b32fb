"""What a fleet run tells the rest of the platform: an Asset event per converged target (for the app's own DAGs to
be scheduled on), and the key's failure notifiers, here Airflow's SMTP notifier mailing a real SMTP server the test
starts on loopback."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from urllib.parse import quote

import pytest
from psycopg.conninfo import conninfo_to_dict

from devkit.cluster import free_port
from fk_maintenance.keys.settings import SETTING_DEFS

REPO = Path(__file__).resolve().parents[1]
DAG_ID = "vision_kpis_parent_fk"
DEFAULTS = {d.name: d.default for d in SETTING_DEFS}
SMTP_CONN_ID = "fk_alerts_smtp"
ON_CALL = "oncall@example.test"


class Mailbox:
    """An SMTP server on loopback (aiosmtpd) keeping every message it receives."""

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller

        self.messages: list[Message] = []
        self.port = free_port()
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_DATA(self, server, session, envelope) -> str:  # aiosmtpd's name for the DATA handler
        message = message_from_bytes(envelope.original_content)
        message["X-Envelope-To"] = ", ".join(envelope.rcpt_tos)
        self.messages.append(message)
        return "250 OK"


@pytest.fixture
def mailbox(monkeypatch) -> Iterator[Mailbox]:
    box = Mailbox()
    box.controller.start()
    plain = {"disable_tls": True, "disable_ssl": True}
    smtp = {"conn_type": "smtp", "host": "127.0.0.1", "port": box.port, "extra": plain}
    monkeypatch.setenv(f"AIRFLOW_CONN_{SMTP_CONN_ID.upper()}", json.dumps(smtp))
    yield box
    box.controller.stop()


def _dag_with_notifiers(monkeypatch, tmp_path: Path):
    """The shipped key, with an SMTP notifier for its failures, parsed as Airflow parses the DAG file."""
    from airflow.dag_processing.dagbag import DagBag

    text = (REPO / "dags" / "targets.yaml").read_text() + (
        "    notifiers:\n"
        "      on_failure:\n"
        "        - class: airflow.providers.smtp.notifications.smtp.SmtpNotifier\n"
        f"          args: {{to: [{ON_CALL}], from_email: airflow@example.test, smtp_conn_id: {SMTP_CONN_ID}}}\n"
    )
    targets = tmp_path / "targets.yaml"
    targets.write_text(text)
    monkeypatch.setenv("FK_MAINTENANCE_TARGETS", str(targets))
    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert not bag.import_errors, bag.import_errors
    return bag.dags[DAG_ID]


def _body(message: Message) -> str:
    parts = message.walk() if message.is_multipart() else [message]
    return "".join(part.get_payload(decode=True).decode() for part in parts if part.get_content_maintype() == "text")


def test_each_converged_target_emits_an_asset_event_for_its_table_and_each_failed_one_mails_its_error(
    monkeypatch, tmp_path, fleet, spec, airflow_home, mailbox
) -> None:
    from airflow.sdk import Asset

    dag = _dag_with_notifiers(monkeypatch, tmp_path)
    conn_ids = [fleet.add("healthy"), fleet.add("conflict"), fleet.add("healthy", seed=2), fleet.add("cycle")]
    run = dag.test(run_conf={**DEFAULTS, "conn_ids": conn_ids, "validate_now": True})
    assert str(run.state) == "failed"

    with sqlite3.connect(airflow_home / "airflow.db") as meta:
        events = meta.execute(
            "SELECT a.uri, e.extra, e.source_task_id, e.source_map_index FROM asset_event e "
            "JOIN asset a ON a.id = e.asset_id WHERE e.source_dag_id = ? AND e.source_run_id = ? ORDER BY e.id",
            (DAG_ID, run.run_id),
        ).fetchall()
        aliased = meta.execute(
            "SELECT count(*) FROM asset_alias_asset_event x JOIN asset_alias al ON al.id = x.alias_id "
            "JOIN asset_event e ON e.id = x.event_id WHERE al.name = ? AND e.source_run_id = ?",
            (f"{DAG_ID}.converged", run.run_id),
        ).fetchone()[0]
    converged = [conn_ids[0], conn_ids[2]]
    expected_uris = []
    for conn_id in converged:
        params = conninfo_to_dict(fleet.databases[conn_id].dsn)
        host = quote(params["host"], safe="")
        expected_uris.append(f"postgres://{host}:{params.get('port') or 5432}/{params['dbname']}/public/vision_kpis")
    assert [uri for uri, *_ in events] == expected_uris  # one event per converged target, none for the failed one
    # A consumer DAG naming the table in the provider's form schedules on exactly this asset.
    assert [Asset(uri).uri for uri in expected_uris] == expected_uris
    assert aliased == 2
    for (_, extra, task_id, _map_index), conn_id in zip(events, converged, strict=True):
        extra = json.loads(extra)
        db = fleet.databases[conn_id]
        audited = db.scalar("SELECT count(*) FROM fk_maintenance.vision_kpis_orphan_audit")
        assert extra["run_id"] == run.run_id and extra["conn_id"] == conn_id and extra["dag_id"] == DAG_ID
        assert extra["final_state"] == "converged" and extra["constraint"] == spec.constraint
        assert extra["nulled"] == extra["audited"] == extra["orphans_found"] == audited > 0
        assert task_id in ("canary.report", "fleet.report")

    mails = {mail["Subject"]: mail for mail in mailbox.messages}  # one per failed target, each its own
    assert len(mailbox.messages) == 2 and len(mails) == 2
    for conn_id, error in ((conn_ids[1], "already exists with another definition"), (conn_ids[3], "no cycles")):
        (subject,) = [subject for subject in mails if conn_id in subject]
        mail, body = mails[subject], _body(mails[subject])
        assert ON_CALL in mail["X-Envelope-To"]
        assert DAG_ID in subject and "failed at preflight" in subject
        assert DAG_ID in body and conn_id in body and run.run_id in body
        assert error in body  # the error itself


def test_a_notifier_the_file_names_is_built_at_parse_time_so_a_misspelt_one_is_an_import_error(
    monkeypatch, tmp_path
) -> None:
    from airflow.dag_processing.dagbag import DagBag

    text = (REPO / "dags" / "targets.yaml").read_text() + (
        "    notifiers:\n      on_failure:\n        - class: airflow.providers.smtp.notifications.smtp.SmptNotifier\n"
    )
    targets = tmp_path / "targets.yaml"
    targets.write_text(text)
    monkeypatch.setenv("FK_MAINTENANCE_TARGETS", str(targets))
    bag = DagBag(dag_folder=str(REPO / "dags"))
    (error,) = bag.import_errors.values()
    assert "vision_kpis_parent_fk" in error and "SmptNotifier" in error and "cannot be imported" in error
    assert DAG_ID not in bag.dags
