"""How a seed that adds to another module's output follows its Kasmina slot (width and depth seeds)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from esper.kasmina import ops
from esper.kasmina.blueprints import BlueprintSpec
from esper.kasmina.layer import KasminaLayer
from esper.kasmina.lifecycle import ACTIVE_STATES, FROZEN_STATES
from esper.lifecycle import SeedLifecycleState as S


def spec_tag(spec: BlueprintSpec, name: str) -> str:
    """The value of tag `name=...` of a width/depth seed's spec; ValueError if it has none."""
    for tag in spec.tags:
        key, _, value = tag.partition("=")
        if key == name:
            return value
    raise ValueError(f"seed spec {spec.blueprint_id!r} has no {name!r} tag; expected tags {list(spec.tags)} to name it")


def lifecycle_blend(layer: KasminaLayer, index: int) -> Callable[[torch.Tensor, torch.Tensor, nn.Module], torch.Tensor]:
    """`blend(out, x, seed)`: `out` plus `seed(x)` as slot `index` of `layer` says, exactly like
    KasminaLayer blends its own seeds -- nothing when not active; TRAINING: straight-through (the
    value is `out`, the seed still gets the task gradient, and the alignment the TRAINING gate reads
    is accumulated); frozen states: no gradient to the seed; otherwise `out + alpha * seed(x)`.
    Non-finite seed values never reach `out` (`ops.seed_blend_whole`: the seed owns all of `out`)."""
    def blend(out: torch.Tensor, x: torch.Tensor, seed: nn.Module) -> torch.Tensor:
        state = layer.state_of(index)
        if state not in ACTIVE_STATES:
            return out
        if state in FROZEN_STATES:
            with torch.no_grad():
                s = seed(x.detach())
        elif state == S.TRAINING:
            s = seed(x.detach())
            if s.requires_grad and torch.is_grad_enabled():
                s.register_hook(functools.partial(layer._alignment_hook, index, s.detach()))
        else:
            s = seed(x)
        t = layer.table
        if layer.num_seeds == 1:  # the rows are the whole table: no slicing ops per call
            return ops.seed_blend_whole(out, s.to(out.dtype), state, t.state, t.alpha)
        return ops.seed_blend_whole(out, s.to(out.dtype), state, t.state[index : index + 1],
                                    t.alpha[index : index + 1])
    return blend
