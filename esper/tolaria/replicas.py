"""Keeping the ranks of a data-parallel job on one model (see esper.tolaria.distributed).

A digest of every state-dict tensor, seed spec and optimizer group, compared across ranks each
epoch; what a rank does to take rank 0's version of a seed layer it got out of step with; and the
controller stand-in that hands every rank rank 0's decisions.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from esper.kasmina import KasminaLayer
from esper.lifecycle import SeedLifecycleState as S
from esper.v1 import common_pb2


class DistributedError(RuntimeError):
    """The ranks of a job cannot go on together (a rank died, or the replicas diverged)."""


class ReplicaMismatchError(DistributedError):
    """The ranks hold different models: a bug, never a user error; the message names what differs."""


def _digest(tensor: torch.Tensor) -> str:
    flat = tensor.detach().reshape(-1).contiguous().cpu()
    data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return hashlib.sha256(f"{tensor.dtype}{list(tensor.shape)}".encode() + data).hexdigest()[:16]


def seed_layers(model: nn.Module) -> list[tuple[str, KasminaLayer]]:
    """(name, layer) of every Kasmina layer of a model, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, KasminaLayer)]


def replica_digests(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, str]:
    """Digest per state-dict tensor (parameters and buffers, seed tables included), per seed layer's
    specs and of the optimizer's group names.

    State-dict keys, not module attribute names: a seed loaded from a compiled kernel artifact on
    rank 0 and the same seed built from its blueprint elsewhere name their parameters differently
    but save them under the same keys.
    """
    parts = {n: _digest(t) for n, t in model.state_dict().items() if isinstance(t, torch.Tensor)}
    for name, layer in seed_layers(model):
        parts[f"seeds:{name}"] = hashlib.sha256(
            json.dumps(layer.seed_metadata(), sort_keys=True).encode()).hexdigest()[:16]
    if optimizer is not None:
        parts["optimizer:groups"] = ",".join(str(g.get("name")) for g in optimizer.param_groups)
    return parts


def mismatch_error(epoch: int, tables: list[dict[str, str]]) -> ReplicaMismatchError:
    """The error for per-rank digest tables that differ: what differs on which rank."""
    lines = []
    for r in range(1, len(tables)):
        diff = sorted(k for k in set(tables[0]) | set(tables[r]) if tables[0].get(k) != tables[r].get(k))
        if diff:
            lines.append(f"rank {r} differs from rank 0 in {len(diff)} item(s): {', '.join(diff[:6])}"
                         + (" ..." if len(diff) > 6 else ""))
    return ReplicaMismatchError(
        f"after epoch {epoch + 1} the ranks no longer hold the same model ({'; '.join(lines)}); expected "
        "identical seed state tables and parameters on every rank. This is a bug in Esper's rank "
        "synchronisation; the last checkpoint is intact"
    )


def layer_state(layer: KasminaLayer) -> dict[str, Any]:
    """A layer's state dict on the CPU, to send to the other ranks."""
    return {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in layer.state_dict().items()}


def adopt_layer(layer: KasminaLayer, state: dict[str, Any]) -> None:
    """Takes rank 0's layer (seed modules, parameters, state table) but keeps this rank's own
    telemetry and alignment accumulators: they are reduced over ranks, not copied."""
    telemetry = layer.table.telemetry.clone()
    alignment = layer.table.alignment.clone()
    device = layer.table.state.device
    layer.load_state_dict({k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in state.items()})
    with torch.no_grad():
        for i in range(layer.num_seeds):
            if layer.state_of(i) == S.DORMANT:
                telemetry[i].zero_()  # rank 0 reset the slot when it went back to DORMANT
            if layer.state_of(i) != S.TRAINING:
                alignment[i].zero_()
        layer.table.telemetry.copy_(telemetry)
        layer.table.alignment.copy_(alignment)


def match_optimizer_groups(trainer: Any, order: Iterable[str]) -> None:
    """Makes the optimizer's seed groups those of the live seeds, as rank 0's are (`order`)."""
    from esper.tolaria.seed_groups import sync_seed_groups

    order = list(order)
    # The incremental sync (not a rebuild in `order`): the groups this rank already has keep their
    # optimizer state, exactly as rank 0's did when its hooks added the new seed's group.
    sync_seed_groups(trainer.optimizer, trainer.morph.param_groups(), trainer.config.optim.lr)
    names = [g.get("name") for g in trainer.optimizer.param_groups]
    if names != order:
        raise ReplicaMismatchError(f"optimizer groups {names} cannot follow rank 0's {order}; expected the same live seeds")


class BroadcastDecisions:
    """Stands where the controller stands: rank 0 asks the real controller, every rank gets its
    decisions together with the global step they apply at."""

    def __init__(self, inner: Any, group: Any) -> None:
        self.inner = inner
        self.group = group

    def decide(self, state: common_pb2.ModelGraphState) -> list[common_pb2.AdaptationDecision]:
        step = int(state.signals.global_step)
        payload: list[Any] = [None]
        if self.group.is_writer:
            decisions = list(self.inner.decide(state))
            payload = [(step, [d.SerializeToString() for d in decisions])]
        dist.broadcast_object_list(payload, src=0)
        at_step, blobs = payload[0]
        if at_step != step:
            raise ReplicaMismatchError(
                f"rank {self.group.rank} is at step {step} but rank 0's decisions apply at step {at_step}; "
                "expected every rank at the same step")
        return [common_pb2.AdaptationDecision.FromString(b) for b in blobs]

    def germinate(self, layer: Any, decision: common_pb2.AdaptationDecision) -> None:
        self.inner.germinate(layer, decision)

    def germination_grace(self, layer: str, seed: int) -> int:
        return self.inner.germination_grace(layer, seed)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Only rank 0's controller decides; the others' may even be of another kind (remote).
        if self.group.is_writer:
            self.inner.load_state_dict(state)

    def before_restore(self, payload: dict[str, Any]) -> None:
        self.inner.before_restore(payload)

    def after_step(self, trainer: Any, epoch: int, loss: float) -> bool:
        return self.inner.after_step(trainer, epoch, loss)

    def after_epoch(self, trainer: Any, epoch: int, record: Any) -> bool:
        return self.inner.after_epoch(trainer, epoch, record)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
