"""Each global batch split among the ranks, so any world size trains on the same global batches.

The global order stays :class:`~trainer.loader.EpochBatchSampler`'s; this is a
separate step applied to its output. Rank ``r`` of ``w`` takes a contiguous
slice of every global batch of ``n`` samples: ``n // w`` samples, one more for
the first ``n % w`` ranks. Nothing is padded or dropped, so a rank may get an
empty slice when a batch is smaller than the world (the loop still steps with
it: DDP needs every rank in every step). The loop scales each rank's summed
loss by ``world / n`` (:meth:`RankBatches.global_size` gives ``n``), so the
gradient DDP averages over ranks is the one-process gradient of the global
batch, uneven last batch included.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from trainer.loader import EpochBatchSampler


def rank_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s share of ``n`` samples; the shares tile ``0..n`` in rank order."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a world of {world}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class RankBatches(Sampler[torch.Tensor]):
    """Yields this rank's slice of every global batch ``sampler`` yields."""

    def __init__(self, sampler: EpochBatchSampler, rank: int, world: int) -> None:
        rank_range(0, rank, world)  # validates rank and world
        self.sampler = sampler
        self.rank = rank
        self.world = world

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The epoch to yield, from global batch ``start`` on (see :meth:`EpochBatchSampler.set_epoch`)."""
        self.sampler.set_epoch(epoch, start)

    def __len__(self) -> int:
        return len(self.sampler)

    def global_size(self, step: int) -> int:
        """Samples in global batch ``step`` over all ranks."""
        return min(self.sampler.batch_size, self.sampler.num_samples - step * self.sampler.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for step, batch in enumerate(self.sampler, start=self.sampler.start):
            if len(batch) != self.global_size(step):
                raise RuntimeError(
                    f"global batch {step}: expected {self.global_size(step)} samples, found {len(batch)}"
                )
            if self.world == 1:
                yield batch
                continue
            start, stop = rank_range(len(batch), self.rank, self.world)
            yield batch[start:stop].clone()
