"""The reference article's two Datasets, reproduced as baselines for the benchmark.

``NaiveDataset`` is its v1 (a DataFrame, converted per item in ``__getitem__``);
``PrecomputedDataset`` is its v2 (all tensors built once in ``__init__``).
They are deliberately written the way the article wrote them, not the way
this project would: they exist only to be measured against.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import Dataset


class NaiveDataset(Dataset):
    """v1: ``df.iloc[idx]`` + NumPy/torch conversions for every sample."""

    def __init__(self, parquet: Path | str, limit: int | None = None) -> None:
        self.df = pd.read_parquet(parquet)
        if limit is not None:
            self.df = self.df.iloc[:limit]

    def __len__(self) -> int:
        return len(self.df)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        row = self.df.iloc[idx]
        label = int(row["label"])
        pixels = row.drop("label").to_numpy(dtype="float32")
        image = torch.tensor(pixels.reshape(1, 28, 28)) / 255
        return {"image": image, "label": torch.tensor(label, dtype=torch.long)}


class PrecomputedDataset(Dataset):
    """v2: one float tensor for all images, built once; ``__getitem__`` only indexes."""

    def __init__(self, parquet: Path | str, limit: int | None = None) -> None:
        df = pd.read_parquet(parquet)
        if limit is not None:
            df = df.iloc[:limit]
        self.labels = torch.tensor(df["label"].to_numpy(), dtype=torch.long)
        pixels = df.drop(columns="label").to_numpy(dtype="float32")
        self.images = torch.tensor(pixels).reshape(-1, 1, 28, 28) / 255

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[idx], "label": self.labels[idx]}


class PerSampleShards(Dataset):
    """Our memory-mapped shards, but read one ``__getitem__`` per sample (then default collate)."""

    def __init__(self, batched: Dataset) -> None:
        self.batched = batched

    def __len__(self) -> int:
        return len(self.batched)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        images, labels = self.batched[torch.tensor([idx])]
        return {"image": images[0], "label": labels[0]}
