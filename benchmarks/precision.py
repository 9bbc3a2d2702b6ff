"""Training arithmetic: ``python -m benchmarks.precision`` -> ``bench/precision.{json,md}``.

Two questions about ``train.precision`` and ``train.augment``:

* Speed: the trainer's own loop (``trainer.loop.train_one_epoch``, with
  :class:`~trainer.precision.Precision`) on the real FashionMNIST train
  shards, ``--steps`` batches per timed pass, fp32 and bf16 interleaved pass
  by pass (a shared machine drifts), fastest pass of ``--repeats``, scaled to
  a 60,000-sample epoch. The bf16 FLOP floor is one epoch's FLOPs (counted by
  ``FlopCounterMode``, ``benchmarks.compute.epoch_flops``) at the rate of a
  2048 x 2048 bfloat16 matmul measured in the same run. Goal: bf16 epoch /
  fp32 epoch <= :data:`GOAL_BF16_OVER_FP32` on a CPU with AMX (``amx_bf16``);
  elsewhere the ratio is reported, not judged. The CPU's bfloat16 flags are
  recorded.
* Accuracy (``--accuracy``): the real train stage (``python -m
  stages.train`` with a params file) on the FashionMNIST tensors, for fp32 vs
  bf16 (goal: bf16's test accuracy within :data:`GOAL_ACC_POINTS` points of
  fp32's) and for ``augment: []`` vs ``[flip, translate]``. A run whose
  params file and DVCLive summary already exist in ``--work`` is read, not
  rerun (runs take minutes each on a loaded machine).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.compute import EPOCH_SAMPLES, epoch_flops
from benchmarks.prep import ROOT
from benchmarks.report import conditions_text, run_conditions, write_results
from pipeline.cpuinfo import cpu_flags
from pipeline.params import load_section
from trainer.allocator import retain_freed_memory
from trainer.data import ShardDataset
from trainer.loader import EpochBatchSampler
from trainer.loop import train_one_epoch
from trainer.model import SimpleCNN
from trainer.precision import BF16_FLAGS, make_precision, matmul_gflops
from trainer.verify import validate_split

GOAL_BF16_OVER_FP32 = 0.5  # on a CPU with AMX
GOAL_ACC_POINTS = 0.5  # bf16's test accuracy at most this many percentage points below fp32's
PRECISIONS = ("fp32", "bf16")
# name -> the train params it sets on top of ACCURACY_BASE (augment [] is the fp32 run)
ACCURACY_RUNS = {"fp32": {}, "bf16": {"precision": "bf16"}, "aug": {"augment": ["flip", "translate"]}}


def speed(tensors: Path, batch_size: int, steps: int, repeats: int, seed: int) -> dict[str, float]:
    """Fastest ``steps``-batch pass per precision (interleaved), in seconds per 60,000-sample epoch."""
    device = torch.device("cpu")
    split = validate_split(tensors / "train", expected_split="train")
    dataset = ShardDataset(split)
    sampler = EpochBatchSampler(len(dataset), batch_size, shuffle=True, seed=seed)
    sampler.set_epoch(0)
    indices = [b for _, b in zip(range(steps), sampler, strict=False)]
    samples = sum(len(b) for b in indices)
    state = {}
    for name in PRECISIONS:
        torch.manual_seed(seed)
        model = SimpleCNN(*split.manifest.image_shape, split.manifest.num_classes)
        state[name] = (model, torch.optim.Adam(model.parameters(), lr=1e-3), make_precision(name, device))
    best = {name: math.inf for name in PRECISIONS}
    for repeat in range(1 + repeats):  # the first pass is untimed: threads, caches, oneDNN kernels
        for name, (model, optimizer, precision) in state.items():
            batches = [
                dataset[b] for b in indices
            ]  # gathered before the clock: the loop's arithmetic is timed
            stats = train_one_epoch(
                model,
                batches,
                optimizer,
                device,
                non_blocking=False,
                free_graph=True,
                progress=False,
                precision=precision,
            )
            if repeat:
                best[name] = min(best[name], stats.seconds)
    return {name: s * EPOCH_SAMPLES / samples for name, s in best.items()}


def accuracy(
    work: Path, tensors: Path, epochs: int, runs: tuple[str, ...] = tuple(ACCURACY_RUNS)
) -> dict[str, dict]:
    """The final metrics of ``runs`` of :data:`ACCURACY_RUNS` through the real train stage.

    A run already in ``work`` is read back instead of trained again.
    """
    work = work.resolve()  # the runs start in ``work``: every path they are given is absolute
    work.mkdir(parents=True, exist_ok=True)
    tensors = tensors.resolve()
    out = {}
    for name in runs:
        extra = ACCURACY_RUNS[name]
        doc = {
            "loader": {"batch_size": 512, "num_workers": 0},
            "train": {
                "epochs": epochs,
                "device": "cpu",
                "checkpoint_every": 0,
                "checkpoint_seconds": None,
                **extra,
            },
        }
        run = name if epochs == 5 else f"{name}-{epochs}"
        params, summary = work / f"{run}.yaml", work / run / "live" / "metrics.json"
        # A finished run only: DVCLive rewrites metrics.json every epoch, the model comes at the end.
        finished = summary.exists() and (work / run / "model" / "model.safetensors").exists()
        reused = params.exists() and json.loads(params.read_text()) == doc and finished
        started = time.perf_counter()
        if not reused:
            params.write_text(json.dumps(doc))
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "stages.train",
                    "--params",
                    str(params),
                    "--train",
                    str(tensors / "train"),
                    "--test",
                    str(tensors / "test"),
                    "--val",
                    str(tensors / "val"),
                    "--model",
                    str(work / run / "model"),
                    "--checkpoints",
                    str(work / run / "ckpt"),
                    "--live",
                    str(work / run / "live"),
                ],
                cwd=work,
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            if done.returncode != 0:
                raise SystemExit(f"accuracy run {run} failed ({done.returncode}): {done.stderr.strip()}")
        metrics = json.loads(summary.read_text())
        out[name] = {
            "test_acc": metrics["test_acc"],
            "test_loss": metrics["test_loss"],
            "val_acc": metrics.get("val_acc"),
            "train": doc["train"],
            "epochs": epochs,
            "reused": reused,
            "seconds": None if reused else time.perf_counter() - started,
        }
    return out


def _points(a: dict, name: str) -> str:
    return f"{100 * (a[name]['test_acc'] - a['fp32']['test_acc']):+.2f}"


def render(r: dict) -> str:
    s, g = r["speed"], r["goals"]
    lines = [
        "# Training arithmetic: precision and augmentation",
        "",
        f"Measured on {conditions_text(r['conditions'])}; torch {r['torch']}, "
        f"CPU capability {r['cpu_capability']}; bfloat16 flags: "
        + ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in r["bf16_flags"].items())
        + ".",
        "",
        "## Speed (the trainer's loop, FashionMNIST train shards)",
        "",
        f"{r['settings']['steps']} batches of {r['settings']['batch_size']} per pass, fp32 and bf16 "
        f"interleaved, fastest of {r['settings']['repeats']} passes, scaled to a 60,000-sample epoch.",
        "",
        "| precision | epoch s |",
        "|---|---:|",
        *[f"| {name} | {s[name]:.2f} |" for name in PRECISIONS],
        "",
        f"bf16 FLOP floor: {r['floor']['epoch_gflop']:.0f} GFLOP per epoch "
        f"at {r['floor']['bf16_matmul_gflops']:.0f} "
        f"GFLOP/s (2048x2048 bfloat16 matmul; fp32: {r['floor']['fp32_matmul_gflops']:.0f} GFLOP/s) = "
        f"{r['floor']['bf16_epoch_s']:.2f} s.",
        "",
        "| goal | measured | target |",
        "|---|---:|---:|",
        f"| bf16 epoch / fp32 epoch | {g['bf16_over_fp32']:.2f} | <= {GOAL_BF16_OVER_FP32} with AMX "
        f"({'judged: AMX present' if g['amx'] else 'not judged: no AMX on this CPU'}) |",
        f"| bf16 epoch / bf16 FLOP floor | {g['bf16_over_flop_floor']:.1f} | (reported) |",
        "",
    ]
    for a in r.get("accuracy", {}).values():
        epochs = next(iter(a.values()))["epochs"]
        lines += [
            f"## Accuracy (the train stage, {epochs} epochs, batch 512, seed 42, CPU)",
            "",
            "| run | precision | augment | test_acc | test_loss |",
            "|---|---|---|---:|---:|",
        ]
        for name, v in a.items():
            lines.append(
                f"| {name} | {v['train'].get('precision', 'fp32')} | {v['train'].get('augment', [])} | "
                f"{v['test_acc']:.4f} | {v['test_loss']:.4f} |"
            )
        lines.append("")
        reused = [name for name, v in a.items() if v.get("reused")]
        if reused:
            lines += [
                f"Read back, not trained in this run: {', '.join(reused)} (a finished run in `--work` "
                "with the same params, from an earlier run of this benchmark, is reused).",
                "",
            ]
        if "bf16" in a:
            lines += [
                f"bf16 - fp32 test accuracy: {_points(a, 'bf16')} points (goal: at most {GOAL_ACC_POINTS} "
                "below).",
                "",
            ]
        if "aug" in a:
            lines += [f"[flip, translate] - [] test accuracy: {_points(a, 'aug')} points.", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--tensors", type=Path, default=ROOT / "data" / "tensors", help="FashionMNIST tensors (data/tensors)"
    )
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    p.add_argument("--steps", type=int, default=40, help="batches per timed pass")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--accuracy", action="store_true", help="also the train-stage accuracy runs (minutes each)"
    )
    p.add_argument("--epochs", type=int, default=5, help="epochs of the accuracy runs")
    p.add_argument(
        "--augment-epochs",
        type=int,
        default=None,
        help="also compare augment [] and [flip, translate] at this many epochs",
    )
    p.add_argument(
        "--work", type=Path, default=Path("/tmp/precision-bench"), help="accuracy runs' folder (reused)"
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench")
    cfg = p.parse_args(argv)
    tensors = cfg.tensors
    retain_freed_memory()  # as trainer.run does
    batch_size = load_section("loader", cfg.params).batch_size
    seed = load_section("train", cfg.params).seed
    cpu = torch.device("cpu")
    flags = cpu_flags() or set()
    epoch_s = speed(tensors, batch_size, cfg.steps, cfg.repeats, seed)
    bf16_gflops, fp32_gflops = matmul_gflops(cpu, dtype=torch.bfloat16), matmul_gflops(cpu)
    flops = epoch_flops(batch_size, cpu)
    floor = {
        "epoch_gflop": flops / 1e9,
        "bf16_matmul_gflops": bf16_gflops,
        "fp32_matmul_gflops": fp32_gflops,
        "bf16_epoch_s": flops / (bf16_gflops * 1e9),
    }
    results = {
        "conditions": run_conditions(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_flags": {f: f in flags for f in (*BF16_FLAGS, "amx_tile", "avx512_bf16")},
        "settings": {
            "steps": cfg.steps,
            "batch_size": batch_size,
            "repeats": cfg.repeats,
            "tensors": str(tensors),
        },
        "speed": epoch_s,
        "floor": floor,
        "goals": {
            "bf16_over_fp32": epoch_s["bf16"] / epoch_s["fp32"],
            "amx": "amx_bf16" in flags,
            "bf16_over_flop_floor": epoch_s["bf16"] / floor["bf16_epoch_s"],
        },
    }
    if cfg.accuracy:
        results["accuracy"] = {str(cfg.epochs): accuracy(cfg.work, tensors, cfg.epochs)}
        if cfg.augment_epochs:
            results["accuracy"][str(cfg.augment_epochs)] = accuracy(
                cfg.work, tensors, cfg.augment_epochs, ("fp32", "aug")
            )
        a = results["accuracy"][str(cfg.epochs)]
        results["goals"]["bf16_acc_points_below_fp32"] = 100 * (a["fp32"]["test_acc"] - a["bf16"]["test_acc"])
    write_results(cfg.out, "precision", results, render(results))


if __name__ == "__main__":
    main()
