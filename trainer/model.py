"""The reference model: a two-block CNN for 28x28 grey images, 206,922 parameters."""

from __future__ import annotations

import torch
from torch import nn

ARCHITECTURE = "SimpleCNN"
NUM_PARAMETERS = 206_922


class SimpleCNN(nn.Module):
    """Conv(1→16) → ReLU → pool → Conv(16→32) → ReLU → pool → FC(1568→128) → ReLU → FC(128→10)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
