"""benchmarks.stream runs end to end on tiny data: its rows, and the properties they must show."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline.idx import encode_idx

ROOT = Path(__file__).resolve().parent.parent


def _tiny_idx(folder: Path, n: int = 600) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir()
    (folder / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(encode_idx(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)))
    )
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(encode_idx(rng.integers(0, 10, n, dtype=np.uint8)))
    )
    return folder


def test_stream_benchmark_fetches_each_shard_once_within_its_limit(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.stream",
            "--idx",
            str(_tiny_idx(tmp_path / "idx")),
            "--scale",
            "1",
            "--shard-size",
            "16",  # 38 shards: 10 % of the data holds a window of 2
            "--batch",
            "16",
            "--step-ms",
            "1",
            "--remotes",
            "local,http",
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
    assert res.returncode == 0, res.stderr[-2000:]
    results = json.loads((out / "stream.json").read_text())
    rows = results["rows"]
    assert rows[0]["remote"] == "pulled"
    streamed = rows[1:]
    assert {r["remote"].split(",")[0] for r in streamed} == {"local folder", "HTTP"}
    assert len(streamed) == 6  # two remotes, three cache limits each
    for row in streamed:
        assert row["fetched_over_data"] <= 1.05, row
        if row["limit_mb"] is not None:
            assert row["peak_cache_mb"] <= row["limit_mb"], row
    assert "| pulled |" in (out / "stream.md").read_text()
