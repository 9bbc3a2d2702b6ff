"""``dvc repro`` then ``dvc exp run -S loader.num_workers=2`` in a temporary git repo holding only the train stage.

The shard folders are generated up front and committed to git directly, so
the repo needs no data stages; ``dvc exp show --json`` must then carry the
DVCLive metrics of both runs, with the same ``test_acc``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.test_trainer import make_split

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
# The train stage's code, as listed in the project's dvc.yaml.
TRAIN_CODE = [
    "stages/train.py",
    "pipeline/atomic.py",
    "pipeline/cli.py",
    "pipeline/errors.py",
    "pipeline/manifest.py",
    "pipeline/params.py",
    "pipeline/shards.py",
    "trainer/allocator.py",
    "trainer/checkpoint.py",
    "trainer/data.py",
    "trainer/export.py",
    "trainer/loader.py",
    "trainer/loop.py",
    "trainer/memory.py",
    "trainer/model.py",
    "trainer/run.py",
    "trainer/verify.py",
]
PARAMS = """\
loader:
  batch_size: 64
  num_workers: 0
  persistent_workers: false
  pin_memory: true
  prefetch_factor: null
  shuffle: true
train:
  epochs: 2
  lr: 0.001
  seed: 42
  device: cpu
  free_graph: true
  verify: full
  checkpoint_every: 1
"""


def dvc_yaml() -> str:
    deps = "\n".join(f"      - {d}" for d in ["data/tensors/train", "data/tensors/test", *TRAIN_CODE])
    return f"""\
stages:
  train:
    cmd: python -m stages.train --train data/tensors/train --test data/tensors/test --model models --checkpoints checkpoints --live dvclive
    deps:
{deps}
    params:
      - loader
      - train
    outs:
      - models
    metrics:
      - dvclive/metrics.json:
          cache: false
    plots:
      - dvclive/plots/metrics:
          x: step
          cache: false
"""


def run(repo: Path, *cmd: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        # `python` in the stage command must be this interpreter.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "DVC_NO_ANALYTICS": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
    }
    env.pop("TRAINER_TEST_PAUSE_AFTER_EPOCH", None)
    res = subprocess.run(list(cmd), cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return run(repo, sys.executable, "-m", "dvc", *args)


def metric_rows(doc: Any) -> list[tuple[dict, dict]]:
    """Every (params, dvclive metrics) pair in `dvc exp show --json`, whatever the nesting."""
    found = []
    if isinstance(doc, dict):
        data = doc.get("data")
        if isinstance(data, dict) and "dvclive/metrics.json" in (data.get("metrics") or {}):
            params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
            found.append((params, data["metrics"]["dvclive/metrics.json"]["data"]))
        for value in doc.values():
            found += metric_rows(value)
    elif isinstance(doc, list):
        for value in doc:
            found += metric_rows(value)
    return found


def test_dvc_exp_run_with_other_loader_settings_reports_the_same_accuracy(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for rel in TRAIN_CODE:
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, repo / rel)
    for package in ("pipeline", "stages", "trainer"):
        shutil.copy2(ROOT / package / "__init__.py", repo / package / "__init__.py")
    make_split(repo / "data" / "tensors" / "train", 256, split="train", shard_size=100, seed=1)
    make_split(repo / "data" / "tensors" / "test", 128, split="test", shard_size=100, seed=2)
    (repo / "params.yaml").write_text(PARAMS)
    (repo / "dvc.yaml").write_text(dvc_yaml())
    (repo / ".gitignore").write_text("/checkpoints\n__pycache__/\n")

    run(repo, "git", "init", "-q")
    dvc(repo, "init", "-q")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "train stage on committed shards")

    first = dvc(repo, "repro")
    assert "Running stage 'train'" in first.stdout
    baseline = json.loads((repo / "dvclive" / "metrics.json").read_text())
    assert {"train_loss", "test_loss", "test_acc", "epoch_seconds", "samples_per_second",
            "data_wait_fraction", "peak_memory_mb"} <= set(baseline)
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "baseline run")

    exp = dvc(repo, "exp", "run", "-S", "loader.num_workers=2")
    assert re.findall(r"Running stage '([^']+)'", exp.stdout) == ["train"], exp.stdout

    rows = metric_rows(json.loads(dvc(repo, "exp", "show", "--json").stdout))
    by_workers = {params.get("loader", {}).get("num_workers"): metrics for params, metrics in rows}
    assert set(by_workers) >= {0, 2}, rows
    assert by_workers[2]["test_acc"] == by_workers[0]["test_acc"] == baseline["test_acc"]
    assert by_workers[2]["train_loss"] == by_workers[0]["train_loss"]
    assert by_workers[2]["epoch_seconds"] != by_workers[0]["epoch_seconds"], "a fresh run, not the run-cache"

    diff = json.loads(dvc(repo, "metrics", "diff", "--json").stdout).get("dvclive/metrics.json", {})
    assert "epoch_seconds" in diff, diff  # the workspace holds the experiment; only timings differ from HEAD
    assert not {"test_acc", "test_loss", "train_loss"} & set(diff), diff
    plots = dvc(repo, "plots", "show", "--json", "dvclive/plots/metrics/test_acc.tsv")
    assert "test_acc" in plots.stdout
