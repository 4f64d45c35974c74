"""kasmina subsystem."""

from esper.kasmina.kernel_cache import KernelCache, cache_key
from esper.kasmina.ops import (
    TELEMETRY_COUNT,
    TELEMETRY_DEAD,
    TELEMETRY_GRAD_SQ,
    TELEMETRY_GRAD_STEPS,
    TELEMETRY_SUM,
    TELEMETRY_SUMSQ,
    grad_telemetry_accumulate_,
    lifecycle_advance_,
    seed_blend,
    telemetry_accumulate_,
    telemetry_readout,
    telemetry_reset_,
)

__all__ = [
    "TELEMETRY_COUNT",
    "TELEMETRY_DEAD",
    "TELEMETRY_GRAD_SQ",
    "TELEMETRY_GRAD_STEPS",
    "TELEMETRY_SUM",
    "TELEMETRY_SUMSQ",
    "KernelCache",
    "cache_key",
    "grad_telemetry_accumulate_",
    "lifecycle_advance_",
    "seed_blend",
    "telemetry_accumulate_",
    "telemetry_readout",
    "telemetry_reset_",
]
