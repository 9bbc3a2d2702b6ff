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

Test hook: with the environment variable ``TRAINER_TEST_PAUSE_AFTER_EPOCH=k``
the run prints ``paused after epoch k`` once epoch k is logged and
checkpointed, then sleeps until killed; the resume test uses it to SIGKILL a
real run at a known point. It has no other effect.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from dvclive import Live

from pipeline.errors import ParamsError, PipelineError
from pipeline.params import LoaderParams, TrainParams
from trainer.allocator import retain_freed_memory
from trainer.checkpoint import fingerprint, load_checkpoint, remove_checkpoint, save_checkpoint
from trainer.data import ShardDataset
from trainer.export import save_model
from trainer.loader import EpochBatchSampler, make_loader, resolve_settings, unwrap_worker_error
from trainer.loop import evaluate, train_one_epoch
from trainer.memory import PeakMemory
from trainer.model import ARCHITECTURE, SimpleCNN
from trainer.verify import check_compatible, validate_split

METRICS = (
    "train_loss",
    "test_loss",
    "test_acc",
    "epoch_seconds",
    "samples_per_second",
    "data_wait_fraction",
    "peak_memory_mb",
    "threads",
)
# Metrics that measure the machine rather than the model; they differ between identical runs
# (threads: with train.threads null it is PyTorch's choice for this machine).
MACHINE_METRICS = frozenset({"epoch_seconds", "samples_per_second", "data_wait_fraction", "peak_memory_mb", "threads"})
PAUSE_ENV = "TRAINER_TEST_PAUSE_AFTER_EPOCH"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ParamsError("train.device: expected a usable CUDA device for 'cuda', found none (use 'auto' or 'cpu')")
    return torch.device(name)


def _pause_for_tests(completed_epochs: int) -> None:
    if os.environ.get(PAUSE_ENV) == str(completed_epochs):
        print(f"paused after epoch {completed_epochs}", flush=True)
        while True:
            time.sleep(60)


def _log(live: Live, entry: dict[str, float]) -> None:
    for name in METRICS:
        live.log_metric(name, entry[name])
    live.next_step()


def _report(epoch: int, epochs: int, m: dict[str, float]) -> None:
    print(
        f"epoch {epoch}/{epochs}: train_loss {m['train_loss']:.4f}  test_loss {m['test_loss']:.4f}  "
        f"test_acc {m['test_acc']:.4f}  {m['epoch_seconds']:.2f} s  {m['samples_per_second']:.0f} samples/s  "
        f"data wait {m['data_wait_fraction']:.1%}  peak {m['peak_memory_mb']:.0f} MB",
        flush=True,
    )


def fit(
    *,
    train_dir: Path | str,
    test_dir: Path | str,
    model_dir: Path | str,
    checkpoint_dir: Path | str,
    live_dir: Path | str,
    loader: LoaderParams,
    train: TrainParams,
    notice: Callable[[str], None] = _stderr,
) -> dict[str, float]:
    """Train SimpleCNN on the shard folders; return the last epoch's metrics."""
    device = resolve_device(train.device)
    if train.threads is not None:
        torch.set_num_threads(train.threads)
    retain_freed_memory()
    train_split = validate_split(train_dir, expected_split="train", verify=train.verify)
    test_split = validate_split(test_dir, expected_split="test", verify=train.verify)
    check_compatible(train_split, test_split)

    settings = resolve_settings(loader, device, notice)
    train_sampler = EpochBatchSampler(train_split.num_samples, settings.batch_size, shuffle=settings.shuffle, seed=train.seed)
    test_sampler = EpochBatchSampler(test_split.num_samples, settings.batch_size, shuffle=False, seed=train.seed)
    train_loader = make_loader(ShardDataset(train_split), train_sampler, settings)
    test_loader = make_loader(ShardDataset(test_split), test_sampler, settings)
    non_blocking = settings.pin_memory and device.type == "cuda"

    torch.manual_seed(train.seed)
    model = SimpleCNN(num_classes=train_split.manifest.num_classes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=train.lr)
    run_fingerprint = fingerprint(train, loader, device, train_split.manifest, test_split.manifest, ARCHITECTURE)
    resumed = load_checkpoint(
        checkpoint_dir,
        model=model,
        optimizer=optimizer,
        device=device,
        run_fingerprint=run_fingerprint,
        max_epoch=train.epochs,
        notice=notice,
    )
    history = list(resumed.history) if resumed else []
    if resumed:
        notice(f"notice: resuming after epoch {resumed.epoch} from {checkpoint_dir}")

    live = Live(dir=str(live_dir), resume=False, dvcyaml=False, save_dvc_exp=False, report=None)
    for entry in history:
        _log(live, entry)

    memory = PeakMemory(device)
    try:
        for epoch in range(len(history), train.epochs):
            train_sampler.set_epoch(epoch)
            memory.reset()
            stats = train_one_epoch(
                model,
                train_loader,
                optimizer,
                device,
                non_blocking=non_blocking,
                free_graph=train.free_graph,
                description=f"epoch {epoch + 1}/{train.epochs}",
            )
            result = evaluate(model, test_loader, device, non_blocking=non_blocking)
            entry = {
                "train_loss": stats.loss,
                "test_loss": result.loss,
                "test_acc": result.accuracy,
                "epoch_seconds": stats.seconds,
                "samples_per_second": stats.samples_per_second,
                "data_wait_fraction": stats.data_wait_fraction,
                "peak_memory_mb": memory.peak_mb(),
                "threads": torch.get_num_threads(),
            }
            history.append(entry)
            _log(live, entry)
            _report(epoch + 1, train.epochs, entry)
            done = epoch + 1
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
            _pause_for_tests(done)
    except PipelineError as exc:
        # A shard replaced mid-run is detected in the worker that maps it.
        raise unwrap_worker_error(exc) from None

    save_model(model_dir, model, manifest=train_split.manifest, train=train)
    live.end()
    remove_checkpoint(checkpoint_dir)
    return history[-1]
