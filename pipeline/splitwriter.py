"""One split's shards and manifest, written into the temporary folder that becomes the split folder.

:class:`SplitWriter` is the reference path of the ``tensorize`` stage (one process, rows
streamed in order) and of :func:`pipeline.tensorize.write_split`: it gathers rows until a
shard is full, writes it (normalised float32, or the source's uint8 bytes) and counts the
classes and, for the train split, the pixel histogram that every manifest records.
:func:`write_manifest` writes a split's ``manifest.json`` last, from the shards' entries:
the writer's own, or those of the shards the parallel path's workers wrote
(:mod:`pipeline.shardjobs`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.atomic import raise_as_output_error
from pipeline.manifest import MANIFEST_NAME, SCHEMA_VERSION, Manifest, Normalization, PixelStats, ShardEntry
from pipeline.normalize import pixel_histogram
from pipeline.shardjobs import image_chunks
from pipeline.shards import write_shard

SHARD_PATTERN = "shard-{:05d}.safetensors"


class SplitWriter:
    """Collects one split's rows and writes them as shards of ``shard_size`` samples into ``folder``."""

    def __init__(
        self,
        folder: Path,
        target: Path,
        *,
        split: str,
        dataset: str,
        shard_size: int,
        shape: tuple[int, int, int],
        norm: Normalization | None,
        num_classes: int,
        keep_stats: bool,
        dtype: str = "float32",
    ) -> None:
        self.folder, self.target, self.split, self.dataset, self.dtype = folder, target, split, dataset, dtype
        self.shard_size = shard_size
        self.shape, self.norm, self.keep_stats = shape, norm, keep_stats
        self.counts = np.zeros(num_classes, dtype=np.int64)
        self.histogram = np.zeros((shape[0], 256), dtype=np.int64)
        self.entries: list[ShardEntry] = []
        self._pixels: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._held = 0

    def add(self, pixels: np.ndarray, labels: np.ndarray) -> None:
        if not len(labels):
            return
        self.counts += np.bincount(labels, minlength=len(self.counts))
        if self.keep_stats:  # the train split's statistics, which every manifest records
            self.histogram += pixel_histogram(pixels, self.shape[0])
        self._pixels.append(pixels)
        self._labels.append(labels)
        self._held += len(labels)
        while self._held >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, size: int) -> None:
        # A chunk of exactly one shard is written without a copy.
        pixels = self._pixels[0] if len(self._pixels) == 1 else np.concatenate(self._pixels)
        labels = self._labels[0] if len(self._labels) == 1 else np.concatenate(self._labels)
        self._pixels, self._labels = [pixels[size:]], [labels[size:]]
        self._held -= size
        self._write(pixels[:size], labels[:size])

    def _write(self, pixels: np.ndarray, labels: np.ndarray) -> None:
        name = SHARD_PATTERN.format(len(self.entries))
        chunks = image_chunks(pixels, self.norm, self.shape, self.dtype)  # normalised a chunk at a time
        try:
            with open(self.folder / name, "wb") as f:
                size, sha = write_shard(
                    f,
                    chunks,
                    labels.astype(np.int64),
                    self.shape,
                    {"dataset": self.dataset, "split": self.split},
                    self.dtype,
                )
        except OSError as exc:  # named here: the splits' folders are open together, the last would be blamed
            raise_as_output_error(Path(self.target), exc)
            raise
        self.entries.append(ShardEntry(name, len(labels), size, sha))

    def close(self, names: tuple[str, ...], stats: PixelStats, norm: Normalization) -> Manifest:
        """Write the last shard and the manifest, which records ``norm``: the one the shards were
        written with, or, for uint8 shards of ``standard``, the one their own statistics give."""
        if self._held:
            self._flush(self._held)
        return write_manifest(
            self.folder,
            self.target,
            dataset=self.dataset,
            split=self.split,
            names=names,
            counts=self.counts,
            shape=self.shape,
            dtype=self.dtype,
            norm=norm,
            stats=stats,
            entries=self.entries,
        )


def write_manifest(
    folder: Path,
    target: Path,
    *,
    dataset: str,
    split: str,
    names: tuple[str, ...],
    counts: np.ndarray,
    shape: tuple[int, int, int],
    dtype: str,
    norm: Normalization,
    stats: PixelStats,
    entries: list[ShardEntry],
) -> Manifest:
    """Write a split's manifest.json into ``folder`` (the temporary beside ``target``); return it."""
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        dataset=dataset,
        split=split,
        num_samples=sum(e.num_samples for e in entries),
        num_classes=len(names),
        class_names=names,
        class_counts=tuple(int(c) for c in counts),
        image_shape=shape,
        image_dtype=dtype,
        label_dtype="int64",
        normalization=norm,
        train_stats=stats,
        shards=tuple(entries),
    )
    try:
        (folder / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
    except OSError as exc:
        raise_as_output_error(Path(target), exc)
        raise
    return manifest
