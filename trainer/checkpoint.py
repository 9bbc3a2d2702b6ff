"""Resumable training checkpoints: safetensors for tensors, JSON for the rest, no pickle.

A checkpoint folder holds ``checkpoint.safetensors`` (model weights, Adam
state flattened to named tensors, RNG state as uint8) and ``checkpoint.json``
(completed epochs, run fingerprint, SHA-256 of the tensor file, the metrics
history logged so far). The folder is replaced atomically as a whole, so the
two files always belong together.

The fingerprint covers everything that changes the training trajectory: the
train params that affect results, ``loader.batch_size`` and ``loader.shuffle``,
the device type and both manifests' shard hashes. ``train.epochs`` is left out
on purpose: without a schedule, epoch k of a 5-epoch run is epoch k of a
10-epoch run, so raising ``epochs`` after an interruption still resumes.
A checkpoint that is missing, from another run, or damaged is ignored with a
notice and training starts from scratch: never wrong, at worst slower.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError

from pipeline.atomic import atomic_dir
from pipeline.manifest import Manifest
from pipeline.params import LoaderParams, TrainParams

FORMAT = 1
TENSORS = "checkpoint.safetensors"
META = "checkpoint.json"


def fingerprint(
    train: TrainParams,
    loader: LoaderParams,
    device: torch.device,
    train_manifest: Manifest,
    test_manifest: Manifest,
    architecture: str,
) -> str:
    doc = {
        "format": FORMAT,
        "architecture": architecture,
        "lr": train.lr,
        "seed": train.seed,
        "threads": train.threads,  # intra-op threads change the float rounding of a run
        "device": device.type,
        "batch_size": loader.batch_size,
        "shuffle": loader.shuffle,
        "train_shards": [s.sha256 for s in train_manifest.shards],
        "test_shards": [s.sha256 for s in test_manifest.shards],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Resumed:
    epoch: int
    history: list[dict[str, float]]


def _flatten(model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> dict[str, torch.Tensor]:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {index}.{key} is not a tensor")
            tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
    tensors["rng.cpu"] = torch.get_rng_state()
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    return tensors


def save_checkpoint(
    directory: Path | str,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epoch: int,
    run_fingerprint: str,
    history: list[dict[str, float]],
) -> None:
    """Write the state after ``epoch`` completed epochs; the folder is replaced atomically."""
    tensors = _flatten(model, optimizer, device)
    with atomic_dir(directory) as tmp:
        safetensors.torch.save_file(tensors, str(tmp / TENSORS), metadata={"format": str(FORMAT)})
        meta = {
            "format": FORMAT,
            "epoch": epoch,
            "fingerprint": run_fingerprint,
            "tensors_sha256": hashlib.sha256((tmp / TENSORS).read_bytes()).hexdigest(),
            "history": history,
        }
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


class _Unusable(Exception):
    pass


def _read_meta(directory: Path, run_fingerprint: str, max_epoch: int) -> dict[str, Any]:
    try:
        meta = json.loads((directory / META).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _Unusable(f"cannot read {META}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _Unusable(f"{META}: expected format {FORMAT}")
    if meta.get("fingerprint") != run_fingerprint:
        raise _Unusable("it was made with other params or data")
    epoch = meta.get("epoch")
    if type(epoch) is not int or not 1 <= epoch <= max_epoch:
        raise _Unusable(f"{META}: epoch: expected 1..{max_epoch}, found {epoch!r}")
    history = meta.get("history")
    if (
        not isinstance(history, list)
        or len(history) != epoch
        or not all(isinstance(h, dict) and all(isinstance(v, (int, float)) for v in h.values()) for h in history)
    ):
        raise _Unusable(f"{META}: history: expected {epoch} entries of numbers")
    return meta


def _expected(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Names, dtypes and shapes a checkpoint of this model and (Adam) optimizer must hold."""
    out = {f"model.{k}": (v.dtype, tuple(v.shape)) for k, v in model.state_dict().items()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, p in enumerate(params):
        out[f"optimizer.{index}.step"] = (torch.float32, ())
        out[f"optimizer.{index}.exp_avg"] = (p.dtype, tuple(p.shape))
        out[f"optimizer.{index}.exp_avg_sq"] = (p.dtype, tuple(p.shape))
    return out


def load_checkpoint(
    directory: Path | str,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    run_fingerprint: str,
    max_epoch: int,
    notice: Callable[[str], None] = print,
) -> Resumed | None:
    """Restore model, optimizer and RNG state in place; ``None`` (nothing touched) if not resumable."""
    directory = Path(directory)
    if not (directory / META).exists():
        return None
    try:
        meta = _read_meta(directory, run_fingerprint, max_epoch)
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
        expected = _expected(model, optimizer)
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
        notice(f"notice: not resuming from {directory}: {exc}; training from scratch")
        return None
    # Everything is validated: from here on nothing can fail halfway.
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    history = [{k: float(v) for k, v in h.items()} for h in meta["history"]]
    return Resumed(meta["epoch"], history)


def remove_checkpoint(directory: Path | str) -> None:
    """Drop the checkpoint after a completed run, so the next run starts from scratch."""
    directory = Path(directory)
    for name in (TENSORS, META):
        (directory / name).unlink(missing_ok=True)
    if directory.is_dir() and not any(directory.iterdir()):
        shutil.rmtree(directory)
