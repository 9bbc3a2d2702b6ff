"""uint8 batches normalised on the training device, through the manifest's lookup table.

uint8 shards hold the source bytes (a quarter of float32's size on disk, in
the page cache, across the loader and the bus, and on the device with
``loader.device_resident``). The float32 values the model sees are made where
it runs, once per batch: ``table[c, x]`` for a byte ``x`` of channel ``c``,
where ``table`` is ``pipeline.normalize.lookup_table`` of the manifest's
normalisation, the very table float32 shards are written through. A gather
copies table entries without arithmetic, so every value is bit-identical to
the float32 shard's, and so is the whole run.
"""

from __future__ import annotations

import torch

from pipeline.manifest import Normalization
from pipeline.normalize import lookup_table


class DeviceNormalizer:
    """Called on a batch of images on ``device``: uint8 [k, C, H, W] -> float32; float32 passes as is."""

    def __init__(self, norm: Normalization, device: torch.device) -> None:
        table = torch.from_numpy(lookup_table(norm))  # float32 [C, 256]
        channels = table.shape[0]
        self.table = table.reshape(-1).to(device)  # flat: channel c's entries start at c * 256
        # Added to each byte so one flat gather serves every channel.
        self.offsets = (torch.arange(channels, dtype=torch.int32) * 256).view(1, channels, 1, 1).to(device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            return images
        if images.ndim != 4 or images.shape[1] != self.offsets.shape[1]:
            raise ValueError(
                f"expected a uint8 batch [k, {self.offsets.shape[1]}, H, W], found {list(images.shape)}"
            )
        flat = (images.to(torch.int32) + self.offsets).reshape(-1)
        return self.table.index_select(0, flat).view(images.shape)


def identity(images: torch.Tensor) -> torch.Tensor:
    """What the loop applies when no normaliser is given: batches already float32."""
    return images
