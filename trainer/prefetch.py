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
Only index arrays cross between processes, as NumPy arrays (a pickled copy;
a torch tensor would take the shared-memory path), several batches' worth in
one message (:data:`SAMPLES_PER_MESSAGE`): each message costs the main
process a wake-up and a pipe read, which would otherwise rival the gather.

Batches are the dataset's own gather in the sampler's order, so results are
bit-identical for any number of workers.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from trainer.data import ShardDataset

# Indices of whole batches are sent to a worker together until they reach this many samples.
SAMPLES_PER_MESSAGE = 4096

Chunk = tuple[np.ndarray, np.ndarray]  # the batches' indices, concatenated; each batch's size


def _as_is(chunk: Chunk) -> Chunk:
    """The workers' collate function: the index arrays go back unchanged (not made tensors)."""
    return chunk


class _PageToucher(Dataset):
    """What a worker runs per message: fault the batches' pages in, hand their indices back."""

    def __init__(self, dataset: ShardDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, chunk: Chunk) -> Chunk:
        self.dataset.prefetch(chunk[0])
        return chunk


class _Chunks(Sampler[Chunk]):
    """The sampler's batches as NumPy arrays.

    Consecutive batches are joined until they hold at least ``samples_per_message`` samples.
    """

    def __init__(self, sampler: Sampler[torch.Tensor], samples_per_message: int) -> None:
        self.sampler = sampler
        self.samples_per_message = samples_per_message

    def __iter__(self) -> Iterator[Chunk]:
        batches: list[np.ndarray] = []
        for batch in self.sampler:
            batches.append(batch.numpy())
            if sum(len(b) for b in batches) >= self.samples_per_message:
                yield np.concatenate(batches), np.array([len(b) for b in batches], dtype=np.int64)
                batches = []
        if batches:
            yield np.concatenate(batches), np.array([len(b) for b in batches], dtype=np.int64)


class PrefetchedBatches:
    """Yields ``dataset[batch]`` for each batch of ``sampler``, gathered here while workers prefetch."""

    def __init__(
        self,
        dataset: ShardDataset,
        sampler: Sampler[torch.Tensor],
        *,
        num_workers: int,
        persistent_workers: bool,
        prefetch_factor: int | None,
        pin_memory: bool,
        samples_per_message: int = SAMPLES_PER_MESSAGE,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"need num_workers >= 1, got {num_workers}")
        self.dataset = dataset
        self.sampler = sampler
        self.pin_memory = pin_memory
        self.pages = DataLoader(
            _PageToucher(dataset),
            sampler=_Chunks(sampler, samples_per_message),
            batch_size=None,
            collate_fn=_as_is,
            num_workers=num_workers,
            persistent_workers=persistent_workers,
            prefetch_factor=prefetch_factor,
        )

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for indices, sizes in self.pages:
            for batch in np.split(indices, np.cumsum(sizes)[:-1]):
                images, labels = self.dataset[torch.from_numpy(batch)]
                if self.pin_memory:  # what DataLoader's pin-memory thread would do, here in one copy
                    images, labels = images.pin_memory(), labels.pin_memory()
                yield images, labels
