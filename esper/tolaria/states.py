"""The run's stateful components, by checkpoint key: what a checkpoint saves and a resume restores.

`StateRegistry` maps each key of a checkpoint payload to a component with `state_dict` /
`load_state_dict` (`Stateful`), in restore order. `Trainer.save` writes every component's state
under its key, a resume loads them back in order, and the governor's in-memory snapshot holds the
components registered with ``snapshot=True`` (the model and optimizer it copies itself). Things
that are not objects of their own (the RNG, a counter of the trainer) are registered through the
small adapters below.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

# Where a component's mismatch message names the checkpoint (filled in by `StateRegistry`).
SOURCE = "\0source\0"


class ResumeError(ValueError):
    """A resume that cannot continue this run (foreign checkpoint, architecture changed)."""


class StateMismatch(ValueError):
    """A component cannot take a checkpoint's state; the message names the checkpoint as `SOURCE`."""


@runtime_checkable
class Stateful(Protocol):
    """A component whose state a checkpoint carries."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


@dataclass(frozen=True)
class _Entry:
    component: Stateful
    snapshot: bool


class StateRegistry:
    """Checkpoint key -> stateful component, in the order a resume restores them."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def register(self, key: str, component: Stateful, *, snapshot: bool = False) -> None:
        """Adds `component` under `key` (restored after those registered before it); `snapshot`:
        also part of the governor's in-memory snapshot."""
        if key in self._entries:
            raise ValueError(f"state key {key!r} is registered twice; expected one component per key")
        self._entries[key] = _Entry(component, snapshot)

    def names(self, snapshot: bool = False) -> list[str]:
        """The registered keys in restore order (only the snapshot's with `snapshot`)."""
        return [k for k, e in self._entries.items() if e.snapshot or not snapshot]

    def __getitem__(self, key: str) -> Stateful:
        return self._entries[key].component

    def state_dict(self, snapshot: bool = False) -> dict[str, Any]:
        """Every component's state by key (only the snapshot's components with `snapshot`)."""
        return {key: self._entries[key].component.state_dict() for key in self.names(snapshot)}

    def load_state_dict(self, states: Mapping[str, Any], source: str, snapshot: bool = False) -> None:
        """Restores every component (only the snapshot's with `snapshot`) from `states`, in order.

        ResumeError names `source` (the checkpoint) when a component's state is missing or does not
        fit; nothing is loaded when one is missing.
        """
        keys = self.names(snapshot)
        missing = [key for key in keys if key not in states]
        if missing:
            raise ResumeError(f"checkpoint '{source}' has no state for {missing}; expected a checkpoint written "
                              f"by esper-train with every component of this run ({keys})")
        for key in keys:
            try:
                self._entries[key].component.load_state_dict(states[key])
            except StateMismatch as exc:
                raise ResumeError(str(exc).replace(SOURCE, source)) from None


class ModelState:
    """The model's tensors (Kasmina layers rebuild their grown seeds from their extra state)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise StateMismatch(f"checkpoint '{SOURCE}' does not fit the model: {first}") from None


class OptimizerGroups:
    """The names of the optimizer's param groups. Restored before the optimizer: the seed groups
    are rebuilt in the saved order (optimizer state is matched by position)."""

    def __init__(self, optimizer: torch.optim.Optimizer, rebuild: Callable[[list[str]], None]) -> None:
        self.optimizer = optimizer
        self.rebuild = rebuild

    def names(self) -> list[str]:
        return [g.get("name") for g in self.optimizer.param_groups]

    def state_dict(self) -> list[str]:
        return self.names()

    def load_state_dict(self, order: list[str]) -> None:
        self.rebuild(order)
        groups = self.names()
        if groups != order:
            raise StateMismatch(f"checkpoint '{SOURCE}': optimizer groups {order} do not match the rebuilt model's "
                                f"{groups}; expected a checkpoint of this run")


class Attribute:
    """One attribute of an object (e.g. the trainer's initial parameter count); `convert` on load."""

    def __init__(self, owner: Any, name: str, convert: Callable[[Any], Any] = lambda v: v) -> None:
        self.owner = owner
        self.name = name
        self.convert = convert

    def state_dict(self) -> Any:
        return getattr(self.owner, self.name)

    def load_state_dict(self, state: Any) -> None:
        setattr(self.owner, self.name, self.convert(state))


class RngState:
    """torch's CPU and CUDA generators."""

    def state_dict(self) -> dict[str, Any]:
        return {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if torch.cuda.is_available() and state.get("cuda"):
            torch.cuda.set_rng_state_all(state["cuda"])
