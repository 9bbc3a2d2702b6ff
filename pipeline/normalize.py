"""Pixel normalisation as a 256-entry float32 lookup table (pure functions).

Every uint8 pixel value of channel c maps to exactly one float32, computed once
with one fixed formula, ``(float32(x) / 255 - mean[c]) / std[c]`` in float32 arithmetic.
Shards are then a gather through the table, which is both fast and
bit-for-bit reproducible: tests recompute any element from its source byte.
"""

from __future__ import annotations

import numpy as np

from pipeline.manifest import Normalization, PixelStats

HISTOGRAM_PIXELS = 1 << 20  # pixels counted at once, in two reused buffers (1 MiB and 4 MiB)
_PAIRS = 1 << 16  # a pair of uint8 pixels read as one uint16


def pixel_histogram(pixels: np.ndarray, channels: int) -> np.ndarray:
    """Count of each value 0..255 per channel in uint8 rows [n, C*H*W] (int64 [C, 256], exact).

    ``np.bincount`` converts its input to int64 first. Widening a whole shard would briefly
    take eight times its bytes, and widening into fresh arrays spends most of the time
    faulting their pages in, so a block of one channel's pixels at a time is copied into small
    buffers that are reused. The block is counted in pairs: read as uint16, each pair of
    pixels is one of 65,536 values, half as many to widen and count, and the 256 x 256 table of
    pair counts gives each value's count as the first and as the second of a pair.
    """
    planes = pixels.reshape(len(pixels), channels, pixels.shape[1] // channels)  # explicit: 0 rows too
    plane = planes.shape[2]
    histogram = np.zeros((channels, 256), dtype=np.int64)
    if not planes.size:
        return histogram
    step = max(1, HISTOGRAM_PIXELS // plane)
    same = np.empty(min(step, len(planes)) * plane, dtype=np.uint8)  # one channel's pixels, contiguous
    wide = np.empty(len(same) // 2, dtype=np.intp)
    for c in range(channels):
        pairs = np.zeros(_PAIRS, dtype=np.int64)
        for first in range(0, len(planes), step):
            block = planes[first : first + step, c]
            flat = same[: block.size]
            np.copyto(flat.reshape(block.shape), block)
            half = len(flat) // 2
            np.copyto(wide[:half], flat[: 2 * half].view(np.uint16))
            pairs += np.bincount(wide[:half], minlength=_PAIRS)
            if len(flat) % 2:
                histogram[c, flat[-1]] += 1
        table = pairs.reshape(256, 256)
        histogram[c] += table.sum(axis=0) + table.sum(axis=1)
    return histogram


def _stats(histogram: np.ndarray) -> tuple[float, float]:
    """Mean and std of ``x / 255`` from one channel's exact histogram, as float32 values."""
    counts = histogram.astype(np.float64)
    total = counts.sum()
    if total == 0:
        raise ValueError("no pixels to compute statistics from")
    values = np.arange(256, dtype=np.float64) / 255.0
    mean = float((counts * values).sum() / total)
    var = float((counts * (values - mean) ** 2).sum() / total)
    std = var**0.5 if var > 0 else 1.0  # a constant image set would otherwise divide by zero
    return float(np.float32(mean)), float(np.float32(std))


def pixel_stats(histogram: np.ndarray) -> PixelStats:
    """Per-channel mean and std of ``x / 255`` from a [C, 256] histogram."""
    pairs = [_stats(h) for h in histogram]
    return PixelStats(tuple(m for m, _ in pairs), tuple(s for _, s in pairs))


def make_normalization(kind: str, stats: PixelStats | None, channels: int = 1) -> Normalization:
    """``unit``: x / 255 in every channel; ``standard``: per channel, with the train split's ``stats``."""
    if kind == "unit":
        channels = len(stats.mean) if stats is not None else channels
        return Normalization("unit", (0.0,) * channels, (1.0,) * channels, "none")
    if kind == "standard":
        if stats is None:
            raise ValueError("standard normalisation needs the train split's statistics")
        return Normalization("standard", stats.mean, stats.std, "train")
    raise ValueError(f"unknown normalisation {kind!r}")


def lookup_table(norm: Normalization) -> np.ndarray:
    """float32[C, 256]: the normalised value of each possible pixel byte, per channel."""
    x = np.arange(256, dtype=np.float32) / np.float32(255)
    if norm.kind == "unit":
        return np.stack([x] * len(norm.mean))
    return np.stack([(x - np.float32(m)) / np.float32(s) for m, s in zip(norm.mean, norm.std)])


def normalize(
    pixels: np.ndarray, norm: Normalization, shape: tuple[int, int, int], out: np.ndarray | None = None
) -> np.ndarray:
    """uint8 rows [n, C*H*W] -> float32 [n, C, H, W] through the per-channel lookup table.

    ``out``: a float32 buffer of at least n*C*H*W elements to write into (the result is a view of
    it), so a caller normalising chunk after chunk reuses one buffer instead of a fresh array each
    time, whose pages the kernel must fault in and zero first.
    """
    table = lookup_table(norm)
    c, h, w = shape
    size = len(pixels) * c * h * w
    if out is not None and not (out.dtype == np.float32 and out.flags.c_contiguous and out.size >= size):
        raise ValueError(
            f"out: expected contiguous float32 of at least {size} elements, found {out.dtype} {out.shape}"
        )
    result = np.empty(size, dtype=np.float32) if out is None else out.reshape(-1)[:size]
    planes, into = pixels.reshape(len(pixels), c, h * w), result.reshape(len(pixels), c, h * w)
    for channel in range(c):
        # "clip" never clips here (a byte indexes a 256-entry table) but, unlike "raise", lets
        # take write straight into ``into`` instead of into a copy of it.
        np.take(table[channel], planes[:, channel], out=into[:, channel], mode="clip")
    return result.reshape(len(pixels), c, h, w)
