"""Any image shape: ``python -m benchmarks.shapes`` -> ``bench/shapes.{json,md}``.

Two questions the dataset-agnostic pipeline must answer with figures:

* Does the loader stay near memory speed for other shapes? For 1x28x28 and
  3x32x32, shards of random pixels are written with the tensorize stage's own
  writer and one loader-only epoch (the trainer's dataset, sampler and loader,
  with params.yaml's loader settings) is timed, fastest of ``--repeats``,
  against a memcpy of the same float32 bytes. Goal: at most
  :data:`GOAL_LOADER_OVER_MEMCPY` times memcpy. :mod:`benchmarks.loader`
  reports the same figures through :func:`loader_vs_memcpy`.
* Does each kind of source train to a sensible accuracy? Every case runs the
  real stages (download, csv, parquet, tensorize, train, each a fresh
  ``python -m stages.<name>`` with a params file) in its own scratch folder
  and reports test accuracy (and validation accuracy where a val split is
  held out), the shape and classes the pipeline found, and the seconds taken.
  The cases: FashionMNIST from its IDX files, as a CSV with class names, as
  an 8x8 Kaggle-style CSV (downsampled with Pillow), as a PNG folder read at
  3x32x32 (grey to RGB, 28 to 32), and a generated 3x17x23 PNG folder with
  held-out test and val splits.

Every result carries the CPU model and the load average it was measured
under (:func:`benchmarks.report.run_conditions`).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.compute import memcpy_floor
from benchmarks.imagefolder import make_image_folder
from benchmarks.prep import ROOT
from benchmarks.report import (
    add_run_options,
    conditions_text,
    load_text,
    loader_shapes_lines,
    run_conditions,
    scratch_parent,
    write_results,
)
from benchmarks.scale import run_stages
from benchmarks.scalecsv import csv_lines, load_idx_split
from pipeline.manifest import read_manifest
from pipeline.normalize import make_normalization
from pipeline.params import load_section
from pipeline.sources import DATASETS
from pipeline.tensorize import write_split
from trainer.data import ShardDataset
from trainer.loader import EpochBatchSampler, make_loader, resolve_settings
from trainer.verify import validate_split

GOAL_LOADER_OVER_MEMCPY = 2.5
LOADER_SHAPES = {"1x28x28": (1, 28, 28), "3x32x32": (3, 32, 32)}
ALL_STAGES = ("download", "csv", "parquet", "tensorize", "train")
FASHION_NAMES = DATASETS["fashion-mnist"].class_names
IMAGES = Path("data/user/images")  # inside data/user, the folder the csv stage accepts user data from

# ============================================================================ loader against memcpy


def random_shards(out_dir: Path, shape: tuple[int, int, int], samples: int, seed: int = 0) -> Path:
    """A train split of ``samples`` random images of ``shape`` (unit normalisation), written by the
    tensorize stage's writer in 65,536-sample shards (params.yaml's prep.shard_size)."""
    rng = np.random.default_rng(seed)
    pixels = math.prod(shape)

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, samples, 8192):
            n = min(8192, samples - start)
            yield rng.integers(0, 256, (n, pixels), dtype=np.uint8), rng.integers(0, 10, n)

    write_split(
        chunks(),
        out_dir,
        dataset="images",
        split="train",
        shard_size=65536,
        normalization=make_normalization("unit", None, shape[0]),
        image_shape=shape,
    )
    return out_dir


def loader_epoch_seconds(split_dir: Path, params: Path, repeats: int) -> float:
    """Fastest of ``repeats`` loader-only epochs over a train split, built as the trainer builds its loader
    (params.yaml's loader section on the CPU); every batch is touched, so nothing stays lazy."""
    split = validate_split(split_dir, expected_split="train")
    settings = resolve_settings(load_section("loader", params), torch.device("cpu"))
    sampler = EpochBatchSampler(
        split.num_samples,
        settings.batch_size,
        shuffle=settings.shuffle,
        seed=load_section("train", params).seed,
        shard_sizes=[s.num_samples for s in split.shards],
        shuffle_window=settings.shuffle_window,
    )
    loader = make_loader(ShardDataset(split), sampler, settings)
    best = math.inf
    for epoch in range(repeats):
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        for images, labels in loader:
            _ = images.view(-1)[-1].item() + int(labels[-1])
        best = min(best, time.perf_counter() - t0)
    return best


def loader_vs_memcpy(
    samples: int,
    repeats: int,
    params: Path,
    parent: Path | None = None,
    shapes: dict[str, tuple[int, int, int]] = LOADER_SHAPES,
) -> dict:
    """Per shape: the loader-only epoch over ``samples`` random images, a memcpy of the same float32 bytes,
    their ratio and whether it meets :data:`GOAL_LOADER_OVER_MEMCPY`."""
    rows = []
    for name, shape in shapes.items():
        with tempfile.TemporaryDirectory(prefix=f"shapes-loader-{name}-", dir=parent) as tmp:
            loader_s = loader_epoch_seconds(
                random_shards(Path(tmp) / "train", shape, samples), params, repeats
            )
        nbytes = samples * math.prod(shape) * 4
        memcpy_s = memcpy_floor(repeats, nbytes)
        ratio = loader_s / memcpy_s
        rows.append(
            {
                "shape": name,
                "samples": samples,
                "float32_bytes": nbytes,
                "loader_epoch_s": loader_s,
                "memcpy_s": memcpy_s,
                "loader_over_memcpy": round(ratio, 2),
                "goal_met": ratio <= GOAL_LOADER_OVER_MEMCPY,
                "conditions": run_conditions(),
            }
        )
        print(f"loader {name}: {loader_s:.4f} s, memcpy {memcpy_s:.4f} s, ratio {ratio:.2f}", flush=True)
    return {"goal": GOAL_LOADER_OVER_MEMCPY, "repeats": repeats, "rows": rows}


# ============================================================================ accuracy per shape and source


@dataclass(frozen=True)
class Sizes:
    """How much of each source a run uses (defaults: the full benchmark; the smoke test shrinks them)."""

    idx: Path  # FashionMNIST's IDX .gz files
    train: int | None  # FashionMNIST train rows of the CSV cases (None: all 60,000)
    test: int | None  # ... and test rows (None: all 10,000)
    folder_train: int  # FashionMNIST PNG folder
    folder_test: int
    synthetic_train: int  # the generated 3x17x23 folder (no test folder)
    epochs: int | None  # every case's epochs (None: each case's own)


@dataclass(frozen=True)
class Case:
    name: str
    source: str  # what the pipeline reads, for the table
    epochs: int
    prepare: Callable[[Path, Sizes], dict]  # writes the inputs under work; returns the params.yaml sections


def _fashion(sizes: Sizes, split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_idx_split(sizes.idx, split)
    return images[:limit], labels[:limit]


def write_csv(path: Path, pixels: np.ndarray, labels: list[str], first_pixel: int = 1) -> None:
    """``label,pixel<first>..`` then one row per image (uint8 rows [n, P]); labels are written as given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(
            b",".join([b"label", *(f"pixel{first_pixel + i}".encode() for i in range(pixels.shape[1]))])
            + b"\n"
        )
        for start in range(0, len(pixels), 8192):
            lines = csv_lines(pixels[start : start + 8192]).split(b"\n")[:-1]
            f.write(
                b"".join(
                    label.encode() + b"," + line + b"\n"
                    for label, line in zip(labels[start : start + 8192], lines)
                )
            )


def downsample(images: np.ndarray, side: int) -> np.ndarray:
    """uint8 rows [n, side*side]: each grey image resized with Pillow's BILINEAR filter."""
    return np.stack(
        [np.asarray(Image.fromarray(image).resize((side, side), Image.BILINEAR)) for image in images]
    ).reshape(len(images), side * side)


def _prepare_idx(work: Path, sizes: Sizes) -> dict:
    return {"data": {"dataset": "fashion-mnist", "mirrors": [str(sizes.idx)]}}


def _user_csv_params(work: Path, test: bool = True) -> dict:
    user = work / "data" / "user"
    return {
        "dataset": "csv",
        "train_csv": str(user / "train.csv"),
        "test_csv": str(user / "test.csv") if test else None,
    }


def _prepare_names(work: Path, sizes: Sizes) -> dict:
    for split, limit in (("train", sizes.train), ("test", sizes.test)):
        images, labels = _fashion(sizes, split, limit)
        write_csv(
            work / "data" / "user" / f"{split}.csv",
            images.reshape(len(images), -1),
            [FASHION_NAMES[k] for k in labels],
        )
    return {"data": _user_csv_params(work)}


def _prepare_8x8(work: Path, sizes: Sizes) -> dict:
    for split, limit in (("train", sizes.train), ("test", sizes.test)):
        images, labels = _fashion(sizes, split, limit)
        write_csv(
            work / "data" / "user" / f"{split}.csv",
            downsample(images, 8),
            [str(k) for k in labels],
            first_pixel=0,
        )  # Kaggle's names: label,pixel0..pixel63
    return {"data": {**_user_csv_params(work), "image_shape": None}}


def _prepare_png(work: Path, sizes: Sizes) -> dict:
    folders = [name.replace("/", "-") for name in FASHION_NAMES]  # "T-shirt/top" cannot name a folder
    for split, limit in (("train", sizes.folder_train), ("test", sizes.folder_test)):
        images, labels = _fashion(sizes, split, limit)
        for folder in folders:
            (work / IMAGES / split / folder).mkdir(parents=True)
        for i, (image, label) in enumerate(zip(images, labels)):
            Image.fromarray(image).save(
                work / IMAGES / split / folders[label] / f"{i:05d}.png", compress_level=1
            )
    return {"data": {"dataset": "images", "images_dir": str(work / IMAGES), "image_shape": [3, 32, 32]}}


def _prepare_png_augmented(work: Path, sizes: Sizes) -> dict:
    """The PNG folder case trained with ``train.augment: [flip, translate]``."""
    return {**_prepare_png(work, sizes), "train": {"augment": ["flip", "translate"]}}


def _prepare_synthetic(work: Path, sizes: Sizes) -> dict:
    make_image_folder(work / IMAGES, sizes.synthetic_train, 0, shape=(3, 17, 23))
    return {
        "data": {
            "dataset": "images",
            "images_dir": str(work / IMAGES),
            "test_fraction": 0.1,
            "val_fraction": 0.1,
        }
    }


CASES = {
    case.name: case
    for case in (
        Case("fashion-idx", "FashionMNIST IDX files (download stage, local mirror)", 5, _prepare_idx),
        Case("fashion-names", "FashionMNIST as a user CSV, class-name labels", 5, _prepare_names),
        Case(
            "fashion-8x8",
            "FashionMNIST downsampled to 8x8 (Pillow BILINEAR), Kaggle-style CSV, data.image_shape null",
            5,
            _prepare_8x8,
        ),
        Case(
            "fashion-png",
            "FashionMNIST subset as a PNG folder, data.image_shape [3, 32, 32]",
            5,
            _prepare_png,
        ),
        Case(
            "fashion-png-augment",
            "the same PNG folder, trained with train.augment [flip, translate]",
            5,
            _prepare_png_augmented,
        ),
        Case(
            "synthetic-17x23",
            "generated 3x17x23 PNG folder (stripes + noise), no test folder: "
            "test_fraction 0.1, val_fraction 0.1",
            3,
            _prepare_synthetic,
        ),
    )
}


def run_case(case: Case, sizes: Sizes, work: Path) -> dict:
    """Prepare the case's inputs, run every stage in ``work`` and read what it trained to."""
    t0 = time.perf_counter()
    params = case.prepare(work, sizes)
    prepare_s = time.perf_counter() - t0
    epochs = sizes.epochs or case.epochs
    params["train"] = {**params.get("train", {}), "epochs": epochs}
    params_file = work / "params.yaml"
    params_file.write_text(json.dumps(params))  # JSON is YAML
    (work / "data" / "user").mkdir(parents=True, exist_ok=True)  # the csv stage's --user folder
    stages = run_stages(work, params_file, ALL_STAGES, cwd=work)
    metrics = json.loads((work / "dvclive" / "metrics.json").read_text())
    manifests = {
        split: read_manifest(work / "data" / "tensors" / split)
        for split in ("train", "val", "test")
        if (work / "data" / "tensors" / split / "manifest.json").exists()
    }
    train = manifests["train"]
    return {
        "case": case.name,
        "source": case.source,
        "shape": list(train.image_shape),
        "classes": train.num_classes,
        "samples": {split: m.num_samples for split, m in manifests.items()},
        "epochs": epochs,
        "test_acc": metrics["test_acc"],
        "val_acc": metrics.get("val_acc"),
        "seconds": round(sum(s["seconds"] for s in stages.values()), 2),
        "prepare_seconds": round(prepare_s, 2),
        "stages": stages,
        "conditions": run_conditions(),
    }


def accuracy_table(names: list[str], sizes: Sizes, parent: Path) -> list[dict]:
    rows = []
    for name in names:
        work = Path(tempfile.mkdtemp(prefix=f"shapes-{name}-", dir=parent))
        try:
            row = run_case(CASES[name], sizes, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        rows.append(row)
        print(
            json.dumps({k: row[k] for k in ("case", "shape", "samples", "test_acc", "val_acc", "seconds")}),
            flush=True,
        )
    return rows


# ============================================================================ report


def render_markdown(r: dict) -> str:
    lines = [
        "# Any image shape: `python -m benchmarks.shapes`",
        "",
        f"Run: {conditions_text(r['conditions'])}.",
        *([r["note"]] if r["note"] else []),
        "",
    ]
    if r.get("loader"):
        lines += loader_shapes_lines(r["loader"])
    if r.get("accuracy"):
        lines += [
            "## Test accuracy per shape and source",
            "",
            "Every stage as `dvc repro` runs it (fresh processes, a params file, CPU). Samples are those the "
            "tensorize stage wrote (train / val / test); seconds are the five stages together, without "
            "building the inputs.",
            "",
            "| case | source | shape | classes | samples train / val / test | epochs | test_acc | val_acc "
            "| seconds | load (1 min) |",
            "|---|---|---|---:|---|---:|---:|---:|---:|---:|",
        ]
        for row in r["accuracy"]:
            s = row["samples"]
            split_counts = " / ".join(f"{s[k]:,}" if k in s else "-" for k in ("train", "val", "test"))
            val = "-" if row["val_acc"] is None else f"{row['val_acc']:.4f}"
            lines.append(
                f"| {row['case']} | {row['source']} | {'x'.join(map(str, row['shape']))} | "
                f"{row['classes']} | {split_counts} | {row['epochs']} | {row['test_acc']:.4f} | {val} | "
                f"{row['seconds']:.1f} | {load_text(row['conditions'])} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def _previous(path: Path) -> dict:
    """The existing results, whose part a skipped part keeps (each row carries its own conditions)."""
    try:
        return {k: v for k, v in json.loads(path.read_text()).items() if k in ("loader", "accuracy")}
    except (OSError, ValueError):
        return {}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--cases", nargs="+", choices=list(CASES), default=list(CASES), help="accuracy cases to run"
    )
    p.add_argument(
        "--skip-loader",
        action="store_true",
        help="leave out the loader-against-memcpy part (keep it from the existing shapes.json)",
    )
    p.add_argument(
        "--skip-accuracy",
        action="store_true",
        help="leave out the accuracy part (keep it from the existing shapes.json)",
    )
    p.add_argument("--loader-samples", type=int, default=50_000, help="samples per shape in the loader part")
    p.add_argument("--repeats", type=int, default=3, help="loader epochs per shape (the fastest counts)")
    p.add_argument(
        "--params", type=Path, default=ROOT / "params.yaml", help="its loader section times the loader"
    )
    p.add_argument(
        "--train-samples", type=int, default=None, help="FashionMNIST train rows of the CSV cases (all)"
    )
    p.add_argument(
        "--test-samples", type=int, default=None, help="FashionMNIST test rows of the CSV cases (all)"
    )
    p.add_argument("--folder-train", type=int, default=12_000, help="train PNGs of the FashionMNIST folder")
    p.add_argument("--folder-test", type=int, default=2_000, help="test PNGs of the FashionMNIST folder")
    p.add_argument("--synthetic-train", type=int, default=6_000, help="PNGs of the generated 3x17x23 folder")
    p.add_argument("--epochs", type=int, default=None, help="epochs of every case (default: each case's own)")
    add_run_options(p, "the full run needs ~2 GB")
    args = p.parse_args(argv)
    parent = scratch_parent(args.work)
    started = time.perf_counter()
    results = _previous(args.out / "shapes.json")
    results.update({"conditions": run_conditions(), "note": args.note})
    if not args.skip_loader:
        results["loader"] = loader_vs_memcpy(args.loader_samples, args.repeats, args.params.resolve(), parent)
    if not args.skip_accuracy:
        sizes = Sizes(
            args.idx.resolve(),
            args.train_samples,
            args.test_samples,
            args.folder_train,
            args.folder_test,
            args.synthetic_train,
            args.epochs,
        )
        results["accuracy"] = accuracy_table(args.cases, sizes, parent)
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_results(args.out, "shapes", results, render_markdown(results))


if __name__ == "__main__":
    main()
