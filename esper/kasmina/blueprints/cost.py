"""Parameter count and FLOPs of a blueprint at a chunk size and input shape, from the spec alone."""

from __future__ import annotations

import math
from collections.abc import Sequence

from esper.kasmina.blueprints.build import se_hidden
from esper.kasmina.blueprints.spec import (
    FEATURES,
    BlueprintSpec,
    Op,
    input_kind_for_rank,
    layer_widths,
    validate_blueprint,
)
from esper.v1 import common_pb2

# Elementwise cost per activation value; a rough but stated convention.
_ACTIVATION_FLOPS = {
    Op.BLUEPRINT_OP_RELU: 1,
    Op.BLUEPRINT_OP_GELU: 8,
    Op.BLUEPRINT_OP_SILU: 4,
    Op.BLUEPRINT_OP_SIGMOID: 4,
    Op.BLUEPRINT_OP_DROPOUT: 1,
}


def _layer_cost(layer, kind: int, in_w: int, out_w: int, positions: int, length: int) -> tuple[int, int]:
    """(parameters, flops per sample) of one layer; a multiply-add counts as 2 FLOPs."""
    op = layer.op
    b = 1 if layer.bias else 0
    if op == Op.BLUEPRINT_OP_LINEAR:
        params = in_w * out_w + b * out_w
        return params, (2 * in_w * out_w + b * out_w) * positions
    if op in (Op.BLUEPRINT_OP_CONV1D, Op.BLUEPRINT_OP_CONV2D):
        groups = in_w if layer.groups == -1 else max(1, layer.groups)
        taps = layer.kernel_size ** (1 if op == Op.BLUEPRINT_OP_CONV1D else 2)
        weights = (in_w // groups) * out_w * taps
        return weights + b * out_w, (2 * weights + b * out_w) * positions
    if op in _ACTIVATION_FLOPS:
        return 0, _ACTIVATION_FLOPS[op] * in_w * positions
    if op in (Op.BLUEPRINT_OP_BATCH_NORM, Op.BLUEPRINT_OP_LAYER_NORM, Op.BLUEPRINT_OP_GROUP_NORM):
        # Affine scale and shift; normalise costs about 4 FLOPs per value plus the affine 2.
        return 2 * in_w, 6 * in_w * positions
    if op == Op.BLUEPRINT_OP_SQUEEZE_EXCITE:
        hidden = se_hidden(in_w, layer.reduction)
        params = 2 * in_w * hidden + b * (hidden + in_w)
        pool = in_w * positions if kind != FEATURES else 0
        mlp = 2 * in_w * hidden * 2 + b * (hidden + in_w) + hidden + 4 * in_w
        return params, pool + mlp + in_w * positions
    if op == Op.BLUEPRINT_OP_SELF_ATTENTION:
        c = in_w
        params = 4 * c * c + b * 4 * c
        proj = (2 * c * 3 * c + b * 3 * c + 2 * c * c + b * c) * length
        attention = 2 * length * length * c * 2 + 5 * layer.num_heads * length * length
        return params, proj + attention
    raise AssertionError(f"validate_blueprint let op {op} through")  # pragma: no cover


def blueprint_cost(spec: BlueprintSpec, chunk_size: int, input_shape: Sequence[int]) -> common_pb2.BlueprintCost:
    """Cost of `spec` on chunks of shape `input_shape` = [N, chunk_size, *] (N may be -1).

    `parameter_count` equals the number of parameters of `build_seed_module(spec, ...)`;
    `flops_per_sample` is the forward cost of one sample (multiply-add = 2 FLOPs).
    """
    shape = [int(d) for d in input_shape]
    kind = input_kind_for_rank(len(shape))
    if shape[1] != chunk_size:
        raise ValueError(f"input_shape[1] must equal chunk_size {chunk_size}, got input_shape {shape}")
    validate_blueprint(spec, chunk_size, kind)
    positions = math.prod(shape[2:])
    length = shape[2] if len(shape) == 3 else 1
    params = flops = 0
    for layer, (in_w, out_w) in zip(spec.layers, layer_widths(spec, chunk_size), strict=True):
        p, f = _layer_cost(layer, kind, in_w, out_w, positions, length)
        params += p
        flops += f
    return common_pb2.BlueprintCost(
        chunk_size=chunk_size,
        input_shape=common_pb2.TensorShape(dims=[-1, *shape[1:]]),
        parameter_count=params,
        flops_per_sample=flops,
    )
