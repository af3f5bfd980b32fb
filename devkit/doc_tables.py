"""The documentation's generated tables (lock table, trigger form), written from the library's own definitions.

A page holds a generated section between two markers:

    <!-- generated: lock table (python -m devkit.doc_tables) -->
    ...
    <!-- end: lock table -->

Every Markdown page of the documentation site (docs/**/*.md) and README.md is looked at; each section is rewritten
wherever its markers are, and each generated table must have at least one home.

python -m devkit.doc_tables          # rewrite them in every page that holds their markers
python -m devkit.doc_tables --check  # exit 1 naming every page that is out of date (the test suite does this)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "plugins") not in sys.path:  # python -m devkit.doc_tables from the repository, without the package
    sys.path.insert(0, str(ROOT / "plugins"))

from fk_maintenance.airflow.fleet import AFTER_STEPS, BEFORE_STEPS  # noqa: E402
from fk_maintenance.keys.settings import form_table_markdown  # noqa: E402
from fk_maintenance.keys.spec import VISION_KPIS_PARENT_FK  # noqa: E402
from fk_maintenance.steps.registry import lock_table_markdown  # noqa: E402

COMMAND = "python -m devkit.doc_tables"
# Markers stand on lines of their own (a marker quoted inside a sentence or a code span is not one).
_MARKER = re.compile(
    r"^<!-- generated: (?P<name>[^(\n]+?) \(python -m devkit\.doc_tables\) -->\n(?P<body>.*?)"
    r"^<!-- end: (?P=name) -->$",
    re.S | re.M,
)
_OPENING = re.compile(r"^<!-- generated: (?P<name>.+?) -->$", re.M)


def generated_sections() -> dict[str, str]:
    return {
        "lock table": lock_table_markdown(VISION_KPIS_PARENT_FK.table, BEFORE_STEPS, AFTER_STEPS),
        "trigger form": form_table_markdown(),
    }


def pages(root: Path = ROOT) -> list[Path]:
    """README.md and every page of the documentation site, in a stable order."""
    return [path for path in [root / "README.md", *sorted((root / "docs").rglob("*.md"))] if path.is_file()]


def sections_in(text: str) -> list[str]:
    """The names of the generated sections a page holds (an opening marker without its end is an error)."""
    names = [match["name"] for match in _MARKER.finditer(text)]
    if len(names) != len(_OPENING.findall(text)):
        raise LookupError(
            f"a generated section's markers are malformed (want '<!-- generated: NAME ({COMMAND}) -->' "
            "... '<!-- end: NAME -->')"
        )
    return names


def render(text: str) -> str:
    """The page with every generated section it holds rewritten from the library."""
    sections = generated_sections()
    for name in sections_in(text):
        if name not in sections:
            raise LookupError(f"unknown generated section {name!r} (known: {', '.join(sections)})")

    def rewrite(match: re.Match[str]) -> str:
        opening = match.group(0)[: match.start("body") - match.start()]
        return f"{opening}{sections[match['name']]}\n<!-- end: {match['name']} -->"

    return _MARKER.sub(rewrite, text)


def stale_pages(root: Path = ROOT) -> list[Path]:
    """The pages whose generated sections differ from what the library generates now. Raises when a generated
    table has no home at all (its markers were deleted)."""
    homes: set[str] = set()
    stale = []
    for path in pages(root):
        text = path.read_text()
        homes.update(sections_in(text))
        if render(text) != text:
            stale.append(path)
    missing = set(generated_sections()) - homes
    if missing:
        raise LookupError(f"no page holds the generated section(s) {', '.join(sorted(missing))}")
    return stale


def main(argv: list[str]) -> int:
    if "--check" in argv:
        stale = stale_pages()
        for path in stale:
            print(f"{path.relative_to(ROOT)}: generated tables out of date: run {COMMAND}", file=sys.stderr)
        return 1 if stale else 0
    for path in pages():
        text = path.read_text()
        wanted = render(text)
        if wanted != text:
            path.write_text(wanted)
            print(f"rewrote {path.relative_to(ROOT)}", file=sys.stderr)
    stale_pages()  # every table still has a home
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
