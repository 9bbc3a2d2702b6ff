"""``python -m benchmarks.checkpoint`` -> ``bench/checkpoint.json``, ``bench/checkpoint.md``.

What resuming anywhere costs on real FashionMNIST (60,000 train samples in
one shard, default params, CPU):

- one mid-epoch checkpoint: seconds to write it (``trainer.checkpoint.save_checkpoint``,
  atomic folder, fsync included; best and median of ``--repeats``) and its bytes;
- training epochs through the stage's own ``trainer.run.train`` with
  ``train.checkpoint_seconds`` off (``null``), at its default, and at
  ``--often`` seconds (many mid-epoch checkpoints): the per-epoch time, whose
  differences are the slowdown;
- the ``train.verify: header`` check of every pixel for NaN or infinity
  (``validate_split`` with and without it), against an epoch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

import torch

from benchmarks.cold import build_shards
from benchmarks.loader import machine
from benchmarks.report import add_run_options, run_conditions, scratch_parent, write_results
from benchmarks.scalecsv import load_idx_split
from pipeline.params import LoaderParams, TrainParams
from pipeline.shards import IMAGES, read_layout
from trainer import verify
from trainer.checkpoint import RunShape, save_checkpoint
from trainer.model import SimpleCNN
from trainer.position import Position
from trainer.run import train as train_model


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def checkpoint_cost(work: Path, repeats: int) -> dict:
    """Write the state of a trained-looking model and Adam (every state tensor present) ``repeats`` times."""
    torch.manual_seed(0)
    model = SimpleCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.rand(8, 1, 28, 28)).sum().backward()
    optimizer.step()  # Adam's exp_avg and exp_avg_sq now exist, as in any real checkpoint
    history = [{"train_loss": 0.5}] * 4
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        save_checkpoint(
            work / "checkpoints",
            model=model,
            optimizer=optimizer,
            device=torch.device("cpu"),
            position=Position(4, 57, 29184, (12345.678,), 2.5, 0.01),
            run_fingerprint="0" * 64,
            shape=RunShape(1, torch.get_num_threads()),
            history=history,
        )
        times.append(time.perf_counter() - start)
    return {
        "best_s": min(times),
        "median_s": statistics.median(times),
        "bytes": _folder_bytes(work / "checkpoints"),
    }


def epochs_with(tensors: Path, work: Path, checkpoint_seconds: float | None, epochs: int) -> list[float]:
    """``epochs`` epochs of the stage's own training with this interval; each epoch's ``epoch_seconds``."""
    train = dataclasses.replace(
        TrainParams(), epochs=epochs, device="cpu", checkpoint_every=0, checkpoint_seconds=checkpoint_seconds
    )
    out = work / f"run-{checkpoint_seconds}"
    train_model(
        train_dir=tensors / "train",
        test_dir=tensors / "test",
        model_dir=out / "models",
        checkpoint_dir=out / "checkpoints",
        live_dir=out / "dvclive",
        loader=LoaderParams(),
        train=train,
    )
    rows = (out / "dvclive" / "plots" / "metrics" / "epoch_seconds.tsv").read_text().splitlines()[1:]
    return [float(row.split("\t")[1]) for row in rows]


def finite_check_cost(tensors: Path, repeats: int) -> dict:
    """The pixel check alone (every shard of the train split), and the whole header validation with it."""
    split = verify.validate_split(tensors / "train", expected_split="train", verify="header")
    finite, header = float("inf"), float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for shard in split.shards:
            verify._check_finite(str(shard.path), shard.path, read_layout(shard.path).tensors[IMAGES])
        finite = min(finite, time.perf_counter() - start)
        start = time.perf_counter()
        verify.validate_split(tensors / "train", expected_split="train", verify="header")
        header = min(header, time.perf_counter() - start)
    pixels = split.num_samples * math.prod(split.manifest.image_shape)
    return {"finite_check_s": finite, "header_check_s": header, "pixels": pixels}


def render_markdown(r: dict) -> str:
    c, f, e = r["checkpoint"], r["finite"], r["epochs"]
    base = min(e["off"])
    lines = [
        "# Checkpoint benchmark",
        "",
        f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, torch {r['machine']['torch']}, CPU. "
        f"FashionMNIST, {r.get('train_samples', 60000):,} train samples, default params. {r['note']}",
        "",
        f"- One checkpoint (model, Adam, RNG, position; atomic folder with fsync): "
        f"**{c['best_s'] * 1000:.0f} ms** best, {c['median_s'] * 1000:.0f} ms median of {r['repeats']}, "
        f"**{c['bytes'] / 1e6:.2f} MB**.",
        f"- NaN/infinity check of all {f['pixels']:,} train pixels "
        f"(`train.verify: header`, page cache warm): **{f['finite_check_s']:.3f} s** "
        f"(the whole header validation with it: {f['header_check_s']:.3f} s), "
        f"{f['finite_check_s'] / base:.1%} of the fastest epoch below; run once per training, not per epoch.",
        "",
        "| `train.checkpoint_seconds` | epoch seconds (each epoch) | fastest | vs off |",
        "|---|---|---:|---:|",
    ]
    for key, label in (
        ("off", "null (off)"),
        ("default", f"{r['default_seconds']:g} (default)"),
        ("often", f"{r['often_seconds']:g}"),
    ):
        times = e[key]
        lines.append(
            f"| {label} | {', '.join(f'{t:.2f}' for t in times)} | {min(times):.2f} | "
            f"{min(times) / base - 1:+.1%} |"
        )
    spread = max(max(t) / min(t) - 1 for t in e.values())
    lines += [
        "",
        f"At {r['often_seconds']:g} s an epoch of about {base:.0f} s writes about "
        f"{base / r['often_seconds']:.0f} checkpoints, "
        f"about {base / r['often_seconds'] * c['median_s']:.1f} s "
        f"of writing at the median cost; at the default none is due within an epoch this short, so its "
        f"row measures the per-step boundary check alone (one host read of a CPU scalar). The same "
        f"setting's two epochs differ by up to {spread:.0%} here, so the rows' differences are noise: "
        f"the default's cost is one checkpoint per {r['default_seconds']:g} s, "
        f"{c['median_s'] / r['default_seconds']:.3%} of the time.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_options(p, "needs about 400 MB")
    p.add_argument("--epochs", type=int, default=2, help="epochs per interval setting")
    p.add_argument("--repeats", type=int, default=10, help="checkpoint writes and header checks timed")
    p.add_argument("--often", type=float, default=1.0, help="a short interval, seconds (many checkpoints)")
    p.add_argument(
        "--samples",
        type=int,
        default=None,
        help="the first this many samples of each split (tests; default all)",
    )
    cfg = p.parse_args(argv)
    before = run_conditions()  # the machine's load before this run adds its own
    work = scratch_parent(cfg.work) / "checkpoint-bench"
    tensors = work / f"tensors-{cfg.samples or 'all'}"  # shards built once per sample count
    if not (tensors / "test" / "manifest.json").exists():
        for split in ("train", "test"):
            images, labels = load_idx_split(cfg.idx, split)
            images, labels = images[: cfg.samples], labels[: cfg.samples]
            build_shards(tensors / split, images, labels, 1, 65536, split)
    default = TrainParams().checkpoint_seconds
    results = {
        "machine": {**machine(torch.device("cpu")), "conditions_at_start": before},
        "note": cfg.note,
        "repeats": cfg.repeats,
        "train_samples": json.loads((tensors / "train" / "manifest.json").read_text())["num_samples"],
        "default_seconds": default,
        "often_seconds": cfg.often,
        "checkpoint": checkpoint_cost(work, cfg.repeats),
        "finite": finite_check_cost(tensors, cfg.repeats),
        "epochs": {
            key: epochs_with(tensors, work, seconds, cfg.epochs)
            for key, seconds in (("off", None), ("default", default), ("often", cfg.often))
        },
    }
    write_results(cfg.out, "checkpoint", results, render_markdown(results))


def rerender(out: Path) -> None:
    """Rewrite ``checkpoint.md`` from ``checkpoint.json`` (after a change of wording; nothing re-measured)."""
    results = json.loads((out / "checkpoint.json").read_text())
    write_results(out, "checkpoint", results, render_markdown(results))


if __name__ == "__main__":
    main()
