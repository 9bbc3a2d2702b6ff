"""Timed training epochs and the floors they are judged against.

* ``train_paired``: best epoch time per source, epochs interleaved, with the
  data-wait fraction and the page faults per step (``ru_minflt``);
* ``compute_floor``: every step of an epoch on one cache-warm batch: no loader,
  no gather, no fresh input memory; nothing a real run does can be cheaper;
* ``flop_floor``: the FLOPs of one epoch (counted by ``FlopCounterMode`` over
  forward + backward) at the machine's matmul rate, measured in the same run;
* ``allocator_experiment``: why pre-gathered batches used to train slower
  than loader-fed ones (page faults), in a fresh interpreter per setting.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from pipeline.params import load_section
from trainer.allocator import retain_freed_memory
from trainer.data import ShardDataset
from trainer.device_norm import identity
from trainer.loader import EpochBatchSampler
from trainer.model import SimpleCNN
from trainer.precision import Precision
from trainer.verify import validate_split

EPOCH_SAMPLES = 60_000
Batch = tuple[torch.Tensor, torch.Tensor]
Source = Callable[[int], Iterable]  # source(epoch) iterates one epoch of batches


@dataclass
class Arithmetic:
    """What a step does to a batch besides the model: the trainer's device normalisation (uint8 batches to
    float32, ``trainer.device_norm``) and its precision (autocast, backward and step, ``trainer.precision``).
    The default, float32 batches in fp32, is the plain step."""

    normalize: Callable[[torch.Tensor], torch.Tensor] = identity
    precision: Precision = field(default_factory=Precision)


def as_pair(batch: object) -> Batch:
    if isinstance(batch, dict):
        return batch["image"], batch["label"]
    return batch  # type: ignore[return-value]


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def train_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable,
    device: torch.device,
    arithmetic: Arithmetic | None = None,
) -> tuple[float, float, float, float]:
    """(seconds, seconds blocked waiting for the next batch, page faults per step, fastest step's seconds per
    sample) of one epoch. On a GPU the step time is only the launch time (nothing waits for the kernels).

    ``arithmetic`` (default: fp32, float32 batches) applies the trainer's own device normalisation and
    precision to each step, as ``trainer.loop.train_one_epoch`` does."""
    arithmetic = arithmetic or Arithmetic()
    model.train()
    wait = 0.0
    steps = 0
    fastest = math.inf
    faults = _minor_faults()
    start = time.perf_counter()
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            break
        t1 = time.perf_counter()
        wait += t1 - t0
        x, y = as_pair(batch)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x = arithmetic.normalize(x)
        optimizer.zero_grad(set_to_none=True)
        with arithmetic.precision.autocast():
            loss = F.cross_entropy(model(x).float(), y)  # float32 logits, as the trainer's loop
        arithmetic.precision.backward_step(loss, optimizer)
        del loss
        fastest = min(fastest, (time.perf_counter() - t1) / len(y))  # per sample: the last batch is shorter
        steps += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return seconds, wait, (_minor_faults() - faults) / max(steps, 1), fastest


def train_paired(
    sources: dict[str, tuple[Source, bool]],
    repeats: int,
    device: torch.device,
    seed: int,
    warmup: int = 0,
    arithmetic: dict[str, Arithmetic] | None = None,
) -> dict[str, dict[str, float]]:
    """Per source ``(source, reference_layout)``: best epoch seconds, its data-wait fraction and
    faults per step, over ``repeats`` timed epochs after ``warmup`` untimed ones. A source named in
    ``arithmetic`` trains with that normalisation and precision; the others plain (fp32).

    Interleaving matters on a shared machine whose speed drifts over minutes: sources compared
    epoch by epoch see the same drift.
    """
    state = {}
    for name, (_source, reference_layout) in sources.items():
        torch.manual_seed(seed)
        model = SimpleCNN(reference_layout=reference_layout).to(device)
        state[name] = (model, torch.optim.Adam(model.parameters(), lr=1e-3))
    best = {
        name: {
            "seconds": math.inf,
            "data_wait_fraction": 0.0,
            "page_faults_per_step": 0.0,
            "fastest_step_s_per_sample": math.inf,
        }
        for name in sources
    }
    for epoch in range(warmup + repeats):
        for name, (source, _layout) in sources.items():
            seconds, wait, faults, fastest = train_epoch(
                *state[name], source(epoch), device, (arithmetic or {}).get(name)
            )
            if epoch < warmup:
                continue
            fastest = min(fastest, best[name]["fastest_step_s_per_sample"])
            if seconds < best[name]["seconds"]:
                best[name] = {
                    "seconds": seconds,
                    "data_wait_fraction": wait / seconds,
                    "page_faults_per_step": faults,
                }
            best[name]["fastest_step_s_per_sample"] = fastest
    return best


def one_warm_batch(tensors: Path, samples: int, batch_size: int, device: torch.device) -> Source:
    """The compute floor's source: an epoch's batch sizes (``samples`` split by ``batch_size``), every
    step on (a prefix of) the same resident, cache-warm batch."""
    dataset = ShardDataset(validate_split(tensors / "train", expected_split="train"))
    x, y = (t.to(device) for t in dataset[torch.arange(min(batch_size, len(dataset)))])
    full, rest = divmod(samples, batch_size)
    epoch = [(x, y)] * full + ([(x[:rest], y[:rest])] if rest else [])
    return lambda _epoch: epoch


def _experiment(
    cfg: argparse.Namespace, device: torch.device, seed: int, repeats: int, setting: str, *extra: str
) -> dict:
    """One setting in a fresh interpreter (``python -m benchmarks.compute``); its one JSON line."""
    args = [
        sys.executable,
        "-m",
        "benchmarks.compute",
        setting,
        *extra,
        "--tensors",
        str(cfg.tensors),
        "--params",
        str(cfg.params),
        "--samples",
        str(cfg.samples),
        "--repeats",
        str(repeats),
        "--device",
        str(device),
        "--seed",
        str(seed),
    ]
    res = subprocess.run(args, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{setting} experiment failed: {res.stderr.strip()[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def threads_experiment(
    cfg: argparse.Namespace, device: torch.device, seed: int, repeats: int, counts: tuple[int, ...] = (1, 2)
) -> dict[str, object]:
    """Compute-floor epochs with each intra-op thread count (``train.threads``), each in a fresh interpreter
    (switching counts inside one process slows the larger count down); and whether the models, trained from
    the same initialisation on the same steps, end bit-identical."""
    runs = {n: _experiment(cfg, device, seed, repeats, "threads", "--threads", str(n)) for n in counts}
    return {
        "epoch_s": {str(n): r["seconds"] for n, r in runs.items()},
        "bit_identical": len({r["weights_sha256"] for r in runs.values()}) == 1,
    }


def memcpy_floor(repeats: int, nbytes: int = EPOCH_SAMPLES * 784 * 4) -> float:
    """Seconds to copy ``nbytes`` of float32 once in RAM, best of ``repeats`` (at least 5); by default one
    epoch's image bytes (60,000 x 784 float32), the floor any loader epoch is judged against."""
    src = torch.rand(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults are not part of a copy
    best = math.inf
    for _ in range(max(repeats, 5)):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return best


def epoch_flops(batch_size: int, device: torch.device) -> float:
    """FLOPs of forward + backward over one 60,000-sample epoch.

    Convolutions and matmuls are counted; Adam is not.
    """
    model = SimpleCNN().to(device)
    x = torch.zeros(batch_size, 1, 28, 28, device=device)
    y = torch.zeros(batch_size, dtype=torch.int64, device=device)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() * EPOCH_SAMPLES / batch_size


def default_batches(
    tensors: Path, params: Path, samples: int, device: torch.device, seed: int, *, pregather: bool
) -> Source:
    """Epoch e's batches exactly as the ``default`` loader (0 workers) yields them: gathered one at a
    time, or (the old compute floor) all gathered onto the device before the epoch's clock starts,
    118 live buffers at 60,000 samples."""
    dataset = ShardDataset(validate_split(tensors / "train", expected_split="train"))
    loader = load_section("loader", params)
    sampler = EpochBatchSampler(samples, loader.batch_size, shuffle=loader.shuffle, seed=seed)

    def batches(epoch: int) -> Iterable[Batch]:
        sampler.set_epoch(epoch)
        gathered = (tuple(t.to(device) for t in dataset[b]) for b in sampler)
        return list(gathered) if pregather else gathered  # type: ignore[return-value]

    return batches


def allocator_experiment(
    cfg: argparse.Namespace, device: torch.device, seed: int, repeats: int
) -> dict[str, dict]:
    """Pre-gathered vs loader-fed batches, epochs interleaved, with glibc's defaults and with
    :func:`retain_freed_memory`; each setting in a fresh interpreter, so heap history is comparable."""
    return {
        setting: _experiment(cfg, device, seed, repeats, setting)
        for setting in ("glibc_default", "retain_freed_memory")
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description="one setting of the allocator or threads experiment; one JSON line"
    )
    p.add_argument("setting", choices=["glibc_default", "retain_freed_memory", "threads"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tensors", type=Path, required=True)
    p.add_argument("--params", type=Path, required=True)
    p.add_argument("--samples", type=int, required=True)
    p.add_argument("--repeats", type=int, required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--seed", type=int, required=True)
    a = p.parse_args()
    device = torch.device(a.device)
    scale = EPOCH_SAMPLES / a.samples
    if a.setting != "glibc_default":
        retain_freed_memory()
    if a.setting == "threads":
        torch.set_num_threads(a.threads)
        batch_size = load_section("loader", a.params).batch_size
        warm = one_warm_batch(a.tensors, a.samples, batch_size, device)
        torch.manual_seed(a.seed)
        model = SimpleCNN().to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        best = math.inf
        for epoch in range(1 + a.repeats):  # the first epoch is untimed
            seconds = train_epoch(model, optimizer, warm(epoch), device)[0]
            best = min(best, seconds) if epoch else best
        digest = hashlib.sha256()
        for value in model.state_dict().values():
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        print(json.dumps({"seconds": best * scale, "weights_sha256": digest.hexdigest()}))
        return
    sources = {
        name: (
            default_batches(a.tensors, a.params, a.samples, device, a.seed, pregather=name == "pre-gathered"),
            True,
        )  # the original model, as when the committed floor came out slower
        for name in ("pre-gathered", "loader-fed")
    }
    best = train_paired(
        sources, a.repeats, device, a.seed, warmup=1
    )  # the heap's first growth is not the point
    print(json.dumps({name: {**v, "seconds": v["seconds"] * scale} for name, v in best.items()}))


if __name__ == "__main__":
    main()
