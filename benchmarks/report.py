"""Render benchmark results as a Markdown table and a bar chart; write any benchmark's results files."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
from pathlib import Path

from benchmarks.prep import ROOT
from benchmarks.scalecsv import FASHION_DIR
from pipeline.atomic import atomic_file, write_bytes_atomic
from pipeline.cpuinfo import cpu_model


def add_run_options(p: argparse.ArgumentParser, scratch_needs: str) -> None:
    """``--idx``, ``--work``, ``--out``, ``--note``: the options of every benchmark on scaled FashionMNIST."""
    p.add_argument("--idx", type=Path, default=FASHION_DIR, help="folder of FashionMNIST's IDX .gz files")
    p.add_argument(
        "--work", type=Path, default=None, help=f"scratch folder (default: a temporary one; {scratch_needs})"
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench")
    p.add_argument(
        "--note", default="", help="a line about the conditions of the run, e.g. the machine's load"
    )


def scratch_parent(work: Path | None) -> Path:
    """The folder scratch copies go under: ``--work``, or the system's temporary folder."""
    parent = work or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    return parent


LOAD_LIMIT = (
    1.5  # a 1-minute load average above this on the 2-core machine marks a result "measured under load"
)


def run_conditions() -> dict:
    """CPU model, cores, load averages (1, 5, 15 min) and UTC time, recorded with each result: on a shared
    machine other people's work moves every figure, so a result says how busy the machine was."""
    load = os.getloadavg()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "loadavg": [round(x, 2) for x in load],
        "under_load": load[0] > LOAD_LIMIT,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def conditions_text(c: dict) -> str:
    """One line of :func:`run_conditions`, for a Markdown page."""
    load = "/".join(f"{x:.2f}" for x in c["loadavg"])
    return (
        f"{c['cpu']}, {c['cores']} cores, load average {load} (1/5/15 min)"
        + (", **measured under load**" if c["under_load"] else "")
        + f", {c['date']}"
    )


def load_text(c: dict) -> str:
    """The 1-minute load average of :func:`run_conditions`, flagged when over :data:`LOAD_LIMIT`."""
    return f"{c['loadavg'][0]:.2f}" + (" (under load)" if c["under_load"] else "")


def loader_shapes_lines(loader: dict) -> list[str]:
    """Markdown of :func:`benchmarks.shapes.loader_vs_memcpy`'s result (in shapes.md and results.md)."""
    lines = [
        "## Loader-only epoch against memcpy, per image shape",
        "",
        "Random uint8 pixels written by `pipeline.tensorize.write_split` "
        "(shards of 65,536, unit normalisation); "
        f"one epoch with params.yaml's loader (the trainer's dataset, sampler and loader, on the CPU), "
        "fastest "
        f"of {loader['repeats']}, against a memcpy of the same float32 bytes (fastest of at least 5). "
        f"Goal: loader / memcpy <= {loader['goal']}.",
        "",
        "| shape | samples | float32 MB | loader epoch s | memcpy s | loader / memcpy | goal met "
        "| load (1 min) |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for row in loader["rows"]:
        lines.append(
            f"| {row['shape']} | {row['samples']:,} | {row['float32_bytes'] / 1e6:,.1f} | "
            f"{row['loader_epoch_s']:.4f} | {row['memcpy_s']:.4f} | {row['loader_over_memcpy']:.2f} | "
            f"{'yes' if row['goal_met'] else 'NO'} | {load_text(row['conditions'])} |"
        )
    return [*lines, ""]


def write_results(folder: Path, stem: str, results: dict, markdown: str) -> None:
    """``folder/stem.json`` and ``folder/stem.md``, each written atomically; the Markdown is also printed."""
    folder.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(folder / f"{stem}.json", (json.dumps(results, indent=2) + "\n").encode())
    write_bytes_atomic(folder / f"{stem}.md", markdown.encode())
    print(markdown)


def _faults(row: dict) -> str:
    """Rows timed in other processes (ddp-*) have no page-fault count."""
    faults = row.get("page_faults_per_step")
    return "n/a" if faults is None else f"{faults:.0f}"


def render_markdown(r: dict) -> str:
    m, fl = r["machine"], r["floors"]
    lines = [
        "# Loader benchmark",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, device {m.get('gpu', m['device'])}"
        + (
            f", 1-minute load {load_text(m['conditions_at_start'])} at the start "
            f"({m['conditions_at_start']['date']})"
            if "conditions_at_start" in m
            else ""
        )
        + f". Each time is the minimum of {r['settings']['repeats']} epochs, per 60,000 samples"
        + (" (quick run: scaled from fewer samples)." if r["settings"]["quick"] else "."),
        "",
        "| row | loader_epoch_s | train_epoch_s | speedup_vs_naive | data_wait_fraction "
        "| page_faults_per_step | note |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in r["rows"]:
        note = row["note"] + (f" (scaled from {row['samples_measured']} samples)" if row["scaled"] else "")
        lines.append(
            f"| {row['name']} | {row['loader_epoch_s']:.3f} | {row['train_epoch_s']:.2f} | "
            f"{row['speedup_vs_naive']:.1f}x | {row['data_wait_fraction']:.3f} | "
            f"{_faults(row)} | {note} |"
        )
    lines += [
        "",
        f"Floors: memcpy of one epoch's images {fl['memcpy_epoch_s']:.4f} s; compute (every step of an epoch "
        "on one cache-warm batch, timed interleaved with `default`, `reference-layout`, `resident` and the "
        "bf16 and uint8 rows; on the CPU at most the fastest step's time per sample times 60,000) "
        f"{fl['compute_epoch_s']:.2f} s; "
        f"FLOP floor {fl['flop_epoch_s']:.2f} s = {fl['epoch_gflop']:.0f} GFLOP "
        f"per epoch (forward + backward, counted by FlopCounterMode) at {fl['matmul_gflops']:.0f} GFLOP/s "
        "(2048x2048 fp32 matmul, best of 10, same run). "
        f"bf16 FLOP floor {fl['flop_epoch_s_bf16']:.2f} s = the same FLOPs at "
        f"{fl['matmul_gflops_bf16']:.0f} GFLOP/s (2048x2048 bfloat16 matmul, same run).",
        "",
        *_goal_lines(r),
        "",
        *(loader_shapes_lines(r["shapes"]) if "shapes" in r else []),
        *_allocator_section(r["allocator"]),
        "## Intra-op threads (`train.threads`)",
        "",
        "Compute-floor epochs (one warm batch), each thread count in a fresh interpreter: "
        + ", ".join(f"{n} thread(s) {s:.2f} s" for n, s in r["threads"]["epoch_s"].items())
        + ". Trained from the same initialisation on the same steps, the models end "
        + ("bit-identical." if r["threads"]["bit_identical"] else "with different bits (float rounding)."),
        "",
        "## Memory: loader process tree (peak over one epoch, MiB)",
        "",
        "Each line runs in a fresh interpreter; "
        "baseline is the main process after imports, before the dataset.",
        "",
        "| loader | processes | baseline USS | peak USS (sum) | peak PSS (sum) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, v in r["memory"]["loader_process_tree"].items():
        lines.append(
            f"| {name} | {v['processes']} | {v['baseline_uss_mb']} | {v['peak_uss_mb']} | "
            f"{v['peak_pss_mb']} |"
        )
    lines += [
        "",
        "## Memory: training-loop habits (peak above the start of the loop, MiB)",
        "",
        "| habit | peak | measured as |",
        "|---|---:|---|",
    ]
    for v in r["memory"]["training_habits"].values():
        lines.append(f"| {v['what']} | {v['peak_above_start_mb']} | {v['measure']} |")
    lines += ["", "## Disk (bytes)", "", "| form | bytes | MB |", "|---|---:|---:|"]
    for name, size in r["disk"].items():
        lines.append(
            f"| {name} | {size if size is not None else 'n/a'} | "
            f"{f'{size / 1e6:.1f}' if size is not None else 'n/a'} |"
        )
    return "\n".join(lines) + "\n"


def goal_limits(r: dict) -> dict[str, tuple[str, float]]:
    """Each judged goal of ``results.json``: its comparison and limit (the Markdown table's targets)."""
    limits = {
        "default_train_over_flops": ("<=", 2.0),
        "default_train_over_compute": (">=", 1.0),
        "default_loader_over_memcpy": ("<=", 4.0),
        "naive_over_default_loader": (">=", 39.0),
    }
    if "shapes" in r:
        limits["rgb32_loader_over_memcpy"] = ("<=", r["shapes"]["goal"])
    if "workers" in r:
        limits["workers2_over_workers0"] = ("<=", r["workers"]["goal"])
        limits["uint8_workers2_over_workers0"] = ("<=", r["workers"]["goal"])
    if "bf16" in r:
        limits["bf16_over_fp32"] = ("<=", r["bf16"]["goal"])
    return limits


def goal_verdicts(r: dict) -> dict[str, str]:
    """``met``, ``NOT met``, or ``not judged: <why>`` per goal of :func:`goal_limits` present in the results.

    ``bf16_over_fp32`` is judged only where bf16 has matrix units (``r["bf16"]["judged"]``)."""
    verdicts = {}
    for key, (op, limit) in goal_limits(r).items():
        if key not in r["goals"]:
            continue
        if key == "bf16_over_fp32" and not r["bf16"]["judged"]:
            verdicts[key] = f"not judged: {r['bf16']['reason']}"
            continue
        value = r["goals"][key]
        verdicts[key] = "met" if (value <= limit if op == "<=" else value >= limit) else "NOT met"
    return verdicts


def _goal_lines(r: dict) -> list[str]:
    """The goal table of ``results.md``: measured value, target and verdict (``r["verdicts"]``)."""
    g, verdicts = r["goals"], r.get("verdicts", {})
    rows = [  # key, what, measured, target
        ("default_train_over_flops", "default train epoch / FLOP floor", "{:.2f}", "<= 2 (stretch 1.5)"),
        ("default_train_over_compute", "default train epoch / compute floor", "{:.3f}", ">= 1 (a floor)"),
        ("default_loader_over_memcpy", "default loader epoch / memcpy floor", "{:.2f}", "<= 4"),
        ("naive_over_default_loader", "naive / default loader epoch", "{:.0f}x", ">= 39x"),
        ("rgb32_loader_over_memcpy", "3x32x32 loader epoch / memcpy (section below)", "{:.2f}", None),
        ("workers2_over_workers0", "float32 loader epoch, 2 workers / 0 (section below)", "{:.2f}", None),
        ("uint8_workers2_over_workers0", "uint8 loader epoch, 2 workers / 0 (section below)", "{:.2f}", None),
        ("bf16_over_fp32", "bf16 train epoch / default (fp32) train epoch", "{:.2f}", None),
        ("bf16_train_over_flops_bf16", "bf16 train epoch / bf16 FLOP floor", "{:.1f}", "-"),
    ]
    limits = goal_limits(r)
    lines = ["| goal | measured | target | verdict |", "|---|---:|---:|---|"]
    for key, what, fmt, target in rows:
        if key not in g:
            continue
        if target is None:
            op, limit = limits[key]
            target = f"{op} {limit:g}" + (" with AMX or CUDA" if key == "bf16_over_fp32" else "")
        lines.append(f"| {what} | {fmt.format(g[key])} | {target} | {verdicts.get(key, 'reported')} |")
    return lines


def _allocator_section(a: dict) -> list[str]:
    lines = [
        "## Page faults: why pre-gathered batches trained slower than loader-fed ones",
        "",
        "The original model trained on the `default` loader's batches, epochs interleaved, each setting in a "
        "fresh interpreter: `pre-gathered` holds all of the epoch's batches "
        "(118 live buffers at 60,000 samples) "
        "before the clock starts, as the old compute floor did; `loader-fed` gathers one batch per step. "
        "Page faults are minor "
        "faults (`ru_minflt`) per step: each is a 4 KiB page the kernel zero-fills because glibc returned "
        "freed memory to it after the previous step.",
        "",
        "| allocator | batches | train_epoch_s | page_faults_per_step |",
        "|---|---|---:|---:|",
    ]
    for setting, by_source in a.items():
        for source, v in by_source.items():
            lines.append(f"| {setting} | {source} | {v['seconds']:.2f} | {v['page_faults_per_step']:.0f} |")
    return [*lines, ""]


def render_plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = r["rows"]
    names = [x["name"] for x in rows]
    fig, ax = plt.subplots(figsize=(10, 4.8))
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], [x["loader_epoch_s"] for x in rows], height=0.4, label="loader epoch (s)")
    ax.barh([i - 0.2 for i in y], [x["train_epoch_s"] for x in rows], height=0.4, label="train epoch (s)")
    ax.axvline(r["floors"]["compute_epoch_s"], color="k", ls="--", lw=1, label="compute floor")
    ax.axvline(r["floors"]["flop_epoch_s"], color="r", ls=":", lw=1, label="FLOP floor")
    if "flop_epoch_s_bf16" in r["floors"]:
        ax.axvline(r["floors"]["flop_epoch_s_bf16"], color="m", ls=":", lw=1, label="bf16 FLOP floor")
    ax.set_xscale("log")
    ax.set_yticks(list(y), names)
    ax.invert_yaxis()
    ax.set_xlabel("seconds per 60,000-sample epoch (log scale)")
    m = r["machine"]
    ax.set_title(f"Loader ablation on {m.get('gpu', m['cpu'])} ({m['cores']} cores)", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
