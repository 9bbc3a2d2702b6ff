"""Strict checks of the tabular CSV layout (pure: bytes in, messages out).

:mod:`pipeline.csvblocks` parses blocks of lines with Polars; only the few lines
of a block Polars refused are re-read here (:func:`find_problem_in_lines`) to
say exactly which row and column broke the schema, and what was expected.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence

from pipeline.errors import DataError
from pipeline.tabular import (
    INT_CELL,
    INT_LABELS,
    LABEL,
    MAX_LABEL,
    NAME_LABELS,
    NUMBER_CELL,
    label_kind,
)

BOM = b"\xef\xbb\xbf"
MAX_HEADER_BYTES = 8 << 20  # room for 3x224x224 pixel columns; anything far longer is not an image table


def _show(value: bytes, limit: int = 40) -> str:
    text = value.decode("utf-8", "replace")
    return repr(text if len(text) <= limit else text[:limit] + "...")


def header_names(line: bytes) -> list[str]:
    """The column names of a header line as the file spells them (BOM, quotes, blanks removed)."""
    if line.startswith(BOM):
        line = line[len(BOM) :]
    return [n.strip().strip('"') for n in line.rstrip(b"\r\n").decode("utf-8", "replace").split(",")]


# Files that are not CSV text, by their first bytes: common ways a download or a spreadsheet
# export arrives (Kaggle's zips, .csv.gz, Excel's "Unicode Text").
_NOT_TEXT = (
    (b"\x1f\x8b", "gzip-compressed data; decompress it (gunzip) first"),
    (  # an .xlsx is a ZIP too; its first line may end before the name that would tell them apart
        b"PK\x03\x04",
        "a ZIP archive or an Excel workbook (.xlsx); extract the CSV from the archive, or save the "
        "workbook as CSV UTF-8",
    ),
    (
        b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1",
        "an Excel 97-2003 workbook (.xls); save it as CSV UTF-8",
    ),
    (b"\xff\xfe", "UTF-16 text; save it as UTF-8 (in Excel: CSV UTF-8)"),
    (b"\xfe\xff", "UTF-16 text; save it as UTF-8 (in Excel: CSV UTF-8)"),
)
_SEPARATORS = {";": "semicolons", "\t": "tabs", "|": "vertical bars"}


def _check_text(line: bytes, where: str) -> None:
    """Refuse a header whose first bytes show the file is not CSV text."""
    for magic, what in _NOT_TEXT:
        if line.startswith(magic):
            raise DataError(f"{where}: line 1 (header): expected CSV text (UTF-8 or ASCII), found {what}")


def _cr_line_ends(where: str) -> DataError:
    return DataError(
        f"{where}: line 1 (header): expected LF or CRLF line ends, found CR alone (classic Mac OS "
        "line ends); convert them to LF"
    )


# A pixel such as 12.0 (pandas writes a float column so) or 0.5 (scaled to 0..1): how to write it.
_FLOAT_PIXEL = (
    "; write pixels as integers 0..255 (pandas: df.round().astype(int), after * 255 if scaled to 0..1)"
)
# What other datasets call the label column: with one of these first, the fix is a rename.
_LABEL_NAMES = frozenset({"label", "labels", "class", "target", "y", "category"})


def _not_label(names: Sequence[str], where: str) -> DataError:
    """The error for a header whose first column is not ``label``, with the likeliest reason."""
    first = names[0]
    at = f"{where}: line 1 (header), column 1: expected 'label', found {_show(first.encode())}"
    sep = next((s for s in _SEPARATORS if first.startswith(LABEL + s)), None)
    if sep is not None:
        return DataError(f"{at}: the values are separated by {_SEPARATORS[sep]}; expected commas")
    if "\ufffd" in first:  # header_names replaced bytes that are not UTF-8
        return DataError(f"{at}: the header is not UTF-8 text; save the file as UTF-8")
    if first.isascii() and first.lstrip("+-").isdigit():  # a data row where the header belongs
        return DataError(f"{at}: the file seems to have no header line; expected label,pixel1..pixelN first")
    if first.lower() in _LABEL_NAMES and LABEL not in names:  # the label column under another name
        return DataError(f"{at}: name the label column 'label' (lower case), as the first column already is")
    if first in ("", "Unnamed: 0") and names[1:2] == [LABEL]:  # the index pandas writes by default
        return DataError(
            f"{at}: the first column is an index, as pandas' to_csv writes it; save with "
            "df.to_csv(path, index=False)"
        )
    if LABEL in names:
        return DataError(f"{at}: 'label' is column {names.index(LABEL) + 1}; it must come first")
    if first.lower().startswith("pixel"):
        return DataError(
            f"{at}: no column is named 'label'; a file without labels (as Kaggle's test.csv) cannot be "
            "tested against: set data.test_csv: null and a test split is held out of train"
        )
    return DataError(at)


def check_header(line: bytes, where: str, num_pixels: int | None = None) -> list[str]:
    """Accept ``label`` then the pixel columns, whatever their names; return the names.

    With ``num_pixels`` (from ``data.image_shape``) the count must match it.
    """
    _check_text(line, where)
    if len(line) > MAX_HEADER_BYTES:
        if b"\r" in line:  # a whole file with CR line ends reads as one line
            raise _cr_line_ends(where)
        raise DataError(
            f"{where}: line 1 (header) is longer than {MAX_HEADER_BYTES} bytes; expected "
            f"label and one column per pixel"
        )
    names = header_names(line)
    if any("\r" in name for name in names):  # blanks around a name, CR among them, are ignored
        raise _cr_line_ends(where)
    if names[0] != LABEL:
        raise _not_label(names, where)
    if len(names) < 2:
        raise DataError(
            f"{where}: line 1 (header): expected label and at least one pixel column, found only 'label'"
        )
    if num_pixels is not None and len(names) != 1 + num_pixels:
        raise DataError(
            f"{where}: line 1 (header): expected {1 + num_pixels} columns (label and {num_pixels} "
            f"pixels), found {len(names)}"
        )
    empty = next((i for i, n in enumerate(names) if not n), None)
    if empty is not None:
        raise DataError(
            f"{where}: line 1 (header), column {empty + 1}: expected a column name, found an empty one"
        )
    return names


def _cells(line: bytes, names: Sequence[str], labels: str, at: str) -> list[bytes]:
    """The cells of one data line; a quoted class name may hold commas (read by Python's csv module)."""
    count = line.count(b",") + 1  # before splitting: a hostile line may hold millions of cells
    if labels == NAME_LABELS and b'"' in line and count <= 2 * len(names):
        text = line.decode("utf-8", "surrogateescape")  # the bytes come back as they were, valid or not
        cells = [c.encode("utf-8", "surrogateescape") for c in next(csv.reader([text]))]
        count = len(cells)
    elif count == len(names):
        cells = line.split(b",")
    if count != len(names):
        raise DataError(f"{at}: expected {len(names)} values, found {count}")
    return cells


def _is_number(cell: bytes) -> bool:
    """A number with a decimal point or an exponent (3.0, 1e2), blanks and quotes around it ignored."""
    return NUMBER_CELL.fullmatch(cell.strip(b' \t"')) is not None


def _check_label(cell: bytes, at: str, labels: str) -> None:
    if _is_number(cell):
        raise DataError(
            f"{at}, column 1 (label): expected an integer 0..{MAX_LABEL} or a class name, found the "
            f"number {_show(cell)}; write integer labels without a decimal point (pandas: "
            "df['label'].astype(int))"
        )
    m = INT_CELL.fullmatch(cell)
    if labels == NAME_LABELS:
        if not cell.strip(b' \t"'):
            raise DataError(f"{at}, column 1 (label): expected a class name, found an empty cell")
        try:
            cell.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(
                f"{at}, column 1 (label): expected a class name in UTF-8, found {_show(cell)}; save the "
                "file as UTF-8"
            ) from None
        if m is not None:
            raise DataError(
                f"{at}, column 1 (label): expected a class name like the first row's, found the "
                f"integer {_show(cell)} (labels must not mix integers and names)"
            )
        return
    if not cell.strip():
        raise DataError(f"{at}, column 1 (label): expected an integer 0..{MAX_LABEL}, found an empty cell")
    if m is None:
        raise DataError(
            f"{at}, column 1 (label): expected an integer 0..{MAX_LABEL} like the first row's, found "
            f"{_show(cell)} (labels must not mix integers and names)"
        )
    _check_int(m.group(1) or m.group(2), cell, at, 1, LABEL, MAX_LABEL)


def _check_int(digits: bytes, cell: bytes, at: str, col: int, name: str, hi: int) -> None:
    significant = digits.lstrip(b"+-").lstrip(b"0")  # int() refuses > 4300 digits, zeros included
    if len(significant) > 20:  # far out of range
        raise DataError(f"{at}, column {col} ({name}): expected an integer 0..{hi}, found {_show(cell)}")
    value = int(significant or b"0") * (-1 if digits.startswith(b"-") else 1)
    if not 0 <= value <= hi:
        raise DataError(f"{at}, column {col} ({name}): expected an integer 0..{hi}, found {value}")


def check_row(line: bytes, row: int, where: str, names: Sequence[str], labels: str = INT_LABELS) -> None:
    """Check one data line (``row`` counts data rows from 1; the file line is row + 1).

    ``names`` are the file's own column names, so a message points at the column as the user's
    header spells it; ``labels`` is the file's label kind (:func:`pipeline.tabular.label_kind`).
    """
    line = line.rstrip(b"\r\n")
    at = f"{where}: row {row} (line {row + 1})"
    if not line:
        raise DataError(f"{at}: empty line; expected {len(names)} values")
    cells = _cells(line, names, labels, at)
    if [c.strip(b" \t").removeprefix(BOM).strip(b' \t"') for c in cells[:3]] == [
        n.encode() for n in names[:3]
    ]:
        raise DataError(
            f"{at}: the header line again, where data was expected (files joined or appended to with their "
            "headers?); keep only the first header line"
        )
    _check_label(cells[0], at, labels)
    for col in range(1, len(cells)):
        cell = cells[col]
        m = INT_CELL.fullmatch(cell)
        if not cell.strip():
            raise DataError(
                f"{at}, column {col + 1} ({names[col]}): expected an integer 0..255, found an empty cell"
            )
        if m is None:
            fix = _FLOAT_PIXEL if _is_number(cell) else ""
            raise DataError(
                f"{at}, column {col + 1} ({names[col]}): expected an integer 0..255, found {_show(cell)}{fix}"
            )
        _check_int(m.group(1) or m.group(2), cell, at, col + 1, names[col], 255)


def find_problem_in_lines(
    lines: Iterable[bytes], first_row: int, where: str, names: Sequence[str], labels: str = INT_LABELS
) -> DataError | None:
    """The first violation in data lines whose first is data row ``first_row``, or None."""
    try:
        for row, line in enumerate(lines, start=first_row):
            check_row(line, row, where, names, labels)
    except DataError as exc:
        return exc
    return None


def find_problem(lines: Iterable[bytes], where: str, num_pixels: int | None = None) -> DataError | None:
    """The first schema violation in a CSV given as lines, or None if it is valid (the reference checker)."""
    it = iter(lines)
    header = next(it, None)
    if header is None or not header.strip():
        return DataError(f"{where}: file is empty; expected a header line label,pixel1..pixelN")
    try:
        names = check_header(header, where, num_pixels)
        rows = 0
        labels = None
        for rows, line in enumerate(it, start=1):
            if labels is None:
                labels = label_kind(line.rstrip(b"\r\n").split(b",", 1)[0])
            check_row(line, rows, where, names, labels)
    except DataError as exc:
        return exc
    if rows == 0:
        return DataError(f"{where}: has a header but no data rows")
    return None
