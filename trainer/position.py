"""Where a run stands: epochs done, and how far into the next one (global batches and partial sums).

A checkpoint records a :class:`Position`; a resumed run turns it back into
each rank's :class:`~trainer.loop.Partial`. The partial loss is kept per rank
because each rank sums its own slices in its own float64 order and the ranks'
sums are added only at the epoch's end: handing every rank back exactly its
own sum is what makes a resume with the same number of processes
bit-identical. With another number of processes (an elastic resume) there is
no such order to restore; rank 0 takes the whole partial sum and the other
ranks start from zero, which changes the last bits of that epoch's
``train_loss`` only.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.loop import Partial


@dataclass(frozen=True)
class Position:
    epoch: int  # epochs completed
    step: int = 0  # global batches done in epoch ``epoch`` (0-based index), 0 at an epoch boundary
    samples: int = 0  # samples all ranks trained on in those batches
    loss_sums: tuple[float, ...] = ()  # each rank's partial summed loss, in rank order
    seconds: float = 0.0  # training time spent on those batches (rank 0's clock)
    wait_seconds: float = 0.0

    @property
    def mid_epoch(self) -> bool:
        return self.step > 0

    def for_rank(self, rank: int, world: int) -> Partial:
        """What rank ``rank`` of ``world`` starts the epoch with."""
        if not self.mid_epoch:
            return Partial()
        if len(self.loss_sums) == world:
            loss = self.loss_sums[rank]
        else:  # elastic: the per-rank split of the sum cannot be kept
            loss = sum(self.loss_sums) if rank == 0 else 0.0
        # Samples are integers: their sum over ranks is exact in any order, so rank 0 carries them.
        return Partial(self.step, self.samples if rank == 0 else 0, loss, self.seconds, self.wait_seconds)
