"""The docs: the generated option page is current, the README stays short and keeps its quickstart, and every
relative link in the README and the docs points at a file that exists.

``mkdocs build --strict`` (run by ``.ci/run``) checks the site itself: the nav, links between pages, anchors.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from hevc_vit.cli.encode import add_option_arguments
from hevc_vit.encode.options.reference import REGENERATE, options_markdown

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
OPTIONS_PAGE = DOCS / "encode" / "options.md"
MAX_README_LINES = 150

# the README's two quickstart commands, verbatim: the first is what a new user runs, the second is what CI runs
QUICKSTART = [
    "python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 -e '.[video]' && .venv/bin/hevc-vit encode",
    "python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 -e '.[test,video]' "
    "&& .venv/bin/python -m pytest -q",
]

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")


def test_options_page_is_generated_from_encode_options():
    assert OPTIONS_PAGE.read_text(encoding="utf-8") == options_markdown(), (
        f"{OPTIONS_PAGE.relative_to(ROOT)} differs from what EncodeOptions generates; regenerate it: {REGENERATE}"
    )


def test_options_page_lists_every_flag_of_the_command_line():
    """Every ``--flag`` the CLI builds from EncodeOptions, taken from the parser itself, is on the page."""
    parser = argparse.ArgumentParser()
    add_option_arguments(parser)
    flags = [s for action in parser._actions for s in action.option_strings if s.startswith("--") and s != "--help"]
    assert len(flags) > 20
    page = OPTIONS_PAGE.read_text(encoding="utf-8")
    missing = [flag for flag in flags if f"`{flag}`" not in page and f"`{flag} " not in page]
    assert not missing, f"flags of hevc-vit encode missing from {OPTIONS_PAGE.relative_to(ROOT)}: {missing}"


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, (
        f"README.md has {lines} lines; expected at most {MAX_README_LINES}: move the details to a page in docs/"
    )


def test_readme_quickstart_is_the_two_commands():
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Quickstart\n", 1)
    assert len(section) == 2, "README.md has no '## Quickstart' section"
    block = re.search(r"```bash\n(.*?)```", section[1], re.S)
    assert block is not None, "README.md's quickstart has no ```bash block"
    assert block.group(1).splitlines() == QUICKSTART


def _markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def _relative_links(text: str) -> list[str]:
    """Link targets outside code (fenced blocks and code spans), without URLs and page-local anchors."""
    prose = _CODE_SPAN.sub("", _FENCE.sub("", text))
    targets = [m.group(1) for m in _LINK.finditer(prose)]
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def test_relative_links_finds_links_outside_code_only():
    text = 'see [a](a.md#x "title") and [b](https://x.org) [c](#top) [g](../g.md)\n`[d](d.md)`\n```\n[e](e.md)\n```\n'
    assert _relative_links(text) == ["a.md#x", "../g.md"]


@pytest.mark.parametrize("page", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files(page: Path):
    broken = []
    for target in _relative_links(page.read_text(encoding="utf-8")):
        path = target.split("#", 1)[0]
        if path and not (page.parent / path).exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to files that do not exist: {broken}"
