"""The loader benchmark runs end to end and writes its three result files (tiny data, no timing asserts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import synth
from pipeline.parquet import csv_to_parquet
from pipeline.tensorize import tensorize

ROOT = Path(__file__).resolve().parent.parent
ROWS = ["naive", "naive-bs512", "+num_workers", "+persistent_workers", "+pin_memory", "precomputed",
        "mmap-per-sample", "default", "reference-layout", "resident", "ddp-1", "ddp-2"]


@pytest.mark.slow
def test_bench_writes_results(tmp_path: Path) -> None:
    for split, n in (("train", 600), ("test", 50)):
        csv = synth.write_csv(tmp_path / "csv" / f"{split}.csv", synth.split(n, seed=len(split)))
        csv_to_parquet(csv, tmp_path / "parquet" / f"{split}.parquet", compression="zstd",
                       compression_level=None, row_group_size=1000)
    tensorize(tmp_path / "parquet/train.parquet", tmp_path / "parquet/test.parquet",
              tmp_path / "tensors/train", tmp_path / "tensors/test",
              dataset="fashion-mnist", shard_size=256, normalize_kind="unit")
    out = tmp_path / "bench"
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.loader", "--samples", "512", "--naive-samples", "64", "--repeats", "1",
         "--memory-workers", "0", "2", "--habit-steps", "2", "--device", "cpu",
         "--tensors", str(tmp_path / "tensors"), "--parquet", str(tmp_path / "parquet"),
         "--csv", str(tmp_path / "csv"), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["rows"]] == ROWS
    floors = results["floors"]
    assert set(floors) == {"memcpy_epoch_s", "compute_epoch_s", "flop_epoch_s", "matmul_gflops", "epoch_gflop"}
    assert floors["epoch_gflop"] == pytest.approx(7.082496e-3 * 60_000)  # FlopCounterMode's count for SimpleCNN
    assert floors["flop_epoch_s"] == pytest.approx(floors["epoch_gflop"] / floors["matmul_gflops"])
    for row in results["rows"]:
        assert row["loader_epoch_s"] > 0 and row["train_epoch_s"] > 0 and 0 <= row["data_wait_fraction"] < 1
        faults = row["page_faults_per_step"]
        assert faults is None if row["name"].startswith("ddp-") else faults >= 0
        assert set(row) >= {"name", "loader_epoch_s", "train_epoch_s", "speedup_vs_naive", "data_wait_fraction"}
    by = {r["name"]: r for r in results["rows"]}
    assert set(results["goals"]) >= {"default_train_over_compute", "default_train_over_flops"}
    assert results["goals"]["default_train_over_flops"] == by["default"]["train_epoch_s"] / floors["flop_epoch_s"]
    assert set(results["allocator"]) == {"glibc_default", "retain_freed_memory"}
    assert all(set(v) == {"pre-gathered", "loader-fed"} for v in results["allocator"].values())
    assert set(results["threads"]["epoch_s"]) == {"1", "2"} and isinstance(results["threads"]["bit_identical"], bool)
    assert results["rows"][0]["speedup_vs_naive"] == 1.0
    assert set(results["memory"]["loader_process_tree"]) == {
        f"{kind}/workers={n}" for kind in ("default-mmap", "precomputed-in-ram") for n in (0, 2)}
    assert set(results["memory"]["training_habits"]) >= {"free_graph_true", "free_graph_false"}
    assert results["disk"]["csv_train"] == (tmp_path / "csv/train.csv").stat().st_size
    assert "| default |" in (out / "results.md").read_text()
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
