"""Loader workers that prefetch pages; the main process gathers every batch.

A batch gathered in a worker reaches the main process through shared memory:
the worker copies it into a fresh shared-memory segment, and the main process
receives a file descriptor over a socket and faults the segment's pages in.
For a memory-mapped gather, which is itself a few memcpys from the page cache,
that transport costs many times the gather (bench/workers.md). So here the
main process gathers each batch straight from its own mapping of the shards,
exactly as with ``loader.num_workers`` 0, and the workers run ahead of it
(``prefetch_factor`` batches each) reading one byte of every page the coming
batches lie on (:meth:`trainer.data.ShardDataset.prefetch`): whatever has to
come from disk is read by a worker, not waited for by the training loop.
Only index arrays cross between processes, as NumPy arrays (a pickled copy
of a few kilobytes; a torch tensor would take the shared-memory path).

Batches are the dataset's own gather in the sampler's order, so results are
bit-identical for any number of workers.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from trainer.data import ShardDataset


def _as_is(indices: np.ndarray) -> np.ndarray:
    """The workers' collate function: the index array goes back unchanged (not made a tensor)."""
    return indices


class _PageToucher(Dataset):
    """What a worker runs per batch: fault the batch's pages in, hand its indices back."""

    def __init__(self, dataset: ShardDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: np.ndarray) -> np.ndarray:
        self.dataset.prefetch(indices)
        return indices


class _NumpyBatches(Sampler[np.ndarray]):
    """The sampler's batches as NumPy arrays, so sending them to a worker is a small pickled copy."""

    def __init__(self, sampler: Sampler[torch.Tensor]) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[np.ndarray]:
        for batch in self.sampler:
            yield batch.numpy()


class PrefetchedBatches:
    """Iterating yields ``dataset[batch]`` for each batch of ``sampler``, gathered here while workers prefetch."""

    def __init__(self, dataset: ShardDataset, sampler: Sampler[torch.Tensor], *, num_workers: int,
                 persistent_workers: bool, prefetch_factor: int | None, pin_memory: bool) -> None:
        if num_workers < 1:
            raise ValueError(f"need num_workers >= 1, got {num_workers}")
        self.dataset = dataset
        self.pin_memory = pin_memory
        self.pages = DataLoader(_PageToucher(dataset), sampler=_NumpyBatches(sampler), batch_size=None,
                                collate_fn=_as_is, num_workers=num_workers, persistent_workers=persistent_workers,
                                prefetch_factor=prefetch_factor)

    def __len__(self) -> int:
        return len(self.pages)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for indices in self.pages:
            images, labels = self.dataset[torch.from_numpy(indices)]
            if self.pin_memory:  # what DataLoader's pin-memory thread would do, here in one copy
                images, labels = images.pin_memory(), labels.pin_memory()
            yield images, labels
