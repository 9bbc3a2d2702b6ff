"""Strict, block-wise CSV parsing with Polars, in bounded memory (pure apart from reading the file).

The data lines are read in blocks of whole lines (:data:`BLOCK_BYTES`); Polars
parses each block with a strict :class:`Schema` (every pixel an integer 0..255,
the label an integer 0..65535 or a class name, nothing missing). Because the row number of each
block's first line is known, a block Polars refuses is narrowed down with Polars
to a few hundred lines, and only those are explained cell by cell by
:func:`pipeline.csvcheck.find_problem_in_lines`: a bad cell in the last row of a
large file costs one more small parse, not a second pass over the file in Python.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import polars as pl

from pipeline.csvcheck import find_problem_in_lines
from pipeline.errors import DataError
from pipeline.tabular import INT_LABELS, LABEL, MAX_LABEL, NUMBER, header

BLOCK_BYTES = 8 << 20  # ~3,800 FashionMNIST rows: large enough for Polars' threads, small next to a row group
_CELL_BYTES = 16  # room per value in the longest line read (a pixel needs at most "255," unless zero-padded)
_LABEL_BYTES = 64 << 10  # room for a class name in the longest line read
_NARROW_LINES = 256  # a refused block is re-parsed this many lines at a time before the line-by-line check
_INTEGER = r"^[+-]?[0-9]+$"
_NUMBER = rf"^{NUMBER}$"  # "3.0": refused as a name (pipeline.csvcheck says why)


class _Refused(Exception):
    """A block parsed, but a value breaks the schema (an out-of-range or missing label, a missing pixel)."""


class _LineTooLong(Exception):
    """The next line runs past the longest a row of the schema can be."""


@dataclass(frozen=True)
class Schema:
    """The columns of one CSV: ``num_pixels`` UInt8 pixels after a UInt16 label or a class-name label."""

    num_pixels: int
    labels: str = INT_LABELS

    @cached_property
    def names(self) -> tuple[str, ...]:
        return header(self.num_pixels)

    @cached_property
    def longest_line(self) -> int:
        """Bytes past which a line cannot be one row (and is refused before it is held whole): at least
        a block, and room for a long class name and every value generously padded."""
        return max(BLOCK_BYTES, _CELL_BYTES * (self.num_pixels + 1) + _LABEL_BYTES)

    @cached_property
    def out(self) -> dict[str, pl.DataType]:
        """The schema of a parsed block: what the Parquet file stores."""
        label = pl.UInt16 if self.labels == INT_LABELS else pl.String
        return {n: (label if n == LABEL else pl.UInt8) for n in self.names}

    @cached_property
    def wide(self) -> dict[str, pl.DataType]:
        """Integers wide enough that 256 or -1 parse, and then fail the range check."""
        return {n: (pl.String if n == LABEL and self.labels != INT_LABELS else pl.Int32) for n in self.names}


def _check_names(df: pl.DataFrame) -> pl.DataFrame:
    """Class names: present, not blank, not integers (a file never mixes the two kinds), not numbers."""
    label = pl.col(LABEL).str.strip_chars()
    df = df.with_columns(label)
    bad = df.select(
        (label.is_null() | (label == "") | label.str.contains(_INTEGER) | label.str.contains(_NUMBER)).any()
    ).item()
    if bad or df.select(pl.exclude(LABEL).null_count()).sum_horizontal().item():
        raise _Refused
    return df


def _parse_strict(block: bytes, schema: Schema) -> pl.DataFrame:
    df = pl.read_csv(block, schema=schema.wide, has_header=False)
    if schema.labels != INT_LABELS:
        return _check_names(df).select(pl.col(LABEL), pl.exclude(LABEL).cast(pl.UInt8, strict=True))
    label = pl.col(LABEL)
    return df.select(
        pl.when(label.is_between(0, MAX_LABEL)).then(label).otherwise(-1).alias(LABEL),
        pl.exclude(LABEL).fill_null(-1),
    ).select(pl.col(LABEL).cast(pl.UInt16, strict=True), pl.exclude(LABEL).cast(pl.UInt8, strict=True))


def _parse(block: bytes, schema: Schema) -> pl.DataFrame:
    """One block of data lines in the :attr:`Schema.out` types.

    Raises PolarsError or _Refused on any violation.

    Parsing straight to the narrow types is cheaper than Int32 plus range checks and casts
    (``bench/notes.md``); Polars then refuses exactly the cells the strict path refuses, except "-0". So a
    block that parses with no null is the strict result, and any other block goes through the
    strict path, which decides.
    """
    try:
        df = pl.read_csv(block, schema=schema.out, has_header=False)
    except pl.exceptions.PolarsError:
        return _parse_strict(block, schema)
    if schema.labels != INT_LABELS:
        return _check_names(df)
    if df.height and not df.null_count().sum_horizontal().item():
        return df
    return _parse_strict(block, schema)


def _blocks(f, size: int, longest: int | None = None) -> Iterator[bytes]:
    """The rest of ``f`` in blocks of whole lines; a line longer than ``size`` is a block of its own.

    A line that grows past ``longest`` bytes raises :class:`_LineTooLong` before it is held whole.
    """
    pieces: list[bytes] = []  # the unfinished line at the end of the last read
    held = 0  # bytes in pieces
    while chunk := f.read(size):
        if pieces:
            first = chunk.find(b"\n") + 1
            if first == 0:
                pieces.append(chunk)
                held += len(chunk)
                if longest is not None and held > longest:
                    raise _LineTooLong
                continue
            pieces.append(chunk[:first])
            head = b"".join(pieces)
            pieces, held = [], 0
            if longest is not None and len(head) > longest:
                raise _LineTooLong
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
            held = len(chunk) - cut
    if pieces:
        yield b"".join(pieces)


def _one_long_line(block: bytes) -> bool:
    """Whether ``block`` is a single line longer than a block (a block of many lines may run a line over)."""
    return len(block) > BLOCK_BYTES and block.find(b"\n", 0, len(block) - 1) < 0


def parsed_blocks(
    path: Path,
    data_start: int,
    schema: Schema,
    *,
    where: str | None = None,
    names: Sequence[str] | None = None,
) -> Iterator[pl.DataFrame]:
    """The data lines from byte ``data_start`` on, parsed block by block.

    Raises the first refused block's DataError.

    The error names ``where`` (default: ``path``) and the columns as ``names`` spells them (default:
    the canonical names), so a check of a canonical copy can speak of the user's own file and header.
    """
    where = str(path) if where is None else where
    names = schema.names if names is None else names
    first_row = 1  # data rows count from 1; the header is line 1
    with open(path, "rb") as f:
        f.seek(data_start)
        blocks = _blocks(f, BLOCK_BYTES, schema.longest_line)
        while True:
            try:
                block = next(blocks)
            except StopIteration:
                return
            except _LineTooLong:  # the line after the blocks so far
                raise DataError(
                    f"{where}: row {first_row} (line {first_row + 1}): longer than "
                    f"{schema.longest_line:,} bytes, more than a label and {schema.num_pixels} pixel "
                    "values can take"
                ) from None
            if _one_long_line(block):  # Polars takes seconds to refuse 10 M cells
                problem = find_problem_in_lines(
                    _lines(block, 0, len(block)), first_row, where, names, schema.labels
                )
                if problem is not None:
                    raise problem
            try:
                df = _parse(block, schema)
            except (pl.exceptions.PolarsError, _Refused) as exc:
                raise _explain_block(where, names, schema, block, first_row, exc) from None
            first_row += block.count(b"\n")
            yield df


def _lines(block: bytes, start: int, end: int) -> Iterator[bytes]:
    """The lines of ``block[start:end]`` without their line end, one copy alive at a time."""
    while start < end:
        stop = block.find(b"\n", start, end)
        stop = end if stop < 0 else stop
        yield block[start:stop]
        start = stop + 1


def _explain_block(
    where: str, names: Sequence[str], schema: Schema, block: bytes, first_row: int, cause: Exception
) -> DataError:
    """Name the first violation in a block Polars refused, checking only a few hundred lines in Python."""
    start, row = 0, first_row
    while start < len(block):
        end = start
        for _ in range(_NARROW_LINES):
            end = block.find(b"\n", end) + 1 or len(block)
            if end == len(block):
                break
        try:
            _parse(block[start:end], schema)
        except (pl.exceptions.PolarsError, _Refused):
            problem = find_problem_in_lines(_lines(block, start, end), row, where, names, schema.labels)
            if problem is not None:
                return problem
        row += block.count(b"\n", start, end)
        start = end
    return DataError(f"{where}: Polars could not convert it: {cause}")
