"""Small convolutional hosts for sequences (1D) and images (2D)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _scaled(channels: Sequence[int], width: float) -> list[int]:
    if width <= 0:
        raise ValueError(f"width multiplier must be > 0, got {width}")
    if not channels or any(c < 1 for c in channels):
        raise ValueError(f"channels must be a non-empty list of positive ints, got {list(channels)}")
    return [max(1, round(c * width)) for c in channels]


class SmallCNN1d(nn.Module):
    """Conv1d(k=3, same) + BatchNorm + ReLU (+ MaxPool(2) between stages), global average pool, head.

    Input [N, in_channels, length]. Convolutions are `convs.0 ...` (the natural seed sites).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: Sequence[int] = (32, 64, 64),
        width: float = 1.0,
    ) -> None:
        super().__init__()
        widths = _scaled(channels, width)
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        prev = in_channels
        for c in widths:
            self.convs.append(nn.Conv1d(prev, c, kernel_size=3, padding=1))
            self.norms.append(nn.BatchNorm1d(c))
            prev = c
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        last = len(self.convs) - 1
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            x = torch.relu(norm(conv(x)))
            if i < last and x.shape[-1] >= 2:
                x = nn.functional.max_pool1d(x, 2)
        return self.head(x.mean(dim=-1))

    def seed_site_names(self) -> list[str]:
        """Names of the layers a trainer would normally wrap with seeds."""
        return [f"convs.{i}" for i in range(len(self.convs))]


class SmallCNN2d(nn.Module):
    """Conv2d(3x3, same) + BatchNorm + ReLU (+ MaxPool(2) between stages), global average pool, head.

    Input [N, in_channels, H, W]. Convolutions are `convs.0 ...` (the natural seed sites).
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        channels: Sequence[int] = (32, 64, 128),
        width: float = 1.0,
    ) -> None:
        super().__init__()
        widths = _scaled(channels, width)
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        prev = in_channels
        for c in widths:
            self.convs.append(nn.Conv2d(prev, c, kernel_size=3, padding=1))
            self.norms.append(nn.BatchNorm2d(c))
            prev = c
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.convs) - 1
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            x = torch.relu(norm(conv(x)))
            if i < last and min(x.shape[-2:]) >= 2:
                x = nn.functional.max_pool2d(x, 2)
        return self.head(x.mean(dim=(-2, -1)))

    def seed_site_names(self) -> list[str]:
        """Names of the layers a trainer would normally wrap with seeds."""
        return [f"convs.{i}" for i in range(len(self.convs))]
