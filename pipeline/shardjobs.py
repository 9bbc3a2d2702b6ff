"""The pieces of a parallel tensorize: each reads its own rows of a Parquet split.

:func:`route_piece` reads a range of train rows and says which split each goes to
(and, for ``standard`` statistics, the pixel histogram of those that train);
:func:`write_piece` writes one shard from a list of row indices, reading only the
rows between the first and the last, a chunk at a time, keeping the chosen ones
and streaming them into the shard.
Both take and return a few small values (the :class:`Table` the stage opened,
paths, indices as bytes, a digest), so they run in worker processes
(:mod:`pipeline.pool`) without moving data between processes. A piece does not
open a wide table with Arrow again: Arrow parses and holds the whole footer at every
opening, and a wide file's footer grows with its row groups (``bench/notes.md``).
The piece's own Polars scan still reads the footer once. The shard bytes are those of
the serial path, which routes the same rows in the same order through the same
:func:`image_chunks` and :func:`pipeline.shards.write_shard`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.atomic import raise_as_output_error
from pipeline.manifest import Normalization
from pipeline.normalize import normalize, pixel_histogram
from pipeline.parquet import IMAGE, Rows, Table, iter_rows, read_labels
from pipeline.shards import write_shard
from pipeline.splits import TRAIN, assign, file_keys, hash_unit, row_keys
from pipeline.tabular import INT_LABELS

# A shard's images are made and written this many bytes at a time. A float32 chunk this small is
# still in the core's L2 cache when it is written, and the kernel copies it into the page cache
# several times faster than from memory; uint8 chunks, too, cost the kernel less than whole
# shards written at once (measured at 16x against 16 MiB and whole shards: bench/notes.md).
CHUNK_BYTES = 1 << 20
READ_BYTES = 8 << 20  # uint8 pixels made rows at once while a worker streams its shard's rows


def image_chunks(
    pixels: np.ndarray, norm: Normalization | None, shape: tuple[int, int, int], dtype: str
) -> Iterator[np.ndarray]:
    """A shard's images from uint8 rows [n, C*H*W].

    Normalised float32 a chunk at a time, or (``dtype`` uint8) the bytes as they are, which need no
    normalization (``norm`` may be None: it is recorded in the manifest, for the trainer), in
    chunks of at most ``CHUNK_BYTES``.
    The float32 chunks are views of one buffer, each overwritten by the next: a consumer writes
    each chunk out before it asks for the next (as :func:`pipeline.shards.write_shard` does).
    """
    if dtype == "uint8":
        rows = max(1, CHUNK_BYTES // pixels.shape[1])
        for i in range(0, len(pixels), rows):
            yield pixels[i : i + rows].reshape(-1, *shape)
        return
    if norm is None:
        raise ValueError("float32 shards need their normalization before they are written")
    rows = max(1, CHUNK_BYTES // (pixels.shape[1] * 4))
    buffer = np.empty(min(rows, len(pixels)) * pixels.shape[1], dtype=np.float32)
    for i in range(0, len(pixels), rows):
        yield normalize(pixels[i : i + rows], norm, shape, out=buffer)


def label_indices(labels: np.ndarray, names: tuple[str, ...], kind: str) -> np.ndarray:
    """Class indices (int64) of a label column: the integers, or each name's position in ``names``."""
    if kind == INT_LABELS:
        return labels.astype(np.int64)
    index = {name: i for i, name in enumerate(names)}
    return np.fromiter((index[name] for name in labels.tolist()), dtype=np.int64, count=len(labels))


def _read_rows(table: Table) -> int:
    """Rows a worker decodes at once: ``READ_BYTES`` of pixels, so its memory does not grow with its piece."""
    return max(1, READ_BYTES // table.num_pixels)


def routes(table: Table, rows: Rows, test_fraction: float, val_fraction: float) -> np.ndarray:
    """The split of each train row; no hashing at all when nothing is held out."""
    if not test_fraction and not val_fraction:
        return np.full(len(rows.pixels), TRAIN, dtype=np.uint8)
    keys = file_keys(rows.files) if table.layout == IMAGE else row_keys(rows.labels, rows.pixels)
    return assign(hash_unit(keys), test_fraction=test_fraction, val_fraction=val_fraction)


@dataclass(frozen=True)
class RoutePiece:
    """Train rows ``start..stop`` of ``table`` to route."""

    table: Table
    start: int
    stop: int
    test_fraction: float
    val_fraction: float
    channels: int
    histogram: bool  # count the train rows' pixels (only ``standard`` statistics need them first)


def route_piece(piece: RoutePiece) -> tuple[bytes, list[list[int]]]:
    """(the uint8 split code of each row, as bytes; the [C][256] histogram of the rows that train,
    all zeros unless ``piece.histogram``)."""
    table = piece.table
    codes, histogram = [], np.zeros((piece.channels, 256), dtype=np.int64)
    hashed = bool(piece.test_fraction or piece.val_fraction)  # only the row keys need the labels
    for rows in iter_rows(table, _read_rows(table), piece.start, piece.stop, labels=hashed):
        code = routes(table, rows, piece.test_fraction, piece.val_fraction)
        if piece.histogram:
            histogram += pixel_histogram(rows.pixels[code == TRAIN], piece.channels)
        codes.append(code)
        del rows  # not held while the next rows are decoded
    return np.concatenate(codes).tobytes(), histogram.tolist()


@dataclass(frozen=True)
class ShardPiece:
    """One shard to write: rows ``indices`` (int64 bytes, ascending) of ``table`` into ``folder/name``."""

    table: Table
    indices: bytes
    folder: str
    target: str  # the split folder the user sees, named when writing fails
    name: str
    split: str
    dataset: str
    shape: tuple[int, int, int]
    norm: Normalization | None  # None: uint8 shards whose statistics this very pass counts
    class_names: tuple[str, ...]
    dtype: str
    histogram: bool  # count its pixels: the train split's statistics, when no earlier pass counted them


@dataclass(frozen=True)
class ShardDone:
    """What the manifest needs of a written shard: its split, file, size, digest, class counts and
    the histogram of its pixels (all zeros unless asked for)."""

    split: str
    name: str
    num_samples: int
    size: int
    sha256: str
    histogram: list[list[int]]
    class_counts: list[int]


def _chosen_pixels(table: Table, wanted: np.ndarray) -> Iterator[np.ndarray]:
    """uint8 pixels of rows ``wanted`` (ascending), in order, a read of the span they lie in at a time."""
    start = int(wanted[0])
    for rows in iter_rows(table, _read_rows(table), start, int(wanted[-1]) + 1, labels=False):
        stop = start + len(rows.pixels)
        take = wanted[np.searchsorted(wanted, start) : np.searchsorted(wanted, stop)] - start
        if len(take) == len(rows.pixels):
            yield rows.pixels
        elif len(take):
            yield rows.pixels[take]
        start = stop
        del rows  # a view keeps the whole row group alive: not while the next one is decoded


def write_piece(piece: ShardPiece) -> ShardDone:
    """Write one shard; return its manifest entry's values and its pixel histogram.

    The labels come first in a shard, so they are read first (one column, cheap); the pixels
    then stream from the source to the file a read at a time, so a worker's memory does not
    grow with the shard.
    """
    table = piece.table
    wanted = np.frombuffer(piece.indices, dtype=np.int64)
    span = read_labels(table, int(wanted[0]), int(wanted[-1]) + 1)
    labels = label_indices(span[wanted - wanted[0]], piece.class_names, table.labels)
    histogram = np.zeros((piece.shape[0], 256), dtype=np.int64)

    def images() -> Iterator[np.ndarray]:
        for pixels in _chosen_pixels(table, wanted):
            if piece.histogram:
                histogram[:] += pixel_histogram(pixels, piece.shape[0])
            yield from image_chunks(pixels, piece.norm, piece.shape, piece.dtype)
            del pixels  # may view a whole row group: let it go before the next is decoded

    try:
        with open(Path(piece.folder) / piece.name, "wb") as f:
            meta = {"dataset": piece.dataset, "split": piece.split}
            size, sha = write_shard(f, images(), labels, piece.shape, meta, piece.dtype)
            f.flush()
            os.fsync(f.fileno())  # durable here, beside the other workers, not later in the stage
    except OSError as exc:
        raise_as_output_error(Path(piece.target), exc)
        raise
    counts = np.bincount(labels, minlength=len(piece.class_names)).tolist()
    return ShardDone(piece.split, piece.name, len(labels), size, sha, histogram.tolist(), counts)
