"""Training arithmetic (``train.precision``): fp32, bf16 autocast, or fp16 autocast with a gradient scaler.

- ``fp32``: no autocast, no scaler; exactly the loop as it always was.
- ``bf16``: ``torch.autocast(device_type, dtype=torch.bfloat16)`` around the
  forward pass and the loss, on the CPU or CUDA. bfloat16 has float32's
  exponent range, so no loss scaling is needed.
- ``fp16``: autocast to float16 on CUDA only, with ``torch.amp.GradScaler``
  (float16 gradients underflow without it). The scaler's state (scale and
  growth tracker) is part of the checkpoint, so a resume stays exact. On the
  CPU it is refused before training starts (:func:`check_precision`).

The loss is computed from float32 logits (``logits.float()``), so the
per-batch summed loss the loop accumulates in float64 is a float32 value in
every precision. Evaluation runs under the same autocast as training.

Precision changes results, so it is part of the checkpoint fingerprint
(it is not in ``trainer.checkpoint.SPEED_ONLY``).

Whether bf16 is faster than fp32 on a CPU cannot be read from its flags. Two
CPUs with ``avx512_bf16`` and no AMX, both measured by this project's
benchmarks, differ: on an Intel Xeon bf16 training was no faster than fp32
(``bench/precision.md``), on an AMD EPYC it was much faster
(``bench/results.md``). So :func:`bf16_cpu_notice` measures: before training,
at the run's thread count, a 512 x 512 matmul in float32 and in bfloat16
(best of a few, some milliseconds; tenths of a second where bfloat16 is
emulated), and says in one line when bfloat16 is not
at least :data:`BF16_GAIN` times faster, quoting both rates. The CPU flags
(:func:`native_bf16`: ``amx_bf16`` on x86, ``bf16`` (BFMMLA) on Arm) still
decide where the benchmarks judge the goal set for CPUs with matrix units.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.cpuinfo import CPUINFO, cpu_model
from pipeline.errors import ParamsError

# CPU flags of bfloat16 matrix units: x86's AMX, Arm's BF16 (BFMMLA); x86's avx512_bf16 is vector-only
BF16_FLAGS = ("amx_bf16", "bf16")
# bf16 is worth its rounding on a CPU whose bfloat16 matmul is at least this many times float32's
BF16_GAIN = 1.25
NOTICE_MATMUL = 512  # the side of the matrices the bf16 notice times
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision this device cannot run (fp16 needs CUDA), in one line, before any work."""
    if precision == "fp16" and device.type != "cuda":
        raise ParamsError(f"train.precision: fp16 needs a CUDA device, found {device.type}; use bf16 or fp32")


def machine(device: torch.device, cpuinfo: Path | str = CPUINFO) -> str:
    """What a run's kernels depend on besides its code and torch version, in words: the CPU model and
    the instruction set PyTorch dispatches to, or the GPU model and the CUDA and cuDNN versions."""
    if device.type == "cuda":
        return (
            f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()}"
        )
    model = cpu_model(cpuinfo)
    return f"{model}, {torch.backends.cpu.get_cpu_capability()}"


def native_bf16(flags: set[str] | None) -> bool | None:
    """Whether the CPU has bfloat16 matrix units; None when neither the flags nor PyTorch can tell."""
    if flags is not None:
        return any(f in flags for f in BF16_FLAGS)
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported",)]
    checks = [c for c in checks if c is not None]
    return any(c() for c in checks) if checks else None


def matmul_gflops(
    device: torch.device,
    n: int = 2048,
    repeats: int = 10,
    dtype: torch.dtype = torch.float32,
    budget_s: float = math.inf,
) -> float:
    """Best-of-``repeats`` rate of an ``n`` x ``n`` matmul in ``dtype`` on ``device``, in GFLOP/s, after
    a warm-up (threads started, pages touched, oneDNN's kernels compiled); fewer repeats once
    ``budget_s`` is spent. The benchmarks' FLOP floors and the bf16 notice both measure with it."""
    a = torch.ones(n, n, device=device, dtype=dtype)
    b = torch.ones(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=out)
    best, spent = math.inf, 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        if device.type == "cuda":
            torch.cuda.synchronize()
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
        if spent > budget_s:
            break
    return 2 * n**3 / max(best, 1e-9) / 1e9


def matmul_rates(size: int = NOTICE_MATMUL, repeats: int = 5, budget_s: float = 0.05) -> tuple[float, float]:
    """GFLOP/s of a ``size`` x ``size`` matmul in float32 and in bfloat16 on this CPU, at the current
    thread count: up to ``repeats`` each, fewer once ``budget_s`` is spent, so that an emulated
    bfloat16 (tenths of a second per matmul) costs one timed run, not five."""
    cpu = torch.device("cpu")
    fp32, bf16 = (
        matmul_gflops(cpu, size, repeats, dtype, budget_s) for dtype in (torch.float32, torch.bfloat16)
    )
    return fp32, bf16


def bf16_cpu_notice(
    precision: str, device: torch.device, rates: tuple[float, float] | None = None
) -> str | None:
    """A one-line notice (no prefix) when bf16 is measured no faster than fp32 on this CPU; else None.

    ``rates`` are :func:`matmul_rates`' float32 and bfloat16 GFLOP/s, measured here when not given
    (tests pass their own)."""
    if precision != "bf16" or device.type != "cpu":
        return None
    fp32, bf16 = matmul_rates() if rates is None else rates
    if bf16 >= BF16_GAIN * fp32:
        return None
    return (
        f"train.precision bf16: this CPU multiplies bfloat16 matrices at {bf16:.0f} GFLOP/s against "
        f"{fp32:.0f} in float32 ({NOTICE_MATMUL} x {NOTICE_MATMUL}, measured now): bf16 runs, likely no "
        "faster than fp32 here"
    )


@dataclass
class Precision:
    """The arithmetic of one run: an autocast context for forward and loss, and the backward + step."""

    name: str = "fp32"
    device_type: str = "cpu"
    scaler: torch.amp.GradScaler | None = None  # fp16 only

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast for forward and loss; a no-op context for fp32."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=_DTYPES[self.name])

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """``loss.backward()`` and ``optimizer.step()``, through the gradient scaler for fp16."""
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()


def make_precision(precision: str, device: torch.device) -> Precision:
    """The run's :class:`Precision` (checked with :func:`check_precision`); fp16 gets a fresh GradScaler."""
    check_precision(precision, device)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return Precision(precision, device.type, scaler)
