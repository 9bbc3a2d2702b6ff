"""Cost as data grows: the scaling benchmark end to end on tiny data, and a large bad CSV named fast."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import synth

from benchmarks.scalecsv import FASHION_DIR, csv_lines, load_idx_split, transformed_copy, write_scaled_csv
from pipeline.tabular import HEADER_LINE

ROOT = Path(__file__).resolve().parent.parent
MB = 1 << 20


def _idx_folder(tmp: Path) -> Path:
    """FashionMNIST's IDX files, or tiny synthetic ones with the same names where the mirror is absent."""
    if (FASHION_DIR / "train-images-idx3-ubyte.gz").exists():
        return FASHION_DIR
    import gzip

    from pipeline.idx import encode_idx

    rng = np.random.default_rng(0)
    for prefix, n in (("train", 600), ("t10k", 100)):
        (tmp / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(encode_idx(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)))
        )
        (tmp / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(encode_idx(rng.integers(0, 10, n, dtype=np.uint8)))
        )
    return tmp


def test_scaled_csv_is_k_transformed_copies_with_labels_kept(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 20, dtype=np.uint8)
    path = tmp_path / "t.csv"
    assert write_scaled_csv(path, images, labels, 4) == 80
    lines = path.read_bytes().split(b"\n")
    assert lines[0] + b"\n" == HEADER_LINE and lines[-1] == b""
    table = np.array([[int(c) for c in line.split(b",")] for line in lines[1:-1]])
    for k in range(4):
        part = table[20 * k : 20 * (k + 1)]
        np.testing.assert_array_equal(part[:, 0], labels)
        np.testing.assert_array_equal(part[:, 1:].reshape(20, 28, 28), transformed_copy(images, k))
    copies = {transformed_copy(images, k).tobytes() for k in range(16)}
    assert len(copies) == 16  # no two copies byte-identical
    assert csv_lines(np.array([[0, 255, 7]], dtype=np.uint8)) == b"0,255,7\n"


def test_scale_benchmark_writes_its_three_files(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.scale",
            "--scale",
            "1",
            "2",
            "--base-samples",
            "300",
            "--shard-size",
            "128",
            "--workers",
            "0",
            "--idx",
            str(_idx_folder(tmp_path)),
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    results = json.loads((out / "scale.json").read_text())
    assert [(r["scale"], r["samples"]) for r in results["rows"]] == [(1, 300), (2, 600)]
    for row in results["rows"]:
        assert set(row["stages"]) == {"download", "csv", "parquet", "tensorize"}
        for stage in row["stages"].values():
            assert stage["seconds"] > 0 and 20 < stage["peak_rss_mb"] < 2000
        assert row["loader_epoch_s"] > 0 and set(row["loader_uss_mb"]) == {"0"}
        assert row["bytes"]["shards_train"] > row["samples"] * 784 * 4
        shards = row["shards_train_bytes"]  # float32 and uint8 train shards of the same run (tensorize twice)
        assert shards["float32"] == row["bytes"]["shards_train"]
        assert row["samples"] * 784 < shards["uint8"] < 0.5 * shards["float32"]
        assert shards["ratio"] == round(shards["uint8"] / shards["float32"], 4)
    md = (out / "scale.md").read_text()
    for when in ("before", "after"):  # the CPU and how busy the machine was, with the figures
        assert results[when]["cpu"] and len(results[when]["loadavg"]) == 3
        assert f"{when.title()}: {results[when]['cpu']}, {results[when]['cores']} cores, load average" in md
        assert shards["ok"] == (shards["uint8"] <= 0.26 * shards["float32"])
    assert set(results["goals"]) == {f"{s}@2x" for s in ("download", "csv", "parquet", "tensorize")}
    assert "| 2 | 600 |" in (out / "scale.md").read_text()
    assert "| K | float32 MB | uint8 MB | uint8 / float32 | ok |" in (out / "scale.md").read_text()
    assert (out / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((tmp_path / "work").iterdir()) == []  # scratch removed


def test_scale_md_includes_the_parallel_and_cold_sections_a_level_down(tmp_path: Path) -> None:
    """scale.md reports each data stage with prep.workers 1 and all cores by including parallel.md
    (benchmarks.parallelprep), then cold.md, headings a level down; without them, neither appears."""
    from benchmarks.scale import render_markdown

    results = json.loads((ROOT / "bench" / "scale.json").read_text())
    (tmp_path / "parallel.md").write_text("# Data stages on every core\n\n| K | stage |\n")
    (tmp_path / "cold.md").write_text("# Beyond RAM\n\nbytes\n")
    text = render_markdown(results, tmp_path / "cold.md", tmp_path / "parallel.md")
    assert text.index("\n## Data stages on every core\n") < text.index("\n## Beyond RAM\n")
    assert "| K | stage |" in text
    bare = render_markdown(results, tmp_path / "missing.md", tmp_path / "missing-too.md")
    assert "every core" not in bare and "Beyond RAM" not in bare


def test_bad_last_cell_of_a_4x_csv_named_fast_in_bounded_memory(tmp_path: Path) -> None:
    """240,000 rows (~530 MB): the stage names the last row's bad cell in at most 2x a good conversion."""
    images, labels = load_idx_split(_idx_folder(tmp_path), "train")
    reps = -(-240_000 // len(labels))
    images, labels = np.tile(images, (reps, 1, 1))[:240_000], np.tile(labels, reps)[:240_000]
    good = tmp_path / "good.csv"
    write_scaled_csv(good, images, labels, 1)
    bad = tmp_path / "bad.csv"
    data = good.read_bytes()
    last = data.rstrip(b"\n").rfind(b"\n") + 1
    cells = data[last:].split(b",")
    cells[500] = b"x7"
    bad.write_bytes(data[:last] + b",".join(cells))
    del data
    test = synth.write_csv(tmp_path / "test.csv", synth.split(20))
    params = synth.write_params(tmp_path / "params.yaml", prep={})

    def run(src: Path) -> tuple[subprocess.CompletedProcess, int, float]:
        start = time.monotonic()
        proc, peak = synth.run_stage_measured(
            "parquet",
            "--params",
            params,
            "--train-csv",
            src,
            "--test-csv",
            test,
            "--train",
            "out/train.parquet",
            "--test",
            "out/test.parquet",
            cwd=tmp_path,
            timeout=300,
        )
        return proc, peak, time.monotonic() - start

    ok, ok_peak, ok_seconds = run(good)
    assert ok.returncode == 0, ok.stderr
    failed, peak, seconds = run(bad)
    assert failed.returncode == 2
    assert failed.stderr == (
        f"error: {bad}: row 240000 (line 240001), column 501 (pixel500): "
        "expected an integer 0..255, found 'x7'\n"
    )
    assert seconds <= 2 * ok_seconds, (seconds, ok_seconds)
    assert peak < 400 * MB and ok_peak < 400 * MB


def test_cold_epoch_bounded_resident_set(tmp_path: Path) -> None:
    """The beyond-RAM measurement runs whole epochs; with a bound, the windowed order evicts far less
    often."""
    from benchmarks.cold import build_shards, cold_epoch

    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (1000, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 1000, dtype=np.uint8)
    build_shards(tmp_path / "train", images, labels, 6, 1000, "train")  # 6 shards of 3 MB
    free = cold_epoch(tmp_path / "train", None, None)
    assert free["fraction_of_epoch"] == 1 and free["shards"] == 6 and free["evictions"] == 0
    glob = cold_epoch(tmp_path / "train", None, 3)
    windowed = cold_epoch(tmp_path / "train", 2, 3)
    assert windowed["evictions"] <= 2 < glob["evictions"]


def test_cold_benchmark_reads_both_dtypes_and_compares_their_bytes(tmp_path: Path) -> None:
    """benchmarks.cold at tiny scale: every epoch for float32 and uint8 shards of the same images, one
    comparison row per order and resident set, its ratio judged against the bytes goal."""
    from benchmarks.cold import main

    out = tmp_path / "bench"
    main(
        [
            "--scale",
            "2",
            "--base-samples",
            "300",
            "--shard-size",
            "128",
            "--budget-shards",
            "2",
            "--idx",
            str(_idx_folder(tmp_path)),
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ]
    )
    results = json.loads((out / "cold.json").read_text())
    assert results["settings"]["shard_dtype"] == ["float32", "uint8"]
    epochs = {(e["shard_dtype"], e["window"], e["budget_shards"]): e for e in results["epochs"]}
    assert len(epochs) == len(results["epochs"]) == 8
    for dtype in ("float32", "uint8"):
        assert epochs[(dtype, None, None)]["shards"] == 5  # 600 samples in shards of 128
    assert epochs[("uint8", None, None)]["data_mb"] < 0.3 * epochs[("float32", None, None)]["data_mb"]
    compared = results["bytes_vs_float32"]
    assert [(b["window"], b["budget_shards"]) for b in compared] == [
        (None, None),
        (2, None),
        (None, 2),
        (2, 2),
    ]
    for b in compared:
        f, u = (
            epochs[("float32", b["window"], b["budget_shards"])],
            epochs[("uint8", b["window"], b["budget_shards"])],
        )
        assert (b["float32_read_bytes"], b["uint8_read_bytes"]) == (f["read_bytes"], u["read_bytes"])
        if b["ratio"] is not None:
            assert b["ratio"] == u["read_bytes"] / f["read_bytes"] and b["goal_met"] == (b["ratio"] <= 0.26)
    markdown = (out / "cold.md").read_text()
    assert "## float32 shards" in markdown and "## uint8 shards" in markdown
    assert "## Bytes read cold: uint8 against float32 (goal <= 0.26)" in markdown
    assert list((tmp_path / "work").iterdir()) == []  # scratch removed


@pytest.mark.slow
def test_disk_benchmark_counts_linked_outputs_once_and_copies_twice(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.reprodisk",
            "--scale",
            "1",
            "--base-samples",
            "300",
            "--idx",
            str(_idx_folder(tmp_path)),
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    rows = {r["cache_type"]: r for r in json.loads((out / "reprodisk.json").read_text())["rows"]}
    assert set(rows) == {"reflink,copy", "hardlink,symlink"}
    linked, copied = rows["hardlink,symlink"], rows["reflink,copy"]
    for row in rows.values():
        assert row["samples"] == 300 and row["workspace_outputs_mb"] > 1 and row["user_csv_mb"] > 0.5
    # hard links: the cache is the workspace's outputs, stored once
    assert linked["total_mb"] <= 1.02 * linked["workspace_outputs_mb"] + 0.1
    # DVC's default copies where there are no reflinks (st_blocks counts shared reflinked blocks twice, too)
    assert copied["total_mb"] >= 1.9 * copied["workspace_outputs_mb"]
    assert "| `hardlink,symlink` |" in (out / "reprodisk.md").read_text()
    assert list((tmp_path / "work").iterdir()) == []  # scratch removed
