"""The safetensors shard format, written and read in one place.

A shard is ``u64-le header length N`` + ``N bytes of JSON`` + the data buffer,
holding two tensors: ``images`` [n, C, H, W] (float32 normalised values, or uint8
source bytes that the trainer normalises through the same lookup table) and
``labels`` int64 [n],
with ``__metadata__`` naming the dataset and split.

- :func:`write_shard` writes one with a canonical header (sorted keys), so the
  same samples always give the same bytes (and SHA-256, and DVC hash), streaming
  the images chunk by chunk.
- :func:`parse_header` trusts nothing in the header: a crafted shard is refused
  with a :class:`ShardError` before any byte of its data is interpreted;
  :func:`check_tensors` then checks it holds exactly the two tensors the
  manifest promises, and :func:`view_tensors` views them in a memory map
  without copying.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pipeline.atomic import write_behind
from pipeline.errors import ShardError

# safetensors itself refuses headers over 100 MB; ours are a few hundred bytes.
MAX_HEADER_BYTES = 1 << 20

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
DTYPE_NAMES = {
    "F32": "float32",
    "I64": "int64",
    "U8": "uint8",
    "F64": "float64",
    "F16": "float16",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "BOOL": "bool",
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a shard, in absolute file offsets."""

    name: str
    dtype: str  # safetensors code, e.g. "F32"
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numpy_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class ShardLayout:
    """A validated shard header."""

    header_len: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]

    @property
    def data_start(self) -> int:
        return 8 + self.header_len


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ShardError(f"duplicate key {key!r} in header")
        out[key] = value
    return out


def header_length(prefix: bytes, file_size: int, where: str) -> int:
    """Read and bound the header length from the first 8 bytes."""
    if file_size < 8 or len(prefix) < 8:
        raise ShardError(f"{where}: file is {file_size} bytes; a safetensors file needs at least 8")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > file_size - 8:
        raise ShardError(f"{where}: header length {n} runs past the end of the {file_size}-byte file")
    if n > MAX_HEADER_BYTES:
        raise ShardError(f"{where}: header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes")
    if n < 2:
        raise ShardError(f"{where}: header length {n} is too small for a JSON object")
    return n


def parse_header(prefix: bytes, file_size: int, where: str = "<shard>") -> ShardLayout:
    """Validate a shard header given the file's first ``8 + N`` bytes and its total size.

    Checks: length inside the file; UTF-8 JSON object without duplicate keys;
    known dtypes; non-negative integer dims; byte size = prod(shape) x itemsize;
    offsets contiguous from 0, covering the data buffer exactly; each tensor
    aligned to its item size in the file (so it can be viewed without copying).
    """
    n = header_length(prefix, file_size, where)
    if len(prefix) < 8 + n:
        raise ShardError(f"{where}: header truncated: expected {n} bytes, found {len(prefix) - 8}")
    raw = prefix[8 : 8 + n]
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except ShardError as exc:
        raise ShardError(f"{where}: {exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ShardError(f"{where}: header is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ShardError(f"{where}: header must be a JSON object, found {type(doc).__name__}")
    metadata = doc.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ShardError(f"{where}: __metadata__ must map strings to strings")
    data_start = 8 + n
    buffer_len = file_size - data_start
    entries = []
    for name, info in doc.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise ShardError(
                f"{where}: tensor {name!r}: expected keys dtype, shape, data_offsets, found {info!r:.200}"
            )
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ShardError(f"{where}: tensor {name!r}: unsupported dtype {dtype!r:.50}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape) or len(shape) > 8:
            raise ShardError(
                f"{where}: tensor {name!r}: shape must be a list of at most 8 non-negative integers, "
                f"found {shape!r:.200}"
            )
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise ShardError(
                f"{where}: tensor {name!r}: data_offsets must be [begin, end] with 0 <= begin <= end, "
                f"found {offsets!r:.200}"
            )
        itemsize = DTYPES[dtype].itemsize
        expected = math.prod(shape) * itemsize
        if offsets[1] - offsets[0] != expected:
            raise ShardError(
                f"{where}: tensor {name!r}: {dtype} {shape} needs {expected} bytes, "
                f"offsets span {offsets[1] - offsets[0]}"
            )
        if (data_start + offsets[0]) % itemsize:
            raise ShardError(
                f"{where}: tensor {name!r}: file offset {data_start + offsets[0]} "
                f"is not aligned to {itemsize} bytes"
            )
        entries.append(
            TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])
        )
    entries.sort(key=lambda t: (t.start, t.end))
    cursor = data_start
    for t in entries:
        if t.start != cursor:
            kind = "overlaps the previous tensor" if t.start < cursor else "leaves a gap before it"
            raise ShardError(
                f"{where}: tensor {t.name!r}: data starts at byte {t.start - data_start}, "
                f"which {kind} (expected {cursor - data_start})"
            )
        cursor = t.end
    if cursor - data_start != buffer_len:
        raise ShardError(
            f"{where}: tensors cover {cursor - data_start} bytes but the data buffer is {buffer_len} bytes"
        )
    return ShardLayout(n, {t.name: t for t in entries}, dict(metadata))


def read_layout(path: Path | str) -> ShardLayout:
    """Read and validate the header of the shard at ``path``."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            prefix = f.read(8)
            n = header_length(prefix, size, str(path))
            prefix += f.read(n)
    except OSError as exc:
        raise ShardError(f"{path}: cannot read shard: {exc}") from None
    return parse_header(prefix, size, str(path))


IMAGES = "images"
LABELS = "labels"


# The image dtypes a shard may hold: prep.shard_dtype -> (safetensors code, numpy dtype).
IMAGE_DTYPES: dict[str, tuple[str, np.dtype]] = {
    "float32": ("F32", np.dtype("<f4")),
    "uint8": ("U8", np.dtype("u1")),
}


def shard_header(
    num_samples: int, image_shape: tuple[int, ...], metadata: dict[str, str], dtype: str = "float32"
) -> bytes:
    """The first bytes of a shard: the length, then the JSON header with sorted keys, padded to 8 bytes.

    Byte for byte what ``safetensors.numpy.save`` writes for these two tensors (labels first: it
    orders the buffer by alignment, then name), except that its ``__metadata__`` comes in hash-map
    order; sorted keys make the same samples give the same bytes, SHA-256 and DVC hash every time.
    ``dtype`` is the images' (``float32`` normalised values, or ``uint8`` source bytes).
    """
    code, np_dtype = IMAGE_DTYPES[dtype]
    labels_bytes = num_samples * 8
    images_bytes = num_samples * math.prod(image_shape) * np_dtype.itemsize
    doc = {
        "__metadata__": metadata,
        LABELS: {"dtype": "I64", "shape": [num_samples], "data_offsets": [0, labels_bytes]},
        IMAGES: {
            "dtype": code,
            "shape": [num_samples, *image_shape],
            "data_offsets": [labels_bytes, labels_bytes + images_bytes],
        },
    }
    text = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    padded = -(-len(text) // 8) * 8
    return struct.pack("<Q", padded) + text.ljust(padded)


def write_shard(
    out: BinaryIO,
    image_chunks: Iterable[np.ndarray],
    labels: np.ndarray,
    image_shape: tuple[int, ...],
    metadata: dict[str, str],
    dtype: str = "float32",
) -> tuple[int, str]:
    """Write one shard, its images (of ``dtype``) given in chunks of rows; return (bytes, SHA-256).

    Streaming the images keeps one chunk in memory, not the shard's.
    """
    np_dtype = IMAGE_DTYPES[dtype][1]
    header = shard_header(len(labels), image_shape, metadata, dtype)
    digest = hashlib.sha256(header)
    out.write(header)
    size = len(header)
    out.write(data := memoryview(np.ascontiguousarray(labels, dtype="<i8")).cast("B"))
    digest.update(data)
    size += len(data)
    for part in image_chunks:  # lazily
        if part.dtype != np_dtype or part.shape[1:] != tuple(image_shape):
            raise ValueError(f"image chunk {part.dtype} {list(part.shape)} is not {dtype} [k, {image_shape}]")
        data = memoryview(np.ascontiguousarray(part)).cast("B")
        out.write(data)
        write_behind(out, size, len(data))  # the disk writes this chunk while the next is made
        digest.update(data)
        size += len(data)
        del part, data  # may view the reader's row group: not held while it decodes the next
    expected = len(header) + len(labels) * (8 + math.prod(image_shape) * np_dtype.itemsize)
    if size != expected:
        raise ValueError(f"shard of {len(labels)} samples: wrote {size} bytes, expected {expected}")
    return size, digest.hexdigest()


def _check_tensor(
    where: str, info: TensorInfo | None, name: str, dtype: str, shape: tuple[int, ...]
) -> TensorInfo:
    if info is None:
        raise ShardError(f"{where}: tensor {name!r} is missing")
    if info.dtype != dtype or info.shape != shape:
        raise ShardError(
            f"{where}: tensor {name!r}: expected {DTYPE_NAMES[dtype]} {list(shape)} as the manifest says, "
            f"found {DTYPE_NAMES.get(info.dtype, info.dtype)} {list(info.shape)}"
        )
    return info


def check_tensors(
    where: str,
    layout: ShardLayout,
    num_samples: int,
    image_shape: tuple[int, ...],
    image_dtype: str = "float32",
) -> tuple[TensorInfo, TensorInfo]:
    """Check the shard holds exactly ``images`` and ``labels``; their entries.

    ``images`` is [n, *image_shape] of the manifest's ``image_dtype``, ``labels`` int64 [n].
    """
    extra = sorted(set(layout.tensors) - {IMAGES, LABELS})
    if extra:
        raise ShardError(
            f"{where}: unexpected tensor {extra[0]!r}; a shard holds only {IMAGES!r} and {LABELS!r}"
        )
    images = _check_tensor(
        where, layout.tensors.get(IMAGES), IMAGES, IMAGE_DTYPES[image_dtype][0], (num_samples, *image_shape)
    )
    labels = _check_tensor(where, layout.tensors.get(LABELS), LABELS, "I64", (num_samples,))
    return images, labels


def view_tensors(
    raw: np.ndarray,
    images_offset: int,
    labels_offset: int,
    num_samples: int,
    image_shape: tuple[int, ...],
    image_dtype: str = "float32",
) -> tuple[np.ndarray, np.ndarray]:
    """Zero-copy views of a mapped shard's bytes at offsets :func:`check_tensors` validated."""
    dtype = IMAGE_DTYPES[image_dtype][1]
    items = math.prod(image_shape)
    images = raw[images_offset : images_offset + num_samples * items * dtype.itemsize].view(dtype)
    labels = raw[labels_offset : labels_offset + num_samples * 8].view("<i8")
    return images.reshape(num_samples, *image_shape), labels
