"""Strict checks of the ``label,pixel1..pixel784`` CSV layout (pure: bytes in, messages out).

:mod:`pipeline.csvblocks` parses blocks of lines with Polars; only the few lines
of a block Polars refused are re-read here (:func:`find_problem_in_lines`) to
say exactly which row and column broke the schema, and what was expected.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from pipeline.errors import DataError
from pipeline.tabular import HEADER, NUM_PIXELS, PIXEL_COLUMNS, PIXEL_COLUMNS_ZERO_BASED

BOM = b"\xef\xbb\xbf"
MAX_HEADER_BYTES = 64 * 1024  # the real header is 6.2 KB; anything far longer is not ours
# Exactly the integer spellings Polars' CSV reader accepts (leading blanks, a sign, optional quotes),
# so a cell Polars refuses is always explained here, and one it accepts is never blamed.
_INT = re.compile(rb'[ \t]*([+-]?[0-9]+)|"[ \t]*([+-]?[0-9]+)"')


def _show(value: bytes, limit: int = 40) -> str:
    text = value.decode("utf-8", "replace")
    return repr(text if len(text) <= limit else text[:limit] + "...")


def header_names(line: bytes) -> list[str]:
    """The column names of a header line as the file spells them (BOM, quotes, blanks removed)."""
    if line.startswith(BOM):
        line = line[len(BOM):]
    return [n.strip().strip('"') for n in line.rstrip(b"\r\n").decode("utf-8", "replace").split(",")]


def check_header(line: bytes, where: str) -> None:
    """Accept ``label,pixel1..pixel784`` or Kaggle MNIST's ``label,pixel0..pixel783``."""
    if len(line) > MAX_HEADER_BYTES:
        raise DataError(
            f"{where}: row 1 (header) is longer than {MAX_HEADER_BYTES} bytes; expected "
            f"{len(HEADER)} columns label,pixel1..pixel{NUM_PIXELS}"
        )
    names = header_names(line)
    if names == list(HEADER) or names == ["label", *PIXEL_COLUMNS_ZERO_BASED]:
        return
    if len(names) != len(HEADER):
        raise DataError(
            f"{where}: row 1 (header): expected {len(HEADER)} columns (label,pixel1..pixel{NUM_PIXELS}), "
            f"found {len(names)}"
        )
    zero_based = names[1:2] == ["pixel0"]
    expected = ["label", *(PIXEL_COLUMNS_ZERO_BASED if zero_based else PIXEL_COLUMNS)]
    col = next(i for i, (a, b) in enumerate(zip(names, expected)) if a != b)
    raise DataError(f"{where}: row 1 (header), column {col + 1}: expected {expected[col]!r}, found {names[col]!r:.40}")


def check_row(line: bytes, row: int, where: str, names: Sequence[str] = HEADER) -> None:
    """Check one data line (``row`` counts data rows from 1; the file line is row + 1).

    ``names`` are the file's own column names, so a message points at the column as the user's
    header spells it (Kaggle MNIST counts pixels from 0).
    """
    line = line.rstrip(b"\r\n")
    at = f"{where}: row {row} (line {row + 1})"
    if not line:
        raise DataError(f"{at}: empty line; expected {len(HEADER)} values")
    count = line.count(b",") + 1  # before splitting: a hostile line may hold millions of cells
    if count != len(HEADER):
        raise DataError(f"{at}: expected {len(HEADER)} values, found {count}")
    cells = line.split(b",")
    for col, cell in enumerate(cells):
        name = names[col]
        hi = 9 if col == 0 else 255
        m = _INT.fullmatch(cell)
        if not cell.strip():
            raise DataError(f"{at}, column {col + 1} ({name}): expected an integer 0..{hi}, found an empty cell")
        if m is None:
            raise DataError(f"{at}, column {col + 1} ({name}): expected an integer 0..{hi}, found {_show(cell)}")
        digits = m.group(1) or m.group(2)
        if len(digits.lstrip(b"+-").lstrip(b"0")) > 20:  # far out of range, and int() refuses > 4300 digits
            raise DataError(f"{at}, column {col + 1} ({name}): expected an integer 0..{hi}, found {_show(cell)}")
        value = int(digits)
        if not 0 <= value <= hi:
            raise DataError(f"{at}, column {col + 1} ({name}): expected an integer 0..{hi}, found {value}")


def find_problem_in_lines(lines: Iterable[bytes], first_row: int, where: str,
                          names: Sequence[str] = HEADER) -> DataError | None:
    """The first violation in data lines whose first is data row ``first_row``, or None."""
    try:
        for row, line in enumerate(lines, start=first_row):
            check_row(line, row, where, names)
    except DataError as exc:
        return exc
    return None


def find_problem(lines: Iterable[bytes], where: str) -> DataError | None:
    """The first schema violation in a CSV given as lines, or None if it is valid."""
    it = iter(lines)
    header = next(it, None)
    if header is None or not header.strip():
        return DataError(f"{where}: file is empty; expected a header line label,pixel1..pixel{NUM_PIXELS}")
    try:
        check_header(header, where)
        names = header_names(header)
        rows = 0
        for rows, line in enumerate(it, start=1):
            check_row(line, rows, where, names)
    except DataError as exc:
        return exc
    if rows == 0:
        return DataError(f"{where}: has a header but no data rows")
    return None
