"""Put seed sites into an existing model, list them, and hand new seed parameters to an optimizer.

    model = esper.kasmina.wrap(model, target_layers=["hidden.0", "hidden.1"], seeds_per_layer=2)
    for name, layer in esper.kasmina.seed_sites(model): ...
    layer.germinate(0, "residual_mlp")
    optimizer.add_param_group({"params": esper.kasmina.new_parameters(model, optimizer)})

`wrap` replaces each named submodule in place by a `KasminaLayer` holding it as `.host`; the model's
outputs do not change (every slot starts DORMANT). Parameter names gain a `.host` segment
(`hidden.0.weight` -> `hidden.0.host.weight`), so wrap before loading a checkpoint of a wrapped model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from esper.kasmina.layer import KasminaLayer


def _resolve(model: nn.Module, name: str) -> tuple[nn.Module, str, nn.Module]:
    parent = model
    parts = name.split(".")
    for part in parts[:-1]:
        child = parent._modules.get(part)
        if child is None:
            break
        parent = child
    else:
        target = parent._modules.get(parts[-1])
        if target is not None:
            return parent, parts[-1], target
    names = [n for n, _ in model.named_modules() if n]
    shown = ", ".join(names[:30]) + (", ..." if len(names) > 30 else "")
    raise KeyError(f"model has no submodule {name!r}; its submodules are: {shown}")


def _per_layer(value, name: str):
    if isinstance(value, Mapping):
        return value.get(name)
    return value


def wrap(
    model: nn.Module,
    target_layers: Iterable[str],
    seeds_per_layer: int = 1,
    channels: int | Mapping[str, int] | None = None,
    spatial_dims: int | Mapping[str, int] | None = None,
) -> nn.Module:
    """Replace each submodule named in `target_layers` by a KasminaLayer with `seeds_per_layer` slots.

    `channels` / `spatial_dims` (an int for all, or a {name: int} mapping) describe generic blocks
    whose output width or rank cannot be inferred. Returns `model` (modified in place).
    """
    names = list(target_layers)
    if not names:
        raise ValueError("wrap needs at least one target layer name")
    if len(set(names)) != len(names):
        raise ValueError(f"target_layers has duplicates: {names}")
    for name in names:
        parent, attr, target = _resolve(model, name)
        if isinstance(target, KasminaLayer):
            raise ValueError(f"layer {name!r} is already wrapped")
        layer = KasminaLayer(
            target,
            num_seeds=seeds_per_layer,
            channels=_per_layer(channels, name),
            spatial_dims=_per_layer(spatial_dims, name),
            name=name,
        )
        setattr(parent, attr, layer)
    return model


def seed_sites(model: nn.Module) -> list[tuple[str, KasminaLayer]]:
    """Every KasminaLayer of `model` with its qualified name, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, KasminaLayer)]


def new_parameters(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    """Trainable parameters of `model` that `optimizer` does not hold yet (e.g. a seed just germinated).

    Pass them to `optimizer.add_param_group({...})`: the host's optimizer state is kept as is.
    """
    known = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in known]


def drop_stale_parameters(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Remove from `optimizer` the parameters no longer in `model` (culled seeds); returns how many.

    Empty param groups are removed; the state of the remaining parameters is kept.
    """
    alive = {id(p) for p in model.parameters()}
    dropped = 0
    for group in optimizer.param_groups:
        keep = [p for p in group["params"] if id(p) in alive]
        for p in group["params"]:
            if id(p) not in alive:
                optimizer.state.pop(p, None)
                dropped += 1
        group["params"] = keep
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
    return dropped


def seed_table(model: nn.Module) -> list:
    """Rows (`SeedRow`) of every seed slot of every site of `model`, in module order."""
    return [row for _, layer in seed_sites(model) for row in layer.seed_table()]


@contextlib.contextmanager
def all_seeds_disabled(model: nn.Module) -> Iterator[None]:
    """Force alpha = 0 for every seed of `model` inside the block: the host alone, for comparison."""
    with contextlib.ExitStack() as stack:
        for _, layer in seed_sites(model):
            for i in range(layer.num_seeds):
                stack.enter_context(layer.seed_disabled(i))
        yield


@contextlib.contextmanager
def telemetry_probe(model: nn.Module) -> Iterator[None]:
    """Collect telemetry on every seed site, dormant ones included, inside the block."""
    sites = seed_sites(model)
    for _, layer in sites:
        layer.set_telemetry_probe(True)
    try:
        yield
    finally:
        for _, layer in sites:
            layer.set_telemetry_probe(False)
