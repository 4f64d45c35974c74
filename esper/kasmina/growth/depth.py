"""Depth growth: a new block that starts as the identity, for MLP and ResNet hosts.

- MLP: a square Linear(units, units) + ReLU inserted after hidden layer i (into the host's
  `deepen.i` stack, so no layer name shifts). Initialised to the
  identity matrix with zero bias it is exact, because its input is a ReLU output (>= 0).
- ResNet: a BasicBlock(c, c) inserted after block j of a stage. "identity": fresh convolutions with
  the last BatchNorm's scale and shift zero, so the residual branch outputs 0 and the block returns
  relu(x) = x (x is itself a block output, >= 0). "copy": the convolutions and norms of its
  neighbour (a warm start), with that same last norm zeroed, so it is still the identity at insertion.
The new block's parameters are returned for a new optimizer group (the host's state is untouched).
"""

from __future__ import annotations

import copy
from typing import Literal, get_args

import torch
from torch import nn

DepthInit = Literal["identity", "copy"]
"""How a depth seed's block starts: fresh (identity) or a copy of its neighbour."""
DEPTH_MODES: tuple[str, ...] = get_args(DepthInit)


def identity_linear(prev: nn.Linear) -> nn.Linear:
    """A square Linear(units, units) after `prev`, initialised to the identity (zero bias)."""
    units = prev.out_features
    layer = nn.Linear(units, units).to(device=prev.weight.device, dtype=prev.weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(units, dtype=layer.weight.dtype))
        layer.bias.zero_()
    return layer


def identity_block(neighbour: nn.Module, mode: str = "identity") -> nn.Module:
    """A block of `neighbour`'s type, (c, c, stride 1), that is the identity at insertion.

    The block type must take (in_channels, out_channels, stride) and have conv2/bn2 as its last
    residual-branch layers (esper.models.resnet.BasicBlock).
    """
    if mode not in DEPTH_MODES:
        raise ValueError(f"depth mode {mode!r}; expected one of {DEPTH_MODES}")
    neighbour = getattr(neighbour, "host", neighbour)
    c = neighbour.out_channels
    ref = neighbour.conv2.weight
    if mode == "copy":
        if not isinstance(neighbour.shortcut, nn.Identity):
            raise ValueError("depth mode 'copy' needs a neighbour block with an identity shortcut (c -> c, stride 1)")
        block = copy.deepcopy(neighbour)
    else:
        block = type(neighbour)(c, c, 1).to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        block.bn2.weight.zero_()
        block.bn2.bias.zero_()
    block.train(neighbour.training)
    return block


def insert_mlp_layer(mlp: nn.Module, after: int) -> list[nn.Parameter]:
    """Inserts an identity hidden layer after `mlp.hidden[after]`; returns its parameters."""
    hidden = mlp.hidden
    if not 0 <= after < len(hidden):
        raise IndexError(f"MLP has hidden layers 0..{len(hidden) - 1}, got after={after}")
    prev = hidden[after]
    layer = identity_linear(getattr(prev, "host", prev))
    mlp.deepen[after].blocks.append(layer)
    return list(layer.parameters())


def insert_resnet_block(stage: nn.Sequential, after: int, stack: nn.Module, mode: str = "identity") -> list[nn.Parameter]:
    """Appends to `stack` (the host's DepthStack after `stage[after]`) a block that is the identity
    at insertion; returns its parameters."""
    if not 0 <= after < len(stage):
        raise IndexError(f"stage has blocks 0..{len(stage) - 1}, got after={after}")
    block = identity_block(stage[after], mode)
    stack.blocks.append(block)
    return list(block.parameters())
