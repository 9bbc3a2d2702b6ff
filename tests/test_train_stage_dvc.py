"""``dvc repro`` then ``dvc exp run -S loader.num_workers=2`` in a copy of the repository, with its real
dvc.yaml.

The copy (tests/repo_copy.make_csv_repo) holds the project's own dvc.yaml,
params.yaml and code, configured for ``data.dataset: csv`` on a small
generated CSV, so every stage runs as written; ``dvc exp show --json`` must
then carry the DVCLive metrics of both runs, with the same ``test_acc``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.repo_copy import ROOT as REPO_ROOT
from tests.repo_copy import make_csv_repo, set_params

pytestmark = pytest.mark.slow


def run(repo: Path, *cmd: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        # `python` in the stage command must be this interpreter.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "DVC_NO_ANALYTICS": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
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
    repo = make_csv_repo(tmp_path)
    assert (repo / "dvc.yaml").read_bytes() == (
        REPO_ROOT / "dvc.yaml"
    ).read_bytes()  # the real stages, verbatim
    set_params(
        repo, **{"train.epochs": 2, "train.device": "cpu", "train.verify": "full", "loader.num_workers": 0}
    )
    run(repo, "git", "commit", "-qam", "two epochs on the CPU")

    first = dvc(repo, "repro")
    assert set(re.findall(r"Running stage '([^']+)'", first.stdout)) == {
        "download",
        "csv",
        "parquet",
        "tensorize",
        "train",
    }, first.stdout
    baseline = json.loads((repo / "dvclive" / "metrics.json").read_text())
    assert {
        "train_loss",
        "test_loss",
        "test_acc",
        "epoch_seconds",
        "samples_per_second",
        "data_wait_fraction",
        "peak_memory_mb",
    } <= set(baseline)
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
