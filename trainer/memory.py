"""Per-epoch peak memory: CUDA max allocated on a GPU, process RSS high-water on CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _vm_hwm_kib() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


class PeakMemory:
    """``reset()`` at the start of an epoch, ``peak_mb()`` at its end."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # Without a resettable high-water mark the CPU figure is the process's peak so far.
        self.resettable = device.type == "cuda"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            # "5" resets VmHWM to the current RSS (Linux >= 4.0); refused in some sandboxes.
            _CLEAR_REFS.write_text("5")
            self.resettable = True
        except OSError:
            self.resettable = False

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        kib = _vm_hwm_kib()
        if kib is None:
            try:
                import resource  # Unix only
            except ImportError:
                return float("nan")
            # ru_maxrss is KiB on Linux, bytes on macOS.
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            kib = rss // 1024 if sys.platform == "darwin" else rss
        return kib / 1024
