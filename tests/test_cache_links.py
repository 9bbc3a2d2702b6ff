"""DVC links outputs to its cache (no second copy), and no stage ever writes into a linked output in place."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.repo_copy import ROOT, dvc, make_csv_repo

pytestmark = pytest.mark.slow


def cache_files(repo: Path) -> dict[Path, str]:
    """Every content file of the cache with the MD5 DVC named it by (directory listings ``.dir`` included)."""
    root = repo / ".dvc" / "cache" / "files" / "md5"
    return {p: p.parent.name + p.name.removesuffix(".dir") for p in root.rglob("*") if p.is_file()}


def assert_cache_intact(repo: Path) -> None:
    files = cache_files(repo)
    assert len(files) > 10
    for path, named in files.items():
        assert hashlib.md5(path.read_bytes()).hexdigest() == named, f"{path} was modified in place"


def workspace_outputs(repo: Path) -> list[Path]:
    outs = []
    for stage in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].values():
        for out in stage.get("outs", []):
            path = repo / (out if isinstance(out, str) else next(iter(out)))
            outs += [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return outs


def test_outputs_are_linked_and_reruns_never_touch_the_cache(tmp_path: Path) -> None:
    repo = make_csv_repo(tmp_path)
    assert "type = hardlink,symlink" in (ROOT / ".dvc" / "config").read_text()
    dvc(repo, "repro")
    outputs = workspace_outputs(repo)
    cache_inodes = {p.stat().st_ino for p in cache_files(repo)}
    # one inode for workspace and cache: no second copy
    linked = [p for p in outputs if p.stat().st_ino in cache_inodes or p.is_symlink()]
    assert linked == outputs and len(outputs) >= 8
    assert_cache_intact(repo)

    dvc(repo, "repro", "-f")  # every stage again, over outputs that are links into the cache
    assert_cache_intact(repo)
    # and the data stages run by hand over the linked outputs, without DVC removing them first
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    for name in ("csv", "parquet", "tensorize"):
        argv = [sys.executable, *stages[name]["cmd"].split()[1:]]
        res = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
    assert_cache_intact(repo)
    status = dvc(repo, "status").stdout
    assert "changed outs" not in status, status  # same bytes came out, now as new files
