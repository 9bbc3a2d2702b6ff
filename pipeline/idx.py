"""The IDX file format (LeCun's MNIST format): pure encode/decode, no file I/O.

Layout: two zero bytes, a dtype code, the number of dimensions ``d``, then
``d`` big-endian uint32 sizes, then the values in C order (big-endian).
"""

from __future__ import annotations

import math
import struct

import numpy as np

from pipeline.errors import DataError

DTYPE_CODES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODE_OF = {dt.newbyteorder(">") if dt.itemsize > 1 else dt: code for code, dt in DTYPE_CODES.items()}
MAX_DIMS = 8


def parse_idx_header(data: bytes, where: str = "<idx>") -> tuple[np.dtype, tuple[int, ...], int]:
    """Return (dtype, shape, offset of the values) after checking magic and total size."""
    if len(data) < 4:
        raise DataError(f"{where}: {len(data)} bytes is too short for an IDX header (need at least 4)")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0:
        raise DataError(f"{where}: bad IDX magic: expected first two bytes 00 00, found {data[:2].hex(' ')}")
    if code not in DTYPE_CODES:
        raise DataError(f"{where}: unknown IDX dtype code 0x{code:02x}")
    if not 1 <= ndim <= MAX_DIMS:
        raise DataError(f"{where}: IDX dimension count must be 1..{MAX_DIMS}, found {ndim}")
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise DataError(f"{where}: IDX header truncated: expected {offset} bytes, found {len(data)}")
    shape = struct.unpack(f">{ndim}I", data[4:offset])
    dtype = DTYPE_CODES[code]
    expected = offset + math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise DataError(
            f"{where}: IDX shape {list(shape)} of {dtype} needs {expected} bytes, found {len(data)}"
        )
    return dtype, tuple(shape), offset


def decode_idx(data: bytes, where: str = "<idx>") -> np.ndarray:
    """Decode IDX bytes into an array in native byte order (a zero-copy view for uint8)."""
    dtype, shape, offset = parse_idx_header(data, where)
    try:
        array = np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)
    except (
        ValueError
    ) as exc:  # e.g. [0, 2**32-1, 2**32-1]: zero bytes, but more elements than numpy can index
        raise DataError(f"{where}: IDX shape {list(shape)} cannot be represented: {exc}") from None
    if dtype.itemsize > 1:
        array = array.astype(dtype.newbyteorder("="))
    return array


def encode_idx(array: np.ndarray) -> bytes:
    """Encode an array as IDX bytes."""
    array = np.asarray(array)
    if not 1 <= array.ndim <= MAX_DIMS:
        raise ValueError(f"IDX holds 1..{MAX_DIMS} dimensions, got {array.ndim}")
    big = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    if big not in _CODE_OF:
        raise ValueError(f"IDX cannot hold dtype {array.dtype}")
    header = struct.pack(">HBB", 0, _CODE_OF[big], array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=big).tobytes()
