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
mean loss. Stats are returned as sums, for the caller to reduce over ranks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

_BAR_SECONDS = 2.0  # host seconds between progress-bar refreshes; each one reads the running loss (a sync)


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

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.samples, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.samples, 1)


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
) -> TrainStats:
    """One pass over ``loader``; time blocked in ``next()`` on the loader is reported as data wait.

    ``global_size(step)`` is the step's batch size over all ``world_size``
    ranks; without it the loader's batch is the whole batch.
    """
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    samples = 0
    wait = 0.0
    bar = tqdm(total=len(loader), desc=description, unit="batch", disable=None if progress else True,
               dynamic_ncols=True)
    start = time.perf_counter()
    next_refresh = start + _BAR_SECONDS
    batches = iter(loader)
    step = 0
    while True:
        before = time.perf_counter()
        try:
            images, labels = next(batches)
        except StopIteration:
            break
        wait += time.perf_counter() - before
        images = images.to(device, non_blocking=non_blocking)
        labels = labels.to(device, non_blocking=non_blocking)
        optimizer.zero_grad(set_to_none=True)
        logits = model(images)
        k = labels.shape[0]
        summed = F.cross_entropy(logits, labels, reduction="sum")
        share = (global_size(step) if global_size is not None else k) / world_size
        loss = summed / share
        loss.backward()
        optimizer.step()
        loss_sum += summed.detach().double()
        samples += k
        if free_graph:
            del logits, loss, summed
        step += 1
        if not bar.disable and (time.perf_counter() >= next_refresh or step == len(loader)):
            now = time.perf_counter()
            next_refresh = now + _BAR_SECONDS
            bar.set_postfix(loss=f"{loss_sum.item() / max(samples, 1):.4f}", samples_s=f"{samples / (now - start):.0f}",
                            refresh=False)
            bar.update(step - bar.n)
    epoch_loss = loss_sum.item()  # the epoch's one host read of the loss; it also waits for the last step
    seconds = time.perf_counter() - start
    bar.close()
    return TrainStats(epoch_loss, samples, seconds, wait)


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, *, non_blocking: bool) -> EvalStats:
    """Summed cross-entropy and correct predictions over ``loader``."""
    model.eval()
    loss_sum = 0.0
    correct = 0
    samples = 0
    with torch.inference_mode():
        for images, labels in loader:
            images = images.to(device, non_blocking=non_blocking)
            labels = labels.to(device, non_blocking=non_blocking)
            logits = model(images)
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == labels).sum().item())
            samples += labels.shape[0]
    return EvalStats(loss_sum, correct, samples)
