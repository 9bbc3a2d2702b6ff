"""The reference model: a two-block CNN for 28x28 grey images, 206,922 parameters.

The layers, their order in ``state_dict`` and every parameter name are those of
the original network, so ``model.safetensors`` files load either way. What
``forward`` does differently (unless ``reference_layout=True``) is internal
and computes the same function:

- activations and convolution weights are ``channels_last`` (NHWC): oneDNN's
  convolutions and max-pooling run on it without reordering, where NCHW pays
  for layout conversions and a slow pooling kernel on this CPU;
- each block max-pools *before* its ReLU. ReLU is monotonic, so
  ``relu(max(a, b)) == max(relu(a), relu(b))`` exactly, and the gradient
  reaches the same input element (the window's maximum, or nothing when that
  maximum is <= 0); the ReLU then runs on a quarter of the elements.

Floating-point sums inside a convolution may be ordered differently in the two
layouts, so the two agree to rounding (``tests/test_trainer.py``), not bit for
bit; each layout on its own is deterministic on the CPU.
"""

from __future__ import annotations

import torch
from torch import nn

ARCHITECTURE = "SimpleCNN"
NUM_PARAMETERS = 206_922


class SimpleCNN(nn.Module):
    """Conv(1→16) → ReLU → pool → Conv(16→32) → ReLU → pool → FC(1568→128) → ReLU → FC(128→10)."""

    def __init__(self, num_classes: int = 10, *, reference_layout: bool = False) -> None:
        super().__init__()
        # Indices are the state_dict keys (features.0, features.3, classifier.1, classifier.3).
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )
        self.reference_layout = reference_layout
        if not reference_layout:
            # Module.to(device) preserves these strides; load_state_dict copies values into them.
            self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reference_layout:
            return self.classifier(self.features(x))
        conv1, relu1, pool1, conv2, relu2, pool2 = self.features
        x = x.contiguous(memory_format=torch.channels_last)
        x = relu1(pool1(conv1(x)))
        x = relu2(pool2(conv2(x)))
        return self.classifier(x)  # Flatten reads NCHW order whatever the strides: same features as before


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
