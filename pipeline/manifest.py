"""``manifest.json`` of a tensor split: schema, pure (de)serialisation and validation."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ShardError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
IMAGE_SHAPE = (1, 28, 28)
NUM_CLASSES = 10


@dataclass(frozen=True)
class ShardEntry:
    file: str
    num_samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Normalization:
    """How uint8 pixels x became floats: ``(x / 255 - mean) / std`` in float32.

    ``unit`` is mean 0, std 1. For ``standard`` the statistics come from the
    train split and are stored as the float32 values that were used.
    """

    kind: str
    mean: float
    std: float
    stats_from: str


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    dataset: str
    split: str
    num_samples: int
    num_classes: int
    image_shape: tuple[int, ...]
    image_dtype: str
    label_dtype: str
    normalization: Normalization
    shards: tuple[ShardEntry, ...]

    def to_json(self) -> str:
        doc = asdict(self)
        doc["image_shape"] = list(self.image_shape)
        return json.dumps(doc, indent=2) + "\n"


def _need(doc: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in doc:
        raise ShardError(f"{where}: missing key {key!r}")
    value = doc[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ShardError(f"{where}: {key}: expected {getattr(kind, '__name__', kind)}, found {value!r:.80}")
    return value


def parse_manifest(text: str, where: str) -> Manifest:
    """Parse and check a manifest's structure; shards themselves are checked by the reader."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ShardError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ShardError(f"{where}: expected a JSON object, found {type(doc).__name__}")
    version = _need(doc, "schema_version", int, where)
    if version != SCHEMA_VERSION:
        raise ShardError(f"{where}: schema_version: expected {SCHEMA_VERSION}, found {version}")
    known = {f for f in Manifest.__dataclass_fields__}
    extra = sorted(set(doc) - known)
    if extra:
        raise ShardError(f"{where}: unknown key {extra[0]!r}")
    norm = _need(doc, "normalization", dict, where)
    nw = f"{where}: normalization"
    try:
        mean = float(_need(norm, "mean", (int, float), nw))
        std = float(_need(norm, "std", (int, float), nw))
    except OverflowError:  # an integer too large for a float
        raise ShardError(f"{nw}: mean and std must be finite numbers, found {norm!r:.120}") from None
    normalization = Normalization(
        kind=_need(norm, "kind", str, nw),
        mean=mean,
        std=std,
        stats_from=_need(norm, "stats_from", str, nw),
    )
    if (normalization.kind not in ("unit", "standard") or not normalization.std > 0
            or not math.isfinite(mean) or not math.isfinite(std)):
        raise ShardError(f"{nw}: expected kind unit|standard, finite mean and std > 0, found {norm!r:.120}")
    listed = _need(doc, "shards", list, where)
    if not listed:  # an empty split would only fail later, inside training, with a traceback
        raise ShardError(f"{where}: shards: expected at least one shard, found an empty list")
    shards = []
    names = set()
    for i, entry in enumerate(listed):
        sw = f"{where}: shards[{i}]"
        if not isinstance(entry, dict):
            raise ShardError(f"{sw}: expected an object, found {entry!r:.80}")
        name = _need(entry, "file", str, sw)
        if "/" in name or "\\" in name or name in ("", ".", "..") or name.startswith("."):
            raise ShardError(f"{sw}: file must be a plain file name inside the split folder, found {name!r}")
        if name in names:
            raise ShardError(f"{sw}: file {name!r} is listed twice")
        names.add(name)
        sha = _need(entry, "sha256", str, sw)
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ShardError(f"{sw}: sha256 must be 64 lowercase hex digits, found {sha!r:.80}")
        count = _need(entry, "num_samples", int, sw)
        size = _need(entry, "bytes", int, sw)
        if count < 1 or size < 8:
            raise ShardError(f"{sw}: expected num_samples >= 1 and bytes >= 8, found {count} and {size}")
        shards.append(ShardEntry(name, count, size, sha))
    manifest = Manifest(
        schema_version=version,
        dataset=_need(doc, "dataset", str, where),
        split=_need(doc, "split", str, where),
        num_samples=_need(doc, "num_samples", int, where),
        num_classes=_need(doc, "num_classes", int, where),
        image_shape=tuple(_need(doc, "image_shape", list, where)),
        image_dtype=_need(doc, "image_dtype", str, where),
        label_dtype=_need(doc, "label_dtype", str, where),
        normalization=normalization,
        shards=tuple(shards),
    )
    if manifest.num_samples < 1:
        raise ShardError(f"{where}: num_samples: expected an integer >= 1, found {manifest.num_samples}")
    total = sum(s.num_samples for s in shards)
    if total != manifest.num_samples:
        raise ShardError(f"{where}: num_samples is {manifest.num_samples} but the shards hold {total}")
    if manifest.image_shape != IMAGE_SHAPE or manifest.image_dtype != "float32" or manifest.label_dtype != "int64":
        raise ShardError(
            f"{where}: expected images float32 {list(IMAGE_SHAPE)} and labels int64, found "
            f"{manifest.image_dtype} {list(manifest.image_shape)} and {manifest.label_dtype}"
        )
    if manifest.num_classes != NUM_CLASSES:
        raise ShardError(f"{where}: num_classes: expected {NUM_CLASSES}, found {manifest.num_classes}")
    return manifest


def read_manifest(split_dir: Path | str) -> Manifest:
    """Read ``<split_dir>/manifest.json`` and check it lists exactly the shard files present."""
    split_dir = Path(split_dir)
    path = split_dir / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ShardError(f"{path}: manifest not found (run `dvc repro tensorize`)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ShardError(f"{path}: cannot read manifest: {exc}") from None
    manifest = parse_manifest(text, str(path))
    listed = {s.file for s in manifest.shards}
    present = {p.name for p in split_dir.glob("*.safetensors")}
    if listed - present:
        raise ShardError(f"{path}: shard {sorted(listed - present)[0]!r} is listed but missing from {split_dir}")
    if present - listed:
        raise ShardError(f"{path}: shard {sorted(present - listed)[0]!r} is in {split_dir} but not listed in the manifest")
    return manifest
