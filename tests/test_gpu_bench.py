"""benchmarks.gpu: its carried data, and its two commands run where polars, dvc and dvclive are missing.

The GPU machine has torch, numpy, safetensors and PyYAML but neither polars,
dvc, dvclive nor pydantic (``pipeline.params``) and ruamel.yaml: the
end-to-end test runs both steps in subprocesses whose ``sitecustomize``
makes those unimportable, on tiny shards, on the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from benchmarks import gpu
from pipeline.normalize import make_normalization
from pipeline.tensorize import write_split
from tests.test_trainer import make_split

ROOT = Path(__file__).resolve().parent.parent
MISSING_ON_THE_GPU_MACHINE = ("polars", "dvc", "dvclive", "pydantic", "pydantic_core", "ruamel")

BLOCKER = """
import sys

MISSING = {missing!r}


class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in MISSING:
            raise ImportError(f"{{name}} is not on the GPU machine")
        return None


sys.meta_path.insert(0, Missing())
"""


@pytest.fixture(scope="module")
def tensors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny float32 train and test splits (train in three shards), as the tensorize stage writes them."""
    root = tmp_path_factory.mktemp("gpu-tensors")
    make_split(root / "train", 250, split="train", shard_size=100, seed=1)
    make_split(root / "test", 60, split="test", shard_size=100, seed=2)
    return root


def _run(args: list[str], site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_carried_uint8_splits_are_what_tensorize_writes_and_rebuild_the_float32_ones(
    tensors: Path, tmp_path: Path
) -> None:
    gpu.prepare(tensors, tmp_path / "carried")
    pixels, labels = make_split(tmp_path / "f32", 250, split="train", shard_size=100, seed=1)
    write_split(
        [(pixels, labels)],
        tmp_path / "u8",
        dataset="fashion-mnist",
        split="train",
        shard_size=100,
        normalization=make_normalization("unit", None),
        shard_dtype="uint8",
    )
    manifest = "manifest.json"
    assert (tmp_path / "carried" / "train" / manifest).read_text() == (tmp_path / "u8" / manifest).read_text()
    for name in ("train", "test"):
        rebuilt = gpu.float32_split(tmp_path / "carried" / name, tmp_path / "rebuilt" / name, name)
        # The same text, shard hashes included: the float32 shards byte for byte.
        assert (rebuilt / manifest).read_text() == (tensors / name / manifest).read_text()


def test_prepare_refuses_more_than_a_device_run_can_carry(
    tensors: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gpu, "MAX_PREPARED_BYTES", 1000)
    with pytest.raises(SystemExit, match=r"MB, over the 0 MB a device run can carry$"):
        gpu.prepare(tensors, tmp_path / "carried")
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_the_boundary_interval_is_the_trainers() -> None:
    from trainer.epoch import ACCELERATOR_CHECK_STEPS

    assert gpu.CHECK_STEPS == {"cuda": ACCELERATOR_CHECK_STEPS, "cpu": 1}


def test_gpu_bench_prepares_and_runs_without_polars_dvc_or_dvclive(tensors: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        textwrap.dedent(BLOCKER.format(missing=MISSING_ON_THE_GPU_MACHINE))
    )
    probe = subprocess.run(
        [sys.executable, "-c", "import polars"],
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
    )
    assert "not on the GPU machine" in probe.stderr  # the blocker is in force

    data, out = tmp_path / ".gpu-data", tmp_path / "out"
    prepared = _run(["--prepare", str(data), "--tensors", str(tensors)], site)
    assert prepared.returncode == 0, prepared.stderr
    assert "MB" in prepared.stdout and (data / "test" / "manifest.json").exists()

    res = _run(["--data", str(data), "--out", str(out), "--device", "cpu", "--quick"], site)
    assert res.returncode == 0, res.stderr
    result = json.loads((out / "gpu.json").read_text())
    rows = result["rows"]
    both = [(p, d) for p in ("fp32", "bf16") for d in ("float32", "uint8")]  # no fp16 on the CPU
    assert [(r["precision"], r["shards"], r["loader"], r["free_graph"]) for r in rows] == [
        *[(p, d, "default", True) for p, d in both],
        *[(p, d, "resident", True) for p, d in both],
        *[(p, d, "default", False) for p, d in both],
    ]
    assert result["complete"] and result["skipped"] == []
    assert result["goals"] == {"epoch_s": gpu.GOAL_EPOCH_S, "data_wait_fraction": gpu.GOAL_WAIT_FRACTION}
    assert result["settings"]["epochs"] == 2 and result["machine"]["device"] == "cpu"
    for r in rows:
        assert len(r["epoch_s"]) == 1 and r["best_epoch_s"] > 0
        assert r["cuda_peak_mb"] is None
        assert 0 <= r["data_wait_fraction"] <= 1 and 0 <= r["test_acc"] <= 1
        assert r["epoch_60k_s"] == pytest.approx(r["best_epoch_s"] * 60_000 / 250)
        assert r["goal_epoch_met"] == (r["epoch_60k_s"] <= gpu.GOAL_EPOCH_S)
        assert r["goal_wait_met"] == (r["data_wait_fraction"] < gpu.GOAL_WAIT_FRACTION)
    # The same model on the same batches: the loader and the shard dtype change no result.
    fp32 = {r["test_acc"] for r in rows if r["precision"] == "fp32"}
    assert len(fp32) == 1
    markdown = (out / "gpu.md").read_text()
    assert markdown in res.stdout
    table = [
        line for line in markdown.splitlines() if line.startswith("| fp32 ") or line.startswith("| bf16 ")
    ]
    assert len(table) == len(rows) and all(line.count("met") == 2 for line in table)


def test_rows_past_the_budget_are_skipped_and_listed(tensors: Path, tmp_path: Path) -> None:
    gpu.prepare(tensors, tmp_path / "carried")
    args = ["--data", str(tmp_path / "carried"), "--out", str(tmp_path / "out"), "--device", "cpu"]
    gpu.main([*args, "--epochs", "1", "--budget-s", "0"])
    result = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert len(result["rows"]) == 1 and len(result["skipped"]) == len(gpu.plan(torch.device("cpu"))) - 1
    assert "Skipped, past the 0 s budget: " in (tmp_path / "out" / "gpu.md").read_text()
