"""Training on a GPU: ``python -m benchmarks.gpu`` -> ``bench/gpu/gpu.{json,md}``.

Issue 18's check for a lent GPU: the trainer's own epoch (``trainer.loop``,
``trainer.loader`` with ``params.yaml``'s ``loader`` section,
``trainer.precision``, ``trainer.device_norm``) on FashionMNIST, for each
precision (fp32, bf16, fp16 on CUDA) x shard dtype (float32, uint8) x
``train.free_graph`` (true, false), and ``loader.device_resident: true``
rows for fp32 and bf16 (the airbench path: the whole split on the GPU).
Each row trains a fresh SimpleCNN for ``--epochs`` epochs; the first is a
warm-up (CUDA context, cuDNN plans, page cache), the others are timed. Per
row: the fastest timed epoch, the loop's data-wait fraction over the timed
epochs, the CUDA peak memory of the run (``torch.cuda.max_memory_allocated``,
reset per row; null on the CPU) and the test accuracy after the last epoch.
Goals, judged per row: an epoch of :data:`EPOCH_SAMPLES` samples (the best
epoch scaled to that size; FashionMNIST's train split is that size) at most
:data:`GOAL_EPOCH_S`, ten times faster than the reference article's 0.44 s,
and a data wait under :data:`GOAL_WAIT_FRACTION`.

A GPU is lent for minutes on a bare machine that has torch, numpy,
safetensors and pyyaml but not polars, dvc, dvclive or pydantic, and only
the repository plus a few carried folders travel there. So the check is two
steps:

* ``--prepare DIR`` (here): the uint8 twins of the train and test splits
  (each float32 pixel is one entry of ``pipeline.normalize.lookup_table``, so
  its byte is found by a search and checked), small enough to carry.
* the default mode (there): the float32 splits are rebuilt from them through
  the same table in a temporary folder (bit-identical to the tensorize
  stage's), then every row runs. Nothing imported on that path needs the
  missing packages; ``trainer.run`` (DVCLive, the DVC remote) is not
  imported, so the few lines of it that build the model and the loaders are
  repeated here.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import yaml

from benchmarks.report import conditions_text, run_conditions, write_results
from pipeline.atomic import atomic_dir, write_bytes_atomic
from pipeline.manifest import MANIFEST_NAME
from pipeline.normalize import lookup_table
from pipeline.shards import write_shard
from trainer.allocator import retain_freed_memory
from trainer.augment import augmenter
from trainer.data import ShardDataset
from trainer.device_norm import DeviceNormalizer
from trainer.loader import make_loader, resolve_settings, split_sampler
from trainer.loop import evaluate, train_one_epoch
from trainer.memory import PeakMemory
from trainer.model import SimpleCNN
from trainer.precision import make_precision
from trainer.verify import ValidSplit, validate_split

ROOT = Path(__file__).resolve().parent.parent
GOAL_EPOCH_S = 0.044  # ten times faster than the reference article's 0.44 s epoch
EPOCH_SAMPLES = 60_000  # the article's epoch: FashionMNIST's train split
GOAL_WAIT_FRACTION = 0.02
MAX_PREPARED_BYTES = 60_000_000  # the device run carries at most 64 MiB, the repository included
CHECK_STEPS = {"cuda": 16, "cpu": 1}  # trainer.epoch: boundary every ACCELERATOR_CHECK_STEPS on a GPU
SPLITS = ("train", "test")
CHUNK = 8192  # rows converted at a time


# ----------------------------------------------------------------------------- the carried data


def _convert(split: ValidSplit, out_dir: Path, dtype: str, rows: Callable[[int, int], np.ndarray]) -> Path:
    """Write ``split``'s shards as ``dtype`` into ``out_dir``, the images of rows ``first..first+n`` from
    ``rows(first, n)`` a chunk at a time, the labels as they are; the manifest's sizes and hashes updated."""
    doc = json.loads((split.directory / MANIFEST_NAME).read_text())
    out_dir.mkdir(parents=True)
    first = 0
    for entry, shard in zip(doc["shards"], split.shards, strict=True):
        n = shard.num_samples
        labels = np.fromfile(shard.path, dtype="<i8", count=n, offset=shard.labels_offset)
        chunks = (rows(i, min(CHUNK, first + n - i)) for i in range(first, first + n, CHUNK))
        metadata = {"dataset": doc["dataset"], "split": doc["split"]}
        with open(out_dir / entry["file"], "wb") as f:
            size, sha = write_shard(f, chunks, labels, tuple(doc["image_shape"]), metadata, dtype)
        entry.update(bytes=size, sha256=sha)
        first += n
    doc["image_dtype"] = dtype
    (out_dir / MANIFEST_NAME).write_text(json.dumps(doc, indent=2) + "\n")  # as Manifest.to_json
    return out_dir


def uint8_split(split_dir: Path, out_dir: Path, name: str) -> Path:
    """The uint8 shards whose device normalisation gives ``split_dir``'s float32 shards (any split).

    Each float32 pixel is exactly one entry of the table, so its byte is found by a search and
    checked; a chunk of rows is converted at a time. ``benchmarks.workers.uint8_twin`` is this, for train.
    """
    split = validate_split(split_dir, expected_split=name)
    table = lookup_table(split.manifest.normalization)
    dataset = ShardDataset(split)

    def rows(first: int, n: int) -> np.ndarray:
        floats = dataset[torch.arange(first, first + n)][0].numpy()
        pixels = np.empty(floats.shape, dtype=np.uint8)
        for c in range(floats.shape[1]):
            pixels[:, c] = np.searchsorted(table[c], floats[:, c])
            if not np.array_equal(table[c][pixels[:, c]], floats[:, c]):
                raise ValueError(f"{split_dir}: channel {c} holds values outside the normalisation table")
        return pixels

    return _convert(split, out_dir, "uint8", rows)


def float32_split(split_dir: Path, out_dir: Path, name: str) -> Path:
    """The float32 shards of a uint8 split: each byte through the manifest's normalisation table."""
    split = validate_split(split_dir, expected_split=name)
    table = lookup_table(split.manifest.normalization)
    dataset = ShardDataset(split)

    def rows(first: int, n: int) -> np.ndarray:
        pixels = dataset[torch.arange(first, first + n)][0].numpy()
        floats = np.empty(pixels.shape, dtype=np.float32)
        for c in range(pixels.shape[1]):
            floats[:, c] = table[c][pixels[:, c]]
        return floats

    return _convert(split, out_dir, "float32", rows)


def prepare(tensors: Path, out: Path) -> int:
    """Write the uint8 twins of ``tensors``' train and test splits into ``out``; their total bytes.

    Written beside ``out`` and renamed into place, so a refusal or a failure leaves nothing."""
    if out.exists():
        raise SystemExit(f"{out}: already exists; remove it or name another folder")
    with atomic_dir(out) as tmp:
        for name in SPLITS:
            uint8_split(tensors / name, tmp / name, name)
        total = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        if total > MAX_PREPARED_BYTES:
            raise SystemExit(
                f"{out}: {total / 1e6:.1f} MB, over the {MAX_PREPARED_BYTES / 1e6:.0f} MB "
                "a device run can carry"
            )
    return total


# ----------------------------------------------------------------------------- the device run


def params_sections(path: Path) -> tuple[SimpleNamespace, SimpleNamespace]:
    """``params.yaml``'s ``loader`` and ``train`` sections, read with PyYAML (pydantic, which
    ``pipeline.params`` validates them with, is not on the GPU machine)."""
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    return SimpleNamespace(**doc["loader"]), SimpleNamespace(**doc["train"])


def plan(device: torch.device) -> list[dict]:
    """The rows, most wanted first (a run out of time drops the last): each precision x shard dtype
    through the default loader with free_graph true, the device-resident rows, then free_graph false."""
    precisions = ("fp32", "bf16", "fp16") if device.type == "cuda" else ("fp32", "bf16")
    dtypes = ("float32", "uint8")
    return [
        *[
            {"precision": p, "shards": d, "loader": "default", "free_graph": True}
            for p in precisions
            for d in dtypes
        ],
        *[
            {"precision": p, "shards": d, "loader": "resident", "free_graph": True}
            for p in ("fp32", "bf16")
            for d in dtypes
        ],
        *[
            {"precision": p, "shards": d, "loader": "default", "free_graph": False}
            for p in precisions
            for d in dtypes
        ],
    ]


def run_row(
    row: dict,
    splits: dict[str, ValidSplit],
    loader_params: SimpleNamespace,
    train: SimpleNamespace,
    device: torch.device,
    epochs: int,
) -> dict:
    """Train a fresh model for ``epochs`` epochs as ``trainer.run`` wires it; the row's figures."""
    memory = PeakMemory(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        memory.reset()
    params = SimpleNamespace(**{**vars(loader_params), "device_resident": row["loader"] == "resident"})
    settings = resolve_settings(params, device)
    train_split, test_split = splits["train"], splits["test"]
    sampler = split_sampler(train_split, settings, train.seed, train=True)
    test_sampler = split_sampler(test_split, settings, train.seed, train=False)
    train_loader = make_loader(ShardDataset(train_split), sampler, settings)
    test_loader = make_loader(ShardDataset(test_split), test_sampler, settings)
    torch.manual_seed(train.seed)  # trainer.run.build_model
    model = SimpleCNN(*train_split.manifest.image_shape, train_split.manifest.num_classes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=train.lr)
    normalize = DeviceNormalizer(train_split.manifest.normalization, device)
    precision = make_precision(row["precision"], device)
    non_blocking = settings.pin_memory and device.type == "cuda"
    timed = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        stats = train_one_epoch(
            model,
            train_loader,
            optimizer,
            device,
            non_blocking=non_blocking,
            free_graph=row["free_graph"],
            progress=False,
            boundary=lambda _: None,  # the trainer's reads the running loss here: the same host wait
            check_every=CHECK_STEPS.get(device.type, 1),
            normalize=normalize,
            precision=precision,
            augment=augmenter(train.augment, seed=train.seed, epoch=epoch, rank=0, world=1),
        )
        if epoch or epochs == 1:  # the first epoch warms up, unless it is the only one
            timed.append(stats)
    test = evaluate(
        model, test_loader, device, non_blocking=non_blocking, normalize=normalize, precision=precision
    )
    best = min(s.seconds for s in timed)
    wait = sum(s.data_wait_seconds for s in timed) / sum(s.seconds for s in timed)
    return {
        **row,
        "name": f"{row['precision']}-{row['shards']}-{row['loader']}-free_graph_{_flag(row['free_graph'])}",
        "best_epoch_s": best,
        "epoch_s": [s.seconds for s in timed],
        "epoch_60k_s": best * EPOCH_SAMPLES / train_split.num_samples,
        "samples_per_second": train_split.num_samples / best,
        "data_wait_fraction": wait,
        "cuda_peak_mb": memory.peak_mb() if device.type == "cuda" else None,
        "train_loss": timed[-1].loss,
        "test_acc": test.accuracy,
        "goal_epoch_met": best * EPOCH_SAMPLES / train_split.num_samples <= GOAL_EPOCH_S,
        "goal_wait_met": wait < GOAL_WAIT_FRACTION,
    }


def machine(device: torch.device) -> dict:
    """GPU, torch, CUDA and CPU of this run."""
    cuda = device.type == "cuda"
    return {
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "python": platform.python_version(),
    }


def float32_splits(data: Path, tmp: Path) -> dict[str, dict[str, ValidSplit]]:
    """The carried uint8 splits and their float32 rebuilds in ``tmp``, validated as the trainer does."""
    out: dict[str, dict[str, ValidSplit]] = {"float32": {}, "uint8": {}}
    for name in SPLITS:
        out["uint8"][name] = validate_split(data / name, expected_split=name)
        out["float32"][name] = validate_split(
            float32_split(data / name, tmp / name, name), expected_split=name
        )
    return out


def run_all(data: Path, device: torch.device, epochs: int, params: Path, out: Path, budget_s: float) -> dict:
    """Every row of :func:`plan` on the carried data; the results document.

    The files are rewritten after each row, so a run stopped from outside leaves the rows it did;
    a row that would end past ``budget_s`` (judged by the last row's time) is skipped and listed.
    """
    loader_params, train = params_sections(params)
    retain_freed_memory()  # as trainer.run does
    started = time.perf_counter()
    rows: list[dict] = []
    skipped: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        splits = float32_splits(data, Path(tmp))
        doc = {
            "conditions": run_conditions(),
            "machine": machine(device),
            "settings": {
                "epochs": epochs,
                "timed_epochs": max(epochs - 1, 1),
                "train_samples": splits["float32"]["train"].num_samples,
                "loader": vars(loader_params),
                "seed": train.seed,
                "lr": train.lr,
                "augment": train.augment,
                "data": str(data),
                "budget_s": budget_s,
            },
            "goals": {"epoch_s": GOAL_EPOCH_S, "data_wait_fraction": GOAL_WAIT_FRACTION},
            "rows": rows,
            "skipped": skipped,
        }
        last = 0.0
        for row in plan(device):
            if rows and time.perf_counter() - started + last > budget_s:  # one row at least
                skipped.append(row)
                continue
            began = time.perf_counter()
            rows.append(run_row(row, splits[row["shards"]], loader_params, train, device, epochs))
            last = time.perf_counter() - began
            r = rows[-1]
            print(
                f"{r['name']}: best epoch {r['best_epoch_s']:.4f} s, "
                f"data wait {r['data_wait_fraction']:.1%}, test_acc {r['test_acc']:.4f} ({last:.0f} s)",
                flush=True,
            )
            _finish(doc, started, complete=False)
            _write(out, doc)
    return _finish(doc, started, complete=True)


def _finish(doc: dict, started: float, *, complete: bool) -> dict:
    rows = doc["rows"]
    doc["all_goals_met"] = [r["name"] for r in rows if r["goal_epoch_met"] and r["goal_wait_met"]]
    doc["seconds"] = time.perf_counter() - started
    doc["complete"] = complete
    return doc


def _write(out: Path, doc: dict) -> None:
    """gpu.json and gpu.md, each replaced atomically (quietly: the final write prints the page)."""
    out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out / "gpu.json", (json.dumps(doc, indent=2) + "\n").encode())
    write_bytes_atomic(out / "gpu.md", render(doc).encode())


def _flag(value: bool) -> str:
    return str(value).lower()


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def render(r: dict) -> str:
    """gpu.md: the machine, the conditions and one line per row, each goal judged."""
    m, s, g = r["machine"], r["settings"], r["goals"]
    lines = [
        "# Training on a GPU",
        "",
        f"Device {m['gpu'] or m['device']}; torch {m['torch']}, CUDA {m['cuda'] or 'none'}, "
        f"Python {m['python']}; host {conditions_text(r['conditions'])}.",
        "",
        f"SimpleCNN on {s['train_samples']:,} FashionMNIST train samples, the trainer's loop and loader "
        f"(`params.yaml` loader: batch {s['loader']['batch_size']}, {s['loader']['num_workers']} workers, "
        f"pin_memory {str(s['loader']['pin_memory']).lower()}), {s['epochs']} epochs per row, the first a "
        f"warm-up; best of the {s['timed_epochs']} timed epochs, data wait over them, CUDA peak memory of "
        f"the row, test accuracy after the last epoch. The epoch goal judges the best epoch scaled to "
        f"{EPOCH_SAMPLES:,} samples. Whole run: {r['seconds']:.0f} s.",
        "",
        f"| precision | shards | loader | free_graph | best epoch s | samples/s | data wait | CUDA peak MB "
        f"| test acc | 60k epoch <= {g['epoch_s']} s | wait < {g['data_wait_fraction']:.0%} |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in r["rows"]:
        peak = "n/a" if row["cuda_peak_mb"] is None else f"{row['cuda_peak_mb']:.0f}"
        lines.append(
            f"| {row['precision']} | {row['shards']} | {row['loader']} | {_flag(row['free_graph'])} "
            f"| {row['best_epoch_s']:.4f} | {row['samples_per_second']:,.0f} "
            f"| {row['data_wait_fraction']:.1%} | {peak} | {row['test_acc']:.4f} "
            f"| {_met(row['goal_epoch_met'])} | {_met(row['goal_wait_met'])} |"
        )
    met = r["all_goals_met"]
    lines += [
        "",
        f"Both goals met by {len(met)} of {len(r['rows'])} rows" + (f": {', '.join(met)}." if met else "."),
        "",
    ]
    if r["skipped"]:
        names = ", ".join(
            f"{x['precision']} {x['shards']} {x['loader']} free_graph {_flag(x['free_graph'])}"
            for x in r["skipped"]
        )
        lines += [f"Skipped, past the {s['budget_s']:.0f} s budget: {names}.", ""]
    if not r["complete"]:
        lines += ["**Incomplete**: the run stopped after these rows.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--prepare", type=Path, metavar="DIR", help="write the carried uint8 splits here, and stop"
    )
    p.add_argument(
        "--tensors", type=Path, default=ROOT / "data" / "tensors", help="float32 splits (--prepare)"
    )
    p.add_argument("--data", type=Path, default=ROOT / ".gpu-data", help="the prepared folder")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "gpu")
    p.add_argument("--epochs", type=int, default=5, help="per row; the first is a warm-up")
    p.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--quick", action="store_true", help="2 epochs per row (a smoke test)")
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    p.add_argument(
        "--budget-s", type=float, default=240.0, help="skip the rows that would end past this (seconds)"
    )
    cfg = p.parse_args(argv)
    if cfg.prepare is not None:
        total = prepare(cfg.tensors, cfg.prepare)
        print(f"{cfg.prepare}: {total / 1e6:.1f} MB ({total:,} bytes) of uint8 train and test shards")
        return
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")
    if not (cfg.data / "train" / MANIFEST_NAME).exists():
        raise SystemExit(
            f"{cfg.data}: no prepared splits; run `python -m benchmarks.gpu --prepare {cfg.data}` first"
        )
    epochs = 2 if cfg.quick else cfg.epochs
    result = run_all(cfg.data, torch.device(cfg.device), epochs, cfg.params, cfg.out, cfg.budget_s)
    write_results(cfg.out, "gpu", result, render(result))


if __name__ == "__main__":
    main()
