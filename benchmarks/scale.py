"""Cost as data grows: ``python -m benchmarks.scale --scale 1 4 16`` -> ``bench/scale.{json,md,png}``.

For each factor K a user CSV of K x 60,000 rows is built from FashionMNIST's
train split (:mod:`benchmarks.scalecsv`: copy k flipped and shifted, labels
kept; the test CSV is the real 10,000-row test split at every K), then every
data stage runs as DVC runs it (``data.dataset: csv``, the dvc.yaml command in
a fresh interpreter, an empty output folder) and reports its wall time and its
own peak resident memory (VmHWM, read by the stage process itself at exit, so
the benchmark's memory never leaks into the figure). Then a loader-only epoch
over the K x shards (global shuffle, batch 512, page cache warm from tensorize)
and the loader's process-tree memory at 0 and 2 workers
(:mod:`benchmarks.memory`, a fresh interpreter each). Last, ``tensorize``
runs again with ``prep.shard_dtype: uint8``, for the train shards' bytes in
uint8 against float32 at every K (goal: at most :data:`BYTES_GOAL`). The
beyond-RAM experiment is :mod:`benchmarks.cold`, and each data stage with
``prep.workers`` 1 against every core is :mod:`benchmarks.parallelprep`;
``scale.md`` includes their ``cold.md`` and ``parallel.md``.
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
from collections.abc import Sequence
from pathlib import Path

from benchmarks.memory import subprocess_json
from benchmarks.prep import ROOT, path_bytes, stage_commands
from benchmarks.report import add_run_options, conditions_text, run_conditions, scratch_parent, write_results
from benchmarks.scalecsv import load_idx_split, write_scaled_csv
from pipeline.atomic import atomic_file

BASE_SAMPLES = 60_000
STAGES = ("download", "csv", "parquet", "tensorize")
TIME_SLACK = 1.15  # goal: seconds(K) <= 1.15 * K * seconds(1)
MEMORY_SLACK = 1.25  # goal: peak(K) <= 1.25 * peak(1)
BYTES_GOAL = 0.26  # goal: uint8 train shards (and what a cold epoch reads of them) <= 0.26 x float32's

# Runs a module as ``python -m`` would and writes the process's own VmHWM (KiB) at exit. ru_maxrss from
# wait4 would not do: Linux folds the forking parent's high-water mark into the child's at exec.
PEAK_WRAPPER = """
import atexit, runpy, sys
out = sys.argv[1]
def _report():
    with open("/proc/self/status") as status:
        peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(out, "w") as f:
        f.write(peak)
atexit.register(_report)
sys.argv = sys.argv[2:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def run_module_measured(
    module: str,
    args: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    peak_file: Path,
    timeout: float | None = None,
) -> tuple[subprocess.CompletedProcess, int]:
    """``python -m module args`` in a fresh interpreter; returns the result and its peak RSS in bytes."""
    argv = [sys.executable, "-c", PEAK_WRAPPER, str(peak_file), module, *args]
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    peak = int(peak_file.read_text()) * 1024 if peak_file.exists() else 0
    peak_file.unlink(missing_ok=True)
    return result, peak


def write_params(
    work: Path, shard_size: int, shard_dtype: str = "float32", workers: int | None = None
) -> Path:
    """A params file for a user-CSV run with these shards and ``prep.workers`` (None: every core, the
    default); every other key keeps its default. Each setting gets its own file."""
    doc = {
        "data": {
            "dataset": "csv",
            "train_csv": str(work / "data" / "user" / "train.csv"),
            "test_csv": str(work / "data" / "user" / "test.csv"),
        },
        "prep": {"shard_size": shard_size, "workers": workers, "shard_dtype": shard_dtype},
    }
    path = work / f"params-{workers}-{shard_dtype}.yaml"
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


def build_inputs(work: Path, scale: int, base_samples: int, idx_dir: Path) -> int:
    """Write the K x train CSV and the test CSV; returns the train rows.

    They go under ``work/data/user``, the folder the csv stage accepts user CSVs from.
    """
    (work / "data" / "user").mkdir(parents=True, exist_ok=True)
    images, labels = load_idx_split(idx_dir, "train")
    rows = write_scaled_csv(
        work / "data" / "user" / "train.csv", images[:base_samples], labels[:base_samples], scale
    )
    test_images, test_labels = load_idx_split(idx_dir, "test")
    keep = max(1, min(len(test_labels), base_samples // 6))
    write_scaled_csv(work / "data" / "user" / "test.csv", test_images[:keep], test_labels[:keep], 1)
    return rows


def run_stages(
    work: Path,
    params: Path,
    names: Sequence[str] = STAGES,
    cwd: Path = ROOT,
) -> dict[str, dict[str, float]]:
    """Each stage of ``names`` as dvc.yaml runs it (by default the data stages), outputs under ``work``
    (empty before it runs), in ``cwd``; its seconds and its own peak RSS."""
    env = {
        **os.environ,
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    out = {}
    for name, argv in stage_commands(work, names):
        assert argv[1] == "-m", argv
        t0 = time.perf_counter()
        res, peak = run_module_measured(
            argv[2], [*argv[3:], "--params", str(params)], cwd=cwd, env=env, peak_file=work / f".peak-{name}"
        )
        seconds = time.perf_counter() - t0
        if res.returncode != 0:
            raise SystemExit(f"stage {name} failed ({res.returncode}): {res.stderr.strip()}")
        out[name] = {"seconds": round(seconds, 3), "peak_rss_mb": round(peak / 2**20, 1)}
    return out


def loader_epoch_seconds(tensors: Path, batch_size: int = 512) -> float:
    """One loader-only epoch (0 workers, global shuffle) over the train shards, touching every batch."""
    from trainer.data import ShardDataset
    from trainer.loader import EpochBatchSampler, LoaderSettings, make_loader
    from trainer.verify import validate_split

    split = validate_split(tensors, expected_split="train")
    sampler = EpochBatchSampler(
        split.num_samples, batch_size, shuffle=True, seed=0, shard_sizes=[s.num_samples for s in split.shards]
    )
    loader = make_loader(
        ShardDataset(split), sampler, LoaderSettings(batch_size, True, 0, False, False, None)
    )
    t0 = time.perf_counter()
    for images, _ in loader:
        images.view(-1)[-1].item()
    return time.perf_counter() - t0


def measure_scale(
    work: Path, scale: int, base_samples: int, shard_size: int, idx_dir: Path, workers: list[int]
) -> dict:
    rows = build_inputs(work, scale, base_samples, idx_dir)
    params = write_params(work, shard_size)
    stages = run_stages(work, params)
    tensors = work / "data" / "tensors"
    uss, anon = {}, {}
    for n in workers:
        mem = subprocess_json(
            [
                "loader",
                "default-mmap",
                "--workers",
                str(n),
                "--samples",
                str(rows),
                "--tensors",
                str(tensors),
                "--parquet",
                str(work / "data" / "parquet"),
            ]
        )
        uss[str(n)], anon[str(n)] = mem["peak_uss_mb"], mem["peak_anon_mb"]
    loader_s = loader_epoch_seconds(tensors / "train")
    float32_bytes = path_bytes(tensors / "train")
    run_stages(work, write_params(work, shard_size, "uint8"), ["tensorize"])  # replaces the float32 shards
    uint8_bytes = path_bytes(tensors / "train")
    return {
        "scale": scale,
        "samples": rows,
        "stages": stages,
        "loader_epoch_s": round(loader_s, 3),
        "loader_uss_mb": uss,
        "loader_anon_mb": anon,
        "bytes": {
            "csv_train": path_bytes(work / "data" / "user" / "train.csv"),
            "parquet_train": path_bytes(work / "data" / "parquet" / "train.parquet"),
            "shards_train": float32_bytes,
        },
        "shards_train_bytes": {
            "float32": float32_bytes,
            "uint8": uint8_bytes,
            "ratio": round(uint8_bytes / float32_bytes, 4),
            "ok": uint8_bytes <= BYTES_GOAL * float32_bytes,
        },
    }


def goals(rows: list[dict]) -> dict:
    """Each stage's time and memory at every K against the 1x row (the smallest K measured)."""
    base = rows[0]
    out = {}
    for row in rows[1:]:
        k = row["scale"] / base["scale"]
        for name in STAGES:
            t0, t = base["stages"][name]["seconds"], row["stages"][name]["seconds"]
            m0, m = base["stages"][name]["peak_rss_mb"], row["stages"][name]["peak_rss_mb"]
            out[f"{name}@{row['scale']}x"] = {
                "time_vs_linear": round(t / (k * t0), 3),
                "time_ok": t <= TIME_SLACK * k * t0,
                "memory_vs_1x": round(m / m0, 3),
                "memory_ok": m <= MEMORY_SLACK * m0,
            }
    return out


def render_markdown(r: dict, cold_md: Path | None = None, parallel_md: Path | None = None) -> str:
    """The table and goals; with ``cold_md`` (written by ``benchmarks.cold``) and ``parallel_md``
    (``benchmarks.parallelprep``), their sections appended where the files exist."""
    lines = [
        "# Cost as data grows",
        "",
        f"`python -m benchmarks.scale --scale {' '.join(str(x['scale']) for x in r['rows'])}` on "
        f"{r['machine']['cpu_count']} cores ({r['machine']['platform']}); {r['settings']['base_samples']:,} "
        f"samples per K, shard_size {r['settings']['shard_size']}."
        + f" Before: {conditions_text(r['before'])}. After: {conditions_text(r['after'])}."
        + f" {r['settings']['note']}",
        "",
        "| K | samples | "
        + " | ".join(f"{s} s / MB" for s in STAGES)
        + " | loader epoch s | loader USS MB (0 / 2 workers) "
        "| loader anon MB (0 / 2) |",
        "|---:|---:|" + "---:|" * len(STAGES) + "---:|---:|---:|",
    ]
    for row in r["rows"]:
        cells = [f"{row['stages'][s]['seconds']:.2f} / {row['stages'][s]['peak_rss_mb']:.0f}" for s in STAGES]
        uss = " / ".join(f"{v:.0f}" for v in row["loader_uss_mb"].values())
        anon = " / ".join(f"{v:.0f}" for v in row["loader_anon_mb"].values())
        lines.append(
            f"| {row['scale']} | {row['samples']:,} | "
            + " | ".join(cells)
            + f" | {row['loader_epoch_s']:.2f} | {uss} | {anon} |"
        )
    if r["goals"]:
        lines += [
            "",
            f"Goals against the smallest K: time <= {TIME_SLACK} x linear, peak RSS <= {MEMORY_SLACK} x. "
            "The peak is the stage process's own (VmHWM); `parquet` and `tensorize` also run worker "
            "processes (`prep.workers`: all cores by default), whose memory is in the tree peaks of the next "
            "section.",
            "",
            "| stage@K | time / linear | ok | own peak / 1x | ok |",
            "|---|---:|---|---:|---|",
        ]
        for key, g in r["goals"].items():
            lines.append(
                f"| {key} | {g['time_vs_linear']:.2f} | {'yes' if g['time_ok'] else 'NO'} | "
                f"{g['memory_vs_1x']:.2f} | {'yes' if g['memory_ok'] else 'NO'} |"
            )
    lines += [
        "",
        f"Train shards' bytes, float32 against uint8 (`prep.shard_dtype`, tensorize run again): goal "
        f"uint8 / float32 <= {BYTES_GOAL}.",
        "",
        "| K | float32 MB | uint8 MB | uint8 / float32 | ok |",
        "|---:|---:|---:|---:|---|",
        *(
            f"| {row['scale']} | {b['float32'] / 1e6:,.1f} | {b['uint8'] / 1e6:,.1f} | {b['ratio']:.4f} | "
            f"{'yes' if b['ok'] else 'NO'} |"
            for row in r["rows"]
            if (b := row.get("shards_train_bytes"))
        ),
    ]
    lines += [
        "",
        "Loader USS counts the shard pages the process has mapped (file-backed, reclaimable page cache);"
        " anon is its own heap and tensors, the part that must stay flat.",
    ]
    for included in (parallel_md, cold_md):
        if included is not None and included.is_file():
            text = included.read_text().strip().splitlines()
            lines += ["", *("#" + line if line.startswith("#") else line for line in text)]  # a level down
    return "\n".join(lines) + "\n"


def render_plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [row["scale"] for row in r["rows"]]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in STAGES:
        ax_t.plot(ks, [row["stages"][name]["seconds"] for row in r["rows"]], "o-", label=name)
        ax_m.plot(ks, [row["stages"][name]["peak_rss_mb"] for row in r["rows"]], "o-", label=name)
    ax_t.plot(ks, [row["loader_epoch_s"] for row in r["rows"]], "s--", label="loader epoch")
    for n in r["rows"][0]["loader_anon_mb"]:
        ax_m.plot(
            ks, [row["loader_anon_mb"][n] for row in r["rows"]], "s--", label=f"loader anon, {n} workers"
        )
    t0 = r["rows"][0]
    ax_t.plot(
        ks,
        [sum(s["seconds"] for s in t0["stages"].values()) * k / ks[0] for k in ks],
        ":",
        color="grey",
        label="linear (all stages)",
    )
    for ax, title, unit in ((ax_t, "time", "seconds"), (ax_m, "peak memory", "MB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("K (x 60,000 samples)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)
    ax_m.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=int, nargs="+", default=[1, 4], help="factors K (default: 1 4)")
    p.add_argument(
        "--base-samples", type=int, default=BASE_SAMPLES, help="train samples per K (tests use a few hundred)"
    )
    p.add_argument("--shard-size", type=int, default=65536)
    p.add_argument(
        "--workers", type=int, nargs="+", default=[0, 2], help="loader workers for the memory figure"
    )
    add_run_options(p, "K=16 needs ~6 GB")
    args = p.parse_args(argv)
    if sorted(args.scale) != args.scale or min(args.scale) < 1:
        p.error("--scale: expected increasing factors >= 1, e.g. 1 4 16")
    results: dict = {
        "rows": [],
        "settings": {"base_samples": args.base_samples, "shard_size": args.shard_size, "note": args.note},
    }
    parent = scratch_parent(args.work)
    results["before"] = run_conditions()
    for scale in args.scale:
        work = Path(tempfile.mkdtemp(prefix=f"scale-{scale}x-", dir=parent))
        try:
            row = measure_scale(work, scale, args.base_samples, args.shard_size, args.idx, args.workers)
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    results["after"] = run_conditions()
    results["goals"] = goals(results["rows"])
    results["machine"] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    markdown = render_markdown(results, args.out / "cold.md", args.out / "parallel.md")
    write_results(args.out, "scale", results, markdown)
    render_plot(results, args.out / "scale.png")


if __name__ == "__main__":
    main()
