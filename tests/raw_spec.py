"""Run a data stage with a generated dataset standing in for a built-in one (tiny files, real checks).

``sitecustomize`` runs at interpreter start in the stage's process and swaps
the built-in spec for the generated one; the stage's code runs unchanged.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import synth

from pipeline.sources import DatasetSpec

_SITECUSTOMIZE = """
import json
from pipeline.sources import DATASETS, DatasetSpec, IdxFile, SplitFiles
_doc = json.loads({spec!r})
_f = lambda d: IdxFile(d["name"], d["sha256"], d["size"], tuple(d["shape"]))
DATASETS[{key!r}] = DatasetSpec(_doc["name"], SplitFiles(*map(_f, _doc["train"])),
                                SplitFiles(*map(_f, _doc["test"])), tuple(_doc["sources"]))
"""


def run_stage_with_spec(
    stage: str,
    spec: DatasetSpec,
    key: str,
    *args: str | Path,
    cwd: Path,
) -> subprocess.CompletedProcess:
    """``python -m stages.<stage> ARGS`` in ``cwd`` with ``DATASETS[key]`` replaced by ``spec``."""
    site = cwd / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(spec=synth.spec_to_json(spec), key=key))
    return synth.run_stage(stage, *args, cwd=cwd, extra_path=[site])
