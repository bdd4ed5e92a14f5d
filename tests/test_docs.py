"""README.md and docs/: every relative link resolves (file and #anchor), docs/cli.md is current, every flag of every
command is documented, and the README stays short. Covers cli/docgen.py."""
from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from instdisc_cli.docgen import cli_reference
from instdisc_cli.main import cli

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped (hyphens kept), spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # headings, not code
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, flags=re.M)}


def test_slug_follows_github():
    assert slug("Recipes: `fast` and `paper`") == "recipes-fast-and-paper"
    assert slug("`--recipe paper` on this data: it does not learn") == "--recipe-paper-on-this-data-it-does-not-learn"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_relative_link_resolves(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link to a missing file {target}"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{page.name}: no heading #{anchor} in {dest.name}"


def test_cli_reference_is_current():
    assert (ROOT / "docs" / "cli.md").read_text(encoding="utf-8") == cli_reference(), (
        "docs/cli.md is stale: run `python -m instdisc_cli.docgen > docs/cli.md`")


def test_every_flag_of_every_command_is_documented():
    docs = "\n".join(p.read_text(encoding="utf-8") for p in PAGES)
    missing = []
    for name, cmd in cli.commands.items():
        assert f"instdisc {name}" in docs, name
        for p in cmd.params:
            if isinstance(p, click.Option):
                missing += [f"{name} {o}" for o in (*p.opts, *p.secondary_opts) if o.startswith("--") and o not in docs]
    assert not missing, missing


def test_readme_stays_short():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 250
