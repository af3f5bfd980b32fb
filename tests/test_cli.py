"""The ``fk-maintenance`` command, from a fresh virtualenv holding only the built wheel (and what pip resolves
for it): each subcommand and exit code, ``plan`` on databases made by the app's real drizzle-kit, a run and a DAG
run started at the same moment, and the restore of a run."""

from __future__ import annotations

import json
import os
import pty
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from devkit.airflow_env import DAG_ID, airflow_env, latest_xcom
from devkit.db_state import snapshot
from devkit.drizzle import app_copy, drizzle_kit

REPO = Path(__file__).resolve().parents[1]
TARGETS = REPO / "dags" / "targets.yaml"
KEY = "vision_kpis_parent_fk"
AUDIT = "fk_maintenance.vision_kpis_orphan_audit"


@pytest.fixture(scope="session")
def command(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``fk-maintenance`` of a new virtualenv where only the wheel (and its declared dependencies) is installed."""
    venv = tmp_path_factory.mktemp("cli-venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel)], check=True, capture_output=True
    )
    return venv / "bin" / "fk-maintenance"


def clean_env(command: Path) -> dict[str, str]:
    """An environment that holds nothing of this checkout (no PYTHONPATH, no Airflow): the command's virtualenv
    and the system's tools only."""
    return {"PATH": f"{command.parent}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8"}


def cli(command: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(command), *args], cwd=cwd, env=clean_env(command), capture_output=True, text=True, timeout=600
    )


def cli_on_terminal(command: Path, *args: str) -> tuple[int, str, str]:
    """The command with its stderr on a pseudo-terminal, as a person runs it: (exit code, stdout, what the
    terminal received)."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [str(command), *args], env=clean_env(command), stdout=subprocess.PIPE, stderr=terminal, text=True
    )
    os.close(terminal)
    received = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the command closed the terminal
            break
        if not chunk:
            break
        received += chunk
    os.close(controller)
    stdout, _ = process.communicate(timeout=600)
    return process.returncode, stdout, received.decode()


def on(db) -> list[str]:
    return ["--dsn", db.dsn, "--targets", str(TARGETS)]


def test_the_command_and_each_subcommand_explain_themselves_and_python_dash_m_is_the_same(command, tmp_path) -> None:
    main = cli(command, "--help")
    assert main.returncode == 0
    for name in ("check", "plan", "run", "restore", "guard", "Exit codes"):
        assert name in main.stdout
    for name in ("check", "plan", "run", "restore", "guard"):
        sub = cli(command, name, "--help")
        assert sub.returncode == 0 and "Exit " in sub.stdout, sub.stdout
    assert "--run-id" in cli(command, "restore", "--help").stdout
    assert "batch_size" in cli(command, "run", "--help").stdout
    python = command.with_name("python")
    module = subprocess.run([str(python), "-m", "fk_maintenance", "--help"], capture_output=True, text=True)
    assert module.returncode == 0 and module.stdout == main.stdout
    # A usage error is exit 2: no subcommand, or neither --dsn nor --conn-id.
    assert cli(command).returncode == 2
    assert cli(command, "plan", "--targets", str(TARGETS)).returncode == 2


def test_check_names_every_problem_of_a_targets_file_and_needs_no_database(command, tmp_path) -> None:
    good = cli(command, "check", "--targets", str(TARGETS))
    assert good.returncode == 0, good.stderr
    assert f"{KEY}: public.vision_kpis(parent_kpi_id) -> public.vision_kpis(id) ON DELETE SET NULL" in good.stdout
    # Without --targets the file comes from FK_MAINTENANCE_TARGETS, else dags/targets.yaml of the current folder.
    (tmp_path / "dags").mkdir()
    (tmp_path / "dags" / "targets.yaml").write_text(TARGETS.read_text())
    assert cli(command, "check", cwd=tmp_path).returncode == 0

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        TARGETS.read_text()
        .replace("on_delete: SET NULL", "on_delete: SET NOTHING")
        .replace("    row_key: id\n", "    row_key: id\n    colour: blue\n")
    )
    refused = cli(command, "check", "--targets", str(bad))
    assert refused.returncode == 1
    assert "unknown key(s) 'colour'" in refused.stdout and "SET NOTHING" in refused.stdout
    missing = cli(command, "check", "--targets", str(tmp_path / "nowhere.yaml"))
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_plan_on_the_app_schema_pushed_by_drizzle_kit_is_exit_0_and_changes_nothing(
    command, db, spec, node_modules, tmp_path
) -> None:
    app = app_copy(node_modules, tmp_path / "app")
    pushed = drizzle_kit(app, db.dsn, "push", "--force")
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    before = snapshot(db, spec)
    result = cli(command, "plan", *on(db))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{KEY} on " in result.stdout and ": would converge" in result.stdout
    assert "constraint vision_kpis_parent_kpi_id_fkey: present and validated" in result.stdout
    as_json = cli(command, "plan", *on(db), "--key", KEY, "--json")
    assert as_json.returncode == 0
    (planned,) = json.loads(as_json.stdout)["keys"]
    assert planned["would_converge"] and planned["refused"] == []
    assert planned["steps"]["post_checks"]["failed"] == 0
    assert snapshot(db, spec) == before
    assert db.scalar("SELECT count(*) FROM pg_namespace WHERE nspname = 'fk_maintenance'") == 0


def test_plan_names_the_drift_when_the_column_is_renamed_or_retyped_after_a_drizzle_kit_push(
    command, db, spec, node_modules, tmp_path
) -> None:
    app = app_copy(node_modules, tmp_path / "app", before_pipeline=True)
    pushed = drizzle_kit(app, db.dsn, "push", "--force")
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    db.execute(
        "INSERT INTO vision_kpis (user_id, vision_id, level, title, parent_kpi_id) "
        "SELECT gen_random_uuid(), gen_random_uuid(), 'weekly', 'orphan ' || g, gen_random_uuid() "
        "FROM generate_series(1, 7) g"
    )
    fine = cli(command, "plan", *on(db))
    assert fine.returncode == 0, fine.stdout + fine.stderr
    assert "7 row(s) point at 7 missing parent(s)" in fine.stdout
    assert "index vision_kpis_parent_kpi_idx: absent (will be built concurrently)" in fine.stdout

    db.execute("ALTER TABLE vision_kpis RENAME COLUMN parent_kpi_id TO parent_id")
    renamed = cli(command, "plan", *on(db))
    assert renamed.returncode == 1, renamed.stdout + renamed.stderr
    assert "REFUSED" in renamed.stdout and "refused at preflight" in renamed.stdout
    assert "parent_kpi_id" in renamed.stdout.split("refused at preflight", 1)[1]

    db.execute("ALTER TABLE vision_kpis RENAME COLUMN parent_id TO parent_kpi_id")
    db.execute("ALTER TABLE vision_kpis ALTER COLUMN parent_kpi_id TYPE text")
    before = snapshot(db, spec)
    retyped = cli(command, "plan", *on(db), "--json")
    assert retyped.returncode == 1
    (planned,) = json.loads(retyped.stdout)["keys"]
    assert planned["failed_step"] == "preflight" and not planned["would_converge"]
    assert any("text" in reason and "uuid" in reason for reason in planned["refused"]), planned["refused"]
    assert snapshot(db, spec) == before


def test_plan_on_an_unreachable_database_is_exit_2_and_never_prints_the_password(command) -> None:
    result = cli(
        command, "plan", "--dsn", "postgresql://kpi_owner:s3cret-pw@127.0.0.1:1/goals", "--targets", str(TARGETS)
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "cannot connect to the target database (kpi_owner@127.0.0.1:1/goals)" in result.stdout + result.stderr
    assert "s3cret-pw" not in result.stdout + result.stderr
    # --conn-id goes through Airflow's PostgresHook, which this virtualenv does not have: a usage error saying so.
    no_airflow = cli(command, "plan", "--conn-id", "kpi_db", "--targets", str(TARGETS))
    assert no_airflow.returncode == 2 and "needs Apache Airflow" in no_airflow.stderr


def _closed_window() -> list[str]:
    """--set arguments for a validation window that is not open now (it opens in two hours)."""
    start = datetime.now(UTC) + timedelta(hours=2)
    end = start + timedelta(hours=1)
    return ["--set", f"window_start={start:%H:%M}", "--set", f"window_end={end:%H:%M}"]


def test_run_waits_for_the_window_then_converges_and_restore_puts_back_what_it_nulled(command, db, spec) -> None:
    generated = db.build(3000, orphan_ratio=0.03)
    pointers = dict(db.query("SELECT id, parent_kpi_id FROM vision_kpis"))
    refused = cli(command, "run", *on(db), "--key", KEY, "--set", "batch_size=0")
    assert refused.returncode == 2 and "batch_size must be at least 1, got 0" in refused.stderr
    fleet = cli(command, "run", *on(db), "--key", KEY, "--set", 'conn_ids=["a"]')
    assert fleet.returncode == 2 and "fleet setting" in fleet.stderr
    assert db.scalar("SELECT count(*) FROM pg_namespace WHERE nspname = 'fk_maintenance'") == 0

    code, first, terminal = cli_on_terminal(
        command, "run", *on(db), "--key", KEY, "--set", "batch_size=25", *_closed_window()
    )
    assert code == 3, first + terminal
    run_id = first.splitlines()[0].removeprefix("Run id: ")
    assert run_id.startswith("cli__")
    assert f"Run {run_id}: incomplete: post_checks did not finish" in first
    assert "validate_fk waits for the low-traffic window" in first
    # On a terminal, the batches' progress is a bar redrawn in place.
    assert f"\r\x1b[Knull_orphans [{'#' * 30}] {generated.orphans}/{generated.orphans} (100%) rows" in terminal
    assert f"fk-maintenance restore --key {KEY} --run-id '{run_id}'" in first
    audited = dict(db.query(f"SELECT kpi_id, old_parent_kpi_id FROM {AUDIT} WHERE run_id = %s", [run_id]))
    assert len(audited) == generated.orphans and all(pointers[k] == v for k, v in audited.items())

    second = cli(command, "run", *on(db), "--key", KEY, "--set", "validate_now=true")
    assert second.returncode == 0, second.stdout + second.stderr
    assert ": converged" in second.stdout and "Pointers nulled and audited: 0" in second.stdout  # nothing done twice
    assert db.scalar(f"SELECT count(*) FROM {AUDIT}") == generated.orphans

    # The app brings three of the missing parents back; the restore puts back the pointers to them.
    returning = sorted({str(v) for v in audited.values()})[:3]
    db.execute(
        "INSERT INTO vision_kpis (id, user_id, vision_id, level, title) "
        "SELECT p::uuid, gen_random_uuid(), gen_random_uuid(), 'yearly', 'back' FROM unnest(%s::text[]) p",
        [returning],
    )
    expected = {k for k, v in audited.items() if str(v) in returning}
    before = snapshot(db, spec)
    dry = cli(command, "restore", *on(db), "--key", KEY, "--run-id", run_id, "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert f"Dry run: {len(expected)} pointer(s) would be put back; nothing was changed" in dry.stdout
    assert snapshot(db, spec) == before
    restored = cli(command, "restore", *on(db), "--key", KEY, "--run-id", run_id, "--set", "batch_size=10")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert f"{len(expected)} pointer(s) put back, {generated.orphans - len(expected)} still missing" in restored.stdout
    # Not on a terminal, progress is plain lines (a CI log, a file).
    assert f"restore: {generated.orphans} rows, {len(expected)} changed" in restored.stderr
    assert "\r" not in restored.stderr
    after = dict(db.query("SELECT id, parent_kpi_id FROM vision_kpis"))
    assert {k for k in audited if after[k] is not None} == expected
    assert all(after[k] == pointers[k] for k in expected)
    assert db.scalar("SELECT count(*) FROM fk_maintenance.restore_log") == len(expected)


def _rescheduled_tasks(home: Path) -> list[str]:
    try:
        with sqlite3.connect(home / "airflow.db", timeout=5) as metadata:
            rows = metadata.execute(
                "SELECT task_id FROM task_instance WHERE dag_id = ? AND state = 'up_for_reschedule'", (DAG_ID,)
            ).fetchall()
    except sqlite3.OperationalError:  # locked by the run for a moment
        return []
    return [row[0] for row in rows]


def test_a_run_and_a_dag_run_started_at_the_same_moment_never_work_at_once_and_do_nothing_twice(
    command, db, spec, airflow_home, tmp_path
) -> None:
    generated = db.build(2000, orphan_ratio=0.05)
    # An app transaction with an old snapshot: whichever run builds the index waits for it (CREATE INDEX
    # CONCURRENTLY waits for older snapshots), holding the run lock, until the other run has met the lock and
    # waited. Then the transaction ends and both finish.
    app = db.connect()
    app.autocommit = False
    app.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    app.execute("SELECT count(*) FROM vision_kpis").fetchone()
    env = {**os.environ, **airflow_env(airflow_home, db.server.airflow_connection_json(db.name))}
    airflow = Path(sys.executable).with_name("airflow")
    conf = json.dumps({"validate_now": True})
    cli_log, dag_log = tmp_path / "cli.log", tmp_path / "dag.log"
    with cli_log.open("w") as cli_out, dag_log.open("w") as dag_out:
        runs = {
            "dag": subprocess.Popen(
                [str(airflow), "dags", "test", DAG_ID, "-c", conf], env=env, stdout=dag_out, stderr=subprocess.STDOUT
            ),
            "cli": subprocess.Popen(
                [str(command), "run", *on(db), "--key", KEY, "--set", "validate_now=true"],
                env=clean_env(command),
                stdout=cli_out,
                stderr=subprocess.STDOUT,
                text=True,
            ),
        }
        try:
            deadline = time.monotonic() + 600  # a safety net only: the loop ends when one run has waited
            while not ((cli_waited := "waiting: " in cli_log.read_text()) or _rescheduled_tasks(airflow_home)):
                assert all(run.poll() is None for run in runs.values()), cli_log.read_text() + dag_log.read_text()
                assert time.monotonic() < deadline, cli_log.read_text() + dag_log.read_text()[-3000:]
                time.sleep(0.5)
            waiter = "cli" if cli_waited else "dag"
        finally:
            app.rollback()
            app.close()
        codes = {name: run.wait(timeout=900) for name, run in runs.items()}
    cli_text, dag_text = cli_log.read_text(), dag_log.read_text()
    assert codes == {"dag": 0, "cli": 0}, cli_text + dag_text[-5000:]
    dag_report = latest_xcom(airflow_home, "canary.report")
    cli_nulled = int(cli_text.split("Pointers nulled and audited: ", 1)[1].split(" ", 1)[0])
    assert {dag_report["final_state"], "converged"} == {"converged"} and ": converged" in cli_text
    # Every orphan was nulled and audited exactly once, by one of the two runs; one index, one constraint.
    assert cli_nulled + dag_report["nulled"] == generated.orphans
    audit = db.query(f"SELECT run_id, count(*) FROM {AUDIT} GROUP BY run_id")
    assert len(audit) == 1 and audit[0][1] == generated.orphans
    cli_index = next(line for line in cli_text.splitlines() if line.startswith("create_index_concurrently "))
    outcomes = sorted([dag_report["steps"]["create_index_concurrently"]["outcome"], cli_index.split("  ")[-1]])
    assert outcomes[0] == "built" and outcomes[1].startswith("none"), outcomes  # built once, found by the other
    assert db.scalar("SELECT count(*) FROM pg_constraint WHERE conname = 'vision_kpis_parent_kpi_id_fkey'") == 1
    # The one that came second met the first at work and waited (a DAG task is rescheduled, the command looks
    # again), rather than working beside it.
    if waiter == "cli":
        assert "waiting: " in cli_text and "looking again in 15 s" in cli_text
