"""docs/guarantees.md: every line names tests, and every test it names exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _guarantees() -> str:
    text = (ROOT / "docs" / "guarantees.md").read_text(encoding="utf-8")
    return re.sub(r"^```.*?^```\n", "", text, flags=re.S | re.M)  # the example on top names no guarantee


def _tests(file: str) -> set[str]:
    tree = ast.parse((ROOT / "tests" / file).read_text(encoding="utf-8"))
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_every_guarantee_names_existing_tests() -> None:
    section = _guarantees()
    items = re.split(r"\n\s*- ", section)[1:]
    assert len(items) >= 6
    cited = 0
    for item in items:
        if re.fullmatch(r"\*\*[^*]+\*\*\s*", item):
            continue  # a heading whose sub-items carry the tests
        refs = re.findall(r"`(test_\w+\.py)?(?:::(\w+))?`", item)
        assert any(f or t for f, t in refs), f"names no test: {item[:80]!r}"
    current = None
    for file, test in re.findall(r"`(test_\w+\.py)?(?:::(\w+))?`", section):
        current = file or current
        assert current is not None and (ROOT / "tests" / current).is_file(), (file, test)
        if test:
            assert test in _tests(current), (
                f"docs/guarantees.md cites {current}::{test}, which does not exist"
            )
            cited += 1
    assert cited >= 30
