"""`DepthStack`: the place in a host where depth growth puts new blocks.

An empty stack is the identity and holds no parameters, so hosts carry one after every block that
may be deepened without changing their parameters, state-dict keys or outputs. Blocks merged by
depth growth are appended to it (each followed by the host's activation, if any), so the names of
the host's own layers never shift.
"""

from __future__ import annotations

import torch
from torch import nn


class DepthStack(nn.Module):
    """Applies `blocks` in order, each followed by ReLU when `relu_after` (MLP layers)."""

    def __init__(self, relu_after: bool) -> None:
        super().__init__()
        self.relu_after = relu_after
        self.blocks = nn.ModuleList()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
            if self.relu_after:
                x = torch.relu(x)
        return x
