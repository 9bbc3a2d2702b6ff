"""``python -m benchmarks.loader``: the reference article's ablation, side by side, against the floors.

Everything runs in one process and one invocation, on the pipeline's own
FashionMNIST shards and Parquet. Each timing is the minimum over ``--repeats``
epochs. Rows too slow to run on a whole epoch (the article's per-item
DataFrame dataset) run on a prefix of the split and are scaled to 60,000
samples; ``--quick`` does that for every row. The training timings, the
floors (memcpy, compute, FLOP) and the page-fault experiment are in
``benchmarks/compute.py``; like ``trainer.run.train``, this process keeps freed
memory (``trainer/allocator.py``) before it trains. The rows ``bf16``,
``uint8`` and ``uint8+bf16`` and the bf16 FLOP floor are in
``benchmarks/arithrows.py``. Loader workers and uint8 shards
(``benchmarks/workers.py``) add the loader-only epoch per worker count for
both shard dtypes. Results go to ``bench/results.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from benchmarks import arithrows
from benchmarks.compute import (
    EPOCH_SAMPLES,
    Arithmetic,
    Source,
    allocator_experiment,
    as_pair,
    epoch_flops,
    memcpy_floor,
    one_warm_batch,
    threads_experiment,
    train_paired,
)
from benchmarks.ddp import ddp_rows
from benchmarks.disk import disk_usage
from benchmarks.memory import run_loader_memory, run_scenarios
from benchmarks.naive import NaiveDataset, PerSampleShards, PrecomputedDataset
from benchmarks.report import goal_verdicts, render_markdown, render_plot, run_conditions
from benchmarks.shapes import loader_vs_memcpy
from benchmarks.workers import uint8_twin, worker_epochs, workers_lines
from pipeline.atomic import write_bytes_atomic
from pipeline.cpuinfo import cpu_model
from pipeline.params import load_section
from trainer.allocator import retain_freed_memory
from trainer.data import ShardDataset
from trainer.loader import EpochBatchSampler, make_loader, resolve_settings
from trainer.precision import matmul_gflops
from trainer.verify import validate_split


@dataclass
class Row:
    name: str
    make: Callable[[], Callable[[int], Iterable]]  # builds the source once; source(epoch) iterates one epoch
    samples: int
    note: str = ""
    result: dict = field(default_factory=dict)
    reference_layout: bool = False  # train the original NCHW, ReLU-then-pool model instead of the trainer's
    arithmetic: Arithmetic | None = None  # device normalisation and precision; None: float32 batches, fp32


def _subset(n: int, limit: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(limit, generator=torch.Generator().manual_seed(seed * 1000 + epoch))[
        : min(n, limit)
    ]


def _loader_rows(cfg: argparse.Namespace, device: torch.device, seed: int, uint8_train: Path) -> list[Row]:
    parquet = cfg.parquet / "train.parquet"
    cores = os.cpu_count() or 1
    pin = device.type == "cuda"
    ns, fs = cfg.naive_samples, cfg.samples

    def naive(batch: int, workers: int = 0, persistent: bool = False, pin_memory: bool = False):
        def make():
            ds = NaiveDataset(parquet, limit=ns)
            loader = DataLoader(
                ds,
                batch_size=batch,
                shuffle=True,
                num_workers=workers,
                persistent_workers=persistent,
                pin_memory=pin_memory,
                generator=torch.Generator().manual_seed(seed),
            )
            return lambda epoch: loader

        return make

    def precomputed():
        ds = PrecomputedDataset(parquet, limit=fs)
        loader = DataLoader(
            ds,
            batch_size=512,
            shuffle=True,
            num_workers=cores,
            persistent_workers=True,
            pin_memory=pin,
            generator=torch.Generator().manual_seed(seed),
        )
        return lambda epoch: loader

    train = validate_split(cfg.tensors / "train", expected_split="train")
    splits = {"float32": train, "uint8": validate_split(uint8_train, expected_split="train")}

    def per_sample():
        ds = PerSampleShards(ShardDataset(train))
        sampler = torch.utils.data.SubsetRandomSampler(
            range(fs), generator=torch.Generator().manual_seed(seed)
        )
        loader = DataLoader(ds, batch_size=512, sampler=sampler)
        return lambda epoch: loader

    def loader_from_params(split=train, **override):
        def make():
            params = dataclasses.replace(load_section("loader", cfg.params), **override)
            settings = resolve_settings(params, device)
            sampler = EpochBatchSampler(fs, settings.batch_size, shuffle=settings.shuffle, seed=seed)
            loader = make_loader(ShardDataset(split), sampler, settings)

            def epoch_iter(epoch: int):
                sampler.set_epoch(epoch)
                return loader

            return epoch_iter

        return make

    pin_note = "" if pin else "pin_memory has no effect without an accelerator"
    return [
        Row("naive", naive(16), ns, "article v1, batch 16, 0 workers"),
        Row("naive-bs512", naive(512), ns, "v1, batch 512"),
        Row("+num_workers", naive(512, cores), ns, f"v1, batch 512, {cores} workers"),
        Row("+persistent_workers", naive(512, cores, True), ns, "v1, + persistent_workers"),
        Row("+pin_memory", naive(512, cores, True, pin), ns, "v1, + pin_memory; " + pin_note),
        Row(
            "precomputed",
            precomputed,
            fs,
            f"article v2, tensors built in __init__, {cores} persistent workers",
        ),
        Row("mmap-per-sample", per_sample, fs, "our shards, one __getitem__ per sample + collate"),
        Row("default", loader_from_params(), fs, "this pipeline's loader and model as params.yaml sets them"),
        Row(
            "reference-layout",
            loader_from_params(),
            fs,
            "same loader; the original NCHW, ReLU-then-pool model",
            reference_layout=True,
        ),
        Row(
            "resident",
            loader_from_params(device_resident=True),
            fs,
            "loader.device_resident: whole split on the device, one index_select per batch",
        ),
        *(
            Row(
                name,
                loader_from_params(splits[dtype]),
                fs,
                note,
                arithmetic=arithrows.arithmetic(name, splits[dtype], device),
            )
            for name, (dtype, _precision, note) in arithrows.ROWS.items()
        ),
    ]


def _time_loader(source: Callable[[int], Iterable], repeats: int) -> float:
    best = float("inf")
    for epoch in range(repeats):
        start = time.perf_counter()
        for batch in source(epoch):
            x, y = as_pair(batch)
            _ = x.view(-1)[-1].item() + int(y[-1])  # touch the data: nothing stays lazy
        best = min(best, time.perf_counter() - start)
    return best


def machine(device: torch.device) -> dict:
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _record(row: Row, loader_s: float, trained: dict[str, float], scale: float) -> None:
    row.result = {
        "name": row.name,
        "loader_epoch_s": loader_s,
        "train_epoch_s": trained["seconds"] * scale,
        "data_wait_fraction": trained["data_wait_fraction"],
        "page_faults_per_step": trained["page_faults_per_step"],
        "samples_measured": row.samples,
        "scaled": row.samples != EPOCH_SAMPLES,
        "note": row.note,
    }
    print(
        f"{row.name:<20} loader {loader_s:8.3f} s  train {row.result['train_epoch_s']:7.2f} s  "
        f"wait {trained['data_wait_fraction']:.3f}  faults/step {trained['page_faults_per_step']:.0f}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="fewer samples per row (scaled), under 3 minutes here"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--samples", type=int, help="samples per epoch for the fast rows (default 60000; quick 6000)"
    )
    p.add_argument("--naive-samples", type=int, help="samples for the v1 rows (default 6000; quick 512)")
    p.add_argument("--memory-workers", type=int, nargs="+", default=[0, 2, 8])
    p.add_argument("--habit-steps", type=int, default=20, help="training steps per memory-habit scenario")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--tensors", type=Path, default=Path("data/tensors"))
    p.add_argument("--parquet", type=Path, default=Path("data/parquet"))
    p.add_argument("--csv", type=Path, default=Path("data/csv"))
    p.add_argument("--out", type=Path, default=Path("bench"))
    p.add_argument("--skip-ddp", action="store_true", help="leave out rows ddp-1 and ddp-2 (benchmarks.ddp)")
    cfg = p.parse_args(argv)
    warnings.filterwarnings(
        "ignore", message="This DataLoader will create"
    )  # 8 workers on 2 cores is the point
    cfg.samples = cfg.samples or (6000 if cfg.quick else EPOCH_SAMPLES)
    cfg.naive_samples = cfg.naive_samples or (512 if cfg.quick else 6000)
    device = torch.device(
        "cuda"
        if cfg.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if cfg.device == "auto"
        else cfg.device
    )
    seed = load_section("train", cfg.params).seed
    started = time.perf_counter()
    before = run_conditions()  # the machine's load before this run adds its own

    # Before this process changes its allocator: each setting runs in a fresh interpreter.
    allocator = allocator_experiment(cfg, device, seed, repeats=min(cfg.repeats, 2))
    retain_freed_memory()  # as trainer.run.train does
    gflops = matmul_gflops(device)
    flops = epoch_flops(load_section("loader", cfg.params).batch_size, device)
    fl = {
        "memcpy_epoch_s": memcpy_floor(cfg.repeats),
        "matmul_gflops": gflops,
        "epoch_gflop": flops / 1e9,
        "flop_epoch_s": flops / (gflops * 1e9),
    }
    fl.update(arithrows.bf16_floor(fl["epoch_gflop"], device))
    twin = tempfile.TemporaryDirectory(prefix="uint8-twin-")  # the uint8 rows' shards
    rows = _loader_rows(cfg, device, seed, uint8_twin(cfg.tensors / "train", Path(twin.name) / "train"))
    # The compute floor and the rows compared with it or with default are timed epoch by epoch, interleaved.
    paired_names = ("default", "reference-layout", "resident", *arithrows.ROWS)
    warm = one_warm_batch(cfg.tensors, cfg.samples, load_section("loader", cfg.params).batch_size, device)
    paired: dict[str, tuple[Source, bool]] = {"compute": (warm, False)}
    loader_s: dict[str, float] = {}
    for row in rows:
        source = row.make()
        scale = EPOCH_SAMPLES / row.samples
        loader_s[row.name] = _time_loader(source, cfg.repeats) * scale
        if row.name in paired_names:
            paired[row.name] = (source, row.reference_layout)
            continue
        trained = train_paired({row.name: (source, row.reference_layout)}, cfg.repeats, device, seed)[
            row.name
        ]
        _record(row, loader_s[row.name], trained, scale)
        del source
    arithmetic = {row.name: row.arithmetic for row in rows if row.arithmetic is not None}
    trained_together = train_paired(paired, cfg.repeats, device, seed, arithmetic=arithmetic)
    compute = trained_together["compute"]
    fl["compute_epoch_s"] = compute["seconds"] * EPOCH_SAMPLES / cfg.samples
    if device.type == "cpu":
        # Every sample at the fastest per-sample speed seen for one step: a bound that a burst of load
        # on this shared machine cannot lift, where one whole epoch needs every one of its steps undisturbed.
        step_bound = compute["fastest_step_s_per_sample"] * EPOCH_SAMPLES
        fl["compute_epoch_s"] = min(fl["compute_epoch_s"], step_bound)
    threads = threads_experiment(cfg, device, seed, repeats=cfg.repeats)
    for row in rows:
        if row.name in paired_names:
            _record(row, loader_s[row.name], trained_together[row.name], EPOCH_SAMPLES / row.samples)
    del paired  # its loaders map the twin's shards
    twin.cleanup()
    print(
        f"floors: memcpy {fl['memcpy_epoch_s']:.4f} s, compute {fl['compute_epoch_s']:.2f} s, "
        f"FLOP {fl['flop_epoch_s']:.2f} s ({fl['epoch_gflop']:.0f} GFLOP at {gflops:.0f} GFLOP/s), "
        f"bf16 FLOP {fl['flop_epoch_s_bf16']:.2f} s (at {fl['matmul_gflops_bf16']:.0f} GFLOP/s) per epoch",
        flush=True,
    )
    naive_s = rows[0].result["loader_epoch_s"]
    ddp = (
        []
        if cfg.skip_ddp
        else ddp_rows(cfg.tensors, cfg.params, cfg.samples, cfg.repeats, device=device.type)
    )
    for row in [r.result for r in rows] + ddp:
        row["speedup_vs_naive"] = naive_s / row["loader_epoch_s"]

    results = {
        "machine": {**machine(device), "conditions_at_start": before},
        "settings": {
            "repeats": cfg.repeats,
            "samples": cfg.samples,
            "naive_samples": cfg.naive_samples,
            "quick": cfg.quick,
            "epoch_samples": EPOCH_SAMPLES,
        },
        "floors": fl,
        "rows": [r.result for r in rows] + ddp,
        "bf16": arithrows.bf16_judgement(device),  # whether bf16_over_fp32 is judged on this machine
        "allocator": allocator,
        "threads": threads,
        "memory": {
            "loader_process_tree": run_loader_memory(
                cfg.memory_workers, cfg.samples, cfg.tensors, cfg.parquet
            ),
            "training_habits": run_scenarios(str(device), steps=cfg.habit_steps, batch=512),
        },
        "disk": disk_usage(cfg.csv, cfg.parquet, cfg.tensors),
        "shapes": loader_vs_memcpy(
            cfg.samples, cfg.repeats, cfg.params
        ),  # random pixels, 1x28x28 and 3x32x32
        "workers": worker_epochs(
            cfg.tensors / "train", max(cfg.repeats, 5)
        ),  # rows float32/uint8 x 0, 1, 2, 4
    }
    by = {r["name"]: r for r in results["rows"]}
    results["goals"] = {
        "default_train_over_compute": by["default"]["train_epoch_s"] / fl["compute_epoch_s"],
        "default_train_over_flops": by["default"]["train_epoch_s"] / fl["flop_epoch_s"],
        "default_loader_over_memcpy": by["default"]["loader_epoch_s"] / fl["memcpy_epoch_s"],
        "naive_over_default_loader": naive_s / by["default"]["loader_epoch_s"],
        "rgb32_loader_over_memcpy": next(
            row["loader_over_memcpy"] for row in results["shapes"]["rows"] if row["shape"] == "3x32x32"
        ),
        "workers2_over_workers0": results["workers"]["workers2_over_workers0"]["float32"],
        "uint8_workers2_over_workers0": results["workers"]["workers2_over_workers0"]["uint8"],
        "bf16_over_fp32": by["bf16"]["train_epoch_s"] / by["default"]["train_epoch_s"],
        "bf16_train_over_flops_bf16": by["bf16"]["train_epoch_s"] / fl["flop_epoch_s_bf16"],
    }
    results["verdicts"] = goal_verdicts(results)
    results["wall_seconds"] = time.perf_counter() - started
    cfg.out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(cfg.out / "results.json", (json.dumps(results, indent=2) + "\n").encode())
    markdown = "\n".join([render_markdown(results), *workers_lines(results["workers"])])
    write_bytes_atomic(cfg.out / "results.md", markdown.encode())
    render_plot(results, cfg.out / "results.png")
    print(markdown)


if __name__ == "__main__":
    main()
