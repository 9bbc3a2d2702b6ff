"""DVC stage `tensorize`: Parquet -> safetensors shards and a manifest.json per split, on every core.

Shards hold normalised float32 images, or the uint8 bytes (``prep.shard_dtype``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline.cli import parser, run_stage
from pipeline.params import load_section
from pipeline.pool import library_threads, use_cores


def main(argv: Sequence[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--train-parquet", type=Path, required=True)
    p.add_argument("--test-parquet", type=Path, required=True)
    p.add_argument("--train", type=Path, required=True, help="output folder for train shards")
    p.add_argument("--test", type=Path, required=True, help="output folder for test shards")
    p.add_argument(
        "--val", type=Path, default=None, help="output folder for validation shards (data.val_fraction)"
    )
    args = p.parse_args(argv)
    data = load_section("data", args.params)
    prep = load_section("prep", args.params)
    use_cores(prep.workers, pieces_here=True)  # this process writes shards beside its workers
    # Imported after use_cores: Polars sizes its thread pool when it is first imported.
    from pipeline.tensorize import tensorize

    print(f"tensorize: {library_threads(prep.workers)}")
    manifests = tensorize(
        args.train_parquet,
        args.test_parquet,
        args.train,
        args.test,
        args.val,
        dataset=data.dataset,
        shard_size=prep.shard_size,
        normalize_kind=prep.normalize,
        image_shape=data.image_shape,
        test_fraction=data.test_fraction,
        val_fraction=data.val_fraction,
        shard_dtype=prep.shard_dtype,
        workers=prep.workers,
    )
    for split, m in manifests.items():
        print(
            f"tensorize: {split}: {m.num_samples} samples of {m.num_classes} classes, "
            f"{list(m.image_shape)}, in {len(m.shards)} shards"
        )


if __name__ == "__main__":
    run_stage(main)
