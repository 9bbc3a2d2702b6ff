"""DVC stage `parquet`: each split's table -> Parquet (strict schema, bounded memory).

CSV tables become the wide layout; an image folder's listings are decoded with
Pillow into the image layout (``pipeline/parquet.py`` describes both).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline.cli import parser, run_stage
from pipeline.params import load_section
from pipeline.pool import library_threads, use_cores


def main(argv: Sequence[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--train-csv", type=Path, required=True)
    p.add_argument("--test-csv", type=Path, required=True)
    p.add_argument("--train", type=Path, required=True, help="output train Parquet")
    p.add_argument("--test", type=Path, required=True, help="output test Parquet")
    args = p.parse_args(argv)
    data = load_section("data", args.params)
    prep = load_section("prep", args.params)
    use_cores(prep.workers)
    # Imported after use_cores: Polars sizes its thread pool when it is first imported.
    from pipeline.parquet import csv_to_parquet, images_to_parquet, open_table

    print(f"parquet: {library_threads(prep.workers)}")
    codec = {
        "compression": prep.compression,
        "compression_level": prep.compression_level,
        "row_group_size": prep.row_group_size,
    }
    for split, src, out in (("train", args.train_csv, args.train), ("test", args.test_csv, args.test)):
        if (
            data.dataset == "images"
        ):  # test images take the train split's shape (an empty test split has none)
            shape = data.image_shape if split == "train" else open_table(args.train).image_shape
            rows = images_to_parquet(
                src, Path(data.images_dir), out, image_shape=shape, workers=prep.workers, **codec
            )
        else:  # a source without a test split has an empty test table
            rows = csv_to_parquet(src, out, allow_empty=split == "test", workers=prep.workers, **codec)
        print(f"parquet: {src} -> {out}: {rows} rows, {out.stat().st_size} bytes")


if __name__ == "__main__":
    run_stage(main)
