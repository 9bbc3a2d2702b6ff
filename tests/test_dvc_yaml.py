"""dvc.yaml lists exactly the code each stage imports and only params that exist."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from pipeline.params import SECTIONS, read_params_file

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "stages", "trainer")


def _stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _module_file(module: str) -> Path | None:
    path = ROOT / Path(*module.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in found if m.split(".")[0] in PACKAGES}


def code_closure(module: str) -> set[str]:
    """The repository's files ``python -m module`` runs: its package's ``__init__.py`` first (``stages``
    sets its Ctrl-C handler there), then every module it imports, transitively."""
    seen: set[Path] = {ROOT / module.split(".")[0] / "__init__.py"}
    todo = [module]
    while todo:
        file = _module_file(todo.pop())
        if file is None or file in seen:
            continue
        seen.add(file)
        todo.extend(_imports(file))
    return {str(p.relative_to(ROOT)) for p in seen}


@pytest.mark.parametrize("name", list(_stages()))
def test_code_deps_are_exactly_the_imports(name: str) -> None:
    stage = _stages()[name]
    module = stage["cmd"].split()[2]
    assert stage["cmd"].startswith("python -m ")
    declared = {d for d in stage["deps"] if d.endswith(".py")}
    assert declared == code_closure(module), f"stage {name}: deps differ from the imports of {module}"


@pytest.mark.parametrize("name", list(_stages()))
def test_params_exist(name: str) -> None:
    doc = read_params_file(ROOT / "params.yaml")
    for entry in _stages()[name].get("params", []):
        section, _, key = entry.partition(".")
        assert section in SECTIONS, entry
        assert section in doc, entry
        if key:
            assert key in doc[section], entry


def test_library_package_inits_hold_no_code() -> None:
    """The library packages' __init__.py files are left out of the deps lists, so they must stay
    docstring-only (``stages/__init__.py``, which every stage runs first, is in every stage's list)."""
    for package in ("pipeline", "trainer"):
        init = ROOT / package / "__init__.py"
        body = ast.parse(init.read_text()).body
        assert all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body), init


def test_loader_and_train_params_only_in_train_stage() -> None:
    for name, stage in _stages().items():
        if name == "train":
            continue
        for entry in stage.get("params", []):
            assert not entry.startswith(("loader", "train")), (name, entry)
