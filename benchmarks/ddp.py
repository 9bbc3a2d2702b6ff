"""``python -m benchmarks.ddp``: rows ``ddp-1`` and ``ddp-2``, the trainer's multi-process path.

Each row starts a real group, ``python -m torch.distributed.run --standalone
--nproc-per-node N -m benchmarks.ddp --worker …``, as ``train.processes: N``
does. Every rank uses the trainer's own pieces (``EpochBatchSampler`` split by
``RankBatches``, the shard loader, DDP, ``train_one_epoch``) on the first
``--samples`` train samples, with ``params.yaml``'s loader settings:

- ``loader_epoch_s``: one epoch of gathering this rank's slices only (no
  training), the slowest rank, best of ``--repeats``;
- ``train_epoch_s``: one training epoch, the slowest rank, best of ``--repeats``;
- ``data_wait_fraction``: the largest over ranks in that epoch.

Times are scaled to 60,000 samples when fewer are measured. ``ddp_rows`` is
what ``benchmarks.loader`` calls; alone, the module writes ``bench/ddp.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from pipeline.atomic import write_bytes_atomic
from pipeline.params import load_section
from pipeline.pool import cpu_count
from trainer import distributed
from trainer.data import ShardDataset
from trainer.loader import EpochBatchSampler, make_loader, resolve_settings
from trainer.loop import train_one_epoch
from trainer.model import SimpleCNN
from trainer.rank_split import RankBatches
from trainer.verify import validate_split

EPOCH_SAMPLES = 60_000
SAMPLE_BYTES = 28 * 28 * 4 + 8  # a FashionMNIST float32 image + int64 label


def _worker(cfg: argparse.Namespace) -> None:
    device = torch.device(cfg.device)
    group = distributed.join(device)
    try:
        threads = distributed.threads(group)
        if threads is not None:
            torch.set_num_threads(threads)
        params = load_section("loader", cfg.params)
        seed = load_section("train", cfg.params).seed
        settings = resolve_settings(params, group.device)
        split = validate_split(cfg.tensors / "train", expected_split="train")
        samples = min(cfg.samples, split.num_samples)
        batches = RankBatches(
            EpochBatchSampler(samples, settings.batch_size, shuffle=settings.shuffle, seed=seed),
            group.rank,
            group.world_size,
        )
        loader = make_loader(ShardDataset(split), batches, settings)

        gather = math.inf
        for epoch in range(cfg.repeats):
            batches.set_epoch(epoch)
            start = time.perf_counter()
            for images, _labels in loader:
                _ = float(images.view(-1)[-1]) if images.numel() else 0.0  # touch: nothing stays lazy
            gather = min(gather, time.perf_counter() - start)

        torch.manual_seed(seed)
        model = SimpleCNN().to(group.device)
        trained = distributed.wrap(model, group)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        best = (math.inf, 0.0)
        for epoch in range(cfg.repeats):
            batches.set_epoch(epoch)
            stats = train_one_epoch(
                trained,
                loader,
                optimizer,
                group.device,
                non_blocking=False,
                free_graph=True,
                global_size=batches.global_size,
                world_size=group.world_size,
                progress=False,
            )
            seconds, wait = distributed.all_max([stats.seconds, stats.data_wait_fraction], group)
            if seconds < best[0]:
                best = (seconds, wait)
        (gather,) = distributed.all_max([gather], group)
        if group.is_main:
            result = {
                "world_size": group.world_size,
                "samples": samples,
                "steps": len(batches),
                "batch_size": settings.batch_size,
                "threads": torch.get_num_threads(),
                "backend": "nccl" if group.device.type == "cuda" else "gloo",
                "gather_epoch_s": gather,
                "train_epoch_s": best[0],
                "data_wait_fraction": best[1],
            }
            write_bytes_atomic(cfg.result, (json.dumps(result) + "\n").encode())
    finally:
        distributed.leave(group)


def _run_group(world: int, tensors: Path, params: Path, samples: int, repeats: int, device: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        args = [
            "--worker",
            "--tensors",
            str(tensors),
            "--params",
            str(params),
            "--samples",
            str(samples),
            "--repeats",
            str(repeats),
            "--device",
            device,
            "--result",
            str(result),
        ]
        cmd = distributed.launch_command("benchmarks.ddp", args, processes=world, max_restarts=0)
        env_threads = str(distributed.default_threads(world))
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": env_threads})
        return json.loads(result.read_text())


def ddp_rows(
    tensors_dir: Path | str,
    params: Path | str,
    samples: int,
    repeats: int,
    worlds: tuple[int, ...] = (1, 2),
    device: str = "auto",
) -> list[dict]:
    """One row per world size, keyed like ``benchmarks.loader``'s rows (plus ``samples_per_second``)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # one GPU per process: larger worlds cannot run here
        worlds = tuple(w for w in worlds if w <= torch.cuda.device_count())
    rows = []
    for world in worlds:
        r = _run_group(world, Path(tensors_dir), Path(params), samples, repeats, device)
        scale = EPOCH_SAMPLES / r["samples"]
        per_rank = math.ceil(r["batch_size"] / world)
        rows.append(
            {
                "name": f"ddp-{world}",
                "loader_epoch_s": r["gather_epoch_s"] * scale,
                "train_epoch_s": r["train_epoch_s"] * scale,
                "data_wait_fraction": r["data_wait_fraction"],
                # counted in-process only; these rows train in torchrun's processes
                "page_faults_per_step": None,
                "samples_measured": r["samples"],
                "scaled": r["samples"] != EPOCH_SAMPLES,
                "samples_per_second": r["samples"] / r["train_epoch_s"],
                "gather_step_s": r["gather_epoch_s"] / r["steps"],
                "rank_bytes_per_step": per_rank * SAMPLE_BYTES,
                "note": f"{world} process{'es' if world > 1 else ''} under torchrun ({r['backend']}), "
                f"{r['threads']} threads each, batch {r['batch_size']} split among ranks",
            }
        )
        row = rows[-1]
        print(
            f"{row['name']:<20} loader {row['loader_epoch_s']:8.3f} s  train {row['train_epoch_s']:7.2f} s  "
            f"wait {row['data_wait_fraction']:.3f}  {row['samples_per_second']:.0f} samples/s",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--samples", type=int, default=EPOCH_SAMPLES, help="train samples per epoch (default 60000)"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--processes", type=int, nargs="+", default=[1, 2], help="world sizes to run (default 1 2)"
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--tensors", type=Path, default=Path("data/tensors"))
    p.add_argument("--out", type=Path, default=Path("bench"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    cfg = p.parse_args(argv)
    if cfg.worker:  # a rank ends there, as the train stage's do (it holds its DDP wrapper until then)
        distributed.run_rank(lambda: _worker(cfg))
    rows = ddp_rows(cfg.tensors, cfg.params, cfg.samples, cfg.repeats, tuple(cfg.processes), cfg.device)
    results = {
        "cores": cpu_count(),
        "torch": torch.__version__,
        "repeats": cfg.repeats,
        "rows": rows,
    }
    cfg.out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(cfg.out / "ddp.json", (json.dumps(results, indent=2) + "\n").encode())


if __name__ == "__main__":
    main()
