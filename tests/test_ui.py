"""The trigger form in a real browser: a local Airflow (devkit.local_airflow: the real scheduler, the
LocalExecutor, the project's pool), headless Debian chromium driven by Playwright (executable_path, no browser
download). A dry run triggered from the form and its report read in the UI; a value the form must refuse
creates no run; a fleet run from the form's fleet fields, watched from pg_stat_activity. Screenshots go to
.artifacts/screenshots/.

Locators name one element (a test id, a role, a line only that element has); where the UI legitimately shows a
thing twice the test says why. Every check of the page retries until the page shows it (``expect``), and nothing
waits a fixed time."""

from __future__ import annotations

import re
import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from playwright.sync_api import expect
from psycopg.conninfo import conninfo_to_dict

from devkit.cluster import free_port
from devkit.db_state import SessionWatch, revive_parent
from devkit.local_airflow import LocalAirflow, local_airflow

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / ".artifacts" / "screenshots"
DAG_ID = "vision_kpis_parent_fk"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(autouse=True)
def chromium_installed() -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: scripts/system-deps.sh installs Debian's chromium when run as root")


# A key declared orphans: delete beside the shipped one, on three small databases of its own: posts whose account
# is gone, each with two comments (CASCADE) and a pin (SET NULL).
DELETE_DAG = "posts_account_fk"
REQUESTER = "requester"
SHOPS = ("shop_a", "shop_b", "shop_c")
SHOP_SCHEMA = """
CREATE TABLE accounts (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE posts (id int PRIMARY KEY, account_id int NOT NULL, title text NOT NULL);
CREATE TABLE comments (id int PRIMARY KEY, post_id int NOT NULL REFERENCES posts ON DELETE CASCADE, body text);
CREATE TABLE pins (id int PRIMARY KEY, post_id int REFERENCES posts ON DELETE SET NULL);
INSERT INTO accounts SELECT g, 'account ' || g FROM generate_series(1, 20) g;
INSERT INTO posts SELECT g, 1 + g % 25, 'post ' || g FROM generate_series(1, 100) g;  -- accounts 21-25: gone
INSERT INTO comments SELECT g, 1 + g % 100, 'comment ' || g FROM generate_series(1, 200) g;
INSERT INTO pins SELECT g, g FROM generate_series(1, 100) g;
"""
DELETE_KEY = f"""
  - name: {DELETE_DAG}
    table: posts
    column: account_id
    ref_table: accounts
    ref_column: id
    on_delete: CASCADE
    orphans: delete
    approve_deletes_above: 10
    constraint: posts_account_id_fkey
    index: posts_account_id_idx
    audit_table: posts_orphan_audit
    conn_ids: [{", ".join(SHOPS)}]
"""


def _shop_databases(server) -> dict[str, str]:
    databases = {}
    for conn_id in SHOPS:
        name = server.create_database(conn_id)
        with psycopg.connect(server.dsn(name), autocommit=True) as conn:
            conn.execute(SHOP_SCHEMA)
        databases[conn_id] = name
    return databases


@pytest.fixture(scope="module")
def airflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalAirflow]:
    targets = tmp_path_factory.mktemp("ui-targets") / "targets.yaml"
    targets.write_text((REPO / "dags" / "targets.yaml").read_text() + DELETE_KEY)
    with local_airflow(
        tmp_path_factory.mktemp("ui-airflow"),
        port=free_port(),
        rows=5000,
        fleet=4,
        targets_file=targets,
        extra_databases=_shop_databases,
        # Four eyes (issue 31): the deletes the admin approves are triggered by someone else.
        users={REQUESTER: "user"},
    ) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, airflow):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    expect.set_options(timeout=30_000)  # expect's own default is 5 s: too short for a page that loads under load
    page.goto(airflow.url)
    page.fill("input[name=username]", airflow.user)
    page.fill("input[name=password]", airflow.password)
    page.keyboard.press("Enter")
    page.wait_for_url(lambda url: "login" not in url)
    yield page
    context.close()


def _manual_runs(airflow: LocalAirflow, dag_id: str = DAG_ID) -> list[dict]:
    runs = airflow.api(f"/api/v2/dags/{dag_id}/dagRuns?limit=100")["dag_runs"]
    return [run for run in runs if run["run_type"] == "manual"]


def _open_trigger_form(page, airflow: LocalAirflow, dag_id: str = DAG_ID):
    page.goto(f"{airflow.url}/dags/{dag_id}")
    page.get_by_test_id("trigger-dag-button").click()
    dialog = page.locator("[role=dialog][data-state=open]")
    _section_trigger(dialog, "What this run does").wait_for()
    return dialog


def _section_trigger(dialog, title: str):
    # (filter's inner locator is matched inside each trigger: it is built from the page, not the dialog)
    return dialog.locator("[data-scope=accordion][data-part=item-trigger]").filter(
        has=dialog.page.get_by_text(title, exact=True)
    )


def _open_section(dialog, title: str) -> None:
    """The form shows one section of params at a time (an accordion, as the DAG's sections define)."""
    trigger = _section_trigger(dialog, title)
    trigger.click()
    expect(trigger).to_have_attribute("aria-expanded", "true")


def _still(dialog) -> None:
    """Wait until the dialog's animations (an accordion section opening or closing) have run, for a picture."""
    dialog.evaluate(
        """dialog => Promise.all(dialog.getAnimations({subtree: true})
            .filter(animation => animation.effect && animation.effect.getTiming().iterations !== Infinity)
            .map(animation => animation.finished.catch(() => null))).then(() => null)"""
    )


def _is_trigger(request, dag_id: str = DAG_ID) -> bool:
    """The form's one request that would create a DAG run."""
    return request.method == "POST" and request.url.split("?")[0].endswith(f"/api/v2/dags/{dag_id}/dagRuns")


def _toast(page, title: str):
    """The toast titled ``title``, on the page as often as the page mounts a Toaster. Airflow's UI renders every
    toast once per mounted ``<Toaster />`` (all of them show the one shared toaster store): the app layout mounts
    one, and so does each data table, such as the DAG page's "Created Asset Event" list, there once the DAG has
    emitted an asset event (its scheduled run at deployment does, finishing at its own pace). So one toast is in
    the DOM once or twice, each copy with the toast's own element id (``toast:<n>``): a second toast has another.
    Waits for the toast, checks that every copy is of one toast, and returns its text."""
    copies = page.locator("[data-scope=toast][data-part=root]").filter(has=page.get_by_text(title, exact=True))
    expect(copies.first).to_be_visible()  # any copy: they are one toast (checked next)
    toasts = set(copies.evaluate_all("copies => copies.map(copy => copy.id)"))
    assert len(toasts) == 1, f"{len(toasts)} toasts titled {title!r}: {sorted(toasts)}"
    return copies.first.inner_text()


def _wait_for_run(airflow: LocalAirflow, known: int, timeout: float = 240, dag_id: str = DAG_ID) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = _manual_runs(airflow, dag_id)
        if len(runs) > known and runs[-1]["state"] in ("success", "failed"):
            return runs[-1]
        time.sleep(2)
    raise AssertionError(f"no finished manual run within {timeout:.0f} s")


def _orphans(airflow: LocalAirflow) -> int:
    with psycopg.connect(airflow.kpi_dsn) as conn:
        return conn.execute(
            "SELECT count(*) FROM vision_kpis c WHERE c.parent_kpi_id IS NOT NULL "
            "AND NOT EXISTS (SELECT 1 FROM vision_kpis p WHERE p.id = c.parent_kpi_id)"
        ).fetchone()[0]


def _settled(airflow: LocalAirflow) -> None:
    """Wait until no run is active: a deployment inside the window starts its scheduled run at once."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        runs = airflow.api(f"/api/v2/dags/{DAG_ID}/dagRuns?limit=100")["dag_runs"]
        if all(run["state"] in ("success", "failed") for run in runs):
            return
        time.sleep(2)
    raise AssertionError("a run is still active")


def test_trigger_form_dry_run_succeeds_and_its_report_shows_in_the_ui(page, airflow) -> None:
    _settled(airflow)
    orphans = _orphans(airflow)
    before = len(_manual_runs(airflow))
    dialog = _open_trigger_form(page, airflow)
    _open_section(dialog, "What this run does")
    dialog.locator('[id="switch:element_dry_run"]').click()
    expect(dialog.locator("input[name=element_dry_run]")).to_be_checked()
    _open_section(dialog, "Locks and batches")
    dialog.get_by_role("spinbutton", name="Batch size").fill("250")
    _still(dialog)
    page.screenshot(path=str(SHOTS / "trigger-form.png"), full_page=True)
    page.get_by_test_id("trigger-dag-submit").click()

    run = _wait_for_run(airflow, before)
    assert run["state"] == "success", run
    assert run["conf"]["dry_run"] is True and run["conf"]["batch_size"] == 250

    quoted = urllib.request.quote(run["dag_run_id"], safe="")
    page.goto(f"{airflow.url}/dags/{DAG_ID}/runs/{quoted}/tasks/canary.report")
    # The report's lines in the task's log ("dry run: nothing changed" alone is also in its returned value's line).
    expect(page.get_by_text(f"Run {run['dag_run_id']}: dry run: nothing changed")).to_be_visible(timeout=60_000)
    expect(page.get_by_text(f"Orphans found: {orphans} (pointing at")).to_be_visible()
    page.screenshot(path=str(SHOTS / "finished-run-report.png"), full_page=True)
    assert _orphans(airflow) == orphans  # the dry run changed nothing


def test_trigger_form_clamps_numbers_and_refuses_a_bad_window_without_creating_a_run(page, airflow) -> None:
    before = len(_manual_runs(airflow))
    triggers = []
    page.on("request", lambda request: triggers.append(request) if _is_trigger(request) else None)
    dialog = _open_trigger_form(page, airflow)
    _open_section(dialog, "Locks and batches")
    batch_size = dialog.get_by_role("spinbutton", name="Batch size")
    batch_size.fill("0")
    dialog.get_by_role("spinbutton", name="Lock timeout (ms)").click()
    expect(batch_size).to_have_value("1")  # the form never offers a value below the schema's minimum

    _open_section(dialog, "Validation window")
    dialog.locator("#element_window_start").fill("25:99")
    with page.expect_response(lambda response: _is_trigger(response.request)) as answered:
        page.get_by_test_id("trigger-dag-submit").click()
    refused = answered.value
    conf = refused.request.post_data_json["conf"]
    assert conf["window_start"] == "25:99" and conf["batch_size"] == 1  # what the form sent: clamped, bad window
    assert refused.status == 400, (refused.status, refused.text())
    assert "Invalid input for param window_start" in refused.json()["detail"]
    # The person sees it: the dialog says why, and a toast says the trigger failed.
    expect(dialog.get_by_test_id("error-alert")).to_contain_text("Invalid input for param window_start: '25:99'")
    assert "Bad Request" in _toast(page, "Failed to Trigger Dag")
    page.screenshot(path=str(SHOTS / "trigger-form-refused.png"), full_page=True)
    # The server answered the form's only trigger request, and a refused request creates no run.
    assert len(triggers) == 1, [request.url for request in triggers]
    assert len(_manual_runs(airflow)) == before


def test_a_fleet_run_from_the_form_works_on_at_most_max_parallel_targets_at_once_after_the_canary(
    page, airflow
) -> None:
    _settled(airflow)
    fleet = list(airflow.fleet_dsns)
    conn_ids = ["kpi_db", *fleet]
    names = {conn_id: conninfo_to_dict(dsn)["dbname"] for conn_id, dsn in airflow.fleet_dsns.items()}
    canary_db = conninfo_to_dict(airflow.kpi_dsn)["dbname"]
    before = len(_manual_runs(airflow))

    dialog = _open_trigger_form(page, airflow)
    _open_section(dialog, "What this run does")
    dialog.locator('[id="switch:element_validate_now"]').click()
    _open_section(dialog, "Targets (fleet)")
    dialog.locator("#element_conn_ids").fill("\n".join(conn_ids))
    dialog.get_by_role("spinbutton", name="Targets at once").fill("3")
    _still(dialog)
    page.screenshot(path=str(SHOTS / "trigger-form-fleet.png"), full_page=True)
    _open_section(dialog, "Locks and batches")
    # Small, paced batches stretch each target's null_orphans over seconds, so overlaps can be seen.
    dialog.get_by_role("spinbutton", name="Batch size").fill("1")
    dialog.get_by_role("spinbutton", name="Pause between batches (ms)").fill("250")
    with SessionWatch(airflow.kpi_dsn, [canary_db, *names.values()]) as watch:
        page.get_by_test_id("trigger-dag-submit").click()
        run = _wait_for_run(airflow, before, timeout=420)
    assert run["state"] == "success", run
    assert run["conf"]["conn_ids"] == conn_ids and run["conf"]["max_parallel"] == 3

    fleet_dbs = set(names.values())
    at_once = [len(sample & fleet_dbs) for sample in watch.samples]
    assert max(at_once) <= 3, max(at_once)
    assert max(at_once) >= 2, "no two targets were ever worked on at the same moment"
    assert not any(canary_db in sample and sample & fleet_dbs for sample in watch.samples)  # the canary ran alone
    print(f"fleet run: {len(watch.samples)} samples, at most {max(at_once)} fleet targets at once")

    quoted = urllib.request.quote(run["dag_run_id"], safe="")
    for task_id in ("fleet.wait_turn", "fleet.preflight", "fleet.report"):
        mapped = airflow.api(f"/api/v2/dags/{DAG_ID}/dagRuns/{quoted}/taskInstances/{task_id}/listMapped")
        assert sorted(ti["rendered_map_index"] for ti in mapped["task_instances"]) == sorted(fleet), task_id
    for dsn in airflow.fleet_dsns.values():
        with psycopg.connect(dsn) as conn:
            assert conn.execute(
                "SELECT count(*) FROM vision_kpis c WHERE c.parent_kpi_id IS NOT NULL "
                "AND NOT EXISTS (SELECT 1 FROM vision_kpis p WHERE p.id = c.parent_kpi_id)"
            ).fetchone() == (0,)
            assert conn.execute(
                "SELECT convalidated FROM pg_constraint WHERE conname = 'vision_kpis_parent_kpi_id_fkey'"
            ).fetchone() == (True,)


class _Database:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.dsn, autocommit=True)


def test_the_restore_form_puts_back_what_a_fleet_run_nulled_where_the_parent_exists_again(page, airflow) -> None:
    """After the fleet run above: one missing parent comes back in kpi_fleet_1, and the restore DAG, triggered
    from its form with that run's id, puts its children's pointers back and records each one."""
    fleet_run = next(
        run
        for run in reversed(_manual_runs(airflow))
        if (run["conf"] or {}).get("conn_ids") and run["state"] == "success"
    )
    database = _Database(airflow.fleet_dsns["kpi_fleet_1"])
    with database.connect() as conn:
        audit = conn.execute(
            "SELECT kpi_id, old_parent_kpi_id FROM fk_maintenance.vision_kpis_orphan_audit WHERE run_id = %s",
            [fleet_run["dag_run_id"]],
        ).fetchall()
    parent = audit[0][1]
    revive_parent(database, parent)
    children = sorted(kpi for kpi, old_parent in audit if old_parent == parent)
    restore_dag = f"{DAG_ID}_restore"
    before = len(_manual_runs(airflow, restore_dag))

    dialog = _open_trigger_form(page, airflow, restore_dag)
    _open_section(dialog, "What to restore")
    dialog.locator("#element_run_id").fill(fleet_run["dag_run_id"])
    _open_section(dialog, "Targets (fleet)")
    dialog.locator("#element_conn_ids").fill("kpi_fleet_1")
    _still(dialog)
    page.screenshot(path=str(SHOTS / "restore-form.png"), full_page=True)
    page.get_by_test_id("trigger-dag-submit").click()
    run = _wait_for_run(airflow, before, dag_id=restore_dag)
    assert run["state"] == "success", run
    assert run["conf"]["conn_ids"] == ["kpi_fleet_1"]

    with database.connect() as conn:
        back = conn.execute("SELECT id FROM vision_kpis WHERE parent_kpi_id = %s ORDER BY id", [parent]).fetchall()
        logged = conn.execute(
            "SELECT row_key FROM fk_maintenance.restore_log WHERE restore_id = %s AND run_id = %s ORDER BY row_key",
            [run["dag_run_id"], fleet_run["dag_run_id"]],
        ).fetchall()
    assert [row[0] for row in back] == children
    assert [row[0] for row in logged] == sorted(str(kpi) for kpi in children)


# --- a person approves or rejects a large delete (issue 17) ----------------------------------------------------


def _shop(airflow: LocalAirflow, conn_id: str) -> dict[str, int]:
    with psycopg.connect(airflow.extra_dsns[conn_id]) as conn:
        return dict(
            zip(
                ("orphans", "posts", "comments", "pinned"),
                conn.execute(
                    "SELECT (SELECT count(*) FROM posts p WHERE NOT EXISTS "
                    "(SELECT 1 FROM accounts a WHERE a.id = p.account_id)), (SELECT count(*) FROM posts), "
                    "(SELECT count(*) FROM comments), (SELECT count(post_id) FROM pins)"
                ).fetchone(),
                strict=True,
            )
        )


def _no_active_delete_runs(airflow: LocalAirflow) -> None:
    """A deployment inside the window starts the key's scheduled run at once; it would wait for an approval no
    one gives here and hold the DAG's one active run: fail it."""
    for run in airflow.api(f"/api/v2/dags/{DELETE_DAG}/dagRuns?limit=100")["dag_runs"]:
        if run["state"] not in ("success", "failed"):
            quoted = urllib.request.quote(run["dag_run_id"], safe="")
            airflow.api(f"/api/v2/dags/{DELETE_DAG}/dagRuns/{quoted}", {"state": "failed"}, method="PATCH")


def _trigger_delete(airflow: LocalAirflow, conn_ids: list[str]) -> str:
    """Triggered by REQUESTER: the one who triggers a delete may not approve it, and the admin answers here."""
    run = airflow.api(
        f"/api/v2/dags/{DELETE_DAG}/dagRuns",
        {"logical_date": None, "conf": {"validate_now": True, "conn_ids": conn_ids}},
        user=REQUESTER,
    )
    return run["dag_run_id"]


def _waiting_approval(airflow: LocalAirflow, run_id: str, task_id: str, timeout: float = 360) -> dict:
    """The gate's request once it has waited a few seconds: an answer within about a second of the request being
    written can race the scheduler (the task ends failed although approved), which no person is fast enough for."""
    quoted = urllib.request.quote(run_id, safe="")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for detail in airflow.api(f"/api/v2/dags/{DELETE_DAG}/dagRuns/{quoted}/hitlDetails?response_received=false")[
            "hitl_details"
        ]:
            if detail["task_instance"]["task_id"] == task_id:
                time.sleep(3)
                return detail
        time.sleep(1)
    raise AssertionError(f"{task_id} never waited for an approval within {timeout:.0f} s")


def _answer_by_rest(airflow: LocalAirflow, run_id: str, task_id: str, map_index: int, option: str) -> dict:
    quoted = urllib.request.quote(run_id, safe="")
    return airflow.api(
        f"/api/v2/dags/{DELETE_DAG}/dagRuns/{quoted}/taskInstances/{task_id}/{map_index}/hitlDetails",
        {"chosen_options": [option], "params_input": {}},
        method="PATCH",
    )


def _answer_in_browser(page, airflow: LocalAirflow, run_id: str, task_id: str, map_index: int, option: str) -> None:
    quoted = urllib.request.quote(run_id, safe="")
    mapped = f"/mapped/{map_index}" if map_index >= 0 else ""
    page.goto(f"{airflow.url}/dags/{DELETE_DAG}/runs/{quoted}/tasks/{task_id}{mapped}/required_actions")
    # The request's table of what the delete takes.
    expect(page.get_by_role("columnheader", name="rows deleted", exact=True)).to_be_visible()
    page.screenshot(path=str(SHOTS / f"approval-{option.lower()}-asked.png"), full_page=True)
    page.get_by_test_id(f"hitl-option-{option}").click()
    expect(page.get_by_text(re.compile(rf"Response received at .+ from {re.escape(airflow.user)}"))).to_be_visible()
    page.screenshot(path=str(SHOTS / f"approval-{option.lower()}-answered.png"), full_page=True)


def _finished(airflow: LocalAirflow, run_id: str, timeout: float = 240) -> dict:
    quoted = urllib.request.quote(run_id, safe="")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = airflow.api(f"/api/v2/dags/{DELETE_DAG}/dagRuns/{quoted}")
        if run["state"] in ("success", "failed"):
            return run
        time.sleep(2)
    raise AssertionError(f"run {run_id} did not finish within {timeout:.0f} s")


def _target_line(airflow: LocalAirflow, run_id: str, group: str, map_index: int) -> dict:
    quoted = urllib.request.quote(run_id, safe="")
    return airflow.api(
        f"/api/v2/dags/{DELETE_DAG}/dagRuns/{quoted}/taskInstances/{group}.report/xcomEntries/target_summary"
        f"?map_index={map_index}&deserialize=true"
    )["value"]


@pytest.mark.parametrize(
    ("canary", "canary_answer", "fleet_target", "fleet_answer"),
    [
        ("shop_a", "browser", "shop_b", "rest"),  # approved in the browser, rejected through the API
        ("shop_c", "rest", "shop_b", "browser"),  # approved through the API, rejected in the browser
    ],
    ids=["approve-in-browser-reject-by-rest", "approve-by-rest-reject-in-browser"],
)
def test_a_large_delete_waits_for_a_person_approved_deletes_and_rejected_changes_nothing_naming_who(
    page, airflow, canary, canary_answer, fleet_target, fleet_answer
) -> None:
    _no_active_delete_runs(airflow)
    canary_before, fleet_before = _shop(airflow, canary), _shop(airflow, fleet_target)
    assert canary_before["orphans"] == 20 and fleet_before["orphans"] == 20
    run_id = _trigger_delete(airflow, [canary, fleet_target])

    asked = _waiting_approval(airflow, run_id, "canary.approve_deletes")
    assert "40" in asked["body"] and "rows deleted" in asked["body"]  # the comments the cascade takes along
    assert _shop(airflow, canary) == canary_before  # nothing deleted while it waits
    if canary_answer == "browser":
        _answer_in_browser(page, airflow, run_id, "canary.approve_deletes", -1, "Approve")
    else:
        assert _answer_by_rest(airflow, run_id, "canary.approve_deletes", -1, "Approve")["chosen_options"] == [
            "Approve"
        ]
    _waiting_approval(airflow, run_id, "fleet.approve_deletes")
    if fleet_answer == "browser":
        _answer_in_browser(page, airflow, run_id, "fleet.approve_deletes", 0, "Reject")
    else:
        _answer_by_rest(airflow, run_id, "fleet.approve_deletes", 0, "Reject")
    run = _finished(airflow, run_id)

    assert run["state"] == "failed"  # the rejected target failed
    approved = _shop(airflow, canary)
    assert approved == {"orphans": 0, "posts": 80, "comments": 160, "pinned": 80}
    canary_line = _target_line(airflow, run_id, "canary", -1)
    assert canary_line["succeeded"], canary_line
    rejected = _target_line(airflow, run_id, "fleet", 0)
    assert rejected["failed"] and rejected["final_state"] == "failed at approve_deletes", rejected
    assert "rejected by admin" in rejected["error"] and "nothing was deleted" in rejected["error"]
    assert _shop(airflow, fleet_target) == fleet_before


def test_a_large_delete_nobody_answers_in_time_deletes_nothing_and_fails_saying_so(airflow) -> None:
    _no_active_delete_runs(airflow)
    before = _shop(airflow, "shop_b")
    run_id = airflow.api(
        f"/api/v2/dags/{DELETE_DAG}/dagRuns",
        {"logical_date": None, "conf": {"validate_now": True, "conn_ids": ["shop_b"], "approval_timeout_minutes": 1}},
    )["dag_run_id"]
    _waiting_approval(airflow, run_id, "canary.approve_deletes")
    # The scheduler looks for timed-out requests every 15 s ([scheduler] trigger_timeout_check_interval).
    run = _finished(airflow, run_id, timeout=180)
    assert run["state"] == "failed"
    line = _target_line(airflow, run_id, "canary", -1)
    assert line["final_state"] == "failed at approve_deletes", line
    assert "no answer within 1 min: nothing was deleted" in line["error"]
    assert _shop(airflow, "shop_b") == before
