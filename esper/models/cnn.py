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


class _SmallCNN(nn.Module):
    """Conv(3, same) + BatchNorm + ReLU (+ MaxPool(2) between stages), global average pool, head,
    over `dims` spatial dimensions. Convolutions are `convs.0 ...` (the natural seed sites)."""

    _LAYERS = {1: (nn.Conv1d, nn.BatchNorm1d, nn.functional.max_pool1d),
               2: (nn.Conv2d, nn.BatchNorm2d, nn.functional.max_pool2d)}

    def __init__(self, dims: int, in_channels: int, num_classes: int, channels: Sequence[int], width: float) -> None:
        super().__init__()
        conv_type, norm_type, self._pool = self._LAYERS[dims]
        self._spatial = tuple(range(-dims, 0))
        widths = _scaled(channels, width)
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        prev = in_channels
        for c in widths:
            self.convs.append(conv_type(prev, c, kernel_size=3, padding=1))
            self.norms.append(norm_type(c))
            prev = c
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.convs) - 1
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            x = torch.relu(norm(conv(x)))
            if i < last and min(x.shape[d] for d in self._spatial) >= 2:
                x = self._pool(x, 2)
        return self.head(x.mean(dim=self._spatial))

    def seed_site_names(self) -> list[str]:
        """Names of the layers a trainer would normally wrap with seeds."""
        return [f"convs.{i}" for i in range(len(self.convs))]

    def width_pairs(self) -> list:
        """Where width growth can add channels: conv i (+ its norm, ReLU, pool) and what reads it."""
        from esper.kasmina.growth.pair import WidthPair

        last = len(self.convs) - 1
        return [WidthPair(f"convs.{i}", f"convs.{i + 1}" if i < last else "head", norm=f"norms.{i}",
                          post="maxpool2" if i < last else "mean") for i in range(last + 1)]


class SmallCNN1d(_SmallCNN):
    """The 1D host: input [N, in_channels, length] (or [N, length] for one channel)."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: Sequence[int] = (32, 64, 64),
        width: float = 1.0,
    ) -> None:
        super().__init__(1, in_channels, num_classes, channels, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        return super().forward(x)


class SmallCNN2d(_SmallCNN):
    """The 2D host: input [N, in_channels, H, W]."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        channels: Sequence[int] = (32, 64, 128),
        width: float = 1.0,
    ) -> None:
        super().__init__(2, in_channels, num_classes, channels, width)
