"""Parquet -> safetensors shards plus ``manifest.json``, per split: normalised float32, or the source's uint8
bytes with their normalization recorded for the trainer (``prep.shard_dtype``).

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
is bounded by the shard size, not the data. With one worker the rows stream through
each split's :class:`pipeline.splitwriter.SplitWriter`; with more, each shard is a
piece for a worker (:mod:`pipeline.shardjobs`). The bytes are the same either way.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_dir
from pipeline.errors import DataError
from pipeline.manifest import Manifest, Normalization, PixelStats, ShardEntry
from pipeline.normalize import make_normalization, pixel_stats
from pipeline.parquet import Table, iter_rows, open_table, read_labels
from pipeline.pool import Workers, resolve_workers
from pipeline.shardjobs import (
    RoutePiece,
    ShardPiece,
    label_indices,
    route_piece,
    routes,
    write_piece,
)
from pipeline.sources import DATASETS
from pipeline.splits import TEST, TRAIN, VAL
from pipeline.splitwriter import SHARD_PATTERN, SplitWriter, write_manifest
from pipeline.tabular import INT_LABELS, resolve_shape

log = logging.getLogger(__name__)

_CODES = {"train": TRAIN, "val": VAL, "test": TEST}


def _int_class_names(train: Table, test: Table, dataset: str) -> tuple[str, ...]:
    """0..largest label, or a built-in dataset's names; the statistics say the largest label
    without reading the columns, which are read only to name the row of a label out of range."""
    stats = [t.largest_label for t in (train, test) if t.rows]
    if None in stats:
        labels = [read_labels(t) for t in (train, test)]
        stats = [int(x.max()) for x in labels if len(x)]
    largest = max(stats, default=0)
    if dataset not in DATASETS:
        return tuple(str(c) for c in range(largest + 1))
    names = DATASETS[dataset].class_names
    if largest >= len(names):
        for table in (train, test):
            labels = read_labels(table)
            if len(labels) and int(labels.max()) == largest:
                row = int(np.argmax(labels == largest))
                raise DataError(
                    f"{table.path}: row {row + 1}, column 'label': expected 0..{len(names) - 1}, "
                    f"found {largest}"
                )
    return names


def _class_names(train: Table, test: Table, dataset: str) -> tuple[str, ...]:
    """The classes, from the label columns only (a cheap columnar read, or the files' statistics)."""
    if train.labels != test.labels and test.rows:
        raise DataError(f"{test.path}: labels are {test.labels}s but the train split's are {train.labels}s")
    if train.labels == INT_LABELS:
        return _int_class_names(train, test, dataset)
    train_labels = read_labels(train)
    test_labels = read_labels(test)
    names = tuple(sorted(set(train_labels.tolist())))
    unknown = sorted(set(test_labels.tolist()) - set(names))
    if unknown:
        row = int(np.flatnonzero(test_labels == unknown[0])[0])
        raise DataError(
            f"{test.path}: row {row + 1}, column 'label': class {unknown[0]!r} has no train samples; "
            f"the train split's classes are {', '.join(names)}"[:400]
        )
    return names


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
    shard_dtype: str = "float32",
) -> Manifest:
    """Write one split from (uint8 pixel rows, labels) chunks into ``out_dir`` atomically.

    For building shards outside the stage (benchmarks, tests); ``class_names`` defaults to a
    built-in dataset's names, or "0".."9". The manifest's ``train_stats`` are this split's.
    ``shard_dtype``: ``float32`` normalised values or ``uint8`` source bytes.
    """
    names = class_names or (
        DATASETS[dataset].class_names if dataset in DATASETS else tuple(map(str, range(10)))
    )
    with atomic_dir(out_dir) as tmp:
        writer = SplitWriter(
            tmp,
            Path(out_dir),
            split=split,
            dataset=dataset,
            shard_size=shard_size,
            shape=image_shape,
            norm=normalization,
            num_classes=len(names),
            keep_stats=True,
            dtype=shard_dtype,
        )
        for pixels, labels in chunks:
            writer.add(pixels, labels.astype(np.int64))
        if not writer.counts.sum():
            raise DataError(f"{split}: no samples to write")
        return writer.close(names, pixel_stats(writer.histogram), normalization)


def _image_shape(train: Table, test: Table, image_shape: tuple[int, int, int] | None) -> tuple[int, int, int]:
    if test.rows and (test.layout, test.num_pixels) != (train.layout, train.num_pixels):
        raise DataError(
            f"{test.path}: expected rows of {train.num_pixels} pixels like the train split, "
            f"found {test.num_pixels}"
        )
    if train.image_shape is not None:
        return train.image_shape
    return resolve_shape(image_shape, train.num_pixels, str(train.path))


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
    shard_dtype: str = "float32",
    workers: int | None = 1,
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
        shard_dtype: ``float32`` (normalised values) or ``uint8`` (the source bytes; the manifest's
            normalisation is applied by the trainer).
        workers: processes writing shards in parallel (None: every core); the bytes never depend on it.
    Returns:
        ``{"train": ..., "val": ..., "test": ...}`` (no ``val`` without ``val_out``).

    Raises:
        DataError: the Parquet files do not fit together (labels, shapes), a split would be empty,
            or a test class is unknown to train.
        ValueError: ``val_fraction`` > 0 without ``val_out``.
    """
    if val_fraction and val_out is None:
        raise ValueError("val_fraction > 0 needs a val_out folder")
    # Opened first, so the workers start (an interpreter importing Polars each) while this
    # process reads the files' metadata and the labels.
    with Workers(resolve_workers(workers), preload=(write_piece.__module__,)) as pool:
        train, test = open_table(train_parquet), open_table(test_parquet)
        if train.rows == 0:
            raise DataError(f"{train_parquet}: has no rows; the train split needs samples")
        shape = _image_shape(train, test, image_shape)
        names = _class_names(train, test, dataset)
        test_fraction = test_fraction if test.rows == 0 else 0.0
        outs = {"train": train_out, "test": test_out, **({"val": val_out} if val_out is not None else {})}
        run = _serial if pool.workers == 1 else _parallel
        return run(
            train,
            test,
            outs,
            dataset=dataset,
            names=names,
            shape=shape,
            shard_size=shard_size,
            normalize_kind=normalize_kind,
            test_fraction=test_fraction,
            val_fraction=val_fraction,
            dtype=shard_dtype,
            pool=pool,
        )


def _check_sizes(train: Table, sizes: dict[str, int]) -> None:
    for split in ("train", "test"):
        if not sizes[split]:
            raise DataError(
                f"{train.path}: the {split} split would be empty; with few samples raise "
                f"data.test_fraction or add samples"
            )


def _check_train_classes(train: Table, names: tuple[str, ...], train_counts: np.ndarray) -> None:
    """At least two classes with train samples (a classifier of one class learns nothing, and its
    test accuracy reads 1.0); a notice names the classes without any."""
    have = [n for n, c in zip(names, train_counts) if c]
    if len(have) < 2:
        raise DataError(
            f"{train.path}: the train split holds samples of {len(have)} class ({', '.join(have)}); "
            "expected at least 2 classes"
        )
    missing = [n for n, c in zip(names, train_counts) if c == 0]
    if missing:
        log.info("%s", f"{len(missing)} class(es) have no train samples: {', '.join(missing)}"[:292])


def _serial(
    train: Table,
    test: Table,
    outs: dict[str, Path],
    *,
    dataset: str,
    names: tuple[str, ...],
    shape: tuple[int, int, int],
    shard_size: int,
    normalize_kind: str,
    test_fraction: float,
    val_fraction: float,
    dtype: str,
    pool: Workers,
) -> dict[str, Manifest]:
    """One pass in this process: rows are streamed and routed to the splits' writers (the reference path)."""
    if _first_pass_statistics(normalize_kind, dtype):  # the rows that will train, counted first
        _, histogram = _train_codes(train, shard_size, test_fraction, val_fraction, shape[0], True, pool)
        stats = pixel_stats(histogram)
    else:
        stats = None  # computed while the train split is written
    norm = _one_pass_norm(normalize_kind, stats, shape[0])
    with contextlib.ExitStack() as stack:
        writers = {
            split: SplitWriter(
                stack.enter_context(atomic_dir(out)),
                Path(out),
                split=split,
                dataset=dataset,
                shard_size=shard_size,
                shape=shape,
                norm=norm,
                num_classes=len(names),
                keep_stats=split == "train",
                dtype=dtype,
            )
            for split, out in outs.items()
        }
        for rows in iter_rows(train, shard_size):
            labels = label_indices(rows.labels, names, train.labels)
            codes = routes(train, rows, test_fraction, val_fraction)
            for split, writer in writers.items():
                take = codes == _CODES[split]
                if take.all():
                    writer.add(rows.pixels, labels)
                elif take.any():
                    writer.add(rows.pixels[take], labels[take])
            del rows
        for rows in iter_rows(test, shard_size):
            writers["test"].add(rows.pixels, label_indices(rows.labels, names, train.labels))
        stats = stats or pixel_stats(writers["train"].histogram)
        norm = norm or make_normalization(normalize_kind, stats, shape[0])
        _check_sizes(train, {split: int(w.counts.sum()) for split, w in writers.items()})
        _check_train_classes(train, names, writers["train"].counts)
        return {split: writer.close(names, stats, norm) for split, writer in writers.items()}


def _first_pass_statistics(normalize_kind: str, dtype: str) -> bool:
    """Whether the train rows' statistics are needed before any shard is written: only float32
    shards of ``standard`` normalization hold values made from them. uint8 shards hold the source
    bytes whatever the statistics, so theirs are counted while the shards are written, in the
    same pass (one decode of the pixels instead of two)."""
    return normalize_kind == "standard" and dtype == "float32"


def _one_pass_norm(normalize_kind: str, stats: PixelStats | None, channels: int) -> Normalization | None:
    """The normalization known before the shards are written; None when it waits for their statistics."""
    if normalize_kind == "standard" and stats is None:
        return None
    return make_normalization(normalize_kind, stats, channels)


def _train_codes(
    train: Table,
    shard_size: int,
    test_fraction: float,
    val_fraction: float,
    channels: int,
    need_histogram: bool,
    pool: Workers,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Each train row's split code, and the train rows' pixel histogram (None: not needed, not read)."""
    if not test_fraction and not val_fraction and not need_histogram:
        return np.full(train.rows, TRAIN, dtype=np.uint8), None
    pieces = (
        RoutePiece(
            train,
            start,
            min(start + shard_size, train.rows),
            test_fraction,
            val_fraction,
            channels,
            need_histogram,
        )
        for start in range(0, train.rows, shard_size)
    )
    codes, histogram = [], np.zeros((channels, 256), dtype=np.int64)
    for raw, part in pool.map(route_piece, pieces):
        codes.append(np.frombuffer(raw, dtype=np.uint8))
        histogram += np.asarray(part, dtype=np.int64)
    return np.concatenate(codes), histogram if need_histogram else None


def _rows_of(codes: np.ndarray, code: int) -> np.ndarray | range:
    """The rows whose split code is ``code``, ascending: a range when every row has it (nothing held
    out of train, the usual case), so the stage holds no index that grows with the data."""
    chosen = codes == code
    if len(codes) and bool(chosen.all()):
        return range(len(codes))
    return np.flatnonzero(chosen)


def _index_bytes(rows: np.ndarray | range) -> bytes:
    """A piece's row indices as int64 bytes."""
    if isinstance(rows, range):
        return np.arange(rows.start, rows.stop, dtype=np.int64).tobytes()
    return rows.astype(np.int64, copy=False).tobytes()


def _parallel(
    train: Table,
    test: Table,
    outs: dict[str, Path],
    *,
    dataset: str,
    names: tuple[str, ...],
    shape: tuple[int, int, int],
    shard_size: int,
    normalize_kind: str,
    test_fraction: float,
    val_fraction: float,
    dtype: str,
    pool: Workers,
) -> dict[str, Manifest]:
    """Every shard a piece for a worker: each split's rows are chosen first (a pass over the rows
    only when splits are held out or statistics are needed), then each shard is written from its
    rows, and comes back with its class counts and (train shards, unless the first pass counted
    them already) its pixel histogram."""
    with contextlib.ExitStack() as stack:
        folders = {split: stack.enter_context(atomic_dir(out)) for split, out in outs.items()}
        # One pool for both passes, shut down (its running pieces finished) before the folders
        # close, so that no worker writes into a folder being committed or discarded.
        stack.callback(pool.close)
        codes, histogram = _train_codes(
            train,
            shard_size,
            test_fraction,
            val_fraction,
            shape[0],
            _first_pass_statistics(normalize_kind, dtype),
            pool,
        )
        norm = _one_pass_norm(normalize_kind, None if histogram is None else pixel_stats(histogram), shape[0])
        rows = {split: (train, _rows_of(codes, _CODES[split])) for split in outs}
        if test.rows:
            rows["test"] = (test, range(test.rows))
        del codes
        _check_sizes(train, {split: len(index) for split, (_, index) in rows.items()})
        pieces = (  # made as the pool takes them: the main process holds each split's rows only
            ShardPiece(
                table,
                _index_bytes(index[k : k + shard_size]),
                str(folders[split]),
                str(outs[split]),
                SHARD_PATTERN.format(k // shard_size),
                split,
                dataset,
                shape,
                norm,
                names,
                dtype,
                split == "train" and histogram is None,
            )
            for split, (table, index) in rows.items()
            for k in range(0, len(index), shard_size)
        )
        entries: dict[str, list[ShardEntry]] = {split: [] for split in outs}
        counts = {split: np.zeros(len(names), dtype=np.int64) for split in outs}
        train_histogram = np.zeros((shape[0], 256), dtype=np.int64)
        for done in pool.map(write_piece, pieces):
            entries[done.split].append(ShardEntry(done.name, done.num_samples, done.size, done.sha256))
            counts[done.split] += np.asarray(done.class_counts, dtype=np.int64)
            if done.split == "train":
                train_histogram += np.asarray(done.histogram, dtype=np.int64)
        _check_train_classes(train, names, counts["train"])
        stats = pixel_stats(train_histogram if histogram is None else histogram)  # the same train rows
        norm = norm or make_normalization(normalize_kind, stats, shape[0])
        return {
            split: write_manifest(
                folders[split],
                Path(out),
                dataset=dataset,
                split=split,
                names=names,
                counts=counts[split],
                shape=shape,
                dtype=dtype,
                norm=norm,
                stats=stats,
                entries=entries[split],
            )
            for split, out in outs.items()
        }
