"""On-device batch augmentation (``train.augment``): horizontal flips and small translations.

Precomputed shards hold one fixed image per sample; these transforms make a
new variant of every sample each time it is seen, on the training device,
after the batch has arrived there (and after its normalisation: both
transforms only move pixels, so they commute with a per-channel affine map).

- ``flip``: each sample is mirrored left-right with probability 1/2.
- ``translate`` (as airbench does it): each sample is padded by
  :data:`PAD` = 2 pixels on every side with *reflection* (the border pixel
  is the mirror axis, ``torch.nn.functional.pad(mode="reflect")``), then
  cropped back to H x W at a random offset: a shift of -2..2 pixels on each
  axis, every one of the 25 shifts equally likely.

When both are set they run in the fixed order flip, then translate, whatever
order the params list them in.

Randomness is never drawn from the global RNG and never on the device. One CPU
``torch.Generator``, seeded from ``(train.seed, epoch, global batch index
within the epoch)`` (:func:`batch_seed`), draws the parameters of the *whole
global batch* (:func:`draw`): flip bits, then shifts, always both, so the
shifts do not depend on whether flips are on. Each rank applies the rows of
its own contiguous slice of the global batch (``trainer.rank_split``). Hence:

- loader settings (workers, pinning, ``device_resident``) cannot change the
  result: the loader never sees the randomness;
- every process count sees the same augmented global batch;
- a resume in the middle of an epoch continues at a global batch index and
  draws exactly what the uninterrupted run drew there.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from trainer.rank_split import rank_range

PAD = 2  # translate: reflection padding on every side, so shifts are -PAD..PAD on each axis
ORDER = ("flip", "translate")  # the order transforms are applied in, whatever order the params give


def batch_seed(seed: int, epoch: int, step: int) -> int:
    """A 63-bit seed for global batch ``step`` of ``epoch``.

    Independent across (seed, epoch, step) triples and of the shuffle's seeds.
    """
    digest = hashlib.sha256(f"augment/{seed}/{epoch}/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class BatchDraw:
    """The random parameters of one global batch of ``n`` samples (CPU tensors)."""

    flips: torch.Tensor  # bool [n]: mirror this sample left-right
    shifts: torch.Tensor  # int64 [n, 2]: (dy, dx), each in -PAD..PAD

    def rows(self, start: int, stop: int) -> BatchDraw:
        """The parameters of samples ``start:stop`` of the global batch (one rank's slice)."""
        return BatchDraw(self.flips[start:stop], self.shifts[start:stop])


def draw(n: int, seed: int, epoch: int, step: int) -> BatchDraw:
    """Flip bits, then shifts, for all ``n`` samples of global batch ``step``, from one seeded generator."""
    generator = torch.Generator().manual_seed(batch_seed(seed, epoch, step))
    flips = torch.randint(0, 2, (n,), generator=generator) == 1
    shifts = torch.randint(-PAD, PAD + 1, (n, 2), generator=generator)
    return BatchDraw(flips, shifts)


def flip(images: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """``images`` [n, C, H, W] with sample i mirrored left-right where ``flips[i]``."""
    mask = flips.to(images.device).view(-1, 1, 1, 1)
    return torch.where(mask, images.flip(-1), images)


def translate(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """``images`` [n, C, H, W], each sample shifted by its (dy, dx) with reflected borders.

    Output pixel (y, x) of sample i is pixel (y + dy, x + dx) of the sample
    reflect-padded by :data:`PAD`, i.e. the crop of the padded image starting
    at (PAD + dy, PAD + dx).
    """
    n, c, h, w = images.shape
    padded = F.pad(images, (PAD, PAD, PAD, PAD), mode="reflect")
    shifts = shifts.to(images.device)
    rows = torch.arange(h, device=images.device) + PAD + shifts[:, :1]  # [n, H]
    cols = torch.arange(w, device=images.device) + PAD + shifts[:, 1:]  # [n, W]
    samples = torch.arange(n, device=images.device).view(n, 1, 1, 1)
    channels = torch.arange(c, device=images.device).view(1, c, 1, 1)
    return padded[samples, channels, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]


def apply(images: torch.Tensor, names: Sequence[str], params: BatchDraw) -> torch.Tensor:
    """The transforms in ``names`` applied to ``images`` in :data:`ORDER`, rows of ``params`` to rows."""
    if "flip" in names:
        images = flip(images, params.flips)
    if "translate" in names:
        images = translate(images, params.shifts)
    return images


@dataclass(frozen=True)
class Augmenter:
    """One rank's augmentation for one epoch: call it with the rank's slice and the global batch index."""

    names: tuple[str, ...]
    seed: int
    epoch: int
    rank: int = 0
    world: int = 1

    def __call__(self, images: torch.Tensor, step: int, global_size: int) -> torch.Tensor:
        """Augment this rank's ``images``, its slice of global batch ``step`` of ``global_size`` samples."""
        start, stop = rank_range(global_size, self.rank, self.world)
        if images.shape[0] != stop - start:
            raise RuntimeError(
                f"global batch {step}: rank {self.rank} expected {stop - start} samples, "
                f"found {images.shape[0]}"
            )
        return apply(images, self.names, draw(global_size, self.seed, self.epoch, step).rows(start, stop))


def augmenter(
    names: Sequence[str], *, seed: int, epoch: int, rank: int = 0, world: int = 1
) -> Augmenter | None:
    """The epoch's :class:`Augmenter`; None when ``names`` is empty (the loop then augments nothing)."""
    if not names:
        return None
    return Augmenter(tuple(names), seed, epoch, rank, world)
