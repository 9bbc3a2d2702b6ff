"""``loader.shuffle_window``: shard-windowed shuffling, seeded like the global shuffle, same results for any
loader speed setting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_train_stage import MODEL_METRICS, history, run_train
from tests.test_trainer import make_split
from trainer.loader import EpochBatchSampler, epoch_order, epoch_seed

SIZES = [100, 100, 100, 100, 100, 37]  # shard sizes as tensorize writes them: all full but the last
STARTS = [0, 100, 200, 300, 400, 500, 537]


def shard_of(index: int) -> int:
    return next(s for s in range(len(SIZES)) if STARTS[s] <= index < STARTS[s + 1])


@pytest.mark.parametrize("window", [1, 2, 4])
def test_windows_visit_whole_shards_together(window: int) -> None:
    order = epoch_order(SIZES, shuffle=True, seed=3, epoch=0, window=window)
    assert order.dtype == torch.int64 and sorted(order.tolist()) == list(range(sum(SIZES)))
    # Cut the order where a window ends: each piece is exactly the samples of `window` whole shards.
    ids = [shard_of(int(i)) for i in order]
    position, seen = 0, []
    while position < len(order):
        shards = {ids[position]}
        while True:  # grow the piece until it holds all samples of exactly the shards it touches
            length = sum(SIZES[t] for t in shards)
            touched = set(ids[position : position + length])
            if touched == shards:
                break
            shards |= touched
        piece = order[position : position + length].tolist()
        assert sorted(piece) == sorted(i for t in shards for i in range(STARTS[t], STARTS[t + 1]))
        seen.append(shards)
        position += length
    assert [len(s) for s in seen] == [window] * (len(SIZES) // window) + (
        [len(SIZES) % window] if len(SIZES) % window else []
    )
    # samples inside a window are mixed, not left in shard order
    assert order[: SIZES[0]].tolist() != sorted(order[: SIZES[0]].tolist())


def test_order_depends_only_on_seed_epoch_and_window() -> None:
    a = epoch_order(SIZES, shuffle=True, seed=3, epoch=0, window=2)
    torch.manual_seed(99)  # the global RNG plays no part
    assert torch.equal(a, epoch_order(SIZES, shuffle=True, seed=3, epoch=0, window=2))
    assert not torch.equal(a, epoch_order(SIZES, shuffle=True, seed=3, epoch=1, window=2))
    assert not torch.equal(a, epoch_order(SIZES, shuffle=True, seed=4, epoch=0, window=2))
    assert not torch.equal(a, epoch_order(SIZES, shuffle=True, seed=3, epoch=0, window=1))


def test_null_or_a_window_of_every_shard_is_the_global_shuffle() -> None:
    """A window that holds every shard is exactly today's global permutation, bit for bit."""
    expected = torch.randperm(sum(SIZES), generator=torch.Generator().manual_seed(epoch_seed(3, 5)))
    for window in (None, len(SIZES), 1000):
        assert torch.equal(epoch_order(SIZES, shuffle=True, seed=3, epoch=5, window=window), expected), window
    assert epoch_order(SIZES, shuffle=False, seed=3, epoch=5, window=2).tolist() == list(range(sum(SIZES)))


def test_sampler_batches_follow_epoch_order() -> None:
    sampler = EpochBatchSampler(sum(SIZES), 64, shuffle=True, seed=3, shard_sizes=SIZES, shuffle_window=2)
    sampler.set_epoch(4)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 9
    assert torch.equal(torch.cat(batches), epoch_order(SIZES, shuffle=True, seed=3, epoch=4, window=2))
    with pytest.raises(ValueError, match="do not add up"):
        EpochBatchSampler(500, 64, shuffle=True, seed=3, shard_sizes=SIZES, shuffle_window=2)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("window-shards")
    make_split(root / "train", 256, split="train", shard_size=64, seed=1)  # 4 shards
    make_split(root / "test", 128, split="test", shard_size=100, seed=2)
    return root


def _params(path: Path, loader: dict) -> Path:
    path.write_text(json.dumps({"loader": {"batch_size": 32, **loader}, "train": {"epochs": 2}}))
    return path


def test_windowed_results_are_the_same_for_any_worker_count(shards: Path, tmp_path: Path) -> None:
    """num_workers 0 and 2 with a window give bit-identical metrics and weights; the window does change
    them."""
    runs = {}
    for name, loader in {
        "w0": {"shuffle_window": 2, "num_workers": 0},
        "w2": {"shuffle_window": 2, "num_workers": 2, "persistent_workers": True},
        "global": {},
    }.items():
        work = tmp_path / name
        work.mkdir()
        res = run_train(shards, work, _params(work / "params.yaml", loader))
        assert res.returncode == 0, res.stderr
        runs[name] = work
    a, b, g = (history(runs[n]) for n in ("w0", "w2", "global"))
    for metric in MODEL_METRICS:
        assert a[metric] == b[metric], metric
    assert (runs["w0"] / "models" / "model.safetensors").read_bytes() == (
        runs["w2"] / "models" / "model.safetensors"
    ).read_bytes()
    assert a["train_loss"] != g["train_loss"]  # the window is really used
