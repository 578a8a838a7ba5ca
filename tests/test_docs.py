"""The documentation: its settings page is current."""

from __future__ import annotations

from pathlib import Path

from daskdist.settings_doc import COMMAND, settings_markdown

ROOT = Path(__file__).resolve().parent.parent


def test_settings_page_is_generated_from_the_schema():
    page = ROOT / "docs" / "settings.md"
    assert page.is_file(), f"docs/settings.md is missing; run `{COMMAND}` from the repository root"
    assert page.read_text(encoding="utf-8") == settings_markdown(), (
        "docs/settings.md differs from what daskdist/daskdist.yaml and "
        f"daskdist/daskdist-schema.yaml give: run `{COMMAND}` from the repository root "
        "and commit the result")
