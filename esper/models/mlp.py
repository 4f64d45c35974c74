"""A plain multi-layer perceptron host."""

from __future__ import annotations

import torch
from torch import nn

from esper.models.deepen import DepthStack


class MLP(nn.Module):
    """`depth` hidden Linear+ReLU layers of `round(hidden * width)` units, then a linear head.

    Inputs of any shape [N, ...] are flattened to [N, in_features]. Hidden layers are
    `hidden.0 ... hidden.{depth-1}` (the natural seed sites), the classifier is `head`.
    """

    def __init__(
        self,
        in_features: int,
        hidden: int = 128,
        num_classes: int = 10,
        depth: int = 2,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        if in_features < 1 or hidden < 1 or num_classes < 1:
            raise ValueError(
                f"MLP needs positive sizes, got in_features={in_features}, hidden={hidden}, "
                f"num_classes={num_classes}"
            )
        if depth < 1:
            raise ValueError(f"MLP depth must be >= 1, got {depth}")
        if width <= 0:
            raise ValueError(f"MLP width multiplier must be > 0, got {width}")
        units = max(1, round(hidden * width))
        self.in_features = in_features
        self.hidden = nn.ModuleList(
            nn.Linear(in_features if i == 0 else units, units) for i in range(depth)
        )
        self.head = nn.Linear(units, num_classes)
        # Where depth growth inserts layers after hidden layer i (empty: identity, no parameters).
        self.deepen = nn.ModuleList(DepthStack(relu_after=True) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        for layer, extra in zip(self.hidden, self.deepen, strict=True):
            x = extra(torch.relu(layer(x)))
        return self.head(x)

    def seed_site_names(self) -> list[str]:
        """Names of the layers a trainer would normally wrap with seeds."""
        return [f"hidden.{i}" for i in range(len(self.hidden))]

    def width_pairs(self) -> list:
        """Where width growth can add units: each hidden layer and the layer that reads it."""
        from esper.kasmina.growth.pair import WidthPair

        n = len(self.hidden)
        return [WidthPair(f"hidden.{i}", f"hidden.{i + 1}" if i + 1 < n else "head") for i in range(n)]

    def depth_sites(self) -> list[tuple[str, str]]:
        """(seed site, depth stack) pairs: a new layer after hidden layer i goes into deepen.i."""
        return [(f"hidden.{i}", f"deepen.{i}") for i in range(len(self.hidden))]
