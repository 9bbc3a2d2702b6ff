"""Disk full while writing shards: a clear error and no partial output (needs a tmpfs mount)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline.tabular import HEADER

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 1 MiB tmpfs. Mounting needs root (or CAP_SYS_ADMIN); elsewhere see README "Guarantees"."""
    mount = tmp_path / "small"
    mount.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _parquet(path: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    table = np.concatenate([rng.integers(0, 10, (n, 1)), rng.integers(0, 256, (n, 784))], axis=1)
    pl.DataFrame(table.astype(np.uint8), schema=list(HEADER), orient="row").write_parquet(path)


def test_tensorize_on_full_disk(tmp_path: Path, small_disk: Path) -> None:
    _parquet(tmp_path / "train.parquet", 1000, 0)  # 3.1 MB of float32 shards: cannot fit in 1 MiB
    _parquet(tmp_path / "test.parquet", 10, 1)
    res = subprocess.run(
        [sys.executable, "-m", "stages.tensorize", "--params", str(ROOT / "params.yaml"),
         "--train-parquet", str(tmp_path / "train.parquet"), "--test-parquet", str(tmp_path / "test.parquet"),
         "--train", str(small_disk / "train"), "--test", str(small_disk / "test")],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert f"{small_disk / 'train'}: could not write output (No space left on device)" in res.stderr
    assert list(small_disk.iterdir()) == [], "a partial shard folder or temporary was left behind"
