"""SIGKILL a real `dvc repro` while `parquet` or `tensorize` is writing; the rerun is correct.

The rerun is `dvc repro tensorize`: the killed stage and everything it feeds up
to the shards. `train` (a whole epoch on the 20000 samples) would add nothing
to what is checked here, the data stages' outputs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from safetensors.numpy import load_file

from pipeline.manifest import read_manifest
from tests.repo_copy import dvc, make_csv_repo, set_params

pytestmark = pytest.mark.slow

N_TRAIN = 20000  # large enough that each write lasts long enough to be caught mid-way


def _kill_when(repo: Path, appeared) -> None:
    """Start `dvc repro`, wait until ``appeared()`` is true, SIGKILL its whole process group."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro"],
        cwd=repo,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    try:
        while not appeared():
            assert proc.poll() is None, "dvc repro finished before the write could be interrupted"
            assert time.monotonic() < deadline, "timed out waiting for the stage to start writing"
            time.sleep(0.002)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _expected(repo: Path) -> tuple[np.ndarray, np.ndarray]:
    df = pl.read_csv(repo / "data/user/train.csv")
    return df.drop("label").to_numpy().astype(np.uint8), df["label"].to_numpy()


def _check_outputs(repo: Path) -> None:
    pixels, labels = _expected(repo)
    parquet = pl.read_parquet(repo / "data/parquet/train.parquet")
    assert np.array_equal(parquet.drop("label").to_numpy(), pixels)
    manifest = read_manifest(repo / "data/tensors/train")
    images = np.concatenate(
        [load_file(str(repo / "data/tensors/train" / s.file))["images"] for s in manifest.shards]
    )
    got_labels = np.concatenate(
        [load_file(str(repo / "data/tensors/train" / s.file))["labels"] for s in manifest.shards]
    )
    assert np.array_equal(images.reshape(len(images), -1), pixels.astype(np.float32) / np.float32(255))
    assert np.array_equal(got_labels, labels)
    # the other splits of the same run: the source's test split, and no val split (data.val_fraction 0)
    assert read_manifest(repo / "data/tensors/test").num_samples == 200
    assert read_manifest(repo / "data/tensors/val").num_samples == 0
    status = dvc(repo, "status", "--with-deps", "tensorize").stdout  # and every stage upstream of it
    assert "up to date" in status, status


def _temporaries(folder: Path, name: str) -> list[Path]:
    return list(folder.glob(f".{name}.tmp-*")) if folder.is_dir() else []


@pytest.mark.parametrize("stage", ["parquet", "tensorize"])
def test_sigkill_mid_write_then_repro(tmp_path: Path, stage: str) -> None:
    repo = make_csv_repo(tmp_path, n_train=N_TRAIN, n_test=200)
    set_params(repo, **{"prep.shard_size": 200})
    out_dir = repo / "data" / ("parquet" if stage == "parquet" else "tensors")
    name = "train.parquet" if stage == "parquet" else "train"

    def writing() -> bool:
        tmps = _temporaries(out_dir, name)
        if stage == "tensorize":
            return any(any(t.glob("shard-*.safetensors")) for t in tmps if t.is_dir())
        return any(t.stat().st_size > 0 for t in tmps if t.exists())

    _kill_when(repo, writing)
    target = out_dir / name
    assert _temporaries(out_dir, name), "the kill should have left the writer's temporary behind"
    assert not target.exists(), f"{target} exists although its writer was killed before finishing"

    rerun = dvc(repo, "repro", "tensorize")
    assert f"Running stage '{stage}'" in rerun.stdout
    # tensorize writes every split folder at once: none of their temporaries may survive the rerun
    for split in (name,) if stage == "parquet" else ("train", "val", "test"):
        assert not _temporaries(out_dir, split), (
            f"the rerun should clean up the killed writer's {split} temporary"
        )
    _check_outputs(repo)


def test_a_killed_rerun_leaves_no_output_of_the_previous_run_beside_the_new_ones(tmp_path: Path) -> None:
    """A stage renames its outputs into place one after the other (tensorize: train, val, test). DVC
    deletes a stage's outputs before it runs it, so a rerun killed at any point leaves only outputs of
    the new run, never one of the previous run beside a new one."""
    repo = make_csv_repo(tmp_path, n_train=N_TRAIN, n_test=200)
    set_params(repo, **{"prep.shard_size": 200})
    dvc(repo, "repro", "tensorize")
    out_dir = repo / "data" / "tensors"
    assert all((out_dir / split / "manifest.json").exists() for split in ("train", "val", "test"))
    set_params(repo, **{"prep.shard_size": 250})

    _kill_when(
        repo, lambda: any(any(t.glob("shard-*")) for t in _temporaries(out_dir, "train") if t.is_dir())
    )
    for split in ("train", "val", "test"):
        assert not (out_dir / split).exists(), f"data/tensors/{split} of the previous run is still there"

    dvc(repo, "repro", "tensorize")
    assert read_manifest(out_dir / "train").shards[0].num_samples == 250
    _check_outputs(repo)
