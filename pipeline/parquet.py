"""CSV -> Parquet in bounded memory: Polars parses and checks blocks of lines, one row group is written at a time.

The file is read in blocks of whole lines, each parsed and checked by Polars
with a strict schema (:mod:`pipeline.csvblocks`, which also names the row and
column of a bad cell in bounded time). The writer gathers ``row_group_size``
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
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import atomic_file
from pipeline.csvblocks import parsed_blocks
from pipeline.csvcheck import MAX_HEADER_BYTES, check_header
from pipeline.errors import DataError
from pipeline.tabular import HEADER, NUM_PIXELS

_ARROW_SCHEMA = pa.schema([pa.field(c, pa.uint8()) for c in HEADER])
_ARROW_CODEC = {"uncompressed": "none"}  # Polars' codec names, where Arrow's differ


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
        rows = _write_row_groups(parsed_blocks(csv_path, len(header)), tmp,
                                 compression=compression, compression_level=compression_level,
                                 row_group_size=row_group_size)
        if rows == 0:
            raise DataError(f"{csv_path}: has a header but no data rows")
    return rows
