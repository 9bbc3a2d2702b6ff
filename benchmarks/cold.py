"""Beyond RAM, measured cold: ``python -m benchmarks.cold`` -> ``bench/cold.json``, ``bench/cold.md``.

One loader-only epoch (batch 512, in-process gather, as with 0 workers) over
K x FashionMNIST shards of 65,536 samples, global shuffle against
``loader.shuffle_window`` W, counting what the epoch reads from disk
(``/proc/self/io`` ``read_bytes``) and its major page faults. The shards are
evicted from the page cache before each epoch (``POSIX_FADV_DONTNEED``).

This machine's RAM holds the whole 16x set (3 GB), so a cold epoch alone only
shows the first touch of every page. The beyond-RAM case is therefore also run
with the resident set *bounded*: whenever the shard pages mapped by the process
(``RssFile`` above its start) exceed a budget of B shards, every shard is
unmapped and evicted, as a page cache of B shards would have to drop them. The
same rule applies to both orders. It is cruder than the kernel's LRU (it also
drops the pages of the window in use, so the windowed figure is pessimistic),
but it charges the global order fairly: under uniform random access every
replacement policy keeps a hit rate of about B / number of shards.

The epochs run for each ``--shard-dtype`` (default float32 and uint8, the
same images): uint8 shards hold the source bytes, a quarter of float32's, and
a last table sets each order and resident set's bytes read from disk for
uint8 against float32 (goal: at most :data:`benchmarks.scale.BYTES_GOAL`).

``--accuracy-epochs`` also trains the model (``stages.train``) on 1x real
FashionMNIST in shards of ``--accuracy-shard-size`` samples, global against
windowed, and reports the test accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from benchmarks.prep import ROOT
from benchmarks.report import add_run_options, conditions_text, run_conditions, scratch_parent, write_results
from benchmarks.scale import BYTES_GOAL
from benchmarks.scalecsv import load_idx_split, transformed_copy
from pipeline.normalize import make_normalization
from pipeline.tabular import NUM_PIXELS
from pipeline.tensorize import write_split


def _scaled_chunks(
    images: np.ndarray, labels: np.ndarray, scale: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for k in range(scale):
        yield transformed_copy(images, k).reshape(len(images), NUM_PIXELS), labels


def build_shards(
    out: Path,
    images: np.ndarray,
    labels: np.ndarray,
    scale: int,
    shard_size: int,
    split: str,
    shard_dtype: str = "float32",
) -> None:
    write_split(
        _scaled_chunks(images, labels, scale),
        out,
        dataset="fashion-mnist",
        split=split,
        shard_size=shard_size,
        normalization=make_normalization("unit", None),
        shard_dtype=shard_dtype,
    )


def evict(paths: list[Path]) -> None:
    """Drop these files' pages from the page cache (pages still mapped somewhere stay)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_ahead_kb(path: Path) -> int | None:
    """The block device's readahead for the filesystem holding ``path`` (what one page fault may read)."""
    dev = os.stat(path).st_dev
    block = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    for queue in (block / "queue", block / ".." / "queue"):  # a partition's queue is its disk's
        try:
            return int((queue / "read_ahead_kb").read_text())
        except (OSError, ValueError):
            continue
    return None


def _read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no read_bytes")


def _rss_file_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    return 0


def cold_epoch(
    tensors: Path, window: int | None, budget_shards: float | None, seed: int = 0, max_seconds: float = 600.0
) -> dict:
    """One epoch from a cold page cache.

    With ``budget_shards``, the resident shard pages stay under that bound.
    """
    from trainer.data import ShardDataset
    from trainer.loader import EpochBatchSampler
    from trainer.verify import validate_split

    split = validate_split(tensors, expected_split="train")
    paths = [s.path for s in split.shards]
    sizes = [s.num_samples for s in split.shards]
    budget_kib = None if budget_shards is None else int(budget_shards * split.shards[0].size / 1024)
    sampler = EpochBatchSampler(
        split.num_samples, 512, shuffle=True, seed=seed, shard_sizes=sizes, shuffle_window=window
    )
    evict(paths)
    dataset = ShardDataset(split)
    base_rss = _rss_file_kib()
    read0, faults0 = _read_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    evictions, done, t0 = 0, 0, time.perf_counter()
    batches = len(sampler)
    for batch in sampler:
        _ = dataset[batch]  # the read is what is measured; the batch itself is not needed
        done += 1
        if budget_kib is not None and _rss_file_kib() - base_rss > budget_kib:
            dataset = ShardDataset(split)  # the old one's maps go with it
            evict(paths)
            evictions += 1
        if time.perf_counter() - t0 > max_seconds:
            break
    seconds = time.perf_counter() - t0
    fraction = done / batches
    read = _read_bytes() - read0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults0
    data_bytes = sum(s.size for s in split.shards)
    return {
        "window": window,
        "budget_shards": budget_shards,
        "fraction_of_epoch": round(fraction, 4),
        "seconds": round(seconds / fraction, 2),
        "read_bytes": int(read / fraction),
        "read_mb": round(read / fraction / 2**20, 1),
        "read_vs_data": round(read / fraction / data_bytes, 3),
        "major_faults": int(faults / fraction),
        "evictions": int(evictions / fraction),
        "data_mb": round(data_bytes / 2**20, 1),
        "shards": len(paths),
    }


def accuracy(work: Path, epochs: int, shard_size: int, window: int, idx_dir: Path) -> dict[str, float]:
    """Test accuracy after ``epochs`` on 1x real FashionMNIST: global shuffle against the window."""
    for split in ("train", "test"):
        images, labels = load_idx_split(idx_dir, split)
        build_shards(work / "acc" / split, images, labels, 1, shard_size, split)
    out = {}
    for name, loader in (("global", {}), (f"window={window}", {"shuffle_window": window})):
        run = work / "acc-runs" / name
        run.mkdir(parents=True)
        params = run / "params.yaml"
        params.write_text(json.dumps({"loader": loader, "train": {"epochs": epochs}}))
        argv = [
            sys.executable,
            "-m",
            "stages.train",
            "--params",
            str(params),
            "--train",
            str(work / "acc" / "train"),
            "--test",
            str(work / "acc" / "test"),
            "--model",
            str(run / "models"),
            "--checkpoints",
            str(run / "checkpoints"),
            "--live",
            str(run / "dvclive"),
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "DVC_NO_ANALYTICS": "1"}
        res = subprocess.run(argv, cwd=run, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"training ({name}) failed: {res.stderr.strip()}")
        out[name] = json.loads((run / "dvclive" / "metrics.json").read_text())["test_acc"]
    return out


def _order(e: dict) -> str:
    return "global" if e["window"] is None else f"window {e['window']}"


def _bound(e: dict) -> str:
    return "unbounded (fits RAM)" if e["budget_shards"] is None else f"<= {e['budget_shards']} shards"


def _dtype_lines(r: dict, dtype: str) -> list[str]:
    """One shard dtype's epochs: what was read, how, and the table."""
    s = r["settings"]
    epochs = [e for e in r["epochs"] if e.get("shard_dtype", "float32") == dtype]
    lines = [
        f"{epochs[0]['shards']} {dtype} shards of {s['shard_size']:,} samples "
        f"({epochs[0]['data_mb']:.0f} MB), one "
        f"loader-only epoch each, page cache evicted first; "
        f"device readahead {s.get('read_ahead_kb')} KiB.",
        "",
        "| order | resident set | seconds | read from disk MB | read / data | major faults | evictions |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for e in epochs:
        lines.append(
            f"| {_order(e)}{_scaled(e['fraction_of_epoch'])} | {_bound(e)} | {e['seconds']:.1f} | "
            f"{e['read_mb']:.0f} | "
            f"{e['read_vs_data']:.2f} | "
            f"{e['major_faults']:,} | {e['evictions']} |"
        )
    return [*lines, ""]


def _scaled(*fractions: float) -> str:
    """The mark of a row whose every figure is scaled up from part of an epoch (``max_seconds``)."""
    parts = [f"{f:.0%}" for f in fractions if f < 1]
    return f" (every figure scaled from {' and '.join(parts)} of the epoch)" if parts else ""


def bytes_vs_float32(epochs: list[dict]) -> list[dict]:
    """Per order and resident set measured with both dtypes: bytes read cold, uint8 over float32, and
    whether that ratio is at most :data:`BYTES_GOAL` (None where the float32 epoch read nothing)."""
    float32 = {(e["window"], e["budget_shards"]): e for e in epochs if e["shard_dtype"] == "float32"}
    rows = []
    for e in epochs:
        f = float32.get((e["window"], e["budget_shards"]))
        if e["shard_dtype"] != "uint8" or f is None:
            continue
        ratio = e["read_bytes"] / f["read_bytes"] if f["read_bytes"] else None
        rows.append(
            {
                "window": e["window"],
                "budget_shards": e["budget_shards"],
                "float32_read_bytes": f["read_bytes"],
                "uint8_read_bytes": e["read_bytes"],
                "fractions_of_epoch": [f["fraction_of_epoch"], e["fraction_of_epoch"]],
                "ratio": ratio,
                "goal_met": None if ratio is None else ratio <= BYTES_GOAL,
            }
        )
    return rows


def _bytes_lines(rows: list[dict]) -> list[str]:
    lines = [
        f"## Bytes read cold: uint8 against float32 (goal <= {BYTES_GOAL})",
        "",
        "| order | resident set | float32 read MB | uint8 read MB | uint8 / float32 | goal |",
        "|---|---|---:|---:|---:|---|",
    ]
    for b in rows:
        ratio = "n/a" if b["ratio"] is None else f"{b['ratio']:.3f}"
        goal = {None: "not judged: nothing read", True: "met", False: "NOT met"}[b["goal_met"]]
        lines.append(
            f"| {_order(b)}{_scaled(*b.get('fractions_of_epoch', [1, 1]))} | {_bound(b)} | "
            f"{b['float32_read_bytes'] / 2**20:.0f} | "
            f"{b['uint8_read_bytes'] / 2**20:.0f} | {ratio} | {goal} |"
        )
    return [*lines, ""]


def render_markdown(r: dict) -> str:
    s = r["settings"]
    dtypes = s.get("shard_dtype") or ["float32"]
    dtypes = [dtypes] if isinstance(dtypes, str) else dtypes  # results of a run before several dtypes
    lines = [
        "# Beyond RAM: global shuffle against shuffle_window, cold",
        "",
        f"`python -m benchmarks.cold --scale {s['scale']} --window {s['window']} "
        f"--budget-shards {s['budget_shards']} --shard-dtype {' '.join(dtypes)}`."
        + (
            f" Before: {conditions_text(r['before'])}. After: {conditions_text(r['after'])}."
            if "after" in r
            else ""
        )
        + (f" {s['note']}" if s["note"] else ""),
        "",
    ]
    for dtype in dtypes:
        lines += [f"## {dtype} shards", "", *_dtype_lines(r, dtype)]
    lines += [
        "The data fits in RAM here, so the unbounded rows only show the first touch of every page. The "
        "bounded rows emulate a page cache smaller than the data: whenever the shard pages the process has "
        "mapped exceed the budget, every shard is unmapped and evicted (POSIX_FADV_DONTNEED). "
        "The rule is the "
        "same for both orders and cruder than the kernel's LRU (it also drops the window in use, so the "
        "windowed figure is pessimistic); under uniform random access every replacement policy keeps a hit "
        "rate of about budget / shards, so the global figure is fair. Each fault reads up to the device "
        "readahead around the page: pages the global order then evicts unused are read again.",
        "",
    ]
    if r.get("bytes_vs_float32"):
        lines += _bytes_lines(r["bytes_vs_float32"])
    if r.get("accuracy"):
        acc = ", ".join(f"{k} {v:.4f}" for k, v in r["accuracy"].items())
        lines += [
            f"Test accuracy after {s['accuracy_epochs']} epochs on 1x FashionMNIST in shards of "
            f"{s['accuracy_shard_size']:,}: {acc}.",
        ]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=int, default=16)
    p.add_argument("--base-samples", type=int, default=60_000)
    p.add_argument("--shard-size", type=int, default=65536)
    p.add_argument("--window", type=int, default=2)
    p.add_argument(
        "--budget-shards", type=float, default=3.0, help="resident-set bound of the beyond-RAM runs"
    )
    p.add_argument(
        "--max-seconds", type=float, default=300.0, help="stop an epoch after this and extrapolate"
    )
    p.add_argument("--accuracy-epochs", type=int, default=0, help="also train global vs windowed (0: skip)")
    p.add_argument("--accuracy-shard-size", type=int, default=6000)
    p.add_argument(
        "--shard-dtype",
        nargs="+",
        choices=("float32", "uint8"),
        default=["float32", "uint8"],
        help="prep.shard_dtype of the shards read cold, each in turn (uint8: a quarter of the bytes)",
    )
    add_run_options(p, "16x needs ~3.5 GB")
    args = p.parse_args(argv)
    parent = scratch_parent(args.work)
    work = Path(tempfile.mkdtemp(prefix="cold-", dir=parent))
    results: dict = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    results["before"] = run_conditions()
    try:
        images, labels = load_idx_split(args.idx, "train")
        images, labels = images[: args.base_samples], labels[: args.base_samples]
        results["epochs"] = []
        for dtype in args.shard_dtype:  # one dtype's shards on disk at a time
            build_shards(work / "train", images, labels, args.scale, args.shard_size, "train", dtype)
            results["settings"]["read_ahead_kb"] = read_ahead_kb(work / "train")
            for budget in (None, args.budget_shards):
                for window in (None, args.window):
                    e = cold_epoch(work / "train", window, budget, max_seconds=args.max_seconds)
                    e["shard_dtype"] = dtype
                    print(json.dumps(e), flush=True)
                    results["epochs"].append(e)
            shutil.rmtree(work / "train")
        results["bytes_vs_float32"] = bytes_vs_float32(results["epochs"])
        if args.accuracy_epochs:
            results["accuracy"] = accuracy(
                work, args.accuracy_epochs, args.accuracy_shard_size, args.window, args.idx
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["after"] = run_conditions()
    write_results(args.out, "cold", results, render_markdown(results))


if __name__ == "__main__":
    main()
