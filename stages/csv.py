"""DVC stage `csv`: one canonical table per split.

- fashion-mnist / mnist: the IDX files as ``label,pixel1..pixel784`` CSV;
- csv: the user's CSVs, checked cell by cell and copied with the canonical header;
- images: the listing ``label,file`` of the image folder's train and test splits
  (headers checked, by ``prep.workers`` processes in a large folder; the parquet stage
  decodes the pixels).
A source without a test split gets a test table with no rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline import images
from pipeline.cli import parser, run_stage
from pipeline.download import verify_raw
from pipeline.errors import DataError
from pipeline.params import DataParams, load_section
from pipeline.pool import library_threads, resolve_workers, use_cores
from pipeline.sources import DATASETS
from pipeline.tabular import NAME_LABELS


def _user_csv(data: DataParams, user: Path | None, outputs: dict[str, Path], where: str) -> None:
    from pipeline import csvdata  # imported after use_cores (in main): it imports Polars

    sources = {"train": Path(data.train_csv), "test": None if data.test_csv is None else Path(data.test_csv)}
    if user is not None:
        for split, src in sources.items():
            if src is not None:
                csvdata.check_user_location(src, user, f"data.{split}_csv", where)
    shape, labels = csvdata.import_user_csv(
        sources["train"], outputs["train"], image_shape=data.image_shape, check_values=True
    )
    print(f"csv: train: {sources['train']} -> {outputs['train']} ({labels} labels, images {list(shape)})")
    if sources["test"] is None:
        csvdata.write_empty_csv(outputs["test"], shape[0] * shape[1] * shape[2])
        print(
            f"csv: test: none (data.test_csv is null): held out of train by data.test_fraction "
            f"{data.test_fraction}"
        )
        return
    _, test_labels = csvdata.import_user_csv(
        sources["test"], outputs["test"], image_shape=shape, check_values=True
    )
    if test_labels != labels:
        raise DataError(
            f"{sources['test']}: labels are {test_labels}s but {sources['train']}'s are {labels}s; "
            f"labels must not mix integers and names"
        )
    if labels == NAME_LABELS:
        csvdata.check_test_classes(outputs["train"], outputs["test"], sources["train"], sources["test"])
    print(f"csv: test: {sources['test']} -> {outputs['test']}")


def _image_folder(
    data: DataParams, user: Path | None, outputs: dict[str, Path], where: str, workers: int
) -> None:
    from pipeline import csvdata  # imported after use_cores (in main): it imports Polars

    root = Path(data.images_dir)
    if user is not None:
        csvdata.check_user_location(root, user, "data.images_dir", where)
    train, test = images.scan_splits(root)
    shape = images.check_images(root, [*train, *test], data.image_shape, workers)
    for split, entries in (("train", train), ("test", test)):
        images.write_listing(entries, outputs[split])
        print(
            f"csv: {split}: {len(entries)} images of {root} listed -> {outputs[split]} (images {list(shape)})"
        )


def main(argv: Sequence[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--raw", type=Path, required=True, help="folder of the download stage (data/raw)")
    p.add_argument("--train", type=Path, required=True, help="output train CSV")
    p.add_argument("--test", type=Path, required=True, help="output test CSV")
    p.add_argument(
        "--user",
        type=Path,
        default=None,
        help="folder dvc.yaml tracks for the user's CSVs and images (data/user); with it, data elsewhere "
        "is refused",
    )
    args = p.parse_args(argv)
    data = load_section("data", args.params)
    prep = load_section("prep", args.params)
    use_cores(prep.workers)  # before Polars is first imported (pipeline.csvdata)
    print(f"csv: {library_threads(prep.workers)}")
    outputs = {"train": args.train, "test": args.test}
    if data.dataset == "csv":
        _user_csv(data, args.user, outputs, args.params)
        return
    if data.dataset == "images":
        _image_folder(data, args.user, outputs, args.params, resolve_workers(prep.workers))
        return
    from pipeline import csvdata  # imported after use_cores: it imports Polars

    spec = DATASETS[data.dataset]
    verify_raw(spec, args.raw)  # data/raw may come from a remote or by hand, not through `download`
    for split, out in outputs.items():
        files = spec.train if split == "train" else spec.test
        rows = csvdata.idx_to_csv(args.raw / files.images.name, args.raw / files.labels.name, out)
        print(f"csv: {split}: {rows} rows -> {out}")


if __name__ == "__main__":
    run_stage(main)
