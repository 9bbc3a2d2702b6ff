"""Batch order and DataLoader construction.

The order of samples is decided here, in the main process, by a generator
seeded from ``(train.seed, epoch)``: workers only gather the index batches they
are handed. Batch composition, and so every result, is therefore the same for
any ``num_workers``, ``persistent_workers``, ``pin_memory``,
``prefetch_factor`` or ``device_resident``; those settings change speed only.

``device_resident`` replaces the DataLoader by :class:`DeviceResidentBatches`:
the whole split is copied to the training device once and each batch is one
``index_select`` there, in the sampler's order (the airbench approach: on a
GPU no batch crosses the bus; on the CPU the values are the same floats the
memory-mapped gather returns, so results are bit-identical). A uint8 split
stays uint8 there, a quarter of the memory; the loop normalises each batch.

With ``num_workers`` > 0 the workers prefetch pages and the main process
gathers (:class:`trainer.prefetch.PrefetchedBatches`): a batch gathered in a
worker would cost more to carry over than to gather.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.errors import PipelineError
from trainer.data import ShardDataset
from trainer.prefetch import PrefetchedBatches

if TYPE_CHECKING:  # only a type here: the loader runs where pydantic is absent (benchmarks/gpu.py)
    from pipeline.params import LoaderParams
    from trainer.verify import ValidSplit

log = logging.getLogger(__name__)


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for one epoch's permutation, independent across (seed, epoch) pairs."""
    digest = hashlib.sha256(f"shuffle/{seed}/{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def epoch_order(
    shard_sizes: Sequence[int], *, shuffle: bool, seed: int, epoch: int, window: int | None = None
) -> torch.Tensor:
    """The order in which one epoch visits the samples (int64 global indices, manifest shard order).

    ``window=None`` (or at least the number of shards) is one global permutation.
    With a window of W shards the shards are permuted first, then the samples of
    each run of W consecutive shards (in that permuted order) are permuted among
    themselves, so an epoch reads W shards at a time from disk. One generator,
    seeded by ``(seed, epoch)``, draws everything.
    """
    sizes = [int(s) for s in shard_sizes]
    if not sizes or min(sizes) < 0 or sum(sizes) < 1:
        raise ValueError(f"need shard sizes >= 0 with at least one sample, got {sizes}")
    if window is not None and window < 1:
        raise ValueError(f"need a shuffle window >= 1 or None, got {window}")
    total = sum(sizes)
    if not shuffle:
        return torch.arange(total)
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    if window is None or window >= len(sizes):
        return torch.randperm(total, generator=generator)
    starts = [0, *itertools.accumulate(sizes)]
    shards = torch.randperm(len(sizes), generator=generator).tolist()
    parts = []
    for first in range(0, len(shards), window):
        members = torch.cat([torch.arange(starts[s], starts[s + 1]) for s in shards[first : first + window]])
        parts.append(members[torch.randperm(len(members), generator=generator)])
    return torch.cat(parts)


class EpochBatchSampler(Sampler[torch.Tensor]):
    """Yields int64 index tensors of ``batch_size`` (the last may be shorter), in :func:`epoch_order`.

    ``set_epoch(epoch, start)`` skips the epoch's first ``start`` batches (a
    resume from a mid-epoch checkpoint): the order is a function of
    ``(seed, epoch)`` alone, so the rest of the epoch is exactly what an
    uninterrupted run sees. The length is what remains of the epoch.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        shard_sizes: Sequence[int] | None = None,
        shuffle_window: int | None = None,
    ) -> None:
        if num_samples < 1 or batch_size < 1:
            raise ValueError(f"need num_samples >= 1 and batch_size >= 1, got {num_samples} and {batch_size}")
        shard_sizes = [num_samples] if shard_sizes is None else list(shard_sizes)
        if sum(shard_sizes) != num_samples:
            raise ValueError(f"shard sizes {shard_sizes} do not add up to num_samples {num_samples}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.shard_sizes = tuple(shard_sizes)
        self.shuffle_window = shuffle_window
        self.epoch = 0
        self.start = 0

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.batches_per_epoch:
            raise ValueError(f"start batch {start} outside 0..{self.batches_per_epoch}")
        self.epoch = epoch
        self.start = start

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start

    def __iter__(self) -> Iterator[torch.Tensor]:
        order = epoch_order(
            self.shard_sizes,
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=self.epoch,
            window=self.shuffle_window,
        )
        # Clones, so a batch sent to a worker does not drag the whole permutation along.
        for batch in order.split(self.batch_size)[self.start :]:
            yield batch.clone()


@dataclasses.dataclass(frozen=True)
class LoaderSettings:
    """LoaderParams after resolving what PyTorch would reject on this machine."""

    batch_size: int
    shuffle: bool
    num_workers: int
    persistent_workers: bool
    pin_memory: bool
    prefetch_factor: int | None
    shuffle_window: int | None = None
    resident_device: torch.device | None = None  # set: loader.device_resident, the split lives there


def split_sampler(
    split: ValidSplit, settings: LoaderSettings, seed: int, *, train: bool
) -> EpochBatchSampler:
    """The batch order of one split: the train split's shuffled over its shards as ``settings`` say
    (``loader.shuffle``, ``loader.shuffle_window``), an evaluation split's in file order."""
    if not train:
        return EpochBatchSampler(split.num_samples, settings.batch_size, shuffle=False, seed=seed)
    return EpochBatchSampler(
        split.num_samples,
        settings.batch_size,
        shuffle=settings.shuffle,
        seed=seed,
        shard_sizes=[s.num_samples for s in split.shards],
        shuffle_window=settings.shuffle_window,
    )


def resolve_settings(params: LoaderParams, device: torch.device) -> LoaderSettings:
    """Drop settings that do not apply (one notice each, logged) instead of letting DataLoader raise.

    Args:
        params: the ``loader`` section of params.yaml.
        device: where the model runs (pinning only helps an accelerator).

    Returns:
        The settings :func:`make_loader` uses.
    """
    persistent, prefetch, pin = params.persistent_workers, params.prefetch_factor, params.pin_memory
    if params.num_workers == 0:
        if persistent:
            log.info("loader.persistent_workers ignored: it needs loader.num_workers > 0")
            persistent = False
        if prefetch is not None:
            log.info("loader.prefetch_factor ignored: it needs loader.num_workers > 0")
            prefetch = None
    if pin and device.type != "cuda":
        log.info("loader.pin_memory ignored: the model runs on %s, not an accelerator", device.type)
        pin = False
    if params.device_resident:
        if params.num_workers > 0:
            log.info(
                "loader.num_workers ignored: with loader.device_resident each batch is one index "
                "operation on the device, in the main process"
            )
        # Nothing is loaded per batch, so nothing to pin or prefetch.
        return LoaderSettings(
            params.batch_size,
            params.shuffle,
            0,
            False,
            False,
            None,
            params.shuffle_window,
            resident_device=device,
        )
    return LoaderSettings(
        params.batch_size,
        params.shuffle,
        params.num_workers,
        persistent,
        pin,
        prefetch,
        params.shuffle_window,
    )


def unwrap_worker_error(exc: PipelineError) -> PipelineError:
    """A project error raised in a worker, without the worker traceback DataLoader wraps it in."""
    text = str(exc)
    marker = f"{type(exc).__name__}: "
    if text.startswith(f"Caught {type(exc).__name__} in DataLoader worker") and marker in text:
        return type(exc)(text.rsplit(marker, 1)[1].strip())
    return exc


def resident_too_big(split: object, needed: int, device: torch.device) -> str:
    return (
        f"loader.device_resident: {split} ({needed / 2**30:.2f} GiB) does not fit on {device}; "
        "set loader.device_resident false to load batches from the memory-mapped shards"
    )


def check_resident_fits(split: object, needed: int, free: int, device: torch.device) -> None:
    """Refuse, in one line, a split larger than the device's free memory, before copying it there
    (instead of CUDA's out-of-memory traceback half-way through the copy)."""
    if needed > free:
        raise PipelineError(f"{resident_too_big(split, needed, device)} ({free / 2**30:.2f} GiB free)")


class DeviceResidentBatches:
    """The whole split copied once to ``device``; iterating yields the sampler's batches, gathered there."""

    def __init__(self, dataset: Dataset, sampler: EpochBatchSampler, device: torch.device) -> None:
        images, labels = dataset[torch.arange(len(dataset))]  # type: ignore[arg-type]
        split = getattr(getattr(dataset, "split", None), "directory", "the split")
        needed = images.nbytes + labels.nbytes
        if device.type == "cuda":
            check_resident_fits(split, needed, torch.cuda.mem_get_info(device)[0], device)
        try:
            self.images = images.to(device)
            self.labels = labels.to(device)
        except torch.OutOfMemoryError as exc:  # free memory was enough, but not in one piece
            raise PipelineError(
                f"{resident_too_big(split, needed, device)}: {str(exc).splitlines()[0]}"
            ) from None
        self.sampler = sampler
        self.device = device

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = list(self.sampler)
        # One host-to-device copy of the epoch's order, not one per batch.
        order = torch.cat(batches).to(self.device)
        for indices in order.split([len(b) for b in batches]):
            yield self.images.index_select(0, indices), self.labels.index_select(0, indices)


def make_loader(
    dataset: Dataset, sampler: EpochBatchSampler, settings: LoaderSettings
) -> DataLoader | DeviceResidentBatches | PrefetchedBatches:
    if settings.resident_device is not None:
        return DeviceResidentBatches(dataset, sampler, settings.resident_device)
    if settings.num_workers > 0 and isinstance(dataset, ShardDataset):
        return PrefetchedBatches(
            dataset,
            sampler,
            num_workers=settings.num_workers,
            persistent_workers=settings.persistent_workers,
            prefetch_factor=settings.prefetch_factor,
            pin_memory=settings.pin_memory,
        )
    return DataLoader(
        dataset,
        sampler=sampler,
        batch_size=None,  # the sampler yields whole batches; the dataset gathers them at once
        num_workers=settings.num_workers,
        pin_memory=settings.pin_memory,
        persistent_workers=settings.persistent_workers,
        prefetch_factor=settings.prefetch_factor,
    )
