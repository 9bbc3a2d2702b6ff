"""Headless Chromium (Debian's `chromium`, installed by .ci/setup) with every network path closed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

OFFLINE_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    # no name resolves and every proxied request goes to a closed port: nothing leaves the machine
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--proxy-server=127.0.0.1:9",
    # let the page's scripts run to completion before dumping or shooting (virtual time, not wall time)
    "--virtual-time-budget=15000",
)


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "Debian's chromium is not installed: run bash .ci/setup"
    return exe


def _run(page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [chromium(), *OFFLINE_FLAGS, f"--user-data-dir={profile}", *extra, page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


def dump_dom(page: Path, profile: Path) -> str:
    return _run(page, profile, "--dump-dom").stdout


def screenshot(page: Path, png: Path, profile: Path, size: tuple[int, int] = (1000, 1600)) -> Path:
    _run(page, profile, f"--window-size={size[0]},{size[1]}", f"--screenshot={png}")
    assert png.is_file(), f"chromium wrote no screenshot {png}"
    return png


def non_white_share(png: Path) -> float:
    """Share of pixels darker than near-white (grey < 250)."""
    import numpy as np
    from PIL import Image

    grey = np.asarray(Image.open(png).convert("L"))
    return float((grey < 250).mean())
