"""A temporary copy of this repository for tests that run ``dvc`` for real."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str], cwd: Path, check: bool = True, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def copy_repo(dest: Path) -> Path:
    """Copy tracked and untracked-not-ignored files (no data, no cache) into ``dest``."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    for rel in filter(None, listed):
        src = ROOT / rel
        if not src.is_file() or rel.startswith(("bench/", "tests/")):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    return dest


def write_csv(path: Path, pixels: np.ndarray, labels: np.ndarray) -> None:
    names = ["label", *(f"pixel{i}" for i in range(1, 785))]
    rows = np.concatenate([labels[:, None], pixels], axis=1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(rows, schema=names, orient="row").write_csv(path)


def set_params(repo: Path, **updates: object) -> None:
    """Set dotted keys, e.g. set_params(repo, **{"loader.num_workers": 2})."""
    yaml = YAML()
    path = repo / "params.yaml"
    doc = yaml.load(path.read_text())
    for dotted, value in updates.items():
        section, key = dotted.split(".")
        doc[section][key] = value
    with open(path, "w") as f:
        yaml.dump(doc, f)


def make_csv_repo(tmp: Path, n_train: int = 300, n_test: int = 100, seed: int = 0) -> Path:
    """A git+DVC repo copy configured for ``data.dataset: csv`` on generated data."""
    repo = copy_repo(tmp / "repo")
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        write_csv(
            repo / "data" / "user" / f"{split}.csv", rng.integers(0, 256, (n, 784)), rng.integers(0, 10, n)
        )
    set_params(
        repo, **{"data.dataset": "csv", "prep.shard_size": 128, "train.epochs": 1, "loader.batch_size": 64}
    )
    run(["git", "init", "-q"], repo)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], repo)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"], repo)
    return repo


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], repo, check=check)
