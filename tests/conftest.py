"""Shared fixtures: a real PostgreSQL (embedded, or KPI_TEST_DSN), one fresh database per test, and a
throw-away Airflow home with SQLite metadata for the DAG tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "plugins"), str(REPO)]

# Airflow reads its configuration when first imported, so its environment is set before any test imports it.
from devkit.airflow_env import airflow_env  # noqa: E402

AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="kpi-airflow-"))
os.environ.update(airflow_env(AIRFLOW_HOME))

import psycopg  # noqa: E402

from devkit.app_db import Generated, build_app_database  # noqa: E402
from devkit.pg import PgServer  # noqa: E402
from fk_maintenance.keys.spec import VISION_KPIS_PARENT_FK, ForeignKeySpec  # noqa: E402

Connect = Callable[[], psycopg.Connection]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """KPI_TEST_PG=15|16|18: a fresh cluster of that major; KPI_TEST_DSN: an existing server; else embedded 18."""
    dsn = os.environ.get("KPI_TEST_DSN")
    major = os.environ.get("KPI_TEST_PG")
    server = PgServer.of_major(int(major)) if major else PgServer(dsn) if dsn else PgServer.embedded()
    yield server
    server.stop()


class TestDatabase:
    """One database of the test server, with the ways a test talks to it."""

    def __init__(self, server: PgServer, name: str) -> None:
        self.server = server
        self.name = name
        self.dsn = server.dsn(name)

    def connect(self, **kwargs: object) -> psycopg.Connection:
        return psycopg.connect(self.dsn, autocommit=True, **kwargs)  # type: ignore[arg-type]

    def query(self, query: str, params: object = None) -> list[tuple]:
        with self.connect() as conn:
            return conn.execute(query, params).fetchall()  # type: ignore[arg-type]

    def execute(self, query: object, params: object = None) -> None:
        with self.connect() as conn:
            conn.execute(query, params)  # type: ignore[arg-type]

    def scalar(self, query: str, params: object = None) -> object:
        return self.query(query, params)[0][0]

    def build(self, rows: int, orphan_ratio: float = 0.01, seed: int = 1) -> Generated:
        with self.connect() as conn:
            return build_app_database(conn, rows, orphan_ratio=orphan_ratio, seed=seed)


@pytest.fixture
def db(pg_server: PgServer) -> Iterator[TestDatabase]:
    name = pg_server.create_database()
    yield TestDatabase(pg_server, name)
    pg_server.drop_database(name)


@pytest.fixture
def spec() -> ForeignKeySpec:
    return VISION_KPIS_PARENT_FK


class Fleet:
    """Databases of the test server, each behind its own Airflow connection (``fleet_<n>``)."""

    def __init__(self, pg_server, monkeypatch: pytest.MonkeyPatch) -> None:
        self.server = pg_server
        self.monkeypatch = monkeypatch
        self.databases: dict[str, TestDatabase] = {}
        self.unreachable: list[str] = []

    def add(self, kind: str, rows: int = 400, seed: int = 1):
        conn_id = f"fleet_{len(self.databases) + len(self.unreachable)}_{kind}"
        if kind == "unreachable":
            self.unreachable.append(conn_id)
            self._connection(conn_id, json.dumps({"conn_type": "postgres", "host": "127.0.0.1", "port": 1}))
            return conn_id
        db = TestDatabase(self.server, self.server.create_database())
        db.build(rows, seed=seed)
        if kind == "conflict":
            db.execute(
                "ALTER TABLE vision_kpis ADD CONSTRAINT vision_kpis_parent_kpi_id_fkey FOREIGN KEY (parent_kpi_id) "
                "REFERENCES vision_kpis(id) ON DELETE CASCADE NOT VALID"
            )
        elif kind == "cycle":
            a, b = (r[0] for r in db.query("SELECT id FROM vision_kpis WHERE level = 'daily' ORDER BY id LIMIT 2"))
            db.execute("UPDATE vision_kpis SET parent_kpi_id = %s WHERE id = %s", [b, a])
            db.execute("UPDATE vision_kpis SET parent_kpi_id = %s WHERE id = %s", [a, b])
        self.databases[conn_id] = db
        self._connection(conn_id, self.server.airflow_connection_json(db.name))
        return conn_id

    def _connection(self, conn_id: str, value: str) -> None:
        self.monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", value)

    def drop(self) -> None:
        for db in self.databases.values():
            self.server.drop_database(db.name)


@pytest.fixture
def fleet(pg_server, monkeypatch) -> Iterator[Fleet]:
    made = Fleet(pg_server, monkeypatch)
    yield made
    made.drop()


@pytest.fixture(scope="session")
def airflow_home() -> Path:
    """Migrated SQLite metadata for dag.test(); done once per session (a few seconds)."""
    from devkit.airflow_env import migrate

    migrate(AIRFLOW_HOME)
    return AIRFLOW_HOME


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package's wheel, built once per session (the package tests and the command's tests install it)."""
    # Built from a copy holding only what the build reads, so the checkout gets no build/ folder.
    source = tmp_path_factory.mktemp("source")
    shutil.copy(REPO / "pyproject.toml", source)
    shutil.copytree(REPO / "plugins" / "fk_maintenance", source / "plugins" / "fk_maintenance")
    shutil.copytree(REPO / "sql", source / "sql")
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out), "."],
        cwd=source,
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("kpi_fk_maintenance-*.whl")
    return built


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """The app's pinned node_modules (drizzle-kit), installed once into a cache (devkit.drizzle)."""
    from devkit.drizzle import NodeToolingMissing, install_node_modules

    try:
        return install_node_modules()
    except NodeToolingMissing as missing:
        pytest.fail(str(missing))  # a failure, never a silent skip: CI must run these


FIGURES: list[str] = []


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Record a measured figure; all are printed at the end of the run, so a reader sees the margins."""

    def record(line: str) -> None:
        FIGURES.append(f"{request.node.name}: {line}")

    return record


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("measured app impact (fault and load scenarios)")
        for line in FIGURES:
            terminalreporter.write_line(line)
