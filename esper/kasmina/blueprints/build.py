"""Turn a validated BlueprintSpec into an `nn.Module` that maps a chunk to a delta of its shape."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from esper.kasmina.blueprints.spec import (
    FEATURES,
    IMAGE,
    SEQUENCE,
    BlueprintLayerSpec,
    BlueprintSpec,
    Op,
    input_kind_for_rank,
    last_parametric_index,
    layer_widths,
    validate_blueprint,
)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis (dim 1) of [N, C, *] tensors."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class SqueezeExcite(nn.Module):
    """x * sigmoid(W2 relu(W1 mean_spatial(x))): a per-sample channel gate."""

    def __init__(self, channels: int, hidden: int, spatial_dims: int, bias: bool) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.reduce = nn.Linear(channels, hidden, bias=bias)
        self.expand = nn.Linear(hidden, channels, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=tuple(range(2, 2 + self.spatial_dims))) if self.spatial_dims else x
        gate = torch.sigmoid(self.expand(torch.relu(self.reduce(pooled))))
        return x * gate.reshape(gate.shape + (1,) * self.spatial_dims)


class SequenceSelfAttention(nn.Module):
    """Multi-head self-attention over the length axis of [N, C, L]; returns [N, C, L]."""

    def __init__(self, channels: int, num_heads: int, bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        self.qkv = nn.Linear(channels, 3 * channels, bias=bias)
        self.out = nn.Linear(channels, channels, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, length = x.shape
        qkv = self.qkv(x.transpose(1, 2))  # [N, L, 3C]
        qkv = qkv.reshape(n, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [N, heads, L, head_dim]
        y = y.transpose(1, 2).reshape(n, length, c)
        return self.out(y).transpose(1, 2)


class SeedModule(nn.Sequential):
    """The built seed: an nn.Sequential of the blueprint's layers plus where it came from."""

    def __init__(self, layers: Sequence[nn.Module], blueprint_id: str, version: int, chunk_size: int) -> None:
        super().__init__(*layers)
        self.blueprint_id = blueprint_id
        self.blueprint_version = version
        self.chunk_size = chunk_size


def _pointwise(kind: int, in_w: int, out_w: int, bias: bool) -> nn.Module:
    if kind == FEATURES:
        return nn.Linear(in_w, out_w, bias=bias)
    if kind == SEQUENCE:
        return nn.Conv1d(in_w, out_w, 1, bias=bias)
    return nn.Conv2d(in_w, out_w, 1, bias=bias)


def _conv_groups(layer: BlueprintLayerSpec, in_w: int) -> int:
    if layer.groups == -1:
        return in_w
    return max(1, layer.groups)


def _norm(kind: int, op: int, layer: BlueprintLayerSpec, width: int) -> nn.Module:
    if op == Op.BLUEPRINT_OP_BATCH_NORM:
        return nn.BatchNorm2d(width) if kind == IMAGE else nn.BatchNorm1d(width)
    if op == Op.BLUEPRINT_OP_LAYER_NORM:
        return nn.LayerNorm(width) if kind == FEATURES else ChannelLayerNorm(width)
    return nn.GroupNorm(layer.num_heads, width)


def _make_layer(layer: BlueprintLayerSpec, kind: int, in_w: int, out_w: int, spatial_dims: int) -> nn.Module:
    op = layer.op
    if op == Op.BLUEPRINT_OP_LINEAR:
        return _pointwise(kind, in_w, out_w, layer.bias)
    if op == Op.BLUEPRINT_OP_CONV1D:
        k = layer.kernel_size
        return nn.Conv1d(in_w, out_w, k, padding=k // 2, groups=_conv_groups(layer, in_w), bias=layer.bias)
    if op == Op.BLUEPRINT_OP_CONV2D:
        k = layer.kernel_size
        return nn.Conv2d(in_w, out_w, k, padding=k // 2, groups=_conv_groups(layer, in_w), bias=layer.bias)
    if op == Op.BLUEPRINT_OP_RELU:
        return nn.ReLU()
    if op == Op.BLUEPRINT_OP_GELU:
        return nn.GELU()
    if op == Op.BLUEPRINT_OP_SILU:
        return nn.SiLU()
    if op == Op.BLUEPRINT_OP_SIGMOID:
        return nn.Sigmoid()
    if op in (Op.BLUEPRINT_OP_BATCH_NORM, Op.BLUEPRINT_OP_LAYER_NORM, Op.BLUEPRINT_OP_GROUP_NORM):
        return _norm(kind, op, layer, in_w)
    if op == Op.BLUEPRINT_OP_SQUEEZE_EXCITE:
        return SqueezeExcite(in_w, se_hidden(in_w, layer.reduction), spatial_dims, layer.bias)
    if op == Op.BLUEPRINT_OP_SELF_ATTENTION:
        return SequenceSelfAttention(in_w, layer.num_heads, layer.bias)
    if op == Op.BLUEPRINT_OP_DROPOUT:
        return nn.Dropout(layer.dropout)
    raise AssertionError(f"validate_blueprint let op {op} through")  # pragma: no cover


def se_hidden(channels: int, reduction: int) -> int:
    """Bottleneck width of a squeeze-excitation gate."""
    return max(1, channels // reduction)


def _zero_(module: nn.Module) -> None:
    # Attention is zeroed at its output projection only, so queries/keys still learn.
    target = module.out if isinstance(module, SequenceSelfAttention) else module
    for p in target.parameters(recurse=True):
        nn.init.zeros_(p)


def build_seed_module(
    spec: BlueprintSpec,
    chunk_size: int,
    input_shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> SeedModule:
    """Build the seed for chunks of shape `input_shape` = [N, chunk_size, *] (N may be -1).

    The returned module maps such a chunk to a delta of the same shape and outputs exactly zero at
    creation: the last parametric layer (and any layer with `zero_init`) has all-zero parameters.
    Raises BlueprintError when the blueprint does not fit this chunk size / input kind.
    """
    shape = tuple(int(d) for d in input_shape)
    kind = input_kind_for_rank(len(shape))
    if shape[1] != chunk_size:
        raise ValueError(f"input_shape[1] must equal chunk_size {chunk_size}, got input_shape {list(shape)}")
    validate_blueprint(spec, chunk_size, kind)
    spatial_dims = len(shape) - 2
    last = last_parametric_index(spec)
    modules = []
    for i, (layer, (in_w, out_w)) in enumerate(zip(spec.layers, layer_widths(spec, chunk_size), strict=True)):
        module = _make_layer(layer, kind, in_w, out_w, spatial_dims)
        if i == last or layer.zero_init:
            _zero_(module)
        modules.append(module)
    seed = SeedModule(modules, spec.blueprint_id, spec.version, chunk_size)
    return seed.to(device=device, dtype=dtype)
