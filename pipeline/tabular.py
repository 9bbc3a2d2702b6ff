"""The tabular layout of a split, shared by the CSV and Parquet files.

A row is one sample: a ``label`` column, then the image's ``C*H*W`` pixel values
(0..255) in row-major ``(C, H, W)`` order. The canonical header names them
``label,pixel1..pixelN`` (Kaggle's MNIST layout); a user's CSV may name the
pixel columns as it likes. Labels are either class indices (integers >= 0) or
class names (strings); one file never mixes the two.

The image shape is not in the table: it comes from ``data.image_shape`` or,
when that is null, from the column count (one channel, square), see
:func:`resolve_shape`.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

from pipeline.errors import DataError

LABEL = "label"
MAX_LABEL = 65535  # integer labels are stored as UInt16
INT_LABELS = "int"
NAME_LABELS = "name"
SHAPE_KEY = b"image_shape"  # the image layout's Parquet key-value metadata: JSON [C, H, W]
ARROW_CODEC = {"uncompressed": "none"}  # Polars' codec names (params.yaml), where Arrow's differ
# Integer spellings Polars' CSV reader accepts (leading blanks, a sign, optional quotes).
INT_CELL = re.compile(rb'[ \t]*([+-]?[0-9]+)|"[ \t]*([+-]?[0-9]+)"')
# A number with a decimal point or an exponent ("3.0", "3e0"), as pandas writes integer labels once
# the column has become float: neither an integer label nor a class name (matched after blanks and
# quotes are stripped). As a regex pattern string, for Polars too.
NUMBER = r"[+-]?(?:(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+[eE][+-]?[0-9]+)"
NUMBER_CELL = re.compile(NUMBER.encode())


@lru_cache(maxsize=8)
def pixel_columns(num_pixels: int) -> tuple[str, ...]:
    """``pixel1..pixelN``: the canonical names of the pixel columns."""
    return tuple(f"pixel{i}" for i in range(1, num_pixels + 1))


def header(num_pixels: int) -> tuple[str, ...]:
    return (LABEL, *pixel_columns(num_pixels))


def header_line(num_pixels: int) -> bytes:
    return (",".join(header(num_pixels)) + "\n").encode("ascii")


def label_kind(first_cell: bytes) -> str:
    """:data:`INT_LABELS` when a label cell spells an integer, else :data:`NAME_LABELS`."""
    return INT_LABELS if INT_CELL.fullmatch(first_cell) else NAME_LABELS


def resolve_shape(
    image_shape: tuple[int, int, int] | None, num_pixels: int, where: str
) -> tuple[int, int, int]:
    """The ``(C, H, W)`` of rows with ``num_pixels`` values: ``image_shape``, or one square grey channel."""
    if image_shape is not None:
        c, h, w = image_shape
        if c * h * w != num_pixels:
            raise DataError(
                f"{where}: expected {c}x{h}x{w} = {c * h * w} pixel columns as data.image_shape "
                f"says, found {num_pixels}"
            )
        return (c, h, w)
    side = math.isqrt(num_pixels)
    if num_pixels < 1 or side * side != num_pixels:
        raise DataError(
            f"{where}: {num_pixels} pixel columns are not a square grey image; set data.image_shape "
            f"to [C, H, W] in params.yaml"
        )
    return (1, side, side)


# The 28x28 grey layout of the built-in datasets (MNIST, FashionMNIST).
NUM_PIXELS = 28 * 28
PIXEL_COLUMNS = pixel_columns(NUM_PIXELS)
PIXEL_COLUMNS_ZERO_BASED: tuple[str, ...] = tuple(f"pixel{i}" for i in range(NUM_PIXELS))  # Kaggle's spelling
HEADER = header(NUM_PIXELS)
HEADER_LINE = header_line(NUM_PIXELS)
