"""The front door: README.md's links and anchors resolve (on GitHub and on the documentation site), it stays short,
and the documentation's generated tables are caught when stale.

`mkdocs build --strict` (in scripts/test.sh) checks the links inside docs/; README.md lies outside docs/, so its
links are checked here.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

from devkit import doc_tables

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

_LINK = re.compile(r"!?\[(?:[^\]]|\][^(])*?\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_HEADING = re.compile(r"^#{1,6}\s+(?P<text>.+?)\s*#*\s*$", re.M)


def _prose(markdown: str) -> str:
    """The text outside fenced code blocks (a `#` comment in a bash block is not a heading)."""
    return _FENCE.sub("", markdown)


def _plain(heading: str) -> str:
    """A heading's text as rendered: without inline code marks, emphasis or link targets."""
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    heading = re.sub(r"\{[#.][^}]*\}\s*$", "", heading)  # attr_list
    return heading.replace("`", "").replace("**", "").replace("*", "")


def github_slug(heading: str) -> str:
    text = _plain(heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def mkdocs_slug(heading: str) -> str:
    """Python-Markdown's toc.slugify, which MkDocs uses."""
    text = unicodedata.normalize("NFKD", _plain(heading)).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(path: Path) -> set[str]:
    """The anchors both GitHub and the documentation site give the page's headings (a link must work on both)."""
    headings = [match["text"] for match in _HEADING.finditer(_prose(path.read_text()))]
    return {github_slug(h) for h in headings} & {mkdocs_slug(h) for h in headings}


def links(path: Path) -> list[str]:
    return [match["target"] for match in _LINK.finditer(_prose(path.read_text()))]


def broken_links(path: Path) -> list[str]:
    """Every relative link of a Markdown file whose file or anchor does not exist."""
    broken = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not ours to check
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (linked.suffix != ".md" or anchor not in anchors(linked)):
            broken.append(f"{target}: no heading with that anchor in {linked.name}")
    return broken


def test_every_link_of_the_readme_resolves() -> None:
    found = links(README)
    assert any(target.startswith("docs/") for target in found), found
    assert not broken_links(README)


def test_the_link_check_catches_a_missing_page_and_a_missing_anchor(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## The pool `fk_maintenance`\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "[ok](docs/page.md) [ok](docs/page.md#the-pool-fk_maintenance) [ok](#top)\n\n# Top\n\n"
        "[gone](docs/gone.md) [no anchor](docs/page.md#nowhere)\n\n```bash\n[not a link](docs/x.md)\n```\n"
    )
    broken = broken_links(readme)
    assert len(broken) == 2 and broken[0].startswith("docs/gone.md") and "#nowhere" in broken[1], broken


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("How it stays safe", "how-it-stays-safe"),
        ("The pool `fk_maintenance`", "the-pool-fk_maintenance"),
        ("In CI: the app's schema, then `plan`", "in-ci-the-apps-schema-then-plan"),
        ("`orphans: delete` at 1M rows", "orphans-delete-at-1m-rows"),
    ],
)
def test_headings_get_the_same_anchor_on_github_and_on_the_site(heading: str, slug: str) -> None:
    assert github_slug(heading) == mkdocs_slug(heading) == slug


def test_the_readme_is_a_front_door() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    # CI (.ci/run) calls scripts/test.sh: the README names exactly the commands a newcomer runs.
    assert "scripts/demo.sh " in text and "scripts/test.sh " in text
    pages = [README, *REPO.glob("docs/*.md")]
    headings = [match["text"] for path in pages for match in _HEADING.finditer(_prose(path.read_text()))]
    assert not [h for h in headings if re.search(r"\bissues?\s*#?\d", h, re.I)]


def test_a_stale_generated_table_is_caught_on_any_page(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    for path in doc_tables.pages():
        copy = tmp_path / path.relative_to(doc_tables.ROOT)
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(path.read_text())
    assert doc_tables.stale_pages(tmp_path) == []
    page = tmp_path / "docs" / "safety.md"
    page.write_text(page.read_text().replace("| post_checks |", "| post_checks (edited by hand) |"))
    assert doc_tables.stale_pages(tmp_path) == [page]
    page.write_text(doc_tables.render(page.read_text()))
    assert doc_tables.stale_pages(tmp_path) == []
    # A table whose markers were deleted has no home: that is an error, not a pass.
    page.write_text(re.sub(r"<!-- (generated|end): lock table.*?-->", "", page.read_text()))
    with pytest.raises(LookupError, match="lock table"):
        doc_tables.stale_pages(tmp_path)


def test_the_readme_step_table_names_every_step_of_the_registry_in_order() -> None:
    """The README's short table of the steps is written by hand (the generated one, with every lock, is in
    docs/safety.md): it must name exactly the registry's steps, in their order, and the report."""
    from fk_maintenance.steps.registry import REPORT_TASK, STEPS

    section = README.read_text().split("## The steps and their locks", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    named = [name.strip() for row in rows[1:] for name in row.split(",")]
    assert named == [step.name for step in STEPS] + [REPORT_TASK], named
