"""A write that fails mid-way (disk full, file too large): one clear error line and no partial output.

Two ways, neither needs root or mount privileges:

- ``unshare --user --map-root-user --mount`` gives the test its own user and
  mount namespace, where it may mount a 1 MiB tmpfs: a real ENOSPC from a real
  filesystem. Skipped only where the kernel or a sandbox refuses unprivileged
  user namespaces (it works as an ordinary user on stock Debian/Ubuntu kernels).
- ``RLIMIT_FSIZE`` caps the stage's file size at 1 MiB: ``write`` fails with
  EFBIG, the same ``OSError`` → ``OutputError`` path in ``pipeline.atomic``.
  This one never skips.
"""

from __future__ import annotations

import resource
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline.tabular import HEADER

ROOT = Path(__file__).resolve().parent.parent


def _parquet(path: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    table = np.concatenate([rng.integers(0, 10, (n, 1)), rng.integers(0, 256, (n, 784))], axis=1)
    pl.DataFrame(table.astype(np.uint8), schema=list(HEADER), orient="row").write_parquet(path)


def _tensorize_cmd(tmp_path: Path, out: Path) -> list[str]:
    _parquet(tmp_path / "train.parquet", 1000, 0)  # 3.1 MB of float32 shards: cannot fit in 1 MiB
    _parquet(tmp_path / "test.parquet", 10, 1)
    return [
        sys.executable,
        "-m",
        "stages.tensorize",
        "--params",
        str(ROOT / "params.yaml"),
        "--train-parquet",
        str(tmp_path / "train.parquet"),
        "--test-parquet",
        str(tmp_path / "test.parquet"),
        "--train",
        str(out / "train"),
        "--test",
        str(out / "test"),
    ]


def _one_line_and_nothing_left(
    res: subprocess.CompletedProcess, out: Path, reason: str, listing: list[str]
) -> None:
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert (
        res.stderr == f"error: {out / 'train'}: could not write output ({reason}); nothing was left behind\n"
    )
    assert listing == [], "a partial shard folder or temporary was left behind"


def test_tensorize_on_a_full_tmpfs_in_a_user_namespace(tmp_path: Path) -> None:
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("util-linux unshare not installed")
    probe = subprocess.run(
        [unshare, "--user", "--map-root-user", "--mount", "true"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        pytest.skip(f"unprivileged user namespaces refused here: {probe.stderr.strip()}")
    disk = tmp_path / "small"
    disk.mkdir()
    listing = tmp_path / "listing"
    stage = shlex.join(_tensorize_cmd(tmp_path, disk))
    # The mount exists only inside the namespace: list what is left there before it goes away.
    script = (
        f"mount -t tmpfs -o size=1m tmpfs {shlex.quote(str(disk))} || exit 99\n"
        f"{stage}\nrc=$?\nls -A {shlex.quote(str(disk))} > {shlex.quote(str(listing))}\nexit $rc\n"
    )
    res = subprocess.run(
        [unshare, "--user", "--map-root-user", "--mount", "sh", "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode != 99, f"mount inside the namespace failed: {res.stderr}"
    _one_line_and_nothing_left(res, disk, "No space left on device", listing.read_text().split())


def _limit_file_size() -> None:
    # Without SIG_IGN the kernel kills the writer with SIGXFSZ instead of failing the write.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_tensorize_when_a_write_fails_mid_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = _tensorize_cmd(tmp_path, out)
    res = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, preexec_fn=_limit_file_size
    )
    listing = sorted(p.name for p in out.iterdir()) if out.exists() else []
    _one_line_and_nothing_left(res, out, "File too large", listing)
