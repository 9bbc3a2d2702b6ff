"""No pickle anywhere: the project never executes what a file says.

An AST scan of pipeline/, stages/, trainer/ and benchmarks/ fails on: importing pickle (or
its relatives), ``torch.load`` without ``weights_only=True``, ``torch.save``,
TorchScript / hub loading, and ``allow_pickle=True``. The scanner is itself
tested on small snippets, so this test can fail.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import synth

SCANNED = ("pipeline", "stages", "trainer", "benchmarks")
PICKLE_MODULES = {
    "pickle",
    "_pickle",
    "cPickle",
    "cloudpickle",
    "dill",
    "shelve",
    "joblib",
    "marshal",
    "copyreg",
}
ALWAYS_FORBIDDEN = {
    "torch.save",
    "torch.serialization.save",
    "torch.jit.load",
    "torch.jit.save",
    "torch.hub.load",
    "torch.package.PackageImporter",
    "pandas.read_pickle",
    "numpy.load_pickle",
}
NEEDS_WEIGHTS_ONLY = {"torch.load", "torch.serialization.load"}


def _aliases(tree: ast.AST) -> dict[str, str]:
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    if isinstance(node, ast.Name):
        return aliases.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, aliases)
        return f"{base}.{node.attr}" if base else None
    return None


def _is_true(call: ast.Call, keyword: str) -> bool:
    return any(
        k.arg == keyword and isinstance(k.value, ast.Constant) and k.value.value is True
        for k in call.keywords
    )


def violations(source: str, where: str = "<snippet>") -> list[str]:
    tree = ast.parse(source)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        line = f"{where}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [
                f"{line}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES
            ]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in PICKLE_MODULES:
                found.append(f"{line}: from {node.module} import ...")
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in ALWAYS_FORBIDDEN | NEEDS_WEIGHTS_ONLY:
                    found.append(f"{line}: from {node.module} import {a.name}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func, aliases)
            if name in ALWAYS_FORBIDDEN:
                found.append(f"{line}: {name}(...)")
            if name in NEEDS_WEIGHTS_ONLY and not _is_true(node, "weights_only"):
                found.append(f"{line}: {name}(...) without weights_only=True")
            if _is_true(node, "allow_pickle") or any(
                k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                for k in node.keywords
            ):
                found.append(f"{line}: allow_pickle=True")
            if (
                name in ("__import__", "importlib.import_module")
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and str(node.args[0].value).split(".")[0] in PICKLE_MODULES
            ):
                found.append(f"{line}: dynamic import of {node.args[0].value}")
            if (name and name.endswith((".__reduce__", ".__setstate__"))) or name in (
                "pickle.loads",
                "pickle.load",
            ):
                found.append(f"{line}: {name}(...)")
    return found


def _sources() -> list[Path]:
    files = [p for d in SCANNED for p in sorted((synth.REPO / d).rglob("*.py"))]
    return files


def test_the_project_has_no_pickle():
    files = _sources()
    assert len(files) >= 15 and {p.parent.name for p in files} >= set(SCANNED)
    found = []
    for path in files:
        found += violations(path.read_text(encoding="utf-8"), str(path.relative_to(synth.REPO)))
    assert found == [], "pickle-based (de)serialisation found:\n" + "\n".join(found)


# ============================================================================ the scanner itself


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle",
        "import pickle as p",
        "import _pickle",
        "import dill",
        "import joblib",
        "import shelve",
        "from pickle import loads",
        "from pickle import Unpickler as U",
        "import torch\ntorch.load('x.pt')",
        "import torch\ntorch.load('x.pt', weights_only=False)",
        "import torch\nkw = {}\ntorch.load('x.pt', **kw)",
        "import torch as th\nth.load(f)",
        "from torch import load\nload(f, weights_only=True)",
        "import torch.serialization\ntorch.serialization.load(f)",
        "import torch\ntorch.save(model.state_dict(), 'x.pt')",
        "from torch import save",
        "import torch\ntorch.jit.load('m.pt')",
        "import torch\ntorch.hub.load('repo', 'model')",
        "import numpy as np\nnp.load('a.npy', allow_pickle=True)",
        "import numpy\nnumpy.load('a.npz', allow_pickle=flag)",
        "import pandas as pd\npd.read_pickle('x')",
        "__import__('pickle')",
        "import importlib\nimportlib.import_module('pickle')",
    ],
)
def test_scanner_flags(snippet):
    assert violations(snippet), snippet


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\ntorch.load('x.pt', weights_only=True)",
        "import torch\ntorch.load('x.pt', map_location='cpu', weights_only=True)",
        "import safetensors.torch\nsafetensors.torch.load(blob)",
        "import safetensors.torch\nsafetensors.torch.save_file(t, 'x')",
        "from safetensors.torch import load_file\nload_file('x')",
        "import numpy as np\nnp.load('a.npy')",
        "import numpy as np\nnp.load('a.npy', allow_pickle=False)",
        "import json\njson.load(f)",
        "x = 'pickle'  # a string mentioning pickle is fine",
    ],
)
def test_scanner_allows(snippet):
    assert violations(snippet) == [], snippet
