"""The trained model as a folder: ``model.safetensors`` plus ``model.json`` (its config).

Nothing in the folder depends on timing or the machine, so on CPU the same
params and data give byte-identical files whatever the loader settings.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import safetensors.torch
from safetensors import SafetensorError

from pipeline.atomic import atomic_dir
from pipeline.errors import PipelineError
from pipeline.manifest import Manifest
from pipeline.params import TrainParams
from trainer.model import ARCHITECTURE, SimpleCNN, count_parameters

WEIGHTS = "model.safetensors"
CONFIG = "model.json"
FORMAT = 2  # 2: input_shape from the data, class_names


def save_model(
    model_dir: Path | str, model: SimpleCNN, *, manifest: Manifest, train: TrainParams
) -> dict[str, Any]:
    """Write weights and config into ``model_dir``, replacing it atomically; return the config."""
    config = {
        "format": FORMAT,
        "architecture": ARCHITECTURE,
        "parameters": count_parameters(model),
        "weights": WEIGHTS,
        "input_shape": list(manifest.image_shape),
        "input_dtype": "float32",
        "num_classes": manifest.num_classes,
        "class_names": list(manifest.class_names),  # output i of the model is class_names[i]
        "dataset": manifest.dataset,
        "normalization": {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(manifest.normalization).items()
        },
        "training": {
            "epochs": train.epochs,
            "lr": train.lr,
            "seed": train.seed,
            "optimizer": "Adam",
            "loss": "cross_entropy",
        },
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(model_dir) as tmp:
        safetensors.torch.save_file(state, str(tmp / WEIGHTS), metadata={"architecture": ARCHITECTURE})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return config


def load_model(model_dir: Path | str) -> tuple[SimpleCNN, dict[str, Any]]:
    """Load a folder written by :func:`save_model` (no pickle involved)."""
    model_dir = Path(model_dir)
    try:
        config = json.loads((model_dir / CONFIG).read_text(encoding="utf-8"))
        state = safetensors.torch.load_file(str(model_dir / WEIGHTS))
    except (OSError, ValueError, SafetensorError) as exc:
        raise PipelineError(f"{model_dir}: cannot load model: {exc}") from None
    if not isinstance(config, dict) or config.get("architecture") != ARCHITECTURE:
        raise PipelineError(f"{model_dir / CONFIG}: architecture: expected {ARCHITECTURE!r}")
    try:
        channels, height, width = (int(d) for d in config["input_shape"])
        model = SimpleCNN(channels, height, width, int(config["num_classes"]))
    except (KeyError, TypeError, ValueError, PipelineError) as exc:
        raise PipelineError(
            f"{model_dir / CONFIG}: expected input_shape [C, H, W] and num_classes: {exc}"
        ) from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise PipelineError(f"{model_dir / WEIGHTS}: weights do not fit {ARCHITECTURE}: {exc}") from None
    return model, config
