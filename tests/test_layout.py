"""Import arrows run stages/benchmarks -> trainer -> pipeline, never back; nothing imports benchmarks/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# package -> the project packages it may import (besides itself)
ALLOWED = {
    "pipeline": set(),
    "trainer": {"pipeline"},
    "stages": {"pipeline", "trainer"},
    "benchmarks": {"pipeline", "trainer"},
}


def imported_packages(source: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(ALLOWED)


def violations(package: str, source: str) -> set[str]:
    return imported_packages(source) - ALLOWED[package] - {package}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_follow_the_arrows(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, package
    bad = {str(f.relative_to(ROOT)): violations(package, f.read_text()) for f in files}
    assert not {k: v for k, v in bad.items() if v}


def test_checker_catches_a_backward_arrow() -> None:
    assert violations("pipeline", "from trainer.model import SimpleCNN\n") == {"trainer"}
    assert violations("trainer", "import benchmarks.loader\n") == {"benchmarks"}
    assert violations("stages", "from trainer.run import fit\nimport pipeline.cli\n") == set()


def test_trainer_holds_no_benchmark_code() -> None:
    names = {p.stem for p in (ROOT / "trainer").glob("*.py")}
    assert not {n for n in names if n.startswith("bench") or n == "naive"}, names
