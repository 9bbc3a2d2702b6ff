"""DVC stage `csv`: IDX -> label,pixel1..pixel784 CSV, or the user's CSV (data.dataset: csv)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline.cli import parser, run_stage
from pipeline.csvdata import check_user_csv_location, idx_to_csv, import_user_csv
from pipeline.download import verify_raw
from pipeline.params import load_section
from pipeline.sources import DATASETS


def main(argv: Sequence[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--raw", type=Path, required=True, help="folder of the download stage (data/raw)")
    p.add_argument("--train", type=Path, required=True, help="output train CSV")
    p.add_argument("--test", type=Path, required=True, help="output test CSV")
    p.add_argument("--user", type=Path, default=None,
                   help="folder dvc.yaml tracks for the user's CSVs (data/user); with it, a CSV elsewhere is refused")
    args = p.parse_args(argv)
    data = load_section("data", args.params)
    outputs = {"train": args.train, "test": args.test}
    if data.dataset == "csv":
        sources = {"train": Path(data.train_csv), "test": Path(data.test_csv)}
        if args.user is not None:
            for split, src in sources.items():
                check_user_csv_location(src, args.user, f"data.{split}_csv", args.params)
        for split, out in outputs.items():
            import_user_csv(sources[split], out, check_values=True)
            print(f"csv: {split}: {sources[split]} -> {out}")
        return
    spec = DATASETS[data.dataset]
    verify_raw(spec, args.raw)  # data/raw may come from a remote or by hand, not through `download`
    for split, out in outputs.items():
        files = spec.train if split == "train" else spec.test
        rows = idx_to_csv(args.raw / files.images.name, args.raw / files.labels.name, out)
        print(f"csv: {split}: {rows} rows -> {out}")


if __name__ == "__main__":
    run_stage(main)
