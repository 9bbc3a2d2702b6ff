"""A generated image folder, and the Parquet image layout measured against wide UInt8 columns.

``python -m benchmarks.imagefolder --out DIR --train 50000 --test 10000`` writes
``DIR/train/<class>/<n>.png`` (and ``test/``): class-dependent stripes (an
angle and a colour per class, a random phase) plus noise, so a small CNN can
learn them, generated in a few seconds per 10,000 images and identical for a
given seed. ``--layouts`` then compares, on the train images, the layout
:mod:`pipeline.images` writes (one ``fixed_size_binary(C*H*W)`` column) with
C*H*W ``uint8`` columns: file bytes, seconds to write and to read back into an
(N, C*H*W) array, and each step's peak RSS in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.atomic import atomic_dir
from pipeline.cpuinfo import cpu_model
from pipeline.images import scan_split, write_listing
from pipeline.parquet import images_to_parquet

# prep.row_group_size's default when bench/imagefolder.md was measured (now 32768); kept, so that a
# rerun compares like with like (the image writer caps it at 64 MiB of pixels)
ROW_GROUP_SIZE = 65536
CODEC = "zstd"  # params.yaml's prep.compression


def class_images(
    labels: np.ndarray, shape: tuple[int, int, int], classes: int, rng: np.random.Generator
) -> np.ndarray:
    """(N, H, W, C) uint8 images: stripes at the class's angle in the class's colour, random phase, noise."""
    channels, height, width = shape
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = np.pi * labels / classes
    phase = rng.uniform(0, 2 * np.pi, len(labels))
    along = x[None] * np.cos(angle)[:, None, None] + y[None] * np.sin(angle)[:, None, None]
    stripes = np.sin(2 * np.pi * 3 * along / width + phase[:, None, None])  # three periods across
    colours = np.random.default_rng(1234).uniform(0.3, 1.0, (classes, channels)).astype(np.float32)
    images = 128 + 100 * stripes[..., None] * colours[labels][:, None, None, :]
    images += rng.normal(0, 25, images.shape).astype(np.float32)
    return np.clip(images, 0, 255).astype(np.uint8)


def _write_split(
    folder: Path, split: str, n: int, shape: tuple[int, int, int], classes: int, seed: int, suffix: str
) -> None:
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    for k in range(classes):
        (folder / split / f"class{k:02d}").mkdir(parents=True)
    for start in range(0, n, 4096):  # a block at a time: memory stays small whatever n is
        labels = rng.integers(0, classes, min(4096, n - start))
        for i, (label, image) in enumerate(
            zip(labels, class_images(labels, shape, classes, rng)), start=start
        ):
            Image.fromarray(image.squeeze(-1) if shape[0] == 1 else image).save(
                folder / split / f"class{label:02d}" / f"{i:06d}{suffix}", compress_level=1, quality=90
            )  # each format takes its own option


def make_image_folder(
    root: Path,
    n_train: int,
    n_test: int,
    shape: tuple[int, int, int] = (3, 32, 32),
    classes: int = 10,
    seed: int = 0,
    suffix: str = ".png",
) -> None:
    """Write a deterministic image folder at ``root`` (replaced atomically, as one folder), its files
    PNGs, or JPEGs with ``suffix=".jpg"``."""
    with atomic_dir(root) as tmp:
        _write_split(tmp, "train", n_train, shape, classes, seed, suffix)
        if n_test:
            _write_split(tmp, "test", n_test, shape, classes, seed, suffix)


# ============================================================================ layout comparison


def _pixels_of_binary(path: Path) -> np.ndarray:
    """(N, C*H*W) from the image layout: one buffer per row group, no per-cell work."""
    column = pq.read_table(path, columns=["pixels"]).column("pixels")
    width = column.type.byte_width
    parts = [np.frombuffer(c.buffers()[1], np.uint8, len(c) * width, c.offset * width) for c in column.chunks]
    return np.concatenate(parts).reshape(-1, width)


def _pixels_of_wide(path: Path) -> np.ndarray:
    """(N, C*H*W) from C*H*W uint8 columns."""
    table = pq.read_table(path)
    return np.stack([table.column(i).to_numpy() for i in range(table.num_columns)], axis=1)


def _write_binary(pixels: np.ndarray, out: Path) -> None:
    """The image layout's pixels column alone, from memory (as pipeline.images writes it, minus decoding)."""
    kind = pa.binary(pixels.shape[1])
    rows = min(ROW_GROUP_SIZE, 64 * 1024 * 1024 // pixels.shape[1])
    with pq.ParquetWriter(out, pa.schema([pa.field("pixels", kind)]), compression=CODEC) as writer:
        for start in range(0, len(pixels), rows):
            block = np.ascontiguousarray(pixels[start : start + rows])
            array = pa.FixedSizeBinaryArray.from_buffers(kind, len(block), [None, pa.py_buffer(block)])
            writer.write_table(pa.table({"pixels": array}))


def _write_wide(pixels: np.ndarray, out: Path) -> None:
    schema = pa.schema([pa.field(f"pixel{i + 1}", pa.uint8()) for i in range(pixels.shape[1])])
    rows = min(ROW_GROUP_SIZE, 64 * 1024 * 1024 // pixels.shape[1])  # the same row groups as the image writer
    with pq.ParquetWriter(out, schema, compression=CODEC) as writer:
        for start in range(0, len(pixels), rows):
            block = pixels[start : start + rows]
            writer.write_table(
                pa.table([pa.array(block[:, i]) for i in range(block.shape[1])], schema=schema)
            )


def _measure(step: str, images_dir: Path, work: Path) -> dict:
    """One step, timed, in this (fresh) process."""
    if step == "decode+write binary":
        t0 = time.perf_counter()
        images_to_parquet(
            work / "train.csv",
            images_dir,
            work / "binary.parquet",
            image_shape=None,
            compression=CODEC,
            compression_level=None,
            row_group_size=ROW_GROUP_SIZE,
        )
        seconds = time.perf_counter() - t0
    elif step in ("write binary", "write wide"):
        pixels = _pixels_of_binary(work / "binary.parquet")
        t0 = time.perf_counter()
        if step == "write binary":
            _write_binary(pixels, work / "pixels-only.parquet")
        else:
            _write_wide(pixels, work / "wide.parquet")
        seconds = time.perf_counter() - t0
    elif step == "imports":
        seconds = 0.0  # the peak RSS of an interpreter that imported this module and did nothing
    else:
        read = _pixels_of_binary if step == "read binary" else _pixels_of_wide
        t0 = time.perf_counter()
        pixels = read(work / ("binary.parquet" if step == "read binary" else "wide.parquet"))
        seconds = time.perf_counter() - t0
        assert pixels.dtype == np.uint8 and pixels.ndim == 2
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    return {"step": step, "seconds": round(seconds, 2), "peak_rss_mb": round(peak / 1e6, 1)}


def compare_layouts(images_dir: Path, work: Path) -> dict:
    """Each step in a fresh interpreter (its own peak RSS); the two files' sizes; the same pixels in both."""
    work.mkdir(parents=True, exist_ok=True)
    write_listing(scan_split(images_dir, "train"), work / "train.csv")
    steps = []
    for step in ("imports", "decode+write binary", "write binary", "write wide", "read binary", "read wide"):
        argv = [
            sys.executable,
            "-m",
            "benchmarks.imagefolder",
            "--step",
            step,
            "--out",
            str(images_dir),
            "--work",
            str(work),
        ]
        out = subprocess.run(argv, check=True, capture_output=True, text=True)
        steps.append(json.loads(out.stdout))
    same = np.array_equal(_pixels_of_binary(work / "binary.parquet"), _pixels_of_wide(work / "wide.parquet"))
    return {
        "images": pq.read_metadata(work / "binary.parquet").num_rows,
        "codec": CODEC,
        "cpu": cpu_model(),
        "bytes": {
            name: (work / f"{name}.parquet").stat().st_size for name in ("binary", "pixels-only", "wide")
        },
        "same_pixels": same,
        "steps": steps,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="the image folder to write (with --step: to read)")
    p.add_argument("--train", type=int, default=50_000)
    p.add_argument("--test", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--layouts", action="store_true", help="then compare the two Parquet layouts (JSON on stdout)"
    )
    p.add_argument("--work", type=Path, help="scratch folder of --layouts (default: a temporary one)")
    p.add_argument("--step", help=argparse.SUPPRESS)  # one measured step, run by compare_layouts
    args = p.parse_args(argv)
    if args.step:
        print(json.dumps(_measure(args.step, args.out, args.work)))
        return
    if args.out is None:
        p.error("--out is required")
    t0 = time.perf_counter()
    make_image_folder(args.out, args.train, args.test, seed=args.seed)
    print(
        f"wrote {args.train} + {args.test} images to {args.out} in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )
    if args.layouts:
        with tempfile.TemporaryDirectory(prefix="layouts-", dir=args.work) as tmp:
            print(json.dumps(compare_layouts(args.out, Path(tmp)), indent=2))


if __name__ == "__main__":
    main()
