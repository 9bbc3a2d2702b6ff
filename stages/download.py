"""DVC stage `download`: the chosen dataset's four IDX .gz files, verified, into --out."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline.cli import parser, run_stage
from pipeline.download import fetch_dataset, write_skipped
from pipeline.params import load_section
from pipeline.sources import DATASETS


def main(argv: Sequence[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--out", type=Path, required=True, help="output folder (data/raw)")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds per network operation and rate window; overrides data.timeout_s for a run by hand",
    )
    args = p.parse_args(argv)
    data = load_section("data", args.params)
    if data.dataset not in DATASETS:  # the user's own csv or images
        write_skipped(args.out, data.dataset)
        print(f"download: skipped (data.dataset is {data.dataset})")
        return
    timeout = data.timeout_s if args.timeout is None else args.timeout
    record = fetch_dataset(
        DATASETS[data.dataset],
        args.out,
        mirrors=data.mirrors,
        timeout=timeout,
        min_rate_kbps=data.min_rate_kbps,
    )
    for name, info in record["files"].items():
        print(f"download: {name} verified, from {info['source']}")


if __name__ == "__main__":
    run_stage(main)
