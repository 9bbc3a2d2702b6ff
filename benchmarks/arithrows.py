"""The loader benchmark's rows ``bf16``, ``uint8``, ``uint8+bf16`` and the bf16 FLOP floor.

Each row is the ``default`` row (params.yaml's loader and model) with one or
two of the trainer's own arithmetic settings: ``train.precision: bf16``
(``trainer.precision``'s autocast, backward and step) and uint8 shards that
the trainer turns into float32 on the device (``trainer.device_norm``). The
uint8 shards are the exact twin of the float32 ones
(:func:`benchmarks.workers.uint8_twin`), so every row trains on the same
values. The rows are timed epoch by epoch with ``default``, so ``bf16 /
default`` sees the drift of a shared machine once.

bf16 is only expected to be faster where it has matrix units: on a CPU with
AMX (``amx_bf16`` in the CPU flags) or on CUDA. Elsewhere the goal
``bf16_over_fp32`` is reported but not judged.
"""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.compute import Arithmetic
from benchmarks.precision import GOAL_BF16_OVER_FP32
from pipeline.cpuinfo import cpu_flags
from trainer.device_norm import DeviceNormalizer
from trainer.precision import BF16_FLAGS, make_precision, matmul_gflops, native_bf16
from trainer.verify import ValidSplit

# row name -> (shard dtype, train.precision, note)
ROWS = {
    "bf16": ("float32", "bf16", "default loader and model, train.precision: bf16"),
    "uint8": (
        "uint8",
        "fp32",
        "default loader on uint8 shards, normalised on the device (trainer.device_norm)",
    ),
    "uint8+bf16": ("uint8", "bf16", "uint8 shards normalised on the device, train.precision: bf16"),
}
GOAL = GOAL_BF16_OVER_FP32  # bf16 train epoch / fp32 train epoch, where bf16 has matrix units


def arithmetic(name: str, split: ValidSplit, device: torch.device) -> Arithmetic:
    """Row ``name``'s step as the trainer builds it (``trainer.run``): the split's device normaliser
    (a no-op for float32 batches) and the row's precision."""
    _dtype, precision, _note = ROWS[name]
    return Arithmetic(
        DeviceNormalizer(split.manifest.normalization, device), make_precision(precision, device)
    )


def bf16_floor(epoch_gflop: float, device: torch.device) -> dict[str, float]:
    """The bf16 FLOP floor: one epoch's FLOPs at the rate of a 2048 x 2048 bfloat16 matmul measured now."""
    gflops = matmul_gflops(device, dtype=torch.bfloat16)
    return {"matmul_gflops_bf16": gflops, "flop_epoch_s_bf16": epoch_gflop / gflops}


def bf16_judgement(device: torch.device, cpuinfo: Path | str = "/proc/cpuinfo") -> dict[str, object]:
    """Whether ``bf16_over_fp32`` is judged here (CUDA, or a CPU with AMX, as the trainer's own notice
    decides: ``trainer.precision.native_bf16``), why, and the CPU's bfloat16 flags."""
    flags = cpu_flags(cpuinfo)
    amx = native_bf16(flags) is True
    return {
        "goal": GOAL,
        "judged": device.type == "cuda" or amx,
        "reason": "CUDA" if device.type == "cuda" else ("AMX present" if amx else "no AMX"),
        "cpu_flags": {f: f in (flags or set()) for f in (*BF16_FLAGS, "amx_tile", "avx512_bf16")},
    }
