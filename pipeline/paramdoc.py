"""What every ``params.yaml`` key means, and the reference page generated from it.

Descriptions live here and only here. Types, ranges and allowed values are read
from the dataclasses of :mod:`pipeline.params`, defaults from ``params.yaml``
(checked against the dataclass defaults), so the page cannot disagree with the
code. Regenerate after changing a key::

    python -m pipeline.paramdoc > docs/parameters.md

``tests/test_docs.py`` regenerates the page and fails when the committed one
differs, when a key has no entry here (or an entry names no key), and when an
``effect`` contradicts ``SPEED_ONLY`` / ``ELASTIC`` in ``trainer/checkpoint.py``.

No stage imports this module, so it is no dependency of any stage in ``dvc.yaml``.
"""

from __future__ import annotations

import sys
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

from pipeline.params import DEFAULT_PARAMS, SECTIONS, Expect, read_params_file


class Doc(NamedTuple):
    effect: str  # a key of EFFECTS
    text: str  # Markdown, one paragraph


EFFECTS = {
    "results": "changes what is trained or measured",
    "rounding": "same computation, other float summation order: results agree closely, not bit for bit "
    "(rounding differences grow over a run, [distributed.md](distributed.md))",
    "speed": "speed, memory or robustness only: the same model and metrics, bit for bit (a data stage's "
    "own files may differ, e.g. the Parquet codec's or uint8 shards)",
}

KEYS: dict[str, Doc] = {
    # data
    "data.dataset": Doc(
        "results",
        "`fashion-mnist` or `mnist` (downloaded), `csv` or `images` (your data: [your own data](data.md)).",
    ),
    "data.mirrors": Doc(
        "speed",
        "Extra base URLs (`https://…`) or folders (`~/…`: in your home folder; torchvision's "
        "`<root>/FashionMNIST/raw` will do, and a folder may hold the files gunzipped, as `gunzip` "
        "leaves them), tried before the built-in sources; every file is "
        "verified by the SHA-256 of its decompressed bytes, so the source never changes them "
        "(`data/raw/source.json` records which source each came from: another source reruns `csv` once, "
        "to the same output).",
    ),
    "data.train_csv": Doc("results", "Train CSV when `data.dataset` is `csv`; must lie inside `data/user/`."),
    "data.test_csv": Doc(
        "results",
        "Test CSV when `data.dataset` is `csv`, inside `data/user/`, another file than `data.train_csv`; "
        "`null`: a test split is held out of train (`data.test_fraction`).",
    ),
    "data.images_dir": Doc(
        "results",
        "Image folder when `data.dataset` is `images`: `train/<class>/<file>`, optionally "
        "`test/<class>/<file>`; must lie inside `data/user/`.",
    ),
    "data.image_shape": Doc(
        "results",
        "`[C, H, W]`, channels first as PyTorch orders them (not Keras' `[H, W, C]`): the shape of a "
        "CSV's rows, or what images are converted and resized to (C 1 or 3 "
        "for images: grey or RGB); `null`: a CSV's rows are one square grey channel, images keep their own "
        "(shared) size and mode. MNIST and FashionMNIST are not resized: `null` or `[1, 28, 28]`.",
    ),
    "data.test_fraction": Doc(
        "results", "Share of train held out as the test split when the source has none."
    ),
    "data.val_fraction": Doc(
        "results",
        "Share of train held out as a validation split (logs `val_loss`, `val_acc`); `0`: none. "
        "`test_fraction + val_fraction` must stay below 1.",
    ),
    "data.timeout_s": Doc(
        "speed",
        "Seconds any network operation (connect, one read) may block; also the window over which "
        "`data.min_rate_kbps` is measured.",
    ),
    "data.min_rate_kbps": Doc(
        "speed",
        "Minimum download rate in kilobit/s over every `data.timeout_s` window; a slower source is "
        "abandoned for the next one; `0`: no minimum.",
    ),
    # prep
    "prep.compression": Doc("speed", "Parquet codec. The shards come out byte-identical whatever the codec."),
    "prep.compression_level": Doc(
        "speed", "Codec level (zstd 1..22, gzip 0..9, brotli 0..11; other codecs take none); `null`: default."
    ),
    "prep.row_group_size": Doc(
        "speed",
        "Rows per Parquet row group: the unit later stages read, and what each worker holds at once "
        "(32768 FashionMNIST rows are 25 MB of pixels; one group for the whole train split makes "
        "the file slightly smaller and the stages' memory larger).",
    ),
    "prep.shard_size": Doc(
        "results",
        "Samples per safetensors shard (one shard per MNIST split). Changes results only through "
        "`loader.shuffle_window`, which shuffles within runs of shards.",
    ),
    "prep.normalize": Doc(
        "results",
        "`unit`: x/255; `standard`: (x/255 - mean)/std per channel, mean and std from the train split.",
    ),
    "prep.shard_dtype": Doc(
        "speed",
        "`float32`: shards hold the normalised floats; `uint8`: the source bytes (a quarter of the size), "
        "normalised on the training device through the same table: bit-identical training "
        "([precision](precision.md)).",
    ),
    "prep.workers": Doc(
        "speed",
        "Cores the data stages use (csv: processes checking an image folder's headers; parquet: image "
        "decoding threads or processes, and CSV parsing ahead of encoding; tensorize: processes writing "
        "shards, the stage's own included); `1`: one core, Polars' and Arrow's own threads included; "
        "`null`: all cores. Outputs byte-identical.",
    ),
    # loader
    "loader.batch_size": Doc("results", "Samples per global batch (split among processes under DDP)."),
    "loader.num_workers": Doc(
        "speed", "Worker processes that read the coming batches' shard pages ahead of the main process."
    ),
    "loader.persistent_workers": Doc("speed", "Keep workers between epochs (ignored with a notice at 0)."),
    "loader.pin_memory": Doc(
        "speed", "Page-locked batches and `non_blocking` copies (ignored with a notice without CUDA)."
    ),
    "loader.prefetch_factor": Doc(
        "speed",
        "Chunks (whole batches, 4096 samples or more) each worker may prefetch beyond the one being "
        "gathered; `null`: 2, PyTorch's default (ignored at 0 workers).",
    ),
    "loader.shuffle": Doc(
        "results", "Reshuffle each epoch, from a generator seeded by `train.seed` and the epoch."
    ),
    "loader.shuffle_window": Doc(
        "results",
        "`null`: one global shuffle per epoch. W: shuffle the shard order, then the samples within each "
        "run of W shards, so an epoch reads W shards at a time (data beyond RAM: "
        "[benchmarks](benchmarks.md)); W ≥ the number of shards is exactly the global shuffle.",
    ),
    "loader.device_resident": Doc(
        "speed",
        "Copy the whole split to the training device once; each batch is one index operation there "
        "(`num_workers` is then ignored with a notice). On a GPU, a split larger than its free "
        "memory is refused in one line before the copy (the check: `test_trainer.py`; no test here "
        "has a GPU).",
    ),
    "loader.cache_limit_mb": Doc(
        "speed",
        "Training straight from the DVC remote: the most MB the local shard cache may hold; `null`: no "
        "bound. At least one `shuffle_window` of train shards; a global shuffle needs the whole split "
        "([streaming](streaming.md)).",
    ),
    "loader.prefetch_shards": Doc(
        "speed",
        "Training straight from the DVC remote: shards fetched ahead of training; `null`: one "
        "`shuffle_window` ([streaming](streaming.md)).",
    ),
    # train
    "train.epochs": Doc(
        "results", "Training epochs (raising it after an interruption still resumes the checkpoint)."
    ),
    "train.lr": Doc("results", "Adam learning rate."),
    "train.seed": Doc("results", "Seeds the model initialisation, the shuffle order and the augmentations."),
    "train.device": Doc("rounding", "`auto`: CUDA if available, else the CPU."),
    "train.free_graph": Doc(
        "speed", "Drop the step's loss and logits before the next forward ([benchmarks](benchmarks.md))."
    ),
    "train.verify": Doc(
        "speed",
        "`header`: validate every shard's header, sizes, labels and pixels against the manifest; `full`: "
        "also its SHA-256.",
    ),
    "train.checkpoint_every": Doc(
        "speed",
        "Epochs between resumable checkpoints in `checkpoints/`; `0`: only the time-based ones "
        "(`train.checkpoint_seconds`).",
    ),
    "train.checkpoint_seconds": Doc(
        "speed",
        "Also checkpoint mid-epoch, at the first step boundary this long after the last checkpoint; "
        "`null`: off ([distributed training and resume](distributed.md)).",
    ),
    "train.processes": Doc(
        "rounding",
        "Training processes (DDP) on this machine, started through `torchrun`; `1`: one plain process "
        "([distributed training](distributed.md)).",
    ),
    "train.max_restarts": Doc(
        "speed", "Times the elastic agent restarts the whole group after a process dies."
    ),
    "train.threads": Doc(
        "rounding",
        "Intra-op CPU threads (`torch.set_num_threads`); `null`: PyTorch's choice. Logged as metric "
        "`threads`; on a shared machine `1` is the steadier.",
    ),
    "train.precision": Doc(
        "results",
        "`bf16`: autocast to bfloat16 (CPU or CUDA); `fp16`: float16 with a gradient scaler, CUDA only "
        "([precision](precision.md)).",
    ),
    "train.augment": Doc(
        "results",
        "On-device batch transforms, any of `flip` and `translate`, seeded by `train.seed`, the epoch and "
        "the global batch ([precision and augmentation](precision.md)).",
    ),
}


def _code(value: Any) -> str:
    """A value as YAML writes it, in backticks."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, list | tuple):
        text = "[" + ", ".join(_code(v).strip("`") for v in value) + "]"
    else:
        text = str(value)
    return f"`{text}`"


def allowed(tp: Any) -> str:
    """The values an annotation accepts, in words, from the same annotations pydantic checks."""
    if typing.get_origin(tp) is Annotated:
        found = [m.text for m in tp.__metadata__ if isinstance(m, Expect)]
        return found[0] if found else allowed(typing.get_args(tp)[0])
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " \\| ".join(_code(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(allowed(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list, each {allowed(args[0])}"
        return "[" + ", ".join(allowed(a) for a in args) + "]"
    if tp is type(None):
        return "`null`"
    return {int: "an integer", float: "a number", bool: "`true` \\| `false`", str: "a string"}[tp]


def check_keys(doc: dict[str, Any]) -> None:
    """params.yaml, the dataclasses and KEYS name the same keys, with the same defaults."""
    model = {f"{s}.{f.name}": f for s, cls in SECTIONS.items() for f in fields(cls)}
    in_yaml = {f"{s}.{k}": v for s, keys in doc.items() for k, v in (keys or {}).items()}
    for name, other in (("params.yaml", in_yaml), ("pipeline/paramdoc.py KEYS", KEYS)):
        if set(other) != set(model):
            raise SystemExit(
                f"{name} and pipeline/params.py differ: only in {name}: {sorted(set(other) - set(model))}, "
                f"only in the dataclasses: {sorted(set(model) - set(other))}"
            )
    for key, f in model.items():
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        value = tuple(in_yaml[key]) if isinstance(in_yaml[key], list) else in_yaml[key]
        if value != default or type(value) is not type(default):
            raise SystemExit(f"{key}: params.yaml has {in_yaml[key]!r}, the dataclass default is {default!r}")
        if KEYS[key].effect not in EFFECTS:
            raise SystemExit(f"{key}: effect {KEYS[key].effect!r} is not one of {', '.join(EFFECTS)}")


def _sentence(cls: type) -> str:
    """A section dataclass's docstring after its ``section``: prefix, as a sentence."""
    text = " ".join((cls.__doc__ or "").split(":", 1)[-1].split())  # one line, whatever the wrapping
    return text[:1].upper() + text[1:]


def markdown(params: Path | str = DEFAULT_PARAMS) -> str:
    """The reference page: one table per section, keys in params.yaml's order."""
    doc = read_params_file(params)
    check_keys(doc)
    out = [
        "# Parameters",
        "",
        "<!-- generated by `python -m pipeline.paramdoc > docs/parameters.md`: edit pipeline/paramdoc.py -->",
        "",
        "```bash",
        "dvc exp run -S loader.num_workers=2   # any key, for one experiment: see docs/experiments.md",
        "```",
        "",
        "Every stage checks every key of `params.yaml` for type and range before it does any work, so an",
        "unknown key, a wrong type or a bad value stops the first stage that runs with one line naming the",
        "key, e.g. `error: params.yaml: loader.batch_size: expected an integer >= 1, found 0`. DVC has",
        "already removed that stage's outputs (it does so before running a stage): fix the value and run",
        "again, or `git checkout params.yaml dvc.lock dvclive && dvc checkout` to get the last committed run",
        "back (`dvc.lock` too: stages that ran before the failing one recorded their new outputs there).",
        "A key that is not in `params.yaml` at all is refused by `dvc exp run -S` itself, in DVC's words",
        "(`Could not override 'train.epoch'`). The file is read as YAML 1.2 (as DVC reads it), so `1e-3`",
        "is a number. Defaults are the values in `params.yaml`.",
        "",
        "Effect of a key:",
        "",
        *(f"- **{k}**: {v}" for k, v in EFFECTS.items()),
        "",
        "This page is generated; after changing a key in `pipeline/params.py`, `params.yaml` or its",
        "description in `pipeline/paramdoc.py`, regenerate it:",
        "",
        "```bash",
        "python -m pipeline.paramdoc > docs/parameters.md",
        "```",
    ]
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls, include_extras=True)
        out += ["", f"## `{section}`", "", _sentence(cls), ""]
        out += ["| key | default | allowed | effect | meaning |", "|---|---|---|---|---|"]
        for key in doc[section]:
            entry = KEYS[f"{section}.{key}"]
            row = [
                f"`{section}.{key}`",
                _code(doc[section][key]),
                allowed(hints[key]),
                entry.effect,
                entry.text,
            ]
            out.append("| " + " | ".join(row) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    sys.stdout.write(markdown(args[0] if args else DEFAULT_PARAMS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
