"""One epoch of a run: train it, evaluate it, log its metrics over all ranks, checkpoint it.

:class:`Run` is what every step of a run needs, built once by ``trainer.run.train``.
:func:`train_epoch` trains one epoch from a position (a checkpoint's, mid-epoch
too), evaluates the test and val splits and reduces the metrics over the ranks;
a non-finite loss or weight stops it. Checkpoints are written by rank 0 alone
(:func:`write_checkpoint`): mid-epoch at a step boundary once
``train.checkpoint_seconds`` passed, and at an epoch's end
(:func:`checkpoint_at_epoch_end`). A checkpoint that cannot be written is a
warning and training goes on; a model that cannot be written (:func:`export`)
keeps the trained state as a checkpoint first.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from pipeline.errors import OutputError
from pipeline.params import TrainParams
from trainer import distributed
from trainer.augment import augmenter
from trainer.boundary import CheckpointTimer, StepBoundary, non_finite, weights_finite
from trainer.checkpoint import RunShape, save_checkpoint
from trainer.device_norm import DeviceNormalizer
from trainer.export import save_model
from trainer.loop import EvalStats, evaluate, train_one_epoch
from trainer.memory import PeakMemory
from trainer.model import SimpleCNN
from trainer.position import Position
from trainer.precision import Precision
from trainer.rank_split import RankBatches
from trainer.stream import StreamedSplit
from trainer.verify import ValidSplit

log = logging.getLogger(__name__)
Split = ValidSplit | StreamedSplit

# On an accelerator reading the running loss makes the host wait for the device, so the step
# boundary (non-finite check, time-based checkpoint) runs every this many steps; on the CPU every step.
ACCELERATOR_CHECK_STEPS = 16
CONFUSION_MAX_CLASSES = 100  # a confusion matrix of 10,000 cells at most: CIFAR-100's
Confusion = list[list[int]]  # row i, column j: the test samples of class i predicted as class j


@dataclass(frozen=True)
class Run:
    """What every step of a run needs: where it runs, what it trains, where it writes."""

    group: distributed.Group
    params: TrainParams
    model: SimpleCNN
    trained: torch.nn.Module  # the model, in DDP when there are several processes
    optimizer: torch.optim.Optimizer
    train_batches: RankBatches
    train_loader: Iterable  # DataLoader or DeviceResidentBatches
    test_loader: Iterable
    val_loader: Iterable | None  # None: no validation split
    non_blocking: bool
    fingerprint: str
    shape: RunShape
    checkpoint_dir: Path | str
    normalize: DeviceNormalizer  # uint8 batches -> float32 on the device (all splits share one normalisation)
    precision: Precision  # autocast and backward; fp16's gradient scaler, whose state is checkpointed

    @property
    def device(self) -> torch.device:
        return self.group.device


def write_checkpoint(run: Run, position: Position, history: list[dict[str, float]]) -> bool:
    """Rank 0 writes the checkpoint; a failure (disk full, permissions) is a warning and training goes on.

    Checkpoints are a convenience: losing one costs time, never the run. Whether one was written."""
    if not run.group.is_main:
        return False
    try:
        save_checkpoint(
            run.checkpoint_dir,
            model=run.model,
            optimizer=run.optimizer,
            device=run.device,
            scaler=run.precision.scaler,
            position=position,
            run_fingerprint=run.fingerprint,
            shape=run.shape,
            history=history,
        )
    except (OutputError, SafetensorError) as exc:
        log.warning("%s: checkpoint not written (%s); training goes on", run.checkpoint_dir, _reason(exc))
        return False
    return True


def _reason(exc: BaseException) -> str:
    """The OS's reason for a failed write, on one line (an OutputError's cause, or safetensors' text)."""
    cause = exc.__cause__ if isinstance(exc, OutputError) and isinstance(exc.__cause__, OSError) else None
    text = (cause.strerror or str(cause)) if cause is not None else str(exc)
    return " ".join(text.split())[:200]


def checkpoint_at_epoch_end(
    run: Run, done: int, timer: CheckpointTimer, history: list[dict[str, float]]
) -> None:
    """After ``done`` epochs (not the last): a checkpoint every ``train.checkpoint_every`` epochs, or
    once ``train.checkpoint_seconds`` passed since the last one."""
    every = run.params.checkpoint_every and done % run.params.checkpoint_every == 0
    if done < run.params.epochs and (every or timer.due()):
        write_checkpoint(run, Position(done, 0, 0, (0.0,) * run.group.world_size), history)
        timer.restart()


def train_epoch(
    run: Run,
    epoch: int,
    start: Position,
    timer: CheckpointTimer,
    history: list[dict[str, float]],
    confusion_classes: int = 0,
) -> tuple[dict[str, float], Confusion | None]:
    """One epoch from ``start``'s global batch on, evaluated; the metrics of all ranks together, and
    with ``confusion_classes`` (the last epoch's: the final model's) the test split's confusion matrix
    counted in the same test pass."""
    group, train = run.group, run.params
    batches = run.train_batches.sampler.batches_per_epoch

    def save_mid_epoch(position: Position) -> None:
        write_checkpoint(run, position, history)
        timer.restart()

    boundary = StepBoundary(
        group,
        epoch=epoch,
        epochs=train.epochs,
        batches=batches,
        timer=timer,
        model=run.model,
        save=save_mid_epoch,
        lr=train.lr,
    )
    run.train_batches.set_epoch(epoch, start.step)
    memory = PeakMemory(run.device)
    memory.reset()  # this epoch's peak, not the process's so far
    stats = train_one_epoch(
        run.trained,
        run.train_loader,
        run.optimizer,
        run.device,
        non_blocking=run.non_blocking,
        free_graph=train.free_graph,
        description=f"epoch {epoch + 1}/{train.epochs}",
        global_size=run.train_batches.global_size,
        world_size=group.world_size,
        progress=group.is_main,
        start=start.for_rank(group.rank, group.world_size),
        boundary=boundary,
        check_every=1 if run.device.type == "cpu" else ACCELERATOR_CHECK_STEPS,
        normalize=run.normalize,
        precision=run.precision,
        augment=augmenter(
            train.augment, seed=train.seed, epoch=epoch, rank=group.rank, world=group.world_size
        ),
    )
    result = _evaluate(run, run.test_loader, confusion_classes)
    loss_sum, samples, test_sum, correct, test_samples = distributed.all_sum(
        [stats.loss_sum, stats.samples, result.loss_sum, result.correct, result.samples], group
    )
    seconds, wait, peak = distributed.all_max(
        [stats.seconds, stats.data_wait_fraction, memory.peak_mb()], group
    )
    entry = {
        "train_loss": loss_sum / max(samples, 1),
        "test_loss": test_sum / max(test_samples, 1),
        "test_acc": correct / max(test_samples, 1),
        "epoch_seconds": seconds,
        "samples_per_second": samples / seconds if seconds > 0 else 0.0,
        "data_wait_fraction": wait,
        "peak_memory_mb": peak,
        "processes": group.world_size,
        "threads": torch.get_num_threads(),
    }
    if run.val_loader is not None:
        val = _evaluate(run, run.val_loader)
        val_sum, val_correct, val_samples = distributed.all_sum(
            [val.loss_sum, val.correct, val.samples], group
        )
        entry["val_loss"] = val_sum / max(val_samples, 1)
        entry["val_acc"] = val_correct / max(val_samples, 1)
    # The reduced figures and the weights are the same on every rank: every rank stops alike.
    losses = [entry["test_loss"], entry.get("val_loss", 0.0)]
    if not (all(math.isfinite(v) for v in losses) and weights_finite(run.model)):
        raise non_finite(boundary.where(batches), "the test or val loss or a weight", train.lr)
    return entry, _summed(result.confusion, group)


def confusion_side(classes: int) -> int:
    """``classes``, the side of the confusion matrix the run counts; 0 (none, with a notice) past
    :data:`CONFUSION_MAX_CLASSES`: DVC's template draws every pair of classes, and a page cannot
    draw that many cells, nor a person read them."""
    if classes <= CONFUSION_MAX_CLASSES:
        return classes
    log.info(
        "%d classes: no confusion matrix (more than %d, too many cells to draw); its file holds no rows",
        classes,
        CONFUSION_MAX_CLASSES,
    )
    return 0


def test_confusion(run: Run, classes: int) -> Confusion | None:
    """The test split's confusion matrix by a pass of its own, for a run resumed after its last
    epoch (any other run counts it in its last epoch's test pass). Every rank calls it."""
    return _summed(_evaluate(run, run.test_loader, classes).confusion, run.group)


def _summed(counts: torch.Tensor | None, group: distributed.Group) -> Confusion | None:
    """This rank's confusion counts summed over the ranks (a collective, when there are counts)."""
    if counts is None:
        return None
    k = counts.shape[0]
    summed = distributed.all_sum(counts.flatten().tolist(), group)  # float64: exact below 2**53
    return [[int(n) for n in summed[row * k : (row + 1) * k]] for row in range(k)]


def _evaluate(run: Run, loader: Iterable, confusion_classes: int = 0) -> EvalStats:
    """One evaluation pass of this rank's slice of a split, as the run trains (normalisation, precision)."""
    return evaluate(
        run.model,
        loader,
        run.device,
        non_blocking=run.non_blocking,
        normalize=run.normalize,
        precision=run.precision,
        confusion_classes=confusion_classes,
    )


def export(run: Run, model_dir: Path | str, train_split: Split, history: list[dict[str, float]]) -> None:
    """Write the model folder; if it cannot be written, keep the trained state as a checkpoint first."""
    try:
        save_model(model_dir, run.model, manifest=train_split.manifest, train=run.params)
    except (OutputError, SafetensorError) as exc:
        kept = write_checkpoint(
            run, Position(run.params.epochs, 0, 0, (0.0,) * run.group.world_size), history
        )
        then = (
            f"the trained state is in {run.checkpoint_dir}: a rerun only writes the model"
            if kept
            else "the trained state could not be kept either"
        )
        raise OutputError(
            f"{model_dir}: could not write the model ({_reason(exc)}); nothing was left behind; {then}"
        ) from None
