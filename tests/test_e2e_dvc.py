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
    assert manifest["schema_version"] == 2 and manifest["class_names"] == [str(d) for d in range(10)]
    assert json.loads((repo / "data/tensors/test/manifest.json").read_text())["num_samples"] == 100
    # data.val_fraction 0: an empty val split, and no validation metrics
    val = json.loads((repo / "data/tensors/val/manifest.json").read_text())
    assert val["num_samples"] == 0 and val["shards"] == []
    metrics = json.loads((repo / "dvclive/metrics.json").read_text())
    assert "test_acc" in metrics and not {"val_loss", "val_acc"} & set(metrics)

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


def test_repro_without_a_test_csv_holds_out_test_and_val(tmp_path: Path) -> None:
    """data.test_csv null and data.val_fraction > 0: both held out of the train CSV; val metrics logged."""
    repo = make_csv_repo(tmp_path)
    set_params(repo, **{"data.test_csv": None, "data.test_fraction": 0.2, "data.val_fraction": 0.2})
    dvc(repo, "repro")
    counts = {
        split: json.loads((repo / f"data/tensors/{split}/manifest.json").read_text())["num_samples"]
        for split in ("train", "val", "test")
    }
    assert sum(counts.values()) == 300, counts  # every train CSV row in exactly one split
    assert 30 <= counts["test"] <= 90 and 30 <= counts["val"] <= 90, counts
    assert (repo / "data/csv/test.csv").read_text().count("\n") == 1  # the canonical header only
    metrics = json.loads((repo / "dvclive/metrics.json").read_text())
    assert {"val_loss", "val_acc", "test_acc"} <= set(metrics) and 0 <= metrics["val_acc"] <= 1
