"""The documentation: its Python examples run, its links resolve, its settings page is current.

Every ```python block of README.md and docs/*.md runs here, unless the line
before it is ``<!-- norun: reason -->``. The blocks of one page run in order in
one namespace, so a page can build on its earlier blocks, in a temporary
working directory, on the session's cluster made the current client (so
estimators without a ``scheduler_address`` train there). A test id names the
page and the block's first line, and a traceback points into the page.
"""

from __future__ import annotations

import os
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from daskdist.settings_doc import COMMAND, settings_markdown

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MAX_NORUN = 5

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_NORUN = re.compile(r"^\s*<!--\s*norun:\s*(?P<reason>.*?)\s*-->\s*$")
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\((?P<target>[^)\s]+)\)|!\[[^\]]*\]\((?P<image>[^)\s]+)\)")


@dataclass(frozen=True)
class Block:
    page: str     # relative to the repository root
    number: int   # 1-based, among the page's blocks of any language
    line: int     # the first line of code, 1-based
    language: str
    code: str
    norun: str | None  # the reason given in a preceding <!-- norun: ... -->

    @property
    def id(self) -> str:
        return f"{self.page}-block{self.number}-line{self.line}"


def _fences(lines: list[str]):
    """``(opening line, first code line, closing line, info string)`` of each fenced block."""
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence = match["fence"]
        closing = re.compile(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        end = i + 1
        while end < len(lines) and not closing.match(lines[end]):
            end += 1
        yield i, i + 1, end, match["info"].strip()
        i = end + 1


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found = []
    for number, (opening, start, end, info) in enumerate(_fences(lines), 1):
        previous = next((line for line in reversed(lines[:opening]) if line.strip()), "")
        norun = _NORUN.match(previous)
        found.append(Block(page=path.relative_to(ROOT).as_posix(), number=number,
                           line=start + 1, language=(info.split() or [""])[0].lower(),
                           code=textwrap.dedent("\n".join(lines[start:end])),
                           norun=norun["reason"] if norun else None))
    return found


def prose(path: Path) -> list[str]:
    """The lines of a Markdown file outside its fenced code blocks."""
    lines = path.read_text(encoding="utf-8").splitlines()
    inside = {i for opening, _, end, _ in _fences(lines) for i in range(opening, end + 1)}
    return [line for i, line in enumerate(lines) if i not in inside]


ALL_BLOCKS = [block for page in PAGES for block in blocks(page)]
PYTHON = [block for block in ALL_BLOCKS if block.language in ("python", "py")]
TO_RUN = [block for block in PYTHON if block.norun is None]


def test_there_are_pages_and_examples():
    assert (ROOT / "docs").is_dir() and len(PAGES) > 1
    assert TO_RUN, "no Python examples found in the documentation"


def test_few_examples_are_left_unrun_and_each_says_why():
    skipped = [block for block in PYTHON if block.norun is not None]
    assert len(skipped) <= MAX_NORUN, (
        f"{len(skipped)} python blocks are marked norun, at most {MAX_NORUN} may be: "
        + ", ".join(block.id for block in skipped))
    assert all(block.norun for block in skipped), "a norun comment must give a reason"


class _Page:
    """The shared namespace and working directory of one page's blocks."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.namespace = {"__name__": "__docs_example__"}
        self.done = 0          # blocks of the page run so far
        self.failed: str | None = None


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    made: dict[str, _Page] = {}

    def get(page: str) -> _Page:
        if page not in made:
            made[page] = _Page(tmp_path_factory.mktemp(re.sub(r"\W", "-", page)))
        return made[page]

    return get


def _run(block: Block, page: _Page):
    # Pad with blank lines so that a traceback names the page and its line.
    source = "\n" * (block.line - 1) + block.code
    exec(compile(source, block.page, "exec"), page.namespace)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("block", TO_RUN, ids=lambda block: block.id)
def test_example_runs(block, pages, session_client):
    page = pages(block.page)
    mine = [b for b in TO_RUN if b.page == block.page]
    position = mine.index(block)
    if page.failed is not None:
        pytest.fail(f"an earlier block of {block.page} failed: {page.failed}")
    cwd = os.getcwd()
    os.chdir(page.workdir)
    try:
        with session_client.as_current():
            # Run the page's earlier blocks first when this one was selected alone.
            for earlier in mine[page.done:position + 1]:
                try:
                    _run(earlier, page)
                except BaseException:
                    page.failed = earlier.id
                    raise
                page.done += 1
    finally:
        os.chdir(cwd)


def test_settings_page_is_generated_from_the_schema():
    page = ROOT / "docs" / "settings.md"
    assert page.is_file(), f"docs/settings.md is missing; run `{COMMAND}` from the repository root"
    assert page.read_text(encoding="utf-8") == settings_markdown(), (
        "docs/settings.md differs from what daskdist/daskdist.yaml and "
        f"daskdist/daskdist-schema.yaml give: run `{COMMAND}` from the repository root "
        "and commit the result")


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file (outside code blocks)."""
    anchors, seen = set(), {}
    for line in prose(path):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading[1].lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_between_pages_resolve(path):
    text = "\n".join(prose(path))
    broken = []
    for match in _LINK.finditer(text):
        target = match["target"] or match["image"]
        if re.match(r"^[a-z]+:", target):  # http(s), mailto
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target} (no heading with that anchor)")
    assert not broken, f"{path.relative_to(ROOT)}: broken links: {', '.join(broken)}"
