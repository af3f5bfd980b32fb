"""Production topology with the real components: PgBouncer in transaction and session pooling with the app's
writers in the same pool, a streaming replica made with pg_basebackup, TLS with a self-signed certificate, and
connections made by the postgres provider's PostgresHook."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import psycopg
import pytest

from devkit.app_db import build_app_database
from devkit.cluster import Cluster, _give_away
from devkit.db_state import snapshot
from devkit.pipeline import run_pipeline
from devkit.pooler import PGBOUNCER, PgBouncer
from devkit.workload import AppWorkload
from fk_maintenance.errors import PoolerNotSupported, PreflightFailed, TargetUnreachable
from fk_maintenance.keys.settings import RunSettings
from fk_maintenance.keys.spec import VISION_KPIS_PARENT_FK
from fk_maintenance.steps.orphans import null_orphans
from fk_maintenance.steps.preflight import preflight

NOW = RunSettings(validate_now=True)
DRY = RunSettings(dry_run=True, validate_now=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    server = Cluster.create(18)
    yield server
    server.stop()


class ClusterDatabase:
    """A database of a devkit cluster, with what devkit.db_state needs."""

    def __init__(self, cluster: Cluster, rows: int, orphan_ratio: float = 0.02) -> None:
        self.cluster = cluster
        self.name = f"kpi_{uuid.uuid4().hex[:8]}"
        cluster.create_database(self.name)
        with self.connect() as conn:
            build_app_database(conn, rows, orphan_ratio=orphan_ratio)

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.cluster.dsn(self.name), autocommit=True)

    def scalar(self, query: str, params: object = None) -> object:
        with self.connect() as conn:
            return conn.execute(query, params).fetchone()[0]  # type: ignore[arg-type]


def _catalog(db: ClusterDatabase) -> dict[str, object]:
    """The target's catalog as snapshot() sees it, without the rows (the app keeps writing)."""
    return {key: value for key, value in snapshot(db, VISION_KPIS_PARENT_FK).items() if key != "data"}


def _pooled(bouncer: PgBouncer, db: ClusterDatabase):
    return lambda: psycopg.connect(bouncer.dsn(db.name), autocommit=True, prepare_threshold=None)


def _traces_of_ours(bouncer: PgBouncer, db: ClusterDatabase, pool_size: int) -> list[str]:
    """What of the pipeline any server connection of the pool still carries, as the app would meet it: as
    many clients as the pool has server connections, each inside a transaction, so each holds its own."""
    clients = [psycopg.connect(bouncer.dsn(db.name), prepare_threshold=None) for _ in range(pool_size)]
    found = []
    try:
        for client in clients:
            name, read_only, lock_timeout, cursors = client.execute(
                "SELECT current_setting('application_name'), current_setting('default_transaction_read_only'), "
                "current_setting('lock_timeout'), (SELECT count(*) FROM pg_cursors)"
            ).fetchone()
            if name.startswith("kpi-fk-maintenance") or read_only == "on" or lock_timeout != "0" or cursors:
                found.append(f"{name} read_only={read_only} lock_timeout={lock_timeout} cursors={cursors}")
    finally:
        for client in clients:
            client.close()
    with db.connect() as direct:
        locks = direct.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone()[0]
        named = direct.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'kpi-fk-maintenance%%'"
        ).fetchone()[0]
    return (
        found + ([f"{locks} advisory lock(s) held"] if locks else []) + ([f"{named} named session(s)"] if named else [])
    )


@pytest.fixture
def pgbouncer_installed() -> None:
    if not PGBOUNCER.exists():
        pytest.fail(f"{PGBOUNCER} is missing: scripts/test.sh installs Debian's pgbouncer when run as root")


@pytest.mark.usefixtures("pgbouncer_installed")
def test_through_a_transaction_pool_runs_are_refused_before_any_change_and_the_app_in_the_pool_never_notices(
    cluster,
) -> None:
    db = ClusterDatabase(cluster, 5000)
    bouncer = PgBouncer(cluster, pool_mode="transaction", pool_size=3)
    try:
        before = _catalog(db)
        with AppWorkload(bouncer.dsn(db.name), pooled=True) as app:
            time.sleep(0.3)
            for settings in (DRY, NOW):
                with pytest.raises(PoolerNotSupported, match="transaction pooling mode") as refused:
                    run_pipeline(_pooled(bouncer, db), VISION_KPIS_PARENT_FK, settings, "pooled-1")
                assert "pool_mode = session" in str(refused.value) and "Nothing was changed" in str(refused.value)
            time.sleep(0.3)
        assert _catalog(db) == before  # no constraint, no index, no audit table: nothing of ours
        assert app.result.errors() == [] and len(app.result.writes()) > 0
        assert _traces_of_ours(bouncer, db, pool_size=3) == []
    finally:
        bouncer.stop()


@pytest.mark.usefixtures("pgbouncer_installed")
def test_through_a_session_pool_a_dry_run_and_a_real_run_converge_and_leave_nothing_in_the_pool(cluster) -> None:
    db = ClusterDatabase(cluster, 5000)
    bouncer = PgBouncer(cluster, pool_mode="session", pool_size=8)
    try:
        with AppWorkload(bouncer.dsn(db.name), pooled=True) as app:
            dry = run_pipeline(_pooled(bouncer, db), VISION_KPIS_PARENT_FK, DRY, "pooled-dry")
            real = run_pipeline(_pooled(bouncer, db), VISION_KPIS_PARENT_FK, NOW, "pooled-1")
        assert dry["report"]["final_state"] == "dry run: nothing changed"
        assert real["report"]["final_state"] == "converged"
        assert real["preflight"]["connection"].startswith("session pooling")
        assert app.result.errors(include_fk_rejections=False) == [] and len(app.result.writes()) > 0
        assert _traces_of_ours(bouncer, db, pool_size=8) == []
    finally:
        bouncer.stop()


def test_batches_wait_while_a_replica_lags_and_none_commits_while_the_lag_is_over_the_limit() -> None:
    primary = Cluster.create(18)
    try:
        db = ClusterDatabase(primary, 3000, orphan_ratio=0.3)
        replica = primary.replica()
        limit_s, paused_for_s = 1, 4.0
        try:
            with replica_connection(replica) as standby, db.connect() as clock:
                standby.execute("SELECT pg_wal_replay_pause()")
                paused_at = clock.execute("SELECT clock_timestamp()").fetchone()[0]
                resumed: dict[str, datetime] = {}

                def resume() -> None:
                    time.sleep(paused_for_s)
                    with db.connect() as conn:
                        resumed["at"] = conn.execute("SELECT clock_timestamp()").fetchone()[0]
                    with replica_connection(replica) as conn:
                        conn.execute("SELECT pg_wal_replay_resume()")

                resumer = threading.Thread(target=resume)
                resumer.start()
                settings = RunSettings(batch_size=10, batch_pause_ms=20, max_replica_lag_s=limit_s)
                with db.connect() as conn:
                    result = null_orphans(conn, VISION_KPIS_PARENT_FK, settings, "lag-1")
                resumer.join()
            # The same database on the standby: a run pointed there is refused before it tries to write.
            with psycopg.connect(replica.dsn(db.name), autocommit=True) as conn:
                with pytest.raises(PreflightFailed, match=r"reaches a standby \(pg_is_in_recovery\(\) is true\)"):
                    preflight(conn, VISION_KPIS_PARENT_FK, RunSettings())
                assert preflight(conn, VISION_KPIS_PARENT_FK, RunSettings(dry_run=True))["dry_run"] is True
        finally:
            replica.stop()
        with db.connect() as conn:
            commits = [
                row[0]
                for row in conn.execute(
                    "SELECT DISTINCT nulled_at FROM fk_maintenance.vision_kpis_orphan_audit ORDER BY 1"
                )
            ]
        assert result["batches"] > 50 and result["replica_waits"] >= 1
        assert result["replica_wait_seconds"] >= paused_for_s - limit_s - 1
        # A batch may commit until the lag reaches the limit (plus one poll and one batch); none after that
        # until replay resumed; the rest after it.
        latest_allowed = paused_at.timestamp() + limit_s + 0.5
        during = [t for t in commits if latest_allowed < t.timestamp() < resumed["at"].timestamp()]
        assert during == [], f"batches committed while the replica lagged: {during}"
        assert any(t > resumed["at"] for t in commits)
    finally:
        primary.stop()


def replica_connection(replica: Cluster) -> psycopg.Connection:
    return psycopg.connect(replica.dsn(), autocommit=True)


def _self_signed(key: Path, certificate: Path, common_name: str) -> None:
    request = f"req -new -x509 -days 2 -nodes -subj /CN={common_name}".split()
    subprocess.run(
        ["openssl", *request, "-keyout", str(key), "-out", str(certificate)],
        check=True,
        capture_output=True,
    )


@pytest.fixture(scope="module")
def tls_cluster() -> Iterator[tuple[Cluster, Path]]:
    # Outside pytest's private temporary folders: the server runs as another user and must read its key.
    certs = Path(tempfile.mkdtemp(prefix="kpi-certs-"))
    _self_signed(certs / "server.key", certs / "server.crt", "127.0.0.1")
    (certs / "server.key").chmod(0o600)
    _give_away(certs)
    certs.chmod(0o755)
    # Debian's PostgreSQL 15 is built with OpenSSL (the embedded builds are not).
    server = Cluster.create(
        15, ssl="on", ssl_cert_file=f"'{certs / 'server.crt'}'", ssl_key_file=f"'{certs / 'server.key'}'"
    )
    server.create_database("goals")
    yield server, certs / "server.crt"
    server.stop()
    shutil.rmtree(certs, ignore_errors=True)


def _airflow_connection(monkeypatch, server: Cluster, **extra: object) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_KPI_DB",
        json.dumps(
            {
                "conn_type": "postgres",
                "host": "127.0.0.1",
                "port": server.port,
                "login": "postgres",
                "password": "not-used-by-trust",
                "schema": "goals",
                "extra": extra,
            }
        ),
    )


def test_tls_with_verify_ca_and_the_root_certificate_in_the_extras_connects_encrypted(
    tls_cluster, monkeypatch, airflow_home
) -> None:
    from fk_maintenance.airflow.tasks import connector

    server, root_cert = tls_cluster
    _airflow_connection(monkeypatch, server, sslmode="verify-ca", sslrootcert=str(root_cert))
    with connector("kpi_db")() as conn:
        ssl, version = conn.execute("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
    assert ssl is True and version.startswith("TLS")


def test_a_certificate_the_root_does_not_sign_is_refused_in_one_line_without_the_password(
    tls_cluster, monkeypatch, airflow_home, tmp_path
) -> None:
    from fk_maintenance.airflow.tasks import connector

    server, _ = tls_cluster
    other = tmp_path / "other.crt"
    _self_signed(tmp_path / "other.key", other, "other")
    _airflow_connection(monkeypatch, server, sslmode="verify-ca", sslrootcert=str(other))
    with pytest.raises(TargetUnreachable) as refused:
        connector("kpi_db")()
    message = str(refused.value)
    assert "certificate verify failed" in message and len(message.splitlines()) == 1
    assert "not-used-by-trust" not in message


def test_libpq_keywords_the_old_allowlist_dropped_reach_libpq(tls_cluster, monkeypatch, airflow_home) -> None:
    from fk_maintenance.airflow.tasks import connector

    server, root_cert = tls_cluster
    # The server trusts every local connection; require_auth makes libpq refuse a server that asks for none.
    _airflow_connection(monkeypatch, server, sslmode="require", require_auth="scram-sha-256")
    with pytest.raises(TargetUnreachable, match=r"require_auth|authentication method requirement"):
        connector("kpi_db")()
    _airflow_connection(
        monkeypatch, server, sslmode="verify-ca", sslrootcert=str(root_cert), options="-c lock_timeout=1234"
    )
    with connector("kpi_db")() as conn:
        assert conn.execute("SHOW lock_timeout").fetchone()[0] == "1234ms"
