"""DAG integrity checks for a deployment's own CI: one line in pytest.

    from fk_maintenance.integrity import assert_dag_integrity

    def test_fk_maintenance_dags():
        assert_dag_integrity("dags/foreign_key_dags.py", targets="dags/targets.yaml")

What it proves, all in one report (every problem listed, not only the first):

- the DAG file imports with no error for that targets file (parsed by Airflow's own DagBag);
- every declared key has its DAG ``<name>`` and restore DAG ``<name>_restore``, with the contract's graph (the
  steps of ``fk_maintenance.steps.registry.STEPS`` once per target group, as docs/index.md draws them) and nothing else;
- parsing touches no database: every Airflow connection the file declares, and libpq's defaults (PGHOST,
  PGPORT), point at a listener that counts connection attempts, and it must count none;
- parsing the DAG file (Airflow already imported) takes at most ``max_parse_seconds``.

The file is parsed in a child process (with the caller's environment, a throw-away AIRFLOW_HOME if none is set),
so the caller's Airflow configuration and connections are never touched. Needs Airflow installed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fk_maintenance.airflow.fleet import (
    CANARY_GROUP,
    FLEET_GROUP,
    FLEET_REPORT_TASK,
    PLAN_TASK,
    RESTORE_TASK,
    WAIT_TURN_TASK,
)
from fk_maintenance.keys.targets import load_targets
from fk_maintenance.steps.registry import REPORT_TASK, STEPS

# The DAG file parses in about 45 ms on top of Airflow's import on 2 shared cores; Airflow's own limit
# (core.dagbag_import_timeout) is 30 s. This leaves room for a loaded CI machine and still catches a file that
# does work at parse time.
DEFAULT_MAX_PARSE_SECONDS = 5.0
# The restore DAG's own tasks around its mapped restore task (dags/foreign_key_dags.py).
PLAN_RESTORE_TASK = "plan_restore"
RESTORE_REPORT_TASK = "restore_report"
RESTORE_SUFFIX = "_restore"


def key_dag_edges() -> set[tuple[str, str]]:
    """The contract's graph of a key's DAG: each target group runs wait_turn, the steps in their order and its
    report; the canary comes before the fleet; plan_fleet feeds every target task its connection."""
    per_target = {(WAIT_TURN_TASK, STEPS[0].name), (STEPS[-1].name, REPORT_TASK)}
    per_target |= {(upstream, step.name) for step in STEPS for upstream in step.upstream}
    edges = {(f"{group}.{a}", f"{group}.{b}") for group in (CANARY_GROUP, FLEET_GROUP) for a, b in per_target}
    edges |= {
        (f"{CANARY_GROUP}.{REPORT_TASK}", f"{FLEET_GROUP}.{WAIT_TURN_TASK}"),
        (f"{CANARY_GROUP}.{REPORT_TASK}", FLEET_REPORT_TASK),
        (f"{FLEET_GROUP}.{REPORT_TASK}", FLEET_REPORT_TASK),
    }
    target_tasks = {task for edge in edges for task in edge if task.startswith((f"{CANARY_GROUP}.", f"{FLEET_GROUP}."))}
    return edges | {(PLAN_TASK, task) for task in target_tasks}


def restore_dag_edges() -> set[tuple[str, str]]:
    return {
        (PLAN_RESTORE_TASK, RESTORE_TASK),
        (PLAN_RESTORE_TASK, RESTORE_REPORT_TASK),  # the report reads the planned connections
        (RESTORE_TASK, RESTORE_REPORT_TASK),
    }


@dataclass
class IntegrityReport:
    dag_file: str
    targets_file: str
    parse_seconds: float | None = None
    database_connections_during_parse: int = 0
    dag_ids: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        head = f"{self.dag_file} with {self.targets_file}: " + ("ok" if self.ok else f"{len(self.problems)} problem(s)")
        timing = "" if self.parse_seconds is None else f"; parsed in {self.parse_seconds:.3f} s"
        return head + timing + "".join(f"\n- {problem}" for problem in self.problems)


class _ConnectionTrap:
    """A TCP listener that counts connection attempts: where every database address of the parse points."""

    def __init__(self) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.attempts = 0
        self._thread = threading.Thread(target=self._accept, name="integrity-connection-trap", daemon=True)

    def __enter__(self) -> _ConnectionTrap:
        self._thread.start()
        return self

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._socket.accept()
            except OSError:  # closed by __exit__
                return
            self.attempts += 1
            conn.close()

    def __exit__(self, *exc: object) -> None:
        self._socket.close()
        self._thread.join(timeout=5)


def check_dag_integrity(
    dag_file: str | os.PathLike[str],
    targets: str | os.PathLike[str],
    *,
    max_parse_seconds: float = DEFAULT_MAX_PARSE_SECONDS,
    python: str = sys.executable,
) -> IntegrityReport:
    """Every check above on ``dag_file`` with the targets file ``targets``; the report lists each problem."""
    dag_path, targets_path = Path(dag_file).resolve(), Path(targets).resolve()
    report = IntegrityReport(str(dag_file), str(targets))
    try:
        declared = load_targets(targets_path)
    except Exception as exc:  # a bad file is the first thing a CI job must name
        report.problems.append(f"the targets file is invalid: {exc}")
        return report
    conn_ids = {conn_id for target in declared for conn_id in target.conn_ids}
    child, report.database_connections_during_parse = _parse_in_child(dag_path, targets_path, conn_ids, python)
    if child.returncode != 0:
        report.problems.append(f"parsing failed in its own process (exit {child.returncode}): {child.stderr[-2000:]}")
        return report
    parsed = json.loads(child.stdout.strip().splitlines()[-1])
    report.parse_seconds = parsed["seconds"]
    report.dag_ids = sorted(parsed["dags"])
    report.problems += _parse_problems(parsed, report.database_connections_during_parse, max_parse_seconds)
    expected = {target.name: key_dag_edges() for target in declared}
    expected |= {target.name + RESTORE_SUFFIX: restore_dag_edges() for target in declared}
    report.problems += _graph_problems(expected, parsed["dags"], targets)
    return report


def _parse_in_child(
    dag_path: Path, targets_path: Path, conn_ids: set[str], python: str
) -> tuple[subprocess.CompletedProcess[str], int]:
    """The child's run of ``_parse``, and how many connections it attempted: every database address it could
    reach (the declared connections, libpq's defaults) is the trap's."""
    with _ConnectionTrap() as trap, tempfile.TemporaryDirectory(prefix="fk-integrity-") as home:
        trap_uri = f"postgresql://integrity:integrity@127.0.0.1:{trap.port}/parse_must_not_connect"
        env = {
            **os.environ,
            "FK_MAINTENANCE_TARGETS": str(targets_path),
            "PGHOST": "127.0.0.1",
            "PGPORT": str(trap.port),
            **{f"AIRFLOW_CONN_{conn_id.upper()}": trap_uri for conn_id in conn_ids},
            # This package wherever it is installed (a wheel, or plugins/ in a checkout).
            "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH")])),
        }
        env.setdefault("AIRFLOW_HOME", home)
        env.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")  # only the DAGs of the file under test
        child = subprocess.run(
            [python, "-m", __name__, str(dag_path)], env=env, capture_output=True, text=True, timeout=300
        )
        return child, trap.attempts


def _parse_problems(parsed: dict[str, Any], connections: int, max_parse_seconds: float) -> list[str]:
    """What is wrong with the parse itself: import errors, database connections, its time."""
    problems = [f"import error in {path}: {error}" for path, error in parsed["import_errors"].items()]
    if connections:
        problems.append(
            f"parsing opened {connections} database connection(s); a DAG file must not touch a database at parse time"
        )
    if parsed["seconds"] > max_parse_seconds:
        problems.append(f"parsing took {parsed['seconds']:.3f} s, more than the allowed {max_parse_seconds} s")
    return problems


def _graph_problems(
    expected: dict[str, set[tuple[str, str]]], parsed_dags: dict[str, Any], targets: str | os.PathLike[str]
) -> list[str]:
    """Each expected DAG missing or unlike its contract's graph, then each DAG the targets file does not declare."""
    problems = []
    for dag_id, edges in sorted(expected.items()):
        found = parsed_dags.get(dag_id)
        if found is None:
            problems.append(f"DAG {dag_id} is missing")
            continue
        differences = _graph_differences(edges, found)
        if differences:
            problems.append(f"DAG {dag_id} differs from the contract's graph: {'; '.join(differences)}")
    problems += [f"DAG {dag_id} is not declared in {targets}" for dag_id in sorted(set(parsed_dags) - set(expected))]
    return problems


def _graph_differences(edges: set[tuple[str, str]], found: dict[str, Any]) -> list[str]:
    """Each way the parsed DAG (``found``: its tasks and edges) differs from ``edges``; empty when it does not."""
    actual = {tuple(edge) for edge in found["edges"]}
    tasks = {task for edge in edges for task in edge}
    return [
        f"{what} {sorted(items)}"
        for what, items in (
            ("tasks missing", tasks - set(found["tasks"])),
            ("unexpected tasks", set(found["tasks"]) - tasks),
            ("edges missing", edges - actual),
            ("unexpected edges", actual - edges),
        )
        if items
    ]


def assert_dag_integrity(
    dag_file: str | os.PathLike[str],
    targets: str | os.PathLike[str],
    *,
    max_parse_seconds: float = DEFAULT_MAX_PARSE_SECONDS,
) -> IntegrityReport:
    """``check_dag_integrity``, failing with every problem named (an AssertionError, as pytest reports it)."""
    report = check_dag_integrity(dag_file, targets, max_parse_seconds=max_parse_seconds)
    if not report.ok:
        raise AssertionError(str(report))
    return report


def _parse(dag_file: str) -> dict[str, Any]:
    """In the child: Airflow's DagBag on the file, timed once Airflow itself is imported; tasks and edges."""
    import time

    from airflow.dag_processing.dagbag import DagBag

    started = time.perf_counter()
    bag = DagBag(dag_folder=dag_file)
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "import_errors": {str(path): str(error) for path, error in bag.import_errors.items()},
        "dags": {
            dag_id: {
                "tasks": sorted(dag.task_ids),
                "edges": sorted([upstream, task.task_id] for task in dag.tasks for upstream in task.upstream_task_ids),
            }
            for dag_id, dag in bag.dags.items()
        },
    }


if __name__ == "__main__":
    # The last line of stdout is the result; Airflow may print before it.
    print(json.dumps(_parse(sys.argv[1])))
