"""benchmarks.stream runs end to end on tiny data: its rows, and the properties they must show."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import synth

ROOT = Path(__file__).resolve().parent.parent


def test_stream_benchmark_fetches_each_shard_once_within_its_limit(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.stream",
            "--idx",
            str(synth.dataset(600, 10).write_folder(tmp_path / "idx", level=1)),
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
