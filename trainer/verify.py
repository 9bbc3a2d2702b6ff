"""Check a tensor split folder against its manifest before a single sample is trained on.

What the trainer trusts after :func:`validate_split` returns: every listed shard
is a regular file of the size the manifest records, its safetensors header is
well-formed (``pipeline.shards.parse_header``: lengths, offsets, alignment),
it holds exactly ``images`` [n, C, H, W] of the manifest's ``image_dtype``
(float32, or uint8 source bytes) and ``labels`` int64 [n] with the manifest's
``n`` and image shape, every label is a valid class, every float32 pixel is a
finite number (a NaN pixel would train a NaN model; a uint8 one cannot be
anything but a byte), and its metadata (when
present) names the manifest's dataset and split. ``verify="full"`` adds the
SHA-256 of every shard against the manifest. The pixel check reads the
images once, in bounded chunks: a fraction of an epoch (bench/checkpoint.md). The memory-mapped dataset then
views the data buffer at the validated offsets without further checks.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import ShardError
from pipeline.manifest import MANIFEST_NAME, Manifest, ShardEntry, read_manifest
from pipeline.normalize import lookup_table
from pipeline.shards import ShardLayout, TensorInfo, check_tensors, read_layout

_HASH_CHUNK = 1 << 20
_FINITE_CHUNK = 16 << 20  # bytes of pixels checked at a time: bounded memory whatever the shard size


@dataclass(frozen=True)
class ValidShard:
    """A shard that passed validation, with the absolute file offsets of its tensors."""

    path: Path
    num_samples: int
    images_offset: int
    labels_offset: int
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class ValidSplit:
    directory: Path
    manifest: Manifest
    shards: tuple[ValidShard, ...]

    @property
    def num_samples(self) -> int:
        return self.manifest.num_samples


def _check_layout(
    where: str, layout: ShardLayout, manifest: Manifest, num_samples: int
) -> tuple[TensorInfo, TensorInfo]:
    images, labels = check_tensors(where, layout, num_samples, manifest.image_shape, manifest.image_dtype)
    for key in ("dataset", "split"):
        found = layout.metadata.get(key)
        if found is not None and found != getattr(manifest, key):
            expected = getattr(manifest, key)
            raise ShardError(
                f"{where}: metadata {key}: expected {expected!r} as the manifest says, found {found!r}"
            )
    return images, labels


def _check_labels(where: str, path: Path, labels: TensorInfo, num_classes: int) -> None:
    # Labels index the loss; an out-of-range value would crash (or silently corrupt) training.
    values = np.fromfile(path, dtype="<i8", count=labels.shape[0], offset=labels.start)
    if len(values) != labels.shape[0]:
        raise ShardError(f"{where}: labels: expected {labels.shape[0]} values, read {len(values)}")
    bad = np.flatnonzero((values < 0) | (values >= num_classes))
    if bad.size:
        raise ShardError(f"{where}: labels[{bad[0]}]: expected 0..{num_classes - 1}, found {values[bad[0]]}")


def _check_finite(where: str, path: Path, images: TensorInfo) -> None:
    if images.dtype != "F32":
        return  # integer pixels are always finite
    n, per_sample = images.shape[0], int(np.prod(images.shape[1:]))
    if n == 0 or per_sample == 0:
        return
    values = np.memmap(path, dtype="<f4", mode="r", offset=images.start, shape=(n, per_sample))
    rows = max(1, _FINITE_CHUNK // (per_sample * 4))
    for first in range(0, n, rows):
        ok = np.isfinite(values[first : first + rows]).all(axis=1)
        if not ok.all():
            raise ShardError(
                f"{where}: images[{first + int(np.argmin(ok))}]: expected finite pixel values, "
                "found NaN or infinity"
            )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_split(manifest: Manifest, expected_split: str, where: str) -> None:
    """The manifest is of the expected split, only a validation split may be empty, and (uint8 shards)
    its normalization maps every byte to a finite float32, as the trainer will apply it."""
    if manifest.split != expected_split:
        raise ShardError(f"{where}: split: expected {expected_split!r}, found {manifest.split!r}")
    if manifest.num_samples == 0 and expected_split != "val":
        raise ShardError(f"{where}: expected at least one sample in the {expected_split} split, found none")
    if manifest.image_dtype != "uint8":
        return  # float32 shards are checked value by value instead (_check_finite)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # what is found is said below
        table = lookup_table(manifest.normalization)
    if not np.isfinite(table).all():
        n = manifest.normalization
        raise ShardError(
            f"{where}: normalization: expected mean and std that map every pixel byte to a finite "
            f"float32, found mean {list(n.mean)} and std {list(n.std)}"
        )


def validate_split(split_dir: Path | str, *, expected_split: str, verify: str = "header") -> ValidSplit:
    """Validate ``split_dir`` (manifest + every shard); raise :class:`ShardError` on the first problem.

    Only the validation split may be empty (``data.val_fraction`` 0).
    """
    if verify not in ("header", "full"):
        raise ValueError(f"verify must be 'header' or 'full', not {verify!r}")
    directory = Path(split_dir).absolute()
    if not directory.is_dir():
        found = "a file" if directory.exists() else "nothing"
        raise ShardError(f"{directory}: expected a tensor split folder, found {found}")
    manifest = read_manifest(directory)
    check_split(manifest, expected_split, str(directory / MANIFEST_NAME))
    shards = [validate_shard(directory / entry.file, entry, manifest, verify) for entry in manifest.shards]
    return ValidSplit(directory, manifest, tuple(shards))


def validate_shard(path: Path, entry: ShardEntry, manifest: Manifest, verify: str = "header") -> ValidShard:
    """Validate one shard file against its manifest entry (see the module docstring)."""
    where = str(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise ShardError(f"{where}: cannot stat shard: {exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ShardError(f"{where}: expected a regular file")
    if st.st_size != entry.bytes:
        raise ShardError(f"{where}: file is {st.st_size} bytes, the manifest says {entry.bytes}")
    layout = read_layout(path)
    images, labels = _check_layout(where, layout, manifest, entry.num_samples)
    _check_labels(where, path, labels, manifest.num_classes)
    _check_finite(where, path, images)
    if verify == "full":
        found = sha256_file(path)
        if found != entry.sha256:
            raise ShardError(f"{where}: SHA-256 is {found}, the manifest says {entry.sha256}")
    return ValidShard(path, entry.num_samples, images.start, labels.start, st.st_size, st.st_mtime_ns)


def check_compatible(train: ValidSplit, other: ValidSplit) -> None:
    """Another split must come from the train split's dataset, shape, classes and normalisation."""
    a, b = train.manifest, other.manifest
    for key in ("dataset", "image_shape", "class_names", "normalization"):
        if getattr(a, key) != getattr(b, key):
            raise ShardError(
                f"{other.directory / MANIFEST_NAME}: {key}: expected {getattr(a, key)!r:.120} like the "
                f"train split, found {getattr(b, key)!r:.120}"
            )


def still_same(shard: ValidShard) -> None:
    """Refuse a shard replaced or resized since it was validated (checked before mapping it)."""
    try:
        st = os.stat(shard.path)
    except OSError as exc:
        raise ShardError(f"{shard.path}: cannot stat shard: {exc}") from None
    if st.st_size != shard.size or st.st_mtime_ns != shard.mtime_ns:
        raise ShardError(
            f"{shard.path}: shard changed after it was validated (size {shard.size} -> {st.st_size})"
        )
