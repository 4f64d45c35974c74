"""Merge a width seed into its host pair: plain wider nn.Linear / nn.Conv* / BatchNorm modules.

The merged model computes exactly what host + seed computed (the consumer of `[z, z_new]` is
`W z + W_new z_new + b`, norms and posts are per channel), has the same architecture and FLOPs
as a static model of that width, and keeps the optimizer state of old and new entries (the new
entries take the seed parameters' state). `widen_pair` does insertion and merge in one go (plain
immediate growth, used outside the lifecycle and by tests).
"""

from __future__ import annotations

import torch
from torch import nn

from esper.kasmina.growth.optim_state import replace_grown
from esper.kasmina.growth.pair import PairModules, WidthPair, pair_modules, resolve
from esper.kasmina.growth.seed import WidthSeed


def _wider(module: nn.Module, in_dim: int, out_dim: int) -> nn.Module:
    if isinstance(module, nn.Linear):
        new = nn.Linear(in_dim, out_dim, bias=module.bias is not None)
    else:
        new = type(module)(in_dim, out_dim, module.kernel_size, stride=module.stride, padding=module.padding,
                           dilation=module.dilation, bias=module.bias is not None, padding_mode=module.padding_mode)
    return new.to(device=module.weight.device, dtype=module.weight.dtype)


def _dims(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    from esper.kasmina.layer import KasminaLayer

    parent, attr, _ = resolve(model, name)
    if isinstance(parent, KasminaLayer) and attr == "host":
        parent.set_host(module)  # the seed site's channel count follows the wider host
    else:
        setattr(parent, attr, module)


def _param(value: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(value.detach().clone(), requires_grad=like.requires_grad)


def merge_width_seed(model: nn.Module, pair: WidthPair, seed: WidthSeed,
                     optimizer: torch.optim.Optimizer | None = None, fill: str = "zero") -> PairModules:
    """Replaces the pair's producer, norm and consumer by wider plain modules holding the seed's units.

    With `optimizer`, the replaced parameters take their old place and state there, extended by the
    seed parameters' state (seed parameters themselves are left for the caller to drop).
    Returns the new modules.
    """
    mods = pair_modules(model, pair)
    k = seed.units
    p, c = mods.producer, mods.consumer
    p_in, p_out = _dims(p)
    c_in, c_out = _dims(c)
    new_p = _wider(p, p_in, p_out + k)
    new_c = _wider(c, c_in + k, c_out)
    swaps: list[tuple[nn.Parameter, nn.Parameter, int, nn.Parameter | None]] = []
    new_p.weight = _param(torch.cat([p.weight, seed.fan_in.weight], 0), p.weight)
    swaps.append((p.weight, new_p.weight, 0, seed.fan_in.weight))
    if p.bias is not None:
        new_p.bias = _param(torch.cat([p.bias, seed.fan_in.bias], 0), p.bias)
        swaps.append((p.bias, new_p.bias, 0, seed.fan_in.bias))
    new_c.weight = _param(torch.cat([c.weight, seed.fan_out.weight], 1), c.weight)
    swaps.append((c.weight, new_c.weight, 1, seed.fan_out.weight))
    if c.bias is not None:
        new_c.bias = c.bias  # same outputs: the very same parameter (and optimizer state)
    new_n = None
    if mods.norm is not None:
        n, sn = mods.norm, seed.norm
        assert sn is not None
        new_n = type(n)(n.num_features + k, eps=n.eps, momentum=n.momentum, affine=n.affine,
                        track_running_stats=n.track_running_stats).to(device=p.weight.device, dtype=p.weight.dtype)
        if n.affine:
            new_n.weight = _param(torch.cat([n.weight, sn.weight]), n.weight)
            new_n.bias = _param(torch.cat([n.bias, sn.bias]), n.bias)
            swaps += [(n.weight, new_n.weight, 0, sn.weight), (n.bias, new_n.bias, 0, sn.bias)]
        if n.track_running_stats:
            with torch.no_grad():
                new_n.running_mean.copy_(torch.cat([n.running_mean, sn.running_mean]))
                new_n.running_var.copy_(torch.cat([n.running_var, sn.running_var]))
                new_n.num_batches_tracked.copy_(n.num_batches_tracked)
    new_p.train(p.training)
    new_c.train(c.training)
    _set(model, pair.producer, new_p)
    _set(model, pair.consumer, new_c)
    if new_n is not None:
        new_n.train(mods.norm.training)
        _set(model, pair.norm, new_n)
    if optimizer is not None:
        for old, new, dim, tail in swaps:
            replace_grown(optimizer, old, new, dim, tail, fill)
    return pair_modules(model, pair)


def widen_pair(model: nn.Module, pair: WidthPair, seed: WidthSeed,
               optimizer: torch.optim.Optimizer | None = None, fill: str = "zero") -> PairModules:
    """Immediate width growth: merge an (initialised) seed that never trained as a seed.

    Its parameters were never in the optimizer, so the new entries get zero / `fill` state.
    Function-preserving when the seed is (zero fan-in with GradMax, zero fan-out with random).
    """
    return merge_width_seed(model, pair, seed, optimizer, fill)


def regrow(model: nn.Module, pair: WidthPair, units: int) -> PairModules:
    """Widen a freshly built host by `units` (zero weights) so a checkpoint of a grown model loads."""
    mods = pair_modules(model, pair)
    seed = WidthSeed(pair, mods, units)
    with torch.no_grad():
        for t in seed.parameters():
            t.zero_()
    return merge_width_seed(model, pair, seed)
