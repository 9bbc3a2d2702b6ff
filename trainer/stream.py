"""Training straight from the DVC remote: fetch ahead in epoch order into a bounded cache, map from there.

A split whose folder is absent from the workspace but tracked by DVC with a
default remote is a :class:`StreamedSplit` (``pipeline.dvcremote``). Its
:class:`StreamedDataset` gathers batches like ``trainer.data.ShardDataset``,
but maps each shard from the local cache (``pipeline.shardcache``), where one
:class:`Fetcher` thread per process puts it first.

The fetch order is the read order: before each pass :class:`PlannedLoader`
lists this rank's batches (the order is a function of ``(train.seed, epoch)``
and the rank, ``trainer.loader``/``trainer.rank_split``) and hands the shards
in order of first use to the fetcher, which keeps ``ahead`` shards
(``loader.prefetch_shards``, default one ``loader.shuffle_window``) beyond the
last one training has touched. With a windowed shuffle the next window is
copied while the current one trains; under DDP each rank plans only the shards
its slices of the batches touch, and the ranks of one machine share the cache
folder (one copies, the others find the file). The bytes a batch gathers are
the ones the manifest names, verified by SHA-256 as they enter the cache (a
file already in the cache is trusted by its content-addressed name and its
size; ``train.verify: full`` hashes it again before its first use), so the
results are those of training on pulled shards; the cache settings change
speed only.

Eviction never removes what training still needs: the fetcher protects the
shards from the current batch's first one up to the next to fetch, and the
dataset unmaps shards it has left, so a deleted file's blocks are freed at once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.dvcremote import RemoteSplit, find_repo_root, open_remote_split
from pipeline.errors import ParamsError, ShardError
from pipeline.manifest import MANIFEST_NAME, Manifest, ShardEntry
from pipeline.params import LoaderParams
from pipeline.shardcache import ShardCache
from pipeline.shards import view_tensors
from trainer.verify import ValidSplit, check_split, validate_shard, validate_split

log = logging.getLogger(__name__)

CACHE_DIR = ".shardcache"  # in the repository root; gitignored and dvcignored
MB = 2**20
EVICTED_RETRIES = 5  # fetches of one shard evicted before it could be mapped, before giving up
WAIT_NOTICE_S = 30.0  # training waiting this long for one shard says so, and again at each doubling


@dataclass(frozen=True)
class StreamedSplit:
    """A split read from the DVC remote: its manifest, and where its shards come from."""

    directory: Path
    manifest: Manifest
    source: RemoteSplit

    @property
    def shards(self) -> tuple[ShardEntry, ...]:
        return self.manifest.shards

    @property
    def num_samples(self) -> int:
        return self.manifest.num_samples


def open_split(split_dir: Path | str, *, expected_split: str, verify: str) -> ValidSplit | StreamedSplit:
    """The split validated in the workspace, or, when it is not there, from the DVC remote."""
    remote = open_remote_split(split_dir)
    if remote is None:
        return validate_split(split_dir, expected_split=expected_split, verify=verify)
    where = f"{remote.relative}/{MANIFEST_NAME} (DVC remote {remote.remote})"
    check_split(remote.manifest, expected_split, where)
    return StreamedSplit(remote.directory, remote.manifest, remote)


def default_cache_dir(split: StreamedSplit) -> Path:
    root = find_repo_root(split.directory)
    return (root or split.directory.parent) / CACHE_DIR


def plan_ahead(loader: LoaderParams, train: StreamedSplit | ValidSplit, limit_bytes: int | None) -> int:
    """Shards to fetch ahead; refuses (one line) a cache limit below one shuffle window of train shards."""
    sizes = sorted((s.bytes for s in train.manifest.shards), reverse=True)
    window = (loader.shuffle_window or len(sizes)) if loader.shuffle else 1
    window = min(window, len(sizes))
    need = sum(sizes[:window])
    if limit_bytes is not None and limit_bytes < need:
        have = f"loader.cache_limit_mb {limit_bytes / MB:g}"
        if window == len(sizes) and window > 1:
            raise ParamsError(
                f"params.yaml: {have} is less than the train split ({need / MB:.1f} MB): a global shuffle "
                "reads every shard in every batch; set loader.shuffle_window (e.g. 2) or raise the limit"
            )
        raise ParamsError(
            f"params.yaml: {have} is less than one loader.shuffle_window of {window} train shards "
            f"({need / MB:.1f} MB); raise it to at least two windows to fetch ahead without stalls"
        )
    return loader.prefetch_shards or window


@dataclass(frozen=True)
class _Item:
    entry: ShardEntry
    source: RemoteSplit


class Fetcher:
    """One background thread copying shards into the cache in plan order, ``ahead`` beyond training."""

    def __init__(self, cache: ShardCache, ahead: int) -> None:
        self.cache = cache
        self.ahead = ahead
        self.wait_seconds = 0.0  # time training waited for a shard
        self._cond = threading.Condition()
        self._plan: list[_Item] = []
        self._pos: dict[str, int] = {}
        self._gen = 0
        self._next = 0  # the next plan index to fetch
        self._consumed = -1  # the furthest plan index training has touched
        self._low = 0  # the first plan index training still needs
        self._mapped: frozenset[str] = frozenset()
        self._urgent: list[_Item] = []
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="shard-fetch", daemon=True)
        self._thread.start()

    def start_plan(self, items: Iterable[_Item]) -> None:
        with self._cond:
            self._plan, self._pos = [], {}
            for item in items:
                if item.entry.sha256 not in self._pos:
                    self._pos[item.entry.sha256] = len(self._plan)
                    self._plan.append(item)
            self._gen += 1
            self._next, self._consumed, self._low = 0, -1, 0
            self._mapped = frozenset()  # the previous pass released its maps (PlannedLoader)
            self._cond.notify_all()

    def position(self, sha: str) -> int:
        return self._pos.get(sha, -1)

    def begin_batch(self, shas: Sequence[str], mapped: Iterable[str]) -> None:
        """Training is about to gather from these shards (in plan order) and still maps ``mapped``."""
        with self._cond:
            positions = [self._pos[s] for s in shas if s in self._pos]
            if positions:
                self._low = min(positions)
                self._consumed = max(self._consumed, max(positions))
            self._mapped = frozenset(mapped)
            self._cond.notify_all()

    def acquire(self, entry: ShardEntry, source: RemoteSplit, mapped: Iterable[str]) -> Path:
        """The shard's cached path; when it is not there, training waits and the fetch becomes urgent.

        A wait of :data:`WAIT_NOTICE_S` is logged, and again at each doubling: a remote that stopped
        answering can hold a copy for long (for SSH, the remote's ``timeout``, 1800 s by default,
        bounds only setting up a connection). An urgent fetch protects only the shard and what
        training still maps, so it always finds room in a cache that holds one window: it may evict
        shards fetched ahead, which then cost a second copy, never a stall without end.
        """
        path = self.cache.lookup(entry)
        if path is not None:
            return path
        start = time.monotonic()
        notice = WAIT_NOTICE_S
        item = _Item(entry, source)
        with self._cond:
            self._mapped = frozenset(mapped)
            self._urgent.append(item)
            self._cond.notify_all()
            try:
                while (path := self.cache.lookup(entry)) is None:
                    if self._error is not None:
                        raise self._error
                    self._cond.wait(0.05)
                    if (waited := time.monotonic() - start) >= notice:  # a stalled remote is not a hang
                        notice *= 2
                        log.warning(
                            "%s",
                            f"training has waited {waited:.0f} s for {source.where(entry)}: the remote "
                            "is slow or not answering (Ctrl-C stops the run, and a rerun resumes it)",
                        )
            finally:
                self._urgent.remove(item)
        self.wait_seconds += time.monotonic() - start
        return path

    def _pick(self) -> tuple[_Item, set[str], int | None] | None:
        """The next copy to make, what it must not evict and the plan generation (None: urgent)."""
        for item in self._urgent:
            if self.cache.lookup(item.entry) is None:
                return item, {u.entry.sha256 for u in self._urgent} | self._mapped, None
        if self._next < len(self._plan) and self._next <= self._consumed + self.ahead:
            # Fetching ahead never evicts the current batch's shards or those fetched ahead of it.
            planned = {it.entry.sha256 for it in self._plan[self._low : self._next + 1]}
            return self._plan[self._next], planned | self._mapped, self._gen
        return None

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (job := self._pick()) is None:
                    self._cond.wait(0.05)
                if self._closed:
                    return
            item, protected, gen = job
            try:
                path = self.cache.put(
                    item.entry, item.source.copy_to, item.source.where(item.entry), protected
                )
            except BaseException as exc:  # handed to training, which raises it
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
                return
            with self._cond:
                if path is None:  # no room beside what training still needs: wait for it to move on
                    self._cond.wait(0.05)
                    continue
                if gen is not None and gen == self._gen and self._plan[self._next] == item:
                    self._next += 1
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=60)


class StreamedDataset:
    """``ShardDataset``'s batch gather over a streamed split, each shard mapped from the cache when needed."""

    def __init__(self, split: StreamedSplit, fetcher: Fetcher, verify: str) -> None:
        self.split = split
        self.fetcher = fetcher
        self.verify = verify
        self.image_shape = tuple(split.manifest.image_shape)
        self.image_dtype = split.manifest.image_dtype
        self._entries = split.manifest.shards
        counts = [s.num_samples for s in self._entries]
        self._starts = np.array([0, *np.cumsum(counts).tolist()], dtype=np.int64)
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        # Content-addressed, verified before the rename: a file validated once keeps its layout.
        self._offsets: dict[str, tuple[int, int]] = {}

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("a streamed dataset is read in the training process only (loader.num_workers 0)")

    def plan(self, batches: Iterable[torch.Tensor]) -> None:
        """Hand the fetcher this pass's shards in order of first use."""
        batches = [b for b in batches if len(b)]
        if not batches:
            return
        shard_of = np.searchsorted(self._starts[1:-1], torch.cat(batches).numpy(), side="right")
        shards, first = np.unique(shard_of, return_index=True)
        order = shards[np.argsort(first, kind="stable")]
        self.fetcher.start_plan(_Item(self._entries[s], self.split.source) for s in order.tolist())

    def release(self) -> None:
        """Unmap every shard: the pass is over, the cache may evict them."""
        self._maps.clear()

    def _mapped_shas(self) -> list[str]:
        return [self._entries[s].sha256 for s in self._maps]

    def _open(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        """Map shard ``s`` from the cache, fetching it first if needed.

        Between finding the file and mapping it, the file may be evicted: by this process's fetcher
        (its protected set is taken when it picks a copy) or by another rank sharing the folder,
        which cannot know what this one needs. A mapping keeps its file's bytes, but until then a
        vanished file is fetched again, like any shard evicted before it was used.
        """
        entry = self._entries[s]
        for _attempt in range(EVICTED_RETRIES):
            path = self.fetcher.acquire(entry, self.split.source, self._mapped_shas())
            try:
                f = open(path, "rb")  # noqa: SIM115 (closed below; the mapping keeps the file)
            except FileNotFoundError:
                continue
            with f:
                try:
                    if entry.sha256 not in self._offsets:
                        valid = validate_shard(path, entry, self.split.manifest, self.verify)
                        self._offsets[entry.sha256] = (valid.images_offset, valid.labels_offset)
                    raw = np.memmap(f, dtype=np.uint8, mode="c")
                except (ShardError, FileNotFoundError):
                    if os.fstat(f.fileno()).st_nlink == 0:  # the file opened above was evicted meanwhile
                        continue
                    raise  # a problem with the file itself
            break
        else:
            raise ShardError(
                f"{path}: evicted from the shard cache {EVICTED_RETRIES} times before it could be mapped; "
                "raise loader.cache_limit_mb"
            )
        images_offset, labels_offset = self._offsets[entry.sha256]
        images, labels = view_tensors(
            raw, images_offset, labels_offset, entry.num_samples, self.image_shape, self.image_dtype
        )
        self._maps[s] = (images.reshape(len(images), -1), labels)
        return self._maps[s]

    def __getitem__(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64).numpy()
        n = int(self._starts[-1])
        if idx.ndim != 1 or (idx.size and (idx.min() < 0 or idx.max() >= n)):
            raise IndexError(f"expected a 1-D batch of sample indices in 0..{n - 1}")
        shard_of = np.searchsorted(self._starts[1:-1], idx, side="right")
        used = sorted(
            np.unique(shard_of).tolist(), key=lambda s: self.fetcher.position(self._entries[s].sha256)
        )
        for s in set(self._maps) - set(used):
            del self._maps[s]  # unmapped: the cache may evict it, and an evicted file's blocks are freed
        self.fetcher.begin_batch([self._entries[s].sha256 for s in used], self._mapped_shas())
        out_images = np.empty((idx.size, int(np.prod(self.image_shape))), dtype=self.image_dtype)
        out_labels = np.empty(idx.size, dtype=np.int64)
        for k, s in enumerate(used):
            if s not in self._maps:
                for gone in used[:k]:  # gathered already: let the cache free them if it must
                    self._maps.pop(gone, None)
            images, labels = self._maps.get(s) or self._open(s)
            positions = np.flatnonzero(shard_of == s)
            local = idx[positions] - self._starts[s]
            out_images[positions] = np.take(images, local, axis=0)
            out_labels[positions] = labels[local]
        return torch.from_numpy(out_images).view(idx.size, *self.image_shape), torch.from_numpy(out_labels)


class PlannedLoader:
    """A loader whose every pass first hands its shard order to the fetcher."""

    def __init__(self, loader: Iterable, batches: Iterable[torch.Tensor], dataset: StreamedDataset) -> None:
        self.loader = loader
        self.batches = batches
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        self.dataset.plan(self.batches)
        try:
            yield from self.loader
        finally:
            self.dataset.release()


def start_fetcher(
    splits: Sequence[ValidSplit | StreamedSplit],
    loader: LoaderParams,
    shard_cache: Path | str | None,
    hook: Callable[[int], None] | None,
) -> Fetcher | None:
    """The fetcher of the streamed splits (None when every split is in the workspace)."""
    streamed = [s for s in splits if isinstance(s, StreamedSplit)]
    if not streamed:
        return None
    limit = None if loader.cache_limit_mb is None else int(loader.cache_limit_mb * 2**20)
    ahead = plan_ahead(loader, splits[0], limit)
    for split in streamed if limit is not None else ():  # said now, not after an epoch of training
        big = max(split.manifest.shards, key=lambda entry: entry.bytes, default=None)
        if big is not None and big.bytes > limit:
            raise ParamsError(
                f"params.yaml: loader.cache_limit_mb {loader.cache_limit_mb:g} is less than the "
                f"{split.manifest.split} split's shard {big.file} ({big.bytes / MB:.1f} MB); raise it"
            )
    folder = Path(shard_cache) if shard_cache is not None else default_cache_dir(streamed[0])
    bound = "no limit" if limit is None else f"limit {loader.cache_limit_mb:g} MB"
    log.info(
        "streaming %s from DVC remote %s into %s (%s, %d shards ahead)",
        ", ".join(s.source.relative for s in streamed),
        streamed[0].source.remote,
        folder,
        bound,
        ahead,
    )
    return Fetcher(ShardCache(folder, limit, on_change=hook), ahead)


def without_workers(loader: LoaderParams) -> LoaderParams:
    """Streaming maps shards in the training process: no loader workers, no device-resident copy."""
    if loader.num_workers:
        log.warning("loader.num_workers ignored: streamed shards are mapped in the training process")
    if loader.device_resident:
        log.warning("loader.device_resident ignored: streamed shards pass through the bounded cache")
    return dataclasses.replace(loader, num_workers=0, persistent_workers=False, device_resident=False)
