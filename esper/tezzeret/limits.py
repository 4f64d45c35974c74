"""What one Tezzeret server agrees to compile: limits checked from the blueprint alone, before a
worker builds anything.

A blueprint's parameter count and FLOPs per sample follow from its spec and the input shape
(`esper.kasmina.blueprints.blueprint_cost`); the memory a compile needs is estimated from them:
the module's parameters are held about four times at once (the built module, the exported
program, its serialised bytes, and the module loaded back for the check), and the largest layer
activation is held for the example and check batches. Requests past a limit get
RESOURCE_EXHAUSTED (reason ``COMPILE_LIMIT_EXCEEDED``, metadata ``limit`` naming it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from esper.errors import ResourceExhaustedError
from esper.v1 import common_pb2

# Copies of the parameters alive at once during a compile (see the module docstring).
PARAMETER_COPIES = 4
# Example batch (4) + check batches (1 and 7), each as input, output and the widest layer.
ACTIVATION_SAMPLES = 12 * 3
DTYPE_BYTES = {common_pb2.D_TYPE_FLOAT32: 4, common_pb2.D_TYPE_FLOAT64: 8, common_pb2.D_TYPE_FLOAT16: 2,
               common_pb2.D_TYPE_BFLOAT16: 2}


@dataclass(frozen=True)
class CompileLimits:
    """The largest seed a server compiles. Defaults fit a 2 GiB worker on a CPU host."""

    max_parameters: int = 50_000_000
    max_flops_per_sample: int = 100_000_000_000
    worker_memory_bytes: int = 2 * 1024**3

    def __post_init__(self) -> None:
        for name in ("max_parameters", "max_flops_per_sample", "worker_memory_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def estimate_compile_memory_bytes(parameter_count: int, widest_layer: int, positions: int, dtype: int) -> int:
    """Bytes a compile holds at its peak, by the rule in the module docstring."""
    element = DTYPE_BYTES.get(dtype, 4)
    activations = ACTIVATION_SAMPLES * widest_layer * positions
    return element * (PARAMETER_COPIES * parameter_count + activations)


def check_compile_limits(spec: common_pb2.BlueprintSpec, dims: Sequence[int], dtype: int,
                         limits: CompileLimits) -> None:
    """Raise ResourceExhaustedError naming the first limit the request exceeds.

    A blueprint that does not fit the shape at all is left to the compiler (it records INVALID).
    """
    from esper.kasmina.blueprints import BlueprintError, blueprint_cost
    from esper.kasmina.blueprints.spec import layer_widths

    chunk = int(dims[1])
    try:
        cost = blueprint_cost(spec, chunk, dims)
    except (BlueprintError, ValueError):
        return
    where = f"blueprint {spec.blueprint_id!r} v{spec.version} for input {list(dims)}"
    if cost.parameter_count > limits.max_parameters:
        _exceeded("max_parameters", f"{where} has {cost.parameter_count:,} parameters", limits.max_parameters)
    if cost.flops_per_sample > limits.max_flops_per_sample:
        _exceeded("max_flops_per_sample", f"{where} costs {cost.flops_per_sample:,} FLOPs per sample",
                  limits.max_flops_per_sample)
    widest = max([chunk, *(out for _, out in layer_widths(spec, chunk))])
    memory = estimate_compile_memory_bytes(cost.parameter_count, widest, math.prod(dims[2:]), dtype)
    if memory > limits.worker_memory_bytes:
        _exceeded("worker_memory_bytes", f"{where} needs about {memory:,} bytes to compile",
                  limits.worker_memory_bytes)


def _exceeded(limit: str, what: str, value: int) -> None:
    raise ResourceExhaustedError(
        f"{what}; this Tezzeret's {limit} is {value:,}. Use a smaller input shape or blueprint, or raise the "
        "limit in the server's configuration", reason="COMPILE_LIMIT_EXCEEDED",
        metadata={"limit": limit, "limit_value": value, "field": "input_shape.dims"})
