"""DVC stage `tensorize`: Parquet -> normalised float32 safetensors shards + manifest.json."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline.cli import parser, run_stage
from pipeline.params import load_section
from pipeline.tensorize import tensorize


def main(argv: Sequence[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--train-parquet", type=Path, required=True)
    p.add_argument("--test-parquet", type=Path, required=True)
    p.add_argument("--train", type=Path, required=True, help="output folder for train shards")
    p.add_argument("--test", type=Path, required=True, help="output folder for test shards")
    args = p.parse_args(argv)
    data = load_section("data", args.params)
    prep = load_section("prep", args.params)
    train, test = tensorize(args.train_parquet, args.test_parquet, args.train, args.test,
                            dataset=data.dataset, shard_size=prep.shard_size, normalize_kind=prep.normalize)
    for m, out in ((train, args.train), (test, args.test)):
        print(f"tensorize: {m.split}: {m.num_samples} samples in {len(m.shards)} shards -> {out}")


if __name__ == "__main__":
    run_stage(main)
