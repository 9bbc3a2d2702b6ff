"""Keep freed memory in the process, so training steps stop page-faulting.

With glibc's defaults a training step's large buffers (activations and their
gradients) are either ``mmap``-ed and unmapped at every step, or freed to the
top of the heap and trimmed back to the kernel; either way the next step
touches fresh pages and the kernel zero-fills them, thousands of page faults
per step and a sizeable share of its time (``bench/notes.md``). Raising
glibc's mmap and trim thresholds makes freed blocks stay in the heap and be
reused: once the heap has settled (a few steps) no step faults
(``tests/test_trainer.py::test_retained_memory_stops_per_step_page_faults``).
The process keeps its high-water mark of memory instead of returning it
between steps; the peak itself does not change. Results do not change either:
only where the bytes live.
"""

from __future__ import annotations

import ctypes
import platform

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_KEEP_BYTES = 2**30  # blocks below 1 GiB come from the heap; up to 1 GiB free at its top is kept


def retain_freed_memory() -> bool:
    """Tell glibc to keep and reuse freed blocks; False (and nothing changed) where the libc is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt  # the C library already loaded into this process
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
