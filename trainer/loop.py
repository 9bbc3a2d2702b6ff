"""One training pass and one evaluation pass.

The training loss is summed on the device, detached (so no step's autograd
graph stays alive) and read once at the end of the epoch: a ``loss.item()``
per step would make the host wait for an accelerator at every batch, which
cancels what pinned memory and ``non_blocking`` copies buy. The sum is kept in
float64 and each batch's float32 summed loss is widened before it is added,
which is exactly the arithmetic of ``sum += summed.item()`` on Python floats:
the reported loss is bit-identical to per-step reading. With ``free_graph``
the loop also drops its own references to the loss and logits before the next
forward, so two graphs never coexist.

With several processes each rank trains on its slice of the global batch
(``trainer.rank_split``): its summed loss is divided by ``global / world``, so
DDP's average of the ranks' gradients is the gradient of the global batch's
mean loss (:func:`scaled_loss`). Stats are returned as sums, for the caller to
reduce over ranks.

An epoch can start part-way (:class:`Partial`: global batches already done
and this rank's sums so far, restored from a mid-epoch checkpoint) and hands
its running sums to ``boundary`` after every ``check_every`` steps: the
caller checks them (a non-finite loss stops the run there) and may write a
checkpoint. Reading the running sum is a host wait on an accelerator, so
there the caller checks every few steps; on the CPU it costs nothing.

``normalize`` is applied to each batch's images right after they reach the
device: uint8 batches become the float32 values of their float32 shards
(``trainer.device_norm``); float32 batches pass unchanged.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from trainer.device_norm import identity
from trainer.precision import Precision

_BAR_SECONDS = 2.0  # host seconds between progress-bar refreshes; each one reads the running loss (a sync)


@dataclass(frozen=True)
class Partial:
    """One rank's progress through an epoch at a step boundary (what a mid-epoch checkpoint carries)."""

    step: int = 0  # global batches done in this epoch
    samples: int = 0  # samples this rank trained on so far
    loss_sum: float = 0.0  # this rank's summed (not averaged) loss so far, float64
    seconds: float = 0.0
    wait_seconds: float = 0.0


@dataclass(frozen=True)
class TrainStats:
    loss_sum: float
    samples: int
    seconds: float
    data_wait_seconds: float

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.samples, 1)

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def data_wait_fraction(self) -> float:
        return self.data_wait_seconds / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class EvalStats:
    loss_sum: float
    correct: int
    samples: int
    # int64 [classes, classes] on the CPU: samples of class i (row) predicted as class j (column)
    confusion: torch.Tensor | None = None

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.samples, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.samples, 1)


def scaled_loss(summed: torch.Tensor, global_batch: int, world_size: int) -> torch.Tensor:
    """This rank's summed loss over its slice, scaled so DDP's mean over ranks of the gradients is
    the gradient of the global batch's mean loss (uneven and empty slices included)."""
    return summed / (global_batch / world_size)


@contextlib.contextmanager
def _iterating(loader: Iterable) -> Iterator[Iterator]:
    """The loader's iterator, closed however the loop ends. Left open by an exception raised outside
    it (Ctrl-C during a step), a prefetching iterator would keep its workers waiting for the next
    chunk, and the interpreter's exit waits for them."""
    batches = iter(loader)
    try:
        yield batches
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    non_blocking: bool,
    free_graph: bool,
    description: str = "train",
    global_size: Callable[[int], int] | None = None,
    world_size: int = 1,
    progress: bool = True,
    start: Partial = Partial(),
    boundary: Callable[[Partial], None] | None = None,
    check_every: int = 1,
    normalize: Callable[[torch.Tensor], torch.Tensor] = identity,
    precision: Precision | None = None,
    augment: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None,
) -> TrainStats:
    """One pass over ``loader`` (which yields the batches from ``start.step`` on); time blocked in
    ``next()`` on the loader is reported as data wait.

    ``global_size(step)`` is the step's batch size over all ``world_size``
    ranks; without it the loader's batch is the whole batch. ``boundary`` gets
    the running :class:`Partial` after every ``check_every``-th step and after
    the last one. The returned stats include ``start``'s sums.

    ``augment(images, step, global_size)`` (``trainer.augment``) transforms
    each batch on the device, seeded by the global batch index ``step``;
    ``precision`` (``trainer.precision``, default fp32) wraps forward and loss
    in its autocast and does backward and step (through fp16's scaler).
    """
    precision = precision or Precision()
    model.train()
    loss_sum = torch.tensor(start.loss_sum, dtype=torch.float64, device=device)
    samples = start.samples
    wait = start.wait_seconds
    total = start.step + len(loader)  # the loader's length is what remains of the epoch
    bar = tqdm(
        total=total,
        initial=start.step,
        desc=description,
        unit="batch",
        disable=None if progress else True,
        dynamic_ncols=True,
    )
    began = time.perf_counter() - start.seconds
    next_refresh = time.perf_counter() + _BAR_SECONDS
    with _iterating(loader) as batches:
        step = start.step
        while True:
            before = time.perf_counter()
            try:
                images, labels = next(batches)
            except StopIteration:
                break
            wait += time.perf_counter() - before
            images = images.to(device, non_blocking=non_blocking)
            labels = labels.to(device, non_blocking=non_blocking)
            images = normalize(images)
            k = labels.shape[0]
            batch = global_size(step) if global_size is not None else k
            if augment is not None:
                images = augment(images, step, batch)
            optimizer.zero_grad(set_to_none=True)
            with precision.autocast():
                logits = model(images)
                # float32 in every precision
                summed = F.cross_entropy(logits.float(), labels, reduction="sum")
            loss = scaled_loss(summed, batch, world_size)
            precision.backward_step(loss, optimizer)
            loss_sum += summed.detach().double()
            samples += k
            if free_graph:
                del logits, loss, summed
            step += 1
            if boundary is not None and step % check_every == 0:
                boundary(Partial(step, samples, loss_sum.item(), time.perf_counter() - began, wait))
            if not bar.disable and (time.perf_counter() >= next_refresh or step == total):
                now = time.perf_counter()
                next_refresh = now + _BAR_SECONDS
                bar.set_postfix(
                    loss=f"{loss_sum.item() / max(samples, 1):.4f}",
                    samples_s=f"{samples / (now - began):.0f}",
                    refresh=False,
                )
                bar.update(step - bar.n)
    epoch_loss = loss_sum.item()  # the epoch's one host read of the loss; it also waits for the last step
    seconds = time.perf_counter() - began
    bar.close()
    if boundary is not None and step % check_every != 0:
        boundary(Partial(step, samples, epoch_loss, seconds, wait))
    return TrainStats(epoch_loss, samples, seconds, wait)


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    *,
    non_blocking: bool,
    normalize: Callable[[torch.Tensor], torch.Tensor] = identity,
    precision: Precision | None = None,
    confusion_classes: int = 0,
) -> EvalStats:
    """Summed cross-entropy and correct predictions over ``loader``, under ``precision``'s autocast;
    with ``confusion_classes`` (the model's outputs) also the confusion counts."""
    precision = precision or Precision()
    model.eval()
    loss_sum = 0.0
    correct = 0
    samples = 0
    k = confusion_classes
    confusion = torch.zeros(k * k, dtype=torch.int64, device=device) if k else None
    with torch.inference_mode(), _iterating(loader) as batches:
        for images, labels in batches:
            images = images.to(device, non_blocking=non_blocking)
            labels = labels.to(device, non_blocking=non_blocking)
            images = normalize(images)
            with precision.autocast():
                logits = model(images).float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            predicted = logits.argmax(dim=1)
            correct += int((predicted == labels).sum().item())
            samples += labels.shape[0]
            if confusion is not None:  # integer sums: exact in any order
                confusion.index_add_(0, labels * k + predicted, torch.ones_like(labels))
    if confusion is not None:
        confusion = confusion.reshape(k, k).cpu()
    return EvalStats(loss_sum, correct, samples, confusion)
