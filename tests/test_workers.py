"""Loader workers prefetch pages; the main process gathers: the same batches for any worker count."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.params import LoaderParams
from tests.test_trainer import make_split
from tests.test_uint8 import write_both
from trainer.data import ShardDataset
from trainer.loader import EpochBatchSampler, make_loader, resolve_settings
from trainer.prefetch import PrefetchedBatches
from trainer.verify import validate_split

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> dict[str, ShardDataset]:
    f32, u8 = write_both(tmp_path_factory.mktemp("workers"))
    return {name: ShardDataset(validate_split(root / "train", expected_split="train"))
            for name, root in (("float32", f32), ("uint8", u8))}


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
@pytest.mark.parametrize("workers", [1, 2])
def test_prefetched_batches_are_the_main_process_gather_in_sampler_order(splits, dtype: str, workers: int) -> None:
    dataset = splits[dtype]
    sampler = EpochBatchSampler(len(dataset), 48, shuffle=True, seed=5, shard_sizes=[64] * 4, shuffle_window=2)
    settings = resolve_settings(LoaderParams(batch_size=48, num_workers=workers, persistent_workers=True,
                                             prefetch_factor=2, pin_memory=False), CPU, print)
    loader = make_loader(dataset, sampler, settings)
    assert isinstance(loader, PrefetchedBatches)
    for epoch, start in ((0, 0), (1, 2), (1, 0)):  # a mid-epoch start as a resume sets it
        sampler.set_epoch(epoch, start)
        expected = [dataset[batch] for batch in sampler]
        got = list(loader)
        assert len(loader) == len(expected) == len(got)
        for (images, labels), (want_images, want_labels) in zip(got, expected):
            assert images.dtype == want_images.dtype == getattr(torch, dtype)
            assert torch.equal(images, want_images) and torch.equal(labels, want_labels)


def test_only_index_arrays_cross_between_processes(splits) -> None:
    """A tensor from a worker would come through a fresh shared-memory segment per batch: the slow path."""
    dataset = splits["uint8"]
    sampler = EpochBatchSampler(len(dataset), 64, shuffle=True, seed=1)
    loader = PrefetchedBatches(dataset, sampler, num_workers=2, persistent_workers=False, prefetch_factor=2,
                               pin_memory=False)
    sent = list(loader.pages)
    assert all(type(indices) is np.ndarray and indices.dtype == np.int64 for indices in sent)
    assert np.array_equal(np.concatenate(sent), torch.cat(list(sampler)).numpy())


def test_prefetch_reads_every_page_the_samples_lie_on(tmp_path: Path) -> None:
    make_split(tmp_path / "train", 250, split="train", shard_size=100)  # 3136-byte samples: some cross a page
    dataset = ShardDataset(validate_split(tmp_path / "train", expected_split="train"))
    indices = np.array([0, 1, 2, 99, 100, 101, 249, 1], dtype=np.int64)
    expected = 0
    for s, local in ((0, [0, 1, 2, 99]), (1, [0, 1]), (2, [49])):
        shard = dataset.split.shards[s]
        for offset, size in ((shard.images_offset, 784 * 4), (shard.labels_offset, 8)):
            expected += len({page for i in local
                             for page in range((offset + i * size) // mmap.PAGESIZE,
                                               (offset + (i + 1) * size - 1) // mmap.PAGESIZE + 1)})
    assert dataset.prefetch(indices) == expected
    with pytest.raises(IndexError, match="out of range"):
        dataset.prefetch(np.array([250]))
