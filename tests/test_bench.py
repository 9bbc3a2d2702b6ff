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
ROWS = [
    "naive",
    "naive-bs512",
    "+num_workers",
    "+persistent_workers",
    "+pin_memory",
    "precomputed",
    "mmap-per-sample",
    "default",
    "reference-layout",
    "resident",
    "bf16",
    "uint8",
    "uint8+bf16",
    "ddp-1",
    "ddp-2",
]


def run_benchmark(module: str, *argv: str, timeout: int = 300) -> None:
    """``python -m <module> argv...`` from the repository root; its stderr if it fails."""
    res = subprocess.run(
        [sys.executable, "-m", module, *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert res.returncode == 0, res.stderr


@pytest.mark.slow
def test_bench_writes_results(tmp_path: Path) -> None:
    for split, n in (("train", 600), ("test", 50)):
        csv = synth.write_csv(tmp_path / "csv" / f"{split}.csv", synth.split(n, seed=len(split)))
        csv_to_parquet(
            csv,
            tmp_path / "parquet" / f"{split}.parquet",
            compression="zstd",
            compression_level=None,
            row_group_size=1000,
        )
    tensorize(
        tmp_path / "parquet/train.parquet",
        tmp_path / "parquet/test.parquet",
        tmp_path / "tensors/train",
        tmp_path / "tensors/test",
        dataset="fashion-mnist",
        shard_size=256,
        normalize_kind="unit",
    )
    out = tmp_path / "bench"
    run_benchmark(
        "benchmarks.loader",
        "--quick",  # with --samples and --naive-samples given, it only marks the run as quick
        "--samples",
        "512",
        "--naive-samples",
        "64",
        "--repeats",
        "1",
        "--memory-workers",
        "0",
        "2",
        "--habit-steps",
        "2",
        "--device",
        "cpu",
        "--tensors",
        str(tmp_path / "tensors"),
        "--parquet",
        str(tmp_path / "parquet"),
        "--csv",
        str(tmp_path / "csv"),
        "--out",
        str(out),
        timeout=600,
    )
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["rows"]] == ROWS
    floors = results["floors"]
    assert set(floors) == {
        "memcpy_epoch_s",
        "compute_epoch_s",
        "flop_epoch_s",
        "matmul_gflops",
        "epoch_gflop",
        "flop_epoch_s_bf16",
        "matmul_gflops_bf16",
    }
    assert floors["epoch_gflop"] == pytest.approx(
        7.082496e-3 * 60_000
    )  # FlopCounterMode's count for SimpleCNN
    assert floors["flop_epoch_s"] == pytest.approx(floors["epoch_gflop"] / floors["matmul_gflops"])
    assert floors["flop_epoch_s_bf16"] == pytest.approx(floors["epoch_gflop"] / floors["matmul_gflops_bf16"])
    for row in results["rows"]:
        assert row["loader_epoch_s"] > 0 and row["train_epoch_s"] > 0 and 0 <= row["data_wait_fraction"] < 1
        faults = row["page_faults_per_step"]
        assert faults is None if row["name"].startswith("ddp-") else faults >= 0
        assert set(row) >= {
            "name",
            "loader_epoch_s",
            "train_epoch_s",
            "speedup_vs_naive",
            "data_wait_fraction",
        }
    by = {r["name"]: r for r in results["rows"]}
    assert set(results["goals"]) >= {"default_train_over_compute", "default_train_over_flops"}
    assert (
        results["goals"]["default_train_over_flops"]
        == by["default"]["train_epoch_s"] / floors["flop_epoch_s"]
    )
    assert results["goals"]["bf16_over_fp32"] == by["bf16"]["train_epoch_s"] / by["default"]["train_epoch_s"]
    bf16 = results["bf16"]  # judged only with AMX or CUDA: this CPU run is judged iff the CPU has amx_bf16
    assert bf16["judged"] == bf16["cpu_flags"]["amx_bf16"] and bf16["goal"] == 0.5
    verdicts = results["verdicts"]
    assert set(verdicts) >= {"bf16_over_fp32", "workers2_over_workers0", "default_train_over_flops"}
    assert set(verdicts.values()) <= {"met", "NOT met", "not judged: no AMX"}
    assert (verdicts["bf16_over_fp32"] == "not judged: no AMX") == (not bf16["judged"])
    assert set(results["allocator"]) == {"glibc_default", "retain_freed_memory"}
    assert all(set(v) == {"pre-gathered", "loader-fed"} for v in results["allocator"].values())
    assert set(results["threads"]["epoch_s"]) == {"1", "2"} and isinstance(
        results["threads"]["bit_identical"], bool
    )
    assert results["rows"][0]["speedup_vs_naive"] == 1.0
    assert set(results["memory"]["loader_process_tree"]) == {
        f"{kind}/workers={n}" for kind in ("default-mmap", "precomputed-in-ram") for n in (0, 2)
    }
    assert set(results["memory"]["training_habits"]) >= {"free_graph_true", "free_graph_false"}
    assert results["disk"]["csv_train"] == (tmp_path / "csv/train.csv").stat().st_size
    assert {r["name"] for r in results["workers"]["rows"]} >= {
        f"{d}-workers{w}" for d in ("float32", "uint8") for w in (0, 1, 2, 4)
    }
    assert set(results["goals"]) >= {"workers2_over_workers0", "uint8_workers2_over_workers0"}
    assert set(results["machine"]["conditions_at_start"]) >= {"loadavg", "under_load", "date"}
    assert "| default |" in (out / "results.md").read_text()
    assert "| uint8 |" in (out / "results.md").read_text()
    markdown = (out / "results.md").read_text()
    assert "| uint8+bf16 |" in markdown and "| bf16 train epoch / default (fp32) train epoch |" in markdown
    assert f"| {verdicts['bf16_over_fp32']} |" in markdown
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # benchmarks.precision (its speed part, which the loader's bf16 rows now cover) on the same tiny shards
    run_benchmark(
        "benchmarks.precision",
        "--tensors",
        str(tmp_path / "tensors"),
        "--steps",
        "4",
        "--repeats",
        "1",
        "--out",
        str(out),
    )
    precision = json.loads((out / "precision.json").read_text())
    assert set(precision["speed"]) == {"fp32", "bf16"} and precision["goals"]["bf16_over_fp32"] > 0
    assert precision["floor"]["epoch_gflop"] == floors["epoch_gflop"]


def test_checkpoint_bench_writes_results(tmp_path: Path) -> None:
    """benchmarks.checkpoint on the first 600 FashionMNIST samples: every part runs (it once broke
    unseen, on a name a refactor removed)."""
    out = tmp_path / "bench"
    argv = ["--samples", "600", "--epochs", "1", "--repeats", "1", "--often", "0.01"]
    run_benchmark("benchmarks.checkpoint", *argv, "--work", str(tmp_path), "--out", str(out))
    results = json.loads((out / "checkpoint.json").read_text())
    assert results["train_samples"] == 600 and results["finite"]["pixels"] == 600 * 784
    assert results["checkpoint"]["bytes"] > 0 and set(results["epochs"]) == {"off", "default", "often"}
    assert all(len(v) == 1 and v[0] > 0 for v in results["epochs"].values())
    assert "600 train samples" in (out / "checkpoint.md").read_text()


def test_decode_bench_writes_results(tmp_path: Path) -> None:
    """benchmarks.decode on tiny folders: both through the csv and parquet stages with the same bytes for
    either setting, and the sweep of one process against every core's."""
    out = tmp_path / "bench"
    argv = ["--small", "60", "--photos", "8", "--counts", "16", "--repeats", "1"]
    run_benchmark("benchmarks.decode", *argv, "--work", str(tmp_path), "--out", str(out))
    results = json.loads((out / "decode.json").read_text())
    cores = results["cores"]
    keys = ("folder", "images", "checks_all_cores", "decode_all_cores")
    shared = [tuple(s[k] for k in keys) for s in results["stage"]]
    assert shared == [  # too few images to start processes for
        ("small 32x32", 68, "one process", "one thread"),
        ("photos 320x240 to 64x64", 16, "one process", "one thread" if cores == 1 else f"{cores} threads"),
    ]
    for s in results["stage"]:
        assert s["same_bytes"] and set(s["median_s"]) == {"csv", "parquet"}
        assert all(len(runs) == 1 for stage in s["seconds"].values() for runs in stage.values())
    [count] = results["counts"]
    assert count["images"] == 16 and count["check"]["all_s"] > 0 and count["decode"]["all_s"] > 0
    assert (results["checks_from"], results["processes_from_images"]) == (8192, 4096)
    assert "| small 32x32 | 68 | one process |" in (out / "decode.md").read_text()


def test_shapes_bench_writes_results(tmp_path: Path) -> None:
    """benchmarks.shapes on tiny data: both loader shapes, a CSV case and an image folder with held-out
    val/test."""
    out = tmp_path / "bench"
    run_benchmark(
        "benchmarks.shapes",
        "--cases",
        "fashion-8x8",
        "synthetic-17x23",
        "--train-samples",
        "300",
        "--test-samples",
        "50",
        "--synthetic-train",
        "200",
        "--epochs",
        "1",
        "--loader-samples",
        "600",
        "--repeats",
        "1",
        "--work",
        str(tmp_path / "work"),
        "--out",
        str(out),
    )
    results = json.loads((out / "shapes.json").read_text())
    loader = results["loader"]
    assert [r["shape"] for r in loader["rows"]] == ["1x28x28", "3x32x32"] and loader["goal"] == 2.5
    for row in loader["rows"]:
        assert row["loader_epoch_s"] > 0 and row["memcpy_s"] > 0 and row["samples"] == 600
        assert row["loader_over_memcpy"] == pytest.approx(row["loader_epoch_s"] / row["memcpy_s"], rel=0.05)
        assert set(row["conditions"]) >= {"cpu", "loadavg", "under_load", "date"}
    by = {r["case"]: r for r in results["accuracy"]}
    assert by["fashion-8x8"]["shape"] == [1, 8, 8] and by["fashion-8x8"]["samples"]["test"] == 50
    assert by["fashion-8x8"]["val_acc"] is None and 0 <= by["fashion-8x8"]["test_acc"] <= 1
    synthetic = by["synthetic-17x23"]
    assert synthetic["shape"] == [3, 17, 23] and synthetic["classes"] == 10
    assert sum(synthetic["samples"].values()) == 200 and synthetic["samples"]["val"] > 0
    assert 0 <= synthetic["val_acc"] <= 1
    assert "| synthetic-17x23 |" in (out / "shapes.md").read_text()
    assert not list((tmp_path / "work").iterdir())  # every scratch folder removed


def test_prep_bench_image_folder(tmp_path: Path) -> None:
    """benchmarks.prep's image-folder part on a tiny folder, generated once and then reused; the skipped
    FashionMNIST part keeps the existing prep.json's figures."""
    out = tmp_path / "bench"
    out.mkdir()
    (out / "prep.json").write_text(
        json.dumps({"stages": {"csv": 1.0}, "repeats": 3, "bytes": {"csv_train": 1}, "total_seconds": 1.0})
    )
    argv = [
        sys.executable,
        "-m",
        "benchmarks.prep",
        "--skip-fashion",
        "--images",
        "120",
        "--images-test",
        "30",
        "--images-dir",
        str(tmp_path / "folder"),
        "--work",
        str(tmp_path / "work"),
        "--out",
        str(out),
    ]
    for run in range(2):
        res = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        results = json.loads((out / "prep.json").read_text())
        images = results["image_folder"]
        assert (images["generated_seconds"] is None) == (run == 1)  # the second run reuses the folder
    assert results["stages"] == {"csv": 1.0}
    assert list(images["stages"]) == ["download", "csv", "parquet", "tensorize"]
    assert images["train_images"] == 120 and images["image_shape"] == [3, 32, 32]
    for stage in images["stages"].values():
        assert stage["seconds"] > 0 and stage["peak_rss_mb"] > 0
    shards_train, shards_test = images["stages"]["tensorize"]["bytes"]
    assert shards_train > 120 * 3 * 32 * 32 * 4 and shards_test > 30 * 3 * 32 * 32 * 4
    assert images["folder_bytes"] > 0 and set(images["conditions"]) >= {"cpu", "loadavg"}
    assert "| parquet |" in (out / "prep.md").read_text()
