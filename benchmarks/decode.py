"""Image folders decoded on every core: ``python -m benchmarks.decode`` -> ``bench/decode.{json,md}``.

Two generated JPEG folders (:func:`benchmarks.imagefolder.make_image_folder`): CIFAR-sized
(``--small`` images of 32x32, kept at 3x32x32) and photo-sized (``--photos`` images of
320x240, resized to 3x64x64). Each goes through the ``parquet`` stage as dvc.yaml runs it (a
fresh ``python -m stages.parquet``), with ``prep.workers`` 1 and with every core, the two
taken in turn ``--repeats`` times: the median wall time of each, how the stage decoded the
train split (:func:`pipeline.imagedecode.decode_plan`), and whether both wrote the same bytes.

Then where processes start to pay for small images: ``decoded_batches`` over the first K
images of the small folder on one thread, and in every core's process (the plan forced), for
each K of ``--counts``, medians of ``--repeats``: the figures behind
:data:`pipeline.imagedecode.PROCESSES_FROM_IMAGES`. Conditions (CPU, load) are recorded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.imagefolder import make_image_folder
from benchmarks.prep import ROOT, stage_commands
from benchmarks.report import conditions_text, run_conditions, scratch_parent, write_results
from pipeline import imagedecode
from pipeline.images import scan_split, write_listing
from pipeline.pool import cpu_count

FOLDERS = {  # name: (source shape C, H, W; data.image_shape, None to keep the images as they are)
    "small 32x32": ((3, 32, 32), None),
    "photos 320x240 to 64x64": ((3, 240, 320), [3, 64, 64]),
}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stage_runs(work: Path, name: str, images: Path, image_shape: list[int] | None, repeats: int) -> dict:
    """The parquet stage on ``images`` with prep.workers 1 and null, taken in turn: medians and bytes."""
    for split in ("train", "test"):
        write_listing(scan_split(images, split), work / "data" / "csv" / f"{split}.csv")
    [(_, argv)] = stage_commands(work, ["parquet"])
    seconds: dict[str, list[float]] = {"1": [], "all": []}
    digests: dict[str, list[str]] = {}
    for _ in range(repeats):
        for key, workers in (("1", 1), ("all", None)):
            params = work / f"params-{key}.yaml"
            doc = {
                "data": {"dataset": "images", "images_dir": str(images), "image_shape": image_shape},
                "prep": {"workers": workers},
            }
            params.write_text(json.dumps(doc))  # JSON is YAML
            started = time.perf_counter()
            subprocess.run([*argv, "--params", str(params)], cwd=ROOT, check=True, capture_output=True)
            seconds[key].append(time.perf_counter() - started)
            digests[key] = [_digest(work / "data" / "parquet" / f"{s}.parquet") for s in ("train", "test")]
    entries = scan_split(images, "train")
    plan = imagedecode.decode_plan(entries, images, cpu_count())
    median = {key: statistics.median(v) for key, v in seconds.items()}
    return {
        "folder": name,
        "train_images": len(entries),
        "plan_all_cores": "one thread" if plan.count == 1 else f"{plan.count} {plan.how}",
        "seconds": seconds,
        "median_s": median,
        "speedup": median["1"] / median["all"],
        "same_bytes": digests["1"] == digests["all"],
    }


# One timing of decoded_batches, in a fresh interpreter run with -c: its workers import no main module,
# so that starting them costs about what it costs the stage (whose main module imports little).
_SWEEP = """
import sys, time
from pathlib import Path
from pipeline import imagedecode
from pipeline.images import scan_split

imagedecode.PROCESSES_FROM_IMAGES = 0  # processes whenever more than one worker is asked for
images, k, workers = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
entries = scan_split(images, "train")[:k]
started = time.perf_counter()
for _batch in imagedecode.decoded_batches(entries, images, (3, 32, 32), False, 32768, workers):
    pass
print(time.perf_counter() - started)
"""


def count_sweep(images: Path, counts: list[int], repeats: int) -> list[dict]:
    """``decoded_batches`` over the first K small images: one thread against every core's process."""
    rows = []
    for k in counts:
        times: dict[str, list[float]] = {"thread": [], "processes": []}
        for _ in range(repeats):
            for key, workers in (("thread", 1), ("processes", cpu_count())):
                argv = [sys.executable, "-c", _SWEEP, str(images), str(k), str(workers)]
                done = subprocess.run(argv, cwd=ROOT, check=True, capture_output=True, text=True)
                times[key].append(float(done.stdout))
        one, many = statistics.median(times["thread"]), statistics.median(times["processes"])
        n = min(k, len(scan_split(images, "train")))
        rows.append({"images": n, "thread_s": one, "processes_s": many, "ratio": many / one})
    return rows


def render_markdown(r: dict) -> str:
    lines = [
        "# Image folders decoded on every core",
        "",
        f"`python -m benchmarks.decode`; {conditions_text(r['conditions'])}; all cores = {r['cores']}.",
        "",
        f"The `parquet` stage (a fresh process, as dvc.yaml runs it), median of {r['repeats']} runs of each "
        "setting taken in turn, seconds for both splits (test: a tenth of train, at least 8):",
        "",
        "| folder | train images | all cores decode on | prep.workers 1 | all cores | speed-up | same bytes |"
        "",
        "|---|---:|---|---:|---:|---:|---|",
    ]
    for s in r["stage"]:
        lines.append(
            f"| {s['folder']} | {s['train_images']:,} | {s['plan_all_cores']} | {s['median_s']['1']:.2f} | "
            f"{s['median_s']['all']:.2f} | {s['speedup']:.2f}x | {'yes' if s['same_bytes'] else 'NO'} |"
        )
    lines += [
        "",
        f"`decoded_batches` over the first K small images, median of {r['repeats']}: one thread against "
        f"{r['cores']} processes (the stage's own and its workers, started each time), each timing in a "
        f"fresh interpreter. The stage uses processes from {r['processes_from_images']:,} images.",
        "",
        "| K images | one thread s | processes s | processes / thread |",
        "|---:|---:|---:|---:|",
    ]
    for c in r["counts"]:
        lines.append(f"| {c['images']:,} | {c['thread_s']:.3f} | {c['processes_s']:.3f} | {c['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", type=int, default=20000, help="train images of 32x32 (test: a tenth)")
    p.add_argument("--photos", type=int, default=2000, help="train images of 320x240 (test: a tenth)")
    p.add_argument("--counts", type=int, nargs="+", default=[512, 2048, 4096, 8192, 20000])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--out", type=Path, default=ROOT / "bench")
    cfg = p.parse_args(argv)
    conditions = run_conditions()
    with tempfile.TemporaryDirectory(prefix="decode-", dir=scratch_parent(cfg.work)) as scratch:
        work = Path(scratch)
        stage = []
        for (name, (shape, image_shape)), n in zip(FOLDERS.items(), (cfg.small, cfg.photos), strict=True):
            images = work / name.split()[0]
            make_image_folder(images, n, max(8, n // 10), shape=shape, classes=2, suffix=".jpg")
            stage.append(stage_runs(work, name, images, image_shape, cfg.repeats))
        counts = count_sweep(work / "small", cfg.counts, cfg.repeats)
    results = {
        "conditions": conditions,
        "cores": cpu_count(),
        "repeats": cfg.repeats,
        "processes_from_images": imagedecode.PROCESSES_FROM_IMAGES,
        "stage": stage,
        "counts": counts,
    }
    write_results(cfg.out, "decode", results, render_markdown(results))


if __name__ == "__main__":
    main()
