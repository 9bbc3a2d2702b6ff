"""The tabular layout shared by the CSV and Parquet files: ``label,pixel1..pixel784``."""

from __future__ import annotations

NUM_PIXELS = 28 * 28
PIXEL_COLUMNS: tuple[str, ...] = tuple(f"pixel{i}" for i in range(1, NUM_PIXELS + 1))
# Kaggle's MNIST CSVs count pixels from 0; we accept them and rename to the canonical layout.
PIXEL_COLUMNS_ZERO_BASED: tuple[str, ...] = tuple(f"pixel{i}" for i in range(NUM_PIXELS))
HEADER: tuple[str, ...] = ("label", *PIXEL_COLUMNS)
HEADER_LINE: bytes = (",".join(HEADER) + "\n").encode("ascii")
