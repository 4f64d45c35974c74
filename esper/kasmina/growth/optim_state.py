"""Optimizer state across growth: the old weights' state is kept bit for bit, new entries start empty.

`fill="zero"` (the default) gives new entries zero momentum / zero Adam moments, as if they had
just been created. With Adam that means a large first step for them (their second moment starts
at 0 and bias correction divides by a tiny (1 - beta2^t)); `fill="stats"` is the ablation that
starts their second moments at the mean of the same tensor's existing ones (and their step count at
the host's), so their first steps are as large as the host's. First moments and SGD momentum are
zero in both: there is no direction to inherit.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

OptimizerFill = Literal["zero", "stats"]
"""Optimizer state of new entries: zero-padded, or second moments from the host's."""
FILLS: tuple[str, ...] = get_args(OptimizerFill)
SECOND_MOMENTS = frozenset({"exp_avg_sq", "max_exp_avg_sq"})


def _new_entries(key: str, old: torch.Tensor, shape: torch.Size, fill: str) -> torch.Tensor:
    if fill == "stats" and key in SECOND_MOMENTS and old.numel():
        return torch.full(shape, float(old.mean()), dtype=old.dtype, device=old.device)
    return torch.zeros(shape, dtype=old.dtype, device=old.device)


def _check_fill(fill: str) -> None:
    if fill not in FILLS:
        raise ValueError(f"optimizer fill {fill!r}; expected one of {FILLS}")


def _swap_in_groups(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter) -> None:
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i] = new
                return
    raise KeyError("the parameter being grown is not in the optimizer")


def replace_grown(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter, dim: int,
                  tail: nn.Parameter | None = None, fill: str = "zero") -> None:
    """`new` is `old` extended along `dim` (old entries first); give it `old`'s place and state.

    The state of the old entries is copied unchanged; the appended entries take the state of
    `tail` (the seed parameter they came from) when it has one, else zero / `fill`.
    """
    _check_fill(fill)
    _swap_in_groups(optimizer, old, new)
    state = optimizer.state.pop(old, None)
    if not state:
        return
    tail_state = optimizer.state.get(tail, {}) if tail is not None else {}
    grown = {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape == old.shape:
            extra_shape = list(new.shape)
            extra_shape[dim] = new.shape[dim] - old.shape[dim]
            extra = tail_state.get(key)
            if not (torch.is_tensor(extra) and list(extra.shape) == extra_shape):
                extra = _new_entries(key, value, torch.Size(extra_shape), fill)
            grown[key] = torch.cat([value, extra.to(value)], dim=dim)
        else:
            grown[key] = value.clone() if torch.is_tensor(value) else value
    optimizer.state[new] = grown


def fill_new_parameter(optimizer: torch.optim.Optimizer, new: nn.Parameter, like: nn.Parameter, fill: str) -> None:
    """State for a brand-new parameter (a seed's) in the optimizer: empty for "zero"; for "stats",
    zero first moments, second moments at the mean of `like`'s and `like`'s step count."""
    _check_fill(fill)
    source = optimizer.state.get(like)
    if fill == "zero" or not source:
        return
    state = {}
    for key, value in source.items():
        if torch.is_tensor(value) and value.shape == like.shape:
            state[key] = _new_entries(key, value, new.shape, fill)
        else:
            state[key] = value.clone() if torch.is_tensor(value) else value
    optimizer.state[new] = state
