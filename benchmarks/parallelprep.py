"""Data stages on every core: ``python -m benchmarks.parallelprep --scale 1 16``.

Writes ``bench/parallel.{json,md}``.

For each factor K the scaled user CSV of :mod:`benchmarks.scale` is built, then
``parquet`` and ``tensorize`` run as dvc.yaml runs them with ``prep.workers`` 1 and
with every core (float32 shards), and ``tensorize`` twice more with
``prep.shard_dtype: uint8``. Between them the disk's write rate is measured in the
same folder (as many incompressible bytes as the float32 shards, written and
fsynced): the float32 shards are four bytes per pixel, so on a slow disk the stage
is bound by its writes, and this floor says so. Each setting reports the median wall
time of ``--repeats`` runs taken in turn with the other setting, its own peak RSS
(VmHWM) and the peak summed PSS of its whole process tree (sampled every 20 ms,
so the workers count), and the SHA-256 of every output file: the goal is the same
bytes, the parallel run at least 1.6 x faster at 16 x on 2 cores, the tree's peak
at 16 x at most 1.25 x its peak at 1 x, and uint8 shards at most 0.26 x the
float32 bytes. Conditions (CPU, load) are recorded: on a shared machine other
work moves every figure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.memory import process_tree, rollup_kib
from benchmarks.prep import ROOT, path_bytes, stage_commands, stage_outputs
from benchmarks.report import add_run_options, conditions_text, run_conditions, scratch_parent, write_results
from benchmarks.scale import BASE_SAMPLES, BYTES_GOAL, PEAK_WRAPPER, build_inputs, write_params
from pipeline.manifest import read_manifest

STAGES = ("csv", "parquet", "tensorize")
MEASURED = ("parquet", "tensorize")
VARIANTS = (*MEASURED, "tensorize/uint8")  # stage/dtype: each run with 1 worker and with every core
SPEEDUP_GOAL = 1.6
MEMORY_SLACK = 1.25
WRITE_BLOCK = 16 << 20  # bytes per write while the disk's write rate is measured


def _tree_peaks_kib(pid: int, stop: threading.Event, out: dict[str, int]) -> None:
    """Every 20 ms until ``stop``: the peaks of the tree's summed PSS and anonymous memory, of the stage
    process's own anonymous memory, and of the largest anonymous memory of any other process (a worker)."""
    while not stop.is_set():
        sizes = {p: rollup_kib(p) for p in process_tree(pid)}
        anon = {p: size[2] for p, size in sizes.items()}
        now = {
            "pss": sum(size[1] for size in sizes.values()),
            "anon": sum(anon.values()),
            "main_anon": anon.get(pid, 0),
            "worker_anon": max((v for p, v in anon.items() if p != pid), default=0),
        }
        for key, value in now.items():
            out[key] = max(out.get(key, 0), value)
        time.sleep(0.02)


def remove_outputs(work: Path, name: str) -> None:
    """Remove stage ``name``'s outputs from ``work``, as ``dvc repro`` does before it runs a stage
    (so a timed run does not include deleting the previous run's gigabytes)."""
    for out in stage_outputs(work, name):
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink(missing_ok=True)


def _launch(work: Path, name: str, params: Path, sample: bool) -> tuple[float, float, dict[str, int]]:
    """One stage in a fresh interpreter: seconds, own VmHWM (KiB) and the tree's peaks (KiB,
    :func:`_tree_peaks_kib`)."""
    (argv,) = [a for n, a in stage_commands(work, [name])]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(ROOT)}
    peak_file = work / f".peak-{name}"
    remove_outputs(work, name)  # untimed
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", PEAK_WRAPPER, str(peak_file), argv[2], *argv[3:], "--params", str(params)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stop, tree = threading.Event(), {}
    sampler = threading.Thread(target=_tree_peaks_kib, args=(proc.pid, stop, tree), daemon=True)
    if sample:
        sampler.start()
    _, err = proc.communicate()
    seconds = time.perf_counter() - t0
    stop.set()
    if sample:
        sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"stage {name} failed ({proc.returncode}): {err.strip()}")
    own = int(peak_file.read_text()) if peak_file.exists() else 0
    peak_file.unlink(missing_ok=True)
    return seconds, own, tree


def _runs(work: Path, name: str, params: dict[str, Path], repeats: int) -> tuple[dict, dict]:
    """The stage with each of ``params`` (by label): timed ``repeats`` times, the settings
    alternating, then once more each with its process tree's memory sampled every 20 ms.

    On a shared VM single runs spread as widely as the margin of the speed-up goal (the kernel's
    share of writing the outputs varies most: each setting's runs are on the page), so a speed-up
    from one run of each setting is judged on noise; the median of runs taken in turn is not.
    Reading every process's ``smaps_rollup`` that often costs CPU, which on 2 cores is taken from
    the workers of a parallel run more than from a serial one, so the seconds come from the runs
    with no sampler. Returns the runs and the digests of each setting's outputs, both by label.
    """
    times: dict[str, list[float]] = {label: [] for label in params}
    for _ in range(repeats):
        for label, path in params.items():
            times[label].append(_launch(work, name, path, sample=False)[0])
    runs, digests = {}, {}
    for label, path in params.items():
        _, own, tree = _launch(work, name, path, sample=True)
        digests[label] = _outputs(work, name)
        runs[label] = {
            "seconds": round(statistics.median(times[label]), 2),
            "runs_s": [round(t, 2) for t in times[label]],
            "own_peak_mb": round(own / 1024, 1),
            "tree_peak_pss_mb": round(tree.get("pss", 0) / 1024, 1),
            "tree_peak_anon_mb": round(tree.get("anon", 0) / 1024, 1),
            "main_peak_anon_mb": round(tree.get("main_anon", 0) / 1024, 1),
            "worker_peak_anon_mb": round(tree.get("worker_anon", 0) / 1024, 1),
        }
    return runs, digests


def _digests(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {
        p.name if path.is_file() else p.relative_to(path).as_posix(): hashlib.sha256(
            p.read_bytes()
        ).hexdigest()
        for p in files
    }


def _outputs(work: Path, stage: str) -> dict[str, str]:
    """The SHA-256 of every file of the stage's outputs (those dvc.yaml lists), by output and file."""
    outs = stage_outputs(work, stage)
    return {f"{out.name}/{name}": digest for out in outs for name, digest in _digests(out).items()}


def filesystem(folder: Path) -> str:
    """The type of the filesystem ``folder`` is on (``ext4``, ``tmpfs``), from /proc/mounts."""
    best, kind = "", "unknown"
    with open("/proc/mounts", encoding="utf-8") as f:
        for line in f:
            _, mount, fstype, *_ = line.split()
            if str(folder.resolve()).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fstype
    return kind


def run_key(variant: str, workers: str) -> str:
    """``parquet`` or ``tensorize/uint8`` run with ``workers`` (``1`` or ``all``): ``tensorize/all/uint8``."""
    stage, _, dtype = variant.partition("/")
    return "/".join(filter(None, (stage, workers, dtype)))


def write_rate(folder: Path, nbytes: int) -> float:
    """MB/s of writing ``nbytes`` of incompressible data to a file in ``folder`` and fsyncing it.

    What the disk under the outputs sustains now: a stage that writes more than it computes
    cannot finish before ``nbytes`` / this rate, on any number of cores. Every 4 KiB page of
    every block differs, so no layer below can deduplicate it.
    """
    block = np.frombuffer(np.random.default_rng(0).bytes(WRITE_BLOCK), dtype=np.uint64).copy()
    path = folder / ".write-rate"
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for i in range(-(-nbytes // WRITE_BLOCK)):
            block[::512] = i  # the first 8 bytes of each page
            f.write(memoryview(block).cast("B"))
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    path.unlink()
    return round(-(-nbytes // WRITE_BLOCK) * WRITE_BLOCK / 1e6 / seconds, 1)


def measure(work: Path, scale: int, base_samples: int, shard_size: int, idx: Path, repeats: int = 1) -> dict:
    rows = build_inputs(work, scale, base_samples, idx)
    runs: dict[str, dict] = {}
    digests: dict[str, dict[str, str]] = {}
    serial = write_params(work, shard_size, "float32", workers=1)
    _launch(work, "csv", serial, sample=False)
    settings = {"1": serial, "all": write_params(work, shard_size, "float32")}
    for stage in MEASURED:
        done, outputs = _runs(work, stage, settings, repeats)
        for label in settings:
            runs[run_key(stage, label)], digests[run_key(stage, label)] = done[label], outputs[label]
    float_bytes = path_bytes(work / "data" / "tensors" / "train")
    largest_shard = max(s.num_samples for s in read_manifest(work / "data" / "tensors" / "train").shards)
    tensor_bytes = path_bytes(work / "data" / "tensors")
    disk_mb_s = write_rate(work, tensor_bytes)  # right after the runs it bounds
    uint8 = {
        label: write_params(work, shard_size, "uint8", workers)
        for label, workers in (("1", 1), ("all", None))
    }
    done, outputs = _runs(work, "tensorize", uint8, repeats)
    for label in uint8:
        key = run_key("tensorize/uint8", label)
        runs[key], digests[key] = done[label], outputs[label]
    uint8_bytes = path_bytes(work / "data" / "tensors" / "train")
    return {
        "scale": scale,
        "samples": rows,
        "largest_train_shard_samples": largest_shard,
        "runs": runs,
        "write": {
            "tensorize_float32_bytes": tensor_bytes,
            "disk_write_mb_s": disk_mb_s,
            "floor_s": round(tensor_bytes / 1e6 / disk_mb_s, 3),
        },
        "same_bytes": {v: digests[run_key(v, "1")] == digests[run_key(v, "all")] for v in VARIANTS},
        "shards_train_bytes": {
            "float32": float_bytes,
            "uint8": uint8_bytes,
            "ratio": round(uint8_bytes / float_bytes, 4),
        },
    }


def _goal_lines(base: dict, top: dict) -> list[str]:
    """Each goal at the largest K against the smallest, judged; a disk-bound stage says so."""
    lines = []
    for v in VARIANTS:
        a, b = top["runs"][run_key(v, "1")], top["runs"][run_key(v, "all")]
        speedup = a["seconds"] / b["seconds"]
        verdict = "met" if speedup >= SPEEDUP_GOAL else "NOT met"
        floor = top["write"]["floor_s"]
        if v == "tensorize" and speedup < SPEEDUP_GOAL and floor > 0:
            verdict += f"; write floor {floor:.1f} s, the all-cores run {b['seconds'] / floor:.2f}x of it"
        line = f"- {v}: speed-up {speedup:.3f}x ({verdict})"  # 3 places: 1.596 must not read 1.60
        if v in MEASURED:
            mem = b["tree_peak_pss_mb"] / base["runs"][run_key(v, "all")]["tree_peak_pss_mb"]
            line += f"; tree peak {mem:.3f}x ({'met' if mem <= MEMORY_SLACK else 'NOT met'})"
        lines.append(line)
    ratio = top["shards_train_bytes"]["ratio"]
    lines.append(f"- shard bytes uint8 / float32 {ratio:.3f} ({'met' if ratio <= BYTES_GOAL else 'NOT met'})")
    return lines


def _seconds_note(repeats: int, outputs_removed: bool) -> str:
    fresh = ""
    if outputs_removed:
        fresh = " Each run starts as `dvc repro` starts a stage: its outputs removed, untimed."
    if repeats == 1:
        return "Seconds: one run of each setting." + fresh
    return (
        f"Seconds: the median of {repeats} runs of each setting, the two settings taken in turn "
        "(the fastest and slowest in brackets); the speed-up is the ratio of the medians." + fresh
    )


def _seconds(run: dict) -> str:
    """A setting's median seconds, and the range of its runs where there were several."""
    times = run.get("runs_s", [])
    spread = f" ({min(times):.2f}-{max(times):.2f})" if len(times) > 1 else ""
    return f"{run['seconds']:.2f}{spread}"


def render_markdown(r: dict) -> str:
    lines = [
        "# Data stages on every core",
        "",
        f"`python -m benchmarks.parallelprep --scale {' '.join(str(x['scale']) for x in r['rows'])}`; "
        f"{r['settings']['base_samples']:,} samples per K, shard_size {r['settings']['shard_size']}, "
        f"all cores = {r['cores']}, scratch on `{r['settings'].get('filesystem', '?')}`. "
        f"Before: {conditions_text(r['before'])}. After: {conditions_text(r['after'])}."
        + (f" {r['settings']['note']}" if r["settings"]["note"] else ""),
        "",
        _seconds_note(r["settings"].get("repeats", 1), r["settings"].get("outputs_removed_first", False)),
        "",
        "| K | stage | workers 1: s / own MB / tree MB | all cores: s / own MB / tree MB "
        "| speed-up | same bytes |",
        "|---:|---|---:|---:|---:|---|",
    ]
    for row in r["rows"]:
        for v in VARIANTS:
            a, b = row["runs"][run_key(v, "1")], row["runs"][run_key(v, "all")]
            lines.append(
                f"| {row['scale']} | {v} "
                f"| {_seconds(a)} / {a['own_peak_mb']:.0f} / {a['tree_peak_pss_mb']:.0f}"
                f" | {_seconds(b)} / {b['own_peak_mb']:.0f} / {b['tree_peak_pss_mb']:.0f} | "
                f"{a['seconds'] / b['seconds']:.3f}x | {'yes' if row['same_bytes'][v] else 'NO'} |"
            )
    lines += [
        "",
        "Memory of the all-cores runs, MiB (peaks sampled every 20 ms): the tree's PSS and anonymous "
        "memory, the stage process's anonymous memory and the largest of any one worker's (a worker holds "
        "one piece at a time; what else grows with K: bench/notes.md).",
        "",
        "| K | stage | tree PSS | tree anon | main anon | largest worker anon "
        "| largest train shard, samples |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        for v in VARIANTS:
            b = row["runs"][run_key(v, "all")]
            if "tree_peak_anon_mb" not in b:
                continue
            lines.append(
                f"| {row['scale']} | {v} | {b['tree_peak_pss_mb']:.0f} | {b['tree_peak_anon_mb']:.0f} | "
                f"{b['main_peak_anon_mb']:.0f} | {b['worker_peak_anon_mb']:.0f} | "
                f"{row.get('largest_train_shard_samples', 0):,} |"
            )
    lines += [
        "",
        "| K | train shards float32 MB | uint8 MB | uint8 / float32 | float32 shards written, MB "
        "| disk write MB/s | write floor s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        b, w = row["shards_train_bytes"], row["write"]
        lines.append(
            f"| {row['scale']} | {b['float32'] / 1e6:.0f} | {b['uint8'] / 1e6:.0f} | {b['ratio']:.3f} | "
            f"{w['tensorize_float32_bytes'] / 1e6:.0f} | {w['disk_write_mb_s']:.0f} | {w['floor_s']:.1f} |"
        )
    if len(r["rows"]) > 1:
        base, top = r["rows"][0], r["rows"][-1]
        lines += [
            "",
            f"Goals at {top['scale']}x: speed-up >= {SPEEDUP_GOAL} (on 2 cores), tree peak / "
            f"{base['scale']}x <= {MEMORY_SLACK}, uint8 / float32 <= {BYTES_GOAL}:",
            "",
            *_goal_lines(base, top),
        ]
    lines += [
        "",
        "Own MB: the stage process's VmHWM; tree MB: the peak summed PSS of the stage and its workers "
        "(every resident page counted once). Write floor: the float32 tensorize outputs' bytes at the "
        "rate measured right after the runs by writing and fsyncing as many incompressible bytes in "
        "the same folder; no number of cores finishes the stage sooner.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=int, nargs="+", default=[1, 4])
    p.add_argument("--base-samples", type=int, default=BASE_SAMPLES)
    p.add_argument("--shard-size", type=int, default=65536)
    p.add_argument(
        "--repeats", type=int, default=3, help="timed runs of each setting, taken in turn (the median counts)"
    )
    add_run_options(p, "K=16 needs ~8 GB")
    args = p.parse_args(argv)
    parent = scratch_parent(args.work)
    results: dict = {
        "rows": [],
        "before": run_conditions(),
        "cores": len(os.sched_getaffinity(0)),
        "settings": {
            "base_samples": args.base_samples,
            "shard_size": args.shard_size,
            "repeats": args.repeats,
            "outputs_removed_first": True,
            "note": args.note,
            "filesystem": filesystem(parent),
        },
    }
    for scale in args.scale:
        work = Path(tempfile.mkdtemp(prefix=f"parallel-{scale}x-", dir=parent))
        try:
            row = measure(work, scale, args.base_samples, args.shard_size, args.idx, args.repeats)
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    results["after"] = run_conditions()
    write_results(args.out, "parallel", results, render_markdown(results))


if __name__ == "__main__":
    main()
