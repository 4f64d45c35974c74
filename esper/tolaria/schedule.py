"""Learning-rate schedule (linear warmup, then constant / cosine / step) and the optimizer factory.

The schedule sets every param group's lr from its `initial_lr` at each step, so param groups that
seeds add mid-run follow the same schedule, and its whole state is the step counter.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from esper.tolaria.config import OptimConfig, ScheduleConfig


def build_optimizer(cfg: OptimConfig, params: Iterable[torch.nn.Parameter], name: str = "host") -> torch.optim.Optimizer:
    """SGD or AdamW over `params` as one named param group."""
    group = [{"params": list(params), "name": name}]
    if cfg.name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            group, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    else:
        opt = torch.optim.AdamW(group, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    for g in opt.param_groups:
        g["initial_lr"] = cfg.lr
    return opt


def add_param_group(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], name: str, lr: float) -> None:
    """Adds a named group (a new seed's parameters) without touching the state of existing ones."""
    opt.add_param_group({"params": params, "name": name, "initial_lr": lr, "lr": opt.param_groups[0]["lr"]})


def remove_param_group(opt: torch.optim.Optimizer, name: str) -> None:
    """Drops a named group and its optimizer state (a culled seed's parameters)."""
    keep = []
    for group in opt.param_groups:
        if group.get("name") == name:
            for p in group["params"]:
                opt.state.pop(p, None)
        else:
            keep.append(group)
    opt.param_groups[:] = keep


class LRSchedule:
    """Per-step multiplier of `initial_lr`: linear warmup, then constant, cosine or step decay."""

    def __init__(self, cfg: ScheduleConfig, total_steps: int, steps_per_epoch: int) -> None:
        self.cfg = cfg
        self.total_steps = max(1, total_steps)
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))
        self.step_count = 0

    def factor(self, step: int) -> float:
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.cfg.name == "constant":
            return 1.0
        if self.cfg.name == "step":
            return self.cfg.gamma ** (step // (self.cfg.step_epochs * self.steps_per_epoch))
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        floor = self.cfg.min_lr_ratio
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, opt: torch.optim.Optimizer) -> float:
        """Sets the lr of every group for the current step; returns the multiplier."""
        f = self.factor(self.step_count)
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * f
        return f

    def step(self) -> None:
        self.step_count += 1

    def state_dict(self) -> dict[str, int]:
        return {"step_count": self.step_count, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step_count = int(state["step_count"])
        self.total_steps = int(state["total_steps"])
