"""Parquet -> normalised float32 safetensors shards plus ``manifest.json``, per split.

The shape, the classes and the statistics come from the data and are recorded in
each split's manifest, which is all the trainer reads about them:

- image shape: the image layout's own metadata, or ``data.image_shape`` (null: one
  square grey channel) for the wide layout;
- classes: a built-in dataset's names; integer labels 0..largest (named "0", "1",
  ...); or class names, whose indices follow their sorted order;
- splits: the source's test split, or one held out of train by ``test_fraction``
  when the source has none; a validation split held out of train by
  ``val_fraction`` (:mod:`pipeline.splits`, stable under added samples).

Every split folder is built in a temporary folder beside it and renamed into place,
so a killed run never leaves a folder whose manifest and shards disagree. Rows are
read chunk by chunk and each split keeps at most one shard of uint8 rows, so memory
is bounded by the shard size, not the data.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_dir, raise_as_output_error
from pipeline.errors import DataError
from pipeline.manifest import MANIFEST_NAME, SCHEMA_VERSION, Manifest, Normalization, PixelStats, ShardEntry
from pipeline.normalize import make_normalization, normalize, pixel_histogram, pixel_stats
from pipeline.parquet import IMAGE, Table, iter_rows, open_table, read_labels
from pipeline.shards import write_shard
from pipeline.sources import DATASETS
from pipeline.splits import TEST, TRAIN, VAL, assign, file_keys, hash_unit, row_keys
from pipeline.tabular import INT_LABELS, resolve_shape

SHARD_PATTERN = "shard-{:05d}.safetensors"
_CHUNK_BYTES = 16 << 20  # float32 images held at once while a shard is written
_CODES = {"train": TRAIN, "val": VAL, "test": TEST}


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _class_names(train: Table, test: Table, dataset: str) -> tuple[str, ...]:
    """The classes, from the label columns only (a cheap columnar read)."""
    if train.labels != test.labels and test.rows:
        raise DataError(f"{test.path}: labels are {test.labels}s but the train split's are {train.labels}s")
    train_labels = read_labels(train)
    test_labels = read_labels(test)
    if train.labels == INT_LABELS:
        largest = max(int(train_labels.max(initial=0)), int(test_labels.max(initial=0)))
        if dataset in DATASETS:
            names = DATASETS[dataset].class_names
            if largest >= len(names):
                table = train if int(train_labels.max(initial=0)) == largest else test
                labels = train_labels if table is train else test_labels
                row = int(np.argmax(labels == largest))
                raise DataError(f"{table.path}: row {row + 1}, column 'label': expected 0..{len(names) - 1}, "
                                f"found {largest}")
            return names
        return tuple(str(c) for c in range(largest + 1))
    names = tuple(sorted(set(train_labels.tolist())))
    unknown = sorted(set(test_labels.tolist()) - set(names))
    if unknown:
        row = int(np.flatnonzero(test_labels == unknown[0])[0])
        raise DataError(f"{test.path}: row {row + 1}, column 'label': class {unknown[0]!r} has no train samples; "
                        f"the train split's classes are {', '.join(names)}"[:400])
    return names


def _indices(labels: np.ndarray, names: tuple[str, ...], kind: str) -> np.ndarray:
    if kind == INT_LABELS:
        return labels.astype(np.int64)
    index = {name: i for i, name in enumerate(names)}
    return np.fromiter((index[name] for name in labels.tolist()), dtype=np.int64, count=len(labels))


def _routes(table: Table, rows, labels: np.ndarray, test_fraction: float, val_fraction: float) -> np.ndarray:
    """The split of each train row; no hashing at all when nothing is held out."""
    if not test_fraction and not val_fraction:
        return np.full(len(labels), TRAIN, dtype=np.uint8)
    keys = file_keys(rows.files) if table.layout == IMAGE else row_keys(rows.labels, rows.pixels)
    return assign(hash_unit(keys), test_fraction=test_fraction, val_fraction=val_fraction)


class _SplitWriter:
    """Collects one split's rows and writes them as shards of ``shard_size`` samples into ``folder``."""

    def __init__(self, folder: Path, target: Path, *, split: str, dataset: str, shard_size: int,
                 shape: tuple[int, int, int], norm: Normalization, num_classes: int, keep_stats: bool) -> None:
        self.folder, self.target, self.split, self.dataset = folder, target, split, dataset
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
        rows = max(1, _CHUNK_BYTES // (pixels.shape[1] * 4))  # normalised a chunk at a time, as it is written
        chunks = (normalize(pixels[i : i + rows], self.norm, self.shape) for i in range(0, len(pixels), rows))
        try:
            with open(self.folder / name, "wb") as f:
                size, sha = write_shard(f, chunks, labels.astype(np.int64), self.shape,
                                        {"dataset": self.dataset, "split": self.split})
        except OSError as exc:  # named here: the splits' folders are open together, the last would be blamed
            raise_as_output_error(Path(self.target), exc)
            raise
        self.entries.append(ShardEntry(name, len(labels), size, sha))

    def close(self, names: tuple[str, ...], stats: PixelStats) -> Manifest:
        if self._held:
            self._flush(self._held)
        manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            dataset=self.dataset,
            split=self.split,
            num_samples=sum(e.num_samples for e in self.entries),
            num_classes=len(names),
            class_names=names,
            class_counts=tuple(int(c) for c in self.counts),
            image_shape=self.shape,
            image_dtype="float32",
            label_dtype="int64",
            normalization=self.norm,
            train_stats=stats,
            shards=tuple(self.entries),
        )
        try:
            (self.folder / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
        except OSError as exc:
            raise_as_output_error(Path(self.target), exc)
            raise
        return manifest


def write_split(
    chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    out_dir: Path | str,
    *,
    dataset: str,
    split: str,
    shard_size: int,
    normalization: Normalization,
    image_shape: tuple[int, int, int] = (1, 28, 28),
    class_names: tuple[str, ...] | None = None,
) -> Manifest:
    """Write one split from (uint8 pixel rows, labels) chunks into ``out_dir`` atomically.

    For building shards outside the stage (benchmarks, tests); ``class_names`` defaults to a
    built-in dataset's names, or "0".."9". The manifest's ``train_stats`` are this split's.
    """
    names = class_names or (DATASETS[dataset].class_names if dataset in DATASETS else tuple(map(str, range(10))))
    with atomic_dir(out_dir) as tmp:
        writer = _SplitWriter(tmp, Path(out_dir), split=split, dataset=dataset, shard_size=shard_size, shape=image_shape,
                              norm=normalization, num_classes=len(names), keep_stats=True)
        for pixels, labels in chunks:
            writer.add(pixels, labels.astype(np.int64))
        if not writer.counts.sum():
            raise DataError(f"{split}: no samples to write")
        return writer.close(names, pixel_stats(writer.histogram))


def _image_shape(train: Table, test: Table, image_shape: tuple[int, int, int] | None) -> tuple[int, int, int]:
    if test.rows and (test.layout, test.num_pixels) != (train.layout, train.num_pixels):
        raise DataError(f"{test.path}: expected rows of {train.num_pixels} pixels like the train split, "
                        f"found {test.num_pixels}")
    if train.image_shape is not None:
        return train.image_shape
    return resolve_shape(image_shape, train.num_pixels, str(train.path))


def _train_histogram(train: Table, chunk: int, test_fraction: float, val_fraction: float,
                     channels: int) -> np.ndarray:
    """Pixel histogram of the rows that will train (a first pass, for ``standard`` normalisation)."""
    histogram = np.zeros((channels, 256), dtype=np.int64)
    for rows in iter_rows(train, chunk):
        keep = _routes(train, rows, rows.labels, test_fraction, val_fraction) == TRAIN
        histogram += pixel_histogram(rows.pixels[keep], channels)
    return histogram


def tensorize(
    train_parquet: Path,
    test_parquet: Path,
    train_out: Path,
    test_out: Path,
    val_out: Path | None = None,
    *,
    dataset: str,
    shard_size: int,
    normalize_kind: str,
    image_shape: tuple[int, int, int] | None = None,
    test_fraction: float = 0.1,
    val_fraction: float = 0.0,
    notice: Callable[[str], None] = _stderr,
) -> dict[str, Manifest]:
    """Shard the splits; return their manifests by split name.

    Args:
        train_parquet, test_parquet: the parquet stage's outputs (either layout); an empty test
            file means the source has no test split, so one is held out of train.
        train_out, test_out, val_out: the split folders to write (``val_out`` None: no val split).
        dataset: ``data.dataset``, recorded in the manifests (and naming a built-in's classes).
        shard_size: samples per shard.
        normalize_kind: ``unit`` or ``standard`` (per-channel statistics of the train split).
        image_shape: ``data.image_shape`` for the wide layout (None: square grey).
        test_fraction, val_fraction: held-out shares of the train file (:mod:`pipeline.splits`).
    Returns:
        ``{"train": ..., "val": ..., "test": ...}`` (no ``val`` without ``val_out``).
    """
    train, test = open_table(train_parquet), open_table(test_parquet)
    if train.rows == 0:
        raise DataError(f"{train_parquet}: has no rows; the train split needs samples")
    if val_fraction and val_out is None:
        raise ValueError("val_fraction > 0 needs a val_out folder")
    shape = _image_shape(train, test, image_shape)
    names = _class_names(train, test, dataset)
    test_fraction = test_fraction if test.rows == 0 else 0.0
    if normalize_kind == "standard":
        stats = pixel_stats(_train_histogram(train, shard_size, test_fraction, val_fraction, shape[0]))
    else:
        stats = None  # computed while the train split is written
    norm = make_normalization(normalize_kind, stats, shape[0])
    outs = {"train": train_out, "test": test_out, **({"val": val_out} if val_out is not None else {})}
    with contextlib.ExitStack() as stack:
        writers = {split: _SplitWriter(stack.enter_context(atomic_dir(out)), Path(out), split=split, dataset=dataset,
                                       shard_size=shard_size, shape=shape, norm=norm, num_classes=len(names),
                                       keep_stats=split == "train")
                   for split, out in outs.items()}
        for rows in iter_rows(train, shard_size):
            labels = _indices(rows.labels, names, train.labels)
            routes = _routes(train, rows, rows.labels, test_fraction, val_fraction)
            for split, writer in writers.items():
                take = routes == _CODES[split]
                if take.all():
                    writer.add(rows.pixels, labels)
                elif take.any():
                    writer.add(rows.pixels[take], labels[take])
            del rows
        for rows in iter_rows(test, shard_size):
            writers["test"].add(rows.pixels, _indices(rows.labels, names, train.labels))
        stats = stats or pixel_stats(writers["train"].histogram)
        for split in ("train", "test"):
            if not writers[split].counts.sum():
                raise DataError(f"{train_parquet}: the {split} split would be empty; with few samples raise "
                                f"data.test_fraction or add samples")
        missing = [n for n, c in zip(names, writers["train"].counts) if c == 0]
        if missing:
            notice(f"notice: {len(missing)} class(es) have no train samples: {', '.join(missing)}"[:300])
        return {split: writer.close(names, stats) for split, writer in writers.items()}
