"""CSV -> Parquet in bounded memory: Polars parses and checks blocks of lines, one row group is written at a time.

The file is read in blocks of whole lines (:data:`BLOCK_BYTES`); each block is
parsed and checked by Polars with a strict schema (every cell an integer, the
label 0..9, pixels 0..255, nothing missing). The writer gathers ``row_group_size``
rows and hands them to Arrow's ``ParquetWriter`` as one row group, so at most one
block and one row group (twice, while it is joined) are held at any time,
whatever the file's size.

Two Polars writers were measured and rejected, both because memory grows with
the file: ``scan_csv`` holds a read-ahead that grows before it levels off (the
issue's 355 MB at 1x, 510 MB at 4x), and ``sink_parquet`` fed by an IO source
keeps about 3 MB per row group until it closes the file (126, 149, 205, 250 and
336 MB at 1, 4, 16, 32 and 64x of the same frames; Arrow's writer: 221, 219,
220 MB at 1, 4 and 16x). Parsing on a second thread while Arrow compresses was
measured too: 10 % faster, but the overlap cost 25 % more memory at 16x.

Because the row number of each block's first line is known, a block Polars
refuses is narrowed down with Polars to a few hundred lines, and only those are
explained cell by cell by :func:`pipeline.csvcheck.find_problem_in_lines`: a
bad cell in the last row of a large file costs one more small parse, not a
second pass over the file in Python.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import atomic_file
from pipeline.csvcheck import MAX_HEADER_BYTES, check_header, find_problem_in_lines
from pipeline.errors import DataError
from pipeline.tabular import HEADER, NUM_PIXELS

_READ_DTYPE = pl.Int32  # wide enough that 256 or -1 parse and then fail the UInt8 range check
_READ_SCHEMA = {c: _READ_DTYPE for c in HEADER}
OUT_SCHEMA = {c: pl.UInt8 for c in HEADER}
_ARROW_SCHEMA = pa.schema([pa.field(c, pa.uint8()) for c in HEADER])
_ARROW_CODEC = {"uncompressed": "none"}  # Polars' codec names, where Arrow's differ
BLOCK_BYTES = 8 << 20  # ~3,800 FashionMNIST rows: large enough for Polars' threads, small next to a row group
_NARROW_LINES = 256  # a refused block is re-parsed this many lines at a time before the line-by-line check


def _parse_strict(block: bytes) -> pl.DataFrame:
    label = pl.col("label")
    return pl.read_csv(block, schema=_READ_SCHEMA, has_header=False).select(
        pl.when(label.is_between(0, 9)).then(label).otherwise(-1).alias("label"),
        pl.exclude("label").fill_null(-1),
    ).select(pl.all().cast(pl.UInt8, strict=True))


def _parse(block: bytes) -> pl.DataFrame:
    """One block of data lines as UInt8 columns; raises PolarsError on any schema violation.

    Parsing straight to UInt8 costs a third less than Int32 plus range checks and
    casts; Polars then refuses exactly the cells the strict path refuses, except
    "-0". So a block that parses with no null and labels <= 9 is the strict
    result, and any other block goes through the strict path, which decides.
    """
    try:
        df = pl.read_csv(block, schema=OUT_SCHEMA, has_header=False)
    except pl.exceptions.PolarsError:
        return _parse_strict(block)
    if df.height and not df.null_count().sum_horizontal().item() and df.get_column("label").max() <= 9:
        return df
    return _parse_strict(block)


def _blocks(f, size: int) -> Iterator[bytes]:
    """The rest of ``f`` in blocks of whole lines; a line longer than ``size`` is a block of its own."""
    pieces: list[bytes] = []  # the unfinished line at the end of the last read
    while chunk := f.read(size):
        if pieces:
            first = chunk.find(b"\n") + 1
            if first == 0:
                pieces.append(chunk)
                continue
            pieces.append(chunk[:first])
            head = b"".join(pieces)
            pieces = []
            if len(head) > size:  # a hostile line: alone, so explaining it needs no copy of its neighbours
                yield head
                chunk = chunk[first:]
            else:
                chunk = head + chunk[first:]
        cut = chunk.rfind(b"\n") + 1
        if cut:
            yield chunk[:cut]
        if cut < len(chunk):
            pieces.append(chunk[cut:])
    if pieces:
        yield b"".join(pieces)


def _one_long_line(block: bytes) -> bool:
    """Whether ``block`` is a single line longer than a block (a block of many lines may run a line over)."""
    return len(block) > BLOCK_BYTES and block.find(b"\n", 0, len(block) - 1) < 0


def _parsed_blocks(path: Path, data_start: int) -> Iterator[pl.DataFrame]:
    """The data lines from ``data_start`` on, parsed block by block; raises the first refused block's DataError."""
    first_row = 1  # data rows count from 1; the header is line 1
    with open(path, "rb") as f:
        f.seek(data_start)
        for block in _blocks(f, BLOCK_BYTES):
            if _one_long_line(block):  # Polars takes seconds to refuse 10 M cells
                problem = find_problem_in_lines(_lines(block, 0, len(block)), first_row, str(path))
                if problem is not None:
                    raise problem
            try:
                df = _parse(block)
            except pl.exceptions.PolarsError as exc:
                raise _explain_block(path, block, first_row, exc) from None
            first_row += block.count(b"\n")
            yield df


def _write_row_groups(frames: Iterable[pl.DataFrame], out: Path, *, compression: str,
                      compression_level: int | None, row_group_size: int) -> int:
    """Write ``frames`` as row groups of ``row_group_size`` rows; returns the row count."""
    rows = 0
    pending: list[pl.DataFrame] = []  # fewer than row_group_size rows
    pending_rows = 0
    with pq.ParquetWriter(out, _ARROW_SCHEMA, compression=_ARROW_CODEC.get(compression, compression),
                          compression_level=compression_level) as writer:
        for df in frames:
            while pending_rows + df.height >= row_group_size:
                take = row_group_size - pending_rows
                pending.append(df.slice(0, take))
                df = df.slice(take)
                # One contiguous buffer per column: Arrow writes many small chunks far slower. The
                # parsed blocks are dropped before the row group is encoded, so one copy is alive.
                group = pl.concat(pending, rechunk=True)
                pending, pending_rows = [], 0
                writer.write_table(group.to_arrow(), row_group_size=row_group_size)
                rows += group.height
                del group
            if df.height:
                pending.append(df)
                pending_rows += df.height
        if pending_rows:
            writer.write_table(pl.concat(pending, rechunk=True).to_arrow(), row_group_size=row_group_size)
            rows += pending_rows
    return rows


def _lines(block: bytes, start: int, end: int) -> Iterator[bytes]:
    """The lines of ``block[start:end]`` without their line end, one copy alive at a time."""
    while start < end:
        stop = block.find(b"\n", start, end)
        stop = end if stop < 0 else stop
        yield block[start:stop]
        start = stop + 1


def _explain_block(path: Path, block: bytes, first_row: int, cause: Exception) -> DataError:
    """Name the first violation in a block Polars refused, checking only a few hundred lines in Python."""
    start, row = 0, first_row
    while start < len(block):
        end = start
        for _ in range(_NARROW_LINES):
            end = block.find(b"\n", end) + 1 or len(block)
            if end == len(block):
                break
        try:
            _parse(block[start:end])
        except pl.exceptions.PolarsError:
            problem = find_problem_in_lines(_lines(block, start, end), row, str(path))
            if problem is not None:
                return problem
        row += block.count(b"\n", start, end)
        start = end
    return DataError(f"{path}: Polars could not convert it: {cause}")


def csv_to_parquet(csv_path: Path, out_path: Path, *, compression: str, compression_level: int | None,
                   row_group_size: int) -> int:
    """Convert one canonical CSV; returns the row count. Leaves no output on failure."""
    try:
        with open(csv_path, "rb") as f:
            header = f.readline(MAX_HEADER_BYTES + 1)
    except OSError as exc:
        raise DataError(f"{csv_path}: cannot read: {exc}") from None
    if not header.strip():
        raise DataError(f"{csv_path}: file is empty; expected a header line label,pixel1..pixel{NUM_PIXELS}")
    # The header may be Kaggle's pixel0..pixel783, quoted, or carry a BOM; the values are read by position.
    check_header(header, str(csv_path))
    with atomic_file(out_path) as tmp:  # an OSError here (disk full) becomes an OutputError
        rows = _write_row_groups(_parsed_blocks(csv_path, len(header)), tmp,
                                 compression=compression, compression_level=compression_level,
                                 row_group_size=row_group_size)
        if rows == 0:
            raise DataError(f"{csv_path}: has a header but no data rows")
    return rows
