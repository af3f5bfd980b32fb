"""The README's generated tables (lock table, trigger form), written from the library's own definitions.

python -m devkit.readme_tables          # rewrite them in README.md
python -m devkit.readme_tables --check  # exit 1 if README.md is out of date (the test suite does this)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from fk_maintenance.airflow.fleet import AFTER_STEPS, BEFORE_STEPS
from fk_maintenance.keys.settings import form_table_markdown
from fk_maintenance.keys.spec import VISION_KPIS_PARENT_FK
from fk_maintenance.steps.registry import lock_table_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def generated_sections() -> dict[str, str]:
    return {
        "lock table": lock_table_markdown(VISION_KPIS_PARENT_FK.table, BEFORE_STEPS, AFTER_STEPS),
        "trigger form": form_table_markdown(),
    }


def render(text: str) -> str:
    for name, table in generated_sections().items():
        pattern = re.compile(
            rf"(<!-- generated: {name} \(python -m devkit.readme_tables\) -->\n).*?(<!-- end: {name} -->)", re.S
        )
        if not pattern.search(text):
            raise LookupError(f"README.md has no generated section {name!r}")
        text = pattern.sub(lambda m, table=table: m.group(1) + table + "\n" + m.group(2), text)
    return text


def main(argv: list[str]) -> int:
    current = README.read_text()
    wanted = render(current)
    if "--check" in argv:
        if current != wanted:
            print("README.md's generated tables are out of date: run python -m devkit.readme_tables", file=sys.stderr)
            return 1
        return 0
    README.write_text(wanted)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
