"""Loader workers and uint8 shards: ``python -m benchmarks.workers`` -> ``bench/workers.{json,md}``.

One loader-only epoch (the trainer's dataset, sampler and loader; batch 512,
persistent workers, nothing pinned, fastest of ``--repeats`` after a warm-up
epoch that starts the workers, the loaders timed in turn) for 0, 1, 2 and 4 workers, on FashionMNIST's
float32 train shards and on their uint8 twin. The twin is made (:func:`benchmarks.gpu.uint8_split`) by
inverting the normalisation table (each float32 pixel is exactly one entry of
``pipeline.normalize.lookup_table``, so its byte is found by a search and
checked), so no tensorize run is needed. For comparison, ``gather-in-worker``
times the design the trainer replaced: a plain DataLoader whose workers
gather each batch and send it back as a tensor. Goal: with 2 workers the
epoch takes at most :data:`GOAL_WORKERS2_OVER_WORKERS0` times the 0-worker
epoch. :mod:`benchmarks.loader` reports the same figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from benchmarks.gpu import uint8_split
from benchmarks.report import conditions_text, run_conditions
from pipeline.atomic import write_bytes_atomic
from pipeline.params import LoaderParams
from trainer.data import ShardDataset
from trainer.loader import EpochBatchSampler, make_loader, resolve_settings
from trainer.verify import validate_split

GOAL_WORKERS2_OVER_WORKERS0 = 1.5
WORKERS = (0, 1, 2, 4)
BATCH = 512


def uint8_twin(split_dir: Path, out_dir: Path) -> Path:
    """Write the uint8 shards and manifest whose device normalisation gives ``split_dir``'s float32 train
    shards: :func:`benchmarks.gpu.uint8_split`, which finds each pixel's byte in the table and checks it."""
    return uint8_split(split_dir, out_dir, "train")


def _one_epoch(loader, sampler: EpochBatchSampler, epoch: int) -> float:
    sampler.set_epoch(epoch)
    start = time.perf_counter()
    for images, labels in loader:
        _ = images.view(-1)[-1].item() + int(labels[-1])  # touch the data: nothing stays lazy
    return time.perf_counter() - start


def worker_epochs(train_dir: Path, repeats: int = 5) -> dict:
    """Loader-only epoch seconds per shard dtype and worker count, and the goal ratio (float32 and uint8).

    The loaders are timed in turn, one epoch each per round, so a burst of
    other work on a shared machine falls on all of them alike; each keeps its
    fastest epoch.
    """
    warnings.filterwarnings(
        "ignore", message="This DataLoader will create"
    )  # 4 workers on 2 cores is measured
    rows, loaders = [], []
    with tempfile.TemporaryDirectory() as tmp:
        splits = {
            "float32": validate_split(train_dir, expected_split="train"),
            "uint8": validate_split(uint8_twin(train_dir, Path(tmp) / "train"), expected_split="train"),
        }
        for dtype, split in splits.items():
            dataset = ShardDataset(split)
            for workers in WORKERS:
                sampler = EpochBatchSampler(split.num_samples, BATCH, shuffle=True, seed=0)
                settings = resolve_settings(
                    LoaderParams(
                        batch_size=BATCH,
                        num_workers=workers,
                        persistent_workers=workers > 0,
                        pin_memory=False,
                    ),
                    torch.device("cpu"),
                )
                rows.append(
                    {
                        "name": f"{dtype}-workers{workers}",
                        "dtype": dtype,
                        "workers": workers,
                        "design": "prefetch" if workers else "main",
                    }
                )
                loaders.append((make_loader(dataset, sampler, settings), sampler))
            sampler = EpochBatchSampler(split.num_samples, BATCH, shuffle=True, seed=0)
            rows.append(
                {
                    "name": f"{dtype}-gather-in-worker2",
                    "dtype": dtype,
                    "workers": 2,
                    "design": "gather-in-worker",
                }
            )
            loaders.append(
                (
                    DataLoader(
                        dataset, sampler=sampler, batch_size=None, num_workers=2, persistent_workers=True
                    ),
                    sampler,
                )
            )
        best = [float("inf")] * len(rows)
        for epoch in range(repeats + 1):  # epoch 0 starts the persistent workers and warms the page cache
            for i, (loader, sampler) in enumerate(loaders):
                seconds = _one_epoch(loader, sampler, epoch)
                best[i] = min(best[i], seconds) if epoch else best[i]
        del loaders
    for row, seconds in zip(rows, best):
        row["loader_epoch_s"] = seconds
    by = {r["name"]: r["loader_epoch_s"] for r in rows}
    ratios = {dtype: by[f"{dtype}-workers2"] / by[f"{dtype}-workers0"] for dtype in splits}
    return {
        "conditions": run_conditions(),
        "repeats": repeats,
        "batch_size": BATCH,
        "samples": splits["float32"].num_samples,
        "rows": rows,
        "workers2_over_workers0": ratios,
        "goal": GOAL_WORKERS2_OVER_WORKERS0,
    }


def workers_lines(r: dict) -> list[str]:
    """Markdown of :func:`worker_epochs`'s result (shared by workers.md and results.md)."""
    by = {row["name"]: row["loader_epoch_s"] for row in r["rows"]}
    lines = [
        "## Loader workers and uint8 shards",
        "",
        f"Loader-only epoch of {r['samples']:,} FashionMNIST samples, batch {r['batch_size']}, persistent "
        f"workers, fastest of {r['repeats']} after a warm-up epoch. "
        "Workers prefetch pages and the main process "
        "gathers (`trainer/prefetch.py`); `gather-in-worker` is the replaced design (workers gather and send "
        "each batch as a tensor). " + conditions_text(r["conditions"]) + ".",
        "",
        "| shards | " + " | ".join(f"{w} workers" for w in WORKERS) + " | gather-in-worker, 2 | 2 over 0 "
        f"(goal <= {r['goal']}) |",
        "|---" * (len(WORKERS) + 3) + "|",
    ]
    for dtype, ratio in r["workers2_over_workers0"].items():
        cells = [f"{by[f'{dtype}-workers{w}']:.4f} s" for w in WORKERS]
        lines.append(
            f"| {dtype} | " + " | ".join(cells) + f" | {by[f'{dtype}-gather-in-worker2']:.4f} s | "
            f"{ratio:.2f} |"
        )
    return [*lines, ""]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tensors", type=Path, default=Path("data/tensors"), help="holds the float32 train split")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("bench"))
    cfg = p.parse_args(argv)
    result = worker_epochs(cfg.tensors / "train", cfg.repeats)
    cfg.out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(cfg.out / "workers.json", (json.dumps(result, indent=2) + "\n").encode())
    markdown = "\n".join(["# Loader workers", "", *workers_lines(result)])
    write_bytes_atomic(cfg.out / "workers.md", markdown.encode())
    print(markdown)


if __name__ == "__main__":
    main()
