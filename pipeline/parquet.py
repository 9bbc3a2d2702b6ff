"""The Parquet files of the data stages, written and read in one place.

Two layouts (:mod:`pipeline.tabular` defines the columns):

- **wide**, from a CSV: ``label`` (UInt16, or String for class names) and one UInt8
  column per pixel, ``pixel1..pixelN``. Column-wise compression suits small images:
  each pixel position compresses on its own.
- **image**, from an image folder: ``label`` (String), ``file`` (String) and
  ``pixels`` (fixed-size binary of ``C*H*W`` bytes), with the shape in the file's
  key-value metadata ``image_shape``: thousands of columns would not suit
  larger images.

Writing (CSV -> wide Parquet) runs in bounded memory: the file is read in blocks of
whole lines, each parsed and checked by Polars with a strict schema
(:mod:`pipeline.csvblocks`, which also names the row and column of a bad cell in
bounded time), and Arrow's ``ParquetWriter`` receives one row group of
``row_group_size`` rows at a time. Reading (:func:`open_table`, :func:`iter_rows`)
checks the schema and yields uint8 pixel rows chunk by chunk.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import atomic_file
from pipeline.csvblocks import Schema, parsed_blocks
from pipeline.csvcheck import MAX_HEADER_BYTES, check_header
from pipeline.errors import DataError
from pipeline.imagedecode import decoded_batches
from pipeline.images import image_shape_of, read_listing
from pipeline.pool import read_ahead, resolve_workers
from pipeline.tabular import ARROW_CODEC, INT_LABELS, LABEL, NAME_LABELS, SHAPE_KEY, label_kind, pixel_columns

WIDE = "wide"
IMAGE = "image"


def _arrow_schema(schema: Schema) -> pa.Schema:
    label = pa.uint16() if schema.labels == INT_LABELS else pa.string()
    return pa.schema(
        [pa.field(LABEL, label), *(pa.field(c, pa.uint8()) for c in pixel_columns(schema.num_pixels))]
    )


def _write_row_groups(
    frames: Iterable[pl.DataFrame],
    out: Path,
    schema: pa.Schema,
    *,
    compression: str,
    compression_level: int | None,
    row_group_size: int,
) -> int:
    """Write ``frames`` as row groups of ``row_group_size`` rows; returns the row count."""
    rows = 0
    pending: list[pl.DataFrame] = []  # fewer than row_group_size rows
    pending_rows = 0

    def write(group: pl.DataFrame) -> None:
        table = group.to_arrow()
        writer.write_table(
            table if table.schema == schema else table.cast(schema), row_group_size=row_group_size
        )

    with pq.ParquetWriter(
        out,
        schema,
        compression=ARROW_CODEC.get(compression, compression),
        compression_level=compression_level,
    ) as writer:
        for df in frames:
            while pending_rows + df.height >= row_group_size:
                take = row_group_size - pending_rows
                pending.append(df.slice(0, take))
                df = df.slice(take)
                # One contiguous buffer per column: Arrow writes many small chunks far slower. The
                # parsed blocks are dropped before the row group is encoded, so one copy is alive.
                group = pl.concat(pending, rechunk=True)
                pending, pending_rows = [], 0
                write(group)
                rows += group.height
                del group
            if df.height:
                pending.append(df)
                pending_rows += df.height
        if pending_rows:
            write(pl.concat(pending, rechunk=True))
            rows += pending_rows
    return rows


def csv_to_parquet(
    csv_path: Path,
    out_path: Path,
    *,
    compression: str,
    compression_level: int | None,
    row_group_size: int,
    allow_empty: bool = False,
    workers: int | None = 1,
) -> int:
    """Convert one canonical CSV to the wide layout (one uint8 column per pixel), atomically.

    With ``workers`` > 1 the next row group's blocks are parsed in a thread while Arrow encodes
    the current one (its encoder runs on one core), at most one row group ahead.

    Args:
        csv_path: the csv stage's output (``label,pixel1..pixelN``).
        out_path: the Parquet file to write; nothing is left there on failure.
        compression: the Parquet codec (``prep.compression``).
        compression_level: the codec's level (None: its default).
        row_group_size: rows per row group, the unit later stages read.
        allow_empty: a header without rows is a valid, empty split (a source without a test split).
        workers: threads (None: every core); the file's bytes do not depend on it.

    Returns:
        The number of rows written.

    Raises:
        DataError: the CSV is empty, malformed or has a value out of range; the message names the
            line and column.
    """
    try:
        with open(csv_path, "rb") as f:
            header = f.readline(MAX_HEADER_BYTES + 1)
            if not header.strip():
                raise DataError(f"{csv_path}: file is empty; expected a header line label,pixel1..pixelN")
            # The header may name the pixels as it likes, be quoted, or carry a BOM;
            # the values are read by position.
            names = check_header(header, str(csv_path))
            first = f.readline(MAX_HEADER_BYTES + 1)
    except OSError as exc:
        raise DataError(f"{csv_path}: cannot read: {exc}") from None
    schema = Schema(len(names) - 1, label_kind(first.split(b",", 1)[0]) if first.strip() else INT_LABELS)
    blocks = parsed_blocks(csv_path, len(header), schema)
    if resolve_workers(workers) > 1:
        blocks = read_ahead(blocks, lambda df: df.height, row_group_size)
    with atomic_file(out_path) as tmp:  # an OSError here (disk full) becomes an OutputError
        rows = _write_row_groups(
            blocks,
            tmp,
            _arrow_schema(schema),
            compression=compression,
            compression_level=compression_level,
            row_group_size=row_group_size,
        )
        if rows == 0 and not allow_empty:
            raise DataError(f"{csv_path}: has a header but no data rows")
    return rows


# uint8 pixels of a wide row group decoded at once (a block of columns). Decoding a block holds
# two to three times its bytes (Polars' buffers and frame, the NumPy copy), and Polars' allocator
# keeps those pages a while after, so blocks are small; more of them cost no measurable time
# (bench/notes.md).
DECODE_BYTES = 1 << 20
_MAX_GROUP_BYTES = 64 << 20  # pixels held per image row group, whatever row_group_size says


def _image_schema(image_shape: tuple[int, int, int]) -> pa.Schema:
    return pa.schema(
        [
            pa.field(LABEL, pa.string()),
            pa.field("file", pa.string()),
            pa.field("pixels", pa.binary(int(np.prod(image_shape)))),
        ],
        metadata={SHAPE_KEY: json.dumps(list(image_shape)).encode()},
    )


def images_to_parquet(
    listing_csv: Path,
    images_dir: Path,
    out: Path,
    *,
    image_shape: tuple[int, int, int] | None,
    compression: str,
    compression_level: int | None,
    row_group_size: int,
    workers: int | None = 1,
) -> int:
    """Decode every image of a listing into one Parquet file (image layout), atomically.

    At most one row group of pixels is held, and a row group holds at most 64 MiB of pixels
    whatever ``row_group_size`` says, so memory stays bounded for large images too.

    Args:
        listing_csv: the csv stage's ``label,file`` listing.
        images_dir: the folder the listing's paths are relative to.
        out: the Parquet file to write; nothing is left there on failure.
        image_shape: convert and resize every image to this (C, H, W); None keeps the images as
            they are (one size and mode, the first image's), and then an empty listing is refused,
            having no shape to record.
        compression: the Parquet codec (``prep.compression``).
        compression_level: the codec's level (None: its default).
        row_group_size: images per row group, capped by the 64 MiB bound.
        workers: decoding threads or processes (None: one per core; pipeline.imagedecode); the
            file's bytes do not depend on it.

    Returns:
        The number of rows (images) written.

    Raises:
        DataError: an image cannot be read, or does not match the others (without ``image_shape``).
    """
    entries = read_listing(listing_csv)
    shape = image_shape_of(entries, images_dir, image_shape, str(listing_csv))
    schema = _image_schema(shape)
    width = schema.field("pixels").type.byte_width
    rows = max(1, min(row_group_size, _MAX_GROUP_BYTES // width))
    with (
        atomic_file(out) as tmp,
        pq.ParquetWriter(
            tmp,
            schema,
            compression=ARROW_CODEC.get(compression, compression),
            compression_level=compression_level,
        ) as writer,
    ):
        for batch, pixels in decoded_batches(
            entries, images_dir, shape, image_shape is not None, rows, resolve_workers(workers)
        ):
            blob = pa.FixedSizeBinaryArray.from_buffers(
                schema.field("pixels").type, len(batch), [None, pa.py_buffer(pixels)]
            )  # no copy of the pixels
            table = pa.table(
                [
                    pa.array([e.label for e in batch], pa.string()),
                    pa.array([e.file for e in batch], pa.string()),
                    blob,
                ],
                schema=schema,
            )
            writer.write_table(table, row_group_size=rows)
    return len(entries)


# ---------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Table:
    """A checked Parquet split: its layout, size and label kind."""

    path: Path
    layout: str  # WIDE or IMAGE
    rows: int
    num_pixels: int
    labels: str  # INT_LABELS or NAME_LABELS
    image_shape: tuple[int, int, int] | None  # from the file (image layout); None: from the params
    group_rows: tuple[int, ...]  # rows of each row group, so a read needs no second parse of the footer
    largest_label: int | None  # integer labels: the largest, from the row groups' statistics; None: unknown

    @functools.cached_property
    def scan(self) -> pl.LazyFrame:
        """One Polars scan for every read of this table: Polars parses the footer once per scan."""
        return pl.scan_parquet(self.path)

    def __getstate__(self) -> dict[str, object]:
        """A table sent to a worker process leaves its scan behind: the worker makes its own."""
        return {k: v for k, v in self.__dict__.items() if k != "scan"}


@dataclass(frozen=True)
class Rows:
    """A chunk of rows in file order: uint8 pixels [k, C*H*W], labels (uint16, or str objects), file names."""

    pixels: np.ndarray
    labels: np.ndarray | None  # None: not read (``iter_rows(..., labels=False)``, wide layout)
    files: list[str] | None  # image layout: each row's path in the image folder


def _image_shape(meta: dict[bytes, bytes] | None, width: int, where: str) -> tuple[int, int, int]:
    try:
        shape = json.loads((meta or {})[SHAPE_KEY])
        c, h, w = (int(d) for d in shape)
    except (KeyError, ValueError, TypeError) as exc:
        raise DataError(f"{where}: key-value metadata image_shape: expected [C, H, W], found {exc}") from None
    if c * h * w != width:
        raise DataError(f"{where}: image_shape {[c, h, w]} does not match pixels of {width} bytes")
    return (c, h, w)


def open_table(path: Path) -> Table:
    """Check a Parquet split's schema (either layout) and describe what it holds.

    Args:
        path: a Parquet file written by this stage (wide or image layout).

    Returns:
        Its :class:`Table`: layout, row count, image shape and label kind.

    Raises:
        DataError: the file is unreadable or its schema is neither layout.
    """
    try:
        file = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: cannot read Parquet: {exc}") from None
    schema, rows = file.schema_arrow, file.metadata.num_rows
    groups = tuple(file.metadata.row_group(g).num_rows for g in range(file.metadata.num_row_groups))
    largest = _largest_label(file.metadata)
    names = schema.names
    if not names or names[0] != LABEL:
        raise DataError(
            f"{path}: column 1: expected 'label', found {names[0] if names else '<no columns>'!r}"
        )
    label = schema.field(LABEL).type
    if pa.types.is_string(label) or pa.types.is_large_string(label):
        labels = NAME_LABELS
    elif label in (pa.uint8(), pa.uint16()):
        labels = INT_LABELS
    else:
        raise DataError(f"{path}: column 'label': expected UInt16 or String, found {label}")
    if names[1:] == ["file", "pixels"] and pa.types.is_fixed_size_binary(schema.field("pixels").type):
        width = schema.field("pixels").type.byte_width
        shape = _image_shape(schema.metadata, width, str(path))
        return Table(path, IMAGE, rows, width, labels, shape, groups, largest)
    expected = [LABEL, *pixel_columns(len(names) - 1)]
    if len(names) < 2 or names != expected:
        first = next((i for i, (a, b) in enumerate(zip(names, expected)) if a != b), 1)
        found = names[first] if first < len(names) else "<end of columns>"
        raise DataError(
            f"{path}: column {first + 1}: expected {expected[first] if len(names) > 1 else 'pixel1'!r}, "
            f"found {found!r}"
        )
    for field in schema:
        if field.name != LABEL and field.type != pa.uint8():
            raise DataError(f"{path}: column {field.name!r}: expected UInt8, found {field.type}")
    return Table(path, WIDE, rows, len(names) - 1, labels, None, groups, largest)


def _row_groups(table: Table, start: int, stop: int) -> Iterator[tuple[int, int, int, int]]:
    """(group, its first row, lo, hi): each row group overlapping rows [start, stop), and the overlap.

    From the sizes :func:`open_table` read: the footer of a wide file holds every column of every
    row group, and parsing it again for each read would cost memory that grows with the file.
    """
    first = 0
    for group, rows in enumerate(table.group_rows):
        lo, hi = max(start, first), min(stop, first + rows)
        if lo < hi:
            yield group, first, lo, hi
        first += rows


def read_labels(table: Table, start: int = 0, stop: int | None = None) -> np.ndarray:
    """The label column of rows ``start..stop`` (default: all; uint16, or str objects).

    One column of a columnar file, read from the row groups that hold the rows: cheap.
    """
    stop = table.rows if stop is None else min(stop, table.rows)
    if stop <= start:
        return np.empty(0, dtype=np.uint16 if table.labels == INT_LABELS else object)
    # Through the table's Polars scan, not Arrow's ``ParquetFile``, which parses the whole footer at
    # every opening: a millisecond and a megabyte or so per row group of a wide file.
    column = table.scan.select(LABEL).slice(start, stop - start).collect().get_column(LABEL)
    if column.null_count():
        raise _null_error(table, start + int(column.is_null().arg_max()), LABEL)
    return column.to_numpy()


def _label_values(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A label column without nulls as NumPy: integers viewed in Arrow's buffers, names as str objects.

    Not Arrow's ``to_numpy``, which imports pandas: tens of MB and a slower start in every worker
    process that reads labels.
    """
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    if not pa.types.is_integer(column.type):
        return np.array(column.to_pylist(), dtype=object)
    dtype = np.dtype(f"uint{column.type.bit_width}")  # the layouts' label types are unsigned
    parts = []
    for chunk in chunks:
        if len(chunk):  # an empty chunk may have no data buffer
            values = np.frombuffer(chunk.buffers()[1], dtype=dtype)
            parts.append(values[chunk.offset : chunk.offset + len(chunk)])
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


def _largest_label(meta: pq.FileMetaData) -> int | None:
    """The largest integer label, from the row groups' statistics in the footer (no data read);
    None when a row group has none (then read the column), or the table has no rows or names."""
    maxima = []
    for group in range(meta.num_row_groups):
        stats = meta.row_group(group).column(0).statistics
        if stats is None or not stats.has_min_max or stats.null_count or not isinstance(stats.max, int):
            return None
        maxima.append(int(stats.max))
    return max(maxima, default=None)


def _null_error(table: Table, row: int, name: str) -> DataError:
    """The one-line refusal of a null cell; ``row`` counts from 0."""
    return DataError(f"{table.path}: row {row + 1}, column {name!r}: expected a value, found null")


def _first_null(column: pa.Array | pa.ChunkedArray) -> int:
    return int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])


def _null_check(table: Table, batch: pa.RecordBatch, start: int) -> None:
    for name, column in zip(batch.schema.names, batch.columns):
        if column.null_count:  # to_numpy would turn them into NaN and then silently into 0
            raise _null_error(table, start + _first_null(column), name)


def _pixels(column: pa.Array, width: int) -> np.ndarray:
    """A fixed-size-binary column as uint8 rows [k, width], viewing Arrow's buffer without a copy."""
    data = np.frombuffer(column.buffers()[1], dtype=np.uint8)
    return data[column.offset * width : (column.offset + len(column)) * width].reshape(len(column), width)


def _wide_rows(table: Table, chunk_rows: int, start: int, stop: int, labels: bool) -> Iterator[Rows]:
    """Rows ``start..stop`` of a wide-layout table, at most ``chunk_rows`` at a time.

    Reading any slice of a row group decodes the group's whole pages, so each group's share
    of the rows is decoded once: Polars decodes ``DECODE_BYTES`` of columns at a time, each
    block copied into one array of the group's rows (Polars' own export would copy the whole
    group twice, ``bench/notes.md``), which is then cut into chunks. Memory: one row group's
    pixels (``prep.row_group_size`` rows) and one block, whatever the span.
    """
    names = pixel_columns(table.num_pixels)
    for _, _, lo, hi in _row_groups(table, start, stop):
        rows = np.empty((hi - lo, len(names)), dtype=np.uint8)
        step = max(1, DECODE_BYTES // (hi - lo))
        for first in range(0, len(names), step):
            block = table.scan.select(names[first : first + step]).slice(lo, hi - lo).collect()
            _frame_null_check(table, block, lo)
            # Row-major from Polars: a copy of whole rows into ``rows`` (a column-major export
            # would be transposed here a byte at a time, several times slower).
            rows[:, first : first + step] = block.to_numpy(order="c")
            del block
        group_labels = read_labels(table, lo, hi) if labels else None
        for first in range(0, hi - lo, chunk_rows):
            chunk = None if group_labels is None else group_labels[first : first + chunk_rows]
            yield Rows(rows[first : first + chunk_rows], chunk, None)
        del rows


def _frame_null_check(table: Table, frame: pl.DataFrame, start: int) -> None:
    for name, nulls in zip(frame.columns, frame.null_count().row(0)):
        if nulls:  # to_numpy would turn them into NaN and then silently into 0
            raise _null_error(table, start + int(frame.get_column(name).is_null().arg_max()), name)


def _image_rows(table: Table, chunk_rows: int, start: int, stop: int, labels: bool) -> Iterator[Rows]:
    """One row group at a time (the writer keeps them under 64 MiB), read without Arrow's pre-buffering,
    which holds several row groups' pages at once; row groups outside [start, stop) are not read."""
    file = pq.ParquetFile(table.path, pre_buffer=False)
    for group, first, lo, hi in _row_groups(table, start, stop):
        data = file.read_row_group(group, use_threads=False).slice(lo - first, hi - lo)
        for batch in data.to_batches(max_chunksize=chunk_rows):
            _null_check(table, batch, lo)
            # The labels come in the same read as the pixels here: no cost to skip.
            batch_labels = _label_values(batch.column(0)) if labels else None
            yield Rows(_pixels(batch.column(2), table.num_pixels), batch_labels, batch.column(1).to_pylist())
            lo += batch.num_rows
        del data


def iter_rows(
    table: Table, chunk_rows: int, start: int = 0, stop: int | None = None, *, labels: bool = True
) -> Iterator[Rows]:
    """Rows ``start..stop`` (default: all) in file order, ``chunk_rows`` at a time, in bounded memory.

    ``labels=False``: the caller has the labels already (a shard writes them before its pixels),
    so the label column is not read again and each ``Rows.labels`` is None.
    """
    stop = table.rows if stop is None else min(stop, table.rows)
    reader = _image_rows if table.layout == IMAGE else _wide_rows
    return reader(table, chunk_rows, start, stop, labels)
