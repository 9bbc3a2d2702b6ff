"""Benchmark of the data stages: ``python -m benchmarks.prep`` -> ``bench/prep.{json,md}``.

Runs each stage exactly as DVC does (``python -m stages.<name>``, a fresh
process) into an empty scratch folder, so the times include interpreter start
and imports, and reports the wall time of each stage, its own peak resident
memory and the size of every output. DVC's own bookkeeping (hashing and
caching outputs) is not included; ``dvc repro`` adds it on top.

Two sources, each of which can be skipped (``--skip-fashion``,
``--skip-images``; the skipped part's previous figures are kept from the
existing ``prep.json``):

* FashionMNIST from the local mirror (IDX files), fastest of ``--repeats`` runs;
* a 3x32x32 PNG image folder (``data.dataset: images``), 50,000 train and
  10,000 test images made by :func:`benchmarks.imagefolder.make_image_folder`,
  generated once into ``--images-dir`` and reused while its counts match:
  the folder is the input, as a user's photos would be, so generating it is
  not a stage.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DATA_STAGES = ("download", "csv", "parquet", "tensorize")
TRAIN_OUTPUTS = (
    "models",
    "checkpoints",
    "dvclive",
)  # the train stage's output folders, as dvc.yaml names them
IMAGE_SHAPE = (3, 32, 32)


def path_bytes(path: Path) -> int:
    """Size of a file, or of every file under a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def stage_commands(work: Path, names: Sequence[str] = DATA_STAGES) -> list[tuple[str, list[str]]]:
    """The dvc.yaml commands of ``names``, with ``data/`` and the train stage's outputs in ``work``."""
    with open(ROOT / "dvc.yaml", encoding="utf-8") as f:
        stages = yaml.safe_load(f)["stages"]
    out = []
    for name in names:
        argv = stages[name]["cmd"].split()
        argv = [str(work / a) if a.startswith("data/") or a in TRAIN_OUTPUTS else a for a in argv]
        argv[0] = sys.executable
        out.append((name, argv))
    return out


def stage_outputs(work: Path, name: str) -> list[Path]:
    """The outputs dvc.yaml lists for stage ``name``, in ``work``."""
    with open(ROOT / "dvc.yaml", encoding="utf-8") as f:
        outs = yaml.safe_load(f)["stages"][name].get("outs", [])
    return [work / (out if isinstance(out, str) else next(iter(out))) for out in outs]


def measure_fashion(params: Path, repeats: int, parent: Path) -> dict:
    """FashionMNIST, every data stage, fastest of ``repeats`` runs into fresh scratch folders."""
    from benchmarks.scale import run_stages  # not at the top: benchmarks.scale imports this module

    results: dict = {"stages": {}, "peak_rss_mb": {}, "repeats": repeats}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="prep-bench-", dir=parent) as tmp:
            work = Path(tmp)
            shutil.copytree(ROOT / "data" / "user", work / "data" / "user", dirs_exist_ok=True)
            for name, run in run_stages(work, params).items():
                best = results["stages"].get(name)
                results["stages"][name] = run["seconds"] if best is None else min(best, run["seconds"])
                results["peak_rss_mb"][name] = max(results["peak_rss_mb"].get(name, 0.0), run["peak_rss_mb"])
            data = work / "data"
            results["bytes"] = {
                "raw_gz": path_bytes(data / "raw"),
                "csv_train": path_bytes(data / "csv" / "train.csv"),
                "csv_test": path_bytes(data / "csv" / "test.csv"),
                "parquet_train": path_bytes(data / "parquet" / "train.parquet"),
                "parquet_test": path_bytes(data / "parquet" / "test.parquet"),
                "shards_train": path_bytes(data / "tensors" / "train"),
                "shards_test": path_bytes(data / "tensors" / "test"),
            }
    results["total_seconds"] = sum(results["stages"].values())
    return results


def _image_folder_matches(folder: Path, n_train: int, n_test: int, shape: tuple[int, int, int]) -> bool:
    """A folder generated earlier with these counts and this shape (one image opened to check the shape)."""
    from PIL import Image

    counts = [
        sum(1 for _ in (folder / split).rglob("*.png")) if (folder / split).is_dir() else 0
        for split in ("train", "test")
    ]
    if counts != [n_train, n_test] or not n_train:
        return False
    with Image.open(next((folder / "train").rglob("*.png"))) as image:
        return image.size == (shape[2], shape[1]) and len(image.getbands()) == shape[0]


def cached_image_folder(
    folder: Path,
    n_train: int,
    n_test: int,
    shape: tuple[int, int, int] = IMAGE_SHAPE,
) -> float | None:
    """The generated PNG folder at ``folder``: reused when its counts and shape match, else (re)generated.
    Returns the seconds spent generating it (None when reused)."""
    from benchmarks.imagefolder import make_image_folder

    if _image_folder_matches(folder, n_train, n_test, shape):
        return None
    t0 = time.perf_counter()
    make_image_folder(folder, n_train, n_test, shape=shape)
    return round(time.perf_counter() - t0, 2)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copy2(src, dst)


def measure_images(folder: Path, n_train: int, n_test: int, repeats: int, parent: Path) -> dict:
    """The data stages on the image folder (``data.image_shape: null``, taken from the files), fastest of
    ``repeats`` runs; each stage's seconds, peak RSS and output bytes, and the folder's own bytes."""
    from benchmarks.report import run_conditions
    from benchmarks.scale import run_stages

    generated_s = cached_image_folder(folder, n_train, n_test)
    results: dict = {
        "images_dir": str(folder),
        "train_images": n_train,
        "test_images": n_test,
        "image_shape": list(IMAGE_SHAPE),
        "generated_seconds": generated_s,
        "folder_bytes": path_bytes(folder),
        "stages": {},
        "repeats": repeats,
    }
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="prep-images-", dir=parent) as tmp:
            work = Path(tmp)
            # The csv stage takes user data from data/user only (dvc.yaml tracks that folder): the
            # cached folder is linked in file by file, which costs no copy and is not timed.
            images = work / "data" / "user" / "images"
            shutil.copytree(folder, images, copy_function=_link_or_copy)
            params = work / "params.yaml"
            params.write_text(json.dumps({"data": {"dataset": "images", "images_dir": str(images)}}))
            runs = run_stages(work, params)
            data = work / "data"
            outputs = {
                "download": [data / "raw"],
                "csv": [data / "csv" / "train.csv", data / "csv" / "test.csv"],
                "parquet": [data / "parquet" / "train.parquet", data / "parquet" / "test.parquet"],
                "tensorize": [data / "tensors" / "train", data / "tensors" / "test"],
            }
            for name, run in runs.items():
                best = results["stages"].get(name)
                if best is None or run["seconds"] < best["seconds"]:
                    results["stages"][name] = {**run, "bytes": [path_bytes(p) for p in outputs[name]]}
    results["total_seconds"] = round(sum(s["seconds"] for s in results["stages"].values()), 3)
    results["conditions"] = run_conditions()
    return results


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f}"


def render_markdown(r: dict) -> str:
    """The FashionMNIST table and the image-folder table, each with the conditions it was measured in."""
    from benchmarks.report import conditions_text

    lines = [
        "# Data preparation: `python -m benchmarks.prep`",
        "",
        "Each data stage as `dvc repro` runs it (`python -m stages.<name>`, a fresh process, an empty output "
        "folder); seconds include interpreter start and imports, peak RSS is the stage process's own "
        "high-water mark (VmHWM).",
        "",
    ]
    fashion = (
        r if "stages" in r else None
    )  # the FashionMNIST part sits at the top, as before the image folder
    if fashion:
        lines += [
            f"## FashionMNIST (IDX, local mirror), fastest of {fashion['repeats']} runs",
            "",
            conditions_text(fashion["conditions"]) if "conditions" in fashion else "",
            "",
            "| stage | seconds | peak RSS MB |",
            "|---|---:|---:|",
        ]
        for name, seconds in fashion["stages"].items():
            peak = fashion.get("peak_rss_mb", {}).get(name)
            lines.append(f"| {name} | {seconds:.2f} | {'n/a' if peak is None else f'{peak:.0f}'} |")
        lines += [
            f"| **total** | **{fashion['total_seconds']:.2f}** | |",
            "",
            "Bytes: " + ", ".join(f"{k} {_mb(v)} MB" for k, v in fashion["bytes"].items()) + ".",
            "",
        ]
    images = r.get("image_folder")
    if images:
        c, h, w = images["image_shape"]
        lines += [
            f"## Image folder, {c}x{h}x{w} PNG, {images['train_images']:,} train + "
            f"{images['test_images']:,} test images, fastest of {images['repeats']} run(s)",
            "",
            conditions_text(images["conditions"]),
            "",
            f"Input: `benchmarks.imagefolder.make_image_folder` (class stripes plus noise, PNG level 1), "
            f"{_mb(images['folder_bytes'])} MB in {images['train_images'] + images['test_images']:,} files"
            + (
                ", generated by an earlier run (reused)."
                if images["generated_seconds"] is None
                else f", generated in {images['generated_seconds']:.1f} s (not a stage)."
            ),
            "`data.dataset: images`, `data.image_shape: null` (the shape is read from the files).",
            "",
            "| stage | seconds | peak RSS MB | output | MB train / test |",
            "|---|---:|---:|---|---:|",
        ]
        what = {
            "download": "source.json only",
            "csv": "listing `label,file`",
            "parquet": "pixels, decoded",
            "tensorize": "float32 safetensors shards",
        }
        for name, s in images["stages"].items():
            sizes = " / ".join(_mb(b) for b in s["bytes"])
            lines.append(f"| {name} | {s['seconds']:.2f} | {s['peak_rss_mb']:.0f} | {what[name]} | {sizes} |")
        lines += [f"| **total** | **{images['total_seconds']:.2f}** | | | |", ""]
    return "\n".join(lines) + "\n"


def _previous(out: Path) -> dict:
    """The existing prep.json, whose figures a skipped part keeps."""
    try:
        return json.loads((out / "prep.json").read_text())
    except (OSError, ValueError):
        return {}


def main(argv: list[str] | None = None) -> None:
    from benchmarks.report import run_conditions, scratch_parent, write_results

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--params", type=Path, default=ROOT / "params.yaml", help="params of the FashionMNIST part"
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="FashionMNIST: report the fastest of this many runs"
    )
    p.add_argument("--image-repeats", type=int, default=1, help="image folder: the fastest of this many runs")
    p.add_argument("--images", type=int, default=50_000, help="train images in the generated folder")
    p.add_argument("--images-test", type=int, default=10_000, help="test images in the generated folder")
    p.add_argument(
        "--images-dir",
        type=Path,
        default=None,
        help="where the generated folder is kept between runs (default: prep-images-3x32x32 under --work)",
    )
    p.add_argument(
        "--skip-fashion", action="store_true", help="keep the FashionMNIST part of the existing prep.json"
    )
    p.add_argument(
        "--skip-images", action="store_true", help="keep the image-folder part of the existing prep.json"
    )
    p.add_argument(
        "--work", type=Path, default=None, help="scratch folder (default: the system's temporary one)"
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench", help="folder of prep.json and prep.md")
    args = p.parse_args(argv)
    parent = scratch_parent(args.work)
    results = _previous(args.out)
    if not args.skip_fashion:
        results.update(measure_fashion(args.params.resolve(), args.repeats, parent))
        results["conditions"] = run_conditions()
        results["params"] = os.path.relpath(args.params.resolve(), ROOT)
    if not args.skip_images:
        folder = (args.images_dir or parent / "prep-images-3x32x32").resolve()
        results["image_folder"] = measure_images(
            folder, args.images, args.images_test, args.image_repeats, parent
        )
    results["machine"] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    write_results(args.out, "prep", results, render_markdown(results))


if __name__ == "__main__":
    main()
