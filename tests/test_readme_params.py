"""README's parameter table and params.yaml agree: every key, every default."""

from __future__ import annotations

import re
from pathlib import Path

from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parent.parent
# a table row: | `section.key` | `default` | meaning |
ROW = re.compile(r"^\|\s*`([a-z_]+\.[a-z_]+)`\s*\|\s*`([^`]*)`\s*\|")


def _yaml(text: str) -> object:
    return YAML(typ="safe", pure=True).load(text)  # YAML 1.2, as DVC reads params.yaml


def readme_defaults(readme: str) -> dict[str, object]:
    """Rows of the table under '## Parameters', default cells read as YAML."""
    section = ("\n" + readme).split("\n## Parameters", 1)[1].split("\n## ", 1)[0]
    rows = [ROW.match(line) for line in section.splitlines()]
    found: dict[str, object] = {}
    for m in filter(None, rows):
        assert m.group(1) not in found, f"README lists {m.group(1)} twice"
        found[m.group(1)] = _yaml(m.group(2))
    return found


def params_defaults(text: str) -> dict[str, object]:
    doc = _yaml(text)
    return {f"{section}.{key}": value for section, keys in doc.items() for key, value in keys.items()}


def mismatches(readme_text: str, params_text: str) -> dict[str, tuple[object, object]]:
    """key -> (README default, params.yaml value) for every key that differs or is missing on one side."""
    readme, params = readme_defaults(readme_text), params_defaults(params_text)
    missing = object()
    out = {}
    for key in sorted(readme.keys() | params.keys()):
        a, b = readme.get(key, missing), params.get(key, missing)
        if a is missing or b is missing or a != b or type(a) is not type(b):  # 1 vs 1.0 or "5" vs 5 differ
            out[key] = ("<no row>" if a is missing else a, "<no key>" if b is missing else b)
    return out


def test_readme_table_equals_params_yaml() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme_defaults(readme)) >= 20, "the parameter table was not found or not parsed"
    assert mismatches(readme, (ROOT / "params.yaml").read_text()) == {}


def test_checker_catches_wrong_missing_and_mistyped_defaults() -> None:
    readme = (
        "## Parameters\n\n| key | default | meaning |\n|---|---|---|\n"
        "| `prep.shard_size` | `10000` | x |\n| `train.lr` | `1e-3` | x |\n| `train.seed` | `'42'` | x |\n"
        "| `loader.shuffle` | `true` | x |\n| `data.only_in_readme` | `[]` | x |\n"
        "\n## Next\n\n| `train.epochs` | `1` | another section's table is not read |\n"
    )
    params = (
        "prep:\n  shard_size: 65536\ntrain:\n  lr: 0.001\n  seed: 42\n  epochs: 5\nloader:\n  shuffle: true\n"
    )
    assert mismatches(readme, params) == {
        "prep.shard_size": (10000, 65536),
        "train.seed": ("42", 42),
        "data.only_in_readme": ([], "<no key>"),
        "train.epochs": ("<no row>", 5),
    }
