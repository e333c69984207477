"""The README and docs/ stay honest: a short README with the two commands, every pipeline module named in its Layout
and in docs/architecture.md's rooms table, and every relative link pointing at a file (and heading) that exists.

The module list comes from the file system, so a module added without a word of documentation fails here.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
COMMANDS = [
    "scripts/setup.sh && .venv/bin/doit domain=configs/demo",
    "scripts/setup.sh && .venv/bin/pytest -n auto",
]
README_LIMIT = 6000  # bytes: what it is, the two commands, a tour and links; the rest lives in docs/

FENCE = re.compile(r"^```.*?^```[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")


def shown(path: Path) -> str:
    """A path as a message names it: relative to the checkout where it is inside."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def modules() -> list[str]:
    """Every module of the pipeline package, by the name the docs use for it (no package marker)."""
    return sorted(p.stem for p in (ROOT / "pipeline").glob("*.py") if p.stem != "__init__")


def section(path: Path, heading: str) -> str:
    """The text of a `## heading` section of a page, up to the next heading of the same level."""
    text = path.read_text()
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"{shown(path)} has no '## {heading}' section"
    return match.group(1)


def prose(text: str) -> str:
    """A page without its fenced code blocks: what is rendered as text and links."""
    return FENCE.sub("", text)


def anchor(heading: str) -> str:
    """The fragment GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", prose(path.read_text()), re.M)}


def relative_links(path: Path) -> list[str]:
    """The link targets of a page that point into the checkout (no scheme, not a bare in-page fragment)."""
    text = INLINE_CODE.sub("", prose(path.read_text()))
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]


# -- the README -------------------------------------------------------------------------------------------------------


def test_readme_is_short() -> None:
    size = len(README.read_bytes())
    assert size < README_LIMIT, f"README.md is {size} bytes; move detail to docs/ to bring it under {README_LIMIT}"


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_has_the_two_commands_verbatim(command: str) -> None:
    assert command in README.read_text()


def test_readme_layout_names_every_module() -> None:
    layout = section(README, "Layout")
    missing = [name for name in modules() if f"`{name}`" not in layout]
    assert missing == [], f"README.md's Layout does not name pipeline modules: {missing}"


def test_readme_layout_names_no_module_that_is_gone() -> None:
    lines = section(README, "Layout").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("- `pipeline/`"))
    sub_list = itertools.takewhile(lambda line: line.startswith("  "), lines[start + 1 :])
    listed = {name for line in sub_list for name in re.findall(r"`(\w+)`", line)}
    assert listed, "README.md's Layout lists no modules under `pipeline/`"
    gone = sorted(listed - set(modules()))
    assert gone == [], f"README.md's Layout names modules that pipeline/ does not have: {gone}"


# -- docs/ ------------------------------------------------------------------------------------------------------------


def test_architecture_rooms_table_names_every_module() -> None:
    rooms = section(DOCS / "architecture.md", "Rooms")
    rows = [line for line in rooms.splitlines() if line.startswith("|")]
    named = {m.group(1) for row in rows for m in [re.match(r"\|\s*`pipeline/(\w+)\.py`\s*\|", row)] if m}
    missing = sorted(set(modules()) - named)
    assert missing == [], f"docs/architecture.md's rooms table has no row for: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    links = relative_links(page)
    broken = []
    for link in links:
        target, _, fragment = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(f"{link}: no file {shown(path)}")
        elif fragment and path.suffix == ".md" and fragment not in anchors(path):
            broken.append(f"{link}: no heading #{fragment} in {shown(path)}")
    assert broken == [], f"{shown(page)}: {broken}"


def test_readme_links_every_docs_page() -> None:
    linked = {(README.parent / link.partition("#")[0]).resolve() for link in relative_links(README)}
    unlinked = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert unlinked == [], f"README.md does not link docs/ pages: {unlinked}"


def test_the_checks_bite() -> None:
    # The helpers find what they are meant to find, so an empty result above means something.
    assert "tasks" in modules() and "__init__" not in modules()
    assert anchor("Runs that get interrupted, overlap or share a directory") == (
        "runs-that-get-interrupted-overlap-or-share-a-directory"
    )
    assert anchor("Debugging: `CIM_DEBUG=1`") == "debugging-cim_debug1"
    sample = "see [a](docs/x.md#y), [b](https://example.org), `[c](nope.md)`\n```\n[d](gone.md)\n```\n"
    assert LINK.findall(INLINE_CODE.sub("", prose(sample))) == ["docs/x.md#y", "https://example.org"]
