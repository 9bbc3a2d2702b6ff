"""The train stage's one library call: validate the data, train (resuming if possible), log, save.

Order of work: device and shards are checked before anything is built; a
matching checkpoint is restored; DVCLive's folder is rebuilt from the
checkpoint's history and then extended epoch by epoch; the model folder is
written atomically at the end and the checkpoint removed.

DVCLive is always opened with ``resume=False`` and the history replayed: DVC
deletes a stage's metrics and plots before rerunning it, and a killed run may
have logged epochs past its last checkpoint, so the checkpoint (not whatever
is left in ``dvclive/``) is the record the logs must agree with. The result has
exactly one row per epoch in every ``dvclive/plots/metrics/*.tsv``.

Several processes (``train.processes > 1``, or a user's own ``torchrun``):
:func:`launch` starts the group through the elastic agent; each rank runs
:func:`fit`, trains on its slice of every global batch (``trainer.rank_split``)
and evaluates its slice of the test set; the epoch's sums are all-reduced, so
every metric covers all samples (timings and memory: the maximum over ranks).
Rank 0 alone reads and writes the checkpoint, DVCLive and the model; on a
resume it broadcasts the restored state, so the other ranks (on other
machines too) need no access to the checkpoint folder.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from dvclive import Live

from pipeline.errors import ParamsError, PipelineError
from pipeline.params import LoaderParams, TrainParams
from trainer import distributed
from trainer.allocator import retain_freed_memory
from trainer.checkpoint import (
    empty_state,
    fingerprint,
    load_checkpoint,
    remove_checkpoint,
    restore_state,
    save_checkpoint,
    state_tensors,
)
from trainer.data import ShardDataset
from trainer.export import save_model
from trainer.loader import EpochBatchSampler, make_loader, resolve_settings, unwrap_worker_error
from trainer.lock import LOCK_HELD_ENV, checkpoint_lock
from trainer.loop import evaluate, train_one_epoch
from trainer.memory import PeakMemory
from trainer.model import ARCHITECTURE, SimpleCNN, check_input_size
from trainer.rank_split import RankBatches
from trainer.verify import ValidSplit, check_compatible, validate_split

METRICS = (
    "train_loss",
    "test_loss",
    "test_acc",
    "epoch_seconds",
    "samples_per_second",
    "data_wait_fraction",
    "peak_memory_mb",
    "processes",
    "threads",
)
VAL_METRICS = ("val_loss", "val_acc")  # logged when there is a validation split (data.val_fraction > 0)
# Metrics that measure the machine rather than the model; they differ between identical runs
# (threads: with train.threads null it is PyTorch's choice for this machine).
MACHINE_METRICS = frozenset({"epoch_seconds", "samples_per_second", "data_wait_fraction", "peak_memory_mb", "threads"})


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ParamsError("train.device: expected a usable CUDA device for 'cuda', found none (use 'auto' or 'cpu')")
    return torch.device(name)


def metric_names(has_val: bool) -> tuple[str, ...]:
    """The metrics every epoch logs: :data:`METRICS`, plus :data:`VAL_METRICS` with a validation split."""
    return METRICS + VAL_METRICS if has_val else METRICS


def _log(live: Live, entry: dict[str, float]) -> None:
    for name in entry:
        value = entry[name]
        live.log_metric(name, int(value) if name == "processes" else value)  # a count, also after a resume
    live.next_step()


def _report(epoch: int, epochs: int, m: dict[str, float]) -> None:
    print(
        f"epoch {epoch}/{epochs}: train_loss {m['train_loss']:.4f}  test_loss {m['test_loss']:.4f}  "
        f"test_acc {m['test_acc']:.4f}  "
        + (f"val_loss {m['val_loss']:.4f}  val_acc {m['val_acc']:.4f}  " if "val_loss" in m else "")
        + f"{m['epoch_seconds']:.2f} s  {m['samples_per_second']:.0f} samples/s  "
        f"data wait {m['data_wait_fraction']:.1%}  peak {m['peak_memory_mb']:.0f} MB",
        flush=True,
    )


def check_inputs(train_dir: Path | str, test_dir: Path | str, train: TrainParams,
                 val_dir: Path | str | None = None) -> tuple[torch.device, ValidSplit, ValidSplit, ValidSplit | None]:
    """Device and the splits, checked before anything is built (and before any process is started).

    The validation split is None when ``val_dir`` is None or holds no samples.
    """
    device = resolve_device(train.device)
    train_split = validate_split(train_dir, expected_split="train", verify=train.verify)
    check_input_size(train_split.manifest.image_shape, str(Path(train_dir) / "manifest.json"))
    test_split = validate_split(test_dir, expected_split="test", verify=train.verify)
    check_compatible(train_split, test_split)
    val_split = None
    if val_dir is not None:
        val_split = validate_split(val_dir, expected_split="val", verify=train.verify)
        check_compatible(train_split, val_split)
        if val_split.num_samples == 0:
            val_split = None
    return device, train_split, test_split, val_split


def launch(
    args: Sequence[str],
    *,
    train_dir: Path | str,
    test_dir: Path | str,
    checkpoint_dir: Path | str,
    train: TrainParams,
    val_dir: Path | str | None = None,
    module: str = "stages.train",
    notice: Callable[[str], None] = _stderr,
) -> int:
    """Run ``python -m module args`` as ``train.processes`` ranks under torchrun; the agent's exit code.

    Inputs and GPUs are checked here first, so a user error is one line and
    exit 2 instead of every rank failing (and being restarted) alike. The
    checkpoint lock is held here, across the agent's restarts of the group.
    """
    device, *_ = check_inputs(train_dir, test_dir, train, val_dir)
    distributed.check_gpus(device, train.processes)
    with checkpoint_lock(checkpoint_dir):
        code = distributed.launch(module, args, processes=train.processes, max_restarts=train.max_restarts,
                                  env={LOCK_HELD_ENV: "1"})
    if code != 0:
        notice(f"error: the {train.processes} training processes failed (torchrun exit {code}, "
               f"train.max_restarts {train.max_restarts}); see their output above")
    return code


def _resume_everywhere(
    checkpoint_dir: Path | str,
    group: distributed.Group,
    *,
    model: SimpleCNN,
    optimizer: torch.optim.Optimizer,
    run_fingerprint: str,
    max_epoch: int,
    metrics: Sequence[str],
    notice: Callable[[str], None],
) -> list[dict[str, float]]:
    """Rank 0 restores the checkpoint, every other rank receives it; the metrics history so far.

    The history is rank 0's (it alone logs); elsewhere only its length, the
    epochs done, is meaningful.
    """
    resumed = None
    if group.is_main:
        resumed = load_checkpoint(checkpoint_dir, model=model, optimizer=optimizer, device=group.device,
                                  run_fingerprint=run_fingerprint, max_epoch=max_epoch, metrics=metrics,
                                  notice=notice)
    done = distributed.broadcast_int(resumed.epoch if resumed else 0, group)
    if done and group.world_size > 1:
        tensors = (state_tensors(model, optimizer, group.device) if group.is_main
                   else empty_state(model, optimizer, group.device))
        distributed.broadcast_tensors(tensors, group)
        if not group.is_main:
            restore_state(tensors, model=model, optimizer=optimizer, device=group.device)
    if resumed:
        notice(f"notice: resuming after epoch {resumed.epoch} from {checkpoint_dir}")
        return list(resumed.history)
    return [{}] * done  # placeholders on ranks > 0: only the count matters there


def fit(
    *,
    train_dir: Path | str,
    test_dir: Path | str,
    model_dir: Path | str,
    checkpoint_dir: Path | str,
    live_dir: Path | str,
    loader: LoaderParams,
    train: TrainParams,
    val_dir: Path | str | None = None,
    notice: Callable[[str], None] = _stderr,
) -> dict[str, float]:
    """Train SimpleCNN on the shard folders; return the last epoch's metrics (rank 0's view: all ranks)."""
    device, train_split, test_split, val_split = check_inputs(train_dir, test_dir, train, val_dir)
    group = distributed.join(device)
    try:
        owns_lock = group.is_main and not os.environ.get(LOCK_HELD_ENV)
        with checkpoint_lock(checkpoint_dir) if owns_lock else contextlib.nullcontext():
            return _fit(group, train_split, test_split, val_split, model_dir=model_dir, checkpoint_dir=checkpoint_dir,
                        live_dir=live_dir, loader=loader, train=train,
                        notice=notice if group.is_main else (lambda _message: None))
    finally:
        distributed.leave(group)


def _fit(
    group: distributed.Group,
    train_split: ValidSplit,
    test_split: ValidSplit,
    val_split: ValidSplit | None,
    *,
    model_dir: Path | str,
    checkpoint_dir: Path | str,
    live_dir: Path | str,
    loader: LoaderParams,
    train: TrainParams,
    notice: Callable[[str], None],
) -> dict[str, float]:
    device, main = group.device, group.is_main
    if group.world_size > 1:
        notice(f"notice: rank 0 of {group.world_size} processes runs on {socket.gethostname()}: "
               f"it alone writes {model_dir}, {live_dir} and {checkpoint_dir}")
    threads = distributed.threads(group, train.threads)
    if threads is not None:
        torch.set_num_threads(threads)
    retain_freed_memory()  # every rank: no per-step page faults (trainer/allocator.py)
    settings = resolve_settings(loader, device, notice)
    train_batches = RankBatches(
        EpochBatchSampler(train_split.num_samples, settings.batch_size, shuffle=settings.shuffle, seed=train.seed,
                          shard_sizes=[s.num_samples for s in train_split.shards],
                          shuffle_window=settings.shuffle_window),
        group.rank, group.world_size)
    test_batches = RankBatches(
        EpochBatchSampler(test_split.num_samples, settings.batch_size, shuffle=False, seed=train.seed),
        group.rank, group.world_size)
    train_loader = make_loader(ShardDataset(train_split), train_batches, settings)
    test_loader = make_loader(ShardDataset(test_split), test_batches, settings)
    val_loader = None
    if val_split is not None:
        val_batches = RankBatches(
            EpochBatchSampler(val_split.num_samples, settings.batch_size, shuffle=False, seed=train.seed),
            group.rank, group.world_size)
        val_loader = make_loader(ShardDataset(val_split), val_batches, settings)
    metrics = metric_names(val_loader is not None)
    non_blocking = settings.pin_memory and device.type == "cuda"

    torch.manual_seed(train.seed)
    model = SimpleCNN(*train_split.manifest.image_shape, train_split.manifest.num_classes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=train.lr)
    run_fingerprint = fingerprint(train, loader, device, train_split.manifest, test_split.manifest, ARCHITECTURE,
                                  world_size=group.world_size)
    history = _resume_everywhere(checkpoint_dir, group, model=model, optimizer=optimizer,
                                 run_fingerprint=run_fingerprint, max_epoch=train.epochs, metrics=metrics,
                                 notice=notice)
    # After the resume: DDP broadcasts rank 0's parameters when it wraps the model.
    trained = distributed.wrap(model, group)

    live = Live(dir=str(live_dir), resume=False, dvcyaml=False, save_dvc_exp=False, report=None) if main else None
    for entry in history if live else ():
        _log(live, entry)

    memory = PeakMemory(device)
    try:
        for epoch in range(len(history), train.epochs):
            train_batches.set_epoch(epoch)
            memory.reset()
            stats = train_one_epoch(
                trained,
                train_loader,
                optimizer,
                device,
                non_blocking=non_blocking,
                free_graph=train.free_graph,
                description=f"epoch {epoch + 1}/{train.epochs}",
                global_size=train_batches.global_size,
                world_size=group.world_size,
                progress=main,
            )
            result = evaluate(model, test_loader, device, non_blocking=non_blocking)
            loss_sum, samples, test_sum, correct, test_samples = distributed.all_sum(
                [stats.loss_sum, stats.samples, result.loss_sum, result.correct, result.samples], group)
            if val_loader is not None:
                val = evaluate(model, val_loader, device, non_blocking=non_blocking)
                val_sum, val_correct, val_samples = distributed.all_sum([val.loss_sum, val.correct, val.samples],
                                                                        group)
            seconds, wait, peak = distributed.all_max(
                [stats.seconds, stats.data_wait_fraction, memory.peak_mb()], group)
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
            if val_loader is not None:
                entry["val_loss"] = val_sum / max(val_samples, 1)
                entry["val_acc"] = val_correct / max(val_samples, 1)
            history.append(entry)
            done = epoch + 1
            if not main:
                continue
            _log(live, entry)
            _report(done, train.epochs, entry)
            if train.checkpoint_every and done % train.checkpoint_every == 0 and done < train.epochs:
                save_checkpoint(
                    checkpoint_dir,
                    model=model,
                    optimizer=optimizer,
                    device=device,
                    epoch=done,
                    run_fingerprint=run_fingerprint,
                    history=history,
                )
    except PipelineError as exc:
        # A shard replaced mid-run is detected in the worker that maps it.
        raise unwrap_worker_error(exc) from None

    if main:
        save_model(model_dir, model, manifest=train_split.manifest, train=train)
        live.end()
        remove_checkpoint(checkpoint_dir)
    return history[-1]
