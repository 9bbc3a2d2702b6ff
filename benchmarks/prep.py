"""Benchmark of the data stages: ``python -m benchmarks.prep`` -> ``bench/prep.json``.

Runs each stage exactly as DVC does (``python -m stages.<name>``, a fresh
process) into an empty scratch folder, so the times include interpreter start
and imports, and reports the wall time of each stage and the size of every
output. DVC's own bookkeeping (hashing and caching outputs) is not included;
``dvc repro`` adds it on top.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from pipeline.atomic import write_bytes_atomic

ROOT = Path(__file__).resolve().parent.parent


def path_bytes(path: Path) -> int:
    """Size of a file, or of every file under a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def stage_commands(work: Path) -> list[tuple[str, list[str]]]:
    """The dvc.yaml commands with ``data/`` redirected into ``work``."""
    with open(ROOT / "dvc.yaml", encoding="utf-8") as f:
        stages = yaml.safe_load(f)["stages"]
    out = []
    for name in ("download", "csv", "parquet", "tensorize"):
        argv = stages[name]["cmd"].split()
        argv = [str(work / a) if a.startswith("data/") else a for a in argv]
        argv[0] = sys.executable
        out.append((name, argv))
    return out


def run(params: Path, repeats: int) -> dict:
    results: dict = {"stages": {}, "repeats": repeats}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="prep-bench-") as tmp:
            work = Path(tmp)
            shutil.copytree(ROOT / "data" / "user", work / "data" / "user", dirs_exist_ok=True)
            for name, argv in stage_commands(work):
                t0 = time.perf_counter()
                subprocess.run([*argv, "--params", str(params)], cwd=ROOT, check=True,
                               stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
                dt = time.perf_counter() - t0
                best = results["stages"].get(name)
                results["stages"][name] = dt if best is None else min(best, dt)
            data = work / "data"
            results["bytes"] = {
                "raw_gz": path_bytes(data / "raw"),
                "csv_train": path_bytes(data / "csv" / "train.csv"),
                "csv_test": path_bytes(data / "csv" / "test.csv"),
                "parquet_train": path_bytes(data / "parquet" / "train.parquet"),
                "parquet_test": path_bytes(data / "parquet" / "test.parquet"),
                "shards_train": path_bytes(data / "tensors" / "train"),
                "shards_test": path_bytes(data / "tensors" / "test"),
            }
    results["total_seconds"] = sum(results["stages"].values())
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    p.add_argument("--repeats", type=int, default=3, help="report the fastest of this many cold runs")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "prep.json")
    args = p.parse_args()
    results = run(args.params.resolve(), args.repeats)
    results["machine"] = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version()}
    results["params"] = os.path.relpath(args.params, ROOT)
    write_bytes_atomic(args.out, (json.dumps(results, indent=2) + "\n").encode())
    mb = {k: round(v / 1e6, 1) for k, v in results["bytes"].items()}
    print("stage       seconds (min of %d cold runs)" % args.repeats)
    for name, dt in results["stages"].items():
        print(f"{name:<11} {dt:6.2f}")
    print(f"{'total':<11} {results['total_seconds']:6.2f}")
    print("sizes (MB):", ", ".join(f"{k} {v}" for k, v in mb.items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
