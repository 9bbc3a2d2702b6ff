"""One training pass and one evaluation pass.

Losses are accumulated as Python floats (``loss.item()``), never as tensors,
so nothing keeps a step's autograd graph alive; with ``free_graph`` the loop
also drops its own references to the loss and logits before the next forward,
so two graphs never coexist.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

_BAR_EVERY = 10  # batches between progress-bar refreshes; tqdm's own cost is not free


@dataclass(frozen=True)
class TrainStats:
    loss: float
    samples: int
    seconds: float
    data_wait_seconds: float

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def data_wait_fraction(self) -> float:
        return self.data_wait_seconds / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class EvalStats:
    loss: float
    accuracy: float


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    non_blocking: bool,
    free_graph: bool,
    description: str = "train",
) -> TrainStats:
    """One pass over ``loader``; time blocked in ``next()`` on the loader is reported as data wait."""
    model.train()
    loss_sum = 0.0
    samples = 0
    wait = 0.0
    bar = tqdm(total=len(loader), desc=description, unit="batch", disable=None, dynamic_ncols=True)
    start = time.perf_counter()
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
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        optimizer.step()
        k = labels.shape[0]
        batch_loss = loss.item()
        loss_sum += batch_loss * k
        samples += k
        if free_graph:
            del logits, loss
        step += 1
        if step % _BAR_EVERY == 0 or step == len(loader):
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{batch_loss:.4f}", samples_s=f"{samples / elapsed:.0f}", refresh=False)
            bar.update(step - bar.n)
    seconds = time.perf_counter() - start
    bar.close()
    return TrainStats(loss_sum / max(samples, 1), samples, seconds, wait)


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, *, non_blocking: bool) -> EvalStats:
    """Mean cross-entropy and accuracy over ``loader``."""
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
    return EvalStats(loss_sum / max(samples, 1), correct / max(samples, 1))
