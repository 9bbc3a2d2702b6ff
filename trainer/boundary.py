"""Between two training steps: stop on a non-finite loss, write a mid-epoch checkpoint when one is due.

The loop (``trainer.loop``) hands its running sums to a :class:`StepBoundary`
after every ``check_every`` steps. A non-finite running loss stops the run
right there with one line naming the epoch and the step: from that step on
the weights are garbage, and nothing after it (checkpoint, model, logs) may
be written. When ``train.checkpoint_seconds`` have passed since the last
checkpoint, a checkpoint of this step boundary is written.

With several processes every rank must take the same decision at the same
step, or one would wait forever for the others in the next all-reduce: the
ranks agree through one small all-reduce (the maximum of "my loss is not
finite" and rank 0's "a checkpoint is due"); a due checkpoint also gathers
every rank's partial loss sum for rank 0 to write.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from pipeline.errors import PipelineError
from trainer import distributed
from trainer.loop import Partial
from trainer.position import Position


class NonFiniteLoss(PipelineError):
    """The training loss or the weights became NaN or infinite."""


class CheckpointTimer:
    """Seconds since the last checkpoint against ``train.checkpoint_seconds`` (``None``: never due)."""

    def __init__(self, seconds: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.clock = clock
        self.last = clock()

    def due(self) -> bool:
        return self.seconds is not None and self.clock() - self.last >= self.seconds

    def restart(self) -> None:
        self.last = self.clock()


def weights_finite(model: torch.nn.Module) -> bool:
    """Every parameter finite (one pass over the weights: negligible next to writing them)."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def non_finite(where: str, what: str, lr: float) -> NonFiniteLoss:
    return NonFiniteLoss(
        f"{where}: {what} is not finite; stopped before writing any model or checkpoint of it (the last "
        f"checkpoint stays resumable): lower train.lr (now {lr:g}) or look for extreme values in the data"
    )


class StepBoundary:
    """What runs after a step of epoch ``epoch``: the non-finite check and the time-based checkpoint.

    ``save(position)`` writes a checkpoint on rank 0 (and does nothing elsewhere).
    """

    def __init__(
        self,
        group: distributed.Group,
        *,
        epoch: int,
        epochs: int,
        batches: int,
        timer: CheckpointTimer,
        model: torch.nn.Module,
        save: Callable[[Position], None],
        lr: float,
    ) -> None:
        self.group = group
        self.epoch = epoch
        self.epochs = epochs
        self.batches = batches
        self.timer = timer
        self.model = model
        self.save = save
        self.lr = lr

    def where(self, step: int) -> str:
        return f"epoch {self.epoch + 1}/{self.epochs}, step {step}/{self.batches}"

    def __call__(self, partial: Partial) -> None:
        bad = not math.isfinite(partial.loss_sum)
        # The last step's boundary is the epoch's end: its checkpoint (if due) follows the evaluation.
        due = self.group.is_main and partial.step < self.batches and self.timer.due()
        if self.group.world_size > 1:
            bad, due = (v > 0 for v in distributed.all_max([float(bad), float(due)], self.group))
        if bad:
            raise non_finite(self.where(partial.step), "the training loss", self.lr)
        if not due:
            return
        # DDP keeps the weights identical on every rank, so every rank takes this branch alike.
        if not weights_finite(self.model):
            raise non_finite(self.where(partial.step), "a weight", self.lr)
        sums = distributed.gather_floats(partial.loss_sum, self.group)
        (samples,) = distributed.all_sum([partial.samples], self.group)
        self.save(
            Position(
                self.epoch, partial.step, int(samples), tuple(sums), partial.seconds, partial.wait_seconds
            )
        )
