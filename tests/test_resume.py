"""Resume anywhere: SIGKILL at step boundaries inside an epoch, resume, compare bytes; speed-only params
proven.

The kill runs checkpoint at every step boundary (``train.checkpoint_seconds``
tiny, ``train.checkpoint_every`` 0): the n-th ``write_checkpoint`` is then
the n-th step boundary, so the test knows where it kills. With 256 train
samples in batches of 64 (4 batches an epoch) the writes are epoch 1 steps
1-3, epoch 1's end, epoch 2 steps 1-3 (an epoch's last step is its end).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest
import safetensors.torch
import torch

from pipeline.params import MAX_LR, LoaderParams, TrainParams
from tests.test_train_stage import (
    MODEL_METRICS,
    history,
    run_train,
    run_until_killed,
    same_as_baseline,
    write_params,
)
from tests.test_trainer import _other_value
from trainer.boundary import CheckpointTimer, NonFiniteLoss, StepBoundary
from trainer.checkpoint import SPEED_ONLY
from trainer.distributed import Group
from trainer.loop import Partial
from trainer.run import train as train_model

EVERY_STEP = {"checkpoint_every": 0, "checkpoint_seconds": 0.001}

# (write_checkpoint call to kill after, loader workers, the checkpoint's epoch and step)
KILLS = [(1, 0, (0, 1)), (3, 2, (0, 3)), (6, 0, (1, 2))]


def _checkpoint(work: Path) -> dict:
    return json.loads((work / "checkpoints" / "checkpoint.json").read_text())


@pytest.mark.parametrize(
    ("calls", "workers", "at"), KILLS, ids=[f"write-{c}-workers-{w}" for c, w, _ in KILLS]
)
def test_killed_mid_epoch_resumes_bit_identically(
    data: Path, baseline, tmp_path: Path, calls: int, workers: int, at: tuple[int, int]
) -> None:
    work0, _ = baseline
    params = write_params(tmp_path / "params.yaml", loader={"num_workers": workers}, train=EVERY_STEP)

    def killed_at_the_expected_step() -> None:
        meta = _checkpoint(tmp_path)
        assert (meta["epoch"], meta["step"]) == at
        assert len(meta["partial"]["loss_sums"]) == 1 and meta["partial"]["samples"] == 64 * at[1]

    run_until_killed(
        data, tmp_path, params, "trainer.epoch.write_checkpoint", calls, inspect=killed_at_the_expected_step
    )
    assert not (tmp_path / "models").exists()
    res = run_train(data, tmp_path, params)
    assert res.returncode == 0, res.stderr
    assert f"resuming in epoch {at[0] + 1}, step {at[1]}" in res.stderr
    assert res.stdout.count("epoch 2/2") == 1 and res.stdout.count("epoch 1/2") == (1 if at[0] == 0 else 0)
    same_as_baseline(work0, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("lr", [1.0e8, MAX_LR])  # MAX_LR: the largest lr Adam's float32 step can carry
def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    data: Path, tmp_path: Path, lr: float
) -> None:
    res = run_train(data, tmp_path, write_params(tmp_path / "params.yaml", train={"lr": lr, **EVERY_STEP}))
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and res.stderr.count("error: ") == 1, res.stderr
    error = res.stderr.splitlines()[-1]
    assert (
        error.startswith("error: epoch 1/2, step ")
        and "is not finite" in error
        and f"train.lr (now {lr:g})" in error
    )
    assert not (tmp_path / "models").exists(), "no model may be written from a non-finite run"
    failed_at = int(error.split("step ")[1].split("/")[0])
    meta = _checkpoint(tmp_path)  # the last good one: before the failing step, every tensor finite
    assert meta["step"] < failed_at or (meta["epoch"] == 0 and failed_at == 1)
    tensors = safetensors.torch.load_file(str(tmp_path / "checkpoints" / "checkpoint.safetensors"))
    assert all(torch.isfinite(t.float()).all() for name, t in tensors.items() if not name.startswith("rng."))


def test_a_non_finite_weight_stops_the_run_before_its_checkpoint_is_written() -> None:
    """The weight check at a due checkpoint: a weight can overflow in the optimizer step although the
    loss that step computed was finite (the run above stops on the loss first)."""
    model = torch.nn.Linear(2, 1)
    saved = []
    boundary = StepBoundary(
        Group(0, 1, 0, 1, torch.device("cpu"), False),
        epoch=0,
        epochs=2,
        batches=10,
        timer=CheckpointTimer(0.0),  # a checkpoint is due at every boundary
        model=model,
        save=saved.append,
        lr=0.5,
    )
    boundary(Partial(step=3, samples=12, loss_sum=1.5))
    assert [p.step for p in saved] == [3]
    with torch.no_grad():
        model.weight[0, 1] = float("inf")
    with pytest.raises(
        NonFiniteLoss, match=r"^epoch 1/2, step 4/10: a weight is not finite; .*train\.lr \(now 0\.5\)"
    ):
        boundary(Partial(step=4, samples=16, loss_sum=2.0))
    assert [p.step for p in saved] == [3], "a checkpoint of a non-finite weight was written"


# Values that make a speed-only key actually act in a short run (the others: any other valid value).
ACTING = {
    "loader.num_workers": 2,
    "loader.persistent_workers": True,
    "loader.prefetch_factor": 3,
    "train.checkpoint_seconds": 0.001,
    "train.checkpoint_every": 0,
    "train.verify": "full",
}


def _short_run(data: Path, work: Path, loader: LoaderParams, train: TrainParams) -> tuple[list[dict], bytes]:
    work.mkdir()
    train_model(
        train_dir=data / "train",
        test_dir=data / "test",
        model_dir=work / "models",
        checkpoint_dir=work / "checkpoints",
        live_dir=work / "dvclive",
        loader=loader,
        train=train,
    )
    logged = {name: [v for _, v in rows] for name, rows in history(work).items()}
    return [{name: logged[name][i] for name in MODEL_METRICS} for i in range(train.epochs)], (
        work / "models" / "model.safetensors"
    ).read_bytes()


# Speed-only keys that take no effect in a short local run on the CPU, and where they are shown to change
# no result where they do act.
ACTS_ELSEWHERE = {
    "loader.pin_memory": "CUDA only: pinned host memory; no test here has a GPU",
    "loader.cache_limit_mb": "streaming: test_stream.py::test_streamed_training_is_bit_identical_and_…",
    "loader.prefetch_shards": "streaming: test_stream.py::test_streamed_training_is_bit_identical_and_…",
    "train.max_restarts": "test_ddp.py::test_two_processes_are_bit_identical_run_to_run",
}


@pytest.mark.slow
def test_every_speed_only_key_changes_no_result(data: Path, tmp_path: Path, monkeypatch) -> None:
    """Iterates SPEED_ONLY itself: a key wrongly declared speed-only (train.seed, say) fails here. The
    keys of ACTS_ELSEWHERE are changed here too, but act only where their tests run them."""
    assert set(ACTS_ELSEWHERE) <= SPEED_ONLY
    monkeypatch.chdir(tmp_path)
    base = {
        "loader": LoaderParams(batch_size=64, num_workers=1),
        "train": TrainParams(epochs=1, device="cpu"),
    }
    expected, model = _short_run(data, tmp_path / "base", base["loader"], base["train"])
    for key in sorted(SPEED_ONLY):
        section, name = key.split(".")
        params = base[section]
        value = ACTING.get(
            key, _other_value(typing.get_type_hints(type(params))[name], getattr(params, name))
        )
        changed = {**base, section: dataclasses.replace(params, **{name: value})}
        got, got_model = _short_run(data, tmp_path / key, changed["loader"], changed["train"])
        assert got[:1] == expected, key  # train.epochs: the first epoch of a longer run is this run
        assert got_model == model or key == "train.epochs", key


def test_a_checkpoint_from_another_machine_resumes_with_a_notice(
    data: Path, baseline, tmp_path: Path
) -> None:
    """Resume anywhere: a checkpoint names the CPU (or GPU) it was made on, and one made on another model
    resumes, with a notice that kernels there may round differently. (Here the machine is the same, so
    the run still ends as the uninterrupted one.)"""
    work0, _ = baseline
    params = write_params(tmp_path / "params.yaml", train=EVERY_STEP)
    run_until_killed(data, tmp_path, params, "trainer.epoch.write_checkpoint", 2)
    meta_path = tmp_path / "checkpoints" / "checkpoint.json"
    meta = json.loads(meta_path.read_text())
    here = meta["machine"]
    assert here and here.endswith(torch.backends.cpu.get_cpu_capability())
    meta_path.write_text(json.dumps({**meta, "machine": "Another CPU, AVX2"}))
    res = run_train(data, tmp_path, params)
    assert res.returncode == 0, res.stderr
    notices = [line for line in res.stderr.splitlines() if "another machine" in line]
    assert len(notices) == 1, res.stderr
    assert f"made on Another CPU, AVX2, this run is on {here};" in notices[0]
    assert "resuming in epoch 1, step 2" in res.stderr
    same_as_baseline(work0, tmp_path)


def test_a_checkpoint_from_another_thread_count_is_not_resumed(
    data: Path, baseline, tmp_path: Path, monkeypatch
) -> None:
    """train.threads null resolves at run time: killed under OMP_NUM_THREADS=1, rerun under 2, it used to
    resume and end equal to neither uninterrupted run."""
    if torch.get_num_threads() < 2:
        pytest.skip("this process has one intra-op thread: no other count to resume under")
    work0, _ = baseline
    params = write_params(tmp_path / "params.yaml", train=EVERY_STEP)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_until_killed(data, tmp_path, params, "trainer.epoch.write_checkpoint", 2)
    assert _checkpoint(tmp_path)["threads"] == 1
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))  # what the baseline resolved
    res = run_train(data, tmp_path, params)
    assert res.returncode == 0, res.stderr
    notices = [line for line in res.stderr.splitlines() if "not resuming" in line]
    assert (
        len(notices) == 1
        and f"made with 1 intra-op threads per process, this run uses {torch.get_num_threads()}" in notices[0]
    ), res.stderr
    same_as_baseline(work0, tmp_path)  # from scratch, under the baseline's thread count
