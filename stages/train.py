"""Stage ``train``: SimpleCNN on the tensor shards, metrics into DVCLive, model as safetensors.

With ``train.processes > 1`` (and not already started by torchrun) the stage
runs itself again as that many DDP processes under torchrun and exits with
its exit code.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.cli import parser, run_stage
from pipeline.params import load_section
from trainer.distributed import run_rank, under_launcher
from trainer.run import train as train_model
from trainer.run import train_in_processes


def main(argv: Sequence[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--train", type=Path, required=True, help="train split folder (manifest.json + shards)")
    p.add_argument("--test", type=Path, required=True, help="test split folder (manifest.json + shards)")
    p.add_argument(
        "--val",
        type=Path,
        default=None,
        help="validation split folder; with samples in it, val_loss and val_acc are logged",
    )
    p.add_argument(
        "--model", type=Path, required=True, help="output folder for model.safetensors + model.json"
    )
    p.add_argument(
        "--checkpoints", type=Path, required=True, help="folder for resumable checkpoints (not a DVC output)"
    )
    p.add_argument("--live", type=Path, required=True, help="DVCLive folder (metrics.json, plots/metrics)")
    p.add_argument(
        "--shard-cache",
        type=Path,
        default=None,
        help="where splits streamed from the DVC remote are cached (default: .shardcache in the repository)",
    )
    args = p.parse_args(argv)
    # Both sections are checked before any data is touched.
    loader = load_section("loader", args.params)
    train = load_section("train", args.params)
    if train.processes > 1 and not under_launcher():
        args_again = list(sys.argv[1:] if argv is None else argv)
        sys.exit(
            train_in_processes(
                args_again,
                train_dir=args.train,
                test_dir=args.test,
                checkpoint_dir=args.checkpoints,
                train=train,
                val_dir=args.val,
            )
        )
    train_model(
        train_dir=args.train,
        test_dir=args.test,
        val_dir=args.val,
        model_dir=args.model,
        checkpoint_dir=args.checkpoints,
        live_dir=args.live,
        shard_cache=args.shard_cache,
        loader=loader,
        train=train,
    )


if __name__ == "__main__":
    if under_launcher():  # one of several training processes: see run_rank for why it exits this way
        run_rank(lambda: run_stage(main))
    run_stage(main)
