"""Parquet -> normalised float32 safetensors shards plus ``manifest.json``.

Each split folder is built in a temporary folder beside it and renamed into
place, so a killed run never leaves a folder whose manifest and shards disagree.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import polars as pl
import safetensors.numpy

from pipeline.atomic import atomic_dir
from pipeline.errors import DataError
from pipeline.manifest import (
    IMAGE_SHAPE,
    MANIFEST_NAME,
    NUM_CLASSES,
    SCHEMA_VERSION,
    Manifest,
    Normalization,
    ShardEntry,
)
from pipeline.normalize import make_normalization, normalize, pixel_histogram
from pipeline.tabular import PIXEL_COLUMNS

SHARD_PATTERN = "shard-{:05d}.safetensors"


def check_parquet_schema(path: Path) -> int:
    """Check the Parquet file has label + 784 pixels, all UInt8; return its row count."""
    try:
        schema = pl.read_parquet_schema(path)
        rows = pl.scan_parquet(path).select(pl.len()).collect().item()
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise DataError(f"{path}: cannot read Parquet: {exc}") from None
    expected = ["label", *PIXEL_COLUMNS]
    names = list(schema)
    if names != expected:
        first = next((i for i, (a, b) in enumerate(zip(names, expected)) if a != b), min(len(names), len(expected)))
        found = names[first] if first < len(names) else "<end of columns>"
        want = expected[first] if first < len(expected) else "<end of columns>"
        raise DataError(f"{path}: column {first + 1}: expected {want!r}, found {found!r}")
    for name, dtype in schema.items():
        if dtype != pl.UInt8:
            raise DataError(f"{path}: column {name!r}: expected UInt8, found {dtype}")
    return rows


def iter_parquet(path: Path, chunk_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (pixels uint8 [k, 784], labels uint8 [k]) in file order, ``chunk_rows`` at a time."""
    rows = check_parquet_schema(path)
    for start in range(0, rows, chunk_rows):
        df = pl.scan_parquet(path).slice(start, chunk_rows).collect()
        for name, nulls in zip(df.columns, df.null_count().row(0)):
            if nulls:  # to_numpy would turn them into NaN and then silently into 0
                row = start + int(df.get_column(name).is_null().arg_max())
                raise DataError(f"{path}: row {row + 1}, column {name!r}: expected a UInt8 value, found null")
        labels = df.get_column("label").to_numpy()
        pixels = df.select(PIXEL_COLUMNS).to_numpy()
        del df  # not held while the consumer builds a shard from this chunk
        if labels.max(initial=0) >= NUM_CLASSES:
            row = start + int(np.argmax(labels >= NUM_CLASSES))
            raise DataError(f"{path}: row {row + 1}, column 'label': expected 0..{NUM_CLASSES - 1}, found {labels[row - start]}")
        yield np.ascontiguousarray(pixels, dtype=np.uint8), labels.astype(np.uint8, copy=False)


def _rechunk(chunks: Iterable[tuple[np.ndarray, np.ndarray]], size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Regroup (pixels, labels) chunks into groups of exactly ``size`` rows (the last may be short)."""
    buf_p: list[np.ndarray] = []
    buf_l: list[np.ndarray] = []
    held = 0
    for pixels, labels in chunks:
        if not held and len(labels) == size:  # already a whole shard: no copy
            yield pixels, labels
            continue
        buf_p.append(pixels)
        buf_l.append(labels)
        held += len(labels)
        while held >= size:
            p, lab = np.concatenate(buf_p), np.concatenate(buf_l)
            yield p[:size], lab[:size]
            buf_p, buf_l, held = [p[size:]], [lab[size:]], held - size
    if held:
        yield np.concatenate(buf_p), np.concatenate(buf_l)


def _canonical_header(blob: bytes) -> bytes:
    """The first ``8 + n`` bytes of a safetensors blob, its header re-emitted with sorted keys (same length).

    safetensors writes ``__metadata__`` in hash-map order, so the same samples gave
    different shard bytes (and SHA-256s, and DVC hashes) from one run to the next.
    Only the header is returned, so the data after it is never copied.
    """
    n = int.from_bytes(blob[:8], "little")
    text = json.dumps(json.loads(blob[8 : 8 + n]), separators=(",", ":"), sort_keys=True).encode()
    if len(text) > n:  # only if escaping grew it (non-ASCII metadata): keep safetensors' bytes
        return blob[: 8 + n]
    return blob[:8] + text.ljust(n)


def write_split(
    chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    out_dir: Path | str,
    *,
    dataset: str,
    split: str,
    shard_size: int,
    normalization: Normalization,
) -> Manifest:
    """Write shards of ``shard_size`` samples and the manifest into ``out_dir`` atomically."""
    entries = []
    with atomic_dir(out_dir) as tmp:
        for index, (pixels, labels) in enumerate(_rechunk(chunks, shard_size)):
            tensors = {
                "images": normalize(pixels, normalization),
                "labels": labels.astype(np.int64),
            }
            del pixels
            blob = safetensors.numpy.save(tensors, metadata={"dataset": dataset, "split": split})
            del tensors  # the float32 images are in the blob now; one copy of a shard at a time
            header = _canonical_header(blob)
            data = memoryview(blob)[len(header) :]
            name = SHARD_PATTERN.format(index)
            with open(tmp / name, "wb") as f:
                f.write(header)
                f.write(data)
            digest = hashlib.sha256(header)
            digest.update(data)
            entries.append(ShardEntry(name, len(labels), len(blob), digest.hexdigest()))
            del data, blob  # before the next shard is built, not after
        if not entries:
            raise DataError(f"{split}: no samples to write")
        manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            dataset=dataset,
            split=split,
            num_samples=sum(e.num_samples for e in entries),
            num_classes=NUM_CLASSES,
            image_shape=IMAGE_SHAPE,
            image_dtype="float32",
            label_dtype="int64",
            normalization=normalization,
            shards=tuple(entries),
        )
        (tmp / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
    return manifest


def tensorize(
    train_parquet: Path,
    test_parquet: Path,
    train_out: Path,
    test_out: Path,
    *,
    dataset: str,
    shard_size: int,
    normalize_kind: str,
) -> tuple[Manifest, Manifest]:
    """Shard both splits; ``standard`` statistics come from the train split only."""
    histogram = None
    if normalize_kind == "standard":
        histogram = np.zeros(256, dtype=np.int64)
        for pixels, _ in iter_parquet(train_parquet, shard_size):
            histogram += pixel_histogram(pixels)
    norm = make_normalization(normalize_kind, histogram)
    manifests = []
    for split, src, out in (("train", train_parquet, train_out), ("test", test_parquet, test_out)):
        manifests.append(
            write_split(
                iter_parquet(src, shard_size),
                out,
                dataset=dataset,
                split=split,
                shard_size=shard_size,
                normalization=norm,
            )
        )
    return manifests[0], manifests[1]
