"""Design references in the code point at notes the repository has (docs/DESIGN_NOTES.md)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTES = ROOT / "docs" / "DESIGN_NOTES.md"
CODE_DIRS = ("stitchlib", "serving", "training", "benchmarks", "tests")


def _code_files():
    for d in CODE_DIRS:
        yield from (ROOT / d).rglob("*.py")


def test_code_cites_only_the_design_notes_in_the_repository():
    bare = re.compile(r"(?<![\w/])DESIGN(\.md| pitfall)")  # the old out-of-repo file
    offenders = []
    for path in _code_files():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if bare.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "cite docs/DESIGN_NOTES.md instead:\n" + "\n".join(offenders)


def test_cited_sections_exist():
    headings = set(re.findall(r"^## (\d+)\.", NOTES.read_text(encoding="utf-8"), re.M))
    cited = set()
    for path in _code_files():
        text = path.read_text(encoding="utf-8")
        cited |= set(re.findall(r"DESIGN_NOTES\.md\s+section\s+(\d+)", text))
    assert cited, "no citation found: the pattern or the code changed"
    assert cited <= headings, f"sections cited but missing from {NOTES.name}: {sorted(cited - headings)}"
