"""``manifest.json`` of a tensor split: schema, pure (de)serialisation and validation."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ShardError

SCHEMA_VERSION = 2
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val", "test")
MAX_CLASSES = 65536
IMAGE_DTYPES = ("float32", "uint8")  # uint8: the source bytes, normalised on the training device


@dataclass(frozen=True)
class ShardEntry:
    file: str
    num_samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Normalization:
    """How uint8 pixels x of channel c became floats: ``(x / 255 - mean[c]) / std[c]`` in float32.

    ``unit`` is mean 0, std 1 in every channel. For ``standard`` the statistics come from
    the train split and are stored as the float32 values that were used.
    """

    kind: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    stats_from: str


@dataclass(frozen=True)
class PixelStats:
    """Mean and std of ``x / 255`` per channel over the train split (whatever the normalization)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    dataset: str
    split: str
    num_samples: int
    num_classes: int
    class_names: tuple[str, ...]
    class_counts: tuple[int, ...]  # samples of each class in this split
    image_shape: tuple[int, int, int]  # [C, H, W]
    image_dtype: str
    label_dtype: str
    normalization: Normalization
    train_stats: PixelStats
    shards: tuple[ShardEntry, ...]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def _need(doc: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in doc:
        raise ShardError(f"{where}: missing key {key!r}")
    value = doc[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ShardError(f"{where}: {key}: expected {getattr(kind, '__name__', kind)}, found {value!r:.80}")
    return value


def _numbers(doc: dict, key: str, count: int, where: str) -> tuple[float, ...]:
    values = _need(doc, key, list, where)
    try:
        out = tuple(float(v) for v in values if type(v) in (int, float))
    except OverflowError:  # an integer too large for a float
        out = ()
    if len(out) != len(values) or len(out) != count or not all(math.isfinite(v) for v in out):
        raise ShardError(
            f"{where}: {key}: expected {count} finite numbers (one per channel), found {values!r:.120}"
        )
    return out


def read_normalization(doc: dict, channels: int, where: str) -> Normalization:
    """``doc["normalization"]`` checked: a manifest's, or ``models/model.json``'s, which copies it."""
    norm = _need(doc, "normalization", dict, where)
    nw = f"{where}: normalization"
    out = Normalization(
        kind=_need(norm, "kind", str, nw),
        mean=_numbers(norm, "mean", channels, nw),
        std=_numbers(norm, "std", channels, nw),
        stats_from=_need(norm, "stats_from", str, nw),
    )
    if out.kind not in ("unit", "standard") or not all(s > 0 for s in out.std):
        raise ShardError(f"{nw}: expected kind unit|standard and every std > 0, found {norm!r:.120}")
    return out


def _shards(doc: dict, where: str) -> tuple[ShardEntry, ...]:
    shards = []
    names = set()
    for i, entry in enumerate(_need(doc, "shards", list, where)):
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
    return tuple(shards)


def _image_shape(doc: dict, where: str) -> tuple[int, int, int]:
    shape = _need(doc, "image_shape", list, where)
    if len(shape) != 3 or not all(type(d) is int and 1 <= d <= 65536 for d in shape):
        raise ShardError(
            f"{where}: image_shape: expected [C, H, W] of integers 1..65536, found {shape!r:.80}"
        )
    return (shape[0], shape[1], shape[2])


def parse_manifest(text: str, where: str) -> Manifest:
    """Parse and check a manifest's structure; shards themselves are checked by the reader.

    A split may be empty (no shards): the validation split is when ``data.val_fraction`` is 0.
    """
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ShardError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ShardError(f"{where}: expected a JSON object, found {type(doc).__name__}")
    version = _need(doc, "schema_version", int, where)
    if version != SCHEMA_VERSION:
        raise ShardError(
            f"{where}: schema_version {version} is not this pipeline's {SCHEMA_VERSION}; "
            f"rerun `dvc repro tensorize` to rebuild the shards"
        )
    known = {f for f in Manifest.__dataclass_fields__}
    extra = sorted(set(doc) - known)
    if extra:
        raise ShardError(f"{where}: unknown key {extra[0]!r}")
    shape = _image_shape(doc, where)
    stats = _need(doc, "train_stats", dict, where)
    num_classes = _need(doc, "num_classes", int, where)
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ShardError(f"{where}: num_classes: expected 1..{MAX_CLASSES}, found {num_classes}")
    class_names = _need(doc, "class_names", list, where)
    counts = _need(doc, "class_counts", list, where)
    if (
        len(class_names) != num_classes
        or not all(isinstance(n, str) and n for n in class_names)
        or len(set(class_names)) != num_classes
    ):
        raise ShardError(
            f"{where}: class_names: expected {num_classes} distinct non-empty names, "
            f"found {class_names!r:.120}"
        )
    if len(counts) != num_classes or not all(type(c) is int and c >= 0 for c in counts):
        raise ShardError(
            f"{where}: class_counts: expected {num_classes} integers >= 0, found {counts!r:.120}"
        )
    manifest = Manifest(
        schema_version=version,
        dataset=_need(doc, "dataset", str, where),
        split=_need(doc, "split", str, where),
        num_samples=_need(doc, "num_samples", int, where),
        num_classes=num_classes,
        class_names=tuple(class_names),
        class_counts=tuple(counts),
        image_shape=shape,
        image_dtype=_need(doc, "image_dtype", str, where),
        label_dtype=_need(doc, "label_dtype", str, where),
        normalization=read_normalization(doc, shape[0], where),
        train_stats=PixelStats(
            _numbers(stats, "mean", shape[0], f"{where}: train_stats"),
            _numbers(stats, "std", shape[0], f"{where}: train_stats"),
        ),
        shards=_shards(doc, where),
    )
    if manifest.split not in SPLITS:
        raise ShardError(f"{where}: split: expected one of {', '.join(SPLITS)}, found {manifest.split!r:.40}")
    if manifest.num_samples < 0:
        raise ShardError(f"{where}: num_samples: expected an integer >= 0, found {manifest.num_samples}")
    total = sum(s.num_samples for s in manifest.shards)
    if total != manifest.num_samples or sum(counts) != manifest.num_samples:
        raise ShardError(
            f"{where}: num_samples is {manifest.num_samples} but the shards hold {total} and "
            f"class_counts add up to {sum(counts)}"
        )
    if manifest.image_dtype not in IMAGE_DTYPES or manifest.label_dtype != "int64":
        raise ShardError(
            f"{where}: expected images {' or '.join(IMAGE_DTYPES)} and labels int64, found "
            f"{manifest.image_dtype} and {manifest.label_dtype}"
        )
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
        raise ShardError(
            f"{path}: shard {sorted(listed - present)[0]!r} is listed but missing from {split_dir}"
        )
    if present - listed:
        raise ShardError(
            f"{path}: shard {sorted(present - listed)[0]!r} is in {split_dir} but not listed in the manifest"
        )
    return manifest
