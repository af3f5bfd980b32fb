"""The library as an installable package: a wheel carries the SQL inside it, so a deployment that installs
it needs no sql/ folder beside it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_carries_every_module_and_the_sql_exactly_as_written_in_sql(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for sql_file in (REPO / "sql").glob("*.sql"):
            assert archive.read(f"fk_maintenance/sql/{sql_file.name}") == sql_file.read_bytes()
    # Every module of every room: a room missing from pyproject.toml's package list would leave the wheel without it.
    package = REPO / "plugins" / "fk_maintenance"
    modules = {f"fk_maintenance/{p.relative_to(package).as_posix()}" for p in package.rglob("*.py")}
    assert modules <= names, sorted(modules - names)


def test_the_installed_package_reads_its_sql_with_no_sql_folder_anywhere(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    probe = (
        "import fk_maintenance.db.sqlfiles as s, fk_maintenance.keys.spec as spec\n"
        f"assert str(s.SQL_DIR).startswith({str(site)!r}), s.SQL_DIR\n"
        "for family, name in [('orphans', 'keys'), ('constraint', 'add_not_valid'), ('session', 'configure')]:\n"
        "    assert s.statement(family, name, spec.VISION_KPIS_PARENT_FK)\n"
    )
    # Only the install target on the path (the checkout's plugins/ and sql/ are out of reach), run elsewhere.
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
