"""The README and docs/ name only what exists: every repository path they mention, every
`make` target and every `catalog-tuner` command."""

import re
from pathlib import Path

import pytest

from pipeline.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TOP = ("pipeline/", "jobs/", "slurm/", "results/", "docs/", "tests/", "containers/", ".ci/")


def named_paths(page: Path) -> set[str]:
    """Repository paths in backticks or link targets, resolved like the page's links."""
    text = page.read_text()
    found = set()
    for raw in re.findall(r"`([^`\s]+)`", text) + re.findall(r"\]\(([^)#\s]+)", text):
        path = (page.parent / raw).resolve().relative_to(REPO).as_posix() if raw.startswith("..") else raw
        if path.startswith(TOP) and not re.search(r"[<>*{}]|[A-Z]{3,}_", path):
            found.add(path.rstrip(","))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_path_a_page_names_exists(page):
    missing = sorted(p for p in named_paths(page) if not (REPO / p).exists())
    assert not missing, f"{page.name} names {missing}"


def test_the_pages_name_real_make_targets_and_commands():
    targets = set(re.findall(r"^([a-z-]+):", (REPO / "Makefile").read_text(), re.M))
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    for page in PAGES:
        text = page.read_text()
        assert set(re.findall(r"(?:^|`)make ([a-z][a-z-]+)", text, re.M)) <= targets, page.name
        assert set(re.findall(r"catalog-tuner ([a-z]+) ", text)) <= commands, page.name


def test_the_readme_stays_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= 150
