"""Loader workers prefetch pages; the main process gathers: the same batches for any worker count."""

from __future__ import annotations

import json
import mmap
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.workers import uint8_twin
from pipeline.params import LoaderParams
from tests.test_trainer import make_split
from tests.test_uint8 import write_both
from trainer.data import ShardDataset, page_points
from trainer.loader import EpochBatchSampler, make_loader, resolve_settings
from trainer.prefetch import PrefetchedBatches
from trainer.rank_split import RankBatches
from trainer.verify import validate_split

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> dict[str, ShardDataset]:
    f32, u8 = write_both(tmp_path_factory.mktemp("workers"))
    return {
        name: ShardDataset(validate_split(root / "train", expected_split="train"))
        for name, root in (("float32", f32), ("uint8", u8))
    }


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
@pytest.mark.parametrize("workers", [1, 2])
def test_prefetched_batches_are_the_main_process_gather_in_sampler_order(
    splits, dtype: str, workers: int
) -> None:
    dataset = splits[dtype]
    sampler = EpochBatchSampler(
        len(dataset), 48, shuffle=True, seed=5, shard_sizes=[64] * 4, shuffle_window=2
    )
    settings = resolve_settings(
        LoaderParams(
            batch_size=48, num_workers=workers, persistent_workers=True, prefetch_factor=2, pin_memory=False
        ),
        CPU,
    )
    loader = make_loader(dataset, sampler, settings)
    assert isinstance(loader, PrefetchedBatches)
    for epoch, start in ((0, 0), (1, 2), (1, 0)):  # a mid-epoch start as a resume sets it
        sampler.set_epoch(epoch, start)
        _same_batches(loader, [dataset[batch] for batch in sampler], getattr(torch, dtype))


def _same_batches(loader: PrefetchedBatches, expected: list, dtype: torch.dtype) -> None:
    got = list(loader)
    assert len(loader) == len(expected) == len(got)
    for (images, labels), (want_images, want_labels) in zip(got, expected):
        assert images.dtype == want_images.dtype == dtype
        assert torch.equal(images, want_images) and torch.equal(labels, want_labels)


def test_batches_are_sent_together_and_split_back(splits) -> None:
    """Rank 1 of 2 over 256 samples in batches of 51: sizes 25 x 5 and an empty last batch, 3 per message."""
    dataset = splits["uint8"]
    sampler = RankBatches(EpochBatchSampler(len(dataset), 51, shuffle=True, seed=1), rank=1, world=2)
    loader = PrefetchedBatches(
        dataset,
        sampler,
        num_workers=2,
        persistent_workers=False,
        prefetch_factor=2,
        pin_memory=False,
        samples_per_message=60,
    )
    sent = list(loader.pages)  # what crossed from the workers: index arrays only
    assert all(type(a) is np.ndarray and a.dtype == np.int64 for chunk in sent for a in chunk)
    assert [sizes.tolist() for _, sizes in sent] == [[25, 25, 25], [25, 25, 0]]
    assert np.array_equal(np.concatenate([indices for indices, _ in sent]), torch.cat(list(sampler)).numpy())
    _same_batches(loader, [dataset[batch] for batch in sampler], torch.uint8)


def test_prefetch_reads_every_page_the_samples_lie_on(tmp_path: Path) -> None:
    for size in (
        8,
        3136,
        3 * 32 * 32 * 4,
        2 * mmap.PAGESIZE,
    ):  # labels, 1x28x28 and 3x32x32 floats, page-sized
        for offset in (0, 8, mmap.PAGESIZE - 8):
            local = np.array([0, 1, 5, 4, 1000])
            points = page_points(offset, size, local)
            wanted = {
                page
                for i in local
                for page in range(
                    (offset + i * size) // mmap.PAGESIZE, (offset + (i + 1) * size - 1) // mmap.PAGESIZE + 1
                )
            }
            assert {p // mmap.PAGESIZE for p in points} == wanted, (size, offset)
            starts, ends = offset + local * size, offset + (local + 1) * size
            assert all(
                any(s <= p < e for s, e in zip(starts, ends)) for p in points
            )  # nothing outside the items
    make_split(tmp_path / "train", 250, split="train", shard_size=100)
    dataset = ShardDataset(validate_split(tmp_path / "train", expected_split="train"))
    assert dataset.prefetch(np.array([0, 1, 2, 99, 100, 249])) == 6 * (
        2 + 2
    )  # 3136 and 8 bytes: 2 points each
    with pytest.raises(IndexError, match="out of range"):
        dataset.prefetch(np.array([250]))


def test_workers_benchmark_writes_both_dtypes_and_the_goal(tmp_path: Path) -> None:
    """benchmarks.workers on a tiny split (no timing asserts): the uint8 twin it makes holds the same
    samples."""
    f32, _ = write_both(tmp_path / "data")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.workers",
            "--tensors",
            str(f32),
            "--repeats",
            "1",
            "--out",
            str(tmp_path / "bench"),
        ],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    result = json.loads((tmp_path / "bench" / "workers.json").read_text())
    names = [row["name"] for row in result["rows"]]
    assert names == [
        f"{d}-{w}"
        for d in ("float32", "uint8")
        for w in ("workers0", "workers1", "workers2", "workers4", "gather-in-worker2")
    ]
    assert all(row["loader_epoch_s"] > 0 for row in result["rows"])
    assert set(result["workers2_over_workers0"]) == {"float32", "uint8"} and result["goal"] == 1.5
    assert "| uint8 |" in (tmp_path / "bench" / "workers.md").read_text()


def test_uint8_twin_normalises_to_the_float32_split(tmp_path: Path) -> None:
    f32, u8 = write_both(tmp_path / "data")
    twin = ShardDataset(validate_split(uint8_twin(f32 / "train", tmp_path / "twin"), expected_split="train"))
    expected = ShardDataset(validate_split(u8 / "train", expected_split="train"))
    assert twin.split.manifest.image_dtype == "uint8"
    assert [s.num_samples for s in twin.split.shards] == [s.num_samples for s in expected.split.shards]
    every = torch.arange(len(expected))
    assert all(torch.equal(a, b) for a, b in zip(twin[every], expected[every]))
