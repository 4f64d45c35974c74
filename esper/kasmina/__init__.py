"""Kasmina: seeds inside the host model.

Public API for trainers (stable):

- `wrap(model, target_layers, seeds_per_layer=1, channels=None, spatial_dims=None)` -> model
- `seed_sites(model)` -> [(name, KasminaLayer)]
- `KasminaLayer`: `germinate`, `attach_kernel`, `cull`, `cancel`, `rollback`, `transition`,
  `seed_table`, `seed_disabled`, `seed_parameters`, `add_listener`, `state_of`
- `LifecycleDriver(model, LifecycleConfig, evaluate)`: `step()`, `end_epoch()`, `events`
- `new_parameters(model, optimizer)`, `drop_stale_parameters(model, optimizer)`, `telemetry_probe(model)`,
  `seed_table(model)`, `all_seeds_disabled(model)`
- blueprints: `CATALOG`, `get_blueprint`, `validate_blueprint`, `build_seed_module`, `blueprint_cost`

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
from esper.kasmina.layer import KasminaLayer, LifecycleClock, SeedRow
from esper.kasmina.lifecycle import IllegalTransitionError, LifecycleConfig, LifecycleEvent
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
    "BlueprintError",
    "IllegalTransitionError",
    "KasminaLayer",
    "LifecycleClock",
    "LifecycleConfig",
    "LifecycleDriver",
    "LifecycleEvent",
    "SeedRow",
    "SeedStateTable",
    "all_seeds_disabled",
    "blueprint_cost",
    "build_seed_module",
    "drop_stale_parameters",
    "get_blueprint",
    "new_parameters",
    "seed_sites",
    "seed_table",
    "telemetry_probe",
    "validate_blueprint",
    "wrap",
]
