"""A batch-indexed Dataset over memory-mapped, validated shards.

Each process maps the shard files itself, on first access, copy-on-write
(``np.memmap(mode="c")``): pages come from the shared page cache, nothing is
read into a private copy, and a stray write could never reach the file. The
object pickles to paths and offsets only (``__getstate__`` drops the maps), so
spawn-started DataLoader workers never receive data through a pipe.

``dataset[indices]`` takes a whole batch of indices and returns
``(images float32 [k, C, H, W], labels int64 [k])`` in the given order, with
one gather per shard the batch touches, so the DataLoader runs with
``batch_size=None`` and no per-sample ``__getitem__`` + collate.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.errors import ShardError
from pipeline.shards import view_tensors
from trainer.verify import ValidShard, ValidSplit, still_same


def _map_shard(shard: ValidShard, image_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    still_same(shard)
    raw = np.memmap(shard.path, dtype=np.uint8, mode="c")
    if raw.shape[0] != shard.size:
        raise ShardError(f"{shard.path}: mapped {raw.shape[0]} bytes, validated {shard.size}")
    # Offsets were checked to be aligned to the item size and inside the file, so
    # these are zero-copy views of the mapping.
    images, labels = view_tensors(raw, shard.images_offset, shard.labels_offset, shard.num_samples, image_shape)
    return torch.from_numpy(images), torch.from_numpy(labels)


class ShardDataset(Dataset):
    """All samples of one split, indexed globally in manifest shard order."""

    def __init__(self, split: ValidSplit) -> None:
        self.split = split
        self.image_shape = tuple(split.manifest.image_shape)
        counts = [s.num_samples for s in split.shards]
        self._starts = np.array([0, *np.cumsum(counts).tolist()], dtype=np.int64)
        self._maps: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._arrays: list[tuple[np.ndarray, np.ndarray]] | None = None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = None
        state["_arrays"] = None
        return state

    def _open(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._maps is None:
            self._maps = [_map_shard(s, self.image_shape) for s in self.split.shards]
            # NumPy views of the same mappings, for the multi-shard gather.
            self._arrays = [(images.numpy().reshape(len(images), -1), labels.numpy()) for images, labels in self._maps]
        return self._maps

    def __getitem__(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        indices = torch.as_tensor(indices, dtype=torch.int64)
        if indices.ndim != 1:
            raise IndexError(f"expected a 1-D tensor of sample indices, found shape {list(indices.shape)}")
        idx = indices.numpy()
        n = int(self._starts[-1])
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"sample index out of range 0..{n - 1}")
        maps = self._open()
        if len(maps) == 1:
            images, labels = maps[0]
            return images.index_select(0, indices), labels.index_select(0, indices)
        # A batch touches every shard; NumPy's fancy indexing carries far less
        # per-call overhead than the equivalent torch ops, which keeps the whole
        # gather within a few times memcpy (see bench/results.md).
        shard_of = np.searchsorted(self._starts[1:-1], idx, side="right")
        out_images = np.empty((idx.size, int(np.prod(self.image_shape))), dtype=np.float32)
        out_labels = np.empty(idx.size, dtype=np.int64)
        for s in np.unique(shard_of):
            positions = np.flatnonzero(shard_of == s)
            local = idx[positions] - self._starts[s]
            images, labels = self._arrays[s]  # type: ignore[index]
            out_images[positions] = np.take(images, local, axis=0)
            out_labels[positions] = labels[local]
        return torch.from_numpy(out_images).view(idx.size, *self.image_shape), torch.from_numpy(out_labels)
