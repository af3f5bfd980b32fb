"""The app's real drizzle-kit, for the tests: installed once from app/package-lock.json into a cache folder, run
against a working copy of app/ (so generate never writes into the checkout)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote

from psycopg.conninfo import conninfo_to_dict

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "app"
CACHE = Path(os.environ.get("KPI_NODE_CACHE", Path.home() / ".cache" / "kpi-fk-maintenance" / "node"))
# What the pipeline creates on live databases; the app's schema.ts marks it, so a test can build the app's
# table as it was before the pipeline, with the app's own tool.
PIPELINE_MANAGED = re.compile(r"\n[ \t]*// kpi-fk-maintenance: begin.*?// kpi-fk-maintenance: end", re.S)


class NodeToolingMissing(RuntimeError):
    pass


def install_node_modules() -> Path:
    """node_modules for app/, from its lock file, in a cache folder keyed by the lock file's content."""
    npm = shutil.which("npm")
    if npm is None:
        raise NodeToolingMissing(
            "npm is not on PATH: the drizzle-kit tests need Node.js 20 and npm (Debian: apt-get install nodejs npm)"
        )
    manifest = (APP / "package.json").read_bytes() + (APP / "package-lock.json").read_bytes()
    target = CACHE / hashlib.sha256(manifest).hexdigest()[:16]
    if not (target / "node_modules" / ".bin" / "drizzle-kit").exists():
        target.mkdir(parents=True, exist_ok=True)
        for name in ("package.json", "package-lock.json"):
            shutil.copy(APP / name, target / name)
        result = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=target,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0:
            raise NodeToolingMissing(f"npm ci of app/package-lock.json failed:\n{result.stdout}\n{result.stderr}")
    return target / "node_modules"


def app_copy(node_modules: Path, into: Path, *, before_pipeline: bool = False) -> Path:
    """A working copy of app/; with ``before_pipeline``, its schema.ts without what the pipeline creates."""
    shutil.copytree(APP, into, ignore=shutil.ignore_patterns("node_modules"))
    (into / "node_modules").symlink_to(node_modules)
    if before_pipeline:
        schema = into / "src" / "lib" / "db" / "schema.ts"
        schema.write_text(PIPELINE_MANAGED.sub("", schema.read_text()))
    return into


def scratch_app(
    node_modules: Path, into: Path, schema_ts: str, *, schema_filter: tuple[str, ...] = ("public",)
) -> Path:
    """A copy of app/ with a schema.ts of the test's own and no migrations yet (``drizzle-kit generate`` writes
    them), its drizzle.config.ts managing the schemas of ``schema_filter``."""
    app = app_copy(node_modules, into)
    shutil.rmtree(app / "drizzle" / "migrations")
    (app / "src" / "lib" / "db" / "schema.ts").write_text(schema_ts)
    config = app / "drizzle.config.ts"
    out = '  out: "./drizzle/migrations",\n'
    assert out in config.read_text(), "app/drizzle.config.ts no longer names its out folder as this expects"
    config.write_text(config.read_text().replace(out, out + f"  schemaFilter: {json.dumps(list(schema_filter))},\n"))
    return app


def database_url(dsn: str) -> str:
    """A node-postgres URL for a libpq DSN (a socket directory goes in the host parameter)."""
    params = conninfo_to_dict(dsn)
    user = quote(params.get("user") or "postgres")
    password = f":{quote(params['password'])}" if params.get("password") else ""
    host = params.get("host") or "localhost"
    port = params.get("port") or "5432"
    base = f"postgresql://{user}{password}@"
    if host.startswith("/"):
        return f"{base}localhost:{port}/{quote(params['dbname'])}?host={quote(host)}"
    return f"{base}{host}:{port}/{quote(params['dbname'])}"


def drizzle_kit(app_dir: Path, dsn: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": database_url(dsn), "NO_COLOR": "1", "CI": "1"}
    return subprocess.run(
        [str(app_dir / "node_modules" / ".bin" / "drizzle-kit"), *args],
        cwd=app_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
