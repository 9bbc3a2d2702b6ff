"""A batch-indexed Dataset over memory-mapped, validated shards.

Each process maps the shard files itself, on first access, copy-on-write
(``np.memmap(mode="c")``): pages come from the shared page cache, nothing is
read into a private copy, and a stray write could never reach the file. The
object pickles to paths and offsets only (``__getstate__`` drops the maps), so
spawn-started DataLoader workers never receive data through a pipe.

``dataset[indices]`` takes a whole batch of indices and returns
``(images [k, C, H, W], labels int64 [k])`` in the given order, with one
gather per shard the batch touches, so the DataLoader runs with
``batch_size=None`` and no per-sample ``__getitem__`` + collate. Images come
in the manifest's ``image_dtype``: float32, or the uint8 source bytes, which
the training loop normalises on its device (``trainer.device_norm``).

:meth:`ShardDataset.prefetch` is what loader workers do (``trainer.prefetch``):
it reads one byte of every page a batch's samples lie on, so the pages are in
the page cache when the main process gathers the batch.
"""

from __future__ import annotations

import mmap
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.errors import ShardError
from pipeline.shards import view_tensors
from trainer.verify import ValidShard, ValidSplit, still_same


def _map_raw(shard: ValidShard) -> np.ndarray:
    still_same(shard)
    raw = np.memmap(shard.path, dtype=np.uint8, mode="c")
    if raw.shape[0] != shard.size:
        raise ShardError(f"{shard.path}: mapped {raw.shape[0]} bytes, validated {shard.size}")
    return raw


def page_points(offset: int, item_bytes: int, local: np.ndarray) -> np.ndarray:
    """File offsets, one on every page that items ``local`` of a tensor at ``offset`` lie on (some twice).

    Each item's first byte, every page-size step after it, and its last byte:
    no page of the item is skipped, and no sorting or de-duplication is spent.
    """
    steps = np.append(np.arange(0, item_bytes, mmap.PAGESIZE), item_bytes - 1)
    return ((offset + local * item_bytes)[:, None] + steps[None, :]).reshape(-1)


class ShardDataset(Dataset):
    """All samples of one split, indexed globally in manifest shard order."""

    def __init__(self, split: ValidSplit) -> None:
        self.split = split
        self.image_shape = tuple(split.manifest.image_shape)
        self.image_dtype = split.manifest.image_dtype
        counts = [s.num_samples for s in split.shards]
        self._starts = np.array([0, *np.cumsum(counts).tolist()], dtype=np.int64)
        self._raw: list[np.ndarray] | None = None
        self._maps: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._arrays: list[tuple[np.ndarray, np.ndarray]] | None = None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_raw"] = None
        state["_maps"] = None
        state["_arrays"] = None
        return state

    def _open(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._maps is None:
            self._raw = [_map_raw(s) for s in self.split.shards]
            # Offsets were checked to be aligned to the item size and inside the file, so
            # these are zero-copy views of the mappings.
            views = [
                view_tensors(
                    raw, s.images_offset, s.labels_offset, s.num_samples, self.image_shape, self.image_dtype
                )
                for raw, s in zip(self._raw, self.split.shards)
            ]
            self._maps = [(torch.from_numpy(images), torch.from_numpy(labels)) for images, labels in views]
            # The same views flattened per sample, for the multi-shard gather.
            self._arrays = [(images.reshape(len(images), -1), labels) for images, labels in views]
        return self._maps

    def _checked(self, indices: torch.Tensor | np.ndarray) -> np.ndarray:
        """The indices as a 1-D int64 array, each in range (NumPy only: forked loader workers run it)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1:
            raise IndexError(f"expected a 1-D tensor of sample indices, found shape {list(idx.shape)}")
        n = int(self._starts[-1])
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise IndexError(f"sample index out of range 0..{n - 1}")
        return idx

    def prefetch(self, indices: torch.Tensor | np.ndarray) -> int:
        """Bring the pages of these samples (images and labels) into the page cache; bytes read."""
        idx = self._checked(indices)
        self._open()
        shard_of = np.searchsorted(self._starts[1:-1], idx, side="right")
        item_bytes = int(np.prod(self.image_shape)) * np.dtype(self.image_dtype).itemsize
        read = 0
        for s in np.unique(shard_of):
            local = idx[shard_of == s] - self._starts[s]
            shard, raw = self.split.shards[s], self._raw[s]  # type: ignore[index]
            points = np.concatenate(
                [
                    page_points(shard.images_offset, item_bytes, local),
                    page_points(shard.labels_offset, 8, local),
                ]
            )
            raw[points].sum()  # the read is what faults the pages in
            read += points.size
        return read

    def __getitem__(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self._checked(indices)
        maps = self._open()
        if len(maps) == 1:
            images, labels = maps[0]
            indices = torch.from_numpy(idx)
            return images.index_select(0, indices), labels.index_select(0, indices)
        # A batch touches every shard; NumPy's fancy indexing carries far less
        # per-call overhead than the equivalent torch ops, which keeps the whole
        # gather within a few times memcpy (see bench/results.md).
        shard_of = np.searchsorted(self._starts[1:-1], idx, side="right")
        out_images = np.empty((idx.size, int(np.prod(self.image_shape))), dtype=self.image_dtype)
        out_labels = np.empty(idx.size, dtype=np.int64)
        for s in np.unique(shard_of):
            positions = np.flatnonzero(shard_of == s)
            local = idx[positions] - self._starts[s]
            images, labels = self._arrays[s]  # type: ignore[index]
            out_images[positions] = np.take(images, local, axis=0)
            out_labels[positions] = labels[local]
        return torch.from_numpy(out_images).view(idx.size, *self.image_shape), torch.from_numpy(out_labels)
