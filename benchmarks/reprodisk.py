"""Disk used by ``dvc repro`` as data grows: ``python -m benchmarks.reprodisk --scale 1 16``.

Writes ``bench/reprodisk.{json,md}``.

For each factor K and each cache link type (DVC's default ``reflink,copy`` and
this project's ``hardlink,symlink``), a copy of the repository's tracked files
gets the K x user CSV of :mod:`benchmarks.scale` under ``data/user`` and runs
``dvc repro tensorize`` (every data stage; training adds a few MB). Reported:
the blocks actually allocated on disk (``st_blocks``, each inode counted once,
so a hard link costs nothing twice) under the workspace's ``data/`` and under
``.dvc/cache``, the wall time, and whether the filesystem could reflink (if it
can, ``reflink,copy`` shares blocks that ``st_blocks`` still counts twice).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.prep import ROOT
from benchmarks.report import add_run_options, scratch_parent, write_results
from benchmarks.scale import BASE_SAMPLES, build_inputs

LINK_TYPES = ("reflink,copy", "hardlink,symlink")  # DVC's default, then this repository's .dvc/config
_SKIP = ("bench/", "tests/", "dvclive/", "dvc.lock")  # results of this checkout, not inputs of the copy


def allocated_bytes(*roots: Path) -> int:
    """Bytes allocated for the files under ``roots``, each inode once (links are not followed)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root in roots:
        for folder, _, files in os.walk(root):
            for name in files:
                st = os.lstat(os.path.join(folder, name))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total


def _run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd} ({res.returncode}):\n{res.stdout}\n{res.stderr}")


def make_repo(dest: Path) -> Path:
    """The tracked files of this checkout, as a fresh git repository (no data, no cache, no dvc.lock)."""
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for rel in filter(None, listed.split("\n")):
        if rel.startswith(_SKIP) or not (ROOT / rel).is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    _run(["git", "init", "-q"], dest)
    _run(["git", "-c", "user.email=b@b", "-c", "user.name=b", "add", "-A"], dest)
    _run(["git", "-c", "user.email=b@b", "-c", "user.name=b", "commit", "-qm", "bench"], dest)
    return dest


def can_reflink(folder: Path) -> bool:
    a, b = folder / ".reflink-probe", folder / ".reflink-probe-copy"
    a.write_bytes(b"x" * 4096)
    try:
        return subprocess.run(["cp", "--reflink=always", str(a), str(b)], capture_output=True).returncode == 0
    finally:
        a.unlink(missing_ok=True)
        b.unlink(missing_ok=True)


def measure(parent: Path, scale: int, link_type: str, base_samples: int, idx_dir: Path) -> dict:
    repo = make_repo(Path(tempfile.mkdtemp(prefix=f"reprodisk-{scale}x-", dir=parent)))
    try:
        rows = build_inputs(repo, scale, base_samples, idx_dir)
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["data"].update(dataset="csv", train_csv="data/user/train.csv", test_csv="data/user/test.csv")
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        _run([sys.executable, "-m", "dvc", "config", "--local", "cache.type", link_type], repo)
        user = allocated_bytes(repo / "data" / "user")
        t0 = time.perf_counter()
        _run([sys.executable, "-m", "dvc", "repro", "tensorize"], repo)
        seconds = time.perf_counter() - t0
        data = allocated_bytes(repo / "data") - user  # the stages' outputs in the workspace
        cache = allocated_bytes(repo / ".dvc" / "cache")
        both = allocated_bytes(repo / "data", repo / ".dvc" / "cache") - user
        return {
            "scale": scale,
            "samples": rows,
            "cache_type": link_type,
            "seconds": round(seconds, 1),
            "user_csv_mb": round(user / 1e6, 1),
            "workspace_outputs_mb": round(data / 1e6, 1),
            "cache_mb": round(cache / 1e6, 1),
            "total_mb": round(both / 1e6, 1),
            "reflink_possible": can_reflink(repo),
        }
    finally:
        shutil.rmtree(repo, ignore_errors=True)


def render_markdown(r: dict) -> str:
    lines = [
        "# Disk used by `dvc repro` as data grows",
        "",
        f"`python -m benchmarks.reprodisk --scale {' '.join(str(k) for k in r['settings']['scales'])}` "
        f"({r['machine']['platform']}): `dvc repro tensorize` in a fresh copy of the repository, user CSV of "
        f"K x {r['settings']['base_samples']:,} rows under `data/user` (not counted). "
        f"MB allocated on disk, each inode once. {r['settings']['note']}",
        "",
        "| K | samples | cache.type | outputs in workspace MB | .dvc/cache MB | together MB | seconds |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['scale']} | {row['samples']:,} | `{row['cache_type']}` "
            f"| {row['workspace_outputs_mb']:,.0f} "
            f"| {row['cache_mb']:,.0f} | {row['total_mb']:,.0f} | {row['seconds']:.1f} |"
        )
    reflink = {row["reflink_possible"] for row in r["rows"]}
    lines += ["", "Reflinks on this filesystem: " + ("yes" if reflink == {True} else "no") + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=int, nargs="+", default=[1, 16], help="factors K (default: 1 16)")
    p.add_argument(
        "--base-samples", type=int, default=BASE_SAMPLES, help="train samples per K (tests use a few hundred)"
    )
    p.add_argument(
        "--cache-type", nargs="+", default=list(LINK_TYPES), help="DVC cache.type values to compare"
    )
    add_run_options(p, "K=16 needs ~14 GB")
    args = p.parse_args(argv)
    parent = scratch_parent(args.work)
    results: dict = {
        "rows": [],
        "settings": {"scales": args.scale, "base_samples": args.base_samples, "note": args.note},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
    }
    for scale in args.scale:
        for link_type in args.cache_type:
            row = measure(parent, scale, link_type, args.base_samples, args.idx)
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    write_results(args.out, "reprodisk", results, render_markdown(results))


if __name__ == "__main__":
    main()
