"""Blueprints: seed sub-networks described as data (`esper.v1.BlueprintSpec`), never as code.

    from esper.kasmina.blueprints import CATALOG, get_blueprint, validate_blueprint
    spec = get_blueprint("residual_mlp")
    validate_blueprint(spec, chunk_size=32, input_kind=SeedInputKind.SEED_INPUT_KIND_FEATURES)
    seed = build_seed_module(spec, 32, (8, 32), torch.float32, "cpu")   # [N, 32] -> delta [N, 32]
    cost = blueprint_cost(spec, 32, (-1, 32))                           # esper.v1.BlueprintCost

A built seed maps one chunk of the host output, [N, chunk, *], to a delta of the same shape and
returns exactly zero when created (its last parametric layer is zero-initialised), so planting it
never changes the host's function. Modules use no data-dependent Python control flow, so the
Tezzeret compiler can `torch.export` them with a dynamic batch dimension.
"""

from esper.kasmina.blueprints.build import SeedModule, build_seed_module
from esper.kasmina.blueprints.catalog import CATALOG, catalog_ids, get_blueprint
from esper.kasmina.blueprints.cost import blueprint_cost
from esper.kasmina.blueprints.spec import (
    BlueprintError,
    BlueprintSpec,
    SeedInputKind,
    input_kind_for_rank,
    layer_widths,
    validate_blueprint,
)

__all__ = [
    "CATALOG",
    "BlueprintError",
    "BlueprintSpec",
    "SeedInputKind",
    "SeedModule",
    "blueprint_cost",
    "build_seed_module",
    "catalog_ids",
    "get_blueprint",
    "input_kind_for_rank",
    "layer_widths",
    "validate_blueprint",
]
