"""The README a new user reads first: what FedHub is, then the two commands, then a table of
contents that lists every section and whose links lead to them."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _outside_code(text: str) -> list[str]:
    lines, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def test_readme_says_what_fedhub_is_before_the_two_commands():
    text = README.read_text()
    first_command = text.index("make demo")
    assert "FedHub is" in text[:first_command]
    assert text.index("make test") < text.index("## ")


def test_the_table_of_contents_lists_every_section_and_each_link_has_its_section():
    lines = _outside_code(README.read_text())
    sections = [line[3:].strip() for line in lines if line.startswith("## ") and line != "## Contents"]
    start = lines.index("## Contents")
    links = []
    for line in lines[start + 1:]:
        if line.startswith("## "):
            break
        links += re.findall(r"\[([^\]]+)\]\(#([^)]+)\)", line)
    assert [title for title, _ in links] == sections
    anchors = {_slug(s) for s in sections}
    assert all(anchor in anchors for _, anchor in links)
