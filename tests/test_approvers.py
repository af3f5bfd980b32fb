"""Who may approve a delete, under the real scheduler (issue 31): one local Airflow (devkit.local_airflow: the
scheduler, the LocalExecutor, the simple auth manager) with three users beside the admin, and two keys declared
orphans: delete on databases of their own, one with approvers, one without. Answers go through the REST API the UI
itself calls (PATCH .../hitlDetails), as the user who gives them.

- Named approvers: bob triggers; the request is assigned to alice only (bob, the trigger user, is left out); the
  admin (no approver) and bob are refused by Airflow with 403 and nothing changes; alice's approval converges.
- Four eyes: on the key without approvers Airflow lets anyone answer; alice triggers and approves her own delete:
  the target fails naming why, and the database is as it was (catalog and data, db_state.snapshot).
- No way around the gate for the one who triggers: the form's approve_deletes_above above the key's is refused,
  and the request set to success by hand instead of answered deletes nothing.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from devkit.cluster import free_port
from devkit.db_state import orphan_count, snapshot
from devkit.local_airflow import LocalAirflow, local_airflow
from fk_maintenance.keys.targets import load_targets

REPO = Path(__file__).resolve().parents[1]
GATED, OPEN = "gated_posts_fk", "open_posts_fk"
# Posts whose account is gone (accounts 21-25), each with two comments (CASCADE). The key's index exists already,
# so a run's only possible change is the delete (and the key, after it): a snapshot shows whether anything changed.
SHOP = """
CREATE TABLE accounts (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE posts (id int PRIMARY KEY, account_id int NOT NULL, title text NOT NULL);
CREATE TABLE comments (id int PRIMARY KEY, post_id int NOT NULL REFERENCES posts ON DELETE CASCADE, body text);
CREATE INDEX {index} ON posts (account_id);
INSERT INTO accounts SELECT g, 'account ' || g FROM generate_series(1, 20) g;
INSERT INTO posts SELECT g, 1 + g % 25, 'post ' || g FROM generate_series(1, 100) g;
INSERT INTO comments SELECT g, 1 + g % 100, 'comment ' || g FROM generate_series(1, 200) g;
"""
KEY = """
  - name: {name}
    table: posts
    column: account_id
    ref_table: accounts
    ref_column: id
    on_delete: CASCADE
    orphans: delete
    approve_deletes_above: 10
    constraint: {name}_key
    index: {name}_idx
    audit_table: {name}_audit
    conn_ids: [{name}_db]
"""
TARGETS = "foreign_keys:" + KEY.format(name=GATED) + "    approvers: [alice, bob]\n" + KEY.format(name=OPEN)
USERS = {"alice": "user", "bob": "user", "carol": "op"}
ANSWER_AFTER_S = 10


class _Database:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.dsn, autocommit=True)


def _shops(server) -> dict[str, str]:
    databases = {}
    for name in (GATED, OPEN):
        database = server.create_database(name)
        with psycopg.connect(server.dsn(database), autocommit=True) as conn:
            conn.execute(SHOP.format(index=f"{name}_idx"))
        databases[f"{name}_db"] = database
    return databases


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("approver-targets") / "targets.yaml"
    path.write_text(TARGETS)
    return path


@pytest.fixture(scope="module")
def airflow(tmp_path_factory: pytest.TempPathFactory, targets: Path) -> Iterator[LocalAirflow]:
    with local_airflow(
        tmp_path_factory.mktemp("approver-airflow"),
        port=free_port(),
        rows=100,
        targets_file=targets,
        extra_databases=_shops,
        users=USERS,
    ) as running:
        yield running


def _quoted(run_id: str) -> str:
    return urllib.request.quote(run_id, safe="")


def _trigger(airflow: LocalAirflow, dag_id: str, user: str) -> str:
    # validate_now: the run must converge whatever the hour, not wait for the low-traffic window.
    run = airflow.api(
        f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": {"validate_now": True}}, user=user
    )
    assert run["triggering_user_name"] == user, run
    return run["dag_run_id"]


def _waiting_approval(airflow: LocalAirflow, dag_id: str, run_id: str, timeout: float = 360) -> dict:
    """The run's pending request, once it has waited a few seconds (an answer within seconds of the request can race
    Airflow 3.3.2's scheduler, see tests/test_ui.py). Deployed inside the window, a key's scheduled run
    starts at once and holds the DAG's one active run: any run but ours is failed while we wait."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in airflow.api(f"/api/v2/dags/{dag_id}/dagRuns?limit=100")["dag_runs"]:
            if run["dag_run_id"] != run_id and run["state"] not in ("success", "failed"):
                airflow.api(f"/api/v2/dags/{dag_id}/dagRuns/{_quoted(run['dag_run_id'])}", {"state": "failed"}, "PATCH")
        pending = airflow.api(f"/api/v2/dags/{dag_id}/dagRuns/{_quoted(run_id)}/hitlDetails?response_received=false")
        for detail in pending["hitl_details"]:
            if detail["task_instance"]["task_id"] == "canary.approve_deletes":
                # Until the scheduler has taken in that the parked task's process ended, an answer can race it; on a
                # loaded machine 3 s were seen not to be enough (tests/test_ui.py's wait).
                time.sleep(ANSWER_AFTER_S)
                return detail
        time.sleep(1)
    raise AssertionError(f"{dag_id} run {run_id} never waited for an approval within {timeout:.0f} s")


def _answer(airflow: LocalAirflow, dag_id: str, run_id: str, user: str, option: str = "Approve") -> dict:
    return airflow.api(
        f"/api/v2/dags/{dag_id}/dagRuns/{_quoted(run_id)}/taskInstances/canary.approve_deletes/-1/hitlDetails",
        {"chosen_options": [option], "params_input": {}},
        "PATCH",
        user=user,
    )


def _refused(airflow: LocalAirflow, dag_id: str, run_id: str, user: str) -> int:
    with pytest.raises(urllib.error.HTTPError) as refused:
        _answer(airflow, dag_id, run_id, user)
    return refused.value.code


def _finished(airflow: LocalAirflow, dag_id: str, run_id: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = airflow.api(f"/api/v2/dags/{dag_id}/dagRuns/{_quoted(run_id)}")
        if run["state"] in ("success", "failed"):
            return run
        time.sleep(2)
    raise AssertionError(f"{dag_id} run {run_id} did not finish within {timeout:.0f} s")


def _canary_line(airflow: LocalAirflow, dag_id: str, run_id: str) -> dict:
    return airflow.api(
        f"/api/v2/dags/{dag_id}/dagRuns/{_quoted(run_id)}/taskInstances/canary.report/xcomEntries/target_summary"
        "?map_index=-1&deserialize=true"
    )["value"]


def _spec(targets: Path, name: str):
    return next(target.spec for target in load_targets(targets) if target.name == name)


def test_only_a_named_approver_who_did_not_trigger_the_run_may_answer_and_their_approval_converges(
    airflow, targets
) -> None:
    shop, spec = _Database(airflow.extra_dsns[f"{GATED}_db"]), _spec(targets, GATED)
    before = snapshot(shop, spec)
    # Nor can the one who triggers lift the delete past the approvers: the form's threshold is capped at the key's.
    with pytest.raises(urllib.error.HTTPError) as lifted:
        airflow.api(f"/api/v2/dags/{GATED}/dagRuns", {"logical_date": None, "conf": {"approve_deletes_above": 11}})
    assert lifted.value.code == 400 and "approve_deletes_above" in lifted.value.read().decode()
    run_id = _trigger(airflow, GATED, "bob")
    asked = _waiting_approval(airflow, GATED, run_id)
    # bob is an approver, but triggered this run: the request is alice's alone, and says so.
    assert asked["assigned_users"] == [{"id": "alice", "name": "alice"}], asked
    assert "**Who may answer**: **alice** (the key's `approvers`)" in asked["body"]
    assert "**bob**, who triggered this run, may not approve it (four eyes)" in asked["body"]

    # Airflow refuses the admin (allowed everything else) and carol (may act on the DAG), and bob himself.
    for user in ("admin", "carol", "bob"):
        assert _refused(airflow, GATED, run_id, user) == 403, user
    assert snapshot(shop, spec) == before  # nothing deleted, nothing added while it waits
    pending = airflow.api(f"/api/v2/dags/{GATED}/dagRuns/{_quoted(run_id)}/hitlDetails?response_received=false")
    assert [d["task_instance"]["task_id"] for d in pending["hitl_details"]] == ["canary.approve_deletes"]

    assert _answer(airflow, GATED, run_id, "alice")["responded_by"] == {"id": "alice", "name": "alice"}
    run = _finished(airflow, GATED, run_id)
    line = _canary_line(airflow, GATED, run_id)
    assert run["state"] == "success" and line["final_state"] == "converged", line
    assert orphan_count(shop, spec) == 0
    with shop.connect() as conn:
        assert conn.execute("SELECT count(*) FROM posts").fetchone()[0] == 80
    approval = airflow.api(
        f"/api/v2/dags/{GATED}/dagRuns/{_quoted(run_id)}/taskInstances/canary.approve_deletes/xcomEntries/"
        "return_value?map_index=-1&deserialize=true"
    )["value"]
    assert approval["approved_by"] == {"id": "alice", "name": "alice"} and approval["triggered_by"] == "bob"
    assert approval["assigned_to"] == [{"id": "alice", "name": "alice"}]


def test_the_user_who_triggered_a_delete_cannot_approve_it_their_approval_fails_the_target_and_deletes_nothing(
    airflow, targets
) -> None:
    shop, spec = _Database(airflow.extra_dsns[f"{OPEN}_db"]), _spec(targets, OPEN)
    before = snapshot(shop, spec)
    run_id = _trigger(airflow, OPEN, "alice")
    asked = _waiting_approval(airflow, OPEN, run_id)
    # No approvers declared: assigned to nobody, so Airflow lets anyone who may act on the DAG answer, alice too.
    assert asked["assigned_users"] == [], asked
    assert "anyone who may act on this DAG in Airflow" in asked["body"]
    assert "**alice**, who triggered this run, may not approve it (four eyes)" in asked["body"]

    assert _answer(airflow, OPEN, run_id, "alice")["chosen_options"] == ["Approve"]  # Airflow takes it ...
    run = _finished(airflow, OPEN, run_id)
    line = _canary_line(airflow, OPEN, run_id)
    # ... and the gate refuses it: the target fails, and the delete step never ran.
    assert run["state"] == "failed" and line["final_state"] == "failed at approve_deletes", line
    assert (
        "approved by alice (id alice), who triggered this run: four eyes need another person's approval"
        in line["error"]
    ), line
    assert "nothing was deleted" in line["error"]
    assert snapshot(shop, spec) == before


def test_a_request_set_to_success_by_hand_instead_of_answered_deletes_nothing(airflow, targets) -> None:
    """Mark as success (the UI's, or the REST API's) on the waiting request is no approval: the delete step finds
    the gate left no decision and refuses."""
    shop, spec = _Database(airflow.extra_dsns[f"{OPEN}_db"]), _spec(targets, OPEN)
    before = snapshot(shop, spec)
    run_id = _trigger(airflow, OPEN, "bob")
    _waiting_approval(airflow, OPEN, run_id)
    airflow.api(
        f"/api/v2/dags/{OPEN}/dagRuns/{_quoted(run_id)}/taskInstances/canary.approve_deletes",
        {"new_state": "success"},
        "PATCH",
        user="bob",
    )
    run = _finished(airflow, OPEN, run_id)
    line = _canary_line(airflow, OPEN, run_id)
    assert run["state"] == "failed" and line["final_state"] == "failed at null_orphans", line
    assert "canary.approve_deletes succeeded without deciding (set to success by hand?)" in line["error"], line
    assert snapshot(shop, spec) == before
