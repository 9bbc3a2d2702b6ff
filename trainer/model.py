"""The reference model: a two-block CNN sized from the data (206,922 parameters for 1x28x28, 10 classes).

Two blocks of 3x3 convolution (padding 1, so the size is kept), 2x2 max-pooling
(which floors: an odd row or column at the edge is dropped, as ``nn.MaxPool2d``
does) and ReLU, then a classifier whose first layer takes ``32 * (H // 4) * (W // 4)``
features. Images smaller than 4x4 leave nothing after two poolings and are refused
(:func:`check_input_size`). For 1x28x28 and 10 classes every parameter name and
shape is that of the original Conv → ReLU → pool network, so ``model.safetensors``
files load either way. ``forward`` differs from that network in two ways that
compute the same function:

- each block max-pools *before* its ReLU, and the layers are declared in that
  order, so ``print(model)`` shows what runs. ReLU is monotonic, so
  ``relu(max(a, b)) == max(relu(a), relu(b))`` exactly, and the gradient
  reaches the same input element (the window's maximum, or nothing when that
  maximum is <= 0); the ReLU then runs on a quarter of the elements. ReLU and
  pooling have no parameters, and the convolutions keep their indices
  (``features.0`` and ``features.3``), so the ``state_dict`` keys are unchanged;
- activations and convolution weights are ``channels_last`` (NHWC): oneDNN's
  convolutions and max-pooling run on it without reordering, where NCHW pays
  for layout conversions and a slow pooling kernel on the CPU.

``reference_layout=True`` runs the original network instead (NCHW, ReLU then
pool), the baseline the benchmarks compare against. Floating-point sums inside a
convolution may be ordered differently in the two layouts, so the two agree to
rounding (``tests/test_trainer.py``), not bit for bit; each layout on its own is
deterministic on the CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.errors import DataError

ARCHITECTURE = "SimpleCNN"
NUM_PARAMETERS = 206_922  # for 1x28x28 and 10 classes
MIN_SIDE = 4  # two 2x2 poolings


def check_input_size(image_shape: tuple[int, ...], where: str) -> None:
    """Refuse images that two 2x2 poolings would reduce to nothing."""
    c, h, w = image_shape
    if h < MIN_SIDE or w < MIN_SIDE:
        raise DataError(
            f"{where}: images of {c}x{h}x{w} are too small for SimpleCNN's two 2x2 poolings; "
            f"expected at least {MIN_SIDE}x{MIN_SIDE} (set data.image_shape to resize an image folder's "
            f"images; a CSV's rows need more pixels)"
        )


class SimpleCNN(nn.Module):
    """Conv(C→16) → pool → ReLU → Conv(16→32) → pool → ReLU → FC(32·H/4·W/4→128) → ReLU → FC(128→classes)."""

    def __init__(
        self,
        channels: int = 1,
        height: int = 28,
        width: int = 28,
        num_classes: int = 10,
        *,
        reference_layout: bool = False,
    ) -> None:
        super().__init__()
        check_input_size((channels, height, width), "SimpleCNN")
        self.input_shape = (channels, height, width)
        # Declared in the order forward runs them. Indices are the state_dict keys (features.0,
        # features.3, classifier.1, classifier.3): pool and ReLU swap places without moving a convolution.
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, kernel_size=3, padding=1),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.MaxPool2d(2),
            nn.ReLU(),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * (height // 4) * (width // 4), 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )
        self.reference_layout = reference_layout
        if not reference_layout:
            # Module.to(device) preserves these strides; load_state_dict copies values into them.
            self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv1, pool1, relu1, conv2, pool2, relu2 = self.features
        if self.reference_layout:  # the original network: NCHW, ReLU before pooling
            x = pool1(relu1(conv1(x)))
            x = pool2(relu2(conv2(x)))
            return self.classifier(x)
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.features(x)
        return self.classifier(x)  # Flatten reads NCHW order whatever the strides: same features as before


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
