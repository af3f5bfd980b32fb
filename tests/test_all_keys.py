"""Every key of a targets file from one trigger, under the real scheduler (devkit.local_airflow): the all-keys
DAG runs each key's own DAG, keys whose tables meet one after the other, the others side by side; a refused key
is reported and the others land; one report names every key's outcome."""

from __future__ import annotations

import time
import urllib.request
from datetime import datetime
from pathlib import Path

import psycopg

from devkit.cluster import free_port
from devkit.fleet_runs import xcom
from devkit.local_airflow import LocalAirflow, local_airflow

SHOP = """
CREATE TABLE customers (id int PRIMARY KEY);
CREATE TABLE orders (id int PRIMARY KEY, customer_id int);
CREATE TABLE lines (id int PRIMARY KEY, order_id int);
CREATE TABLE people (id int PRIMARY KEY);
CREATE TABLE notes (id int PRIMARY KEY, author_id int NOT NULL);
INSERT INTO customers SELECT g FROM generate_series(1, 10) g;
INSERT INTO orders SELECT g, CASE WHEN g % 10 = 0 THEN 99 ELSE 1 + g % 10 END FROM generate_series(1, 50) g;
INSERT INTO lines SELECT g, CASE WHEN g % 7 = 0 THEN 999 ELSE 1 + g % 50 END FROM generate_series(1, 100) g;
INSERT INTO people SELECT g FROM generate_series(1, 5) g;
INSERT INTO notes SELECT g, CASE WHEN g = 3 THEN 77 ELSE 1 END FROM generate_series(1, 20) g;
"""
# lines -> orders and orders -> customers meet on orders: one lane, in this order. notes -> people is apart, and
# refused (a NOT NULL key with an orphan).
TARGETS = """conn_ids: [shop_db]
foreign_keys:
  - {name: lines_order_fk, table: lines, column: order_id, ref_table: orders, ref_column: id}
  - {name: notes_author_fk, table: notes, column: author_id, ref_table: people, ref_column: id}
  - {name: orders_customer_fk, table: orders, column: customer_id, ref_table: customers, ref_column: id}
"""
KEYS = ("lines_order_fk", "notes_author_fk", "orders_customer_fk")


def _shop(server) -> dict[str, str]:
    database = server.create_database("shop")
    with psycopg.connect(server.dsn(database), autocommit=True) as conn:
        conn.execute(SHOP)
    return {"shop_db": database}


def _quoted(run_id: str) -> str:
    return urllib.request.quote(run_id, safe="")


def _finished(airflow: LocalAirflow, run_id: str, timeout: float = 900) -> dict:
    """The all-keys run once it ended. Deployed inside the window, a key's scheduled run would hold that DAG's
    one active run: any run of a key that ours did not start is failed while we wait."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for key in KEYS:
            for run in airflow.api(f"/api/v2/dags/{key}/dagRuns?limit=50")["dag_runs"]:
                if run["run_type"] == "scheduled" and run["state"] not in ("success", "failed"):
                    airflow.api(
                        f"/api/v2/dags/{key}/dagRuns/{_quoted(run['dag_run_id'])}", {"state": "failed"}, "PATCH"
                    )
        run = airflow.api(f"/api/v2/dags/all_declared_keys/dagRuns/{_quoted(run_id)}")
        if run["state"] in ("success", "failed"):
            return run
        time.sleep(5)
    raise TimeoutError(f"all_declared_keys run {run_id} did not finish in {timeout} s")


def _when(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_one_trigger_lands_every_key_keys_on_one_table_in_turn_and_a_refused_one_reported(tmp_path: Path) -> None:
    targets = tmp_path / "targets.yaml"
    targets.write_text(TARGETS)
    with local_airflow(
        tmp_path / "home", port=free_port(), rows=100, targets_file=targets, extra_databases=_shop
    ) as airflow:
        started = airflow.api(
            "/api/v2/dags/all_declared_keys/dagRuns", {"logical_date": None, "conf": {"validate_now": True}}
        )
        run = _finished(airflow, started["dag_run_id"])
        report = xcom(airflow, run["dag_run_id"], "all_keys_report", "report", dag_id="all_declared_keys")
        tis = {
            ti["task_id"]: ti
            for ti in airflow.api(f"/api/v2/dags/all_declared_keys/dagRuns/{_quoted(run['dag_run_id'])}/taskInstances")[
                "task_instances"
            ]
        }
        with psycopg.connect(airflow.extra_dsns["shop_db"]) as conn:
            keys = conn.execute(
                "SELECT conname, convalidated FROM pg_constraint WHERE contype = 'f' ORDER BY 1"
            ).fetchall()
            orphans = conn.execute("SELECT count(*) FROM lines WHERE order_id IS NULL").fetchone()[0]
    assert run["state"] == "failed", report  # one key was refused
    outcomes = {key["key"]: key for key in report["keys"]}
    assert [outcomes[key]["converged"] for key in KEYS] == [True, False, True], report
    assert report["failed"] == ["notes_author_fk"]
    assert "preflight" in outcomes["notes_author_fk"]["outcome"], outcomes["notes_author_fk"]
    # Keys on one table in turn: orders_customer_fk started only once lines_order_fk's run had ended.
    first, second = tis["land_lines_order_fk"], tis["land_orders_customer_fk"]
    assert _when(second["start_date"]) >= _when(first["end_date"]), (first, second)
    assert keys == [("lines_order_id_fkey", True), ("orders_customer_id_fkey", True)]
    assert orphans == 100 // 7
