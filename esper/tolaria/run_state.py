"""What a run has done so far: its counters (`RunState`, checkpointed) and one epoch's record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float
    params: int
    wall_s: float


@dataclass
class RunState:
    """Counters of the run that a checkpoint carries besides the tensors."""

    epoch: int = 0  # epochs completed
    global_step: int = 0
    best_val_loss: float = float("inf")
    best_val_acc: float = 0.0
    epochs_without_improvement: int = 0
    train_flops: float = 0.0
    eval_flops: float = 0.0
    growth_flops: float = 0.0
    wall_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)

    def record_validation(self, val_loss: float, val_acc: float) -> None:
        """An epoch's validation: the best so far, and the epochs since the loss last improved."""
        if val_loss < self.best_val_loss:
            self.best_val_loss = val_loss
            self.epochs_without_improvement = 0
        else:
            self.epochs_without_improvement += 1
        self.best_val_acc = max(self.best_val_acc, val_acc)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(RunState(**state).__dict__)
