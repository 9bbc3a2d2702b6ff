"""CSV -> Parquet with Polars' streaming engine and a strict schema.

The happy path is one streaming pass (``scan_csv`` -> ``sink_parquet``) in
bounded memory. The schema is enforced inside that pass: every cell must parse
as an integer, a missing cell becomes -1, a label outside 0..9 becomes -1, and
the strict cast to UInt8 then fails. On any failure the output is discarded
and :func:`pipeline.csvcheck.find_problem` names the row and column.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from pipeline.atomic import atomic_file
from pipeline.csvcheck import MAX_HEADER_BYTES, check_header, find_problem
from pipeline.errors import DataError
from pipeline.tabular import HEADER, NUM_PIXELS

_READ_DTYPE = pl.Int32  # wide enough that 256 or -1 parse and then fail the UInt8 range check


def _lines(path: Path):
    with open(path, "rb") as f:
        yield from f


def _explain(csv_path: Path, cause: Exception | None) -> DataError:
    problem = find_problem(_lines(csv_path), str(csv_path))
    if problem is not None:
        return problem
    return DataError(f"{csv_path}: Polars could not convert it: {cause}")


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
    check_header(header, str(csv_path))
    label = pl.col("label")
    # The header was checked above (it may be Kaggle's pixel0..pixel783, quoted, or carry a BOM);
    # Polars reads the values only, by position.
    query = pl.scan_csv(csv_path, schema={c: _READ_DTYPE for c in HEADER}, has_header=False,
                        skip_lines=1).select(
        pl.when(label.is_between(0, 9)).then(label).otherwise(-1).alias("label"),
        pl.exclude("label").fill_null(-1),
    ).select(pl.all().cast(pl.UInt8, strict=True))
    with atomic_file(out_path) as tmp:  # an OSError here (disk full) becomes an OutputError
        try:
            query.sink_parquet(tmp, compression=compression, compression_level=compression_level,
                               row_group_size=row_group_size)
        except pl.exceptions.PolarsError as exc:
            raise _explain(csv_path, exc) from None
        rows = pq.ParquetFile(tmp).metadata.num_rows
        if rows == 0:
            raise DataError(f"{csv_path}: has a header but no data rows")
    return rows
