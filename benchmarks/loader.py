"""``python -m benchmarks.loader``: the reference article's ablation, side by side, against the floors.

Everything runs in one process and one invocation, on the pipeline's own
FashionMNIST shards and Parquet. Each timing is the minimum over ``--repeats``
epochs. Rows too slow to run on a whole epoch (the article's per-item
DataFrame dataset) run on a prefix of the split and are scaled to 60,000
samples; ``--quick`` does that for every row. Results go to
``bench/results.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from benchmarks.ddp import ddp_rows
from benchmarks.disk import disk_usage
from benchmarks.memory import run_loader_memory, run_scenarios
from benchmarks.naive import NaiveDataset, PerSampleShards, PrecomputedDataset
from benchmarks.report import render_markdown, render_plot
from pipeline.atomic import write_bytes_atomic
from pipeline.params import load_section
from trainer.data import ShardDataset
from trainer.loader import EpochBatchSampler, make_loader, resolve_settings
from trainer.model import SimpleCNN
from trainer.verify import validate_split

EPOCH_SAMPLES = 60_000
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Row:
    name: str
    make: Callable[[], Callable[[int], Iterable]]  # builds the source once; source(epoch) iterates one epoch
    samples: int
    note: str = ""
    result: dict = field(default_factory=dict)


def _as_pair(batch: object) -> Batch:
    if isinstance(batch, dict):
        return batch["image"], batch["label"]
    return batch  # type: ignore[return-value]


def _subset(n: int, limit: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(limit, generator=torch.Generator().manual_seed(seed * 1000 + epoch))[: min(n, limit)]


def _loader_rows(cfg: argparse.Namespace, device: torch.device, seed: int) -> list[Row]:
    parquet = cfg.parquet / "train.parquet"
    cores = os.cpu_count() or 1
    pin = device.type == "cuda"
    ns, fs = cfg.naive_samples, cfg.samples

    def naive(batch: int, workers: int = 0, persistent: bool = False, pin_memory: bool = False):
        def make():
            ds = NaiveDataset(parquet, limit=ns)
            loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                persistent_workers=persistent, pin_memory=pin_memory,
                                generator=torch.Generator().manual_seed(seed))
            return lambda epoch: loader
        return make

    def precomputed():
        ds = PrecomputedDataset(parquet, limit=fs)
        loader = DataLoader(ds, batch_size=512, shuffle=True, num_workers=cores, persistent_workers=True,
                            pin_memory=pin, generator=torch.Generator().manual_seed(seed))
        return lambda epoch: loader

    train = validate_split(cfg.tensors / "train", expected_split="train")

    def per_sample():
        ds = PerSampleShards(ShardDataset(train))
        sampler = torch.utils.data.SubsetRandomSampler(range(fs), generator=torch.Generator().manual_seed(seed))
        loader = DataLoader(ds, batch_size=512, sampler=sampler)
        return lambda epoch: loader

    def default():
        params = load_section("loader", cfg.params)
        settings = resolve_settings(params, device, notice=lambda _m: None)
        sampler = EpochBatchSampler(fs, settings.batch_size, shuffle=settings.shuffle, seed=seed)
        loader = make_loader(ShardDataset(train), sampler, settings)

        def epoch_iter(epoch: int):
            sampler.set_epoch(epoch)
            return loader
        return epoch_iter

    def resident():
        x, y = ShardDataset(train)[torch.arange(fs)]
        x, y = x.to(device), y.to(device)

        def epoch_iter(epoch: int) -> Iterator[Batch]:
            perm = torch.randperm(fs, generator=torch.Generator().manual_seed(seed + epoch)).to(device)
            for i in range(0, fs, 512):
                idx = perm[i : i + 512]
                yield x[idx], y[idx]
        return epoch_iter

    pin_note = "" if pin else "pin_memory has no effect without an accelerator"
    return [
        Row("naive", naive(16), ns, "article v1, batch 16, 0 workers"),
        Row("naive-bs512", naive(512), ns, "v1, batch 512"),
        Row("+num_workers", naive(512, cores), ns, f"v1, batch 512, {cores} workers"),
        Row("+persistent_workers", naive(512, cores, True), ns, "v1, + persistent_workers"),
        Row("+pin_memory", naive(512, cores, True, pin), ns, "v1, + pin_memory; " + pin_note),
        Row("precomputed", precomputed, fs, f"article v2, tensors built in __init__, {cores} persistent workers"),
        Row("mmap-per-sample", per_sample, fs, "our shards, one __getitem__ per sample + collate"),
        Row("default", default, fs, "this pipeline's loader as params.yaml sets it"),
        Row("resident", resident, fs, "whole split on the device, randperm + slices, no DataLoader"),
    ]


def _time_loader(source: Callable[[int], Iterable], repeats: int) -> float:
    best = float("inf")
    for epoch in range(repeats):
        start = time.perf_counter()
        for batch in source(epoch):
            x, y = _as_pair(batch)
            _ = x.view(-1)[-1].item() + int(y[-1])  # touch the data: nothing stays lazy
        best = min(best, time.perf_counter() - start)
    return best


def _train_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable,
                 device: torch.device) -> tuple[float, float]:
    """(seconds, seconds blocked waiting for the next batch) of one training epoch."""
    model.train()
    wait = 0.0
    start = time.perf_counter()
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            break
        wait += time.perf_counter() - t0
        x, y = _as_pair(batch)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        del loss
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, wait


def _time_train_paired(sources: dict[str, Callable[[int], Iterable]], repeats: int, device: torch.device,
                       seed: int) -> dict[str, tuple[float, float]]:
    """Best epoch time and its data-wait fraction per source, their epochs interleaved.

    Interleaving matters on a shared machine whose speed drifts by 10-25 %
    over minutes: two sources compared epoch by epoch see the same drift.
    """
    state = {}
    for name in sources:
        torch.manual_seed(seed)
        model = SimpleCNN().to(device)
        state[name] = (model, torch.optim.Adam(model.parameters(), lr=1e-3))
    best = {name: (float("inf"), 0.0) for name in sources}
    for epoch in range(repeats):
        for name, source in sources.items():
            seconds, wait = _train_epoch(*state[name], source(epoch), device)
            if seconds < best[name][0]:
                best[name] = (seconds, wait / seconds)
    return best


def _time_train(source: Callable[[int], Iterable], repeats: int, device: torch.device, seed: int) -> tuple[float, float]:
    return _time_train_paired({"row": source}, repeats, device, seed)["row"]


def memcpy_floor(repeats: int) -> float:
    """Seconds to copy one epoch's image bytes (60,000 x 784 float32) once in RAM."""
    src = torch.rand(EPOCH_SAMPLES * 784)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults are not part of a copy
    best = float("inf")
    for _ in range(max(repeats, 5)):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return best


def resident_epochs(cfg: argparse.Namespace, device: torch.device, seed: int) -> Callable[[int], list[Batch]]:
    """For the compute floor: epoch e's batches exactly as the ``default`` loader yields them,
    gathered onto the device before the epoch's clock starts. A model trained on them
    follows the default row's model step for step, so the two differ only by the loader."""
    dataset = ShardDataset(validate_split(cfg.tensors / "train", expected_split="train"))
    params = load_section("loader", cfg.params)
    sampler = EpochBatchSampler(cfg.samples, params.batch_size, shuffle=params.shuffle, seed=seed)

    def batches(epoch: int) -> list[Batch]:
        sampler.set_epoch(epoch)
        return [tuple(t.to(device) for t in dataset[b]) for b in sampler]  # type: ignore[misc]
    return batches


def machine(device: torch.device) -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer samples per row (scaled), under 3 minutes here")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--samples", type=int, help="samples per epoch for the fast rows (default 60000; quick 6000)")
    p.add_argument("--naive-samples", type=int, help="samples for the v1 rows (default 6000; quick 1000)")
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
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # 8 workers on 2 cores is the point
    cfg.samples = cfg.samples or (6000 if cfg.quick else EPOCH_SAMPLES)
    cfg.naive_samples = cfg.naive_samples or (512 if cfg.quick else 6000)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else "cpu" if cfg.device == "auto" else cfg.device)
    seed = load_section("train", cfg.params).seed
    started = time.perf_counter()

    fl = {"memcpy_epoch_s": memcpy_floor(cfg.repeats)}
    compute_source = resident_epochs(cfg, device, seed)
    rows = _loader_rows(cfg, device, seed)
    for row in rows:
        source = row.make()
        scale = EPOCH_SAMPLES / row.samples
        loader_s = _time_loader(source, cfg.repeats) * scale
        if row.name == "default":
            # the compute floor is measured epoch by epoch alongside the row it judges
            paired = _time_train_paired({"compute": compute_source, "default": source},
                                        cfg.repeats, device, seed)
            fl["compute_epoch_s"] = paired["compute"][0] * EPOCH_SAMPLES / cfg.samples
            train_s, wait = paired["default"]
            print(f"floors: memcpy {fl['memcpy_epoch_s']:.4f} s/epoch, "
                  f"compute {fl['compute_epoch_s']:.2f} s/epoch", flush=True)
        else:
            train_s, wait = _time_train(source, cfg.repeats, device, seed)
        row.result = {"name": row.name, "loader_epoch_s": loader_s, "train_epoch_s": train_s * scale,
                      "data_wait_fraction": wait, "samples_measured": row.samples,
                      "scaled": row.samples != EPOCH_SAMPLES, "note": row.note}
        del source
        print(f"{row.name:<20} loader {loader_s:8.3f} s  train {train_s * scale:7.2f} s  wait {wait:.3f}", flush=True)
    naive_s = rows[0].result["loader_epoch_s"]
    ddp = [] if cfg.skip_ddp else ddp_rows(cfg.tensors, cfg.params, cfg.samples, cfg.repeats, device=device.type)
    for row in [r.result for r in rows] + ddp:
        row["speedup_vs_naive"] = naive_s / row["loader_epoch_s"]

    results = {
        "machine": machine(device),
        "settings": {"repeats": cfg.repeats, "samples": cfg.samples, "naive_samples": cfg.naive_samples,
                     "quick": cfg.quick, "epoch_samples": EPOCH_SAMPLES},
        "floors": fl,
        "rows": [r.result for r in rows] + ddp,
        "memory": {"loader_process_tree": run_loader_memory(cfg.memory_workers, cfg.samples, cfg.tensors,
                                                            cfg.parquet),
                   "training_habits": run_scenarios(str(device), steps=cfg.habit_steps, batch=512)},
        "disk": disk_usage(cfg.csv, cfg.parquet, cfg.tensors),
    }
    by = {r["name"]: r for r in results["rows"]}
    results["goals"] = {
        "default_train_over_compute": by["default"]["train_epoch_s"] / fl["compute_epoch_s"],
        "default_loader_over_memcpy": by["default"]["loader_epoch_s"] / fl["memcpy_epoch_s"],
        "naive_over_default_loader": naive_s / by["default"]["loader_epoch_s"],
    }
    results["wall_seconds"] = time.perf_counter() - started
    cfg.out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(cfg.out / "results.json", (json.dumps(results, indent=2) + "\n").encode())
    markdown = render_markdown(results)
    write_bytes_atomic(cfg.out / "results.md", markdown.encode())
    render_plot(results, cfg.out / "results.png")
    print(markdown)


if __name__ == "__main__":
    main()
