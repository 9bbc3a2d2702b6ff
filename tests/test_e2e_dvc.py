"""`dvc repro` end to end in a temporary copy of the repo, on generated CSV data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.repo_copy import dvc, make_csv_repo, set_params

pytestmark = pytest.mark.slow

DATA_STAGES = ("download", "csv", "parquet", "tensorize")


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def test_repro_then_only_train_reruns(tmp_path: Path) -> None:
    repo = make_csv_repo(tmp_path)
    first = dvc(repo, "repro")
    stages = set(__import__("yaml").safe_load((repo / "dvc.yaml").read_text())["stages"])
    assert ran(first.stdout) == stages

    manifest = json.loads((repo / "data/tensors/train/manifest.json").read_text())
    assert manifest["num_samples"] == 300 and len(manifest["shards"]) == 3
    shard = load_file(str(repo / "data/tensors/train" / manifest["shards"][0]["file"]))
    assert shard["images"].dtype == np.float32 and shard["images"].shape == (128, 1, 28, 28)

    second = dvc(repo, "repro")
    assert ran(second.stdout) == set(), second.stdout

    set_params(repo, **{"loader.num_workers": 2})
    status = json.loads(dvc(repo, "status", "--json").stdout)
    assert not set(status) & set(DATA_STAGES), status
    assert "train" in status

    set_params(repo, **{"loader.num_workers": 0, "prep.compression": "snappy"})
    third = dvc(repo, "repro")
    # identical shard bytes: train sees unchanged deps and stays cached
    assert ran(third.stdout) == {"parquet", "tensorize"}, third.stdout
