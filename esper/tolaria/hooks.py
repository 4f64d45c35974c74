"""The trainer's extension points: `TrainerHook`, called on the training thread between steps.

Hooks are given to the trainer's constructor (`Trainer(hooks=...)`); the run's controller
(`esper.tolaria.controllers.Controller`) is always the first. A hook never waits on the network
(the remote controller and the Tolaria server's hooks hand work to their own threads).
`after_step` / `after_epoch` returning True ends the run gracefully (a Stop request);
`before_restore` sees a checkpoint's payload before the model loads it.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class TrainerHook(Protocol):
    """What the trainer calls on each of its hooks."""

    def before_restore(self, payload: dict[str, Any]) -> None: ...

    def after_step(self, trainer: Any, epoch: int, loss: float) -> bool: ...

    def after_epoch(self, trainer: Any, epoch: int, record: Any) -> bool: ...


class BoundaryHook:
    """A `TrainerHook` that does nothing; subclasses override the points they need."""

    def before_restore(self, payload: dict[str, Any]) -> None:
        """Before a checkpoint is loaded into the model."""

    def after_step(self, trainer: Any, epoch: int, loss: float) -> bool:
        """After each optimizer step; True ends the run."""
        return False

    def after_epoch(self, trainer: Any, epoch: int, record: Any) -> bool:
        """After each epoch (validation done, record written); True ends the run."""
        return False
