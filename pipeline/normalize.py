"""Pixel normalisation as a 256-entry float32 lookup table (pure functions).

Every uint8 pixel value maps to exactly one float32, computed once with one
fixed formula, ``(float32(x) / 255 - mean) / std`` in float32 arithmetic.
Shards are then a gather through the table, which is both fast and
bit-for-bit reproducible: tests recompute any element from its source byte.
"""

from __future__ import annotations

import numpy as np

from pipeline.manifest import Normalization


def pixel_histogram(pixels: np.ndarray) -> np.ndarray:
    """Count of each value 0..255 in a uint8 array (int64, exact)."""
    return np.bincount(pixels.reshape(-1), minlength=256).astype(np.int64)


def standard_stats(histogram: np.ndarray) -> tuple[float, float]:
    """Mean and std of ``x / 255`` over all pixels, from an exact histogram, as float32 values."""
    counts = histogram.astype(np.float64)
    total = counts.sum()
    if total == 0:
        raise ValueError("no pixels to compute statistics from")
    values = np.arange(256, dtype=np.float64) / 255.0
    mean = float((counts * values).sum() / total)
    var = float((counts * (values - mean) ** 2).sum() / total)
    std = var**0.5 if var > 0 else 1.0  # a constant image set would otherwise divide by zero
    return float(np.float32(mean)), float(np.float32(std))


def make_normalization(kind: str, train_histogram: np.ndarray | None) -> Normalization:
    if kind == "unit":
        return Normalization("unit", 0.0, 1.0, "none")
    if kind == "standard":
        if train_histogram is None:
            raise ValueError("standard normalisation needs the train split's histogram")
        mean, std = standard_stats(train_histogram)
        return Normalization("standard", mean, std, "train")
    raise ValueError(f"unknown normalisation {kind!r}")


def lookup_table(norm: Normalization) -> np.ndarray:
    """float32[256]: the normalised value of each possible pixel byte."""
    x = np.arange(256, dtype=np.float32) / np.float32(255)
    if norm.kind == "unit":
        return x
    return (x - np.float32(norm.mean)) / np.float32(norm.std)


def normalize(pixels: np.ndarray, norm: Normalization) -> np.ndarray:
    """uint8 [n, 784] -> float32 [n, 1, 28, 28] through the lookup table."""
    return lookup_table(norm)[pixels].reshape(len(pixels), 1, 28, 28)
