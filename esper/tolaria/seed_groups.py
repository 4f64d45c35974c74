"""`sync_seed_groups`: the one way the optimizer follows the seeds. The host's parameters are the
first param group; each seed with a module has a group of its own, named
``seed:<layer>:<index>`` (`esper.tolaria.morphogenesis.group_name`)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from esper.tolaria.schedule import add_param_group, remove_param_group


def sync_seed_groups(optimizer: torch.optim.Optimizer, live: Iterable[tuple[str, list[nn.Parameter]]], lr: float, *,
                     order: list[str] | None = None) -> None:
    """Make the optimizer's seed groups the `live` ones: groups of seeds that are gone leave with
    their optimizer state, new seeds join with fresh state, the others (and the host) keep theirs.

    With `order` (after a checkpoint load or a rollback, whose optimizer state is matched by
    position) every seed group is rebuilt: those named in `order` first, in that order.
    """
    live = dict(live)
    if order is not None:
        for group in list(optimizer.param_groups[1:]):
            remove_param_group(optimizer, group["name"])
        names = [n for n in order if n in live] + [n for n in live if n not in order]
        for name in names:
            add_param_group(optimizer, live[name], name, lr)
        return
    # A slot can hold a new seed under the same name (a merged width seed, then the next one):
    # a group whose parameters are not the live ones is replaced.
    present = {g.get("name"): [id(p) for p in g["params"]] for g in optimizer.param_groups[1:]}
    for name, ids in present.items():
        if name not in live or ids != [id(p) for p in live[name]]:
            remove_param_group(optimizer, name)
    kept = {g.get("name") for g in optimizer.param_groups[1:]}
    for name, params in live.items():
        if name not in kept:
            add_param_group(optimizer, params, name, lr)
