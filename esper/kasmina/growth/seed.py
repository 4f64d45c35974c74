"""`WidthSeed`: k new hidden units of a width pair, kept as their own parameters while on trial.

Design: during its lifecycle a width seed is a small module holding the new fan-in rows (a
Linear/Conv producing k units), the k channels of the norm, and the new fan-out columns (a
Linear/Conv from k units to the consumer's outputs, no bias). Its output is added to the
consumer's output, so `consumer(z) + seed(x)` equals the wider consumer applied to `[z, z_new]`.
Keeping the units apart is what makes the lifecycle honest and cheap: a cull just drops the
module (the host never changed shape), alpha and the counterfactual work as for any seed, the
optimizer holds the new units in their own group (old weights' state untouched), and the costs
are exactly those of the wider layer. At fossilization `esper.kasmina.growth.merge` concatenates
the units into plain wider host modules (and their optimizer state), so the final model is an
ordinary network of that width.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from esper.kasmina.growth.pair import NORMS, PairModules, WidthPair


def relu_open_at_zero(x: torch.Tensor) -> torch.Tensor:
    """ReLU whose subgradient at exactly 0 is 1 instead of `torch.relu`'s 0.

    Both are valid subgradients; 1 lets a unit whose fan-in is all zero (GradMax insertion, where
    the forward is exactly preserved) receive a fan-in gradient. `clamp_min`'s backward passes the
    gradient where x >= 0, so this is one native op. Only the seed uses it; once merged, the host's
    own ReLU applies (pre-activations are then no longer exactly 0).
    """
    return x.clamp_min(0)


def apply_post(z: torch.Tensor, post: str) -> torch.Tensor:
    """The per-channel op between activation and consumer (`WidthPair.post`)."""
    if post == "":
        return z
    spatial = tuple(range(2, z.dim()))
    if post == "mean":
        return z.mean(dim=spatial)
    if post == "maxpool2":
        if min(z.shape[d] for d in spatial) < 2:
            return z
        return F.max_pool1d(z, 2) if z.dim() == 3 else F.max_pool2d(z, 2)
    raise ValueError(f"unknown post op {post!r}; expected '', 'maxpool2' or 'mean'")


@dataclass(frozen=True)
class WidthSeedShape:
    """Everything needed to rebuild a width seed (stored with its checkpoint)."""

    units: int
    pair: dict


def _like(module: nn.Module, in_dim: int, out_dim: int, bias: bool) -> nn.Module:
    """A new module of `module`'s kind and geometry with other channel counts."""
    if isinstance(module, nn.Linear):
        return nn.Linear(in_dim, out_dim, bias=bias)
    cls = type(module)
    return cls(in_dim, out_dim, module.kernel_size, stride=module.stride, padding=module.padding,
               dilation=module.dilation, bias=bias, padding_mode=module.padding_mode)


class WidthSeed(nn.Module):
    """k new units of a width pair: `fan_out(post(act(norm(fan_in(x)))))`, added to the consumer output.

    `fan_in` copies the producer's kind and geometry (kernel, stride, padding, bias), `norm` the
    norm's eps/momentum, `fan_out` the consumer's geometry without bias. Function-preserving
    choices of its weights are made by `esper.kasmina.growth.init`.
    """

    # KasminaLayer does not blend this seed into its own output (it feeds the consumer instead).
    blends_elsewhere = True
    blueprint_id = "width"

    def __init__(self, pair: WidthPair, modules: PairModules, units: int) -> None:
        super().__init__()
        if units < 1:
            raise ValueError(f"WidthSeed needs units >= 1, got {units}")
        self.pair = pair
        self.units = units
        p, c = modules.producer, modules.consumer
        in_dim = p.in_features if isinstance(p, nn.Linear) else p.in_channels
        out_dim = c.out_features if isinstance(c, nn.Linear) else c.out_channels
        self.fan_in = _like(p, in_dim, units, bias=p.bias is not None)
        self.norm: nn.Module | None = None
        if modules.norm is not None:
            n = modules.norm
            assert isinstance(n, NORMS)
            self.norm = type(n)(units, eps=n.eps, momentum=n.momentum, affine=n.affine,
                                track_running_stats=n.track_running_stats)
        self.fan_out = _like(c, units, out_dim, bias=False)
        ref = p.weight
        self.to(device=ref.device, dtype=ref.dtype)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The new units' activations as the consumer reads them (after norm, act and post)."""
        z = self.fan_in(x)
        if self.norm is not None:
            z = self.norm(z)
        return apply_post(relu_open_at_zero(z), self.pair.post)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fan_out(self.hidden(x))

    def shape_record(self) -> WidthSeedShape:
        return WidthSeedShape(self.units, asdict(self.pair))

    def extra_repr(self) -> str:
        return f"pair={self.pair.key}, units={self.units}"
