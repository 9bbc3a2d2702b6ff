"""CSV -> Parquet in bounded memory: Polars parses blocks of lines, its streaming engine writes.

The file is read in blocks of whole lines (:data:`BLOCK_BYTES`); each block is
parsed and checked by Polars with a strict schema (every cell an integer, the
label 0..9, pixels 0..255, nothing missing) and handed to ``sink_parquet``
through an IO-source generator, so at most a few blocks and one row group are
held at any time, whatever the file's size. Polars' own ``scan_csv`` source
holds a read-ahead that grows with the file before it levels off (the issue's
355 MB at 1x, 510 MB at 4x).

Because the row number of each block's first line is known, a block Polars
refuses is narrowed down with Polars to a few hundred lines, and only those are
explained cell by cell by :func:`pipeline.csvcheck.find_problem_in_lines`: a
bad cell in the last row of a large file costs one more small parse, not a
second pass over the file in Python.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import polars as pl
from polars.io.plugins import register_io_source

from pipeline.atomic import atomic_file
from pipeline.csvcheck import MAX_HEADER_BYTES, check_header, find_problem_in_lines
from pipeline.errors import DataError
from pipeline.tabular import HEADER, NUM_PIXELS

_READ_DTYPE = pl.Int32  # wide enough that 256 or -1 parse and then fail the UInt8 range check
_READ_SCHEMA = {c: _READ_DTYPE for c in HEADER}
OUT_SCHEMA = {c: pl.UInt8 for c in HEADER}
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


class _Refused(Exception):
    """Raised inside the IO source to stop the sink; the explanation is kept on the reader."""


class _BlockReader:
    """The IO source: parsed blocks in file order; remembers the first refused block and its first row."""

    def __init__(self, path: Path, data_start: int) -> None:
        self.path = path
        self.data_start = data_start
        self.problem: DataError | None = None

    def __call__(self, with_columns: list[str] | None, predicate: pl.Expr | None, n_rows: int | None,
                 batch_size: int | None) -> Iterator[pl.DataFrame]:
        first_row = 1  # data rows count from 1; the header is line 1
        with open(self.path, "rb") as f:
            f.seek(self.data_start)
            for block in _blocks(f, BLOCK_BYTES):
                if len(block) > BLOCK_BYTES:  # one over-long line: Polars takes seconds to refuse 10 M cells
                    self.problem = find_problem_in_lines(_lines(block, 0, len(block)), first_row, str(self.path))
                    if self.problem is not None:
                        raise _Refused()
                try:
                    df = _parse(block)
                except pl.exceptions.PolarsError as exc:
                    self.problem = _explain_block(self.path, block, first_row, exc)
                    raise _Refused() from None
                first_row += block.count(b"\n")
                yield df if with_columns is None else df.select(with_columns)


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
    reader = _BlockReader(csv_path, len(header))
    query = register_io_source(reader, schema=OUT_SCHEMA)
    with atomic_file(out_path) as tmp:  # an OSError here (disk full) becomes an OutputError
        try:
            query.sink_parquet(tmp, compression=compression, compression_level=compression_level,
                               row_group_size=row_group_size)
        except (pl.exceptions.PolarsError, _Refused) as exc:
            if reader.problem is not None:
                raise reader.problem from None
            raise DataError(f"{csv_path}: Polars could not convert it: {exc}") from None
        rows = pl.scan_parquet(tmp).select(pl.len()).collect().item()
        if rows == 0:
            raise DataError(f"{csv_path}: has a header but no data rows")
    return rows
