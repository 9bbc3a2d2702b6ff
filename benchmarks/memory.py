"""Memory measurements for the benchmark.

* Process-tree USS/PSS from ``/proc/<pid>/smaps_rollup`` (main process plus
  DataLoader workers), sampled in a background thread while a loader runs.
* Peak memory of a few training-loop habits, each in a fresh subprocess
  (``python -m benchmarks.memory SCENARIO``) so one scenario's freed-but-cached
  heap cannot hide the next one's peak. On CUDA the figure is the caching
  allocator's ``max_memory_allocated``; on CPU PyTorch exposes no allocator
  statistics, so it is the process's RSS high-water mark (VmHWM) above the
  RSS just before the loop, with glibc told to serve every block of 64 KiB or
  more by its own mmap (``MALLOC_MMAP_THRESHOLD_``): freed tensors then leave
  RSS at once and the high-water mark tracks live tensors, the same from run
  to run, instead of glibc's cached heap, whose size varies from run to run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn import functional as F

from trainer.model import SimpleCNN

SCENARIOS = {
    "free_graph_true": "train loop, `del logits, loss` after each step (train.free_graph: true)",
    "free_graph_false": "train loop, last step's logits and loss still referenced during the next forward",
    "loss_sum_tensor": "train loop accumulating `total_loss += loss` (no .item()/.detach())",
    "eval_no_inference_mode": "evaluation without inference_mode/no_grad, outputs kept in a list",
    "eval_inference_mode": "the same evaluation under torch.inference_mode()",
}


def _kib(field: str, text: str) -> int:
    total = 0
    for line in text.splitlines():
        if line.startswith(field + ":"):
            total += int(line.split()[1])
    return total


def rollup_kib(pid: int) -> tuple[int, int, int]:
    """(USS, PSS, anonymous) of one process in KiB, from one read of its ``smaps_rollup``; zeros if it
    has exited.

    USS also counts file-backed pages that only this process maps (a shard read
    by the main process alone); once several workers map a page it is shared,
    and PSS splits it between them. Summed over a process tree, PSS counts
    every resident page once. Anonymous memory is heap, stacks and tensors: no file pages.
    """
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0, 0
    uss = _kib("Private_Clean", text) + _kib("Private_Dirty", text) + _kib("Private_Hugetlb", text)
    return uss, _kib("Pss", text), _kib("Anonymous", text)


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo.extend(int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split())
        except OSError:
            continue
    return out


class TreeMemorySampler:
    """Peak summed USS and PSS of this process tree while the ``with`` block runs."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak_uss_kib = 0
        self.peak_pss_kib = 0
        self.peak_anon_kib = 0
        self.max_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        pids = process_tree(os.getpid())
        sizes = [rollup_kib(p) for p in pids]
        self.peak_uss_kib = max(self.peak_uss_kib, sum(s[0] for s in sizes))
        self.peak_pss_kib = max(self.peak_pss_kib, sum(s[1] for s in sizes))
        self.peak_anon_kib = max(self.peak_anon_kib, sum(s[2] for s in sizes))
        self.max_processes = max(self.max_processes, len(pids))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def __enter__(self) -> TreeMemorySampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def measure_tree(run: Callable[[], None]) -> dict[str, float]:
    """Run ``run()`` and report the process tree's peaks in MiB, with this process's start as baseline."""
    base_uss = rollup_kib(os.getpid())[0]
    with TreeMemorySampler() as s:
        run()
    return {
        "baseline_uss_mb": round(base_uss / 1024, 1),
        "peak_uss_mb": round(s.peak_uss_kib / 1024, 1),
        "peak_pss_mb": round(s.peak_pss_kib / 1024, 1),
        "peak_anon_mb": round(s.peak_anon_kib / 1024, 1),
        "processes": s.max_processes,
    }


# --- training-loop habits -------------------------------------------------


def _rss_kib(field: str) -> int:
    return _kib(field, Path("/proc/self/status").read_text())


def _scenario(name: str, steps: int, batch: int, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    model = SimpleCNN().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = [
        (torch.randn(batch, 1, 28, 28, device=device), torch.randint(0, 10, (batch,), device=device))
        for _ in range(steps)
    ]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        base = _rss_kib("VmRSS") * 1024
    kept: list[torch.Tensor] = []
    if name.startswith("eval"):
        model.eval()
        for x, _ in batches:
            if name == "eval_inference_mode":
                with torch.inference_mode():
                    kept.append(model(x))
            else:
                kept.append(model(x))
    else:
        model.train()
        total: torch.Tensor | float = 0.0
        for x, y in batches:
            optimizer.zero_grad(set_to_none=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            optimizer.step()
            if name == "loss_sum_tensor":
                total = total + loss
            else:
                total += loss.item()
            if name == "free_graph_true":
                del logits, loss
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device)
        kind = "cuda_max_memory_allocated"
    else:
        peak = _rss_kib("VmHWM") * 1024
        kind = "process_rss_high_water"
    return {"peak_above_start_mb": round((peak - base) / 2**20, 1), "measure": kind}


def subprocess_json(args: list[str], env: dict[str, str] | None = None) -> dict:
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", *args],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_scenarios(device: str, steps: int, batch: int) -> dict[str, dict]:
    """Each habit in its own interpreter; returns {name: {peak_above_start_mb, measure, what}}."""
    out = {}
    for name, what in SCENARIOS.items():
        res = subprocess_json(
            ["habit", name, "--device", device, "--steps", str(steps), "--batch", str(batch)],
            env={"MALLOC_MMAP_THRESHOLD_": "65536"},
        )
        out[name] = {**res, "what": what}
    return out


# --- loader process trees ---------------------------------------------------

LOADER_KINDS = ("default-mmap", "precomputed-in-ram")


def _loader_epoch(kind: str, workers: int, samples: int, tensors: Path, parquet: Path) -> dict[str, float]:
    from torch.utils.data import DataLoader

    from benchmarks.naive import PrecomputedDataset
    from pipeline.params import LoaderParams
    from trainer.data import ShardDataset
    from trainer.loader import EpochBatchSampler, make_loader, resolve_settings
    from trainer.verify import validate_split

    def build_and_iterate() -> None:
        if kind == "default-mmap":  # the trainer's own loader: with workers, they prefetch pages
            ds = ShardDataset(validate_split(tensors / "train", expected_split="train"))
            sampler = EpochBatchSampler(samples, 512, shuffle=True, seed=0)
            settings = resolve_settings(LoaderParams(num_workers=workers), torch.device("cpu"))
            loader = make_loader(ds, sampler, settings)
        else:
            ds = PrecomputedDataset(parquet / "train.parquet", limit=samples)
            loader = DataLoader(ds, batch_size=512, shuffle=True, num_workers=workers)
        for x, *_ in (b.values() if isinstance(b, dict) else b for b in loader):
            x.view(-1)[-1].item()

    return measure_tree(build_and_iterate)


def run_loader_memory(workers: list[int], samples: int, tensors: Path, parquet: Path) -> dict[str, dict]:
    """Each (dataset kind, worker count) in a fresh interpreter, so baselines are comparable."""
    out = {}
    for n in workers:
        for kind in LOADER_KINDS:
            out[f"{kind}/workers={n}"] = subprocess_json(
                [
                    "loader",
                    kind,
                    "--workers",
                    str(n),
                    "--samples",
                    str(samples),
                    "--tensors",
                    str(tensors),
                    "--parquet",
                    str(parquet),
                ]
            )
    return out


def main() -> None:
    import argparse
    import warnings

    warnings.filterwarnings("ignore", message="This DataLoader will create")
    p = argparse.ArgumentParser(description="one memory measurement (used by benchmarks.loader)")
    sub = p.add_subparsers(dest="what", required=True)
    h = sub.add_parser("habit")
    h.add_argument("scenario", choices=list(SCENARIOS))
    h.add_argument("--device", default="cpu")
    h.add_argument("--steps", type=int, default=20)
    h.add_argument("--batch", type=int, default=512)
    lo = sub.add_parser("loader")
    lo.add_argument("kind", choices=LOADER_KINDS)
    lo.add_argument("--workers", type=int, default=0)
    lo.add_argument("--samples", type=int, default=60000)
    lo.add_argument("--tensors", type=Path, default=Path("data/tensors"))
    lo.add_argument("--parquet", type=Path, default=Path("data/parquet"))
    args = p.parse_args()
    if args.what == "habit":
        result = _scenario(args.scenario, args.steps, args.batch, torch.device(args.device))
    else:
        result = _loader_epoch(args.kind, args.workers, args.samples, args.tensors, args.parquet)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
