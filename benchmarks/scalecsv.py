"""K x FashionMNIST as a user CSV, written fast with NumPy (no per-cell Python).

Copy ``k`` of every image is flipped left-right when ``k`` is odd and rolled
``k // 2`` pixels to the right, so no two copies are byte-identical; labels are
kept. Used by ``benchmarks.scale`` and by the tests' large bad-input CSVs.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.idx import decode_idx
from pipeline.tabular import HEADER_LINE, NUM_PIXELS

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
_CHUNK_ROWS = 8192

# "0," .. "255," as fixed 4-byte cells padded with NUL, which the writer drops.
_CELLS = np.zeros((256, 4), dtype=np.uint8)
for _v in range(256):
    _b = f"{_v},".encode()
    _CELLS[_v, : len(_b)] = np.frombuffer(_b, dtype=np.uint8)


def load_idx_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, 28, 28], labels uint8 [n]) of ``train`` or ``test`` from IDX .gz files."""
    prefix = "train" if split == "train" else "t10k"
    images = decode_idx(gzip.decompress((folder / f"{prefix}-images-idx3-ubyte.gz").read_bytes()))
    labels = decode_idx(gzip.decompress((folder / f"{prefix}-labels-idx1-ubyte.gz").read_bytes()))
    return images, labels


def transformed_copy(images: np.ndarray, k: int) -> np.ndarray:
    """Copy ``k`` of ``images`` [n, 28, 28]: flipped when k is odd, rolled k // 2 pixels right."""
    out = images[:, :, ::-1] if k % 2 else images
    return np.roll(out, k // 2, axis=2) if k // 2 else np.ascontiguousarray(out)


def csv_lines(table: np.ndarray) -> bytes:
    """CSV text (LF line ends) of a uint8 table [n, columns]."""
    cells = _CELLS[table]  # [n, c, 4]
    flat = cells.reshape(len(table), -1)
    # the comma after the last cell of a row becomes the line end
    last = flat[:, -4:]
    last[last == ord(",")] = ord("\n")
    flat = flat.reshape(-1)
    return flat[flat != 0].tobytes()


def scaled_rows(images: np.ndarray, labels: np.ndarray, scale: int) -> Iterator[np.ndarray]:
    """uint8 tables [rows, 785] (label first) of ``scale`` transformed copies, in chunks."""
    flat_labels = labels.reshape(-1, 1)
    for k in range(scale):
        copy = transformed_copy(images, k).reshape(len(images), NUM_PIXELS)
        for start in range(0, len(images), _CHUNK_ROWS):
            stop = start + _CHUNK_ROWS
            yield np.concatenate([flat_labels[start:stop], copy[start:stop]], axis=1)


def write_scaled_csv(path: Path, images: np.ndarray, labels: np.ndarray, scale: int) -> int:
    """Write the K x CSV with the canonical header; returns the number of data rows."""
    rows = 0
    with open(path, "wb") as f:
        f.write(HEADER_LINE)
        for table in scaled_rows(images, labels, scale):
            f.write(csv_lines(table))
            rows += len(table)
    return rows
