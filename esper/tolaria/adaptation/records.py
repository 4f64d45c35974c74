"""`Adaptation`: one germination from the decision to its outcome, as the controller tracks it
(and as a checkpoint keeps it, so a resume reports the outcome of an adaptation begun before)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from esper.v1 import common_pb2


@dataclass
class Adaptation:
    """A germinated slot: its kernel, the decision behind it and what the graph looked like then."""

    layer: str
    seed: int
    kernel_id: str
    blueprint_id: str
    decision: common_pb2.AdaptationDecision
    decided_at: float
    decided_step: int
    telemetry_before: common_pb2.SeedTelemetry = field(default_factory=common_pb2.SeedTelemetry)
    signals_before: common_pb2.TrainingSignals = field(default_factory=common_pb2.TrainingSignals)
    # "cold" (compiled for this run), "warm" (kernel cache) or "library" (already in Urza).
    path: str = "cold"
    # Time and epochs this germination waited while Urza or Tezzeret was down: they extend its
    # germination timeouts, and a cancellation after such a wait is a casualty of the outage.
    outage_s: float = 0.0
    outage_epochs: set[int] = field(default_factory=set)
    # The whole graph Tamiyo decided on, for the field report (offline policy learning).
    graph_before: common_pb2.ModelGraphState = field(default_factory=common_pb2.ModelGraphState)

    @property
    def key(self) -> tuple[str, int]:
        return self.layer, self.seed

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (protobuf fields as hex)."""
        return {"layer": self.layer, "seed": self.seed, "kernel_id": self.kernel_id,
                "blueprint_id": self.blueprint_id, "decision": self.decision.SerializeToString().hex(),
                "telemetry_before": self.telemetry_before.SerializeToString().hex(),
                "signals_before": self.signals_before.SerializeToString().hex(), "path": self.path,
                "decided_step": self.decided_step, "graph_before": self.graph_before.SerializeToString().hex()}

    @classmethod
    def resumed(cls, layer: str, seed: int, kernel_id: str, blueprint_id: str, step: int,
                record: Adaptation | None) -> Adaptation:
        """A germination still waiting for its kernel after a resume: the checkpoint's `record` of
        it when there is one (its decision and what the graph showed), else a bare GERMINATE."""
        decision = record.decision if record else common_pb2.AdaptationDecision(
            layer_name=layer, seed_index=seed, blueprint_id=blueprint_id, action=common_pb2.DECISION_ACTION_GERMINATE)
        return cls(layer, seed, kernel_id, blueprint_id, decision, time.perf_counter(), step,
                   record.telemetry_before if record else common_pb2.SeedTelemetry(),
                   record.signals_before if record else common_pb2.TrainingSignals(),
                   graph_before=record.graph_before if record else common_pb2.ModelGraphState())

    @classmethod
    def from_dict(cls, a: dict[str, Any]) -> Adaptation:
        """Inverse of `to_dict` (the decision time restarts now: latencies are per process)."""
        return cls(a["layer"], int(a["seed"]), a["kernel_id"], a["blueprint_id"],
                   common_pb2.AdaptationDecision.FromString(bytes.fromhex(a["decision"])), time.perf_counter(),
                   int(a["decided_step"]), common_pb2.SeedTelemetry.FromString(bytes.fromhex(a["telemetry_before"])),
                   common_pb2.TrainingSignals.FromString(bytes.fromhex(a["signals_before"])), a["path"],
                   graph_before=common_pb2.ModelGraphState.FromString(bytes.fromhex(a.get("graph_before", ""))))
