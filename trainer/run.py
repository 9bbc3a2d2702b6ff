"""The train stage's one library call: validate the data, train (resuming if possible), log, save.

:func:`train` reads top to bottom as the steps of a run: check the inputs,
join the process group and take the checkpoint lock, set threads, build the
loaders and the model, resume from a checkpoint if one matches
(``trainer.resume``), rebuild DVCLive from its history, train epoch by epoch
(``trainer.epoch``: checkpoints at step boundaries and epoch ends), export the
model and drop the checkpoint.

Checkpoints: every ``train.checkpoint_every`` epochs, and mid-epoch at the
first step boundary ``train.checkpoint_seconds`` after the last one
(``trainer.boundary``). A resume continues at the next global batch; with the
same number of processes it ends bit-identical to an uninterrupted run. A
checkpoint that cannot be written is a one-line warning: training goes on.
A non-finite loss stops the run (exit 2) before anything of it is written.

Several processes (``train.processes > 1``, or a user's own ``torchrun``):
:func:`train_in_processes` starts the group through the elastic agent; each
rank runs :func:`train`, trains on its slice of every global batch
(``trainer.rank_split``) and evaluates its slice of the test set; the epoch's
sums are all-reduced, so every metric covers all samples (timings and memory:
the maximum over ranks). Rank 0 alone reads and writes the checkpoint,
DVCLive and the model; on a resume it broadcasts the restored state, so the
other ranks (on other machines too) need no access to the checkpoint folder.
A checkpoint from another number of processes resumes too (elastic), with a
notice: the global batches are the same, float sums are ordered differently.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch

from pipeline.atomic import write_bytes_atomic
from pipeline.errors import ParamsError, PipelineError
from pipeline.params import LoaderParams, TrainParams
from trainer import distributed
from trainer.allocator import retain_freed_memory
from trainer.boundary import CheckpointTimer, NonFiniteLoss
from trainer.checkpoint import (
    RunShape,
    fingerprint,
    remove_checkpoint,
)
from trainer.data import ShardDataset
from trainer.device_norm import DeviceNormalizer
from trainer.epoch import (
    Run,
    Split,
    checkpoint_at_epoch_end,
    confusion_side,
    export,
    test_confusion,
    train_epoch,
)
from trainer.livelog import LiveLog
from trainer.loader import (
    LoaderSettings,
    make_loader,
    resolve_settings,
    split_sampler,
    unwrap_worker_error,
)
from trainer.lock import LOCK_HELD_ENV, checkpoint_lock
from trainer.model import ARCHITECTURE, SimpleCNN, check_input_size
from trainer.position import Position
from trainer.precision import bf16_cpu_notice, check_precision, machine, make_precision
from trainer.rank_split import RankBatches
from trainer.resume import check_same_run_everywhere, resume_everywhere
from trainer.stream import (
    Fetcher,
    PlannedLoader,
    StreamedDataset,
    StreamedSplit,
    open_split,
    start_fetcher,
    without_workers,
)
from trainer.verify import check_compatible

log = logging.getLogger(__name__)

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
MACHINE_METRICS = frozenset(
    {"epoch_seconds", "samples_per_second", "data_wait_fraction", "peak_memory_mb", "threads"}
)
# Set by train_in_processes for its ranks: where rank 0 leaves the message of a non-finite stop.
STOP_FILE_ENV = "TRAINER_STOP_FILE"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ParamsError(
            "train.device: expected a usable CUDA device for 'cuda', found none (use 'auto' or 'cpu')"
        )
    return torch.device(name)


def metric_names(has_val: bool) -> tuple[str, ...]:
    """The metrics every epoch logs: :data:`METRICS`, plus :data:`VAL_METRICS` with a validation split."""
    return METRICS + VAL_METRICS if has_val else METRICS


def _report(epoch: int, epochs: int, m: dict[str, float]) -> None:
    print(
        f"epoch {epoch}/{epochs}: train_loss {m['train_loss']:.4f}  test_loss {m['test_loss']:.4f}  "
        f"test_acc {m['test_acc']:.4f}  "
        + (f"val_loss {m['val_loss']:.4f}  val_acc {m['val_acc']:.4f}  " if "val_loss" in m else "")
        + f"{m['epoch_seconds']:.2f} s  {m['samples_per_second']:.0f} samples/s  "
        f"data wait {m['data_wait_fraction']:.1%}  peak {m['peak_memory_mb']:.0f} MB",
        flush=True,
    )


def check_inputs(
    train_dir: Path | str, test_dir: Path | str, train: TrainParams, val_dir: Path | str | None = None
) -> tuple[torch.device, Split, Split, Split | None]:
    """Device and the splits, checked before anything is built (and before any process is started).

    The validation split is None when ``val_dir`` is None or holds no samples. A split folder
    absent from the workspace is read from the DVC remote (``trainer.stream``).
    """
    device = resolve_device(train.device)
    check_precision(train.precision, device)
    train_split = open_split(train_dir, expected_split="train", verify=train.verify)
    check_input_size(train_split.manifest.image_shape, str(Path(train_dir) / "manifest.json"))
    test_split = open_split(test_dir, expected_split="test", verify=train.verify)
    check_compatible(train_split, test_split)
    val_split = None
    if val_dir is not None:
        val_split = open_split(val_dir, expected_split="val", verify=train.verify)
        check_compatible(train_split, val_split)
        if val_split.num_samples == 0:
            val_split = None
    return device, train_split, test_split, val_split


def train_in_processes(
    args: Sequence[str],
    *,
    train_dir: Path | str,
    test_dir: Path | str,
    checkpoint_dir: Path | str,
    train: TrainParams,
    val_dir: Path | str | None = None,
    module: str = "stages.train",
) -> int:
    """Run ``python -m module args`` as ``train.processes`` ranks under torchrun.

    Inputs and GPUs are checked here first, so a user error is one line and
    exit 2 instead of every rank failing (and being restarted) alike. The
    checkpoint lock is held here, across the agent's restarts of the group.
    A non-finite loss stops every rank at the same step; they end without
    error (a restart would fail again at the same step) and rank 0 leaves
    the message in :data:`STOP_FILE_ENV`'s file, raised here.

    Args:
        args: the stage's own arguments, passed on to every rank.
        train_dir, test_dir, val_dir: the split folders, checked here before any rank starts.
        checkpoint_dir: the checkpoint folder, locked here for the whole run.
        train: the ``train`` section (``processes``, ``max_restarts``, the device).
        module: what each rank runs.

    Returns:
        The torchrun agent's exit code (0: every rank finished); otherwise an error is logged.

    Raises:
        NonFiniteLoss: the loss stopped being finite; the message names the epoch and step.
        PipelineError: the inputs, params or GPUs are unusable, or the checkpoint is locked.
    """
    device, *_ = check_inputs(train_dir, test_dir, train, val_dir)
    distributed.check_gpus(device, train.processes)
    with checkpoint_lock(checkpoint_dir) as token, tempfile.TemporaryDirectory() as tmp:
        stop_file = Path(tmp) / "stopped"
        code = distributed.run_torchrun(
            module,
            args,
            processes=train.processes,
            max_restarts=train.max_restarts,
            env={LOCK_HELD_ENV: token, STOP_FILE_ENV: str(stop_file)},
        )
        if stop_file.exists():
            raise NonFiniteLoss(stop_file.read_text(encoding="utf-8"))
    if code != 0:
        log.error(
            "the %d training processes failed (torchrun exit %d, train.max_restarts %d); "
            "see their output above",
            train.processes,
            code,
            train.max_restarts,
        )
    return code


@contextlib.contextmanager
def _only_rank_0_speaks(group: distributed.Group) -> Iterator[None]:
    """On the other ranks, notices and warnings (every rank would repeat them) are dropped; errors stay."""
    if group.is_main:
        yield
        return
    loggers = [logging.getLogger(name) for name in ("pipeline", "trainer")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextlib.contextmanager
def _lock_on_rank_0(group: distributed.Group, checkpoint_dir: Path | str) -> Iterator[None]:
    """Rank 0 holds the checkpoint lock, or checks that its launcher does (the token in LOCK_HELD_ENV)."""
    if not group.is_main:
        yield
        return
    with checkpoint_lock(checkpoint_dir, token=os.environ.get(LOCK_HELD_ENV)):
        yield


def _set_threads(group: distributed.Group, train: TrainParams) -> RunShape:
    """Set this rank's intra-op threads; the count is part of what a checkpoint must match (CPU only)."""
    threads = distributed.threads(group, train.threads)
    if threads is not None:
        torch.set_num_threads(threads)
    return RunShape(
        group.world_size,
        torch.get_num_threads() if group.device.type == "cpu" else None,
        machine(group.device),
    )


def build_model(train: TrainParams, train_split: Split, device: torch.device) -> SimpleCNN:
    """The model, sized from the manifest (image shape, classes), initialised from ``train.seed``."""
    torch.manual_seed(train.seed)
    return SimpleCNN(*train_split.manifest.image_shape, train_split.manifest.num_classes).to(device)


def train(
    *,
    train_dir: Path | str,
    test_dir: Path | str,
    model_dir: Path | str,
    checkpoint_dir: Path | str,
    live_dir: Path | str,
    loader: LoaderParams,
    train: TrainParams,
    val_dir: Path | str | None = None,
    shard_cache: Path | str | None = None,
    cache_hook: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Train SimpleCNN on the shard folders, resuming from a matching checkpoint; export the model.

    Every rank of a torchrun group calls this; rank 0 alone writes the model, DVCLive and the
    checkpoints, and alone logs notices. Each epoch is evaluated and logged; the checkpoint of an
    interrupted run resumes only into the same trajectory (fingerprint), else training starts over
    with a notice. On success the checkpoint folder is removed.

    Args:
        train_dir, test_dir: shard folders written by the tensorize stage.
        model_dir: output folder for ``model.safetensors`` and ``model.json``.
        checkpoint_dir: folder for resumable checkpoints (not a DVC output).
        live_dir: the DVCLive folder (``metrics.json``, ``plots/metrics``, and the final model's
            test-split confusion matrix in ``plots/custom``).
        loader: the ``loader`` section.
        train: the ``train`` section.
        val_dir: a val split folder; with samples in it every epoch also logs ``val_loss`` and
            ``val_acc``.
        shard_cache: the cache folder of splits absent from the workspace, which stream from the
            DVC remote (default ``.shardcache`` in the repository).
        cache_hook: called with the cache's bytes on disk after every change (tests, benchmarks).

    Returns:
        The last epoch's metrics, over all ranks (:data:`METRICS`, plus :data:`VAL_METRICS`);
        ``{}`` on a rank that stopped with the group on a non-finite loss.

    Raises:
        PipelineError: unusable inputs or params (ParamsError, ShardError), an output that cannot
            be written (OutputError), or a locked checkpoint folder; one line each.
        NonFiniteLoss: the loss or the weights stopped being finite (a single process).
    """
    device, train_split, test_split, val_split = check_inputs(train_dir, test_dir, train, val_dir)
    # A checkpoint folder reached through a link (on another disk, say) is written where it points: the
    # atomic replacement of the folder would otherwise replace the link, and the lock (taken on the
    # resolved path) would move with it.
    checkpoint_dir = Path(os.path.realpath(checkpoint_dir))
    splits = [s for s in (train_split, test_split, val_split) if s is not None]
    fetcher = start_fetcher(splits, loader, shard_cache, cache_hook)
    if fetcher is not None:
        loader = without_workers(loader)
    group = distributed.join(device)
    caller_threads = torch.get_num_threads()  # train.threads is this run's, not the caller's from now on
    loaders = contextlib.ExitStack()  # the loaders, closed (their workers joined) however the run ends
    try:
        with _lock_on_rank_0(group, checkpoint_dir), _only_rank_0_speaks(group):
            if group.world_size > 1:
                log.info(
                    "rank 0 of %d processes runs on %s: it alone writes %s, %s and %s",
                    group.world_size,
                    socket.gethostname(),
                    model_dir,
                    live_dir,
                    checkpoint_dir,
                )
            shape = _set_threads(group, train)
            # Rank 0 alone times the matmuls: it alone speaks, and ranks timing at once would share the cores.
            slow_bf16 = bf16_cpu_notice(train.precision, device) if group.is_main else None
            if slow_bf16:
                log.info("%s", slow_bf16)
            retain_freed_memory()  # every rank: no per-step page faults (trainer/allocator.py)

            # Data: the global batch order is EpochBatchSampler's; each rank takes its slice.
            settings = resolve_settings(loader, device)
            train_batches = RankBatches(
                split_sampler(train_split, settings, train.seed, train=True), group.rank, group.world_size
            )
            test_batches = RankBatches(
                split_sampler(test_split, settings, train.seed, train=False), group.rank, group.world_size
            )
            val_loader = None
            if val_split is not None:
                val_batches = RankBatches(
                    split_sampler(val_split, settings, train.seed, train=False), group.rank, group.world_size
                )
                val_loader = _loader(val_split, val_batches, settings, fetcher, train.verify, loaders)
            metrics = metric_names(val_loader is not None)

            # Model and optimizer, then whatever a matching checkpoint restores into them.
            model = build_model(train, train_split, device)
            optimizer = torch.optim.Adam(model.parameters(), lr=train.lr)
            run = Run(
                group,
                train,
                model,
                model,
                optimizer,
                train_batches,
                _loader(train_split, train_batches, settings, fetcher, train.verify, loaders),
                _loader(test_split, test_batches, settings, fetcher, train.verify, loaders),
                val_loader,
                settings.pin_memory and device.type == "cuda",
                fingerprint(
                    train,
                    loader,
                    device,
                    train_split.manifest,
                    test_split.manifest,
                    ARCHITECTURE,
                    val_manifest=val_split.manifest if val_split is not None else None,
                ),
                shape,
                checkpoint_dir,
                DeviceNormalizer(train_split.manifest.normalization, device),
                make_precision(train.precision, device),
            )
            check_same_run_everywhere(run)
            position, history = resume_everywhere(run, metrics, train.epochs)
            # After the resume: DDP broadcasts rank 0's parameters when it wraps the model.
            run = dataclasses.replace(run, trained=distributed.wrap(model, group))
            live = LiveLog(live_dir, metrics, history) if group.is_main else None

            timer = CheckpointTimer(train.checkpoint_seconds)
            classes = confusion_side(train_split.manifest.num_classes)
            confusion = None
            try:
                for epoch in range(position.epoch, train.epochs):
                    start = position if epoch == position.epoch else Position(epoch)
                    last = epoch == train.epochs - 1
                    entry, confusion = train_epoch(run, epoch, start, timer, history, classes if last else 0)
                    history.append(entry)
                    done = epoch + 1
                    if live is not None:
                        live.log(entry)
                        _report(done, train.epochs, entry)
                    checkpoint_at_epoch_end(run, done, timer, history)
            except PipelineError as exc:
                # A shard replaced mid-run is detected in the worker that maps it.
                raise unwrap_worker_error(exc) from None

            if confusion is None and classes:  # resumed after the last epoch: a pass of its own
                confusion = test_confusion(run, classes)
            if group.is_main:
                export(run, model_dir, train_split, history)
                live.confusion(confusion, train_split.manifest.class_names)
                live.end()
                _drop_checkpoint(checkpoint_dir)
            return history[-1]
    except NonFiniteLoss as exc:
        stop_file = os.environ.get(STOP_FILE_ENV)
        if not (group.launched and stop_file):
            raise
        if group.is_main:
            write_bytes_atomic(stop_file, str(exc).encode("utf-8"))
        return {}
    finally:
        loaders.close()
        if fetcher is not None:
            fetcher.close()
            st = fetcher.cache.stats
            log.info(
                "shard cache %s: fetched %d shards (%.1f MB), %d evicted, peak %.1f MB; "
                "training waited %.1f s for shards",
                fetcher.cache.folder,
                st.fetches,
                st.fetched_bytes / 2**20,
                st.evictions,
                st.peak_bytes / 2**20,
                fetcher.wait_seconds,
            )
        torch.set_num_threads(caller_threads)
        distributed.leave(group)


def _loader(
    split: Split,
    batches: RankBatches,
    settings: LoaderSettings,
    fetcher: Fetcher | None,
    verify: str,
    loaders: contextlib.ExitStack,
) -> Iterable:
    """The split's loader, registered in ``loaders`` to be closed (its workers joined) with the run."""
    if isinstance(split, StreamedSplit):
        assert fetcher is not None
        dataset = StreamedDataset(split, fetcher, verify)
        made = PlannedLoader(make_loader(dataset, batches, settings), batches, dataset)  # type: ignore[arg-type]
    else:
        made = make_loader(ShardDataset(split), batches, settings)
    if callable(getattr(made, "close", None)):  # PrefetchedBatches: the worker processes
        loaders.callback(made.close)
    return made


def _drop_checkpoint(checkpoint_dir: Path | str) -> None:
    """After a completed run; one left behind would only be resumed into the same result."""
    try:
        remove_checkpoint(checkpoint_dir)
    except OSError as exc:
        log.warning(
            "%s: could not remove the finished run's checkpoint (%s)", checkpoint_dir, exc.strerror or exc
        )
