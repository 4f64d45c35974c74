"""Kasmina: seeds inside the host model.

Public API for trainers (stable):

- `wrap(model, target_layers, seeds_per_layer=1, channels=None, spatial_dims=None)` -> model
- `seed_sites(model)` -> [(name, KasminaLayer)]
- `KasminaLayer`: `germinate`, `attach_kernel`, `cull`, `cancel`, `rollback`, `transition`,
  `seed_table`, `seed_disabled`, `seed_parameters`, `add_listener`, `state_of`, `seed_dtype`,
  `checkpointed_kernels`, `preload_seed`
- `seed_from_kernel(kernel, spec)`, `adopt_kernel(module, blueprint_id)`: seeds from compiled kernels
- `LifecycleDriver(model, LifecycleConfig, evaluate)`: `step()`, `end_epoch()`, `events`
- `new_parameters(model, optimizer)`, `drop_stale_parameters(model, optimizer)`, `telemetry_probe(model)`,
  `seed_table(model)`, `all_seeds_disabled(model)`
- blueprints: `CATALOG`, `get_blueprint`, `validate_blueprint`, `build_seed_module`, `blueprint_cost`
- ops (`esper.kasmina.ops`): `seed_blend`, `telemetry_accumulate_`, `grad_telemetry_accumulate_`,
  `lifecycle_advance_`, `telemetry_readout`, `telemetry_reset_`; the C++ `KernelCache`

Importing `esper.kasmina` loads the compiled ops (`esper._C`).
"""

from esper.kasmina.blueprints import (
    CATALOG,
    BlueprintError,
    blueprint_cost,
    build_seed_module,
    get_blueprint,
    validate_blueprint,
)
from esper.kasmina.driver import LifecycleDriver
from esper.kasmina.kernel_cache import KernelCache, cache_key
from esper.kasmina.kernel_seeds import adopt_kernel, seed_from_kernel
from esper.kasmina.layer import KasminaLayer, LifecycleClock, SeedRow
from esper.kasmina.lifecycle import IllegalTransitionError, LifecycleConfig, LifecycleEvent
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
from esper.kasmina.state_table import SeedStateTable
from esper.kasmina.wrap import (
    all_seeds_disabled,
    drop_stale_parameters,
    new_parameters,
    seed_sites,
    seed_table,
    telemetry_probe,
    wrap,
)

__all__ = [
    "CATALOG",
    "TELEMETRY_COUNT",
    "TELEMETRY_DEAD",
    "TELEMETRY_GRAD_SQ",
    "TELEMETRY_GRAD_STEPS",
    "TELEMETRY_SUM",
    "TELEMETRY_SUMSQ",
    "BlueprintError",
    "IllegalTransitionError",
    "KasminaLayer",
    "KernelCache",
    "LifecycleClock",
    "LifecycleConfig",
    "LifecycleDriver",
    "LifecycleEvent",
    "SeedRow",
    "SeedStateTable",
    "adopt_kernel",
    "all_seeds_disabled",
    "blueprint_cost",
    "build_seed_module",
    "cache_key",
    "drop_stale_parameters",
    "get_blueprint",
    "grad_telemetry_accumulate_",
    "lifecycle_advance_",
    "new_parameters",
    "seed_blend",
    "seed_from_kernel",
    "seed_sites",
    "seed_table",
    "telemetry_accumulate_",
    "telemetry_probe",
    "telemetry_readout",
    "telemetry_reset_",
    "validate_blueprint",
    "wrap",
]
