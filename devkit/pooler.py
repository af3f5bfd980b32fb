"""A real PgBouncer (Debian's package) in front of a devkit.cluster server, on a free port, with an auth file
of its own: what production puts between Airflow, the app and PostgreSQL."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from devkit.cluster import Cluster, _give_away, _run_as, free_port

PGBOUNCER = Path("/usr/sbin/pgbouncer")
PASSWORD = "pooled-secret"


class PgBouncer:
    def __init__(self, cluster: Cluster, *, pool_mode: str, pool_size: int) -> None:
        if not PGBOUNCER.exists():
            raise FileNotFoundError(f"{PGBOUNCER} is missing: install Debian's pgbouncer package")
        self.cluster = cluster
        self.pool_mode = pool_mode
        self.port = free_port()
        self.home = Path(tempfile.mkdtemp(prefix=f"kpi-pgbouncer-{pool_mode}-"))
        os.chmod(self.home, 0o755)
        (self.home / "userlist.txt").write_text(f'"postgres" "{PASSWORD}"\n')
        (self.home / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host=127.0.0.1 port={cluster.port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            f"unix_socket_dir = {self.home}\n"
            "auth_type = scram-sha-256\n"
            f"auth_file = {self.home / 'userlist.txt'}\n"
            f"pool_mode = {pool_mode}\n"
            f"default_pool_size = {pool_size}\n"
            "max_client_conn = 200\n"
            f"logfile = {self.home / 'pgbouncer.log'}\n"
            f"pidfile = {self.home / 'pgbouncer.pid'}\n"
        )
        _give_away(self.home)
        self._process = subprocess.Popen(
            [str(PGBOUNCER), str(self.home / "pgbouncer.ini")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            **_run_as(),  # type: ignore[arg-type]
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or self._process.poll() is not None:
                    raise RuntimeError(f"pgbouncer did not start: {self.log()}") from None
                time.sleep(0.05)

    def dsn(self, dbname: str) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres password={PASSWORD} dbname={dbname}"

    def log(self) -> str:
        path = self.home / "pgbouncer.log"
        return path.read_text()[-3000:] if path.exists() else "(no log)"

    def stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
        shutil.rmtree(self.home, ignore_errors=True)
