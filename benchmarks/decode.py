"""Image folders on every core: ``python -m benchmarks.decode`` -> ``bench/decode.{json,md}``.

Two generated JPEG folders (:func:`benchmarks.imagefolder.make_image_folder`): CIFAR-sized
(``--small`` images of 32x32, kept at 3x32x32) and photo-sized (``--photos`` images of
320x240, resized to 3x64x64). Each goes through the ``csv`` stage (which checks every header)
and the ``parquet`` stage (which decodes every image) as dvc.yaml runs them (fresh
``python -m stages.<name>``), with ``prep.workers`` 1 and with every core, the two settings
taken in turn ``--repeats`` times: each stage's median wall time, how each shared out its work,
and whether both settings wrote the same bytes.

Then where processes start to pay for small images: the header checks and the decoding of the
first K images of the small folder in one process, and in every core's (forced), for each K of
``--counts``, medians of ``--repeats``: the figures behind
:data:`pipeline.images.CHECKS_IN_PROCESSES_FROM` and
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
from pipeline import images as images_module
from pipeline.images import scan_split
from pipeline.pool import cpu_count

FOLDERS = {  # name: (source shape C, H, W; data.image_shape, None to keep the images as they are)
    "small 32x32": ((3, 32, 32), None),
    "photos 320x240 to 64x64": ((3, 240, 320), [3, 64, 64]),
}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


STAGES = ("csv", "parquet")


def stage_runs(work: Path, name: str, images: Path, image_shape: list[int] | None, repeats: int) -> dict:
    """The csv and parquet stages on ``images`` with prep.workers 1 and null, each setting's pair taken
    in turn with the other's: each stage's median seconds, and whether both settings wrote the same
    bytes. ``images`` is under ``work/data/user``, where the csv stage accepts a folder from."""
    commands = stage_commands(work, STAGES)
    seconds: dict[str, dict[str, list[float]]] = {stage: {"1": [], "all": []} for stage in STAGES}
    digests: dict[str, list[str]] = {}
    outputs = [work / "data" / kind / f"{split}.{kind}" for kind in STAGES for split in ("train", "test")]
    for _ in range(repeats):
        for key, workers in (("1", 1), ("all", None)):
            params = work / f"params-{key}.yaml"
            doc = {
                "data": {"dataset": "images", "images_dir": str(images), "image_shape": image_shape},
                "prep": {"workers": workers},
            }
            params.write_text(json.dumps(doc))  # JSON is YAML
            for stage, argv in commands:
                started = time.perf_counter()
                subprocess.run([*argv, "--params", str(params)], cwd=ROOT, check=True, capture_output=True)
                seconds[stage][key].append(time.perf_counter() - started)
            digests[key] = [_digest(out) for out in outputs]
    entries = scan_split(images, "train")
    total = len(entries) + len(scan_split(images, "test"))
    plan = imagedecode.decode_plan(entries, images, cpu_count())
    median = {stage: {k: statistics.median(v) for k, v in runs.items()} for stage, runs in seconds.items()}
    checks_shared = cpu_count() > 1 and total >= images_module.CHECKS_IN_PROCESSES_FROM
    return {
        "folder": name,
        "images": total,
        "checks_all_cores": f"{cpu_count()} processes" if checks_shared else "one process",
        "decode_all_cores": "one thread" if plan.count == 1 else f"{plan.count} {plan.how}",
        "seconds": seconds,
        "median_s": median,
        "speedup": {stage: m["1"] / m["all"] for stage, m in median.items()},
        "same_bytes": digests["1"] == digests["all"],
    }


# One timing, in a fresh interpreter run with -c: its workers import no main module, so that starting
# them costs about what it costs a stage (whose main module imports little). "check": the csv stage's
# header checks; "decode": the parquet stage's decoding; either forced into processes where workers > 1.
_SWEEP = """
import sys, time
from pathlib import Path
from pipeline import imagedecode, images

images.CHECKS_IN_PROCESSES_FROM = imagedecode.PROCESSES_FROM_IMAGES = 0
folder, k, workers, what = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
entries = images.scan_split(folder, "train")[:k]
started = time.perf_counter()
if what == "check":
    images.check_images(folder, entries, None, workers)
else:
    for _batch in imagedecode.decoded_batches(entries, folder, (3, 32, 32), False, 32768, workers):
        pass
print(time.perf_counter() - started)
"""


def count_sweep(folder: Path, counts: list[int], repeats: int) -> list[dict]:
    """Header checks and decoding of the first K small images: one process against every core's."""
    rows = []
    n = len(scan_split(folder, "train"))
    for k in counts:
        row: dict = {"images": min(k, n)}
        for what in ("check", "decode"):
            times: dict[int, list[float]] = {1: [], cpu_count(): []}
            for _ in range(repeats):
                for workers in times:
                    argv = [sys.executable, "-c", _SWEEP, str(folder), str(k), str(workers), what]
                    done = subprocess.run(argv, cwd=ROOT, check=True, capture_output=True, text=True)
                    times[workers].append(float(done.stdout))
            one, many = (statistics.median(v) for v in times.values())
            row[what] = {"one_s": one, "all_s": many, "ratio": many / one}
        rows.append(row)
    return rows


def render_markdown(r: dict) -> str:
    lines = [
        "# Image folders on every core",
        "",
        f"`python -m benchmarks.decode`; {conditions_text(r['conditions'])}; all cores = {r['cores']}.",
        "",
        f"The `csv` stage (header checks) and the `parquet` stage (decoding), each a fresh process as "
        f"dvc.yaml runs it, median of {r['repeats']} runs of each setting taken in turn, seconds; the test "
        "split is a tenth of train (at least 8). Same bytes: both stages' outputs, both settings.",
        "",
        "| folder | images | csv: checks on | csv 1 / all | speed-up | parquet: decodes on | "
        "parquet 1 / all | speed-up | same bytes |",
        "|---|---:|---|---:|---:|---|---:|---:|---|",
    ]
    for s in r["stage"]:
        m, x = s["median_s"], s["speedup"]
        lines.append(
            f"| {s['folder']} | {s['images']:,} | {s['checks_all_cores']} | {m['csv']['1']:.2f} / "
            f"{m['csv']['all']:.2f} | {x['csv']:.2f}x | {s['decode_all_cores']} | {m['parquet']['1']:.2f} / "
            f"{m['parquet']['all']:.2f} | {x['parquet']:.2f}x | {'yes' if s['same_bytes'] else 'NO'} |"
        )
    lines += [
        "",
        f"The first K small train images, median of {r['repeats']}, each timing in a fresh interpreter: "
        f"header checks and decoding in one process against {r['cores']} (the stage's own and its workers, "
        f"started each time). The stages use processes from {r['checks_from']:,} images (checks) and "
        f"{r['processes_from_images']:,} (decoding).",
        "",
        "| K images | checks: one s | all s | all / one | decoding: one s | all s | all / one |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in r["counts"]:
        ch, de = c["check"], c["decode"]
        lines.append(
            f"| {c['images']:,} | {ch['one_s']:.3f} | {ch['all_s']:.3f} | {ch['ratio']:.2f} | "
            f"{de['one_s']:.3f} | {de['all_s']:.3f} | {de['ratio']:.2f} |"
        )
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
            images = work / "data" / "user" / name.split()[0]
            make_image_folder(images, n, max(8, n // 10), shape=shape, classes=2, suffix=".jpg")
            stage.append(stage_runs(work, name, images, image_shape, cfg.repeats))
        counts = count_sweep(work / "data" / "user" / "small", cfg.counts, cfg.repeats)
    results = {
        "conditions": conditions,
        "cores": cpu_count(),
        "repeats": cfg.repeats,
        "processes_from_images": imagedecode.PROCESSES_FROM_IMAGES,
        "checks_from": images_module.CHECKS_IN_PROCESSES_FROM,
        "stage": stage,
        "counts": counts,
    }
    write_results(cfg.out, "decode", results, render_markdown(results))


if __name__ == "__main__":
    main()
