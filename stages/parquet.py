"""DVC stage `parquet`: CSV -> Parquet (Polars streaming, strict UInt8 schema)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline.cli import parser, run_stage
from pipeline.params import load_section
from pipeline.parquet import csv_to_parquet


def main(argv: Sequence[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--train-csv", type=Path, required=True)
    p.add_argument("--test-csv", type=Path, required=True)
    p.add_argument("--train", type=Path, required=True, help="output train Parquet")
    p.add_argument("--test", type=Path, required=True, help="output test Parquet")
    args = p.parse_args(argv)
    prep = load_section("prep", args.params)
    for src, out in ((args.train_csv, args.train), (args.test_csv, args.test)):
        rows = csv_to_parquet(src, out, compression=prep.compression, compression_level=prep.compression_level,
                              row_group_size=prep.row_group_size)
        print(f"parquet: {src} -> {out}: {rows} rows, {out.stat().st_size} bytes")


if __name__ == "__main__":
    run_stage(main)
