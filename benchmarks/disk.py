"""Disk footprint of one dataset version in each of its forms (train split unless named)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import polars as pl
import yaml

from benchmarks.prep import path_bytes

DATA_STAGES = ("download", "csv", "parquet", "tensorize")


def dvc_outputs_bytes(lock: Path = Path("dvc.lock")) -> int | None:
    """What the DVC cache holds for one version of the data stages: the sum of their outputs' sizes."""
    if not lock.is_file():
        return None
    stages = yaml.safe_load(lock.read_text()).get("stages", {})
    total = 0
    for name in DATA_STAGES:
        for out in stages.get(name, {}).get("outs", []):
            total += int(out.get("size", 0))
    return total


def disk_usage(csv_dir: Path, parquet_dir: Path, tensors_dir: Path) -> dict[str, int | None]:
    parquet = parquet_dir / "train.parquet"
    out: dict[str, int | None] = {
        "csv_train": path_bytes(csv_dir / "train.csv") if (csv_dir / "train.csv").exists() else None,
        "parquet_pipeline_train": path_bytes(parquet),
    }
    frame = pl.read_parquet(parquet)
    with tempfile.TemporaryDirectory() as tmp:
        for codec in ("zstd", "snappy"):
            for dtype in (pl.UInt8, pl.Int64):
                path = Path(tmp) / f"{codec}-{dtype}.parquet"
                frame.select(pl.all().cast(dtype)).write_parquet(
                    path,
                    compression=codec,
                    row_group_size=65536,  # prep.row_group_size default when measured
                )
                out[f"parquet_{codec}_{str(dtype).lower()}_train"] = path_bytes(path)
    out["shards_float32_train"] = path_bytes(tensors_dir / "train")
    out["dvc_cache_one_version_all_splits"] = dvc_outputs_bytes()
    return out
