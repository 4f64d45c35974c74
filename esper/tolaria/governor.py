"""The governor: an in-memory snapshot of the training state and a rollback on NaN/Inf or a spike."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch

from esper.tolaria.config import GovernorConfig
from esper.tolaria.states import StateRegistry


class Governor:
    """Watches each step's loss; on a non-finite loss or a spike the trainer rolls back.

    A spike is a loss above `spike_factor` times the running (EMA) loss that is also more than
    `spike_zscore` running standard deviations above it (small losses are noisy: a ratio alone
    would fire on ordinary batches late in training) and more than `spike_min_delta` above it in
    absolute terms (at a running loss of 0.001 one hard batch at 0.005 is no divergence), once
    `spike_warmup_steps` finite losses have been seen. The snapshot is taken at each epoch start
    (after the controller's decisions are applied) and again at the first step after a seed changes
    state, on the device, so a rollback costs one copy and never undoes a lifecycle transition.
    """

    def __init__(self, cfg: GovernorConfig) -> None:
        self.cfg = cfg
        self.ema: float | None = None
        self.ema_var = 0.0
        self.seen = 0
        self.rollbacks = 0
        self._snapshot: dict[str, Any] | None = None

    def anomaly(self, loss: float) -> str | None:
        """The reason this step's loss calls for a rollback, or None (and the EMA is updated)."""
        if not self.cfg.enabled:
            return None
        if not math.isfinite(loss):
            return f"non-finite loss ({loss})"
        if self.ema is not None and self.seen >= self.cfg.spike_warmup_steps:
            std = math.sqrt(self.ema_var)
            excess = loss - self.ema
            if (loss > self.cfg.spike_factor * self.ema and excess > self.cfg.spike_zscore * std
                    and excess > self.cfg.spike_min_delta):
                return (f"loss spike ({loss:.4g} > {self.cfg.spike_factor:g} x running {self.ema:.4g} "
                        f"and {self.cfg.spike_zscore:g} sd and {self.cfg.spike_min_delta:g})")
        if self.ema is None:
            self.ema = loss
        else:
            delta = loss - self.ema
            self.ema += 0.1 * delta
            self.ema_var = 0.9 * (self.ema_var + 0.1 * delta * delta)
        self.seen += 1
        return None

    def take_snapshot(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> None:
        """Keeps copies of the model and optimizer state (and `extra`) to roll back to."""
        if not self.cfg.enabled:
            return
        self._snapshot = {
            "model": copy.deepcopy(model.state_dict()),
            "optimizer": copy.deepcopy(optimizer.state_dict()),
            "groups": [g.get("name") for g in optimizer.param_groups],
            "extra": copy.deepcopy(extra),
        }

    def restore(self, model: torch.nn.Module) -> dict[str, Any] | None:
        """Loads the snapshot's model state (seed modules are rebuilt by their layers' load hooks).

        Returns the snapshot (its "optimizer", "groups" and "extra") for the trainer to finish the
        rollback, or None when there is no snapshot.
        """
        snap = self._snapshot
        if snap is None:
            return None
        self.rollbacks += 1
        model.load_state_dict(copy.deepcopy(snap["model"]))
        self.ema = None
        self.ema_var = 0.0
        self.seen = 0
        return copy.deepcopy({k: v for k, v in snap.items() if k != "model"})

    def roll_back(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, states: StateRegistry,
                  rebuild_groups: Callable[[list[str]], None]) -> bool:
        """Restores the snapshot: the model, the states registered for the snapshot, the seed
        groups (`rebuild_groups(order)`) and the optimizer's state when its groups match (else it
        starts afresh). False when there is no snapshot."""
        snap = self.restore(model)
        if snap is None:
            return False
        states.load_state_dict(snap["extra"], source="the governor's snapshot", snapshot=True)
        rebuild_groups(snap["groups"])
        if [g.get("name") for g in optimizer.param_groups] == snap["groups"]:
            optimizer.load_state_dict(snap["optimizer"])
        else:
            optimizer.state.clear()
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema, "ema_var": self.ema_var, "seen": self.seen, "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema = state["ema"]
        self.ema_var = float(state["ema_var"])
        self.seen = int(state["seen"])
        self.rollbacks = int(state["rollbacks"])
