"""The morphogenesis controller: what decides at each epoch boundary and carries out germinations.

A `Controller` is built once the host is wrapped (it needs the run's seed sites), by the
`ControllerFactory` the trainer is given, and passed to `Morphogenesis` through its constructor:

- `PolicyController` (the default): a Tamiyo policy behind its safety rails, in process
  (``services.mode: off``, and every rank but 0 under torchrun);
- `esper.tolaria.adaptation.RemoteController`: decisions from the Tamiyo service, kernels
  compiled by Tezzeret (built by `esper.tolaria.services.RunServices`);
- `esper.tolaria.replicas.BroadcastDecisions`: rank 0's controller, its decisions broadcast.

A controller is also the trainer's first hook (`esper.tolaria.hooks.TrainerHook`): the remote
controller applies what its services sent at step boundaries; the in-process one has nothing to do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from esper.tamiyo.settings import policy_settings_from_mapping
from esper.tolaria.config import ConfigError, policy_config
from esper.tolaria.hooks import BoundaryHook, TrainerHook
from esper.v1 import common_pb2

Echo = Callable[[str], None]


@runtime_checkable
class Controller(TrainerHook, Protocol):
    """What `Morphogenesis` asks at each epoch boundary and when a branch seed germinates."""

    def decide(self, state: common_pb2.ModelGraphState) -> list[common_pb2.AdaptationDecision]: ...

    def germinate(self, layer: Any, decision: common_pb2.AdaptationDecision) -> None: ...

    def germination_grace(self, layer: str, seed: int) -> int: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# (the run's Morphogenesis, a line printer for the run's display) -> its controller.
ControllerFactory = Callable[[Any, Echo], Controller]


class PolicyController(BoundaryHook):
    """A Tamiyo controller (policy behind the rails) run in process; seeds germinate from their
    blueprint at once, with no kernel to wait for (so no grace either)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def decide(self, state: common_pb2.ModelGraphState) -> list[common_pb2.AdaptationDecision]:
        return self.inner.decide(state)

    def germinate(self, layer: Any, decision: common_pb2.AdaptationDecision) -> None:
        layer.germinate(decision.seed_index, decision.blueprint_id, reason=decision.reason)

    def germination_grace(self, layer: str, seed: int) -> int:
        return 0

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


def policy_controller(morph: Any, echo: Echo | None = None, *,
                      wrap: Callable[[Any], Any] | None = None) -> PolicyController:
    """The run's configured Tamiyo policy and rails (its ``controller`` section), in process;
    `wrap(controller)` may stand in for the Tamiyo controller (e.g. one that records decisions)."""
    try:
        inner = policy_settings_from_mapping(policy_config(morph.cfg)).controller(morph.flops_initial)
    except ValueError as exc:  # e.g. a learned policy that cannot be loaded
        raise ConfigError(f"controller: {exc}") from None
    return PolicyController(wrap(inner) if wrap is not None else inner)
