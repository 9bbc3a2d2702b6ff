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


def test_appended_runs_keep_the_conditions_of_the_rows_they_measured() -> None:
    """``--append`` twice: each row keeps its own run's conditions, and the page names them by row."""
    from benchmarks.stream import _machine_line, earlier_rows, merge_rows, with_conditions

    def conditions(cpu: str) -> dict:
        return {"cpu": cpu, "cores": 2, "loadavg": [0.1, 0.2, 0.3], "under_load": False, "date": "2026-12-07"}

    def measured(*remotes: str) -> list[dict]:  # a run's rows before they are stamped
        return [{"remote": name} for name in ("pulled", *remotes)]

    rows = with_conditions(measured("local folder", "local folder"), conditions("first CPU"))
    rows = with_conditions(measured("SSH"), conditions("second CPU"), rows)
    rows = with_conditions(measured("HTTP", "local folder"), conditions("third CPU"), rows)  # measured again
    assert [(r["remote"], r["conditions"]["cpu"]) for r in rows] == [
        ("pulled", "first CPU"),
        ("SSH", "second CPU"),
        ("HTTP", "third CPU"),
        ("local folder", "third CPU"),
    ]
    first = with_conditions(measured("SSH"), conditions("first CPU"))
    second = with_conditions(measured("HTTP"), conditions("second CPU"))
    assert merge_rows(first, second) == [first[0], first[1], second[1]]  # the pulled row is the first run's
    repeated = with_conditions(measured("SSH", "SSH", "SSH"), conditions("first CPU"))
    assert _machine_line({"settings": {}, "rows": repeated}).count("`SSH`") == 0  # one run: no names
    repeated += with_conditions(measured("HTTP", "HTTP")[1:], conditions("second CPU"))
    assert _machine_line({"settings": {"append": True}, "rows": repeated}).count("`HTTP`") == 1
    line = _machine_line({"settings": {"append": True}, "rows": rows})
    assert line.startswith("Machine, by the rows each run measured: `pulled`: first CPU")
    assert "`SSH`: second CPU" in line and "`HTTP`, `local folder`: third CPU" in line
    single = _machine_line({"settings": {}, "conditions": rows[0]["conditions"], "rows": [{"remote": "x"}]})
    assert single.startswith("Machine: first CPU, 2 cores")
    legacy = _machine_line(
        {"settings": {"append": True}, "conditions": rows[0]["conditions"], "rows": [{"remote": "x"}]}
    )
    assert legacy == "Machine: conditions not recorded."
    # Appending to a file written before rows carried conditions: its rows keep the file's own,
    # unless that file was itself appended to.
    old = {"settings": {}, "conditions": conditions("old CPU"), "rows": measured("SSH")}
    assert [r["conditions"]["cpu"] for r in earlier_rows(old)] == ["old CPU", "old CPU"]
    assert [r.get("conditions") for r in earlier_rows({**old, "settings": {"append": True}})] == [None, None]
    assert earlier_rows({**old, "rows": rows})[1]["conditions"]["cpu"] == "second CPU"  # their own first
