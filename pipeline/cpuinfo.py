"""What ``/proc/cpuinfo`` says about this machine's CPU: its model name and feature flags.

One reader for the trainer (which records the machine in its checkpoints and
decides the bf16 notice from the flags) and for the benchmarks (which record
the CPU with every result). It lives here, without torch, so that the
benchmarks' torch-free report module can use it too.
"""

from __future__ import annotations

import platform
from pathlib import Path

CPUINFO = "/proc/cpuinfo"


def cpuinfo_value(keys: tuple[str, ...], cpuinfo: Path | str = CPUINFO) -> str | None:
    """The value of ``cpuinfo``'s first line whose key is one of ``keys`` (the first CPU's); None when
    there is none or the file cannot be read (not Linux)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in keys:
            return value.strip()
    return None


def cpu_model(cpuinfo: Path | str = CPUINFO) -> str:
    """The CPU's model name (``model name``), else the platform's processor or machine string."""
    return (
        cpuinfo_value(("model name",), cpuinfo) or platform.processor() or platform.machine() or "unknown CPU"
    )


def cpu_flags(cpuinfo: Path | str = CPUINFO) -> set[str] | None:
    """The CPU's feature flags (the first ``flags`` line; ``Features`` on Arm), or None where they
    cannot be read."""
    value = cpuinfo_value(("flags", "Features"), cpuinfo)
    return None if value is None else set(value.split())
