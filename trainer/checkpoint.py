"""Resumable training checkpoints: safetensors for tensors, JSON for the rest, no pickle.

A checkpoint folder holds ``checkpoint.safetensors`` (model weights, Adam
state flattened to named tensors, RNG state as uint8; with ``train.precision``
fp16 also the gradient scaler's scale and growth tracker) and ``checkpoint.json``
(the :class:`~trainer.position.Position`: completed epochs, global batches
done in the next one and its partial sums; the run fingerprint, the number of
processes and intra-op threads, SHA-256 of the tensor file, the metrics
history logged so far). The folder is replaced atomically as a whole, so the
two files always belong together.

The fingerprint covers everything that changes the training trajectory: every
``train`` and ``loader`` param except the ones listed in :data:`SPEED_ONLY`
(so a param added later is covered without anyone remembering to add it),
the device type, each split's whole manifest (its shard hashes, and the
normalization the trainer applies to uint8 shards, which hold the same bytes
whatever it is), the torch version and a digest of the train stage's code
(:func:`code_digest`). ``train.epochs`` is left out
on purpose: without a schedule, epoch k of a 5-epoch run is epoch k of a
10-epoch run, so raising ``epochs`` after an interruption still resumes.

Two things that change only the order of float sums are compared outside the
fingerprint, so a refusal can say which one differs: the intra-op thread
count the run resolved on the CPU (``train.threads: null`` resolves at run
time) must match exactly whenever the number of processes matches; the
number of processes may differ (an elastic resume: the global batch sequence
is the same for any world size, ``trainer.rank_split``), and the caller then
says so. That is the only reason the world size is not in the fingerprint.
The machine (CPU or GPU model, :func:`trainer.precision.machine`) is recorded
too: a checkpoint resumes on another one, where kernels may round differently,
and the caller says so (resume anywhere; the results then agree closely, not bit for bit).
A checkpoint that is missing, from another run, or damaged is ignored with a
notice and training starts from scratch: never wrong, at worst slower.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError
from safetensors import SafetensorError

from pipeline.atomic import atomic_dir
from pipeline.manifest import Manifest
from pipeline.params import LoaderParams, TrainParams
from trainer.position import Position

log = logging.getLogger(__name__)

FORMAT = 2
TENSORS = "checkpoint.safetensors"
META = "checkpoint.json"


# Params that change speed, never results (or, for train.epochs, only how far the
# same trajectory goes). Everything else in `train` and `loader` is fingerprinted.
SPEED_ONLY = frozenset(
    {
        "loader.num_workers",
        "loader.persistent_workers",
        "loader.pin_memory",
        "loader.prefetch_factor",
        "loader.device_resident",  # bit-identical to the memory-mapped path (test_train_stage.py)
        "loader.cache_limit_mb",  # streaming: where bytes come from, never what they are (test_stream.py)
        "loader.prefetch_shards",
        "train.epochs",
        "train.verify",
        "train.checkpoint_every",
        "train.checkpoint_seconds",
        "train.max_restarts",  # how often a killed group is restarted, not what it computes
    }
)
# Params compared outside the fingerprint: the number of processes, which a resume may change
# (elastic; RunShape.processes records the world size the run really had, whoever set it).
ELASTIC = frozenset({"train.processes"})
ROOT = Path(__file__).resolve().parent.parent
TRAIN_STAGE = "train"


def result_params(train: TrainParams, loader: LoaderParams) -> dict[str, Any]:
    """Every ``loader.*`` and ``train.*`` value but :data:`SPEED_ONLY` and :data:`ELASTIC`, by dotted key."""
    out = {}
    for section, params in (("loader", loader), ("train", train)):
        for field in dataclasses.fields(params):
            key = f"{section}.{field.name}"
            if key not in SPEED_ONLY | ELASTIC:
                value = getattr(params, field.name)
                out[key] = list(value) if isinstance(value, tuple) else value
    return out


def train_code_files(root: Path = ROOT) -> list[str]:
    """The ``.py`` deps of the ``train`` stage in ``root/dvc.yaml``: the code DVC reruns ``train`` for.

    Without a readable dvc.yaml (e.g. the packages used outside the repository)
    every ``.py`` file of the three packages counts: a superset, never stale.
    """
    try:
        stages = YAML(typ="safe", pure=True).load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
        deps = stages[TRAIN_STAGE]["deps"]
        files = sorted({d for d in deps if isinstance(d, str) and d.endswith(".py")})
    except (OSError, UnicodeDecodeError, YAMLError, KeyError, TypeError):
        files = []
    if not files:
        files = sorted(
            str(p.relative_to(root))
            for pkg in ("pipeline", "stages", "trainer")
            for p in (root / pkg).glob("*.py")
        )
    return files


def code_digest(root: Path = ROOT) -> str:
    """SHA-256 over the train stage's code files (name and bytes; a missing file counts as missing)."""
    digest = hashlib.sha256()
    for rel in train_code_files(root):
        try:
            content = (root / rel).read_bytes()
        except OSError:
            content = None
        digest.update(
            json.dumps([rel, None if content is None else hashlib.sha256(content).hexdigest()]).encode()
        )
    return digest.hexdigest()


def fingerprint(
    train: TrainParams,
    loader: LoaderParams,
    device: torch.device,
    train_manifest: Manifest,
    test_manifest: Manifest,
    architecture: str,
    code: str | None = None,
    val_manifest: Manifest | None = None,
) -> str:
    """What a checkpoint must match to be resumed; ``code`` defaults to :func:`code_digest`.

    The validation split's manifest counts too: its metrics are part of the history a resume replays.

    The number of processes is deliberately absent (elastic resume, see the
    module docstring); the thread count is compared beside it.
    """
    doc = {
        "format": FORMAT,
        "architecture": architecture,
        "params": result_params(train, loader),
        "device": device.type,
        "torch": torch.__version__,
        "code": code_digest() if code is None else code,
        # Whole manifests, not only shard hashes: uint8 shards hold the source bytes whatever the
        # normalization is, which the trainer applies from the manifest.
        "train_manifest": _digest(train_manifest),
        "test_manifest": _digest(test_manifest),
        "val_manifest": _digest(val_manifest) if val_manifest is not None else None,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _digest(manifest: Manifest) -> str:
    return hashlib.sha256(manifest.to_json().encode()).hexdigest()


@dataclass(frozen=True)
class RunShape:
    """What the run resolved at start that a resume compares outside the fingerprint."""

    processes: int
    threads: (
        int | None
    )  # intra-op threads on the CPU; None on an accelerator, where they do not round anything
    # the CPU or GPU model (trainer.precision.machine): a resume elsewhere is told, not refused
    machine: str = ""


@dataclass(frozen=True)
class Resumed:
    position: Position
    history: list[dict[str, float]]
    processes: int  # the checkpoint's; differs from the run's on an elastic resume
    machine: str = ""  # the checkpoint's; differs from the run's on a resume on another machine


# fp16's torch.amp.GradScaler: what changes while training (its factors and interval are constants of the run)
SCALER = {"scaler.scale": torch.float64, "scaler.growth_tracker": torch.int64}


def _scaler_tensors(scaler: torch.amp.GradScaler) -> dict[str, torch.Tensor]:
    state = scaler.state_dict()
    return {
        "scaler.scale": torch.tensor(float(state["scale"]), dtype=torch.float64),
        "scaler.growth_tracker": torch.tensor(int(state["_growth_tracker"]), dtype=torch.int64),
    }


def state_tensors(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, torch.Tensor]:
    """Model, optimizer, RNG and (fp16) gradient scaler state as named CPU tensors, as checkpoints hold it."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {index}.{key} is not a tensor")
            tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
    tensors["rng.cpu"] = torch.get_rng_state()
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    if scaler is not None:
        tensors.update(_scaler_tensors(scaler))
    return tensors


def save_checkpoint(
    directory: Path | str,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
    position: Position,
    run_fingerprint: str,
    shape: RunShape,
    history: list[dict[str, float]],
) -> None:
    """Write the state at ``position``; the folder is replaced atomically.

    Raises :class:`~pipeline.errors.OutputError` (disk full, permissions) or
    ``SafetensorError``; nothing is left half-written either way.
    """
    tensors = state_tensors(model, optimizer, device, scaler)
    with atomic_dir(directory) as tmp:
        safetensors.torch.save_file(tensors, str(tmp / TENSORS), metadata={"format": str(FORMAT)})
        meta = {
            "format": FORMAT,
            "epoch": position.epoch,
            "step": position.step,
            "partial": {
                "samples": position.samples,
                "loss_sums": list(position.loss_sums),
                "seconds": position.seconds,
                "wait_seconds": position.wait_seconds,
            },
            "fingerprint": run_fingerprint,
            "processes": shape.processes,
            "threads": shape.threads,
            "machine": shape.machine,
            "tensors_sha256": hashlib.sha256((tmp / TENSORS).read_bytes()).hexdigest(),
            "history": history,
        }
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


class _Unusable(Exception):
    pass


def _is_int(value: Any, lo: int, hi: int) -> bool:
    return type(value) is int and lo <= value <= hi


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _read_meta(
    directory: Path,
    run_fingerprint: str,
    shape: RunShape,
    max_epoch: int,
    batches_per_epoch: int,
    metrics: Sequence[str],
) -> dict[str, Any]:
    try:
        meta = json.loads((directory / META).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: deep nesting
        raise _Unusable(f"cannot read {META}: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _Unusable(f"{META}: expected format {FORMAT}")
    if meta.get("fingerprint") != run_fingerprint:
        raise _Unusable("it was made with other params, data, code or torch version")
    processes, threads = meta.get("processes"), meta.get("threads")
    if not _is_int(processes, 1, 1 << 20) or not (threads is None or _is_int(threads, 1, 1 << 20)):
        raise _Unusable(
            f"{META}: processes, threads: expected integers >= 1, found {processes!r}, {threads!r}"
        )
    if not isinstance(meta.get("machine", ""), str):
        raise _Unusable(f"{META}: machine: expected a string, found {meta.get('machine')!r:.80}")
    if processes == shape.processes and threads != shape.threads:
        raise _Unusable(
            f"it was made with {threads} intra-op threads per process, this run uses {shape.threads} "
            "(float sums would round differently; set train.threads to pin the count)"
        )
    epoch, step = meta.get("epoch"), meta.get("step")
    if not _is_int(epoch, 0, max_epoch):
        raise _Unusable(f"{META}: epoch: expected 0..{max_epoch}, found {epoch!r}")
    last_step = batches_per_epoch - 1 if epoch < max_epoch else 0
    if not _is_int(step, 0, last_step):
        raise _Unusable(f"{META}: step: expected 0..{last_step}, found {step!r}")
    partial = meta.get("partial")
    sums = partial.get("loss_sums") if isinstance(partial, dict) else None
    if (
        not isinstance(partial, dict)
        or not _is_int(partial.get("samples"), 0, 1 << 62)
        or not isinstance(sums, list)
        or len(sums) != processes
        or not all(map(_is_number, sums))
        or not _is_number(partial.get("seconds"))
        or not _is_number(partial.get("wait_seconds"))
    ):
        raise _Unusable(
            f"{META}: partial: expected samples, {processes} finite loss_sums, seconds, wait_seconds"
        )
    history = meta.get("history")
    if not isinstance(history, list) or len(history) != epoch:
        raise _Unusable(f"{META}: history: expected {epoch} entries")
    names = set(metrics)
    for i, entry in enumerate(history):
        if not isinstance(entry, dict) or set(entry) != names:
            found = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise _Unusable(
                f"{META}: history[{i}]: expected the metrics {sorted(names)}, found {found}"[:300]
            )
        if not all(type(v) in (int, float) for v in entry.values()):
            raise _Unusable(f"{META}: history[{i}]: expected numbers")
    return meta


def _expected(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The names, dtypes and shapes a checkpoint of this model, Adam optimizer and scaler must hold.

    The RNG state is checked separately.
    """
    out = {f"model.{k}": (v.dtype, tuple(v.shape)) for k, v in model.state_dict().items()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, p in enumerate(params):
        out[f"optimizer.{index}.step"] = (torch.float32, ())
        out[f"optimizer.{index}.exp_avg"] = (p.dtype, tuple(p.shape))
        out[f"optimizer.{index}.exp_avg_sq"] = (p.dtype, tuple(p.shape))
    if scaler is not None:
        out.update({name: (dtype, ()) for name, dtype in SCALER.items()})
    return out


def load_checkpoint(
    directory: Path | str,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
    run_fingerprint: str,
    shape: RunShape,
    max_epoch: int,
    batches_per_epoch: int,
    metrics: Sequence[str],
) -> Resumed | None:
    """Restore model, optimizer, RNG and scaler state in place; ``None`` (nothing touched) if not resumable.

    ``metrics`` are the names every history entry must carry, no more, no fewer
    (the caller computes them: which metrics a run logs may depend on its data).
    """
    directory = Path(directory)
    if not (directory / META).exists():
        return None
    try:
        meta = _read_meta(directory, run_fingerprint, shape, max_epoch, batches_per_epoch, metrics)
        try:
            blob = (directory / TENSORS).read_bytes()
        except OSError as exc:
            raise _Unusable(f"cannot read {TENSORS}: {exc}") from None
        if hashlib.sha256(blob).hexdigest() != meta.get("tensors_sha256"):
            raise _Unusable(f"{TENSORS} does not match its SHA-256 in {META}")
        try:
            tensors = safetensors.torch.load(blob)
        except (SafetensorError, ValueError) as exc:
            raise _Unusable(f"{TENSORS}: {exc}") from None
        expected = _expected(model, optimizer, scaler)
        rng_keys = {"rng.cpu"} | ({"rng.cuda"} if device.type == "cuda" else set())
        if set(tensors) != set(expected) | rng_keys:
            raise _Unusable(f"{TENSORS}: tensor names do not match this model and optimizer")
        for name, (dtype, shape) in expected.items():
            if tensors[name].dtype != dtype or tuple(tensors[name].shape) != shape:
                found = f"{tensors[name].dtype} {list(tensors[name].shape)}"
                raise _Unusable(f"{TENSORS}: {name}: expected {dtype} {list(shape)}, found {found}")
        for key in rng_keys:
            if tensors[key].dtype != torch.uint8 or tensors[key].ndim != 1:
                raise _Unusable(f"{TENSORS}: {key}: expected a uint8 vector")
    except _Unusable as exc:
        log.info("not resuming from %s: %s; training from scratch", directory, exc)
        return None
    # Everything is validated: from here on nothing can fail halfway.
    restore_state(tensors, model=model, optimizer=optimizer, device=device, scaler=scaler)
    history = [{k: float(v) for k, v in h.items()} for h in meta["history"]]
    partial = meta["partial"]
    position = Position(
        meta["epoch"],
        meta["step"],
        partial["samples"],
        tuple(float(v) for v in partial["loss_sums"]),
        float(partial["seconds"]),
        float(partial["wait_seconds"]),
    )
    return Resumed(position, history, meta["processes"], meta.get("machine", ""))


def empty_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, torch.Tensor]:
    """Uninitialised tensors named, typed and shaped as :func:`state_tensors` returns them after a step:
    what a rank receives rank 0's restored state into."""
    out = {
        name: torch.empty(shape, dtype=dtype)
        for name, (dtype, shape) in _expected(model, optimizer, scaler).items()
    }
    out["rng.cpu"] = torch.empty_like(torch.get_rng_state())
    if device.type == "cuda":
        out["rng.cuda"] = torch.empty_like(torch.cuda.get_rng_state(device))
    return out


def restore_state(
    tensors: dict[str, torch.Tensor],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Load validated state tensors into model, optimizer, RNG and scaler.

    The names are those :func:`state_tensors` gives.
    """
    model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    if scaler is not None:
        scaler.load_state_dict(
            {
                **scaler.state_dict(),
                "scale": float(tensors["scaler.scale"]),
                "_growth_tracker": int(tensors["scaler.growth_tracker"]),
            }
        )


def remove_checkpoint(directory: Path | str) -> None:
    """Drop the checkpoint after a completed run, so the next run starts from scratch."""
    directory = Path(directory)
    for name in (TENSORS, META):
        (directory / name).unlink(missing_ok=True)
    if directory.is_dir() and not any(directory.iterdir()):
        shutil.rmtree(directory)
