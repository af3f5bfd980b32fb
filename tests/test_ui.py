"""The trigger form in a real browser: a local Airflow (devkit.local_airflow), headless Debian chromium driven
by Playwright (executable_path, no browser download), a dry run triggered from the form and its report read
in the UI; a value the form must refuse creates no run. Screenshots go to .artifacts/screenshots/."""

from __future__ import annotations

import json
import shutil
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

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

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="Debian chromium is not installed (scripts/system-deps.sh installs it as root)"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def airflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalAirflow]:
    with local_airflow(tmp_path_factory.mktemp("ui-airflow"), port=_free_port(), rows=5000) as running:
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
    page.goto(airflow.url)
    page.fill("input[name=username]", airflow.user)
    page.fill("input[name=password]", airflow.password)
    page.keyboard.press("Enter")
    page.wait_for_url(lambda url: "login" not in url)
    yield page
    context.close()


def _api(airflow: LocalAirflow, path: str) -> dict:
    request = urllib.request.Request(
        f"{airflow.url}/auth/token",
        data=json.dumps({"username": airflow.user, "password": airflow.password}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        token = json.load(response)["access_token"]
    request = urllib.request.Request(f"{airflow.url}{path}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def _manual_runs(airflow: LocalAirflow) -> list[dict]:
    runs = _api(airflow, f"/api/v2/dags/{DAG_ID}/dagRuns?limit=100")["dag_runs"]
    return [run for run in runs if run["run_type"] == "manual"]


def _open_trigger_form(page, airflow: LocalAirflow) -> None:
    page.goto(f"{airflow.url}/dags/{DAG_ID}")
    page.get_by_test_id("trigger-dag-button").click()
    page.locator("#element_batch_size").wait_for()


def test_trigger_form_dry_run_succeeds_and_its_report_shows_in_the_ui(page, airflow) -> None:
    _open_trigger_form(page, airflow)
    page.locator("label", has=page.locator("#element_dry_run")).click()
    assert page.locator("#element_dry_run").is_checked()
    page.locator("#element_batch_size").fill("250")
    page.screenshot(path=str(SHOTS / "trigger-form.png"), full_page=True)
    before = len(_manual_runs(airflow))
    page.get_by_test_id("trigger-dag-submit").click()

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        runs = _manual_runs(airflow)
        if len(runs) > before and runs[-1]["state"] in ("success", "failed"):
            break
        time.sleep(2)
    run = _manual_runs(airflow)[-1]
    assert run["state"] == "success", run
    assert run["conf"]["dry_run"] is True and run["conf"]["batch_size"] == 250

    run_id = run["dag_run_id"]
    page.goto(f"{airflow.url}/dags/{DAG_ID}/runs/{urllib.request.quote(run_id, safe='')}/tasks/report/xcom")
    page.get_by_text("dry run: nothing changed").first.wait_for(timeout=60_000)
    page.screenshot(path=str(SHOTS / "finished-run-report.png"), full_page=True)


def test_trigger_form_refuses_a_batch_size_of_zero_and_creates_no_run(page, airflow) -> None:
    before = len(_manual_runs(airflow))
    _open_trigger_form(page, airflow)
    page.locator("#element_batch_size").fill("0")
    page.locator("#element_lock_timeout_ms").click()  # leave the field so the form validates it
    page.screenshot(path=str(SHOTS / "trigger-form-refused.png"), full_page=True)
    submit = page.get_by_test_id("trigger-dag-submit")
    if submit.is_enabled():
        submit.click()
        time.sleep(3)
    assert len(_manual_runs(airflow)) == before
